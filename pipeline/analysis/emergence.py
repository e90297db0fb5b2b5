"""When the sink emerges during training, and where: sink rate, emergence and crossing steps, onset layer, early
share, the layer profile's change and convergence, massive activations."""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

from .per_run import _per_run
from .selection import Convention, _done_data, _first_label, _true_from_here_on, layer_sink_mass, sink_score


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
