"""Report stage: one HTML page per store, a section per probe group with its figures (`figures`,
`circuit_figures`), its numbers (`numbers`, which also gives the CLI's plain-text table) and the HTML (`html`)."""

from __future__ import annotations

import html
from pathlib import Path

import xarray as xr

from .. import analysis as an
from ..locations import is_url
from ..store.cube import open_sinks
from ..store.schema import FAILED, MEASURED
from .circuit_figures import fig_circuit, fig_first_token, fig_mixing, fig_recognition
from .figures import fig_by_query, fig_emergence, fig_heads, fig_heatmap, fig_massive, fig_overview
from .html import html_figure, html_table, safe_name, write_page
from .numbers import GroupNumbers, circuit_rows, fmt_mass, fmt_share, fmt_step, group_numbers

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


def _group_section(name: str, ds: xr.Dataset, out: Path, eps: float, tol: float, window: int) -> str:
    n = group_numbers(ds, eps, tol=tol, window=window)
    parts = _group_head(name, ds, n)
    if n.first_step is None:
        parts.append("<p>No done steps yet: nothing to plot.</p>")
        return "\n".join(parts)
    parts.append(_layer_table(ds, n, eps))
    parts.append(_quantities_table(ds, n, eps, tol, window))
    parts.append(
        "<p class=note>Sink mass: attention on key 0 averaged over probe rows and queries "
        "1..T-1, then over heads. Emergence step: first done step from which the layer stays "
        "above eps at every later done step (— where it is not above eps at the last one).</p>"
    )
    parts.extend(_group_figures(name, ds, n, out, eps))
    return "\n".join(parts)


def _group_head(name: str, ds: xr.Dataset, n: GroupNumbers) -> list[str]:
    """The group's title, probe attributes, step counts, failed steps and warnings."""
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
    return parts


def _layer_table(ds: xr.Dataset, n: GroupNumbers, eps: float) -> str:
    layer_rows = [
        [str(layer), fmt_mass(a), fmt_mass(b), fmt_step(c), fmt_step(e)]
        for layer, a, b, c, e in zip(ds["layer"].values, n.first_mass, n.last_mass, n.first_crossing, n.emergence)
    ]
    return html_table(
        [
            "layer",
            f"sink mass at step {n.first_step}",
            f"sink mass at step {n.last_step}",
            f"first step > {eps:g}",
            f"emergence step (stays > {eps:g})",
        ],
        layer_rows,
    )


def _quantities_table(ds: xr.Dataset, n: GroupNumbers, eps: float, tol: float, window: int) -> str:
    scalars = [
        [f"sink rate at step {n.last_step} (share of heads with sink_mass > {eps:g})", fmt_share(n.rate_last)],
        [f"sink rate at step {n.last_step}, Gu et al. score (1 + (T-1)·m)/T > {eps:g}", fmt_share(n.rate_last_gu)],
        [
            f"convergence step (every {window} consecutive checkpoints change each layer by < {tol:g})",
            fmt_step(n.convergence),
        ],
        [f"onset layer at step {n.last_step} (first layer with mean > {eps:g})", fmt_step(n.onset_last)],
        [f"early share at step {n.last_step} (sink mass in layers 0–1)", fmt_share(n.early_last)],
    ]
    return html_table(["quantity", "value"], scalars + circuit_rows(ds), left=1)


def _figure_list(n: GroupNumbers, eps: float) -> list[tuple]:
    """(figure, file, caption, the variables it reads): a cube without some variable skips that figure."""
    return [
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


def _group_figures(name: str, ds: xr.Dataset, n: GroupNumbers, out: Path, eps: float) -> list[str]:
    prefix = safe_name(name)
    title = name
    parts = []
    for fn, file, caption, needs in _figure_list(n, eps):
        missing = [v for v in needs if v not in ds.variables]
        if missing:
            parts.append(f"<p class=note>No {html.escape(file)}: the cube lacks {', '.join(missing)}.</p>")
            continue
        # Flat, prefixed by group: the folder stays one level, easy to browse and to copy.
        fn(ds, n, out / f"{prefix}_{file}", title)
        parts.append(html_figure(f"{prefix}_{file}", caption))
    return parts


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
