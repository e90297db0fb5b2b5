"""The Zarr store: exact round trips, resumable writes, kills at any moment, appends and inserts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.store.cube import SinkStore, StoreMismatchError, open_sinks
from pipeline.store.schema import STEP_COORDS

REPO = Path(__file__).resolve().parents[1]
ATTRS = {"probe": "random", "seed": 0, "config": "probe:\n  name: random\n", "version": "0.0.test"}


# one variable per shape: each array costs a file per step, and the store's rebuilds copy them all
FEW = ("sink_mass", "sink_mass_by_q", "key_mass", "key_norm_p0", "resid_norm")


def step_ds(
    step: int,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    keys: int = 4,
    seq_len: int = 16,
    architecture: str = "llama",
    full: bool = False,
) -> xr.Dataset:
    """One step's statistics shaped as replay returns them, with values unique to the step."""
    rng = np.random.default_rng(step)
    edges = [1, *(2**i for i in range(1, int(np.log2(seq_len)))), seq_len]
    nb = len(edges) - 1
    lh, lk, ln = ("layer", "head"), ("layer", "kv_head"), ("layer",)
    ds = xr.Dataset(
        {
            "sink_mass": (lh, rng.random((layers, heads))),
            "entropy": (lh, rng.random((layers, heads))),
            "sink_mass_by_q": ((*lh, "qbin"), rng.random((layers, heads, nb))),
            "key_mass": ((*lh, "key"), rng.random((layers, heads, keys))),
            **{
                k: (lk, rng.random((layers, kv_heads)))
                for k in ("key_norm_p0", "value_norm_p0", "key_norm", "value_norm")
            },
            **{k: (ln, rng.random(layers)) for k in ("resid_norm_p0", "resid_norm", "resid_max_p0", "resid_median")},
        },
        coords={
            "layer": np.arange(layers),
            "head": np.arange(heads),
            "kv_head": np.arange(kv_heads),
            "key": np.arange(keys),
            "qbin": np.arange(nb),
            "qbin_start": ("qbin", edges[:-1]),
            "qbin_stop": ("qbin", edges[1:]),
        },
        attrs={"architecture": architecture, "config_fingerprint": "f" * 16},
    )
    return ds if full else ds[list(FEW)]


def run(path, steps, *, group="random", overwrite=False, tokens=None) -> list[int]:
    """What the driver does: allocate, skip done steps, write the rest, consolidate."""
    store = SinkStore(path, group)
    store.prepare(steps, tokens_seen=tokens or {}, attrs=ATTRS)
    wanted = set(steps)
    todo = [s for s, st in store.status().items() if s in wanted and (overwrite or st != "done")]
    for s in todo:
        store.write_step(s, step_ds(s))
    store.finalize()
    return todo


def load(path, group="random") -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return open_sinks(path, group).load()


def check_step(ds: xr.Dataset, step: int, full: bool = False) -> None:
    """The stored step equals what was written, bit for bit."""
    got = ds.sel(step=step).drop_vars(["step", *STEP_COORDS], errors="ignore")
    xr.testing.assert_identical(got.drop_attrs(), step_ds(step, full=full).drop_attrs())


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of ours catches it, so nothing cleans up."""


# ------------------------------------------------------------------------------------------------


def test_any_order_roundtrip(tmp_path):
    path = tmp_path / "s.zarr"
    store = SinkStore(path, "random")
    store.prepare([300, 100, 200, 0], tokens_seen={100: 12_800, 300: None}, attrs=ATTRS)
    for s in (200, 0, 300):
        store.write_step(s, step_ds(s, full=True))
    ds = load(path)
    assert set(ds.data_vars) == set(step_ds(0, full=True).data_vars)
    assert ds["step"].values.tolist() == [0, 100, 200, 300]
    assert ds["status"].values.tolist() == ["done", "pending", "done", "done"]
    assert ds["error"].values.tolist() == ["", "", "", ""]
    np.testing.assert_array_equal(ds["tokens_seen"].values, [np.nan, 12_800, np.nan, np.nan])
    for s in (0, 200, 300):
        check_step(ds, s, full=True)
    assert np.isnan(ds["sink_mass"].sel(step=100)).all()
    assert ds.attrs["architecture"] == "llama" and ds.attrs["probe"] == "random"
    assert store.status() == {0: "done", 100: "pending", 200: "done", 300: "done"}
    tree = open_sinks(path)  # no group named: a DataTree, even with one probe
    assert isinstance(tree, xr.DataTree) and list(tree.children) == ["random"]
    xr.testing.assert_identical(tree["random"].to_dataset().load(), ds)
    # status and error are coordinates, so a string never meets NaN in whole-Dataset operations
    assert ds.where(ds.status == "done", drop=True)["step"].values.tolist() == [0, 200, 300]


def test_rerun_skips_done_steps_and_is_idempotent(tmp_path):
    path = tmp_path / "s.zarr"
    assert run(path, [10, 20]) == [10, 20]
    first = load(path)
    assert run(path, [10, 20]) == []
    xr.testing.assert_identical(load(path), first)
    assert run(path, [10, 20], overwrite=True) == [10, 20]
    xr.testing.assert_identical(load(path), first)
    store = SinkStore(path, "random")
    store.write_step(10, step_ds(10))
    xr.testing.assert_identical(load(path), first)


def test_write_interrupted_between_data_and_status(tmp_path, monkeypatch):
    ref, path = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    run(ref, [1, 2, 3])
    run(path, [1, 2])
    before = load(path)

    original = SinkStore._write_strings

    def dies_after_data(self, i, **values):
        if values.get("error") == "":
            raise Killed
        original(self, i, **values)

    monkeypatch.setattr(SinkStore, "_write_strings", dies_after_data)
    store = SinkStore(path, "random")
    store.prepare([1, 2, 3], attrs=ATTRS)
    with pytest.raises(Killed):
        store.write_step(3, step_ds(3))
    # an overwrite of a done step killed the same way must not leave it claiming done
    with pytest.raises(Killed):
        store.write_step(2, step_ds(2))
    monkeypatch.setattr(SinkStore, "_write_strings", original)

    ds = load(path)
    assert ds["status"].values.tolist() == ["done", "pending", "pending"]
    check_step(ds, 3)  # the data went in, yet the step is not done
    xr.testing.assert_identical(ds.sel(step=[1]), before.sel(step=[1]))
    assert run(path, [1, 2, 3]) == [2, 3]
    xr.testing.assert_identical(load(path), load(ref))


KILLED_WRITER = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import zarr
from pipeline.store.cube import SinkStore
from test_store import ATTRS, step_ds

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

store = SinkStore({path!r}, "random")
{body}
raise SystemExit("not killed")
"""


def run_killed(path, body: str) -> None:
    code = KILLED_WRITER.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path), body=textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_sigkill_mid_write_step(tmp_path):
    ref, path = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    run(ref, [5, 6, 7])
    run(path, [5, 6])
    run_killed(
        path,
        """
        original = SinkStore._write_strings
        def kill_after_data(self, i, **values):
            if values.get("error") == "":
                die()
            original(self, i, **values)
        SinkStore._write_strings = kill_after_data
        store.prepare([5, 6, 7], attrs=ATTRS)
        store.write_step(7, step_ds(7))
    """,
    )
    ds = load(path)
    assert ds["status"].values.tolist() == ["done", "done", "pending"]
    check_step(ds, 5)
    check_step(ds, 6)
    assert run(path, [5, 6, 7]) == [7]
    xr.testing.assert_identical(load(path), load(ref))


def test_sigkill_while_inserting_a_middle_step(tmp_path):
    ref, path = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    run(ref, [100, 300])
    run(ref, [200])
    run(path, [100, 300])
    # the worst moment: the real group wiped, the complete staging copy not yet copied back
    run_killed(
        path,
        """
        original = SinkStore._write_group
        def kill_while_overwriting(self, ds, name):
            if name == self.group:
                zarr.open_group(self.path, mode="w", path=name)
                die()
            original(self, ds, name)
        SinkStore._write_group = kill_while_overwriting
        store.prepare([200], attrs=ATTRS)
    """,
    )
    assert not list(zarr.open_group(path, mode="r", path="random").array_keys())
    ds = load(path)  # readers take the complete staging copy
    assert ds["step"].values.tolist() == [100, 200, 300]
    assert ds["status"].values.tolist() == ["done", "pending", "done"]
    check_step(ds, 100)
    check_step(ds, 300)
    assert SinkStore(path, "random").status() == {100: "done", 200: "pending", 300: "done"}
    assert sorted(zarr.open_group(path, mode="r").group_keys()) == ["random"]
    run(path, [200])
    xr.testing.assert_identical(load(path), load(ref))


def test_append_interrupted_mid_resize_rolls_back(tmp_path, monkeypatch):
    ref, path = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    run(ref, [1, 2])
    run(ref, [3, 4])
    run(path, [1, 2])
    before = load(path)
    original, calls = zarr.Array.resize, []

    def dies_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Array, "resize", dies_on_third)
    with pytest.raises(Killed):
        SinkStore(path, "random").prepare([3, 4], attrs=ATTRS)
    monkeypatch.setattr(zarr.Array, "resize", original)
    shapes = {
        a.shape[0]
        for _, a in zarr.open_group(path, mode="r", path="random").arrays()
        if a.metadata.dimension_names[0] == "step"
    }
    assert shapes == {2, 4}  # left half resized: the journal must undo it
    assert SinkStore(path, "random").status() == {1: "done", 2: "done"}
    xr.testing.assert_identical(load(path), before)
    run(path, [3, 4])
    xr.testing.assert_identical(load(path), load(ref))


def test_append_keeps_chunks_and_insert_keeps_data(tmp_path):
    path = tmp_path / "s.zarr"
    run(path, [10, 20], tokens={10: 1000, 20: 2000})
    chunk = path / "random" / "sink_mass" / "c" / "1" / "0" / "0"
    stamp = (chunk.stat().st_ino, chunk.stat().st_mtime_ns)
    # a live training run: later checkpoints appended, written chunks left alone
    run(path, [30, 40], tokens={40: 4000})
    assert (chunk.stat().st_ino, chunk.stat().st_mtime_ns) == stamp
    # a late checkpoint in the middle: the group is rebuilt, nothing lost
    store = SinkStore(path, "random")
    store.prepare([15], tokens_seen={15: 1500, 30: 3000})
    store.mark_failed(40, "bad weights")
    ds = load(path)
    assert ds["step"].values.tolist() == [10, 15, 20, 30, 40]
    assert ds["status"].values.tolist() == ["done", "pending", "done", "done", "failed"]
    assert ds["error"].values.tolist() == ["", "", "", "", "bad weights"]
    np.testing.assert_array_equal(ds["tokens_seen"].values, [1000, 1500, 2000, 3000, 4000])
    for s in (10, 20, 30, 40):
        check_step(ds, s)
    assert np.isnan(ds["sink_mass"].sel(step=15)).all()
    assert ds.attrs["probe"] == "random" and ds.attrs["architecture"] == "llama"
    store.write_step(15, step_ds(15))
    check_step(load(path), 15)


def test_second_probe_leaves_first_untouched(tmp_path):
    path = tmp_path / "s.zarr"
    run(path, [1, 2])
    first, snapshot = load(path), files(path / "random")
    run(path, [2, 3], group="tokens")
    run(path, [1], group="tokens")  # an insert rebuilds the second group, not the first
    SinkStore(path, "tokens").mark_failed(3, "x")
    assert files(path / "random") == snapshot
    xr.testing.assert_identical(load(path, "random"), first)
    tree = open_sinks(path)
    assert isinstance(tree, xr.DataTree) and set(tree.children) == {"random", "tokens"}
    assert tree["tokens"]["status"].values.tolist() == ["done", "done", "failed"]
    assert isinstance(open_sinks(path, "tokens"), xr.Dataset)


def test_mark_failed_keeps_data(tmp_path):
    path = tmp_path / "s.zarr"
    run(path, [1, 2, 3])
    store = SinkStore(path, "random")
    store.prepare([4])
    store.mark_failed(4, "model.safetensors: truncated header")
    store.mark_failed(2, "rerun failed: out of memory")
    ds = load(path)
    assert ds["status"].values.tolist() == ["done", "failed", "done", "failed"]
    assert ds["error"].values.tolist() == ["", "rerun failed: out of memory", "", "model.safetensors: truncated header"]
    for s in (1, 2, 3):
        check_step(ds, s)
    assert np.isnan(ds["sink_mass"].sel(step=4)).all()
    store.write_step(4, step_ds(4))
    ds = load(path)
    assert ds["status"].sel(step=4) == "done" and ds["error"].sel(step=4) == ""
    check_step(ds, 4)


def test_mismatched_step_writes_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    run(path, [1])
    store = SinkStore(path, "random")
    store.prepare([2])
    before = files(path)
    bad = {
        "layers": step_ds(2, layers=3),
        "architecture": step_ds(2, architecture="gpt_oss"),
        "probe length": step_ds(2, seq_len=32),
        "step dim": step_ds(2).expand_dims(step=[2]),
    }
    for case, ds in bad.items():
        with pytest.raises(StoreMismatchError):
            store.write_step(2, ds)
        assert files(path) == before, case
    with pytest.raises(KeyError, match="not allocated"):
        store.write_step(99, step_ds(99))
    # dims in another order are the same statistics
    store.write_step(2, step_ds(2).transpose("head", "kv_head", "key", "qbin", "layer"))
    check_step(load(path), 2)


def test_opens_with_and_without_consolidation(tmp_path):
    path = tmp_path / "s.zarr"
    store = SinkStore(path, "random")
    store.prepare([1, 2], attrs=ATTRS)
    store.write_step(1, step_ds(1))
    root_json = path / "zarr.json"
    assert "consolidated_metadata" not in json.loads(root_json.read_text())
    plain = load(path)
    with pytest.warns(RuntimeWarning, match="consolidated"):  # xarray's own fallback notice
        tree = xr.open_datatree(path, engine="zarr")
    xr.testing.assert_identical(tree["random"].to_dataset().load(), plain)

    store.finalize()
    assert "consolidated_metadata" in json.loads(root_json.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(path, engine="zarr")
        xr.testing.assert_identical(tree["random"].to_dataset().load(), plain)
        xr.testing.assert_identical(load(path), plain)

    # shapes change after consolidation: readers must see the new steps, never the old shapes
    store.prepare([3], attrs=ATTRS)
    assert "consolidated_metadata" not in json.loads(root_json.read_text())
    with pytest.warns(RuntimeWarning, match="consolidated"):
        tree = xr.open_datatree(path, engine="zarr")
    assert tree["random"]["step"].values.tolist() == [1, 2, 3]
    assert load(path)["step"].values.tolist() == [1, 2, 3]
    store.finalize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_datatree(path, engine="zarr")["random"].sizes["step"] == 3


def test_every_step_variable_is_one_step_per_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    run(path, [1, 2, 3])
    run(path, [4])
    run(path, [0])
    group = zarr.open_group(path, mode="r", path="random")
    step_arrays = {name: a for name, a in group.arrays() if a.metadata.dimension_names[0] == "step"}
    assert set(step_arrays) == {*step_ds(0).data_vars, "step", *STEP_COORDS}
    for name, a in step_arrays.items():
        assert a.shape[0] == 5 and a.chunks == (1, *a.shape[1:]), name
        assert a.metadata.to_dict()["codecs"][0]["name"] != "sharding_indexed", name
    ds = open_sinks(path, "random")
    for name in step_arrays:
        assert ds[name].encoding["chunks"] == (1, *ds[name].shape[1:]), name


def test_first_write_interrupted_while_creating_variables(tmp_path, monkeypatch):
    ref, path = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    store = SinkStore(ref, "random")
    store.prepare([1, 2], attrs=ATTRS)
    store.mark_failed(1, "truncated")
    store.write_step(2, step_ds(2))
    store = SinkStore(path, "random")
    store.prepare([1, 2], attrs=ATTRS)
    store.mark_failed(1, "truncated")
    original, calls = zarr.Group.create_array, []

    def dies_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_third)
    with pytest.raises(Killed):
        store.write_step(2, step_ds(2))
    monkeypatch.setattr(zarr.Group, "create_array", original)
    assert len(list(zarr.open_group(path, mode="r", path="random").array_keys())) > 4
    store = SinkStore(path, "random")
    assert store.status() == {1: "failed", 2: "pending"}
    assert sorted(zarr.open_group(path, mode="r", path="random").array_keys()) == sorted(["step", *STEP_COORDS])
    store.write_step(2, step_ds(2))
    xr.testing.assert_identical(load(path), load(ref))


def test_loss_is_a_step_coordinate(tmp_path):
    path = tmp_path / "s.zarr"
    store = SinkStore(path, "random")
    store.prepare([100, 200], loss={100: 4.5, 200: None}, attrs=ATTRS)
    store.write_step(100, step_ds(100))
    store.prepare([300, 50], loss={300: 3.25, 200: 3.75})  # an append, an insert, and a loss learnt later
    ds = load(path)
    assert "loss" in ds.coords and "loss" not in ds.data_vars
    np.testing.assert_array_equal(ds["loss"].values, [np.nan, 4.5, 3.75, 3.25])
    check_step(ds, 100)


def old_store(path, steps=(1, 2)):
    """A group as written before the loss coordinate and the sublayer statistics existed."""
    run(path, list(steps))
    group = zarr.open_group(path, mode="r+", path="random")
    del group["loss"]
    for _, array in group.arrays():
        if "coordinates" in array.attrs:
            array.update_attributes({"coordinates": array.attrs["coordinates"].replace("loss", "").strip()})
    SinkStore(path, "random").finalize()


def test_store_written_before_new_statistics_opens_and_grows(tmp_path):
    path = tmp_path / "s.zarr"
    old_store(path)
    ds = load(path)
    assert "loss" not in ds.variables and set(ds.data_vars) == set(FEW)
    check_step(ds, 1)

    store = SinkStore(path, "random")
    store.prepare([3], loss={3: 2.5}, attrs=ATTRS)
    more = step_ds(3).assign(p0_similarity=("layer", [0.5, 1.0]))
    store.write_step(3, more)
    store.finalize()
    ds = load(path)
    assert "loss" in ds.coords and "loss" not in ds.data_vars
    np.testing.assert_array_equal(ds["loss"].values, [np.nan, np.nan, 2.5])
    np.testing.assert_array_equal(ds["p0_similarity"].values, [[np.nan, np.nan], [np.nan, np.nan], [0.5, 1.0]])
    check_step(ds.drop_vars("p0_similarity"), 1)
    assert zarr.open_group(path, mode="r", path="random")["p0_similarity"].chunks == (1, 2)

    # a step that does not measure a statistic the group holds stores NaN for it, not the old value
    store.write_step(3, step_ds(3))
    assert np.isnan(load(path)["p0_similarity"].sel(step=3)).all()


def test_adding_statistics_interrupted_keeps_the_rest(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    run(path, [1, 2])
    store = SinkStore(path, "random")
    store.prepare([3], attrs=ATTRS)
    original = zarr.Group.create_array

    def dies(self, *args, **kwargs):
        raise Killed

    monkeypatch.setattr(zarr.Group, "create_array", dies)
    with pytest.raises(Killed):
        store.write_step(3, step_ds(3, full=True))
    monkeypatch.setattr(zarr.Group, "create_array", original)
    store = SinkStore(path, "random")
    assert store.status() == {1: "done", 2: "done", 3: "pending"}
    ds = load(path)
    assert set(ds.data_vars) == set(FEW)
    check_step(ds, 2)


def test_steps_record_how_they_were_replayed_and_older_groups_gain_the_fields(tmp_path):
    path = str(tmp_path / "s.zarr")
    store = SinkStore(path, "g")
    store.prepare([1, 2, 3])
    step = xr.Dataset({"sink_mass": (("layer", "head"), np.ones((2, 3)))})
    store.write_step(1, step)
    replayed = ("replay_route", "replay_device", "replay_dtype")
    group = zarr.open_group(path, mode="r+", path="g")
    for name in replayed:  # as an older sinktrace wrote the group
        del group[name]
    names = group["sink_mass"].attrs["coordinates"].split()
    group["sink_mass"].attrs["coordinates"] = " ".join(n for n in names if n not in replayed)
    assert set(replayed).isdisjoint(open_sinks(path, "g").variables)  # still readable

    again = SinkStore(path, "g")
    again.write_step(2, step.assign_coords(replay_route="layered", replay_device="cuda:0", replay_dtype="bfloat16"))
    again.write_step(3, step.assign_coords(replay_route="whole", replay_device="cpu", replay_dtype="float32"))
    ds = open_sinks(path, "g")
    assert set(replayed) <= set(ds.coords) and set(replayed).isdisjoint(ds.data_vars)
    assert ds.replay_route.values.tolist() == ["", "layered", "whole"]
    assert ds.replay_device.values.tolist() == ["", "cuda:0", "cpu"]
    assert ds.replay_dtype.values.tolist() == ["", "bfloat16", "float32"]
    assert ds.sink_mass.sel(step=1).values.tolist() == [[1.0] * 3] * 2
