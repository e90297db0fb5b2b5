"""The independent reference for the statistics: eager attention's own probabilities (`output_attentions=True`),
full T x T matrices, reduced the obvious way in float64 numpy. It shares nothing with either measuring route
(`attention`, `eager`): `sinktrace check` (pipeline/check.py) and the tests compare them
against it.

The model is copied and switched to attn_implementation="eager" (cast to float32 unless `keep_dtype`); one forward
with output_attentions=True and output_hidden_states=True gives the probabilities and the residual stream; the keys
and values are recorded by wrapping the family's eager_attention_forward, or, for the older families that have none
(Falcon, BLOOM, GPT-Neo, MPT, XGLM), read from the DynamicCache the forward fills. Quadratic in T: for small models
and short probes only.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from unittest import mock

import numpy as np
import torch

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "layer_norm")

# The statistics every replay stores (docs/data.md); measure's `measures` and learned sinks add more.
STATS = (
    "sink_mass",
    "entropy",
    "sink_mass_by_q",
    "key_mass",
    "key_norm_p0",
    "value_norm_p0",
    "key_norm",
    "value_norm",
    "resid_norm_p0",
    "resid_norm",
    "resid_max_p0",
    "resid_median",
)


def reference_stats(
    model, input_ids, key_positions: int = 4, *, keep_dtype: bool = False, times=None
) -> dict[str, np.ndarray]:
    """The statistics of `measure` (`measure`; `measures=()`) from eager attention on a copy of `model`.

    keep_dtype: run eager in the model's own dtype and device instead of a float32 copy (how a half-precision route
    is checked: both sides see the same rounding of the weights). times: a `replay.PhaseTimes`, given the eager
    forward's seconds as its "eager" phase."""
    ref = copy.deepcopy(model).eval()
    if not keep_dtype:
        ref = ref.float()
    ref.set_attn_implementation("eager")
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=next(ref.parameters()).device)
    n_layers = ref.config.num_hidden_layers

    # Keys (after rotary) and values as eager attention receives them.
    modeling = sys.modules[type(ref).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    keys, values = {}, {}

    def recording_eager(module, query, key, value, *args, **kwargs):
        keys[module.layer_idx], values[module.layer_idx] = key, value  # copied out after the (timed) forward
        return eager(module, query, key, value, *args, **kwargs)

    # hidden_states[-1] is the final norm's output in most models, so take the last block's output at the norm.
    final_norm = next(getattr(ref.base_model, n) for n in FINAL_NORM_NAMES if hasattr(ref.base_model, n))
    last_block = {}
    hook = final_norm.register_forward_pre_hook(lambda m, args: last_block.update(x=args[0]))
    timed = times.phase("eager") if times is not None else contextlib.nullcontext()
    try:
        if eager is not None:
            with mock.patch.object(modeling, "eager_attention_forward", recording_eager), torch.no_grad(), timed:
                out = ref(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
        else:
            with torch.no_grad(), timed:
                out = ref(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=True)
            for i, layer in enumerate(out.past_key_values.layers):
                keys[i], values[i] = layer.keys, layer.values
    finally:
        hook.remove()
    arch = ref.config.model_type
    if len(out.attentions) != n_layers or len(out.hidden_states) != n_layers + 1:
        raise RuntimeError(
            f"model_type={arch!r}: eager returned {len(out.attentions)} attention matrices and "
            f"{len(out.hidden_states)} hidden states for {n_layers} layers"
        )
    if sorted(keys) != list(range(n_layers)):
        raise RuntimeError(f"model_type={arch!r}: eager attention saw the keys of layers {sorted(keys)} only")
    blocks = [h.double().cpu().numpy() for h in out.hidden_states[1:n_layers]] + [
        last_block["x"].double().cpu().numpy()
    ]
    has_sinks = any(hasattr(m, "sinks") for m in ref.modules())

    stats = [_layer_stats(out.attentions[i].double().cpu().numpy(), has_sinks, key_positions) for i in range(n_layers)]
    result = {name: np.stack([s[name] for s in stats]) for name in stats[0]}
    for name, per_layer in (("key_norm", keys), ("value_norm", values)):
        norms = np.stack(
            [np.linalg.norm(per_layer[i].double().cpu().numpy(), axis=-1) for i in range(n_layers)]
        )  # (L, N, Hkv, T)
        result[f"{name}_p0"] = norms[..., 0].mean(1)
        result[name] = norms[..., 1:].mean((1, 3))
    x = np.stack(blocks)  # (L, N, T, D)
    result["resid_norm_p0"] = np.linalg.norm(x[:, :, 0], axis=-1).mean(1)
    result["resid_norm"] = np.linalg.norm(x[:, :, 1:], axis=-1).mean((1, 2))
    result["resid_max_p0"] = np.abs(x[:, :, 0]).max(-1).mean(1)
    result["resid_median"] = np.median(np.abs(x[:, :, 1:]).reshape(*x.shape[:2], -1), axis=-1).mean(1)
    return result


def _layer_stats(p: np.ndarray, has_sinks: bool, key_positions: int) -> dict[str, np.ndarray]:
    """p: (N, H, T, T) eager probabilities over keys (GPT-OSS's eager drops the learned-sink column)."""
    t = p.shape[-1]
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(-1)
    stats = {}
    if has_sinks:
        sink = 1.0 - p.sum(-1)
        entropy = entropy - np.where(sink > 0, sink * np.log(np.clip(sink, 1e-300, None)), 0.0)
        stats["learned_sink_mass"] = sink[:, :, 1:].mean((0, 2))
    a0 = p[..., 0]  # (N, H, T)
    edges = [e for e in (2**i for i in range(t.bit_length())) if e < t] + [t]
    stats["sink_mass"] = a0[:, :, 1:].mean((0, 2))
    stats["entropy"] = entropy[:, :, 1:].mean((0, 2))
    stats["sink_mass_by_q"] = np.stack([a0[:, :, a:b].mean((0, 2)) for a, b in zip(edges[:-1], edges[1:])], -1)
    stats["key_mass"] = np.stack([p[:, :, k + 1 :, k].mean((0, 2)) for k in range(key_positions)], -1)
    return stats
