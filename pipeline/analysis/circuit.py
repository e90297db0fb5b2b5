"""The P0 circuit and over-mixing: which heads write the first token's massive activation, when that settles,
when the model recognises position 0, and what mixing into position 0 does."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..store.schema import MEASURED
from .per_run import _per_run
from .selection import _done_data, _first_label, _true_from_here_on


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
