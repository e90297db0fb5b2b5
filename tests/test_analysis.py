"""The analysis functions on hand-built cubes whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from pipeline import analysis as an
from pipeline.store.cube import open_sinks
from tests.cubes import constant_cube, make_cube, uniform_sink_mass, write_store

NAN = np.nan
STEPS = (0, 100, 300, 1000, 5000)  # non-uniform on purpose


def assert_same(actual: xr.DataArray, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual.values, dtype=float), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- done steps


def test_done_keeps_only_done_steps():
    ds = constant_cube([[0.1, 0.2, 0.3, 0.4]], steps=(0, 10, 20, 30), status=["done", "failed", "pending", "done"])
    assert list(an.done(ds).step.values) == [0, 30]
    assert list(an.done(ds.drop_vars("status")).step.values) == [0, 10, 20, 30]


def test_results_reindex_onto_every_stored_step():
    # The store's status and error are string coordinates; results must not carry them into
    # a reindex, which has no NaN for strings.
    ds = constant_cube([[0.1, 0.4, 0.5]], steps=(0, 10, 20), status=["done", "failed", "done"])
    assert_same(an.layer_sink_mass(ds).reindex(step=ds.step).sel(layer=0), [0.1, NAN, 0.5])
    assert_same(an.sink_rate(ds).reindex(step=ds.step), [0.0, NAN, 1.0])


def test_status_not_nan_decides_what_is_done():
    # A failed step's data is NaN in the store, but even a stray value there must not count.
    ds = constant_cube([[0.1, 0.4, 0.5, 0.6]], steps=(0, 100, 200, 300), status=["done", "done", "failed", "done"])
    ds["sink_mass"][2] = 0.0
    assert_same(an.emergence_step(ds), [100])
    assert list(an.sink_rate(ds).step.values) == [0, 100, 300]


# ---------------------------------------------------------------- sink rate


def rate_cube(seq_len=64):
    sink = np.array(
        [
            [[0.5, 0.2], [0.31, 0.3]],  # step 0
            [[0.9, 0.9], [0.9, 0.1]],
        ]
    )  # step 10
    return make_cube(sink, (0, 10), seq_len=seq_len)


def test_sink_rate_over_all_heads_and_per_layer():
    ds = rate_cube()
    rate = an.sink_rate(ds)
    assert rate.dims == ("step",)
    # 0.3 is not above eps=0.3: Gu et al.'s test is strict.
    assert_same(rate, [2 / 4, 3 / 4])
    assert_same(an.sink_rate(ds, dim="head"), [[0.5, 0.5], [1.0, 0.5]])
    assert_same(an.sink_rate(ds, eps=0.8), [0.0, 3 / 4])
    assert rate.attrs["convention"] == "stored" and rate.attrs["eps"] == 0.3


def test_sink_rate_gu_convention_uses_probe_length():
    # score = (1 + (T-1) m) / T: at T=64, m=0.3 -> 0.3109 > 0.3, m=0.2 -> 0.2125.
    rate = an.sink_rate(rate_cube(64), convention="gu")
    assert_same(rate, [3 / 4, 3 / 4])
    assert rate.attrs["convention"] == "gu"
    assert "T=64" in rate.attrs["definition"]
    # At T=4, m=0.2 -> 0.4 and m=0.1 -> 0.325: every head passes.
    assert_same(an.sink_rate(rate_cube(4), convention="gu"), [1.0, 1.0])


def test_sink_rate_ignores_failed_steps():
    ds = constant_cube([[0.5, 0.5, 0.1]], steps=(0, 10, 20), status=["done", "failed", "done"])
    assert_same(an.sink_rate(ds), [1.0, 0.0])


def test_unknown_convention_and_missing_length_are_clear_errors():
    ds = rate_cube()
    with pytest.raises(ValueError, match="convention"):
        an.sink_rate(ds, convention="barbero")
    del ds.attrs["probe_seq_len"]
    with pytest.raises(KeyError, match="probe_seq_len"):
        an.sink_rate(ds, convention="gu")


# ---------------------------------------------------------------- emergence


def emergence_cube():
    return constant_cube(
        [
            [0.1, 0.4, 0.5, 0.6, 0.7],  # layer 0: emerges at 100
            [0.1, 0.4, 0.2, 0.5, 0.6],  # layer 1: passes at 100, dips, stays from 1000
            [0.1, 0.1, 0.1, 0.1, 0.1],  # layer 2: never
            [0.5, 0.5, 0.5, 0.5, 0.2],  # layer 3: lost at the end
            [0.5, 0.5, 0.5, 0.5, 0.5],  # layer 4: from the first step
            [0.1, 0.2, 0.3, 0.3, 0.31],  # layer 5: equal to eps is not above it
        ],
        steps=STEPS,
    )


def test_emergence_step_per_layer():
    result = an.emergence_step(emergence_cube())
    assert result.dims == ("layer",)
    assert_same(result, [100, 1000, NAN, NAN, 0, 5000])
    assert result.attrs["units"] == "training step"


def test_first_crossing_differs_from_emergence_after_a_dip():
    assert_same(an.first_crossing_step(emergence_cube()), [100, 100, NAN, 0, 0, 5000])


def test_emergence_step_per_head_and_mean_over_heads():
    sink = np.full((3, 1, 2), 0.0)
    sink[:, 0, 0] = [0.2, 0.6, 0.7]  # head 0 emerges at 10
    sink[:, 0, 1] = [0.1, 0.1, 0.2]  # head 1 never; the layer mean (0.15, 0.35, 0.45) emerges at 10
    ds = make_cube(sink, (0, 10, 20))
    assert_same(an.emergence_step(ds, per="head"), [[10, NAN]])
    assert_same(an.emergence_step(ds), [10])
    assert_same(an.emergence_step(ds, eps=0.4), [20])


def test_emergence_skips_a_failed_dip():
    # The dip to 0.1 is at a failed step: it is not data, so layer 0 emerges at 100.
    ds = constant_cube([[0.1, 0.4, 0.1, 0.5, 0.6]], steps=STEPS, status=["done", "done", "failed", "done", "done"])
    ds["sink_mass"][2] = 0.1
    assert_same(an.emergence_step(ds), [100])


def test_emergence_with_no_done_step_is_nan():
    ds = constant_cube([[0.5, 0.5]], steps=(0, 10), status=["pending", "failed"])
    assert_same(an.emergence_step(ds), [NAN])
    assert_same(an.convergence_step(ds), NAN)


# ---------------------------------------------------------------- onset layer, early share


def test_onset_layer_per_step():
    ds = constant_cube(
        [
            [0.1, 0.1, 0.5, 0.1],
            [0.1, 0.5, 0.5, 0.1],
            [0.1, 0.1, 0.1, 0.1],
        ],
        steps=(0, 10, 20, 30),
        status=["done", "done", "done", "failed"],
    )
    result = an.onset_layer(ds)
    assert result.dims == ("step",)
    assert_same(result, [NAN, 1, 0])


def test_early_share():
    ds = constant_cube([[0.2, 0.0], [0.2, 0.0], [0.4, 0.0], [0.2, 0.0]], steps=(0, 10))
    assert_same(an.early_share(ds), [0.4, NAN])  # no sink mass at all: no share
    assert_same(an.early_share(ds, k=1), [0.2, NAN])
    assert_same(an.early_share(ds, k=4), [1.0, NAN])


# ---------------------------------------------------------------- convergence


CONVERGING = [[0.0, 0.3, 0.6, 0.62, 0.63, 0.63, 0.64], [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]
CONV_STEPS = (0, 10, 20, 30, 40, 60, 100)


def test_profile_change_is_the_largest_range_within_a_window():
    change = an.profile_change(constant_cube(CONVERGING, steps=CONV_STEPS), window=3)
    np.testing.assert_allclose(change.values, [0.6, 0.32, 0.03, 0.01, 0.01, NAN, NAN], atol=1e-12)
    assert list(change.step.values) == list(CONV_STEPS)


def test_convergence_step():
    ds = constant_cube(CONVERGING, steps=CONV_STEPS)
    assert_same(an.convergence_step(ds, tol=0.05, window=3), 20)
    # A tighter tolerance is met only from the window starting at step 30.
    assert_same(an.convergence_step(ds, tol=0.02, window=3), 30)
    assert_same(an.convergence_step(ds, tol=1.0, window=3), 0)
    # Any layer may break it: layer 1 moves in the last window.
    moving = [CONVERGING[0], [0.1] * 6 + [0.3]]
    assert_same(an.convergence_step(constant_cube(moving, steps=CONV_STEPS), tol=0.05), NAN)
    # Fewer done checkpoints than one window: no verdict.
    assert_same(an.convergence_step(ds.isel(step=slice(0, 2)), window=3), NAN)


def test_convergence_ignores_a_failed_step():
    values = [[0.0, 0.6, 0.6, 0.6, 0.0, 0.6, 0.6]]
    status = ["done"] * 4 + ["failed"] + ["done"] * 2
    ds = constant_cube(values, steps=CONV_STEPS, status=status)
    ds["sink_mass"][4] = 0.0
    assert_same(an.convergence_step(ds, tol=0.05, window=3), 10)


def test_window_below_two_is_refused():
    with pytest.raises(ValueError, match="window"):
        an.profile_change(constant_cube(CONVERGING, steps=CONV_STEPS), window=1)


# ---------------------------------------------------------------- positional index


def pair(fixed_layers, random_layers, steps=(0, 10), fixed_policy="keep", **kwargs):
    fixed = constant_cube(fixed_layers, steps=steps, first_token=fixed_policy, **kwargs)
    random = constant_cube(random_layers, steps=steps, first_token="random")
    return fixed, random


def test_positional_index_values():
    u = uniform_sink_mass(64)
    assert u == pytest.approx(0.0594, abs=1e-4)
    fixed, random = pair(
        [[0.8, 0.8], [0.3, 0.3], [0.08, 0.08], [0.5, 0.5], [0.5, 0.5]],
        [[0.8, 0.4], [0.1, 0.1], [0.08, 0.08], [0.7, 0.7], [0.0, 0.0]],
    )
    index = an.positional_index_pair(fixed, random)
    assert index.dims == ("step", "layer")
    expected_l1 = (0.1 - u) / (0.3 - u)
    assert_same(index.isel(step=0), [1.0, expected_l1, NAN, 1.0, 0.0])
    assert_same(index.isel(step=1, layer=0), (0.4 - u) / (0.8 - u))
    # Without the uniform baseline it is the plain ratio random / fixed.
    plain = an.positional_index_pair(fixed, random, baseline=False)
    assert_same(plain.isel(step=0), [1.0, 1 / 3, 1.0, 1.0, 0.0])


def test_positional_index_from_a_tree_finds_the_pair(tmp_path):
    fixed, random = pair([[0.8, 0.8]], [[0.4, 0.4]], fixed_policy="bos")
    other = constant_cube([[0.8, 0.8]], steps=(0, 10), first_token="keep", seq_len=128)
    tree = xr.DataTree.from_dict({"/natural": other, "/bos64": fixed, "/rand64": random})
    assert an.first_token_pair(tree) == ("bos64", "rand64")
    index = an.positional_index(tree)
    assert index.attrs["fixed_group"] == "bos64" and index.attrs["random_group"] == "rand64"
    u = uniform_sink_mass(64)
    assert_same(index.sel(layer=0), [(0.4 - u) / (0.8 - u)] * 2)
    # Round trip through a Zarr store gives the same answer.
    store = write_store(tmp_path / "s.zarr", {"bos64": fixed, "rand64": random})
    assert_same(an.positional_index(open_sinks(store)), index.values)


def test_positional_index_refuses_probes_that_differ_in_more_than_the_first_token():
    fixed, random = pair([[0.8, 0.8]], [[0.4, 0.4]], seq_len=128)
    with pytest.raises(ValueError, match="probe_seq_len"):
        an.positional_index_pair(fixed, random)
    with pytest.raises(ValueError, match="first_token=keep"):
        an.positional_index({"a": fixed, "b": random})
    assert an.first_token_pair({"a": fixed, "b": random}) is None


def test_positional_index_uses_steps_done_in_both_groups():
    fixed = constant_cube([[0.8, 0.8, 0.8]], steps=(0, 10, 20), status=["done", "failed", "done"])
    random = constant_cube(
        [[0.8, 0.8, 0.8]], steps=(0, 10, 20), first_token="random", status=["done", "done", "pending"]
    )
    assert list(an.positional_index_pair(fixed, random).step.values) == [0]


def test_probe_groups_accepts_what_open_sinks_returns(tmp_path):
    one = constant_cube([[0.5, 0.5]], steps=(0, 10), name="solo")
    single = open_sinks(write_store(tmp_path / "one.zarr", {"solo": one}))
    assert isinstance(single, xr.DataTree)  # a one-probe store opens as a tree too
    assert list(an.probe_groups(single)) == ["solo"]
    two = open_sinks(write_store(tmp_path / "two.zarr", {"b": one, "a": one}))
    assert list(an.probe_groups(two)) == ["a", "b"]
    assert list(an.probe_groups({"z": one, "y": one})) == ["y", "z"]
    with pytest.raises(TypeError, match="DataTree"):
        an.probe_groups([one])


# ---------------------------------------------------------------- massive activations


def test_massive_activation_ratio_both_kinds():
    ds = constant_cube(
        [[0.1, 0.1], [0.1, 0.1]],
        steps=(0, 10),
        status=["done", "failed"],
        resid_norm_p0=[[30.0, 8.0], [0.0, 0.0]],
        resid_norm=[[10.0, 0.0], [1.0, 1.0]],
        resid_max_p0=[[500.0, 2.0], [0.0, 0.0]],
        resid_median=[[0.5, 1.0], [1.0, 1.0]],
    )
    ratio = an.massive_activation_ratio(ds)
    assert ratio.dims == ("step", "layer")
    assert_same(ratio, [[3.0, NAN]])  # zero denominator: no ratio
    sun = an.massive_activation_ratio(ds, kind="max_median")
    assert_same(sun, [[1000.0, 2.0]])
    assert "Sun" in sun.attrs["definition"] and sun.attrs["kind"] == "max_median"


# ---------------------------------------------------------------- accessor and laziness


def test_accessor_matches_the_functions():
    ds = emergence_cube()
    xr.testing.assert_identical(ds.sinks.emergence_step(), an.emergence_step(ds))
    xr.testing.assert_identical(
        ds.sinks.sink_rate(dim="head", convention="gu"), an.sink_rate(ds, dim="head", convention="gu")
    )
    xr.testing.assert_identical(ds.sinks.onset_layer(), an.onset_layer(ds))
    xr.testing.assert_identical(ds.sinks.early_share(k=1), an.early_share(ds, k=1))
    xr.testing.assert_identical(ds.sinks.convergence_step(0.1, 2), an.convergence_step(ds, 0.1, 2))
    xr.testing.assert_identical(ds.sinks.massive_activation_ratio(), an.massive_activation_ratio(ds))
    assert list(ds.sinks.done.step.values) == list(STEPS)


def test_dask_backed_cube_stays_lazy_and_agrees():
    ds = emergence_cube()
    lazy = ds.chunk(step=1)  # the store's chunking: one step per chunk
    for fn in (
        an.sink_rate,
        an.emergence_step,
        an.onset_layer,
        an.early_share,
        an.convergence_step,
        an.massive_activation_ratio,
    ):
        result = fn(lazy)
        assert hasattr(result.data, "dask"), fn.__name__
        xr.testing.assert_allclose(result.compute(), fn(ds))


# ---------------------------------------------------------------------------
# The P0 circuit and over-mixing, on cubes whose answers are set by construction

STEPS5 = (0, 100, 200, 300, 400)


def circuit_cube(first_token="random"):
    """4 layers, 5 steps. The MLP of layer 2 writes position 0 at step 100, then layer 0's MLP takes over from step
    200 on; p0_similarity in layer 1 crosses 0.9 at step 300 and stays; the collapse doubles and the sensitivity
    halves without the sink; the share of the writing in layers 0-1 is 0, 0, 0.6, 0.98, 1.0."""
    steps, layers = len(STEPS5), 4
    cube = make_cube(np.full((steps, layers, 2), 0.3), STEPS5, first_token=first_token)
    rest = np.ones((steps, layers))
    attn_p0, mlp_p0 = np.ones((steps, layers)), np.ones((steps, layers))
    mlp_p0[1, 2] = 10.0  # step 100: layer 2's MLP (excess 9: share 0)
    mlp_p0[2, 0], mlp_p0[2, 2] = 4.0, 3.0  # step 200: layer 0's MLP (ratio 4 > 3); excess 3 + 2: share 0.6
    mlp_p0[3, 0], attn_p0[3, 3] = 50.0, 2.0  # step 300: excess 49 vs 1: share 0.98
    mlp_p0[4, 0] = 60.0  # step 400: share 1
    sim = np.full((steps, layers), 0.2)
    sim[:, 1] = [0.1, 0.95, 0.5, 0.92, 0.99]  # crosses at 100, dips, stays from 300
    collapse = np.stack([np.full((steps, layers), 0.2), np.full((steps, layers), 0.4)], -1)
    sensitivity = np.stack([np.full((steps, layers), 0.5), np.full((steps, layers), 0.25)], -1)
    sl, sls = ("step", "layer"), ("step", "layer", "sink")
    return cube.assign(
        attn_out_norm_p0=(sl, attn_p0),
        attn_out_norm=(sl, rest),
        mlp_out_norm_p0=(sl, mlp_p0),
        mlp_out_norm=(sl, rest),
        p0_similarity=(sl, sim),
        rest_similarity=(sl, np.full((steps, layers), 0.1)),
        collapse=(sls, collapse),
        sensitivity=(sls, sensitivity),
    ).assign_coords(
        sink=np.array(["kept", "removed"], dtype=np.dtypes.StringDType()), loss=("step", [6.0, 5.0, 4.0, 3.5, 3.4])
    )


def test_circuit_writer_and_the_step_it_settles():
    cube = circuit_cube()
    np.testing.assert_array_equal(an.circuit_writer(cube).values, [np.nan, 2.5, 0.5, 0.5, 0.5])
    assert float(an.writer_settle_step(cube)) == 200
    assert float(cube.sinks.writer_settle_step()) == 200
    # a stricter ratio: step 200's ratio of 4 no longer counts, step 100's 10 still does
    np.testing.assert_array_equal(an.circuit_writer(cube, ratio=5).values, [np.nan, 2.5, np.nan, 0.5, 0.5])
    assert float(an.writer_settle_step(cube, ratio=5)) == 300
    r = an.writer_ratio(cube)
    assert r.dims == ("component", "step", "layer") and float(r.sel(step=300, layer=0, component="mlp")) == 50


def test_recognition_step_and_its_probe_check():
    cube = circuit_cube()
    assert float(an.recognition_step(cube)) == 300
    assert float(cube.sinks.recognition_step(threshold=0.97)) == 400
    assert np.isnan(float(an.recognition_step(cube, layers=1)))  # layer 0 never recognises
    with pytest.raises(ValueError, match="first_token=random"):
        an.recognition_step(circuit_cube("keep"))


def test_mixing_effect_is_removed_over_kept():
    effect = an.mixing_effect(circuit_cube())
    np.testing.assert_allclose(effect["collapse"].values, 2.0)
    np.testing.assert_allclose(effect["sensitivity"].values, 0.5)
    assert effect["collapse"].dims == ("step", "layer")


def test_circuit_share_convergence_and_loss():
    cube = circuit_cube()
    np.testing.assert_allclose(an.circuit_share(cube).values, [np.nan, 0.0, 0.6, 0.98, 1.0])
    # windows of 3 starting at 100: 0..0.98 / 0.6..1.0 / (no full window after): calm from 300 on only with
    # windows of 2: changes 0.6, 0.38, 0.02
    assert float(an.circuit_convergence_step(cube, window=2)) == 300
    assert np.isnan(float(an.circuit_convergence_step(cube, window=3)))
    assert float(cube.sinks.circuit_convergence_step(window=2, tol=0.5)) == 200
    np.testing.assert_array_equal(an.training_loss(cube).values, [6.0, 5.0, 4.0, 3.5, 3.4])
    with pytest.raises(KeyError, match="loss"):
        an.training_loss(make_cube(np.full((2, 2, 2), 0.3), (0, 1)))
    with pytest.raises(KeyError, match="outputs"):
        an.circuit_share(make_cube(np.full((2, 2, 2), 0.3), (0, 1)))
