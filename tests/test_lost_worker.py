"""A lost worker is a retried task, never a lost run: with an external `dask scheduler` and two `dask worker`s
(on 127.0.0.1 only), one worker SIGKILLed at a random moment of the run's first seconds (while the client connects,
submits, or a replay runs) leaves every step `done` and the store equal to a clean in-process run's."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import compose, run
from pipeline.store.cube import open_sinks
from tests.ckpt_factory import make_run

pytestmark = pytest.mark.slow  # real Dask clusters or a server that hangs on purpose: seconds each

REPO = Path(__file__).resolve().parents[1]
STEPS = [0, 10, 20, 30]
GROUP = "random-T8-r2-s0-bos"
TRIALS = 3
DEADLINE = 120  # seconds a process may take to start before the test gives up


def replay_args(root, store, *extra) -> list[str]:
    return [
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=2",
        "probe.seq_len=8",
        "replay.measure=[]",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lost") / "run"
    make_run(root, STEPS)
    return root


@pytest.fixture(scope="module")
def clean(run_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("clean") / "s.zarr"
    assert run(compose(replay_args(run_root, store))) == 0
    return store


def dask(*args) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "3",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "dask", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, a function that gives two live workers, replacing any that died); every process this
    starts is killed at the end."""
    from distributed import Client

    file = tmp_path_factory.mktemp("scheduler") / "scheduler.json"
    procs = [dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(file))]
    workers: list[subprocess.Popen] = []

    def two_workers() -> list[subprocess.Popen]:
        workers[:] = [w for w in workers if w.poll() is None]
        while len(workers) < 2:
            w = dask("worker", "--scheduler-file", str(file), "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny")
            workers.append(w)
            procs.append(w)
        with Client(scheduler_file=str(file), timeout=DEADLINE) as client:
            client.wait_for_workers(2, timeout=DEADLINE)
        return list(workers)

    try:
        end = time.monotonic() + DEADLINE
        while not file.exists() and time.monotonic() < end:
            time.sleep(0.1)
        yield json.loads(file.read_text())["address"], two_workers
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)


@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_worker_killed_at_a_random_moment_leaves_the_clean_store(
    run_root, clean, cluster, tmp_path, monkeypatch, trial
):
    """Trial 0 kills the worker the moment the client has connected (before anything is sent to the workers); the
    others at a random moment of the run's first seconds."""
    from pipeline.cluster import factories

    address, two_workers = cluster
    victim = random.Random(trial).choice(two_workers())
    killer = None
    if trial == 0:
        connect = factories.connect

        def connect_then_kill(cluster_cfg):
            connected = connect(cluster_cfg)
            victim.send_signal(signal.SIGKILL)  # it dies while the client goes on talking to the scheduler
            return connected

        monkeypatch.setattr(factories, "connect", connect_then_kill)
    else:
        killer = threading.Timer(random.Random(100 + trial).uniform(0.0, 3.0), victim.send_signal, (signal.SIGKILL,))
        killer.start()
    store = tmp_path / "s.zarr"
    try:
        assert run(compose(replay_args(run_root, store, "cluster=scheduler", f"cluster.address={address}"))) == 0
    finally:
        if killer is not None:
            killer.cancel()
    got, want = open_sinks(str(store), GROUP), open_sinks(str(clean), GROUP)
    assert got.step.values.tolist() == STEPS and got.status.values.tolist() == ["done"] * len(STEPS)
    for name in want.data_vars:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-5, atol=1e-6, err_msg=name)
