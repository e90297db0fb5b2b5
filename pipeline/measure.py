"""Run the probe through a model loaded with attn_implementation="sinkstats" and reduce to the per-step statistics.

Names, shapes and averaging conventions are those of the store (see docs / DESIGN.md): every array is float64,
queries are averaged over positions 1..T-1 (query 0 always puts all its weight on key 0).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from pipeline import attention
from pipeline.attention import ATTENTION_NAME, LayerSums

# Families checked statistic by statistic against eager attention in tests/test_families.py.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "olmo2", "gpt_neox", "gpt2", "gemma2",
                   "gpt_oss")


def qbin_edges(seq_len: int) -> np.ndarray:
    """Query-bin edges over positions 1..T-1: [1, 2, 4, ..., T]; bin i holds queries [edges[i], edges[i+1])."""
    if seq_len < 2:
        raise ValueError(f"need at least 2 positions, got {seq_len}")
    edges = [1]
    while edges[-1] * 2 < seq_len:
        edges.append(edges[-1] * 2)
    edges.append(seq_len)
    return np.asarray(edges, dtype=np.int64)


EAGER = "eager"
ROUTES = (ATTENTION_NAME, EAGER)  # the store's `attention_route` attribute


def attention_route(model_or_config) -> str:
    """How a family is measured: "sinkstats" (transformers' AttentionInterface, pipeline/attention.py) where the
    family routes its attention through the interface, else "eager" (output_attentions=True, pipeline/eager.py).
    Takes a model, a transformers config or a config.json dict; the model class is the one AutoModelForCausalLM
    builds (a config it cannot build gets "sinkstats", and loading reports the problem)."""
    cls = _model_class(model_or_config)
    return ATTENTION_NAME if cls is None or getattr(cls, "_supports_attention_backend", False) else EAGER


def _model_class(model_or_config):
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config)
    config = model_or_config
    if isinstance(config, dict):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        except Exception:  # unknown or remote-code model_type, or a config transformers rejects: loading says why
            return None
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def support_problem(model_or_config) -> str | None:
    """Why sinkstats cannot measure this model or config, or None when it can (static checks only:
    `measure` also refuses at run time anything the attention function does not understand). Families on the
    eager route are measured from the model's own attention probabilities, so nothing here concerns them."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = getattr(config, "model_type", "?")
    if not isinstance(model_or_config, nn.Module) and _model_class(config) is None:
        return f"model_type={arch!r} has no causal-LM class in transformers"
    if attention_route(model_or_config) == EAGER:
        return None
    if getattr(config, "attention_chunk_size", None):
        return f"model_type={arch!r} uses chunked attention"
    if getattr(config, "use_bidirectional_attention", False):
        return f"model_type={arch!r} uses bidirectional attention"
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        return f"model_type={arch!r} has layer types {sorted(kinds)}"
    return None


def is_supported(model_or_config) -> bool:
    return support_problem(model_or_config) is None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList of `_no_split_modules` blocks, else the largest list of the right length."""
    n = model.config.get_text_config().num_hidden_layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    names = set(getattr(model, "_no_split_modules", None) or ())
    named = [m for m in lists if all(type(b).__name__ in names for b in m)]
    if named:
        return named[0]
    if lists:
        return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    raise ValueError(f"model_type={model.config.model_type!r}: found no ModuleList of {n} decoder blocks")


class _ResidSums:
    """Forward hooks that reduce each block's output to row sums of the residual-stream statistics."""

    def __init__(self, blocks: nn.ModuleList):
        self.sums: dict[int, torch.Tensor] = {}  # layer -> [rows, norm_p0, norm_rest, max_p0, median]
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, layer):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, (tuple, list)) else output).float()
            rows = torch.full((), h.shape[0], dtype=torch.float64, device=h.device)
            norms = torch.linalg.vector_norm(h, dim=-1)
            stats = torch.stack([
                rows,
                norms[:, 0].sum(dtype=torch.float64),
                norms[:, 1:].mean(1).sum(dtype=torch.float64),
                h[:, 0].abs().amax(-1).sum(dtype=torch.float64),
                _median(h[:, 1:].abs().reshape(h.shape[0], -1)).sum(dtype=torch.float64),
            ])
            self.sums[layer] = stats if layer not in self.sums else self.sums[layer] + stats

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _median(x: torch.Tensor) -> torch.Tensor:
    """Row medians as numpy defines them (mean of the two middle values for an even count)."""
    n = x.shape[-1]
    lo = torch.kthvalue(x, (n + 1) // 2, dim=-1).values
    if n % 2:
        return lo.double()
    # the upper middle value is the smallest value above `lo`, unless `lo` itself repeats past the middle;
    # two elementwise passes instead of a second selection, which cost a quarter of the statistics' CPU time
    above = torch.where(x > lo[..., None], x, torch.inf).amin(-1)
    hi = torch.where((x <= lo[..., None]).sum(-1) > n // 2, lo, above)
    return (lo.double() + hi.double()) / 2


def measure(model, input_ids, *, batch_size: int = 16, key_positions: int = 4, run_rows=None) -> dict[str, np.ndarray]:
    """Sink statistics of `model` on probe rows `input_ids` (rows, T). The model is loaded with the
    attn_implementation of its `attention_route`: "sinkstats", or "eager" for families outside the interface.

    Returns float64 arrays: sink_mass, entropy (layer, head); sink_mass_by_q (layer, head, qbin) over the bins of
    `qbin_edges(T)`; key_mass (layer, head, key_positions); key_norm_p0, value_norm_p0, key_norm, value_norm
    (layer, kv_head); resid_norm_p0, resid_norm, resid_max_p0, resid_median (layer,); and learned_sink_mass
    (layer, head) only for models with learned sink logits. Rows run in micro-batches of `batch_size` (fewer on the
    eager route where its T x T matrices need it), through `run_rows(forward, micro_batches)`: by default each
    micro-batch through the whole model in turn (pipeline/layered.py runs them block by block instead).
    """
    config = model.config.get_text_config()
    arch = config.model_type
    route = attention_route(model)
    if model.config._attn_implementation != route:
        raise ValueError(
            f"model_type={arch!r} was loaded with attn_implementation={model.config._attn_implementation!r}; "
            f"measure needs attn_implementation={route!r}"
        )
    problem = support_problem(model)
    if problem:
        raise attention.UnsupportedAttention(problem)
    # rows move to the device one micro-batch at a time; a tensor already there is brought back (numpy cannot read it)
    ids = input_ids.detach().to("cpu", torch.long) if torch.is_tensor(input_ids) else torch.as_tensor(
        np.asarray(input_ids), dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise ValueError(f"input_ids must be (rows, seq_len), got shape {tuple(ids.shape)}")
    n_rows, seq_len = ids.shape
    if not 1 <= key_positions < seq_len:
        raise ValueError(f"key_positions={key_positions} must be in 1..seq_len-1 (seq_len={seq_len})")
    n_layers = config.num_hidden_layers

    body = model.base_model
    blocks = find_blocks(model)
    resid = _ResidSums(blocks)
    was_training = model.training
    model.eval()
    eager_hooks = None
    try:
        with torch.inference_mode(), attention.collecting(key_positions) as collector:
            # The base model skips the LM head: its (rows, T, vocab) logits would dwarf everything else.
            forward = functools.partial(body, use_cache=False)
            if route == EAGER:
                from .eager import EagerHooks, slice_rows

                eager_hooks = EagerHooks(blocks, collector, arch)
                forward = eager_hooks.forward(body)
                batch_size = slice_rows(model.config, seq_len, batch_size)
            batches = [ids[s : s + batch_size] for s in range(0, n_rows, batch_size)]
            if run_rows is None:
                _whole_model(forward, next(body.parameters()).device, batches)
            else:
                run_rows(forward, batches)
    finally:
        resid.remove()
        if eager_hooks is not None:
            eager_hooks.remove()
        model.train(was_training)

    missing = [i for i in range(n_layers) if i not in collector.layers]
    if missing:
        how = ("returned no attention probabilities with output_attentions=True" if route == EAGER else
               f"never called the {ATTENTION_NAME!r} attention function "
               "(this architecture bypasses transformers' AttentionInterface)")
        raise attention.UnsupportedAttention(f"model_type={arch!r}: layers {missing} {how}")
    wrong = {i: s.rows for i, s in collector.layers.items() if s.rows != n_rows}
    wrong.update({f"block {i}": int(s[0]) for i, s in resid.sums.items() if int(s[0]) != n_rows})
    if wrong or set(collector.layers) != set(range(n_layers)) or set(resid.sums) != set(range(n_layers)):
        raise attention.UnsupportedAttention(
            f"model_type={arch!r}: attention layers {sorted(collector.layers)} saw rows {wrong or n_rows}, "
            f"blocks hooked {sorted(resid.sums)}; expected each of {n_layers} layers once per row"
        )
    layers = [collector.layers[i] for i in range(n_layers)]
    out = _attention_stats(layers, n_rows, seq_len)
    out.update(_resid_stats([resid.sums[i] for i in range(n_layers)]))
    return out


def _whole_model(forward, device, batches):
    for rows in batches:
        forward(input_ids=rows.to(device))


def _attention_stats(layers: list[LayerSums], n_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    def stack(name):
        return np.stack([getattr(s, name).cpu().numpy() for s in layers]) / n_rows  # per-row means

    a0, ent, keys = stack("a0"), stack("entropy"), stack("keys")  # (L,H,T), (L,H,T), (L,H,T,K)
    edges = qbin_edges(seq_len)
    out = {
        "sink_mass": a0[..., 1:].mean(-1),
        "entropy": ent[..., 1:].mean(-1),
        "sink_mass_by_q": np.stack([a0[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:])], axis=-1),
        "key_mass": np.stack([keys[:, :, k + 1 :, k].mean(-1) for k in range(keys.shape[-1])], axis=-1),
    }
    for name in ("key_norm", "value_norm"):
        norms = stack(name)  # (L, Hkv, T)
        out[f"{name}_p0"] = norms[..., 0]
        out[name] = norms[..., 1:].mean(-1)
    has_sink = [s.sink is not None for s in layers]
    if any(has_sink) and not all(has_sink):
        raise attention.UnsupportedAttention(f"learned sinks in some layers only: {has_sink}")
    if all(has_sink):
        out["learned_sink_mass"] = stack("sink")[..., 1:].mean(-1)
    return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}


def _resid_stats(sums: list[torch.Tensor]) -> dict[str, np.ndarray]:
    s = torch.stack(sums).cpu().numpy()
    s = s[:, 1:] / s[:, :1]
    names = ("resid_norm_p0", "resid_norm", "resid_max_p0", "resid_median")
    return {name: np.ascontiguousarray(s[:, i], dtype=np.float64) for i, name in enumerate(names)}
