"""The figures of the P0 circuit (writer, recognition, mixing) and of the first-token comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .. import analysis as an
from ..store.schema import MEASURED
from .figures import SINK_LABEL, layer_colors, layer_key, layer_ticks, marker_size, new_figure, save_figure, step_axis
from .numbers import GroupNumbers, fmt_step


def fig_circuit(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """The P0 circuit: its writer per step, and the share of the position-0 writing in layers 0-1 beside the
    training loss, with the step the share settles."""
    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharex=True)
    writer = an.circuit_writer(ds)
    axes[0].plot(writer.step, writer, marker="o", markersize=marker_size(n.steps.size), drawstyle="steps-post")
    _writer_axis(axes[0], ds.sizes["layer"])
    axes[0].set_title(
        f"first sublayer writing position 0 > {writer.attrs['ratio']:g}x the rest "
        f"(settles at {fmt_step(float(an.writer_settle_step(ds)))})",
        fontsize=9,
    )
    share = an.circuit_share(ds)
    axes[1].plot(share.step, share, marker="o", markersize=marker_size(n.steps.size), color="C1")
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
        step_axis(ax)
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


def fig_recognition(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """p0_similarity (solid) and rest_similarity (dashed) per layer over training."""
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = layer_colors(n_layers)
    fig, ax = new_figure(figsize=(8, 4.2))
    d = an.done(ds)
    for i, layer in enumerate(ds["layer"].values):
        ax.plot(
            d.step,
            d["p0_similarity"].sel(layer=layer),
            color=colors[i],
            marker="o",
            markersize=marker_size(n.steps.size),
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
    step_axis(ax)
    ax.grid(alpha=0.25)
    layer_key(fig, ax, n_layers, cmap, norm)
    fig.suptitle(f"{title}: is position zero recognised without its content?", fontsize=10)
    return save_figure(fig, path)


def fig_mixing(ds: xr.Dataset, n: GroupNumbers, path: Path, title: str) -> Path:
    """Collapse and sensitivity with the sink removed over kept, per layer over training."""
    n_layers = ds.sizes["layer"]
    colors, cmap, norm = layer_colors(n_layers)
    effect = an.mixing_effect(ds)
    fig, axes = new_figure(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, name in zip(axes, MEASURED["mixing"]):
        for i, layer in enumerate(ds["layer"].values):
            ax.plot(
                effect.step,
                effect[name].sel(layer=layer),
                color=colors[i],
                marker="o",
                markersize=marker_size(n.steps.size),
                label=f"layer {layer}",
            )
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.set_ylabel(f"{name}: sink removed / kept")
        step_axis(ax)
        ax.grid(alpha=0.25)
    layer_key(fig, axes[1], n_layers, cmap, norm)
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
    colors, cmap, norm = layer_colors(n_layers)
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
    layer_ticks(ax0, n_layers, axis="x")
    ax0.set_ylabel(SINK_LABEL + "\nmean over heads")
    ax0.set_title(f"sink mass at step {last:,}", fontsize=9)
    ax0.legend(fontsize=7, frameon=False, loc="upper right")
    for i, layer in enumerate(layers):
        ax1.plot(
            index.step,
            index.sel(layer=layer),
            color=colors[i],
            marker="o",
            markersize=marker_size(index.sizes["step"]),
            label=f"layer {layer}",
        )
    # Keep the whole run on the axis: early steps without a sink are gaps, not cropped away.
    all_steps = np.union1d(fixed["step"].values, random["step"].values)
    pad = 0.03 * max(all_steps[-1] - all_steps[0], 1)
    ax1.set_xlim(all_steps[0] - pad, all_steps[-1] + pad)
    ax1.set_ylim(-0.03, 1.03)
    ax1.set_ylabel("positional index\n1 = tied to position 0, 0 = to the token")
    step_axis(ax1)
    ax1.grid(alpha=0.25)
    ax1.set_title(
        "share of the sink (above uniform) kept with a random first token; gaps: no sink to compare", fontsize=9
    )
    layer_key(fig, ax1, n_layers, cmap, norm)
    fig.suptitle("First-token comparison: is the sink tied to position 0 or to the token?", fontsize=10)
    return save_figure(fig, path)
