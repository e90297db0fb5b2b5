"""The weights digest (`pipeline.checkpoints.digest`): what it depends on, that both replay routes record the same
one, and that the end-of-run summary, the report and the analysis flag steps holding identical weights."""

import hashlib
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from safetensors.torch import save_file

import pipeline
from pipeline.analysis import same_weights, same_weights_lines
from pipeline.checkpoints.digest import weights_digest
from pipeline.checkpoints.opened import open_checkpoint
from pipeline.cli import compose, run
from pipeline.errors import CheckpointError
from pipeline.records import Checkpoint, Probe
from pipeline.replay import ReplaySettings, replay
from pipeline.replay.load import load_model
from pipeline.store.cube import SinkStore
from tests.ckpt_factory import backdate, save_checkpoint, shards
from tests.test_cli import group_name


def files(folder):
    return sorted(str(p) for p in folder.glob("*.safetensors"))


def test_digest_depends_on_the_tensors_only(tmp_path):
    one, saved = save_checkpoint(tmp_path / "one", seed=0)
    sharded, _ = save_checkpoint(tmp_path / "sharded", seed=0, sharded=True)
    other, _ = save_checkpoint(tmp_path / "other", seed=1)
    assert len(shards(sharded)) > 1
    digest = weights_digest(files(one))
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert weights_digest(files(sharded)) == digest  # split into shards differently: the same tensors
    assert weights_digest(files(other)) != digest

    # the definition in the module docstring, computed from the tensors themselves
    assert {v.dtype for v in saved.values()} == {torch.float32}
    lines = "".join(
        f"{k} F32 {list(v.shape)} {hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()}\n"
        for k, v in sorted(saved.items())
    )
    assert digest == hashlib.sha256(lines.encode()).hexdigest()

    # metadata and tensor order in the file do not count; one changed value does
    moved = tmp_path / "moved.safetensors"
    save_file(dict(reversed(list(saved.items()))), moved, metadata={"format": "pt", "note": "x"})
    assert weights_digest([str(moved)]) == digest
    saved["model.norm.weight"][3] += 1e-3
    save_file(saved, moved)
    assert weights_digest([str(moved)]) != digest


def test_digest_of_a_damaged_file_names_it(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "c")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        weights_digest([str(path)])


def test_both_routes_record_the_same_digest(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "c", seed=3, sharded=True)
    ckpt = Checkpoint(step=7, path=str(folder), weight_files=tuple(files(folder)), complete=True)
    probe = Probe(name="p", kind="random", tokens=np.arange(2 * 16).reshape(2, 16) % 101, seed=0, first_token="keep")
    whole = replay(ckpt, probe, ReplaySettings(device="cpu", max_device_memory=None))
    layered = replay(ckpt, probe, ReplaySettings(device="cpu", max_device_memory="1KB"))
    assert str(whole.weights_digest.values) == str(layered.weights_digest.values) == weights_digest(files(folder))
    load_model(opened := open_checkpoint(ckpt), attn_implementation="eager")
    assert opened.digest.result() == weights_digest(files(folder))


def test_same_weights_are_flagged_in_summary_report_and_analysis(tmp_path, capsys):
    root = tmp_path / "run"
    for step, seed in ((100, 0), (200, 1), (300, 2)):
        save_checkpoint(root / f"checkpoint-{step}", step=step, seed=seed)
    # a suite serving the final weights under an earlier step name, saved again (another file, same tensors)
    shutil.rmtree(root / "checkpoint-200")
    save_checkpoint(root / "checkpoint-200", step=200, seed=2, sharded=True)
    backdate(root, 3600)
    store = str(tmp_path / "s.zarr")
    cfg = compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "probe.rows=4",
            "probe.seq_len=16",
            f"report.out_dir={tmp_path / 'report'}",
        ]
    )
    assert run(cfg) == 0
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "identical weights" in line]
    assert len(flagged) == 1 and "steps 200, 300 hold identical weights" in flagged[0], out
    assert "100" not in flagged[0].split("hold")[0]

    ds = pipeline.open_sinks(store, group_name(store))
    digests = {int(s): str(d) for s, d in zip(ds.step.values, ds.weights_digest.values)}
    assert digests[200] == digests[300] != digests[100] and len(digests[100]) == 64
    assert same_weights(ds) == [[200, 300]] == ds.sinks.same_weights()
    xr.testing.assert_identical(ds.sink_mass.sel(step=200, drop=True), ds.sink_mass.sel(step=300, drop=True))
    page = (tmp_path / "report" / "index.html").read_text()
    assert "steps 200, 300 hold identical weights" in page and "steps 100" not in page


def test_no_flag_when_every_step_differs(tmp_path, capsys):
    root = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(root / f"checkpoint-{step}", step=step, seed=step)
    store = str(tmp_path / "s.zarr")
    cfg = compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=4",
            "probe.seq_len=16",
        ]
    )
    assert run(cfg) == 0
    assert "identical weights" not in capsys.readouterr().out
    ds = pipeline.open_sinks(store, group_name(store))
    assert same_weights(ds) == [] and all(len(str(d)) == 64 for d in ds.weights_digest.values)
    assert "identical weights" not in "".join(same_weights_lines(ds))


def test_store_written_before_digests_gets_the_coordinate(tmp_path):
    path = str(tmp_path / "s.zarr")
    store = SinkStore(path, "g")
    store.prepare([1, 2])
    step = xr.Dataset({"sink_mass": (("layer", "head"), np.ones((2, 3)))})
    store.write_step(1, step)
    group = zarr.open_group(path, mode="r+", path="g")
    del group["weights_digest"]  # as an older sinktrace wrote it
    names = group["sink_mass"].attrs["coordinates"].split()
    group["sink_mass"].attrs["coordinates"] = " ".join(n for n in names if n != "weights_digest")

    again = SinkStore(path, "g")
    again.write_step(2, step.assign_coords(weights_digest="ab" * 32))
    ds = pipeline.open_sinks(path, "g")
    assert "weights_digest" in ds.coords and "weights_digest" not in ds.data_vars
    assert ds.weights_digest.values.tolist() == ["", "ab" * 32]
    assert ds.sink_mass.sel(step=1).values.tolist() == [[1.0] * 3] * 2


def test_checkpoints_of_other_formats_get_a_digest_too(tmp_path):
    """Read into a state dict (here torchtitan DCP folders), the digest is over that state dict's tensors."""
    from dataclasses import replace

    from pipeline.checkpoints.discover import discover
    from tests import trainer_ckpts as tc

    a, b = tc.llama(seed=1), tc.llama(seed=2)
    for step, model in ((100, a), (200, b), (300, b)):
        tc.torchtitan_step(tmp_path / "run", step, model)
    a.config.to_json_file(tmp_path / "config.json")
    found = discover(str(tmp_path / "run"), quiet_seconds=0)
    opened = [open_checkpoint(replace(c, model_config=str(tmp_path / "config.json"))) for c in found]
    for c in opened:
        load_model(c, dtype="float32")
    digests = [c.digest.result() for c in opened]
    assert [c.step for c in found] == [100, 200, 300]
    assert len(digests[0]) == 64 and digests[1] == digests[2] != digests[0]
