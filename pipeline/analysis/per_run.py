"""Several runs compared (``pipeline.open_runs``: a Dataset with a ``run`` dimension, steps a run lacks NaN with
status ``missing``): each analysis function runs on each run's own cube and the answers are stacked along ``run``
(docs/data.md, "Runs compared")."""

from __future__ import annotations

import functools

import numpy as np
import xarray as xr

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
