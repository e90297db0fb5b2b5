"""Ground truth for every statistic, computed the obvious way: eager attention, full T x T matrices.

`reference_stats` (the statistics every replay stores) is the product's own independent reference,
pipeline/replay/reference.py, which `sinktrace check` uses too; it shares no code with the measuring routes.

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

from pipeline.replay.reference import FINAL_NORM_NAMES, STATS, reference_stats

__all__ = ["FINAL_NORM_NAMES", "STATS", "eager_blocks", "reference_extra", "reference_stats", "removed_sink_eager"]

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
        from pipeline.replay import attention

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
    from pipeline.replay.measure import perturbed

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
