"""Following a live run: a simulated trainer writes checkpoints while `replay.watch=true` follows it, is killed at
random moments and restarted; and a fuzz of what discovery and loading read, a fixed number of cases."""

import json
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import pipeline
from pipeline.cli import compose, run
from tests.ckpt_factory import backdate, make_run, save_checkpoint

GROUP = "random-T16-r4-s0-bos"
STEPS = list(range(0, 400, 10))  # 40 checkpoints
FUZZ_CASES = 30


def watch_args(root, store, *extra):
    return [
        sys.executable,
        "-m",
        "pipeline",
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=1",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=4",
        "probe.seq_len=16",
        "replay.watch=true",
        "replay.poll_seconds=0.2",
        *extra,
    ]


class Trainer(threading.Thread):
    """Writes checkpoints one by one the way a trainer does: weights first, trainer_state.json last; some
    weight files preallocated (a valid header over zeros) before their bytes arrive, one of them for longer than
    the quiet period; one checkpoint deleted by rotation before it was complete."""

    def __init__(self, root: Path, stash: Path):
        super().__init__(daemon=True)
        self.root, self.stash = root, stash
        self.error = None

    def run(self):
        try:
            rng = random.Random(1)
            for i, step in enumerate(STEPS):
                src, dst = self.stash / f"checkpoint-{step}", self.root / f"checkpoint-{step}"
                dst.mkdir()
                (dst / "config.json").write_bytes((src / "config.json").read_bytes())
                weights = (src / "model.safetensors").read_bytes()
                if i % 7 == 3:
                    (header_len,) = struct.unpack("<Q", weights[:8])
                    (dst / "model.safetensors").write_bytes(
                        weights[: 8 + header_len] + bytes(len(weights) - 8 - header_len)
                    )
                    time.sleep(2.5 if i == 10 else 0.2)
                (dst / "model.safetensors").write_bytes(weights)
                (dst / "trainer_state.json").write_bytes((src / "trainer_state.json").read_bytes())
                if i == 20:  # a checkpoint the trainer rotates away before it was ever complete
                    extra = self.root / "checkpoint-1005"
                    extra.mkdir()
                    (extra / "config.json").write_bytes((src / "config.json").read_bytes())
                    time.sleep(0.3)
                    for f in extra.iterdir():
                        f.unlink()
                    extra.rmdir()
                time.sleep(rng.uniform(0.05, 0.3))
        except Exception as e:  # surfaced by the test
            self.error = e


@pytest.mark.slow
def test_soak_watch_killed_at_random_equals_a_clean_replay(tmp_path, capsys):
    stash, root, store = tmp_path / "stash", tmp_path / "run", tmp_path / "watched.zarr"
    make_run(stash, STEPS)
    root.mkdir()
    trainer = Trainer(root, stash)
    trainer.start()
    rng, kills, t_end = random.Random(0), 0, time.time() + 420
    while trainer.is_alive() and time.time() < t_end:
        proc = subprocess.Popen(watch_args(root, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    trainer.join(timeout=60)
    assert trainer.error is None and not trainer.is_alive()
    assert kills >= 2, "the trainer finished before the watcher was killed twice"

    # the last watch, to the end, in this process: the killed ones were the processes under test
    final = watch_args(root, store, f"replay.until_step={STEPS[-1]}", "replay.idle_timeout=60")
    assert run(compose(final[3:])) == 0
    assert "reached replay.until_step" in capsys.readouterr().out

    reference = tmp_path / "clean.zarr"
    assert (
        run(
            compose(
                [
                    f"checkpoints.root={root}",
                    "checkpoints.quiet_seconds=0",
                    f"store.path={reference}",
                    "stages=[replay]",
                    "probe.rows=4",
                    "probe.seq_len=16",
                ]
            )
        )
        == 0
    )
    got, want = pipeline.open_sinks(store, GROUP).load(), pipeline.open_sinks(reference, GROUP).load()
    assert got.step.values.tolist() == STEPS and set(got.status.values.tolist()) == {"done"}
    xr.testing.assert_equal(got.drop_attrs(), want.drop_attrs())


@pytest.mark.slow
def test_watch_stops_when_idle_and_says_what_it_waits_for(tmp_path):
    root = tmp_path / "run"
    make_run(root, [0, 10])
    save_checkpoint(root / "checkpoint-20", step=20, age=0)
    weights = root / "checkpoint-20" / "model.safetensors"
    weights.rename(weights.with_name("model.safetensors.tmp"))  # still being written, under a temporary name
    res = subprocess.run(
        watch_args(root, tmp_path / "s.zarr", "replay.idle_timeout=3"), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "nothing new for" in res.stdout and "replay.idle_timeout" in res.stdout
    assert "waiting for step 20" in res.stderr  # the progress line
    ds = pipeline.open_sinks(tmp_path / "s.zarr", GROUP)
    assert ds.step.values.tolist() == [0, 10] and ds.status.values.tolist() == ["done", "done"]


@pytest.mark.slow
def test_two_runs_on_one_store_the_second_is_refused(tmp_path):
    root = tmp_path / "run"
    make_run(root, [0, 10])
    store = tmp_path / "s.zarr"
    first = subprocess.Popen(
        watch_args(root, store, "replay.idle_timeout=120"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # the first run has replayed both and now waits for more
            try:
                if (pipeline.open_sinks(store, GROUP).status == "done").sum().item() == 2:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        holder = json.loads((tmp_path / "s.zarr.lock.json").read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run(watch_args(root, store), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"being written by process {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    ds = pipeline.open_sinks(store, GROUP)
    assert ds.status.values.tolist() == ["done", "done"] and np.isfinite(ds.sink_mass).all()


# ------------------------------------------------------------------ fuzz


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and data:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # cut short
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:  # random junk
        data = bytearray(rng.randbytes(rng.randint(0, 64)))
    else:  # a plausible but wrong value
        try:
            obj = json.loads(bytes(data))
            key = rng.choice(sorted(obj)) if isinstance(obj, dict) and obj else None
            if key is not None:
                obj[key] = rng.choice([None, -1, 2**62, "x", [], {}, 1e308, True])
            data = bytearray(json.dumps(obj).encode())
        except ValueError:
            data = bytearray(b"{}")
    return bytes(data)


def mutate_header(path: Path, rng: random.Random) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    choice = rng.randrange(3)
    if choice == 0:
        path.write_bytes(struct.pack("<Q", rng.choice([0, 7, n + 1, 2**40, 2**63])) + raw[8:])
    elif choice == 1:
        path.write_bytes(raw[:8] + mutate(raw[8 : 8 + n], rng).ljust(n)[:n] + raw[8 + n :])
    else:
        path.write_bytes(raw[:8] + mutate(raw[8 : 8 + n], rng) + raw[8 + n :])


@pytest.mark.slow
def test_fuzz_of_what_discovery_and_loading_read(tmp_path, capsys):
    import resource

    clean = tmp_path / "clean"
    make_run(clean, [0, 10], sharded=True)
    rng = random.Random(0)
    names = ["config.json", "trainer_state.json", "model.safetensors.index.json", "shard"]
    for cases in range(FUZZ_CASES):  # a count, not a clock: every run tries the same cases
        case = tmp_path / f"case{cases}"
        import shutil

        shutil.copytree(clean, case)
        target = case / "checkpoint-10"
        name = rng.choice(names)
        if name == "shard":
            mutate_header(sorted(target.glob("model-*.safetensors"))[rng.randrange(2)], rng)
        else:
            path = target / name
            path.write_bytes(mutate(path.read_bytes(), rng))
        backdate(case, 3600)
        status = run(
            compose(
                [
                    f"checkpoints.root={case}",
                    "checkpoints.quiet_seconds=0",
                    f"store.path={tmp_path / f's{cases}.zarr'}",
                    "stages=[replay]",
                    "probe.rows=2",
                    "probe.seq_len=8",
                ]
            )
        )
        out = capsys.readouterr()
        assert status in (0, 1, 2), (name, status)
        if status == 1:  # the damaged step failed with a message that names the folder; the other one was stored
            assert f"{target}" in out.err or str(case) in out.err, (name, out.err)
            ds = pipeline.open_sinks(tmp_path / f"s{cases}.zarr", "random-T8-r2-s0-bos")
            assert ds.status.sel(step=0).item() == "done"
        elif status == 2:
            assert out.err.startswith("sinktrace: error: ") and out.err.count("\n") == 1, out.err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20  # KiB: under 4 GiB
