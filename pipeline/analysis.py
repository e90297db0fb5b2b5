"""Emergence analysis over the sink cube: plain functions and the ``ds.sinks`` accessor.

Every function takes one probe group's Dataset (dims step, layer, head, ...) as the
store holds it and keeps only the steps whose ``status`` is "done": failed and
pending steps are dropped from the step axis, not treated as zeros. The results are
DataArrays whose ``attrs`` say what was computed (``definition``, ``eps``,
``convention``), so a saved result still tells how it was made. They stay lazy
when the cube is Dask-backed; only the tiny ``status`` array is read eagerly.

Several runs compared (``pipeline.open_runs``: a ``run`` dimension, steps a run lacks
NaN with status ``missing``): every function runs on each run's own cube and stacks
the answers along ``run`` (docs/data.md, "Runs compared").

Conventions (docs/data.md, "Decisions"):

* ``convention="stored"`` (the default) uses ``sink_mass`` as stored: attention on
  key 0 averaged over queries t = 1..T-1.
* ``convention="gu"`` uses Gu et al.'s (ICLR 2025) first-token score, the mean over
  all T queries including query 0 (whose weight on key 0 is always 1):
  ``score = (1 + (T - 1) * sink_mass) / T``, T = the probe length
  (``probe_seq_len`` in the group attrs). Their sink rate thresholds it at
  eps = 0.3 on 64-token probes; Barbero et al. use eps = 0.8.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Literal

import numpy as np
import xarray as xr

from .store.schema import DONE, MEASURED, STRING_STEP_COORDS

Convention = Literal["stored", "gu"]

__all__ = [
    "SinkAccessor",
    "circuit_convergence_step",
    "circuit_share",
    "circuit_writer",
    "convergence_step",
    "done",
    "early_share",
    "emergence_step",
    "first_crossing_step",
    "first_token_pair",
    "layer_sink_mass",
    "massive_activation_ratio",
    "mixing_effect",
    "recognition_step",
    "onset_layer",
    "one_run",
    "positional_index",
    "positional_index_pair",
    "probe_groups",
    "probe_length",
    "profile_change",
    "run_names",
    "training_loss",
    "writer_ratio",
    "writer_settle_step",
    "same_weights",
    "sink_rate",
    "sink_score",
    "uniform_sink_mass",
]


# ---------------------------------------------------------------------------
# Runs compared: a Dataset with a ``run`` dimension (pipeline.open_runs)

RUN = "run"
# The status of a step one run of a comparison does not have (another run does).
MISSING = "missing"


def _strings(values) -> np.ndarray:
    """A string array as Python strs, whatever the writer's string dtype (object, StringDType, bytes)."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(values).tolist()], dtype=object)


def run_names(ds: xr.Dataset) -> list[str]:
    """The runs of a comparison (:func:`pipeline.open_runs`), in order; ``[]`` for one run's cube."""
    return [str(r) for r in ds[RUN].values.tolist()] if RUN in ds.dims else []


def one_run(ds: xr.Dataset, run: str) -> xr.Dataset:
    """One run of a comparison as that run's own cube: indexed by ``step``, without the steps it does not have
    (status ``missing``) and without the ``run`` coordinates."""
    one = ds.sel({RUN: run})
    index = one["status"].dims[0]
    one = one.isel({index: np.flatnonzero(_strings(one["status"].values) != MISSING)})
    if index != "step":  # aligned on tokens_seen: back to the run's own steps
        one = one.swap_dims({index: "step"})
    one = one.assign_coords(step=one["step"].values.astype(np.int64))
    return one.drop_vars([name for name, c in ds.coords.items() if c.dims == (RUN,)])


def _stack_runs(results: dict[str, object], ds: xr.Dataset, cubes: dict[str, xr.Dataset]):
    """Per-run results back into one object with a ``run`` dim, on the comparison's own axis (step or
    tokens_seen)."""
    first = next(iter(results.values()), None)
    if not isinstance(first, (xr.DataArray, xr.Dataset)):
        return results  # plain Python results (same_weights): one per run
    index = ds["status"].dims[-1]
    if index != "step":
        moved = {}
        for name, r in results.items():
            if "step" in r.dims:
                tokens = cubes[name]["tokens_seen"].sel(step=r["step"]).values
                r = r.assign_coords({index: ("step", tokens)}).swap_dims(step=index)
            moved[name] = r
        results = moved
    runs = list(results)
    out = xr.concat(
        [r.drop_vars(RUN, errors="ignore") for r in results.values()],
        dim=RUN,
        join="outer",
        coords="different",
        compat="equals",
        combine_attrs="override",
    )
    return out.assign_coords({RUN: runs, **{name: c for name, c in ds.coords.items() if c.dims == (RUN,)}})


def _per_run(fn):
    """Make an analysis function take a comparison too: it runs on each run's own cube (:func:`one_run`) and the
    results are stacked along ``run`` (NaN where a run lacks a step)."""

    @functools.wraps(fn)
    def wrapper(ds, *args, **kwargs):
        if not isinstance(ds, xr.Dataset) or RUN not in ds.dims:
            return fn(ds, *args, **kwargs)
        cubes = {name: one_run(ds, name) for name in run_names(ds)}
        return _stack_runs({name: fn(cube, *args, **kwargs) for name, cube in cubes.items()}, ds, cubes)

    return wrapper


def _per_run_pair(fn):
    """:func:`_per_run` for functions of two groups: both comparisons of the same runs, paired run by run."""

    @functools.wraps(fn)
    def wrapper(a, b, *args, **kwargs):
        if RUN not in a.dims and RUN not in b.dims:
            return fn(a, b, *args, **kwargs)
        if run_names(a) != run_names(b):
            raise ValueError(f"the two comparisons hold different runs: {run_names(a)} vs {run_names(b)}")
        cubes = {name: one_run(a, name) for name in run_names(a)}
        results = {name: fn(cube, one_run(b, name), *args, **kwargs) for name, cube in cubes.items()}
        return _stack_runs(results, a, cubes)

    return wrapper


# ---------------------------------------------------------------------------
# Reading and selecting


def probe_groups(sinks) -> dict[str, xr.Dataset]:
    """The probe groups of an opened store as ``{name: Dataset}``, sorted by name.

    Takes what ``pipeline.open_sinks`` returns: the store as a DataTree (one node per
    probe), or one probe's Dataset when a group was named. Also a mapping of
    name -> Dataset, or a DataTree node holding one group's data. A lone Dataset is
    named by its ``probe_name`` attr.
    """
    if isinstance(sinks, xr.DataTree):
        if not sinks.children and sinks.has_data:
            sinks = sinks.to_dataset()
        else:
            return {name: node.to_dataset() for name, node in sorted(sinks.children.items())}
    if isinstance(sinks, xr.Dataset):
        return {str(sinks.attrs.get("probe_name", "probe")): sinks}
    if isinstance(sinks, Mapping):
        return dict(sorted(sinks.items()))
    raise TypeError(f"expected a Dataset, a DataTree or a mapping of name -> Dataset, not {type(sinks).__name__}")


def done(ds: xr.Dataset) -> xr.Dataset:
    """The cube restricted to steps whose ``status`` is "done" (all steps without a status).

    On a comparison (a ``run`` dim): the steps done in at least one run, the data variables NaN in the runs where
    the step is not done."""
    if "status" not in ds.variables:
        return ds
    index = ds["status"].dims[-1]
    is_done = _strings(ds["status"].values).reshape(ds["status"].shape) == DONE
    if RUN in ds["status"].dims:
        mask = xr.DataArray(is_done, dims=ds["status"].dims, coords={d: ds[d] for d in ds["status"].dims})
        ds = ds.where(mask)
        is_done = is_done.any(axis=ds["status"].dims.index(RUN))
    return ds.isel({index: np.flatnonzero(is_done)})


def _done_data(ds: xr.Dataset) -> xr.Dataset:
    """Done steps without the string coordinates (status, error, weights_digest, ...): a string coordinate breaks
    later reindexing (no NaN to fill with)."""
    return done(ds).drop_vars(list(STRING_STEP_COORDS), errors="ignore")


def probe_length(ds: xr.Dataset) -> int:
    """The probe length T from the group attrs (``probe_seq_len``)."""
    try:
        return int(ds.attrs["probe_seq_len"])
    except KeyError:
        raise KeyError(
            "the cube's attrs lack 'probe_seq_len' (the probe length T), needed for "
            "convention='gu' and the uniform-attention baseline"
        ) from None


def uniform_sink_mass(seq_len: int) -> float:
    """Sink mass that uniform causal attention gives: mean over t=1..T-1 of 1/(t+1).

    This is the level an untrained model sits at (about 0.059 for T = 64), so it is
    the floor against which a sink is measured, not zero.
    """
    t = np.arange(1, int(seq_len))
    return float(np.mean(1.0 / (t + 1.0)))


@_per_run
def sink_score(ds: xr.Dataset, convention: Convention = "stored") -> xr.DataArray:
    """The per-head first-token score (step, layer, head) on done steps.

    ``"stored"``: ``sink_mass`` as stored. ``"gu"``: ``(1 + (T-1) * sink_mass) / T``.
    """
    m = _done_data(ds)["sink_mass"]
    if convention == "gu":
        T = probe_length(ds)
        m = (1.0 + (T - 1) * m) / T
        definition = f"Gu et al. first-token score (1 + (T-1)*sink_mass)/T, T={T}"
    elif convention == "stored":
        definition = "sink_mass as stored: attention on key 0, mean over queries 1..T-1"
    else:
        raise ValueError(f"convention must be 'stored' or 'gu', not {convention!r}")
    return m.assign_attrs(
        convention=convention, definition=definition, long_name="sink score", units="attention weight"
    )


@_per_run
def layer_sink_mass(ds: xr.Dataset, convention: Convention = "stored") -> xr.DataArray:
    """Sink score averaged over heads: (step, layer) on done steps."""
    score = sink_score(ds, convention)
    return score.mean("head").assign_attrs(score.attrs, definition=score.attrs["definition"] + "; mean over heads")


def _first_label(mask: xr.DataArray, dim: str) -> xr.DataArray:
    """Coordinate label of the first True along dim, NaN where there is none."""
    if mask.sizes[dim] == 0:
        return mask.astype(float).sum(dim) * np.nan
    return mask.idxmax(dim).where(mask.any(dim))


def _true_from_here_on(mask: xr.DataArray, dim: str) -> xr.DataArray:
    """True at i where mask holds at i and at every later position along dim."""
    backwards = slice(None, None, -1)
    return mask.isel({dim: backwards}).astype(int).cumprod(dim).isel({dim: backwards}).astype(bool)


# ---------------------------------------------------------------------------
# The questions


@_per_run
def sink_rate(
    ds: xr.Dataset,
    eps: float = 0.3,
    dim: str | tuple[str, ...] = ("layer", "head"),
    *,
    convention: Convention = "stored",
) -> xr.DataArray:
    """Share of heads whose sink score exceeds ``eps`` (Gu et al.'s Sink^eps_1, as a fraction).

    Definition: ``mean over dim of 1[score > eps]``, strictly greater, score from
    :func:`sink_score` (``convention``). The default ``dim=("layer", "head")`` gives
    one value per step over all heads of the model; ``dim="head"`` gives one per
    step and layer. Values are in [0, 1] (Gu et al. print percentages).
    """
    score = sink_score(ds, convention)
    rate = (score > eps).where(score.notnull()).mean(dim)
    dims = (dim,) if isinstance(dim, str) else tuple(dim)
    return rate.rename("sink_rate").assign_attrs(
        long_name="sink rate",
        units="share of heads",
        eps=eps,
        convention=convention,
        definition=f"share of heads (over {', '.join(dims)}) with score > eps; score: " + score.attrs["definition"],
    )


@_per_run
def emergence_step(
    ds: xr.Dataset,
    eps: float = 0.3,
    *,
    per: Literal["layer", "head"] = "layer",
    convention: Convention = "stored",
) -> xr.DataArray:
    """First step from which the sink score stays above ``eps`` for the rest of the run.

    Definition: with s_1 < ... < s_n the done steps and x the score (per layer: mean
    over heads; per head: the head's own), the emergence step is the smallest s_i
    such that x(s_j) > eps for every j >= i. A layer that rises, dips to or below
    eps and recovers emerges at the first step after its last dip. NaN where the
    score is not above eps at the last done step (never emerged, or lost it).
    "The rest of the run" means the steps stored so far: a later checkpoint can
    move the answer.

    Returns (layer,) for ``per="layer"``, (layer, head) for ``per="head"``; values
    are training steps (float, to hold NaN).
    """
    if per == "layer":
        x = layer_sink_mass(ds, convention)
    elif per == "head":
        x = sink_score(ds, convention)
    else:
        raise ValueError(f"per must be 'layer' or 'head', not {per!r}")
    stays = _true_from_here_on(x > eps, "step")
    return (
        _first_label(stays, "step")
        .rename("emergence_step")
        .assign_attrs(
            long_name="emergence step",
            units="training step",
            eps=eps,
            convention=convention,
            definition=f"first step from which the {per} sink score stays > eps at every later "
            "done step; NaN if it is not above eps at the last done step",
        )
    )


@_per_run
def first_crossing_step(
    ds: xr.Dataset,
    eps: float = 0.3,
    *,
    per: Literal["layer", "head"] = "layer",
    convention: Convention = "stored",
) -> xr.DataArray:
    """First done step at which the sink score exceeds ``eps`` at all (it may fall back later).

    Per layer (mean over heads) or per head, like :func:`emergence_step`; NaN where
    it never does. Always <= the emergence step.
    """
    x = layer_sink_mass(ds, convention) if per == "layer" else sink_score(ds, convention)
    return (
        _first_label(x > eps, "step")
        .rename("first_crossing_step")
        .assign_attrs(
            long_name="first step above eps",
            units="training step",
            eps=eps,
            convention=convention,
            definition="first done step with score > eps; NaN if none",
        )
    )


@_per_run
def onset_layer(ds: xr.Dataset, eps: float = 0.3, *, convention: Convention = "stored") -> xr.DataArray:
    """Per step, the first (lowest) layer whose sink score, mean over heads, exceeds ``eps``.

    Returns (step,) with layer numbers, NaN at steps where no layer exceeds eps.
    """
    above = layer_sink_mass(ds, convention) > eps
    return (
        _first_label(above, "layer")
        .rename("onset_layer")
        .assign_attrs(
            long_name="onset layer",
            units="layer",
            eps=eps,
            convention=convention,
            definition="lowest layer whose head-mean score > eps; NaN if none",
        )
    )


@_per_run
def early_share(ds: xr.Dataset, k: int = 2) -> xr.DataArray:
    """Per step, the share of the total sink mass found in the first ``k`` layers.

    Definition: ``sum(sink_mass[layer < k]) / sum(sink_mass)`` over layers and heads,
    on stored sink mass; NaN where the total is 0. Uniform attention puts the same
    mass in every layer, so an untrained model sits near k / n_layers, and a model
    with k layers or fewer has a share of 1 throughout.
    """
    m = _done_data(ds)["sink_mass"]
    total = m.sum(("layer", "head"))
    early = m.isel(layer=slice(0, k)).sum(("layer", "head"))
    return (
        (early / total)
        .where(total > 0)
        .rename("early_share")
        .assign_attrs(
            long_name=f"share of sink mass in layers 0..{k - 1}",
            units="fraction",
            k=k,
            definition=f"sum of sink_mass over layers < {k} and heads / sum over all layers and heads",
        )
    )


@_per_run
def profile_change(ds: xr.Dataset, window: int = 3) -> xr.DataArray:
    """Largest change of the per-layer sink profile within each run of ``window`` checkpoints.

    Definition: p(s, l) = sink_mass at done step s, mean over heads. For the window
    of ``window`` consecutive done checkpoints starting at s_i, the change is
    ``max over layers of (max - min of p over the window)``. Labelled by the
    window's first step; NaN for the last window-1 steps, where no full window fits.
    Windows count checkpoints, not training steps.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 checkpoints, not {window}")
    p = layer_sink_mass(ds)
    if p.sizes["step"] < window:  # rolling cannot build a window longer than the data
        return (p.max("layer") * np.nan).rename("profile_change")
    roll = p.rolling(step=window)
    spread = (roll.max() - roll.min()).max("layer", skipna=False)
    return (
        spread.shift(step=-(window - 1))
        .rename("profile_change")
        .assign_attrs(
            long_name="change of the layer sink profile",
            units="attention weight",
            window=window,
            definition=f"max over layers of (max - min) of head-mean sink_mass over {window} "
            "consecutive done checkpoints starting at this step",
        )
    )


@_per_run
def convergence_step(ds: xr.Dataset, tol: float = 0.05, window: int = 3) -> xr.DataArray:
    """The step after which the per-layer sink profile stops changing.

    Definition: with c(s_i) = :func:`profile_change` (the largest change of any
    layer's head-mean sink mass within the ``window`` consecutive done checkpoints
    starting at s_i), the convergence step is the smallest s_i such that
    c(s_j) < tol for every full window s_j with j >= i. So from that checkpoint on
    no layer moves by tol or more within any ``window`` checkpoints (slow drift
    below tol per window is allowed). NaN if the last full window still changes by
    tol or more, or if fewer than ``window`` done checkpoints exist.

    Returns a 0-d DataArray (a training step, or NaN).
    """
    change = profile_change(ds, window)
    full = change.notnull()
    # Windows that do not fit at the end carry no evidence either way.
    calm = (change < tol) | ~full
    converged = _true_from_here_on(calm, "step") & full
    return (
        _first_label(converged, "step")
        .rename("convergence_step")
        .assign_attrs(
            long_name="convergence step",
            units="training step",
            tol=tol,
            window=window,
            definition=f"first step from which every window of {window} consecutive done "
            f"checkpoints changes each layer's head-mean sink_mass by less than {tol}",
        )
    )


@_per_run
def massive_activation_ratio(ds: xr.Dataset, kind: Literal["norm", "max_median"] = "norm") -> xr.DataArray:
    """Massive-activation ratio per step and layer, from the residual-stream statistics.

    ``kind="norm"``: ``resid_norm_p0 / resid_norm``, the L2 norm of the block output
    at position 0 over its mean at positions 1..T-1 (how much larger token 0's
    hidden state is, as in Gu et al.'s norm plots).
    ``kind="max_median"``: ``resid_max_p0 / resid_median``, Sun et al.'s (2024)
    top-activation-over-median ratio (their criterion: > 100 and ~1000x the median;
    small models are tracked by this ratio alone).
    NaN where the denominator is 0.
    """
    d = _done_data(ds)
    if kind == "norm":
        num, den = d["resid_norm_p0"], d["resid_norm"]
        definition = "resid_norm_p0 / resid_norm (L2 norm at position 0 over mean norm at 1..T-1)"
    elif kind == "max_median":
        num, den = d["resid_max_p0"], d["resid_median"]
        definition = (
            "resid_max_p0 / resid_median (Sun et al. 2024: max |component| at position 0 over median |component|)"
        )
    else:
        raise ValueError(f"kind must be 'norm' or 'max_median', not {kind!r}")
    return (
        (num / den)
        .where(den > 0)
        .rename("massive_activation_ratio")
        .assign_attrs(
            long_name="massive-activation ratio",
            units="ratio",
            kind=kind,
            definition=definition,
        )
    )


# ---------------------------------------------------------------------------
# The P0 circuit and over-mixing


def _needs(ds: xr.Dataset, names, switch: str) -> None:
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise KeyError(f"the cube has no {', '.join(missing)}: replay with {switch!r} in replay.measure")


@_per_run
def writer_ratio(ds: xr.Dataset) -> xr.DataArray:
    """How much each sublayer's output at position 0 stands out: (step, layer, component) on done steps.

    Definition: ``<c>_out_norm_p0 / <c>_out_norm`` for component c = attn, mlp: the norm of what the sublayer
    adds to the residual stream at position 0 over its mean norm at positions 1..T-1. Infinite where only
    position 0 is written, NaN where nothing is.
    """
    _needs(ds, MEASURED["outputs"], "outputs")
    d = _done_data(ds)

    def one(c):
        p0, rest = d[f"{c}_out_norm_p0"], d[f"{c}_out_norm"]
        return xr.where(rest > 0, p0 / rest.where(rest > 0), xr.where(p0 > 0, np.inf, np.nan))

    ratio = xr.concat([one(c) for c in ("attn", "mlp")], dim="component")
    return (
        ratio.assign_coords(component=["attn", "mlp"])
        .rename("writer_ratio")
        .assign_attrs(
            long_name="sublayer output at position 0 over the rest",
            units="ratio",
            definition="<component>_out_norm_p0 / <component>_out_norm",
        )
    )


@_per_run
def circuit_writer(ds: xr.Dataset, ratio: float = 3.0) -> xr.DataArray:
    """Per step, the first sublayer whose output at position 0 stands out: the P0 circuit's writer.

    Definition: walking the sublayers in the order they run (layer 0's attention, layer 0's MLP, layer 1's
    attention, ...), the first whose :func:`writer_ratio` exceeds ``ratio``. Encoded as a number on the layer
    axis: ``layer`` for the attention, ``layer + 0.5`` for the MLP. NaN at steps where none does. (In parallel
    blocks the two read the same input; the attention still comes first here.)
    """
    r = writer_ratio(ds)
    order = r.stack(sublayer=("layer", "component"))  # layer-major: attn 0, mlp 0, attn 1, ...
    position = (order["layer"] + 0.5 * (order["component"] == "mlp")).values
    above = (order > ratio).drop_vars(["sublayer", "layer", "component"]).assign_coords(sublayer=position)
    return (
        _first_label(above, "sublayer")
        .rename("circuit_writer")
        .assign_attrs(
            long_name="P0 circuit writer",
            units="layer (+0.5: MLP)",
            ratio=ratio,
            definition=f"first sublayer in forward order whose output norm at position 0 exceeds {ratio} x its mean "
            "at positions 1..T-1; layer for attention, layer + 0.5 for the MLP; NaN if none",
        )
    )


@_per_run
def writer_settle_step(ds: xr.Dataset, ratio: float = 3.0) -> xr.DataArray:
    """The step from which the circuit's writer (:func:`circuit_writer`) is the same sublayer at every later done
    step. NaN if there is no writer at the last done step. 0-d."""
    w = circuit_writer(ds, ratio)
    same = (w == w.isel(step=-1)) & w.notnull() if w.sizes["step"] else w.notnull()
    return (
        _first_label(_true_from_here_on(same, "step"), "step")
        .rename("writer_settle_step")
        .assign_attrs(
            long_name="step the writer settles",
            units="training step",
            ratio=ratio,
            definition="first done step from which circuit_writer equals its value at the last done step",
        )
    )


@_per_run
def recognition_step(ds: xr.Dataset, threshold: float = 0.9, layers: int = 2) -> xr.DataArray:
    """The step from which position zero is recognised without its content. 0-d.

    Definition: with x(s) = max over layers 0..``layers``-1 of ``p0_similarity`` (the mean pairwise cosine of the
    position-0 residual across probe rows whose first tokens differ), the first done step s_i such that
    x(s_j) > ``threshold`` for every j >= i; NaN if x is not above it at the last done step. Needs a probe with
    ``first_token=random``: with one first token in every row the similarity is 1 by construction.
    """
    _needs(ds, ("p0_similarity",), "similarity")
    policy = ds.attrs.get("probe_first_token")
    if policy != "random":
        raise ValueError(
            f"recognition needs a probe with first_token=random (this one: {policy!r}); with the "
            "same first token in every row p0_similarity is 1 by construction"
        )
    x = _done_data(ds)["p0_similarity"].isel(layer=slice(0, layers)).max("layer")
    stays = _true_from_here_on(x > threshold, "step")
    return (
        _first_label(stays, "step")
        .rename("recognition_step")
        .assign_attrs(
            long_name="position-zero recognition step",
            units="training step",
            threshold=threshold,
            layers=layers,
            definition=f"first done step from which max over layers < {layers} of p0_similarity stays > {threshold}",
        )
    )


@_per_run
def mixing_effect(ds: xr.Dataset) -> xr.Dataset:
    """What the sink does for mixing: (step, layer) ratios, sink removed over sink kept, on done steps.

    ``collapse``: collapse(removed) / collapse(kept); above 1: without the sink the positions' residuals are more
    alike (the sink held over-mixing back). ``sensitivity``: sensitivity(removed) / sensitivity(kept); above 1:
    without the sink one replaced token moves the later positions more.
    """
    _needs(ds, MEASURED["mixing"], "mixing")
    d = _done_data(ds)
    out = xr.Dataset(
        {
            name: d[name].sel(sink="removed", drop=True) / d[name].sel(sink="kept", drop=True)
            for name in MEASURED["mixing"]
        }
    )
    for name in out.data_vars:
        out[name].attrs.update(
            long_name=f"{name}, sink removed over kept",
            units="ratio",
            definition=f"{name}(sink=removed) / {name}(sink=kept)",
        )
    return out


# Relative difference below which two stored norms are the same: each is a mean of float32 norms, rounded at
# about 1e-7 of its size.
_ROUNDING = 1e-6


def _excess(p0: xr.DataArray, rest: xr.DataArray) -> xr.DataArray:
    """max(0, p0 - rest), and 0 where the difference is within ``_ROUNDING`` of p0 (NaN stays NaN)."""
    diff = p0 - rest
    return diff.where(diff > _ROUNDING * abs(p0), 0.0).where(diff.notnull())


@_per_run
def circuit_share(ds: xr.Dataset, k: int = 2) -> xr.DataArray:
    """Per step, the share of the position-0 writing done in the first ``k`` layers.

    Definition: e(l, c) = max(0, <c>_out_norm_p0 - <c>_out_norm), how much more sublayer c of layer l writes at
    position 0 than at the other positions; share = sum of e over layers < k / sum over all layers (both
    components). NaN where the total is 0. An excess within float32 rounding of the norms (relative
    ``_ROUNDING``) counts as 0: a sublayer that writes the same norm everywhere has no excess, and without the
    floor its rounding alone could make a share of 1.
    """
    _needs(ds, MEASURED["outputs"], "outputs")
    d = _done_data(ds)
    excess = sum(_excess(d[f"{c}_out_norm_p0"], d[f"{c}_out_norm"]) for c in ("attn", "mlp"))
    total = excess.sum("layer")
    return (
        (excess.isel(layer=slice(0, k)).sum("layer") / total)
        .where(total > 0)
        .rename("circuit_share")
        .assign_attrs(
            long_name=f"share of the position-0 writing in layers 0..{k - 1}",
            units="fraction",
            k=k,
            definition=f"sum over layers < {k} of max(0, out_norm_p0 - out_norm), attention and MLP, over the sum "
            "over all layers",
        )
    )


@_per_run
def circuit_convergence_step(ds: xr.Dataset, k: int = 2, tol: float = 0.05, window: int = 3) -> xr.DataArray:
    """The P0 paper's convergence signal: the step after which :func:`circuit_share` stops changing. 0-d.

    Definition: the smallest done step s_i such that, for every window of ``window`` consecutive done checkpoints
    starting at s_j >= s_i, max - min of the share within the window is below ``tol``. NaN if the last full
    window still changes by ``tol`` or more, or fewer than ``window`` done checkpoints exist. Plot it beside
    :func:`training_loss`.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 checkpoints, not {window}")
    share = circuit_share(ds, k)
    if share.sizes["step"] < window:
        return (share.max() * np.nan).rename("circuit_convergence_step")
    roll = share.rolling(step=window)
    change = (roll.max() - roll.min()).shift(step=-(window - 1))
    full = change.notnull()
    converged = _true_from_here_on((change < tol) | ~full, "step") & full
    return (
        _first_label(converged, "step")
        .rename("circuit_convergence_step")
        .assign_attrs(
            long_name="circuit convergence step",
            units="training step",
            k=k,
            tol=tol,
            window=window,
            definition=f"first step from which circuit_share (k={k}) changes by less than {tol} within every window "
            f"of {window} consecutive done checkpoints",
        )
    )


@_per_run
def training_loss(ds: xr.Dataset) -> xr.DataArray:
    """The training loss logged at each done step (the ``loss`` step coordinate; NaN where the checkpoint did not
    say)."""
    d = _done_data(ds)
    if "loss" not in d.coords:
        raise KeyError(
            "the cube has no loss coordinate: its checkpoints had no trainer_state.json log history, "
            "or 'loss' was not in replay.measure"
        )
    return d["loss"].drop_vars([c for c in d["loss"].coords if c != "step"]).rename("training_loss")


# ---------------------------------------------------------------------------
# First-token comparison across probe groups

# Probe attrs that must agree for two groups to be a first-token pair. The seed is
# left out: a random first token may be drawn from its own seed.
_SAME_PROBE = ("probe_kind", "probe_seq_len", "probe_rows", "probe_source", "architecture", "config_fingerprint")


@_per_run
def same_weights(ds: xr.Dataset) -> list[list[int]]:
    """Steps that hold identical weights: each group (two steps or more, sorted) shares one ``weights_digest``
    (the digest of the checkpoint's tensors, docs/data.md). Public suites serve one checkpoint under several
    step names; such steps are one measurement, not a flat stretch of training. Done steps with a digest only."""
    if "weights_digest" not in ds.coords:
        return []
    ds = done(ds)
    groups: dict[str, list[int]] = {}
    for step, digest in zip(ds["step"].values.tolist(), ds["weights_digest"].values.tolist()):
        digest = digest.decode() if isinstance(digest, bytes) else str(digest)
        if digest:
            groups.setdefault(digest, []).append(int(step))
    return sorted(sorted(steps) for steps in groups.values() if len(steps) > 1)


def same_weights_lines(ds: xr.Dataset) -> list[str]:
    """One line per group of steps that hold identical weights (:func:`same_weights`)."""
    return [
        f"steps {', '.join(str(s) for s in steps)} hold identical weights (the same weights_digest): "
        "one checkpoint under several step names"
        for steps in same_weights(ds)
    ]


def _probe_differences(a: Mapping, b: Mapping) -> list[str]:
    return [key for key in _SAME_PROBE if (key in a or key in b) and str(a.get(key)) != str(b.get(key))]


def first_token_pair(tree) -> tuple[str, str] | None:
    """Names (keep_or_bos, random) of two groups that differ only in ``probe_first_token``.

    ``tree``: an opened store or a mapping of name -> Dataset (see :func:`probe_groups`).

    "keep" is preferred over "bos" when both exist; ties go by group name. None if
    the store holds no such pair.
    """
    groups = probe_groups(tree)
    policy = {name: ds.attrs.get("probe_first_token") for name, ds in groups.items()}
    randoms = sorted(n for n, p in policy.items() if p == "random")
    fixed = sorted((n for n, p in policy.items() if p in ("keep", "bos")), key=lambda n: (policy[n] != "keep", n))
    for r in randoms:
        for f in fixed:
            if not _probe_differences(groups[f].attrs, groups[r].attrs):
                return f, r
    return None


@_per_run_pair
def positional_index_pair(
    fixed: xr.Dataset,
    random: xr.Dataset,
    *,
    baseline: bool = True,
    min_excess: float = 0.05,
) -> xr.DataArray:
    """How much of each layer's sink survives a random first token (per step and layer).

    Definition, with m_f and m_r the head-mean sink mass per step and layer of the
    probe with a fixed first token (keep or bos) and of the same probe with a
    random first token, and u = :func:`uniform_sink_mass` (T) the level uniform
    attention gives (``baseline=False`` sets u = 0, a plain ratio m_r / m_f):

        index = clip((m_r - u) / (m_f - u), 0, 1),   NaN where m_f - u <= min_excess

    1: the sink survives any first token (tied to position 0 alone); 0: it is gone
    with the token (tied to its identity). NaN where the fixed probe shows no sink
    above the uniform level to attribute. Only steps done in both groups are used.
    u assumes full causal attention; with a sliding window the true floor is lower.
    """
    diffs = _probe_differences(fixed.attrs, random.attrs)
    if diffs:
        raise ValueError(
            "the two probe groups differ in more than the first token: "
            + ", ".join(f"{k}={fixed.attrs.get(k)!r} vs {random.attrs.get(k)!r}" for k in diffs)
        )
    u = uniform_sink_mass(probe_length(fixed)) if baseline else 0.0
    m_f, m_r = xr.align(layer_sink_mass(fixed), layer_sink_mass(random), join="inner")
    excess = m_f - u
    index = ((m_r - u) / excess).clip(0.0, 1.0).where(excess > min_excess)
    return index.rename("positional_index").assign_attrs(
        long_name="positional index",
        units="fraction of the sink kept",
        baseline=u,
        min_excess=min_excess,
        fixed_group=str(fixed.attrs.get("probe_name", "")),
        random_group=str(random.attrs.get("probe_name", "")),
        definition=f"clip((m_random - u) / (m_fixed - u), 0, 1) of head-mean sink_mass, u={u:.4f}; "
        f"NaN where m_fixed - u <= {min_excess}; 1 = tied to position 0, 0 = tied to the token",
    )


def positional_index(
    tree,
    *,
    fixed: str | None = None,
    random: str | None = None,
    baseline: bool = True,
    min_excess: float = 0.05,
) -> xr.DataArray:
    """:func:`positional_index_pair` for two groups of an opened store (see :func:`probe_groups`).

    ``fixed`` (the keep or bos group) and ``random`` name the groups; by default the
    pair is found with :func:`first_token_pair`. Raises ValueError, listing the
    groups, when the store has no such pair.
    """
    groups = probe_groups(tree)
    if fixed is None or random is None:
        pair = first_token_pair(groups)
        if pair is None:
            found = "; ".join(
                f"{n} (first_token={ds.attrs.get('probe_first_token')}, kind={ds.attrs.get('probe_kind')}, "
                f"T={ds.attrs.get('probe_seq_len')})"
                for n, ds in groups.items()
            )
            raise ValueError(
                "the positional index needs two probe groups that differ only in "
                f"probe_first_token (keep or bos vs random); the store has: {found or 'none'}"
            )
        fixed, random = fixed or pair[0], random or pair[1]
    fixed_ds, random_ds = groups[fixed], groups[random]
    result = positional_index_pair(fixed_ds, random_ds, baseline=baseline, min_excess=min_excess)
    return result.assign_attrs(fixed_group=fixed, random_group=random)


# ---------------------------------------------------------------------------
# Accessor


@xr.register_dataset_accessor("sinks")
class SinkAccessor:
    """``ds.sinks.<function>(...)``: the functions of this module bound to one probe group (or to several runs of
    one, from ``pipeline.open_runs``: answers per run)."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    @property
    def done(self) -> xr.Dataset:
        return done(self._ds)

    def score(self, convention: Convention = "stored") -> xr.DataArray:
        return sink_score(self._ds, convention)

    def layer_mean(self, convention: Convention = "stored") -> xr.DataArray:
        return layer_sink_mass(self._ds, convention)

    def sink_rate(self, eps: float = 0.3, dim=("layer", "head"), *, convention: Convention = "stored"):
        return sink_rate(self._ds, eps, dim, convention=convention)

    def emergence_step(self, eps: float = 0.3, *, per="layer", convention: Convention = "stored"):
        return emergence_step(self._ds, eps, per=per, convention=convention)

    def first_crossing_step(self, eps: float = 0.3, *, per="layer", convention: Convention = "stored"):
        return first_crossing_step(self._ds, eps, per=per, convention=convention)

    def onset_layer(self, eps: float = 0.3, *, convention: Convention = "stored"):
        return onset_layer(self._ds, eps, convention=convention)

    def early_share(self, k: int = 2):
        return early_share(self._ds, k)

    def profile_change(self, window: int = 3):
        return profile_change(self._ds, window)

    def convergence_step(self, tol: float = 0.05, window: int = 3):
        return convergence_step(self._ds, tol, window)

    def massive_activation_ratio(self, kind: Literal["norm", "max_median"] = "norm"):
        return massive_activation_ratio(self._ds, kind)

    def writer_ratio(self):
        return writer_ratio(self._ds)

    def circuit_writer(self, ratio: float = 3.0):
        return circuit_writer(self._ds, ratio)

    def writer_settle_step(self, ratio: float = 3.0):
        return writer_settle_step(self._ds, ratio)

    def recognition_step(self, threshold: float = 0.9, layers: int = 2):
        return recognition_step(self._ds, threshold, layers)

    def mixing_effect(self):
        return mixing_effect(self._ds)

    def circuit_share(self, k: int = 2):
        return circuit_share(self._ds, k)

    def circuit_convergence_step(self, k: int = 2, tol: float = 0.05, window: int = 3):
        return circuit_convergence_step(self._ds, k, tol, window)

    def training_loss(self):
        return training_loss(self._ds)

    def same_weights(self) -> list[list[int]]:
        return same_weights(self._ds)

    def positional_index(self, random: xr.Dataset, *, baseline: bool = True, min_excess: float = 0.05):
        """This group as the fixed-first-token probe, ``random`` as the random one."""
        return positional_index_pair(self._ds, random, baseline=baseline, min_excess=min_excess)
