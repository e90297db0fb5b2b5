"""Comparisons across steps and probe groups: steps holding the same weights, and the positional index of two
groups that differ only in their first token."""

from __future__ import annotations

from collections.abc import Mapping

import xarray as xr

from .per_run import _per_run, _per_run_pair
from .selection import done, layer_sink_mass, probe_groups, probe_length, uniform_sink_mass

# Probe attrs that must agree for two groups to be a first-token pair. The seed is
# left out: a random first token may be drawn from its own seed.
_SAME_PROBE = ("probe_kind", "probe_seq_len", "probe_rows", "probe_source", "architecture", "config_fingerprint")


@_per_run
def same_weights(ds: xr.Dataset) -> list[list[int]]:
    """Steps that hold identical weights: each group (two steps or more, sorted) shares one ``weights_digest``
    (the digest of the checkpoint's tensors, docs/data.md). Public suites serve one checkpoint under several
    step names; such steps are one measurement, not a flat stretch of training. Done steps with a digest only."""
    if "weights_digest" not in ds.coords:
        return []
    ds = done(ds)
    groups: dict[str, list[int]] = {}
    for step, digest in zip(ds["step"].values.tolist(), ds["weights_digest"].values.tolist()):
        digest = digest.decode() if isinstance(digest, bytes) else str(digest)
        if digest:
            groups.setdefault(digest, []).append(int(step))
    return sorted(sorted(steps) for steps in groups.values() if len(steps) > 1)


def same_weights_lines(ds: xr.Dataset) -> list[str]:
    """One line per group of steps that hold identical weights (:func:`same_weights`)."""
    return [
        f"steps {', '.join(str(s) for s in steps)} hold identical weights (the same weights_digest): "
        "one checkpoint under several step names"
        for steps in same_weights(ds)
    ]


def _probe_differences(a: Mapping, b: Mapping) -> list[str]:
    return [key for key in _SAME_PROBE if (key in a or key in b) and str(a.get(key)) != str(b.get(key))]


def first_token_pair(tree) -> tuple[str, str] | None:
    """Names (keep_or_bos, random) of two groups that differ only in ``probe_first_token``.

    ``tree``: an opened store or a mapping of name -> Dataset (see :func:`probe_groups`).

    "keep" is preferred over "bos" when both exist; ties go by group name. None if
    the store holds no such pair.
    """
    groups = probe_groups(tree)
    policy = {name: ds.attrs.get("probe_first_token") for name, ds in groups.items()}
    randoms = sorted(n for n, p in policy.items() if p == "random")
    fixed = sorted((n for n, p in policy.items() if p in ("keep", "bos")), key=lambda n: (policy[n] != "keep", n))
    for r in randoms:
        for f in fixed:
            if not _probe_differences(groups[f].attrs, groups[r].attrs):
                return f, r
    return None


@_per_run_pair
def positional_index_pair(
    fixed: xr.Dataset,
    random: xr.Dataset,
    *,
    baseline: bool = True,
    min_excess: float = 0.05,
) -> xr.DataArray:
    """How much of each layer's sink survives a random first token (per step and layer).

    Definition, with m_f and m_r the head-mean sink mass per step and layer of the
    probe with a fixed first token (keep or bos) and of the same probe with a
    random first token, and u = :func:`uniform_sink_mass` (T) the level uniform
    attention gives (``baseline=False`` sets u = 0, a plain ratio m_r / m_f):

        index = clip((m_r - u) / (m_f - u), 0, 1),   NaN where m_f - u <= min_excess

    1: the sink survives any first token (tied to position 0 alone); 0: it is gone
    with the token (tied to its identity). NaN where the fixed probe shows no sink
    above the uniform level to attribute. Only steps done in both groups are used.
    u assumes full causal attention; with a sliding window the true floor is lower.
    """
    diffs = _probe_differences(fixed.attrs, random.attrs)
    if diffs:
        raise ValueError(
            "the two probe groups differ in more than the first token: "
            + ", ".join(f"{k}={fixed.attrs.get(k)!r} vs {random.attrs.get(k)!r}" for k in diffs)
        )
    u = uniform_sink_mass(probe_length(fixed)) if baseline else 0.0
    m_f, m_r = xr.align(layer_sink_mass(fixed), layer_sink_mass(random), join="inner")
    excess = m_f - u
    index = ((m_r - u) / excess).clip(0.0, 1.0).where(excess > min_excess)
    return index.rename("positional_index").assign_attrs(
        long_name="positional index",
        units="fraction of the sink kept",
        baseline=u,
        min_excess=min_excess,
        fixed_group=str(fixed.attrs.get("probe_name", "")),
        random_group=str(random.attrs.get("probe_name", "")),
        definition=f"clip((m_random - u) / (m_fixed - u), 0, 1) of head-mean sink_mass, u={u:.4f}; "
        f"NaN where m_fixed - u <= {min_excess}; 1 = tied to position 0, 0 = tied to the token",
    )


def positional_index(
    tree,
    *,
    fixed: str | None = None,
    random: str | None = None,
    baseline: bool = True,
    min_excess: float = 0.05,
) -> xr.DataArray:
    """:func:`positional_index_pair` for two groups of an opened store (see :func:`probe_groups`).

    ``fixed`` (the keep or bos group) and ``random`` name the groups; by default the
    pair is found with :func:`first_token_pair`. Raises ValueError, listing the
    groups, when the store has no such pair.
    """
    groups = probe_groups(tree)
    if fixed is None or random is None:
        pair = first_token_pair(groups)
        if pair is None:
            found = "; ".join(
                f"{n} (first_token={ds.attrs.get('probe_first_token')}, kind={ds.attrs.get('probe_kind')}, "
                f"T={ds.attrs.get('probe_seq_len')})"
                for n, ds in groups.items()
            )
            raise ValueError(
                "the positional index needs two probe groups that differ only in "
                f"probe_first_token (keep or bos vs random); the store has: {found or 'none'}"
            )
        fixed, random = fixed or pair[0], random or pair[1]
    fixed_ds, random_ds = groups[fixed], groups[random]
    result = positional_index_pair(fixed_ds, random_ds, baseline=baseline, min_excess=min_excess)
    return result.assign_attrs(fixed_group=fixed, random_group=random)
