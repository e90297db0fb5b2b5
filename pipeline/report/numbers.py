"""The report's numbers for one probe group: what the page's tables and the command line's summary show."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .. import analysis as an
from ..store.schema import DONE, FAILED, MEASURED, PENDING


def fmt_step(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{int(round(float(value))):d}"


def fmt_mass(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{float(value):.3f}"


def fmt_share(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{100.0 * float(value):.1f} %"


def _status_counts(ds: xr.Dataset) -> dict[str, int]:
    if "status" not in ds.variables:
        return {DONE: int(ds.sizes["step"])}
    values = [s.decode() if isinstance(s, bytes) else str(s) for s in ds["status"].values.tolist()]
    return {s: values.count(s) for s in (DONE, FAILED, PENDING) if values.count(s)}


@dataclass
class GroupNumbers:
    """The numbers the page and the CLI table show for one probe group."""

    eps: float
    tol: float
    window: int
    steps: np.ndarray  # done steps
    first_step: int | None
    last_step: int | None
    first_mass: np.ndarray  # per layer, head mean
    last_mass: np.ndarray
    first_crossing: np.ndarray  # per layer
    emergence: np.ndarray  # per layer
    rate_last: float
    rate_last_gu: float
    convergence: float
    onset_last: float
    early_last: float
    counts: dict = field(default_factory=dict)


def group_numbers(ds: xr.Dataset, eps: float = 0.3, *, tol: float = 0.05, window: int = 3) -> GroupNumbers:
    """Compute the report's numbers from one group (done steps only)."""
    # One read of the few kilobytes needed, rather than one Dask graph per number.
    ds = ds[["sink_mass"]].load()  # the step coordinates (status) come along
    layer_mass = an.layer_sink_mass(ds)
    steps = layer_mass.step.values
    n_layers = ds.sizes["layer"]
    empty = np.full(n_layers, np.nan)
    has = steps.size > 0
    try:
        rate_gu = float(an.sink_rate(ds, eps, convention="gu").isel(step=-1)) if has else math.nan
    except KeyError:  # no probe length in the attrs: Gu's score cannot be formed
        rate_gu = math.nan
    return GroupNumbers(
        eps=eps,
        tol=tol,
        window=window,
        steps=steps,
        first_step=int(steps[0]) if has else None,
        last_step=int(steps[-1]) if has else None,
        first_mass=layer_mass.isel(step=0).values if has else empty,
        last_mass=layer_mass.isel(step=-1).values if has else empty,
        first_crossing=an.first_crossing_step(ds, eps).values,
        emergence=an.emergence_step(ds, eps).values,
        rate_last=float(an.sink_rate(ds, eps).isel(step=-1)) if has else math.nan,
        rate_last_gu=rate_gu,
        convergence=float(an.convergence_step(ds, tol, window)),
        onset_last=float(an.onset_layer(ds, eps).isel(step=-1)) if has else math.nan,
        early_last=float(an.early_share(ds).isel(step=-1)) if has else math.nan,
        counts=_status_counts(ds),
    )


def summary_table(ds: xr.Dataset, eps: float = 0.3) -> str:
    """A short plain-text table per layer: head-mean sink mass at the first and last done
    step, the first step where it passed ``eps``, and the step from which it stays above."""
    n = group_numbers(ds, eps)
    counts = ", ".join(f"{v} {k}" for k, v in n.counts.items())
    if n.first_step is None:
        return f"no done steps yet ({counts})"
    header = ["layer", f"mass @ {n.first_step}", f"mass @ {n.last_step}", f"first > {eps:g}", f"stays > {eps:g} from"]
    rows = [
        [str(layer), fmt_mass(a), fmt_mass(b), fmt_step(c), fmt_step(e)]
        for layer, a, b, c, e in zip(ds["layer"].values, n.first_mass, n.last_mass, n.first_crossing, n.emergence)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows]]
    lines.append(
        f"mass @ S: attention on token 0 at step S, mean over heads and queries; first > {eps:g}: the first step "
        f"above it; stays > {eps:g} from: the step from which it never falls back (—: never)"
    )
    lines.append(f"steps: {counts}; sink rate at step {n.last_step}: {fmt_share(n.rate_last)} of heads > {eps:g}")
    return "\n".join(lines)


def circuit_rows(ds: xr.Dataset) -> list[list[str]]:
    """The P0 circuit in numbers, for the group's table: the writer and its share at the last done step, the step
    the writer settles, and (with a random first token) the recognition step. Empty without the measures."""
    rows = []
    has_outputs = all(v in ds.variables for v in MEASURED["outputs"])
    if has_outputs and an.done(ds).sizes["step"]:
        writer = float(an.circuit_writer(ds).isel(step=-1))
        last = int(an.done(ds)["step"].values[-1])
        name = "none" if not np.isfinite(writer) else f"layer {int(writer)} {'MLP' if writer % 1 else 'attention'}"
        rows += [
            [f"P0 circuit writer at step {last} (first sublayer writing position 0 > 3x the rest)", name],
            ["step the writer settles", fmt_step(float(an.writer_settle_step(ds)))],
            [
                f"circuit share at step {last} (excess position-0 writing in layers 0-1)",
                fmt_share(float(an.circuit_share(ds).isel(step=-1))),
            ],
        ]
    if "p0_similarity" in ds.variables and ds.attrs.get("probe_first_token") == "random":
        rows.append(
            ["recognition step (p0_similarity in layers 0-1 stays > 0.9)", fmt_step(float(an.recognition_step(ds)))]
        )
    return rows
