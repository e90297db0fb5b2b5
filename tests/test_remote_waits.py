"""Every wait on object storage is bounded: an object that never answers fails its own step, naming its URL, within
`checkpoints.request_timeout` / `checkpoints.download_timeout`, and the other steps are replayed. The bucket is an
S3-compatible server (moto's) on 127.0.0.1 behind benchmarks/latency_proxy.py, which holds the hanging object's
ranged reads unanswered."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.cli import compose, run
from pipeline.store.cube import open_sinks
from tests.ckpt_factory import make_run

pytestmark = pytest.mark.slow  # real Dask clusters or a server that hangs on purpose: seconds each

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "sinktrace-waits"
GROUP = "random-T16-r4-s0-bos"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """(proxy, the run's URL): three checkpoints in a bucket behind the proxy."""
    from benchmarks.latency_proxy import object_store

    root = tmp_path_factory.mktemp("waits") / "run"
    make_run(root, [0, 10, 20])
    with object_store(0.0, BUCKET) as (proxy, direct):
        direct.put(str(root), f"{BUCKET}/run", recursive=True)
        yield proxy, f"s3://{BUCKET}/run"


def hanging(step: int):
    """The proxy's `hold`: the ranged reads of one checkpoint's weights get no answer."""
    return lambda method, path: method == "GET" and f"/checkpoint-{step}/model.safetensors" in path


def test_a_hanging_object_fails_its_step_within_the_bound_and_the_others_are_done(bucket, tmp_path, capsys):
    proxy, url = bucket
    proxy.hold = hanging(10)
    store = tmp_path / "s.zarr"
    cfg = compose(
        [
            f"checkpoints.root={url}",
            "checkpoints.quiet_seconds=0",
            "checkpoints.request_timeout=0.5",
            "checkpoints.download_timeout=6",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=4",
            "probe.seq_len=16",
            "replay.measure=[]",
        ]
    )
    began = time.monotonic()
    try:
        assert run(cfg) == 1
    finally:
        proxy.hold = None
    took = time.monotonic() - began
    ds = open_sinks(str(store), GROUP)
    assert dict(zip(ds.step.values.tolist(), ds.status.values.tolist())) == {0: "done", 10: "failed", 20: "done"}
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.strip().startswith("step 10:")]
    assert f"{url}/checkpoint-10/model.safetensors" in line, line
    assert took < 30, took  # a few attempts of 0.5 s each, never the default minute per request


def test_sigterm_ends_a_run_waiting_on_a_hanging_object_within_seconds(bucket, tmp_path):
    proxy, url = bucket
    proxy.held = 0
    proxy.hold = hanging(0)
    script = textwrap.dedent(
        f"""
        import sys
        from pipeline.cli import compose, run
        sys.exit(run(compose([
            "checkpoints.root={url}", "checkpoints.quiet_seconds=0", "store.path={tmp_path / "s.zarr"}",
            "stages=[replay]", "probe.rows=4", "probe.seq_len=16", "replay.measure=[]", "replay.steps=[0]",
        ])))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy()
    )
    try:
        waited = time.monotonic()
        while proxy.held == 0 and time.monotonic() - waited < 60:  # until its ranged read hangs at the proxy
            time.sleep(0.1)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert time.monotonic() - sent < 10
        assert proc.returncode == 128 + signal.SIGTERM, out.decode()
        assert b"interrupted by SIGTERM" in out
    finally:
        proxy.hold = None
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "lie, said",
    [
        ("overstated", "the answer is shorter than its declared length"),  # the connection closes before its end
        ("unranged", "the answer is longer than the range asked for"),  # the whole object for a range
    ],
)
def test_an_answer_of_another_length_fails_its_step_naming_the_url(bucket, tmp_path, capsys, lie, said):
    proxy, url = bucket
    weights = "/checkpoint-20/model.safetensors"
    if lie == "overstated":
        proxy.misstate = lambda method, path: 100 if method == "GET" and weights in path else 0
    else:
        proxy.unranged = lambda method, path: method == "GET" and weights in path
    store = tmp_path / "s.zarr"
    args = [f"checkpoints.root={url}", "checkpoints.quiet_seconds=0", f"store.path={store}", "stages=[replay]"]
    try:
        assert run(compose([*args, "probe.rows=4", "probe.seq_len=16", "replay.measure=[]"])) == 1
    finally:
        proxy.misstate = proxy.unranged = None
    ds = open_sinks(str(store), GROUP)
    assert ds.status.values.tolist() == ["done", "done", "failed"]
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip().startswith("step 20:")]
    assert f"{url}{weights}" in line and said in line, line
