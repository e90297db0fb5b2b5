"""Report stage: PNG figures and one HTML page per store, plus the CLI's plain-text table."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.text
import numpy as np
import xarray as xr
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .. import analysis as an
from ..locations import is_url
from ..store.cube import open_sinks
from ..store.schema import DONE, FAILED, MEASURED, PENDING

SINK_LABEL = "sink mass (attention on token 0)"
STEP_LABEL = "training step"
DPI = 120
# Few enough layers to name each in a legend; more get a colour bar instead.
MAX_LEGEND_LAYERS = 10
# Variables the figures read; loading only these keeps the report quick on wide cubes.
# (status, error, tokens_seen and loss are step coordinates and come along.)
_NEEDED = (
    "sink_mass",
    "sink_mass_by_q",
    "resid_norm_p0",
    "resid_norm",
    "resid_max_p0",
    "resid_median",
    *(name for names in MEASURED.values() for name in names),
)


def default_out_dir(store_path: str | Path) -> Path:
    """``<store>.report`` beside the store (``run/sinks.zarr`` -> ``run/sinks.zarr.report``)."""
    location = str(store_path)
    if is_url(location):
        raise ValueError(f"{location}: the store is remote; pass out_dir= for the report")
    return Path(location.rstrip("/") + ".report")


# ---------------------------------------------------------------------------
# Numbers


def fmt_step(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{int(round(float(value))):d}"


def fmt_mass(value) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{float(value):.3f}"


def _fmt_share(value) -> str:
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
    lines.append(f"steps: {counts}; sink rate at step {n.last_step}: {_fmt_share(n.rate_last)} of heads > {eps:g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figures


def _step_axis(ax) -> None:
    ax.set_xlabel(STEP_LABEL)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))


def _plain(y: float) -> str:
    return f"{y:,.0f}" if y >= 10 else f"{y:g}"


def _log_axis(ax) -> None:
    """Log y axis with plain numbers (3, 20, 1,000), labelling 2s and 5s when it spans few decades."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: _plain(y)))

    def minor(y, _):
        low, high = ax.get_ylim()
        few_decades = high / max(low, 1e-300) < 30
        lead = round(y / 10 ** math.floor(math.log10(y)), 6)
        return _plain(y) if few_decades and lead in (2.0, 5.0) else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _mark_not_done(ax, ds: xr.Dataset, done_steps: np.ndarray) -> None:
    """Small grey crosses on the step axis where a checkpoint failed or is pending."""
    missing = np.setdiff1d(ds["step"].values, done_steps)
    if missing.size:
        ax.plot(
            missing,
            np.zeros(missing.size),
            ls="none",
            marker="x",
            color="0.45",
            markersize=7,
            clip_on=False,
            zorder=5,
            transform=ax.get_xaxis_transform(),
            label=f"failed or pending ({missing.size})",
        )


def _marker_size(n_steps: int) -> float:
    """Dots mark the checkpoints while they can be told apart; dense runs get plain lines."""
    return 3.0 if n_steps <= 40 else 0.0


def _layer_colors(n_layers: int):
    cmap = matplotlib.colormaps["viridis"]
    norm = mcolors.Normalize(vmin=0, vmax=max(n_layers - 1, 1) / 0.85)  # stop before pale yellow
    return [cmap(norm(i)) for i in range(n_layers)], cmap, norm


def _layer_key(fig, ax, n_layers: int, cmap, norm) -> None:
    """Legend for few layers, a colour bar for many."""
    if n_layers <= MAX_LEGEND_LAYERS:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        sm = ScalarMappable(cmap=cmap, norm=norm)
        cb = fig.colorbar(sm, ax=ax, pad=0.02)
        cb.set_label("layer")
        cb.ax.set_ylim(0, n_layers - 1)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between checkpoints, so uneven steps get cells at their real place."""
    s = np.asarray(steps, dtype=float)
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    edges = np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
    if s[0] >= 0:  # no negative training steps on the axis; the first cell is cut at step 0
        edges[0] = max(edges[0], 0.0)
    return edges


def _layer_ticks(ax, n_layers: int, axis: str = "y") -> None:
    target = ax.yaxis if axis == "y" else ax.xaxis
    if n_layers <= 16:
        target.set_ticks(range(n_layers))
    else:
        target.set_major_locator(MaxNLocator(integer=True))


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize, **kwargs):
    """A figure on its own Agg canvas: the report runs headless and never touches pyplot's
    global backend, so importing it in a notebook leaves inline plotting alone."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path: Path) -> Path:
    # every label is text: a run, folder or probe name holding `$` must not be parsed as mathtext
    for text in fig.findobj(matplotlib.text.Text):
        text.set_parse_math(False)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def fig_heatmap(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Layer x step heatmap of head-mean sink mass; grey cells are steps not done."""
    mass = an.layer_sink_mass(ds).reindex(step=ds["step"].values)  # not-done steps -> NaN -> grey
    steps = mass.step.values
    n_layers = ds.sizes["layer"]
    fig, ax = new_figure(figsize=(9, max(3.0, 1.2 + 0.35 * n_layers)))
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#d9d9d9")
    mesh = ax.pcolormesh(
        _step_edges(steps),
        np.arange(n_layers + 1) - 0.5,
        np.ma.masked_invalid(mass.transpose("layer", "step").values),
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        shading="flat",
    )
    emerged = np.isfinite(n.emergence)
    if emerged.any():
        ax.scatter(
            n.emergence[emerged],
            np.arange(n_layers)[emerged],
            marker="D",
            s=40,
            facecolor="white",
            edgecolor="black",
            zorder=3,
        )
    cb = fig.colorbar(mesh, ax=ax, pad=0.02)
    cb.set_label(SINK_LABEL)
    _step_axis(ax)
    ax.set_ylabel("layer")
    _layer_ticks(ax, n_layers)
    not_done = ds.sizes["step"] - n.steps.size
    notes = [f"◇ emergence step (stays > {n.eps:g})"] if emerged.any() else []
    if not_done:
        notes.append(f"grey: {not_done} step{'s' if not_done != 1 else ''} failed or pending")
    subtitle = "\n" + "  ·  ".join(notes) if notes else ""
    ax.set_title(f"{title}: sink mass per layer, mean over heads{subtitle}", fontsize=10)
    return save_figure(fig, path)


def fig_emergence(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Per-layer sink-mass curves with the emergence steps marked."""
    mass = an.layer_sink_mass(ds)
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = _layer_colors(n_layers)
    fig, ax = new_figure(figsize=(9, 4.6))
    for i, layer in enumerate(ds["layer"].values):
        emerge = n.emergence[i]
        when = f"stays > {n.eps:g} from {emerge:,.0f}" if np.isfinite(emerge) else f"not > {n.eps:g} at the end"
        y = mass.sel(layer=layer)
        ax.plot(
            mass.step,
            y,
            color=colors[i],
            marker="o",
            markersize=_marker_size(n.steps.size),
            lw=1.6,
            label=f"layer {layer}: {when}",
        )
        if np.isfinite(emerge):
            ax.plot(
                [emerge],
                [float(y.sel(step=emerge))],
                marker="D",
                markersize=8,
                color=colors[i],
                markeredgecolor="black",
                zorder=4,
            )
    ax.axhline(n.eps, color="0.4", ls="--", lw=1)
    ax.annotate(
        f"eps = {n.eps:g}",
        xy=(1.0, n.eps),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 3),
        textcoords="offset points",
        ha="right",
        fontsize=8,
        color="0.3",
    )
    if np.isfinite(n.convergence):
        ax.axvline(n.convergence, color="0.5", ls=":", lw=1.2)
        right_half = n.convergence > (n.steps[0] + n.steps[-1]) / 2
        ax.annotate(
            f"layer profile settled\n(change < {n.tol:g} over {n.window} checkpoints)",
            xy=(n.convergence, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-4 if right_half else 4, -4),
            textcoords="offset points",
            va="top",
            ha="right" if right_half else "left",
            fontsize=8,
            color="0.3",
        )
    _mark_not_done(ax, ds, n.steps)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(SINK_LABEL)
    _step_axis(ax)
    ax.grid(alpha=0.25)
    ax.set_title(f"{title}: emergence per layer (mean over heads; ◆ = emergence step)", fontsize=10)
    _layer_key(fig, ax, n_layers, cmap, norm)
    return save_figure(fig, path)


def fig_heads(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Head x layer heatmap at the last done step."""
    last = an.sink_score(ds).isel(step=-1).transpose("layer", "head").values
    n_layers, n_heads = last.shape
    fig, ax = new_figure(figsize=(min(12, 2.5 + 0.55 * n_heads), min(10, 1.5 + 0.45 * n_layers)))
    im = ax.imshow(last, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    if last.size <= 256:  # values stay legible up to about a 16 x 16 grid
        for (li, hi), v in np.ndenumerate(last):
            ax.text(hi, li, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label(SINK_LABEL)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    _layer_ticks(ax, n_layers)
    if n_heads <= 16:
        ax.set_xticks(range(n_heads))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}: sink mass per head at step {n.last_step:,} (last done step)", fontsize=10)
    return save_figure(fig, path)


def _qbin_labels(ds: xr.Dataset) -> list[str]:
    if "qbin_start" not in ds.coords:
        return [str(b) for b in ds["qbin"].values]
    starts, stops = ds["qbin_start"].values, ds["qbin_stop"].values
    return [f"{a}" if b - a == 1 else f"{a}–{b - 1}" for a, b in zip(starts, stops)]


def fig_by_query(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Sink mass by query-position bin at the last done step, one line per layer."""
    by_q = an.done(ds)["sink_mass_by_q"].isel(step=-1).mean("head")
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = _layer_colors(n_layers)
    fig, ax = new_figure(figsize=(8, 4.4))
    x = np.arange(ds.sizes["qbin"])
    for i, layer in enumerate(ds["layer"].values):
        ax.plot(x, by_q.sel(layer=layer), color=colors[i], marker="o", markersize=4, label=f"layer {layer}")
    ax.set_xticks(x, _qbin_labels(ds), rotation=0 if len(x) <= 8 else 45)
    ax.set_xlabel("query position t (log-spaced bins)")
    ax.set_ylabel(SINK_LABEL)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.25)
    ax.set_title(f"{title}: sink mass by query position at step {n.last_step:,} (mean over heads)", fontsize=10)
    _layer_key(fig, ax, n_layers, cmap, norm)
    return save_figure(fig, path)


def fig_overview(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Sink rate, onset layer and early share over training, with the convergence step."""
    rate = an.sink_rate(ds, n.eps)
    try:
        rate_gu = an.sink_rate(ds, n.eps, convention="gu")
    except KeyError:
        rate_gu = None
    onset = an.onset_layer(ds, n.eps)
    share = an.early_share(ds, k=2)
    n_layers = ds.sizes["layer"]
    fig, axes = new_figure(3, 1, figsize=(9, 7.5), sharex=True)
    ax = axes[0]
    ms = _marker_size(n.steps.size)
    ax.plot(rate.step, 100 * rate, marker="o", markersize=ms, label="sink_mass as stored")
    if rate_gu is not None:
        ax.plot(
            rate_gu.step,
            100 * rate_gu,
            marker="s",
            markersize=ms,
            ls="--",
            label=f"Gu et al. score (T={an.probe_length(ds)})",
        )
    ax.set_ylabel(f"sink rate\n(% heads > {n.eps:g})")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax = axes[1]
    ax.plot(onset.step, onset, marker="o", markersize=ms, drawstyle="steps-post")
    ax.set_ylabel(f"onset layer\n(first with mean > {n.eps:g})")
    ax.set_ylim(-0.5, n_layers - 0.5)
    _layer_ticks(ax, n_layers)
    if onset.isnull().any():
        ax.text(
            0.01,
            0.95,
            f"steps without a point: no layer above {n.eps:g}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="0.4",
        )
    ax = axes[2]
    ax.plot(share.step, share, marker="o", markersize=_marker_size(n.steps.size), label="early share")
    ax.axhline(min(2, n_layers) / n_layers, color="0.5", ls="--", lw=1, label="same mass in every layer (2 / layers)")
    ax.legend(fontsize=8, frameon=False, loc="best")
    _mark_not_done(ax, ds, n.steps)
    ax.set_ylabel("share of sink mass\nin layers 0–1")
    ax.set_ylim(0, 1.02)
    _step_axis(ax)
    for ax in axes:
        ax.grid(alpha=0.25)
        if np.isfinite(n.convergence):
            ax.axvline(n.convergence, color="0.5", ls=":", lw=1.2)
    settled = (
        f"; dotted line: profile settled at step {n.convergence:,.0f}"
        if np.isfinite(n.convergence)
        else "; the layer profile has not settled"
    )
    axes[0].set_title(f"{title}: sink over training{settled}", fontsize=10)
    fig.align_ylabels(axes)
    return save_figure(fig, path)


def fig_massive(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Both massive-activation ratios per layer over training (log scale)."""
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = _layer_colors(n_layers)
    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharex=True)
    specs = [
        ("norm", "‖h₀‖ / mean ‖hₜ‖ (L2 norms)", "token-0 norm ratio"),
        ("max_median", "max |h₀| / median |hₜ| (Sun et al.)", "top / median activation"),
    ]
    for ax, (kind, ylabel, name) in zip(axes, specs):
        ratio = an.massive_activation_ratio(ds, kind)
        for i, layer in enumerate(ds["layer"].values):
            ax.plot(
                ratio.step,
                ratio.sel(layer=layer),
                color=colors[i],
                marker="o",
                markersize=_marker_size(n.steps.size),
                label=f"layer {layer}",
            )
        positive = ratio.where(ratio > 0)
        # Log scale once the ratios span a decade; below that it would leave hardly a tick label.
        if positive.count() and float(positive.max()) / float(positive.min()) >= 10:
            _log_axis(ax)
        ax.set_ylabel(ylabel + ", ratio")
        ax.set_title(name, fontsize=9)
        _step_axis(ax)
        ax.grid(alpha=0.25, which="both")
    _layer_key(fig, axes[1], n_layers, cmap, norm)
    fig.suptitle(f"{title}: massive activations at position 0 (residual stream after each block)", fontsize=10)
    return save_figure(fig, path)


def fig_circuit(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """The P0 circuit: its writer per step, and the share of the position-0 writing in layers 0-1 beside the
    training loss, with the step the share settles."""
    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharex=True)
    writer = an.circuit_writer(ds)
    axes[0].plot(writer.step, writer, marker="o", markersize=_marker_size(n.steps.size), drawstyle="steps-post")
    _writer_axis(axes[0], ds.sizes["layer"])
    axes[0].set_title(
        f"first sublayer writing position 0 > {writer.attrs['ratio']:g}x the rest "
        f"(settles at {fmt_step(float(an.writer_settle_step(ds)))})",
        fontsize=9,
    )
    share = an.circuit_share(ds)
    axes[1].plot(share.step, share, marker="o", markersize=_marker_size(n.steps.size), color="C1")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("share of position-0 writing in layers 0-1", color="C1")
    settled = float(an.circuit_convergence_step(ds))
    if np.isfinite(settled):
        axes[1].axvline(settled, color="C1", linestyle=":", label=f"share settles: {settled:g}")
        axes[1].legend(fontsize=8, loc="lower right")
    if "loss" in ds.coords and np.isfinite(an.training_loss(ds).values).any():
        loss = an.training_loss(ds)
        twin = axes[1].twinx()
        twin.plot(loss.step, loss, color="0.4", linestyle="--")
        twin.set_ylabel("training loss (dashed)", color="0.4")
    axes[1].set_title("the circuit's share in the first two layers, and the loss", fontsize=9)
    for ax in axes:
        _step_axis(ax)
        ax.grid(alpha=0.25)
    fig.suptitle(f"{title}: the position-0 circuit", fontsize=10)
    return save_figure(fig, path)


def _writer_axis(ax, n_layers: int) -> None:
    """The writer's axis in words: one tick per sublayer, "0 attn", "0 MLP", "1 attn", ..."""
    ax.set_ylim(-0.25, n_layers - 0.25)
    ticks = np.arange(0, n_layers, 0.5)
    if ticks.size <= 24:
        ax.set_yticks(ticks, [f"{int(t)} {'MLP' if t % 1 else 'attn'}" for t in ticks], fontsize=7)
    ax.set_ylabel("writer: layer and sublayer")


def _mark_recognition(ax, ds: xr.Dataset) -> None:
    """The recognition threshold (dotted) and, where position zero is recognised, the step (a vertical line)."""
    step = an.recognition_step(ds)
    ax.axhline(step.attrs["threshold"], color="0.4", linestyle=":", linewidth=1)
    if np.isfinite(float(step)):
        ax.axvline(float(step), color="black", linestyle=":", label=f"recognised from step {float(step):g}")
        ax.legend(fontsize=8, loc="lower right")


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
                _fmt_share(float(an.circuit_share(ds).isel(step=-1))),
            ],
        ]
    if "p0_similarity" in ds.variables and ds.attrs.get("probe_first_token") == "random":
        rows.append(
            ["recognition step (p0_similarity in layers 0-1 stays > 0.9)", fmt_step(float(an.recognition_step(ds)))]
        )
    return rows


def fig_recognition(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """p0_similarity (solid) and rest_similarity (dashed) per layer over training."""
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = _layer_colors(n_layers)
    fig, ax = new_figure(figsize=(8, 4.2))
    d = an.done(ds)
    for i, layer in enumerate(ds["layer"].values):
        ax.plot(
            d.step,
            d["p0_similarity"].sel(layer=layer),
            color=colors[i],
            marker="o",
            markersize=_marker_size(n.steps.size),
            label=f"layer {layer}",
        )
        ax.plot(d.step, d["rest_similarity"].sel(layer=layer), color=colors[i], linestyle="--")
    ax.set_ylabel("mean pairwise cosine across rows")
    random = ds.attrs.get("probe_first_token") == "random"
    if random:
        _mark_recognition(ax, ds)
    ax.set_title(
        "position 0 (solid) and later positions (dashed)"
        + ("" if random else ": one first token in every row, so position 0 is 1 by construction"),
        fontsize=9,
    )
    _step_axis(ax)
    ax.grid(alpha=0.25)
    _layer_key(fig, ax, n_layers, cmap, norm)
    fig.suptitle(f"{title}: is position zero recognised without its content?", fontsize=10)
    return save_figure(fig, path)


def fig_mixing(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Collapse and sensitivity with the sink removed over kept, per layer over training."""
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = _layer_colors(n_layers)
    effect = an.mixing_effect(ds)
    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, name in zip(axes, MEASURED["mixing"]):
        for i, layer in enumerate(ds["layer"].values):
            ax.plot(
                effect.step,
                effect[name].sel(layer=layer),
                color=colors[i],
                marker="o",
                markersize=_marker_size(n.steps.size),
                label=f"layer {layer}",
            )
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.set_ylabel(f"{name}: sink removed / kept")
        _step_axis(ax)
        ax.grid(alpha=0.25)
    _layer_key(fig, axes[1], n_layers, cmap, norm)
    fig.suptitle(f"{title}: what the sink does for mixing (above 1: more mixing without it)", fontsize=10)
    return save_figure(fig, path)


def fig_first_token(fixed: xr.Dataset, random: xr.Dataset, index: xr.DataArray, path: Path) -> Path:
    """Fixed vs random first token: sink mass per layer at the last common step, and the
    positional index over training."""
    last = int(index.step.values[-1])
    m_f = an.layer_sink_mass(fixed).sel(step=last)
    m_r = an.layer_sink_mass(random).sel(step=last)
    layers = fixed["layer"].values
    n_layers = layers.size
    colors, cmap, norm = _layer_colors(n_layers)
    fig, (ax0, ax1) = new_figure(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.4]})
    w = 0.4
    fname, rname = index.attrs["fixed_group"], index.attrs["random_group"]
    ax0.bar(
        layers - w / 2, m_f, w, label=f"first token {fixed.attrs.get('probe_first_token')} ({fname})", color="#3b528b"
    )
    ax0.bar(layers + w / 2, m_r, w, label=f"random first token ({rname})", color="#f89540")
    if index.attrs["baseline"] > 0:
        ax0.axhline(index.attrs["baseline"], color="0.4", ls="--", lw=1, label="uniform attention (no sink)")
    ax0.set_ylim(0, 1.02)
    ax0.set_xlabel("layer")
    _layer_ticks(ax0, n_layers, axis="x")
    ax0.set_ylabel(SINK_LABEL + "\nmean over heads")
    ax0.set_title(f"sink mass at step {last:,}", fontsize=9)
    ax0.legend(fontsize=7, frameon=False, loc="upper right")
    for i, layer in enumerate(layers):
        ax1.plot(
            index.step,
            index.sel(layer=layer),
            color=colors[i],
            marker="o",
            markersize=_marker_size(index.sizes["step"]),
            label=f"layer {layer}",
        )
    # Keep the whole run on the axis: early steps without a sink are gaps, not cropped away.
    all_steps = np.union1d(fixed["step"].values, random["step"].values)
    pad = 0.03 * max(all_steps[-1] - all_steps[0], 1)
    ax1.set_xlim(all_steps[0] - pad, all_steps[-1] + pad)
    ax1.set_ylim(-0.03, 1.03)
    ax1.set_ylabel("positional index\n1 = tied to position 0, 0 = to the token")
    _step_axis(ax1)
    ax1.grid(alpha=0.25)
    ax1.set_title(
        "share of the sink (above uniform) kept with a random first token; gaps: no sink to compare", fontsize=9
    )
    _layer_key(fig, ax1, n_layers, cmap, norm)
    fig.suptitle("First-token comparison: is the sink tied to position 0 or to the token?", fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Page

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .note { color: #555; font-size: 0.9em; }
.warn { color: #a40; font-weight: bold; }
"""


def html_table(header: list[str], rows: list[list[str]], left: int = 0) -> str:
    def cells(tag, row):
        return "".join(
            f"<{tag}{' class=l' if i < left else ''}>{html.escape(str(c))}</{tag}>" for i, c in enumerate(row)
        )

    return (
        "<table><tr>"
        + cells("th", header)
        + "</tr>"
        + "".join("<tr>" + cells("td", r) + "</tr>" for r in rows)
        + "</table>"
    )


def write_page(page: Path, title: str, parts: list[str]) -> Path:
    """An HTML page of `parts` (already escaped), in the report's style."""
    page.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n",
        encoding="utf-8",
    )
    return page


def html_figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "group"


def _group_section(name: str, ds: xr.Dataset, out: Path, eps: float, tol: float, window: int) -> str:
    prefix = safe_name(name)
    n = group_numbers(ds, eps, tol=tol, window=window)
    probe = {k: v for k, v in ds.attrs.items() if k.startswith("probe_") or k in ("architecture", "attention_route")}
    parts = [
        f"<h2>Probe group <code>{html.escape(name)}</code></h2>",
        html_table(["attribute", "value"], [[k, v] for k, v in probe.items()], left=2),
        "<p class=note>Steps: "
        + html.escape(", ".join(f"{v} {k}" for k, v in n.counts.items()))
        + ". Only done steps enter the numbers and curves.</p>",
    ]
    if "error" in ds.variables and n.counts.get(FAILED):
        status = [str(s) for s in ds["status"].values.tolist()]
        errors = [
            [int(s), str(e)] for s, st, e in zip(ds["step"].values, status, ds["error"].values.tolist()) if st == FAILED
        ]
        parts.append("<details><summary>failed steps</summary>" + html_table(["step", "error"], errors) + "</details>")
    parts.extend(f"<p class=warn>Warning: {html.escape(line)}.</p>" for line in an.same_weights_lines(ds))
    if n.first_step is None:
        parts.append("<p>No done steps yet: nothing to plot.</p>")
        return "\n".join(parts)

    layer_rows = [
        [str(layer), fmt_mass(a), fmt_mass(b), fmt_step(c), fmt_step(e)]
        for layer, a, b, c, e in zip(ds["layer"].values, n.first_mass, n.last_mass, n.first_crossing, n.emergence)
    ]
    parts.append(
        html_table(
            [
                "layer",
                f"sink mass at step {n.first_step}",
                f"sink mass at step {n.last_step}",
                f"first step > {eps:g}",
                f"emergence step (stays > {eps:g})",
            ],
            layer_rows,
        )
    )
    scalars = [
        [f"sink rate at step {n.last_step} (share of heads with sink_mass > {eps:g})", _fmt_share(n.rate_last)],
        [f"sink rate at step {n.last_step}, Gu et al. score (1 + (T-1)·m)/T > {eps:g}", _fmt_share(n.rate_last_gu)],
        [
            f"convergence step (every {window} consecutive checkpoints change each layer by < {tol:g})",
            fmt_step(n.convergence),
        ],
        [f"onset layer at step {n.last_step} (first layer with mean > {eps:g})", fmt_step(n.onset_last)],
        [f"early share at step {n.last_step} (sink mass in layers 0–1)", _fmt_share(n.early_last)],
    ]
    parts.append(html_table(["quantity", "value"], scalars + circuit_rows(ds), left=1))
    parts.append(
        "<p class=note>Sink mass: attention on key 0 averaged over probe rows and queries "
        "1..T-1, then over heads. Emergence step: first done step from which the layer stays "
        "above eps at every later done step (— where it is not above eps at the last one).</p>"
    )

    title = name
    # (figure, file, caption, the variables it reads): a cube without some variable skips that figure.
    figures = [
        (
            fig_heatmap,
            "sink_mass_heatmap.png",
            "Sink mass per layer and step (mean over heads). Cells sit at the real checkpoint steps; "
            "diamonds mark emergence steps; grey columns are failed or pending steps.",
            (),
        ),
        (
            fig_emergence,
            "emergence_curves.png",
            f"Per-layer sink mass over training with eps = {eps:g} (dashed) and each layer's emergence step (diamond).",
            (),
        ),
        (fig_heads, "heads_last_step.png", f"Sink mass of every head at step {n.last_step}.", ()),
        (
            fig_by_query,
            "sink_by_query.png",
            f"Sink mass by query position at step {n.last_step}: does the sink grow with context?",
            ("sink_mass_by_q",),
        ),
        (
            fig_overview,
            "training_overview.png",
            "Sink rate, onset layer and the share of sink mass in the first two layers over training.",
            (),
        ),
        (
            fig_massive,
            "massive_activations.png",
            "Residual-stream norm at position 0 relative to other positions, and Sun et al.'s max/median ratio.",
            ("resid_norm_p0", "resid_norm", "resid_max_p0", "resid_median"),
        ),
        (
            fig_circuit,
            "p0_circuit.png",
            "The P0 circuit: the first sublayer whose output at position 0 is more than 3x its mean elsewhere, and "
            "the share of that excess writing done in layers 0-1, beside the training loss.",
            MEASURED["outputs"],
        ),
        (
            fig_recognition,
            "p0_recognition.png",
            "Cosine similarity of the residual stream across probe rows at position 0 and at later positions; "
            "with a random first token, 1 at position 0 means it is recognised without its content.",
            MEASURED["similarity"],
        ),
        (
            fig_mixing,
            "mixing.png",
            "Collapse and sensitivity with the sink removed, over the model as it is.",
            MEASURED["mixing"],
        ),
    ]
    for fn, file, caption, needs in figures:
        missing = [v for v in needs if v not in ds.variables]
        if missing:
            parts.append(f"<p class=note>No {html.escape(file)}: the cube lacks {', '.join(missing)}.</p>")
            continue
        # Flat, prefixed by group: the folder stays one level, easy to browse and to copy.
        fn(ds, n, out / f"{prefix}_{file}", title)
        parts.append(html_figure(f"{prefix}_{file}", caption))
    return "\n".join(parts)


def write_report(
    store_path: str, out_dir: str | None = None, *, eps: float = 0.3, tol: float = 0.05, window: int = 3
) -> Path:
    """Write figures and ``index.html`` for every probe group of a store; return the page's path.

    ``out_dir`` defaults to ``<store>.report`` beside the store. Each group gets its
    PNGs, named ``<group>_<figure>.png``, and a section of the page; a first-token
    comparison is added when the store holds a group with a fixed first token (keep
    or bos) and one with a random first token that differ in nothing else. ``tol``
    and ``window`` set the convergence step (see analysis.convergence_step).
    """
    out = Path(out_dir) if out_dir is not None else default_out_dir(store_path)
    out.mkdir(parents=True, exist_ok=True)
    groups = {
        name: ds[[v for v in _NEEDED if v in ds.data_vars]].load()
        for name, ds in an.probe_groups(open_sinks(store_path)).items()
    }
    parts = [
        f"<h1>sinktrace report</h1><p class=note>Store: <code>{html.escape(str(store_path))}</code>; "
        f"eps = {eps:g}; {len(groups)} probe group{'s' if len(groups) != 1 else ''}.</p>"
    ]
    if not groups:
        parts.append("<p>The store holds no probe groups yet.</p>")
    pair = an.first_token_pair(groups)
    if pair is not None:
        parts.append(_first_token_section(groups, pair, out))
    for name, ds in groups.items():
        parts.append(_group_section(name, ds, out, eps, tol, window))
    return write_page(out / "index.html", "sinktrace report", parts)


def _first_token_section(groups: dict, pair: tuple[str, str], out: Path) -> str:
    fixed_name, random_name = pair
    index = an.positional_index(groups, fixed=fixed_name, random=random_name)
    head = f"<h2>First token: <code>{html.escape(fixed_name)}</code> vs <code>{html.escape(random_name)}</code></h2>"
    if index.sizes["step"] == 0:
        return head + "<p>No step is done in both groups yet.</p>"
    last = int(index.step.values[-1])
    file = f"first_token_{safe_name(fixed_name)}_vs_{safe_name(random_name)}.png"
    fig_first_token(groups[fixed_name], groups[random_name], index, out / file)
    m_f = an.layer_sink_mass(groups[fixed_name]).sel(step=last).values
    m_r = an.layer_sink_mass(groups[random_name]).sel(step=last).values
    rows = [
        [str(layer), fmt_mass(a), fmt_mass(b), fmt_mass(p)]
        for layer, a, b, p in zip(index.layer.values, m_f, m_r, index.isel(step=-1).values)
    ]
    return (
        head
        + html_table(
            [
                "layer",
                f"sink mass, fixed first token (step {last})",
                f"sink mass, random first token (step {last})",
                "positional index",
            ],
            rows,
        )
        + "<p class=note>Positional index = clip((m_random − u) / (m_fixed − u), 0, 1), "
        f"u = {index.attrs['baseline']:.3f} the sink mass of uniform attention at this probe length: "
        "1 = the sink is tied to position 0 alone, 0 = tied to the first token's identity; "
        "— where the fixed probe has no sink above u to compare.</p>"
        + html_figure(
            file, "Sink mass with a fixed vs a random first token, and the positional index per layer over training."
        )
    )
