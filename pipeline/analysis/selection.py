"""Reading one probe group: its groups, its done steps, the probe length, the sink score under either convention,
and the training loss logged at each step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import xarray as xr

from ..store.schema import DONE, STRING_STEP_COORDS
from .per_run import RUN, _per_run, _strings

Convention = Literal["stored", "gu"]


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


def _first_label(mask: xr.DataArray, dim: str) -> xr.DataArray:
    """Coordinate label of the first True along dim, NaN where there is none."""
    if mask.sizes[dim] == 0:
        return mask.astype(float).sum(dim) * np.nan
    return mask.idxmax(dim).where(mask.any(dim))


def _true_from_here_on(mask: xr.DataArray, dim: str) -> xr.DataArray:
    """True at i where mask holds at i and at every later position along dim."""
    backwards = slice(None, None, -1)
    return mask.isel({dim: backwards}).astype(int).cumprod(dim).isel({dim: backwards}).astype(bool)
