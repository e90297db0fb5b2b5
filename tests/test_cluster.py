"""Every cluster group: the config composes and builds, and with real processes (a `dask scheduler` and `dask worker`s
started here, on 127.0.0.1 only) a worker SIGKILLed mid-run leaves the same store as a clean in-process run."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.cli import compose, run
from pipeline.cluster import dispatch, factories
from pipeline.records import Checkpoint
from pipeline.store.cube import open_sinks
from tests.ckpt_factory import make_run

REPO = Path(__file__).resolve().parents[1]
STEPS = [0, 100, 200, 300, 400, 500]
PROBE = ["probe.rows=8", "probe.seq_len=32"]
GROUP = "random-T32-r8-s0-bos"  # the store group of that probe
DEADLINE = 240  # seconds any one real-process run may take before the test gives up (and kills it)


def replay_args(root, store, *extra):
    return [
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "stages=[replay]",
        *PROBE,
        *extra,
    ]


def listeners(procs) -> set[tuple[str, int]]:
    """The (address, port) every process in `procs` listens on (TCP)."""
    found = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def loopback(address: str) -> bool:
    return address == "::1" or address.startswith("127.")


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster") / "run"
    make_run(root, STEPS)
    return root


@pytest.fixture(scope="module")
def clean(run_root, tmp_path_factory):
    """The store of a clean run with the default (in-process) cluster, and what this process listened on while it
    replayed."""
    import pipeline.replay.step

    store = tmp_path_factory.mktemp("clean") / "s.zarr"
    listening = set()
    replay = pipeline.replay.step.replay

    def spy(*a, **kw):
        listening.update(listeners([psutil.Process()]))
        return replay(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.replay.step, "replay", spy)
        assert run(compose(replay_args(run_root, store))) == 0
    return store, listening


def assert_same_store(store, reference, steps=STEPS):
    got, want = open_sinks(store, GROUP), open_sinks(reference, GROUP)
    assert list(got.step.values) == steps
    assert list(got.status.values) == ["done"] * len(steps)
    assert set(got.data_vars) == set(want.data_vars)
    for name in want.data_vars:
        # the same float32 computation in another process, perhaps with another thread count
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_default_run_listens_on_no_network_address(clean):
    _, listening = clean
    assert listening == set()  # no scheduler, no dashboard: no TCP at all


def sinktrace(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=REPO,
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def worker_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def steps_done(store) -> int:
    """Steps marked done so far, counted from the status chunks the writer has created (pending is the fill value,
    so a chunk file exists once a step is written); read without opening the store the writer is changing."""
    folder = next(Path(store).glob("*/status/c"), None)
    return len(list(folder.iterdir())) if folder is not None else 0


def wait_until(predicate, what: str, timeout: float = DEADLINE, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"sinktrace ended ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def finish(proc, timeout: float = DEADLINE) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=30)


@pytest.mark.slow
def test_processes_cluster_survives_a_killed_worker(run_root, clean, tmp_path):
    store = tmp_path / "s.zarr"
    proc = sinktrace(*replay_args(run_root, store, "cluster=processes", "cluster.n_workers=2"))
    try:
        driver = psutil.Process(proc.pid)

        def workers():  # the worker processes the driver's nannies spawned
            found = []
            for p in driver.children(recursive=True):
                try:
                    if "spawn_main" in " ".join(p.cmdline()):
                        found.append(p)
                except psutil.Error:  # a short-lived helper that already ended
                    pass
            return found

        wait_until(lambda: len(workers()) == 2 and steps_done(store) >= 1, "the first stored step", proc=proc)
        every = [driver, *driver.children(recursive=True)]
        assert [a for a in listeners(every) if not loopback(a[0])] == []
        if steps_done(store) == len(STEPS):
            pytest.skip("the run finished before a worker could be killed")
        workers()[0].send_signal(signal.SIGKILL)
        code, out = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, out
    assert_same_store(store, clean[0])


@pytest.fixture
def dask_scheduler(tmp_path):
    """`dask scheduler` on 127.0.0.1 (a free port), its address, and a function starting `dask worker`s for it;
    everything killed afterwards."""
    procs = []
    file = tmp_path / "scheduler.json"
    env = worker_env(DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="2")
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(file),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )

    def start_workers(n):
        started = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dask",
                    "worker",
                    "--scheduler-file",
                    str(file),
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-nanny",
                    "--no-dashboard",
                    "--name",
                    f"w{i}",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(n)
        ]
        procs.extend(started)
        from distributed import Client

        with Client(scheduler_file=str(file), timeout=60) as client:
            client.wait_for_workers(n, timeout=DEADLINE)
            pids = client.run(os.getpid)
        return {addr: next(p for p in started if p.pid == pid) for addr, pid in pids.items()}

    wait_until(file.exists, "the scheduler's address")
    address = json.loads(file.read_text())["address"]
    try:
        yield procs[0], address, start_workers
    finally:
        stop(procs)


@pytest.mark.slow
def test_scheduler_cluster_survives_a_killed_worker(run_root, clean, dask_scheduler, tmp_path):
    scheduler, address, start_workers = dask_scheduler
    assert address.startswith("tcp://127.0.0.1:")
    workers = start_workers(2)
    store = tmp_path / "s.zarr"
    proc = sinktrace(*replay_args(run_root, store, "cluster=scheduler", f"cluster.address={address}"))
    wait_until(lambda: steps_done(store) >= 1, "the first stored step", proc=proc)
    if steps_done(store) == len(STEPS):
        pytest.skip("the run finished before a worker could be killed")
    victim = next(iter(workers.values()))
    victim.send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert code == 0, out
    assert_same_store(store, clean[0])


@pytest.mark.slow
def test_lost_scheduler_ends_with_a_clear_message_and_the_rerun_resumes(run_root, clean, dask_scheduler, tmp_path):
    scheduler, address, start_workers = dask_scheduler
    start_workers(1)
    store = tmp_path / "s.zarr"
    proc = sinktrace(*replay_args(run_root, store, "cluster=scheduler", f"cluster.address={address}"))
    wait_until(lambda: steps_done(store) >= 1, "the first stored step", proc=proc)
    if steps_done(store) == len(STEPS):
        pytest.skip("the run finished before the scheduler could be killed")
    scheduler.send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert code == 1, out
    assert "lost the Dask scheduler" in out and "rerun the same command" in out, out
    assert "Traceback" not in out
    ds = open_sinks(store, GROUP)  # consistent: readable, every step done or pending, the done ones right
    done = ds.status.values == "done"
    assert 1 <= done.sum() < len(STEPS) and set(ds.status.values) <= {"done", "pending"}
    want = open_sinks(clean[0], GROUP)
    np.testing.assert_allclose(ds.sink_mass.values[done], want.sink_mass.values[done], rtol=1e-5, atol=1e-6)
    # the rerun (here in-process) replays only what is missing and ends with the clean run's store
    assert run(compose(replay_args(run_root, store))) == 0
    assert_same_store(store, clean[0])


def test_scheduler_address_nobody_answers_is_a_usage_error(run_root, tmp_path, capsys):
    cfg = compose(
        replay_args(
            run_root,
            tmp_path / "s.zarr",
            "cluster=scheduler",
            "cluster.address=tcp://127.0.0.1:9",
            "cluster.timeout=2s",
        )
    )
    assert run(cfg) == 2
    err = capsys.readouterr().err
    assert "cluster.address=tcp://127.0.0.1:9: no Dask scheduler answers there" in err


def test_tls_settings_build_dask_security(tmp_path):
    from hydra.utils import instantiate

    paths = {k: tmp_path / f"{k}.pem" for k in ("ca", "cert", "key")}
    cfg = compose(
        [
            "cluster=scheduler",
            "cluster.address=tls://10.0.0.5:8786",
            f"cluster.security.tls_ca_file={paths['ca']}",
            f"cluster.security.tls_client_cert={paths['cert']}",
            f"cluster.security.tls_client_key={paths['key']}",
            "cluster.security.require_encryption=true",
        ]
    )
    security = instantiate(cfg.cluster.security)
    assert security.require_encryption is True
    assert (security.tls_ca_file, security.tls_client_cert, security.tls_client_key) == tuple(
        str(p) for p in paths.values()
    )


def test_gpus_cluster_gives_each_worker_its_own_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a faked device list: no GPU is touched
    cfg = compose(["cluster=gpus"]).cluster
    assert cfg.build.n_workers is None and cfg.resources == {"GPU": 1}
    client, cluster = factories.connect(cfg)
    try:
        seen = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        assert sorted(seen.values()) == ["3", "5"]
        info = client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["resources"] for w in info] == [{"GPU": 1}] * 2
        assert all(loopback(addr.split("://")[1].rsplit(":", 1)[0]) for addr in seen)
    finally:
        factories.close(client, cluster)


def test_gpus_cluster_without_a_gpu_is_a_usage_error(monkeypatch):
    from pipeline.errors import UsageError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UsageError, match="cluster=gpus: no GPU is visible"):
        factories.gpu_cluster()


def test_slurm_jobs_ask_for_the_configured_resources(tmp_path, monkeypatch):
    """No SLURM here: `sbatch` and `scancel` stand-ins record what dask-jobqueue submits (the job script)."""
    pytest.importorskip("dask_jobqueue")
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    fake = {
        "sbatch": f'cp "$1" {jobs}/job-$$.sh\necho "Submitted batch job $$"\n',
        "scancel": "exit 0\n",
        "squeue": "exit 0\n",
    }
    for name, body in fake.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = compose(
        [
            "cluster=slurm",
            "cluster.queue=gpu",
            "cluster.account=lab42",
            "cluster.cores=16",
            "cluster.memory=120GB",
            "cluster.gpus_per_job=4",
            "cluster.walltime=12:00:00",
            "cluster.jobs=3",
            "cluster.interface=lo",
        ]
    ).cluster
    client, cluster = factories.connect(cfg)
    try:
        wait_until(lambda: len(list(jobs.iterdir())) == 3, "three submitted jobs", timeout=60)
    finally:
        factories.close(client, cluster)
    for script in jobs.iterdir():
        text = script.read_text()
        for line in (
            "#SBATCH -p gpu",
            "#SBATCH -A lab42",
            "#SBATCH -n 1",
            "#SBATCH --cpus-per-task=16",
            "#SBATCH --mem=112G",
            "#SBATCH -t 12:00:00",
            "#SBATCH --gpus=4",
        ):
            assert line in text, (line, text)
        command = text.strip().splitlines()[-1]
        for arg in ("--nworkers 4", "--nthreads 4", "--resources GPU=1", "--preload pipeline.cluster.factories"):
            assert arg in command, (arg, command)


def test_each_worker_of_a_slurm_job_keeps_its_own_gpu(monkeypatch):
    class Worker:
        name = "SLURMCluster-7-2"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    factories.dask_setup(Worker())
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"


def test_consecutive_steps_go_to_one_worker_each():
    ckpts = [Checkpoint(step=s, path=f"/r/{s}") for s in range(7)]
    plan = dispatch.stretches(ckpts, ["tcp://a", "tcp://b", "tcp://c"])
    assert [(c.step, n.step if n else None, w) for c, n, w in plan] == [
        (0, 1, "tcp://a"),
        (1, None, "tcp://a"),
        (2, 3, "tcp://b"),
        (3, 4, "tcp://b"),
        (4, None, "tcp://b"),
        (5, 6, "tcp://c"),
        (6, None, "tcp://c"),
    ]
    assert [w for _, _, w in dispatch.stretches(ckpts[:2], ["tcp://a", "tcp://b", "tcp://c"])] == ["tcp://a", "tcp://b"]


@pytest.mark.parametrize("group", ["local", "processes", "gpus", "scheduler", "slurm"])
def test_every_cluster_group_composes(group):
    cfg = compose([f"cluster={group}", *(["cluster.address=tcp://127.0.0.1:8786"] if group == "scheduler" else [])])
    if group == "local":
        assert cfg.cluster.kind == dispatch.IN_PROCESS
    else:
        assert cfg.cluster.retries == 2 and cfg.cluster.dashboard is False
