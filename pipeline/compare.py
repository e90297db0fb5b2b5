"""Compare stage: several runs' stores of one probe side by side (figures and one HTML page).

It reads the stores alone (``pipeline.open_runs``), so it runs after the replays, e.g. after a Hydra multirun over
checkpoint roots: ``sinktrace stages=[compare] compare.stores=[A,B]``.
"""

from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from . import analysis as an
from .errors import UsageError
from .report.figures import STEP_LABEL, new_figure, save_figure
from .report.html import html_figure, html_table, write_page
from .report.numbers import fmt_mass, fmt_step
from .runs import open_runs
from .store.schema import MEASURED

TOKENS_LABEL = "tokens seen"
# The variables the comparison reads (the step coordinates come along).
_NEEDED = ("sink_mass", *MEASURED["outputs"], *MEASURED["similarity"])


@dataclass
class RunNumbers:
    """The table's numbers for one run."""

    done: int
    last_step: float
    emergence: np.ndarray  # per layer
    convergence: float  # the per-layer profile's (analysis.convergence_step)
    circuit_convergence: float  # NaN where the store has no `outputs`
    recognition: float  # NaN where the probe's first token is not random, or no `similarity`
    rate_last: float
    loss_last: float


def default_out_dir(names: list[str]) -> Path:
    """A stable folder per set of runs under sinktrace's home, so the same comparison rewrites its own page."""
    from .locations import sinktrace_home

    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:8]
    return sinktrace_home() / "compare" / f"{len(names)}-runs-{digest}"


def run_numbers(ds: xr.Dataset, eps: float = 0.3) -> dict[str, RunNumbers]:
    """Per run: emergence steps per layer, convergence steps, the last sink rate and loss."""
    out = {}
    for name in an.run_names(ds):
        one = an.one_run(ds, name)
        steps = an.done(one)["step"].values
        has = steps.size > 0
        loss = an.training_loss(one).dropna("step") if "loss" in one.coords else None
        out[name] = RunNumbers(
            done=int(steps.size),
            last_step=float(steps[-1]) if has else math.nan,
            emergence=an.emergence_step(one, eps).values,
            convergence=float(an.convergence_step(one)),
            circuit_convergence=_or_nan(an.circuit_convergence_step, one),
            recognition=_or_nan(an.recognition_step, one),
            rate_last=float(an.sink_rate(one, eps).isel(step=-1)) if has else math.nan,
            loss_last=float(loss.isel(step=-1)) if loss is not None and loss.sizes["step"] else math.nan,
        )
    return out


def _or_nan(measure, ds: xr.Dataset) -> float:
    """A measure the store may lack (KeyError: not in replay.measure; ValueError: not for this probe)."""
    try:
        return float(measure(ds))
    except (KeyError, ValueError):
        return math.nan


def _axis(ds: xr.Dataset) -> tuple[str, str]:
    index = ds["status"].dims[-1]
    return index, (STEP_LABEL if index == "step" else TOKENS_LABEL)


def _run_colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(1, n - 1)) for i in range(n)]


def _lines(ax, values: xr.DataArray, index: str, colors, **kwargs) -> None:
    for color, name in zip(colors, values["run"].values.tolist()):
        y = values.sel(run=name).dropna(index)
        ax.plot(y[index].values, y.values, color=color, marker="o", markersize=3, label=name, **kwargs)


def fig_emergence_runs(ds: xr.Dataset, numbers: dict[str, RunNumbers], path: Path, eps: float) -> Path:
    """One panel per layer: the head-mean sink mass of every run, its emergence step marked."""
    index, label = _axis(ds)
    mass = an.layer_sink_mass(ds)
    layers = mass["layer"].values
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows + 0.6), squeeze=False, sharey=True)
    colors = _run_colors(len(numbers))
    for i, layer in enumerate(layers):
        ax = axes.flat[i]
        _lines(ax, mass.sel(layer=layer), index, colors)
        for color, (name, n) in zip(colors, numbers.items()):
            emerge = n.emergence[i] if i < len(n.emergence) else math.nan
            if np.isfinite(emerge):
                where = emerge if index == "step" else _tokens_at(ds, name, emerge)
                ax.axvline(where, color=color, linestyle=":", linewidth=1)
        ax.axhline(eps, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    axes.flat[0].set_ylabel("sink mass, mean over heads")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Sink mass per layer, one line per run; dotted: emergence step (stays > {eps:g})", fontsize=10)
    return save_figure(fig, path)


def _tokens_at(ds: xr.Dataset, run: str, step: float) -> float:
    one = an.one_run(ds, run)
    return float(one["tokens_seen"].sel(step=int(step)))


def fig_rate_runs(ds: xr.Dataset, path: Path, eps: float) -> Path:
    """The sink rate of every run (share of heads above eps)."""
    index, label = _axis(ds)
    fig, ax = new_figure(figsize=(8, 4))
    _lines(ax, an.sink_rate(ds, eps), index, _run_colors(ds.sizes["run"]))
    ax.set_xlabel(label)
    ax.set_ylabel(f"share of heads with sink mass > {eps:g}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Sink rate per run", fontsize=10)
    return save_figure(fig, path)


def fig_loss_runs(ds: xr.Dataset, numbers: dict[str, RunNumbers], path: Path) -> Path | None:
    """The training loss of every run that logged one; dashed: the run's circuit convergence step."""
    if "loss" not in ds.coords or not np.isfinite(ds["loss"].values).any():
        return None
    index, label = _axis(ds)
    loss = an.training_loss(ds)
    colors = _run_colors(len(numbers))
    fig, ax = new_figure(figsize=(8, 4))
    _lines(ax, loss, index, colors)
    for color, (name, n) in zip(colors, numbers.items()):
        if np.isfinite(n.circuit_convergence):
            where = n.circuit_convergence if index == "step" else _tokens_at(ds, name, n.circuit_convergence)
            ax.axvline(where, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel(label)
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.set_title("Training loss per run; dashed: the P0 circuit's convergence step", fontsize=10)
    return save_figure(fig, path)


def table_rows(ds: xr.Dataset, numbers: dict[str, RunNumbers], eps: float) -> tuple[list[str], list[list[str]]]:
    layers = [str(layer) for layer in ds["layer"].values]
    header = [
        "run",
        "done steps",
        "last step",
        *(f"layer {layer} stays > {eps:g} from" for layer in layers),
        "profile converges",
        "circuit converges",
        "position 0 recognised",
        "sink rate (last)",
        "loss (last)",
    ]
    rows = [
        [
            name,
            str(n.done),
            fmt_step(n.last_step),
            *(fmt_step(n.emergence[i]) if i < len(n.emergence) else "—" for i in range(len(layers))),
            fmt_step(n.convergence),
            fmt_step(n.circuit_convergence),
            fmt_step(n.recognition),
            fmt_mass(n.rate_last),
            fmt_mass(n.loss_last),
        ]
        for name, n in numbers.items()
    ]
    return header, rows


def text_table(ds: xr.Dataset, numbers: dict[str, RunNumbers], eps: float) -> str:
    """The table in plain text for the command line, the emergence steps of all layers in one column."""
    header = ["run", "done", "last step", f"stays > {eps:g} from (layer 0, 1, ...)", "profile conv.", "circuit conv."]
    header += ["sink rate", "loss"]
    rows = [
        [
            name,
            str(n.done),
            fmt_step(n.last_step),
            ", ".join(fmt_step(e) for e in n.emergence),
            fmt_step(n.convergence),
            fmt_step(n.circuit_convergence),
            fmt_mass(n.rate_last),
            fmt_mass(n.loss_last),
        ]
        for name, n in numbers.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *rows]
    )


def write_comparison(ds: xr.Dataset, out_dir: str | Path | None = None, *, eps: float = 0.3) -> Path:
    """Write the figures and ``index.html`` comparing the runs of ``ds`` (from :func:`pipeline.open_runs`); return
    the page's path. ``out_dir`` defaults to a folder per set of runs under sinktrace's home."""
    names = an.run_names(ds)
    out = Path(out_dir) if out_dir is not None else default_out_dir([str(s) for s in ds["store"].values])
    out.mkdir(parents=True, exist_ok=True)
    ds = ds[[v for v in _NEEDED if v in ds.data_vars]].load()
    numbers = run_numbers(ds, eps)
    index, label = _axis(ds)
    header, rows = table_rows(ds, numbers, eps)
    figures = [
        (fig_emergence_runs(ds, numbers, out / "emergence.png", eps), "Emergence per layer, one line per run."),
        (fig_rate_runs(ds, out / "sink_rate.png", eps), f"Sink rate per run against {label}."),
    ]
    loss = fig_loss_runs(ds, numbers, out / "loss.png")
    if loss is not None:
        figures.append((loss, "Training loss per run, with the P0 circuit's convergence step."))
    stores = html_table(
        ["run", "store", "checkpoint root", "architecture"],
        [
            [n, str(s), str(r), str(a)]
            for n, s, r, a in zip(names, *(ds[c].values for c in ("store", "checkpoint_root", "architecture")))
        ],
        left=4,
    )
    parts = [
        f"<h1>sinktrace: {len(names)} runs compared</h1>"
        f"<p class=note>Probe group <code>{html.escape(str(ds.attrs.get('probe_name', '')))}</code>; aligned on "
        f"{html.escape(label)}; eps = {eps:g}.</p>",
        stores,
        "<h2>Emergence and convergence steps</h2>",
        html_table(header, rows, left=1),
        "<p class=note>Steps are training steps. <i>stays &gt; eps from</i>: the emergence step, from which the "
        "layer's head-mean sink mass stays above eps; <i>profile converges</i>: from which the per-layer sink "
        "profile changes by less than 0.05 within every 3 checkpoints; <i>circuit converges</i>: the same for the "
        "share of the position-0 writing in layers 0–1 (needs <code>outputs</code> in replay.measure); "
        "<i>position 0 recognised</i>: needs a probe with a random first token; — where there is none.</p>",
        *(html_figure(path.name, caption) for path, caption in figures),
    ]
    return write_page(out / "index.html", "sinktrace: runs compared", parts)


def compare_stage(cfg) -> Path:
    """`stages=[compare]`: the stores in compare.stores or compare.runs, compared; prints the table."""
    c, eps = cfg.compare, float(cfg.report.eps)
    try:
        ds = open_runs(dict(c.runs) if c.runs else list(c.stores), group=c.group, align=str(c.align))
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"compare: {e}") from None
    ds = ds[[v for v in _NEEDED if v in ds.data_vars]].load()
    page = write_comparison(ds, c.out_dir or None, eps=eps)
    print(f"\nprobe {ds.attrs.get('probe_name', '')}, {ds.sizes['run']} runs:")
    print(text_table(ds, run_numbers(ds, eps), eps))
    print(f"\ncomparison: {page}")
    return page
