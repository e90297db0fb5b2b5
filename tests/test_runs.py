"""Runs compared: `pipeline.open_runs` lines several stores up along a `run` dimension, every analysis function
answers per run, and the compare stage writes its page."""

import numpy as np
import pytest
import xarray as xr

import pipeline
from pipeline import analysis as an
from pipeline.cli import compose, run
from tests.cubes import constant_cube, write_store

GROUP = "probe_keep"


def cube(values_by_layer, steps, root, *, loss=None, tokens_per_step=4096.0, **kwargs):
    ds = constant_cube(values_by_layer, steps=steps, **kwargs)
    ds.attrs["checkpoint_root"] = root
    steps = np.asarray(steps, dtype=float)
    ds = ds.assign_coords(tokens_seen=("step", steps * tokens_per_step))
    if loss is not None:
        ds = ds.assign_coords(loss=("step", np.asarray(loss, dtype=float)))
    return ds


@pytest.fixture
def two_runs(tmp_path):
    """Run A: 4 steps, layer 0 stays above 0.3 from step 10, layer 1 from 20. Run B: 3 steps at other step numbers
    and twice the tokens per step; layer 0 emerges at 40, layer 1 never."""
    a = cube([[0.1, 0.5, 0.6, 0.7], [0.1, 0.1, 0.4, 0.5]], (0, 10, 20, 30), "/runs/lr-small", loss=[5, 4, 3, 2])
    b = cube([[0.1, 0.2, 0.5], [0.1, 0.1, 0.1]], (0, 20, 40), "/runs/lr-large", loss=[5, 3, 1], tokens_per_step=8192.0)
    return (
        write_store(tmp_path / "a.zarr", {GROUP: a}),
        write_store(tmp_path / "b.zarr", {GROUP: b}),
        a,
        b,
    )


def test_runs_line_up_on_the_step_with_missing_steps_as_nan(two_runs):
    a_path, b_path, a, b = two_runs
    ds = pipeline.open_runs([a_path, b_path])
    assert list(ds.run.values) == ["/runs/lr-small", "/runs/lr-large"]  # named by their checkpoint roots
    assert list(ds.store.values) == [str(a_path), str(b_path)]
    assert list(ds.step.values) == [0, 10, 20, 30, 40]
    assert ds.sink_mass.dims[:2] == ("run", "step")
    small, large = ds.sink_mass.sel(layer=0, head=0)
    np.testing.assert_allclose(small.values, [0.1, 0.5, 0.6, 0.7, np.nan])
    np.testing.assert_allclose(large.values, [0.1, np.nan, 0.2, np.nan, 0.5])
    assert list(ds.status.sel(run="/runs/lr-large").values) == ["done", "missing", "done", "missing", "done"]
    np.testing.assert_allclose(
        ds.tokens_seen.sel(run="/runs/lr-large").values, [0, np.nan, 8192 * 20, np.nan, 8192 * 40]
    )
    assert ds.attrs["probe_seq_len"] == 64  # the attributes every run shares


def test_every_analysis_answers_per_run_as_on_the_run_alone(two_runs):
    a_path, b_path, a, b = two_runs
    ds = pipeline.open_runs({"small": a_path, "large": b_path})
    emergence = an.emergence_step(ds)
    assert emergence.dims == ("run", "layer")
    np.testing.assert_array_equal(emergence.sel(run="small").values, [10, 20])
    np.testing.assert_array_equal(emergence.sel(run="large").values, [40, np.nan])
    xr.testing.assert_identical(ds.sinks.emergence_step(), emergence)  # the accessor too
    for name, alone in (("small", a), ("large", b)):
        one = an.one_run(ds, name)
        for fn in (an.emergence_step, an.first_crossing_step, an.convergence_step):
            np.testing.assert_array_equal(fn(ds).sel(run=name).values, fn(alone).values)
        rate = an.sink_rate(ds).sel(run=name).dropna("step")
        np.testing.assert_array_equal(rate.step.values, alone.step.values)
        np.testing.assert_allclose(rate.values, an.sink_rate(alone).values)
        np.testing.assert_array_equal(one.step.values, alone.step.values)
    loss = an.training_loss(ds)
    np.testing.assert_allclose(loss.sel(run="large").values, [5, np.nan, 3, np.nan, 1])
    # a step another run has is NaN here, never a zero that would hide or fake a sink
    np.testing.assert_allclose(an.onset_layer(ds).sel(run="large").values, [np.nan, np.nan, np.nan, np.nan, 0])
    assert an.same_weights(ds) == {"small": [], "large": []}
    done = an.done(ds)
    assert list(done.step.values) == [0, 10, 20, 30, 40]
    assert np.isnan(done.sink_mass.sel(run="large", step=10)).all()


def test_the_circuit_convergence_step_per_run(tmp_path):
    steps = (0, 10, 20, 30, 40)
    shares = {"settles": [0.2, 0.6, 0.9, 0.9, 0.9], "drifts": [0.2, 0.4, 0.6, 0.8, 1.0]}
    stores = {}
    for name, share in shares.items():
        ds = cube([[0.1] * 5, [0.1] * 5], steps, f"/runs/{name}")
        # layer 0 writes share * 10 more at position 0 than elsewhere, layer 1 the rest
        excess = np.stack([np.array(share) * 10, (1 - np.array(share)) * 10], axis=1)
        ds = ds.assign(
            attn_out_norm_p0=(("step", "layer"), 1 + excess),
            attn_out_norm=(("step", "layer"), np.ones((5, 2))),
            mlp_out_norm_p0=(("step", "layer"), np.ones((5, 2))),
            mlp_out_norm=(("step", "layer"), np.ones((5, 2))),
        )
        stores[name] = write_store(tmp_path / f"{name}.zarr", {GROUP: ds})
    ds = pipeline.open_runs(stores)
    np.testing.assert_allclose(an.circuit_share(ds, k=1).sel(run="drifts").values, shares["drifts"])
    np.testing.assert_array_equal(an.circuit_convergence_step(ds, k=1).values, [20, np.nan])


def test_runs_line_up_on_tokens_seen(two_runs):
    a_path, b_path, a, b = two_runs
    ds = pipeline.open_runs({"small": a_path, "large": b_path}, align="tokens")
    assert "tokens_seen" in ds.dims and "step" not in ds.dims
    # small: 0, 10, 20, 30 steps of 4096 tokens; large: 0, 20, 40 steps of 8192
    np.testing.assert_array_equal(ds.tokens_seen.values, np.array([0, 10, 20, 30, 40, 80]) * 4096.0)
    np.testing.assert_allclose(ds.step.sel(run="large").values, [0, np.nan, np.nan, np.nan, 20, 40])
    rate = an.sink_rate(ds, dim="head").sel(layer=0)
    assert rate.dims == ("run", "tokens_seen")
    np.testing.assert_allclose(rate.sel(run="large").values, [0, np.nan, np.nan, np.nan, 0, 1])
    # the steps answers stay training steps
    np.testing.assert_array_equal(an.emergence_step(ds).sel(run="large").values, [40, np.nan])


def test_tokens_alignment_needs_tokens_seen_in_every_run(two_runs, tmp_path):
    a_path, _, a, _ = two_runs
    c = cube([[0.1, 0.5]], (0, 10), "/runs/c").assign_coords(tokens_seen=("step", [0.0, np.nan]))
    c_path = write_store(tmp_path / "c.zarr", {GROUP: c})
    with pytest.raises(ValueError, match=r"run '/runs/c' does not say how many tokens it had seen at step\(s\) 10"):
        pipeline.open_runs([a_path, c_path], align="tokens")
    with pytest.raises(ValueError, match="align must be 'step' or 'tokens'"):
        pipeline.open_runs([a_path], align="time")


def test_stores_with_no_shared_probe_are_refused_naming_their_groups(two_runs, tmp_path):
    a_path, _, a, _ = two_runs
    other = write_store(tmp_path / "other.zarr", {"probe_random": a.assign_attrs(probe_first_token="random")})
    with pytest.raises(ValueError, match="share no probe group") as e:
        pipeline.open_runs([a_path, other])
    assert f"{a_path}: probe_keep" in str(e.value) and f"{other}: probe_random" in str(e.value)
    with pytest.raises(ValueError, match="'probe_random' is not in every store"):
        pipeline.open_runs([a_path, other], group="probe_random")


def test_a_shared_group_is_chosen_or_named(two_runs, tmp_path):
    a_path, _, a, b = two_runs
    both = {GROUP: a, "probe_random": a.assign_attrs(probe_first_token="random", probe_name="probe_random")}
    x = write_store(tmp_path / "x.zarr", both)
    y = write_store(tmp_path / "y.zarr", {**both, GROUP: b})
    z = write_store(tmp_path / "z.zarr", {GROUP: b})
    assert pipeline.open_runs([x, z]).attrs["probe_name"] == GROUP  # the one group both hold
    with pytest.raises(ValueError, match="share probe groups probe_keep, probe_random: name one with group="):
        pipeline.open_runs({"x": x, "y": y})
    ds = pipeline.open_runs({"x": x, "y": y}, group="probe_random")
    assert ds.attrs["probe_first_token"] == "random" and list(ds.run.values) == ["x", "y"]


def test_one_group_name_holding_different_probes_is_refused(two_runs, tmp_path):
    a_path, _, a, _ = two_runs
    longer = write_store(tmp_path / "longer.zarr", {GROUP: a.assign_attrs(probe_seq_len=128, checkpoint_root="/r")})
    with pytest.raises(ValueError, match="probe_seq_len=64 vs 128"):
        pipeline.open_runs([a_path, longer])


def test_a_missing_store_and_a_repeated_name_are_clear_errors(two_runs, tmp_path):
    a_path, _, _, _ = two_runs
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.zarr'}: no sinktrace store there"):
        pipeline.open_runs([a_path, tmp_path / "nope.zarr"])
    with pytest.raises(ValueError, match="both named '/runs/lr-small'.*pass a mapping"):
        pipeline.open_runs([a_path, a_path])


def test_runs_of_different_depth_compare_on_the_layers_each_has(tmp_path):
    deep = cube([[0.1, 0.5]] * 3, (0, 10), "/runs/deep")
    shallow = cube([[0.1, 0.6]], (0, 10), "/runs/shallow")
    ds = pipeline.open_runs(
        [write_store(tmp_path / "d.zarr", {GROUP: deep}), write_store(tmp_path / "s.zarr", {GROUP: shallow})]
    )
    np.testing.assert_array_equal(an.emergence_step(ds).values, [[10, 10, 10], [10, np.nan, np.nan]])


def test_compare_stage_writes_the_page_and_prints_the_table(two_runs, tmp_path, capsys):
    a_path, b_path, _, _ = two_runs
    out = tmp_path / "cmp"
    cfg = compose(["stages=[compare]", f"compare.runs={{small: {a_path}, large: {b_path}}}", f"compare.out_dir={out}"])
    assert run(cfg) == 0
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.splitlines()]
    assert ["small", "4", "30", "10,", "20"] == lines[lines.index(next(r for r in lines if r[:1] == ["small"]))][:5]
    assert next(r for r in lines if r[:1] == ["large"])[:5] == ["large", "3", "40", "40,", "—"]
    page = (out / "index.html").read_text()
    for figure in ("emergence.png", "sink_rate.png", "loss.png"):
        assert (out / figure).stat().st_size > 1000 and figure in page
    assert "<td class=l>small</td><td>4</td><td>30</td><td>10</td><td>20</td>" in page


def test_compare_stage_on_tokens(two_runs, tmp_path):
    a_path, b_path, _, _ = two_runs
    out = tmp_path / "cmp"
    cfg = compose(
        ["stages=[compare]", f"compare.stores=[{a_path},{b_path}]", f"compare.out_dir={out}", "compare.align=tokens"]
    )
    assert run(cfg) == 0
    assert "aligned on tokens seen" in (out / "index.html").read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "stages=[compare] needs the stores to compare"),
        (["compare.stores=[{a}]", "compare.runs={{x: {a}}}"], "give one of them"),
        (["compare.stores=[{a},{missing}]"], "compare.stores: {missing}: no sinktrace store there"),
        (["compare.stores=[{a}]", "compare.align=time"], "compare.align=time: choose from step, tokens"),
        (["compare.stores=[{a},{other}]"], "compare: the stores share no probe group"),
    ],
)
def test_compare_stage_bad_input_is_one_line(two_runs, tmp_path, capsys, overrides, message):
    a_path, _, a, _ = two_runs
    other = write_store(tmp_path / "other.zarr", {"probe_random": a})
    names = {"a": a_path, "missing": tmp_path / "missing.zarr", "other": other}
    cfg = compose(["stages=[compare]", *(o.format(**names) for o in overrides)])
    assert run(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(**names) in err


def test_one_store_for_two_checkpoint_roots_is_refused(trained_run, run_copy, tmp_path, capsys):
    """A multirun over roots with one fixed store.path: the second root's steps would pass for done."""
    store = tmp_path / "one.zarr"

    def replay(root):
        args = [f"checkpoints.root={root}", "checkpoints.quiet_seconds=0", f"store.path={store}", "stages=[replay]"]
        return run(compose([*args, "probe.rows=4", "probe.seq_len=16", "replay.steps=[0]"]))

    assert replay(trained_run) == 0
    before = pipeline.open_sinks(str(store), "random-T16-r4-s0-bos").load()
    capsys.readouterr()
    assert replay(run_copy) == 2
    err = capsys.readouterr().err
    assert f"store.path={store} holds the run of checkpoints.root={trained_run}, not {run_copy}" in err
    assert "${hydra:job.num}" in err
    xr.testing.assert_identical(pipeline.open_sinks(str(store), "random-T16-r4-s0-bos").load(), before)
    (tmp_path / "link").symlink_to(trained_run)
    assert replay(tmp_path / "link") == 0  # the same run by another path
