"""Hand-built sink cubes whose analysis answers are known by construction.

They mirror the store's layout (docs/data.md, "Layout"): one Dataset per
probe group with dims step, layer, head, kv_head, key, qbin, a `status` per step,
and the probe description in the attrs. Steps that are not "done" hold NaN, as
the store's template does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from pipeline.store.schema import qbin_edges

# 20 checkpoints from 0 to 10000, denser early on, as real runs often save them.
REALISTIC_STEPS = (
    0,
    100,
    250,
    500,
    750,
    1000,
    1500,
    2000,
    2500,
    3000,
    3500,
    4000,
    5000,
    6000,
    7000,
    8000,
    8500,
    9000,
    9500,
    10000,
)


def make_cube(
    sink_mass,
    steps,
    *,
    status=None,
    seq_len: int = 64,
    rows: int = 8,
    first_token: str = "keep",
    name: str | None = None,
    kv_heads: int | None = None,
    keys: int = 4,
    **variables,
) -> xr.Dataset:
    """A cube with the given sink_mass (step, layer, head); the rest follows from it.

    `status` defaults to all "done"; steps that are not done are NaN everywhere.
    Any other variable can be given explicitly in `variables` (numpy arrays in the
    store's dim order, with the step dim first).
    """
    sink = np.asarray(sink_mass, dtype=float)
    n_steps, n_layers, n_heads = sink.shape
    steps = np.asarray(steps, dtype=np.int64)
    assert steps.shape == (n_steps,)
    kv_heads = kv_heads or max(1, n_heads // 2)
    status = np.array(["done"] * n_steps if status is None else list(status))
    edges = qbin_edges(seq_len)
    n_bins = len(edges) - 1

    # Later queries lean a little more on the sink; keeps sink_mass_by_q plausible.
    ramp = np.linspace(0.8, 1.2, n_bins)
    by_q = np.clip(sink[..., None] * ramp, 0.0, 1.0)
    key_mass = np.empty(sink.shape + (keys,))
    key_mass[..., 0] = sink
    for k in range(1, keys):
        key_mass[..., k] = (1.0 - sink) * 0.1 / k
    layer_sink = sink.mean(axis=2)
    resid_norm = np.broadcast_to(10.0 + np.arange(n_layers), layer_sink.shape).copy()
    kv_shape = (n_steps, n_layers, kv_heads)
    kv_sink = np.repeat(layer_sink[..., None], kv_heads, axis=2)

    data = {
        "sink_mass": (("step", "layer", "head"), sink),
        "entropy": (("step", "layer", "head"), np.log(seq_len) * (1.0 - 0.8 * sink)),
        "sink_mass_by_q": (("step", "layer", "head", "qbin"), by_q),
        "key_mass": (("step", "layer", "head", "key"), key_mass),
        "key_norm_p0": (("step", "layer", "kv_head"), 8.0 - 4.0 * kv_sink),
        "value_norm_p0": (("step", "layer", "kv_head"), 2.0 - 1.5 * kv_sink),
        "key_norm": (("step", "layer", "kv_head"), np.full(kv_shape, 8.0)),
        "value_norm": (("step", "layer", "kv_head"), np.full(kv_shape, 2.0)),
        "resid_norm_p0": (("step", "layer"), resid_norm * (1.0 + 30.0 * layer_sink)),
        "resid_norm": (("step", "layer"), resid_norm),
        "resid_max_p0": (("step", "layer"), 5.0 * (1.0 + 200.0 * layer_sink)),
        "resid_median": (("step", "layer"), np.full(layer_sink.shape, 0.5)),
    }
    for var, values in variables.items():
        dims = data[var][0] if var in data else ("step", "layer")
        data[var] = (dims, np.asarray(values, dtype=float))

    not_done = status != "done"
    for var, (dims, values) in data.items():
        values = np.array(values, dtype=float)
        values[not_done] = np.nan
        data[var] = (dims, values)

    errors = ["" if s == "done" else f"step {st}: {s} (hand-built)" for s, st in zip(status, steps)]
    name = name or f"probe_{first_token}"
    return xr.Dataset(
        data,
        coords={
            "step": steps,
            # Coordinates, not data variables, as pipeline/store/cube.py keeps them.
            "status": ("step", np.array(list(status), dtype=np.dtypes.StringDType())),
            "error": ("step", np.array(errors, dtype=np.dtypes.StringDType())),
            "tokens_seen": ("step", steps * 4096.0),
            "layer": np.arange(n_layers),
            "head": np.arange(n_heads),
            "kv_head": np.arange(kv_heads),
            "key": np.arange(keys),
            "qbin": np.arange(n_bins),
            "qbin_start": ("qbin", np.array(edges[:-1])),
            "qbin_stop": ("qbin", np.array(edges[1:])),
        },
        attrs={
            "architecture": "llama",
            "config_fingerprint": "cafe0123",
            "probe_name": name,
            "probe_kind": "random",
            "probe_seed": 0,
            "probe_seq_len": seq_len,
            "probe_rows": rows,
            "probe_first_token": first_token,
        },
    )


def constant_cube(values_by_layer, steps=(0, 10, 20), heads: int = 2, **kwargs) -> xr.Dataset:
    """sink_mass[step, layer, head] = values_by_layer[layer][step] for every head."""
    per_layer = np.asarray(values_by_layer, dtype=float)  # (layer, step)
    sink = np.repeat(per_layer.T[:, :, None], heads, axis=2)
    return make_cube(sink, steps, **kwargs)


def uniform_sink_mass(seq_len: int) -> float:
    """Sink mass of uniform causal attention: mean over t=1..T-1 of 1/(t+1)."""
    return float(np.mean(1.0 / (np.arange(1, seq_len) + 1.0)))


def realistic_cube(
    first_token: str = "keep",
    *,
    steps=REALISTIC_STEPS,
    layers: int = 4,
    heads: int = 6,
    seq_len: int = 64,
    failed=(7000,),
    seed: int = 0,
) -> xr.Dataset:
    """A run whose sink emerges like the literature's: a sigmoid in layer 0 centred
    at step 3000, weaker and later in deeper layers, the last layer never past 0.3.

    With first_token="random" each layer keeps a set share of its sink above the
    uniform-attention level (layer 0 most: the sink is mostly positional there).
    """
    rng = np.random.default_rng(seed)
    steps_arr = np.asarray(steps, dtype=float)
    base = uniform_sink_mass(seq_len)
    centres = 3000.0 + 1500.0 * np.arange(layers)
    peaks = np.linspace(0.85, 0.2, layers)
    widths = 400.0 + 150.0 * np.arange(layers)
    head_gain = np.linspace(1.1, 0.7, heads)
    rise = 1.0 / (1.0 + np.exp(-(steps_arr[:, None] - centres) / widths))  # (step, layer)
    excess = (peaks - base) * rise
    if first_token == "random":
        excess = excess * np.linspace(0.9, 0.2, layers)
    sink = base + excess[:, :, None] * head_gain
    sink = np.clip(sink + rng.normal(0.0, 0.01, sink.shape), 0.0, 1.0)
    status = ["failed" if s in failed else "done" for s in steps]
    return make_cube(sink, steps, status=status, seq_len=seq_len, first_token=first_token, name=f"probe_{first_token}")


def write_store(path, groups: dict[str, xr.Dataset]) -> Path:
    """Write the cubes in the store's layout: Zarr v3, one group per probe (read it with
    pipeline.store.cube.open_sinks, or xr.open_datatree)."""
    tree = xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})
    tree.to_zarr(str(path), mode="w", zarr_format=3, consolidated=False)
    return Path(path)
