"""Checkpoints and the store on S3: an S3-compatible server (moto's server mode) run by the tests on 127.0.0.1 only,
read and written through fsspec/s3fs exactly as a real bucket would be."""

import numpy as np
import pytest

from pipeline.cli import compose, run
from pipeline.records import Checkpoint
from pipeline.store.cube import open_sinks
from tests.ckpt_factory import make_run, save_checkpoint
from tests.s3server import s3_fixture

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "sinktrace-test"
STEPS = [0, 100, 200, 300]
PROBE = ["probe.rows=8", "probe.seq_len=32"]
GROUP = "random-T32-r8-s0-bos"  # the store group of that probe


s3 = s3_fixture(BUCKET)


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The same run on the local disk and in the bucket."""
    root = tmp_path_factory.mktemp("s3run") / "run"
    make_run(root, STEPS)
    s3.put(str(root), f"{BUCKET}/run", recursive=True)
    return root, f"s3://{BUCKET}/run"


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The run replayed from the local disk into a local store: what the bucket's replays must equal."""
    store = tmp_path_factory.mktemp("reference") / "local.zarr"
    assert run(compose(replay_args(runs[0], store))) == 0
    return open_sinks(store, GROUP)


def replay_args(root, store, *extra):
    return [
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "stages=[replay]",
        *PROBE,
        *extra,
    ]


@pytest.mark.slow
def test_run_from_and_into_s3_equals_a_local_run(runs, reference, s3, monkeypatch):
    from pipeline.checkpoints import safetensorsfile

    local_root, url_root = runs

    import pipeline.replay.load

    whole_copies, ranged_reads, in_flight = [], [], set()
    local_folder, read_many = pipeline.replay.load.local_folder, safetensorsfile.SafetensorsFile.read_many

    def copying(path, weights=True):
        if weights:
            whole_copies.append(path)
        return local_folder(path, weights)

    monkeypatch.setattr(pipeline.replay.load, "local_folder", copying)

    def reading(f, names, plan=None):
        names = list(names)
        if not f.local:
            ranged_reads.extend(names)
            in_flight.add((plan or f.plan).concurrency)
        return read_many(f, names, plan)

    monkeypatch.setattr(safetensorsfile.SafetensorsFile, "read_many", reading)

    store = f"s3://{BUCKET}/sinks.zarr"
    # two steps first, then all: the second run inserts a step between stored ones (the staging copy) and appends
    # after them (the journalled resize), both on storage that has no rename
    assert run(compose(replay_args(url_root, store, "replay.steps=[0,200]"))) == 0
    assert run(compose(replay_args(url_root, store, "checkpoints.read_concurrency=3"))) == 0

    got, want = open_sinks(store, GROUP), reference
    assert list(got.step.values) == STEPS and list(got.status.values) == ["done"] * len(STEPS)
    for name in want.data_vars:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-6, atol=1e-7, err_msg=name)
    assert not any(k.endswith(".staging") for k in s3.ls(f"{BUCKET}/sinks.zarr"))
    # the digest is taken from the bytes read from the bucket, and equals the local disk's
    digests = [str(d) for d in got.weights_digest.values]
    assert all(len(d) == 64 for d in digests) and digests == [str(d) for d in want.weights_digest.values]
    assert in_flight == {16, 3}  # checkpoints.read_concurrency, default then set

    # no checkpoint is copied to the local disk: each one's tensors are read once, by byte ranges, whether its model
    # is built anew or the worker's kept model takes them
    assert whole_copies == []
    from safetensors import safe_open

    with safe_open(local_root / "checkpoint-0" / "model.safetensors", framework="pt") as f:
        tensors = sorted(f.keys())
    assert sorted(ranged_reads) == sorted(tensors * len(STEPS))


def test_layer_by_layer_from_s3_stores_the_local_digest(runs, reference, tmp_path, monkeypatch):
    from pipeline.replay import layered

    streams = []
    monkeypatch.setattr(layered.BlockStream, "__enter__", lambda self: streams.append(self) or self)
    store = tmp_path / "layered.zarr"
    assert run(compose(replay_args(runs[1], store, "replay.steps=[0,300]", "replay.max_device_memory=64KiB"))) == 0
    assert len(streams) == 2
    got = open_sinks(store, GROUP)
    assert list(got.status.values) == ["done", "done"]
    for step in (0, 300):
        digest = str(got.weights_digest.sel(step=step).values)
        assert len(digest) == 64 and digest == str(reference.weights_digest.sel(step=step).values)
    assert str(got.weights_digest.sel(step=0).values) != str(got.weights_digest.sel(step=300).values)


def test_layered_replay_from_s3_reads_the_tensors_it_needs_by_byte_ranges(s3, tmp_path, monkeypatch):
    from pipeline.checkpoints import safetensorsfile
    from pipeline.checkpoints.digest import weights_digest
    from pipeline.checkpoints.opened import open_checkpoint
    from pipeline.replay.layered import open_layered
    from pipeline.replay.measure import measure

    folder, saved = save_checkpoint(tmp_path / "step1", step=1)
    s3.put(str(folder), f"{BUCKET}/layered/step1", recursive=True)
    read_many, names = safetensorsfile.SafetensorsFile.read_many, []

    def reading(f, keys, plan=None):
        keys = list(keys)
        if not f.local:
            names.extend(keys)
        return read_many(f, keys, plan)

    monkeypatch.setattr(safetensorsfile.SafetensorsFile, "read_many", reading)
    import pipeline.replay.layered

    local_folder = pipeline.replay.layered.local_folder
    monkeypatch.setattr(
        pipeline.replay.layered,
        "local_folder",
        lambda path, weights=True: pytest.fail(f"{path} copied whole") if weights else local_folder(path, weights),
    )

    ids = np.random.default_rng(0).integers(0, 101, size=(2, 16))
    import torch

    ids = torch.as_tensor(ids)
    remote_ckpt, local_ckpt = open_checkpoint(Checkpoint(1, f"s3://{BUCKET}/layered/step1")), Checkpoint(1, str(folder))
    with open_layered(remote_ckpt, device="cpu", dtype="float32") as (m, rows):
        remote = measure(m, ids, batch_size=2, key_positions=4, run_rows=rows)
        assert sorted(names) == sorted(k for k in saved if k != "lm_head.weight")  # each once; the head never
        remote_digest = remote_ckpt.digest.result()  # the head read now, for the digest alone
    with open_layered(local_ckpt := open_checkpoint(local_ckpt), device="cpu", dtype="float32") as (m, rows):
        local = measure(m, ids, batch_size=2, key_positions=4, run_rows=rows)
        local_digest = local_ckpt.digest.result()
    for key in local:
        np.testing.assert_array_equal(np.asarray(remote[key]), np.asarray(local[key]), err_msg=key)
    assert remote_digest == local_digest == weights_digest([str(folder / "model.safetensors")])
    assert sorted(names) == sorted(k for k in saved if k != "lm_head.weight")


def test_truncated_safetensors_on_s3_is_a_clear_error(s3, tmp_path):
    from pipeline.errors import CheckpointError
    from pipeline.replay.load import load_model
    from tests.ckpt_factory import truncate

    folder, _ = save_checkpoint(tmp_path / "step2", step=2)
    truncate(folder / "model.safetensors")
    url = f"s3://{BUCKET}/broken/step2"
    s3.put(str(folder), url.removeprefix("s3://"), recursive=True)
    with pytest.raises(CheckpointError) as err:
        load_model(Checkpoint(2, url))
    assert err.value.path == f"{url}/model.safetensors"
    assert "is not a valid safetensors file" in err.value.problem
