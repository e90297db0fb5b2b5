"""`report.tensorboard=DIR`: the sink measures as TensorBoard scalars, read back with TensorBoard's own event
accumulator (what its server uses)."""

import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pipeline
from pipeline import analysis as an
from pipeline.cli import compose, run
from pipeline.report.tensorboard import write_scalars
from tests.cubes import constant_cube, write_store

GROUP = "probe_keep"


def read_back(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return acc


def points(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture
def store(tmp_path):
    # layer 0 rises past eps=0.3 at step 20; layer 1 never does; step 30 failed
    ds = constant_cube(
        [[0.1, 0.2, 0.5, 0.6], [0.1, 0.1, 0.2, 0.2]], steps=(0, 10, 20, 30), status=["done"] * 3 + ["failed"]
    )
    share = np.array([0.5, 0.6, 0.8, np.nan])
    excess = np.stack([share * 4, (1 - share) * 4], axis=1)
    ds = ds.assign(
        attn_out_norm_p0=(("step", "layer"), 1 + excess),
        attn_out_norm=(("step", "layer"), np.ones((4, 2))),
        mlp_out_norm_p0=(("step", "layer"), np.ones((4, 2))),
        mlp_out_norm=(("step", "layer"), np.ones((4, 2))),
        p0_similarity=(("step", "layer"), np.array([[0.2, 0.1], [0.5, 0.3], [0.95, 0.9], [np.nan, np.nan]])),
    )
    return write_store(tmp_path / "s.zarr", {GROUP: ds}), ds


def test_each_done_step_is_a_scalar_keyed_by_its_training_step(store, tmp_path):
    path, ds = store
    write_scalars(str(path), tmp_path / "tb", eps=0.3)
    acc = read_back(tmp_path / "tb" / GROUP)
    assert points(acc, "sink_mass/layer_00") == [
        (0, pytest.approx(0.1)),
        (10, pytest.approx(0.2)),
        (20, pytest.approx(0.5)),
    ]
    assert [v for _, v in points(acc, "sink_mass/layer_01")] == pytest.approx([0.1, 0.1, 0.2])
    entropy = ds["entropy"].isel(step=slice(0, 3)).mean("head").sel(layer=1).values
    assert [v for _, v in points(acc, "entropy/layer_01")] == pytest.approx(entropy.tolist())
    assert points(acc, "sinks/sink_rate") == [(0, 0.0), (10, 0.0), (20, 0.5)]  # one layer of two (every head) > 0.3
    assert points(acc, "sinks/onset_layer") == [(20, 0.0)]  # no layer above eps before step 20: no point
    assert [v for _, v in points(acc, "p0_circuit/share_layers_0_1")] == pytest.approx([1.0, 1.0, 1.0])
    # layer 0's attention writes 1 + 4 * share at position 0 over 1 elsewhere: above 3 from step 10 (at 0: exactly 3)
    assert points(acc, "p0_circuit/writer") == [(10, 0.0), (20, 0.0)]
    assert [v for _, v in points(acc, "p0_similarity/layer_00")] == pytest.approx([0.2, 0.5, 0.95])
    share = an.circuit_share(ds, k=1).isel(step=slice(0, 3)).values
    np.testing.assert_allclose(share, [0.5, 0.6, 0.8])


def test_writing_a_step_again_replaces_its_points(store, tmp_path):
    path, _ = store
    tb = tmp_path / "tb"
    write_scalars(str(path), tb)
    write_scalars(str(path), tb, steps=[10, 20])  # as the driver does after a replay round
    write_scalars(str(path), tb)
    acc = read_back(tb / GROUP)
    assert [s for s, _ in points(acc, "sink_mass/layer_00")] == [0, 10, 20]
    assert sorted(p.name for p in (tb / GROUP).iterdir()) == [
        f"events.out.tfevents.{s:012d}.sinktrace" for s in (0, 10, 20)
    ]


def test_a_step_no_longer_done_loses_its_file(store, tmp_path):
    path, ds = store
    tb = tmp_path / "tb"
    write_scalars(str(path), tb)
    write_store(
        path,
        {
            GROUP: ds.assign_coords(
                status=("step", np.array(["done", "failed", "done", "failed"], dtype=np.dtypes.StringDType()))
            )
        },
    )
    write_scalars(str(path), tb)
    assert [s for s, _ in points(read_back(tb / GROUP), "sinks/sink_rate")] == [0, 20]


def test_without_the_extra_the_setting_is_a_one_line_error(store, tmp_path, monkeypatch, capsys):
    path, _ = store
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    cfg = compose([f"store.path={path}", "stages=[report]", f"report.tensorboard={tmp_path / 'tb'}"])
    assert run(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "sinktrace: error: report.tensorboard needs the tensorboard package: pip install 'sinktrace[tensorboard]'"
    )
    assert not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_watch_appends_each_replayed_step(trained_run, tmp_path):
    tb, store = tmp_path / "tb", tmp_path / "s.zarr"
    args = [
        f"checkpoints.root={trained_run}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "probe.rows=4",
        "probe.seq_len=16",
        f"report.tensorboard={tb}",
    ]
    assert run(compose([*args, "stages=[replay]", "replay.watch=true", "replay.until_step=150"])) == 0
    (group,) = [p for p in tb.iterdir()]
    acc = read_back(group)
    steps = [s for s, _ in points(acc, "sinks/sink_rate")]
    assert steps == [0, 50, 100, 150]
    stored = an.layer_sink_mass(pipeline.open_sinks(str(store), group.name)).sel(layer=0).values
    assert [v for _, v in points(acc, "sink_mass/layer_00")] == pytest.approx(stored.tolist())
    # the report stage writes them all again: still one point per step
    assert run(compose([*args, "stages=[report]"])) == 0
    assert [s for s, _ in points(read_back(group), "sink_mass/layer_00")] == [0, 50, 100, 150]
