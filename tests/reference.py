"""Ground truth for every sinkstats statistic, computed the obvious way: eager attention, full T x T matrices.

The model is copied, cast to float32 and switched to attn_implementation="eager"; one forward with
output_attentions=True and output_hidden_states=True gives the probabilities and the residual stream; the keys and
values are recorded by wrapping the family's eager_attention_forward, or, for the older families that have none
(Falcon, BLOOM, GPT-Neo, MPT, XGLM), read from the DynamicCache the forward fills. Everything is then reduced in
float64 numpy.
Quadratic in T: for tests only.
"""

from __future__ import annotations

import copy
import sys
from unittest import mock

import numpy as np
import torch

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "layer_norm")


def reference_stats(model, input_ids, key_positions: int = 4, *, keep_dtype: bool = False) -> dict[str, np.ndarray]:
    """keep_dtype: run eager in the model's own dtype and device (the GPU half-precision check) instead of a
    float32 copy."""
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
        keys[module.layer_idx] = key.double().cpu().numpy()
        values[module.layer_idx] = value.double().cpu().numpy()
        return eager(module, query, key, value, *args, **kwargs)

    # hidden_states[-1] is the final norm's output in most models, so take the last block's output at the norm.
    final_norm = next(getattr(ref.base_model, n) for n in FINAL_NORM_NAMES if hasattr(ref.base_model, n))
    last_block = {}
    hook = final_norm.register_forward_pre_hook(lambda m, args: last_block.update(x=args[0]))
    try:
        if eager is not None:
            with mock.patch.object(modeling, "eager_attention_forward", recording_eager), torch.no_grad():
                out = ref(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
        else:
            with torch.no_grad():
                out = ref(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=True)
            for i, layer in enumerate(out.past_key_values.layers):
                keys[i], values[i] = layer.keys.double().cpu().numpy(), layer.values.double().cpu().numpy()
    finally:
        hook.remove()
    assert len(out.attentions) == n_layers and len(out.hidden_states) == n_layers + 1
    assert sorted(keys) == list(range(n_layers)), "eager_attention_forward was not called for every layer"
    blocks = [h.double().cpu().numpy() for h in out.hidden_states[1:n_layers]] + [last_block["x"].double().cpu().numpy()]
    has_sinks = any(hasattr(m, "sinks") for m in ref.modules())

    stats = [_layer_stats(out.attentions[i].double().cpu().numpy(), has_sinks, key_positions) for i in range(n_layers)]
    result = {name: np.stack([s[name] for s in stats]) for name in stats[0]}
    for name, per_layer in (("key_norm", keys), ("value_norm", values)):
        norms = np.stack([np.linalg.norm(per_layer[i], axis=-1) for i in range(n_layers)])  # (L, N, Hkv, T)
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
