"""Ground truth for every sinkstats statistic, computed the obvious way: eager attention, full T x T matrices.

The model is copied, cast to float32 and switched to attn_implementation="eager"; one forward with
output_attentions=True and output_hidden_states=True gives the probabilities and the residual stream; the keys and
values are recorded by wrapping the family's eager_attention_forward, or, for the older families that have none
(Falcon, BLOOM, GPT-Neo, MPT, XGLM), read from the DynamicCache the forward fills. Everything is then reduced in
float64 numpy.
Quadratic in T: for tests only.

`reference_extra` covers the statistics of measure's `measures`: the sublayer outputs by residual algebra (what a
block adds between its input, the residual after attention and its output), the similarities and collapse from
explicit Gram matrices, and the sink-removed passes by editing the eager attention matrix itself.
"""

from __future__ import annotations

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
    blocks = [h.double().cpu().numpy() for h in out.hidden_states[1:n_layers]] + [
        last_block["x"].double().cpu().numpy()
    ]
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


# The module whose input is the residual stream after attention (sequential blocks), by family.
RESIDUAL_AFTER_ATTENTION = {"gemma2": "pre_feedforward_layernorm", "olmo2": "mlp", "gpt2": "ln_2"}


def removed_sink_eager(eager):
    """eager_attention_forward with the attention matrix edited: key 0 set to zero for queries 1..T-1 and those rows
    renormalised (over the keys left and, for GPT-OSS, its learned sink, whose column eager drops), then applied to
    the values again."""

    def edited(module, query, key, value, attention_mask, *args, **kwargs):
        _, w = eager(module, query, key, value, attention_mask, *args, **kwargs)
        w = w.clone()
        # what is left after key 0: summed directly, since 1 - a0 loses digits where a0 is near 1; with a learned
        # sink (not in eager's matrix) its share 1 - sum(w) is left too
        left = w[:, :, 1:, 1:].sum(-1, keepdim=True)
        if hasattr(module, "sinks"):  # the sink's own share, from its logit against all of the row's logits
            keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            logits = torch.matmul(query, keys.transpose(2, 3)) * module.scaling + attention_mask
            sink = module.sinks.view(1, -1, 1, 1).expand(*logits.shape[:3], 1)
            p_sink = torch.exp(sink - torch.logsumexp(torch.cat([logits, sink], -1), -1, keepdim=True))
            left = left + p_sink[:, :, 1:]
        w[:, :, 1:, 0] = 0
        w[:, :, 1:] /= left
        v = value.repeat_interleave(w.shape[1] // value.shape[1], dim=1)
        return torch.matmul(w.to(v.dtype), v).transpose(1, 2).contiguous(), w

    return edited


def eager_blocks(model, input_ids, *, remove_sink=False, compare=None):
    """A float32 eager copy's block inputs, residuals after attention and block outputs, each (L, N, T, D) float64.

    `remove_sink`: with the attention matrix edited as `removed_sink_eager` does; `compare(mine, eager)` is then
    called in each attention call with sinkstats' output with the sink removed, on the same inputs, and eager's."""
    ref = copy.deepcopy(model).eval().float()
    ref.set_attn_implementation("eager")
    modeling = sys.modules[type(ref).__module__]
    blocks = next(
        m for m in ref.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == ref.config.num_hidden_layers
    )
    parallel = getattr(ref.config, "use_parallel_residual", False)
    ins, mids, outs, handles = {}, {}, {}, []
    for i, block in enumerate(blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: ins.update({i: args[0] if args else kwargs["hidden_states"]}),
                with_kwargs=True,
            )
        )
        handles.append(
            block.register_forward_hook(
                lambda m, args, out, i=i: outs.update({i: out[0] if isinstance(out, tuple) else out})
            )
        )
        if not parallel:
            after = getattr(block, RESIDUAL_AFTER_ATTENTION.get(ref.config.model_type, "post_attention_layernorm"))
            handles.append(after.register_forward_pre_hook(lambda m, args, i=i: mids.update({i: args[0]})))
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    patch = removed_sink_eager(modeling.eager_attention_forward) if remove_sink else modeling.eager_attention_forward
    if compare is not None:
        from pipeline import attention

        edited = patch

        def patch(module, query, key, value, attention_mask, *args, **kwargs):
            out, w = edited(module, query, key, value, attention_mask, *args, **kwargs)
            with attention.removing_sink():
                compare(attention.sinkstats_attention(module, query, key, value, None, *args, **kwargs)[0], out)
            return out, w

    try:
        with mock.patch.object(modeling, "eager_attention_forward", patch), torch.no_grad():
            ref(input_ids=ids, use_cache=False)
            if parallel:  # the MLP reads the block input: recompute its output, the rest is attention's
                for i, block in enumerate(blocks):
                    mlp = block.mlp(block.post_attention_layernorm(ins[i]))
                    mids[i] = outs[i] - mlp
    finally:
        for h in handles:
            h.remove()

    def stack(d):
        return np.stack([d[i].double().numpy() for i in range(len(blocks))])

    return stack(ins), stack(mids), stack(outs)


def _mean_offdiagonal_cosine(x):
    """x (..., n, D): mean cosine over the ordered pairs of distinct rows of the last two axes."""
    u = x / np.linalg.norm(x, axis=-1, keepdims=True)
    gram = u @ np.swapaxes(u, -1, -2)
    n = x.shape[-2]
    return (gram.sum((-1, -2)) - np.trace(gram, axis1=-2, axis2=-1)) / (n * (n - 1))


def reference_extra(model, input_ids, measures=("outputs", "similarity", "mixing")) -> dict[str, np.ndarray]:
    from pipeline.measure import perturbed

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    h_in, h_mid, h_out = eager_blocks(model, ids)
    result = {}
    if "outputs" in measures:
        for name, c in (("attn", h_mid - h_in), ("mlp", h_out - h_mid)):
            norms = np.linalg.norm(c, axis=-1)  # (L, N, T)
            result[f"{name}_out_norm_p0"] = norms[:, :, 0].mean(1)
            result[f"{name}_out_norm"] = norms[:, :, 1:].mean((1, 2))
    if "similarity" in measures:
        across_rows = np.swapaxes(h_out, 1, 2)  # (L, T, N, D)
        result["p0_similarity"] = _mean_offdiagonal_cosine(across_rows[:, 0])
        result["rest_similarity"] = _mean_offdiagonal_cosine(across_rows[:, 1:]).mean(-1)
    if "mixing" in measures:
        vocab = model.get_input_embeddings().num_embeddings
        mid = ids.shape[1] // 2
        collapse, sensitivity = [], []
        for remove in (False, True):
            clean = eager_blocks(model, ids, remove_sink=remove)[2]
            other = eager_blocks(model, perturbed(ids, vocab), remove_sink=remove)[2]
            collapse.append(_mean_offdiagonal_cosine(clean[:, :, 1:]).mean(1))
            later, changed = clean[:, :, mid + 1 :], other[:, :, mid + 1 :]
            sensitivity.append((np.linalg.norm(changed - later, axis=-1) / np.linalg.norm(later, axis=-1)).mean((1, 2)))
        result["collapse"] = np.stack(collapse, -1)
        result["sensitivity"] = np.stack(sensitivity, -1)
    return result
