"""Runs compared: several stores' cubes of one probe as one Dataset with a ``run`` dimension.

Sweeps (learning rates, data, context lengths) give one store per checkpoint root. ``open_runs`` lines their
cubes up on the training step or on the tokens seen, so that each analysis function answers per run
(``pipeline.analysis`` runs each on every run's own cube and stacks the answers along ``run``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import xarray as xr

from .analysis import probe_groups
from .analysis.per_run import MISSING, RUN, _strings
from .store.schema import STEP_COORDS, STRING_STEP_COORDS

__all__ = ["open_runs"]

# Probe attributes two runs must share to be compared on one group (the model may differ: that is the sweep).
_SAME_PROBE = ("probe_kind", "probe_seq_len", "probe_rows", "probe_source", "probe_first_token", "probe_tokens_sha256")


def open_runs(
    stores: Sequence | Mapping,
    group: str | None = None,
    align: Literal["step", "tokens"] = "step",
) -> xr.Dataset:
    """Several runs' cubes of one probe group as one Dataset with a ``run`` dimension.

    Args:
        stores: store paths (or what ``open_sinks`` returns), or a mapping run name -> store. Unnamed runs are
            named by their ``checkpoint_root`` attribute (the store's path where there is none).
        group: the probe group to compare; by default the one group every store holds (an error when they share
            none, or several: then name one).
        align: ``"step"``: one row per training step any run has; ``"tokens"``: per ``tokens_seen`` (every step
            of every run must say how many tokens it had seen), with ``step`` a (run, tokens_seen) coordinate.

    A step that a run does not have holds NaN in that run, with ``status`` ``missing``. Coordinates on ``run``:
    ``checkpoint_root``, ``store`` and ``architecture``. The attributes are those all runs share.

    Raises:
        FileNotFoundError: a store path with no store.
        ValueError: the stores share no probe group (the message lists each store's groups), the group's probes
            differ between stores, run names repeat, or ``align="tokens"`` on a run without ``tokens_seen``.
    """
    if align not in ("step", "tokens"):
        raise ValueError(f"align must be 'step' or 'tokens', not {align!r}")
    given = list(stores.items()) if isinstance(stores, Mapping) else [(None, s) for s in stores]
    if len(given) < 1:
        raise ValueError("open_runs needs at least one store")
    opened = [(name, _label(store), probe_groups(_open(store))) for name, store in given]
    group = _shared_group(opened, group)
    cubes: dict[str, xr.Dataset] = {}
    labels = {}
    for name, label, groups in opened:
        ds = groups[group]
        name = str(name) if name is not None else str(ds.attrs.get("checkpoint_root") or label)
        if name in cubes:
            raise ValueError(
                f"two runs are both named {name!r} ({labels[name]} and {label}): pass a mapping of run name -> store"
            )
        cubes[name], labels[name] = ds, label
    _check_same_probe(cubes, group)
    prepared = {name: _prepared(ds, name, align) for name, ds in cubes.items()}
    index = "step" if align == "step" else "tokens_seen"
    union = np.unique(np.concatenate([ds[index].values for ds in prepared.values()]))
    fill = {name: STEP_COORDS[name][1] for name in STRING_STEP_COORDS} | {"status": MISSING}
    if align == "tokens":
        fill["step"] = np.nan
    aligned = [ds.reindex({index: union}, fill_value=fill) for ds in prepared.values()]
    out = xr.concat(aligned, dim=RUN, join="outer", combine_attrs="drop_conflicts", coords="different", compat="equals")
    return out.assign_coords(
        {
            RUN: list(prepared),
            "checkpoint_root": (RUN, [str(ds.attrs.get("checkpoint_root", "")) for ds in cubes.values()]),
            "store": (RUN, [labels[name] for name in cubes]),
            "architecture": (RUN, [str(ds.attrs.get("architecture", "")) for ds in cubes.values()]),
        }
    )


def _label(store) -> str:
    if isinstance(store, (str, os.PathLike)):
        return os.fspath(store)
    return str(getattr(store, "encoding", {}).get("source", "") or type(store).__name__)


def _open(store):
    if not isinstance(store, (str, os.PathLike)):
        return store
    from .locations import exists
    from .store.cube import open_sinks

    location = os.fspath(store)
    if not exists(location):
        raise FileNotFoundError(f"{location}: no sinktrace store there")
    try:
        return open_sinks(location)
    except (FileNotFoundError, KeyError) as e:
        raise FileNotFoundError(f"{location}: not a sinktrace store ({e})") from None


def _shared_group(opened, group: str | None) -> str:
    shared = set.intersection(*(set(groups) for _, _, groups in opened))
    if group is not None and group in shared:
        return group
    held = "; ".join(f"{label}: {', '.join(groups) or 'none'}" for _, label, groups in opened)
    if group is not None:
        raise ValueError(f"probe group {group!r} is not in every store ({held})")
    if not shared:
        raise ValueError(f"the stores share no probe group, so their runs cannot be compared ({held})")
    if len(shared) > 1:
        raise ValueError(f"the stores share probe groups {', '.join(sorted(shared))}: name one with group=")
    return shared.pop()


def _check_same_probe(cubes: dict[str, xr.Dataset], group: str) -> None:
    names = list(cubes)
    first = cubes[names[0]].attrs
    for name in names[1:]:
        attrs = cubes[name].attrs
        diffs = [k for k in _SAME_PROBE if (k in first or k in attrs) and str(first.get(k)) != str(attrs.get(k))]
        if diffs:
            raise ValueError(
                f"probe group {group!r} holds different probes in runs {names[0]!r} and {name!r}: "
                + ", ".join(f"{k}={first.get(k)!r} vs {attrs.get(k)!r}" for k in diffs)
            )


def _prepared(ds: xr.Dataset, name: str, align: str) -> xr.Dataset:
    """One run's cube ready to be stacked: every step coordinate present, strings as Python strs."""
    for coord, (_, missing) in STEP_COORDS.items():
        if coord not in ds.coords:
            ds = ds.assign_coords({coord: ("step", np.full(ds.sizes["step"], missing))})
    ds = ds.assign_coords(
        {c: ("step", _strings(ds[c].values)) for c in STRING_STEP_COORDS},
    )
    if align == "step":
        return ds
    tokens = ds["tokens_seen"].values.astype(float)
    lacking = ds["step"].values[~np.isfinite(tokens)]
    if lacking.size:
        shown = ", ".join(str(s) for s in lacking[:5].tolist()) + (" ..." if lacking.size > 5 else "")
        raise ValueError(
            f"align='tokens': run {name!r} does not say how many tokens it had seen at step(s) {shown} "
            "(tokens_seen is NaN); compare it with align='step'"
        )
    if np.unique(tokens).size != tokens.size:
        raise ValueError(f"align='tokens': run {name!r} has steps with the same tokens_seen; compare with align='step'")
    return ds.assign_coords(step=("step", ds["step"].values.astype(float))).swap_dims(step="tokens_seen")
