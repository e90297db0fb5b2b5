"""The figures of a probe group's section: sink mass over steps, layers and heads, and the axes they share.

Each figure is drawn on its own Agg canvas (`new_figure`) and saved with every label as plain text (`save_figure`).
"""

from __future__ import annotations

import math
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
from .numbers import GroupNumbers

SINK_LABEL = "sink mass (attention on token 0)"
STEP_LABEL = "training step"
DPI = 120
# Few enough layers to name each in a legend; more get a colour bar instead.
MAX_LEGEND_LAYERS = 10


def step_axis(ax) -> None:
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


def marker_size(n_steps: int) -> float:
    """Dots mark the checkpoints while they can be told apart; dense runs get plain lines."""
    return 3.0 if n_steps <= 40 else 0.0


def layer_colors(n_layers: int):
    cmap = matplotlib.colormaps["viridis"]
    norm = mcolors.Normalize(vmin=0, vmax=max(n_layers - 1, 1) / 0.85)  # stop before pale yellow
    return [cmap(norm(i)) for i in range(n_layers)], cmap, norm


def layer_key(fig, ax, n_layers: int, cmap, norm) -> None:
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


def layer_ticks(ax, n_layers: int, axis: str = "y") -> None:
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
    step_axis(ax)
    ax.set_ylabel("layer")
    layer_ticks(ax, n_layers)
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
    colors, cmap, norm = layer_colors(n_layers)
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
            markersize=marker_size(n.steps.size),
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
    step_axis(ax)
    ax.grid(alpha=0.25)
    ax.set_title(f"{title}: emergence per layer (mean over heads; ◆ = emergence step)", fontsize=10)
    layer_key(fig, ax, n_layers, cmap, norm)
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
    layer_ticks(ax, n_layers)
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
    colors, cmap, norm = layer_colors(n_layers)
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
    layer_key(fig, ax, n_layers, cmap, norm)
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
    ms = marker_size(n.steps.size)
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
    layer_ticks(ax, n_layers)
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
    ax.plot(share.step, share, marker="o", markersize=marker_size(n.steps.size), label="early share")
    ax.axhline(min(2, n_layers) / n_layers, color="0.5", ls="--", lw=1, label="same mass in every layer (2 / layers)")
    ax.legend(fontsize=8, frameon=False, loc="best")
    _mark_not_done(ax, ds, n.steps)
    ax.set_ylabel("share of sink mass\nin layers 0–1")
    ax.set_ylim(0, 1.02)
    step_axis(ax)
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
    colors, cmap, norm = layer_colors(n_layers)
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
                markersize=marker_size(n.steps.size),
                label=f"layer {layer}",
            )
        positive = ratio.where(ratio > 0)
        # Log scale once the ratios span a decade; below that it would leave hardly a tick label.
        if positive.count() and float(positive.max()) / float(positive.min()) >= 10:
            _log_axis(ax)
        ax.set_ylabel(ylabel + ", ratio")
        ax.set_title(name, fontsize=9)
        step_axis(ax)
        ax.grid(alpha=0.25, which="both")
    layer_key(fig, axes[1], n_layers, cmap, norm)
    fig.suptitle(f"{title}: massive activations at position 0 (residual stream after each block)", fontsize=10)
    return save_figure(fig, path)
