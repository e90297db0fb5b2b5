"""Run the probe through a model loaded with attn_implementation="sinkstats" and reduce to the per-step statistics.

Names, shapes and averaging conventions are those of the store (docs/data.md, "Layout"): every array is float64,
queries are averaged over positions 1..T-1 (query 0 always puts all its weight on key 0).
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
from torch import nn

from ..checkpoints.model_config import EAGER, attention_route, model_class
from ..store.schema import MEASURED, qbin_edges
from . import attention
from .attention import ATTENTION_NAME, LayerSums


def support_problem(model_or_config) -> str | None:
    """Why sinkstats cannot measure this model or config, or None when it can (static checks only:
    `measure` also refuses at run time anything the attention function does not understand). Families on the
    eager route are measured from the model's own attention probabilities, so nothing here concerns them."""
    config = getattr(model_or_config, "config", model_or_config)
    arch = getattr(config, "model_type", "?")
    if not isinstance(model_or_config, nn.Module) and model_class(config) is None:
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


# Where blocks keep their attention and MLP sublayers, by the names the families in transformers use.
_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")


def sublayer_writers(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs a block adds to the residual stream: (attention's, MLP's).

    Blocks that normalise each sublayer's output before adding it (Gemma2, OLMo2: they have a
    `post_feedforward_layernorm`) add the outputs of `post_attention_layernorm` and `post_feedforward_layernorm`;
    the others add the attention and MLP modules' own outputs (in parallel blocks too).
    """
    if isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module):
        return block.post_attention_layernorm, block.post_feedforward_layernorm

    def child(names):
        return next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), nn.Module)), None)

    attn, mlp = child(_ATTENTION_NAMES), child(_MLP_NAMES)
    if attn is None or mlp is None:
        raise attention.UnsupportedAttention(
            f"{type(block).__name__}: found no attention ({'/'.join(_ATTENTION_NAMES)}) or MLP "
            f"({'/'.join(_MLP_NAMES)}) sublayer, so their outputs cannot be measured (drop 'outputs' from "
            "replay.measure)"
        )
    return attn, mlp


def perturbed(ids: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """The probe rows with the token at position T // 2 of each row replaced by another token id, drawn uniformly
    from the rest of the vocabulary (seeded: every checkpoint sees the same replacement)."""
    g = torch.Generator().manual_seed(seed)
    out = ids.clone()
    mid = ids.shape[1] // 2
    out[:, mid] = (ids[:, mid] + torch.randint(1, vocab, (ids.shape[0],), generator=g)) % vocab
    return out


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _unit(h: torch.Tensor) -> torch.Tensor:
    return h / torch.linalg.vector_norm(h, dim=-1, keepdim=True)


def _pairwise_cosine(unit_sum: torch.Tensor, n) -> torch.Tensor:
    """Mean cosine over the n(n-1) ordered pairs of distinct unit vectors, from their sum S: (|S|^2 - n) / (n(n-1))."""
    return (unit_sum.square().sum(-1) - n) / (n * (n - 1))


class _BlockHooks:
    """Forward hooks that reduce each block's output (and its sublayers' outputs) to row sums, per pass.

    `mode` = (sink removed, middle token replaced) says which pass runs: (False, False) is the probe pass itself,
    the others are the mixing measures' extra passes, which only feed `collapse` and `sensitivity`.
    """

    def __init__(self, blocks: nn.ModuleList, measures, seq_len: int):
        self.measures = frozenset(measures)
        self.mode = (False, False)
        self.mid = seq_len // 2
        self.sums: dict[int, torch.Tensor] = {}  # layer -> [rows, norm_p0, norm_rest, max_p0, median]
        self.outputs: dict[int, torch.Tensor] = {}  # layer -> [attn_p0, attn_rest, mlp_p0, mlp_rest]
        self.units: dict[int, list] = {}  # layer -> [sum of unit h at 0 (D,), sums at each of 1..T-1 (T-1, D)]
        self.mixing: dict[int, torch.Tensor] = {}  # layer -> (sink, [collapse, sensitivity]) row sums
        self.clean: dict[int, torch.Tensor] = {}  # layer -> the unperturbed pass's later positions
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]
        if "outputs" in self.measures:
            for i, b in enumerate(blocks):
                for j, module in enumerate(sublayer_writers(b)):
                    self.handles.append(module.register_forward_hook(self._writer_hook(i, j)))

    @staticmethod
    def _add(sums: dict, key, value):
        sums[key] = value if key not in sums else sums[key] + value

    def _writer_hook(self, layer, which):
        def hook(module, args, output):
            if self.mode != (False, False):
                return
            norms = torch.linalg.vector_norm(_first(output).float(), dim=-1)
            stats = torch.zeros(4, dtype=torch.float64, device=norms.device)
            stats[2 * which] = norms[:, 0].sum(dtype=torch.float64)
            stats[2 * which + 1] = norms[:, 1:].mean(1).sum(dtype=torch.float64)
            self._add(self.outputs, layer, stats)

        return hook

    def _hook(self, layer):
        def hook(module, args, output):
            h = _first(output).float()
            removed, replaced = self.mode
            later = h[:, self.mid + 1 :]
            if replaced:
                clean = self.clean.pop(layer)
                change = torch.linalg.vector_norm(later - clean, dim=-1) / torch.linalg.vector_norm(clean, dim=-1)
                self._add_mixing(layer, removed, 1, change.mean(1).sum(dtype=torch.float64))
                return
            if "mixing" in self.measures:
                m = h.shape[1] - 1
                collapse = _pairwise_cosine(_unit(h[:, 1:]).sum(1, dtype=torch.float64), m)
                self._add_mixing(layer, removed, 0, collapse.sum())
                self.clean[layer] = later
            if removed:
                return
            rows = torch.full((), h.shape[0], dtype=torch.float64, device=h.device)
            norms = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
            self._add(
                self.sums,
                layer,
                torch.stack(
                    [
                        rows,
                        norms[:, 0, 0].sum(dtype=torch.float64),
                        norms[:, 1:, 0].mean(1).sum(dtype=torch.float64),
                        h[:, 0].abs().amax(-1).sum(dtype=torch.float64),
                        _median(h[:, 1:].abs().reshape(h.shape[0], -1)).sum(dtype=torch.float64),
                    ]
                ),
            )
            if "similarity" in self.measures:
                # over a micro-batch's rows in float32 (rounding of 1e-7 per unit component), over batches in float64
                u = (h / norms).sum(0).double()  # (T, D)
                if layer in self.units:
                    self.units[layer].add_(u)
                else:
                    self.units[layer] = u

        return hook

    def _add_mixing(self, layer, removed, which, value):
        if layer not in self.mixing:
            self.mixing[layer] = torch.zeros(2, 2, dtype=torch.float64, device=value.device)
        self.mixing[layer][int(removed), which] += value

    def remove(self):
        for h in self.handles:
            h.remove()


# Rows longer than this many samples are bracketed before selecting; shorter ones are selected in full.
_SAMPLE = 4096


def _median(x: torch.Tensor) -> torch.Tensor:
    """Row medians as numpy defines them (mean of the two middle values for an even count), exact.

    A selection over all (T-1) x D values of a row cost a third of the statistics' CPU time, so on the CPU the two
    middle ranks are first bracketed by quantiles of a strided sample and then selected among the few values inside
    the bracket (in numpy, whose comparisons and boolean selection take a quarter of torch's time here); a row whose
    bracket misses them is selected in full. On a GPU rows are selected in full: per-row checks would stall it."""
    n = x.shape[-1]
    ranks = ((n - 1) // 2, n // 2)  # 0-based ranks of the middle values (the same one for an odd count)
    if x.device.type != "cpu" or n <= 4 * _SAMPLE:
        return _middle_mean(x, ranks)
    return torch.from_numpy(np.array([_bracketed_median(row, ranks) for row in x.numpy()]))


def _bracketed_median(row: np.ndarray, ranks) -> float:
    # an odd stride: coprime with the power-of-two widths, so the sample spreads over every feature
    sample = np.sort(row[:: (row.size // _SAMPLE) | 1])
    m = sample.size
    half = 2 * math.isqrt(m) + 1  # the sample rank of the median strays by about sqrt(m) / 2: four of those
    lo, hi = sample[max(0, m // 2 - half)], sample[min(m - 1, m // 2 + half)]
    below = np.count_nonzero(row < lo)
    inside = row[(row >= lo) & (row <= hi)]
    if not below <= ranks[0] <= ranks[1] < below + inside.size:
        inside, below = row, 0
    picked = np.partition(inside, (ranks[0] - below, ranks[1] - below))
    return (float(picked[ranks[0] - below]) + float(picked[ranks[1] - below])) / 2


def _middle_mean(x: torch.Tensor, ranks) -> torch.Tensor:
    """Mean of the values of 0-based ranks (r, r) or (r, r + 1) of each row, by selection."""
    lo = torch.kthvalue(x, ranks[0] + 1, dim=-1).values
    if ranks[0] == ranks[1]:
        return lo.double()
    # the value of rank r + 1 is the smallest value above `lo`, unless `lo` itself repeats past rank r;
    # two elementwise passes instead of a second selection
    above = torch.where(x > lo[..., None], x, torch.inf).amin(-1)
    hi = torch.where((x <= lo[..., None]).sum(-1) > ranks[1], lo, above)
    return (lo.double() + hi.double()) / 2


def measure(
    model, input_ids, *, batch_size: int = 16, key_positions: int = 4, run_rows=None, measures=("outputs", "similarity")
) -> dict[str, np.ndarray]:
    """Sink statistics of `model` on probe rows `input_ids` (rows, T). The model is loaded with the
    attn_implementation of its `attention_route`: "sinkstats", or "eager" for families outside the interface.

    Returns float64 arrays: sink_mass, entropy (layer, head); sink_mass_by_q (layer, head, qbin) over the bins of
    `qbin_edges(T)`; key_mass (layer, head, key_positions); key_norm_p0, value_norm_p0, key_norm, value_norm
    (layer, kv_head); resid_norm_p0, resid_norm, resid_max_p0, resid_median (layer,); and learned_sink_mass
    (layer, head) only for models with learned sink logits. `measures` (groups of `schema.MEASURED`) adds:
    "outputs": attn_out_norm_p0, attn_out_norm, mlp_out_norm_p0, mlp_out_norm (layer,); "similarity":
    p0_similarity, rest_similarity (layer,); "mixing": collapse, sensitivity (layer, sink) with sink = kept, removed,
    from three more passes (the probe with its middle token replaced, see `perturbed`; then both with the sink
    removed). Definitions: docs/data.md.

    Rows run in micro-batches of `batch_size` (fewer on the eager route, where its T x T matrices need
    it), through `run_rows(forward, micro_batches, on_batch)`: by default
    each micro-batch through the whole model in turn (pipeline/replay/layered.py runs them block by block instead);
    `on_batch(i)` is called before micro-batch i runs.
    """
    config = model.config.get_text_config()
    arch = config.model_type
    route = attention_route(model)
    if model.config._attn_implementation != route:
        raise ValueError(
            f"model_type={arch!r} was loaded with attn_implementation={model.config._attn_implementation!r}; "
            f"measure needs attn_implementation={route!r}"
        )
    unknown = sorted(set(measures) - set(MEASURED))
    if unknown:
        raise ValueError(f"unknown measures {unknown}: choose from {list(MEASURED)}")
    problem = support_problem(model)
    if problem:
        raise attention.UnsupportedAttention(problem)
    # rows move to the device one micro-batch at a time; a tensor already there is brought back (numpy cannot read it)
    ids = (
        input_ids.detach().to("cpu", torch.long)
        if torch.is_tensor(input_ids)
        else torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    )
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise ValueError(f"input_ids must be (rows, seq_len), got shape {tuple(ids.shape)}")
    n_rows, seq_len = ids.shape
    if not 1 <= key_positions < seq_len:
        raise ValueError(f"key_positions={key_positions} must be in 1..seq_len-1 (seq_len={seq_len})")
    mixing = "mixing" in measures
    if mixing and seq_len < 4:
        raise ValueError(f"the mixing measures need probes of at least 4 tokens (seq_len={seq_len})")
    if "outputs" in measures and route == EAGER:
        # Families outside the interface lay their blocks out each their own way (BLOOM's and MPT's sublayers add
        # the residual themselves, BioGPT's MLP is two bare linear layers): what each sublayer writes is not
        # measured there rather than measured wrongly
        logging.getLogger("sinktrace").warning("%s: on the eager route the sublayer outputs are not measured", arch)
        measures = [m for m in measures if m != "outputs"]
    if route == EAGER:
        if mixing:
            raise attention.UnsupportedAttention(
                f"model_type={arch!r} is measured on the eager route, which cannot remove the sink: leave mixing "
                "out of replay.measure for it"
            )
        from .eager import slice_rows

        batch_size = slice_rows(model.config, seq_len, batch_size)
    n_layers = config.num_hidden_layers

    body = model.base_model
    blocks = find_blocks(model)
    # (sink removed, middle token replaced) of each micro-batch: the probe pass, then the mixing measures' passes
    batches, modes = [], []
    replaced = perturbed(ids, model.get_input_embeddings().num_embeddings) if mixing else None
    for s in range(0, n_rows, batch_size):
        batches.append(ids[s : s + batch_size])
        modes.append((False, False))
        if mixing:
            batches += [replaced[s : s + batch_size], ids[s : s + batch_size], replaced[s : s + batch_size]]
            modes += [(False, True), (True, False), (True, True)]
    was_training = model.training
    model.eval()
    hooks = _BlockHooks(blocks, measures, seq_len)
    eager_hooks = None
    try:
        with torch.inference_mode(), attention.collecting(key_positions) as collector:

            def on_batch(i):
                hooks.mode = modes[i]
                collector.record = modes[i] == (False, False)
                collector.remove_sink = modes[i][0]

            # The base model skips the LM head: its (rows, T, vocab) logits would dwarf everything else.
            forward = functools.partial(body, use_cache=False)
            if route == EAGER:
                from .eager import EagerHooks

                eager_hooks = EagerHooks(blocks, collector, arch)
                forward = eager_hooks.forward(body)
            if run_rows is None:
                _whole_model(forward, next(body.parameters()).device, batches, on_batch)
            else:
                run_rows(forward, batches, on_batch)
    finally:
        hooks.remove()
        if eager_hooks is not None:
            eager_hooks.remove()
        model.train(was_training)

    missing = [i for i in range(n_layers) if i not in collector.layers]
    if missing:
        how = (
            "returned no attention probabilities with output_attentions=True"
            if route == EAGER
            else f"never called the {ATTENTION_NAME!r} attention function "
            "(this architecture bypasses transformers' AttentionInterface)"
        )
        raise attention.UnsupportedAttention(f"model_type={arch!r}: layers {missing} {how}")
    wrong = {i: s.rows for i, s in collector.layers.items() if s.rows != n_rows}
    wrong.update({f"block {i}": int(s[0]) for i, s in hooks.sums.items() if int(s[0]) != n_rows})
    if wrong or set(collector.layers) != set(range(n_layers)) or set(hooks.sums) != set(range(n_layers)):
        raise attention.UnsupportedAttention(
            f"model_type={arch!r}: attention layers {sorted(collector.layers)} saw rows {wrong or n_rows}, "
            f"blocks hooked {sorted(hooks.sums)}; expected each of {n_layers} layers once per row"
        )
    layers = [collector.layers[i] for i in range(n_layers)]
    out = _attention_stats(layers, n_rows, seq_len)
    out.update(_resid_stats([hooks.sums[i] for i in range(n_layers)]))
    out.update(_extra_stats(hooks, n_layers, n_rows))
    return out


def _whole_model(forward, device, batches, on_batch):
    for i, rows in enumerate(batches):
        on_batch(i)
        forward(input_ids=rows.to(device))


def _extra_stats(hooks: _BlockHooks, n_layers: int, n_rows: int) -> dict[str, np.ndarray]:
    out = {}
    layers = range(n_layers)
    if "outputs" in hooks.measures:
        s = torch.stack([hooks.outputs[i] for i in layers]).cpu().numpy() / n_rows
        for j, name in enumerate(MEASURED["outputs"]):
            out[name] = s[:, j]
    if "similarity" in hooks.measures:
        cos = (
            np.stack([_pairwise_cosine(hooks.units[i], n_rows).cpu().numpy() for i in layers])
            if n_rows > 1
            else (np.full((n_layers, 2), np.nan))
        )  # (L, T); one row has no pairs
        out["p0_similarity"] = cos[:, 0]
        out["rest_similarity"] = cos[:, 1:].mean(-1)
    if "mixing" in hooks.measures:
        s = torch.stack([hooks.mixing[i] for i in layers]).cpu().numpy() / n_rows  # (L, sink, [collapse, sens])
        out["collapse"], out["sensitivity"] = s[..., 0], s[..., 1]
    return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in out.items()}


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
