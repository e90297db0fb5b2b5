"""The "sinkstats" attention function: the model's own attention output, plus per-layer sink statistics.

Registered in transformers' AttentionInterface (not in AttentionMaskInterface, so `attention_mask` arrives as None
and causality and sliding windows are applied here from the `sliding_window` kwarg). Statistics are recorded only
while a `Collector` is active (see `collecting`); otherwise the function is just an attention implementation.

Two routes, both exact up to float32 rounding, neither builds the T x T matrix:

- fused: a kernel that returns the log-sum-exp (lse) of each query's scores. a[t,k] = exp(s q_t.k_k - lse_t), and
  the entropy H_t = lse_t - s q_t.o^K_t where o^K is the same attention with value := key. Learned sink logits
  (GPT-OSS `s_aux`) enter as one more outcome: lse' = logaddexp(lse, sink).
- blocked: explicit float32 softmax over blocks of query rows against the keys they can see; serves logit
  soft-capping, sliding windows shorter than the sequence, and devices/dtypes without a fused op.

Sink removal (the mixing measures' second pass): every head's attention to key 0 is set to zero and the rest of each
row renormalised. On the fused route this needs no matrix: queries 1..T-1 over keys 1..T-1 are plain causal attention
on the sequence without its first position, one more fused call. (The same as out' = (out - a0 v0) / (1 - a0) with a0
the attention on key 0 and v0 its value, but without that formula's cancellation: where the sink holds a0 = 0.999 the
subtraction loses three digits, 1e-4 off in float32.) On the blocked route the probabilities themselves are edited.
Query 0 sees only key 0 (and a learned sink), so it has nothing to renormalise onto and keeps its attention.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from ..checkpoints.model_config import SINKSTATS

ATTENTION_NAME = SINKSTATS

# Bytes of one float32 score block in the blocked route; the route holds a few such tensors at once.
BLOCK_BYTES = 64 * 2**20

# kwargs that do not change what attention computes (bookkeeping the models forward to every attention call).
_BENIGN_KWARGS = frozenset(
    {
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "num_items_in_batch",
        "cache_position",
        "past_key_values",
        "position_embeddings",
    }
)
# kwargs this module applies itself.
_HANDLED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux", "is_causal", "position_ids"})
_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


class UnsupportedAttention(RuntimeError):
    """The model asks for an attention variant these statistics would get wrong."""


@dataclass
class RowStats:
    """Per-row statistics of one attention call, float32, before summing over rows."""

    a0: torch.Tensor  # (B, Hq, T) attention on key 0
    entropy: torch.Tensor  # (B, Hq, T) nats, over keys (and the learned sink)
    keys: torch.Tensor  # (B, Hq, T, K) attention on keys 0..K-1 (0 where not visible)
    sink: torch.Tensor | None  # (B, Hq, T) probability of the learned sink


@dataclass
class LayerSums:
    """Sums over probe rows, so micro-batches add up. Tensors stay on the model's device."""

    rows: int
    a0: torch.Tensor  # (Hq, T)
    entropy: torch.Tensor  # (Hq, T)
    keys: torch.Tensor  # (Hq, T, K)
    sink: torch.Tensor | None  # (Hq, T)
    key_norm: torch.Tensor  # (Hkv, T)
    value_norm: torch.Tensor  # (Hkv, T)


class Collector:
    """Accumulates LayerSums by layer index while active.

    `record` off: attention calls add nothing (the extra passes of the mixing measures); `remove_sink` on: every
    attention call runs with the sink removed (see the module docstring).
    """

    def __init__(self, key_positions: int = 4):
        self.key_positions = key_positions
        self.layers: dict[int, LayerSums] = {}
        self.record = True
        self.remove_sink = False

    def add(self, layer_idx: int, stats: RowStats, key: torch.Tensor, value: torch.Tensor) -> None:
        def rowsum(x):
            return None if x is None else x.sum(0, dtype=torch.float64)

        new = LayerSums(
            rows=stats.a0.shape[0],
            a0=rowsum(stats.a0),
            entropy=rowsum(stats.entropy),
            keys=rowsum(stats.keys),
            sink=rowsum(stats.sink),
            key_norm=rowsum(torch.linalg.vector_norm(key.float(), dim=-1)),
            value_norm=rowsum(torch.linalg.vector_norm(value.float(), dim=-1)),
        )
        old = self.layers.get(layer_idx)
        if old is None:
            self.layers[layer_idx] = new
            return
        if old.a0.shape != new.a0.shape or (old.sink is None) != (new.sink is None):
            raise RuntimeError(f"layer {layer_idx}: attention calls of different shapes in one measurement")
        for name in ("a0", "entropy", "keys", "key_norm", "value_norm", "sink"):
            if getattr(old, name) is not None:
                getattr(old, name).add_(getattr(new, name))
        old.rows += new.rows


_ACTIVE: contextvars.ContextVar[Collector | None] = contextvars.ContextVar("sinkstats_collector", default=None)


@contextlib.contextmanager
def collecting(key_positions: int = 4):
    """Make a fresh Collector active in this context (thread/task) for the duration of the block."""
    collector = Collector(key_positions)
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def removing_sink():
    """Run "sinkstats" attention with the sink removed in this context (nothing is recorded)."""
    with collecting() as collector:
        collector.record, collector.remove_sink = False, True
        yield


# ---------------------------------------------------------------------------------------------------------------
# Checking what the model asks for


def _refuse(module, what: str):
    config = getattr(module, "config", None)
    arch = getattr(config, "model_type", None) or type(module).__name__
    raise UnsupportedAttention(f"sinkstats attention cannot serve model_type={arch!r}: {what}")


def _read_options(module, query, key, value, attention_mask, dropout, kwargs):
    """Validate the call; return (window or None, softcap or None, sinks or None)."""
    unknown = sorted(k for k in kwargs if k not in _BENIGN_KWARGS | _HANDLED_KWARGS and kwargs[k] is not None)
    if unknown:
        _refuse(module, f"unrecognised attention kwargs {unknown} (they may change the attention; not guessing)")
    if attention_mask is not None:
        _refuse(module, "an explicit attention mask was passed (padding or a custom mask pattern is unsupported)")
    if dropout:
        _refuse(module, f"attention dropout {dropout} is active (put the model in eval mode)")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        _refuse(module, "non-causal attention")
    b, hq, t, _ = query.shape
    if key.shape[2] != t or value.shape[2] != t:
        _refuse(module, f"query length {t} != key length {key.shape[2]} (KV cache or cross-attention)")
    if hq % key.shape[1]:
        _refuse(module, f"{hq} query heads are not a multiple of {key.shape[1]} key/value heads")
    pos = kwargs.get("position_ids")
    if pos is not None and not torch.equal(pos, torch.arange(t, device=pos.device).expand_as(pos)):
        _refuse(module, "position_ids other than 0..T-1 (packed or shifted sequences)")

    window = kwargs.get("sliding_window")
    _check_window_source(module, window, "sliding_window" in kwargs)
    if window is not None and window <= 0:
        _refuse(module, f"sliding_window={window}")
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    if sinks is not None and tuple(sinks.shape) != (hq,):
        _refuse(module, f"learned sink logits of shape {tuple(sinks.shape)}, expected ({hq},)")
    return window, softcap, sinks


def _check_window_source(module, window, passed: bool):
    """Catch models that encode their window (or chunks) only in the mask, which never reaches this function."""
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if getattr(config, "attention_chunk_size", None):
        _refuse(module, "chunked attention (attention_chunk_size) lives in the mask")
    if layer_types is not None and layer_idx is not None and layer_idx < len(layer_types):
        kind = layer_types[layer_idx]
        if kind not in _LAYER_TYPES:
            _refuse(module, f"layer {layer_idx} has layer type {kind!r}")
        if kind == "sliding_attention" and window is None:
            _refuse(module, f"layer {layer_idx} is a sliding-window layer but its window is not passed to attention")
    if window is None and getattr(module, "sliding_window", None):
        _refuse(module, "the attention module has a sliding window that is not passed to attention")
    if layer_types is None and not passed and getattr(config, "sliding_window", None):
        if getattr(config, "use_sliding_window", True):
            _refuse(module, "config.sliding_window is set but the window is not passed to attention")


# ---------------------------------------------------------------------------------------------------------------
# Fused route


def _fused_lse(q, k, v, scale):
    """(out, lse) from a causal kernel that returns the natural-log LSE, or None where no such op is available."""
    t = q.shape[2]
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
            out, lse = res[0], res[1]
        elif q.device.type == "cuda" and q.dtype == torch.float32:
            # The efficient kernel was only checked with repeated kv heads; its LSE is padded to a multiple of 32.
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, True, scale=scale
            )[:2]
            lse = lse[..., :t]
        else:
            return None
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError):  # e.g. a head size the kernel does not take: use the exact route
        return None
    if tuple(lse.shape) != tuple(q.shape[:3]) or tuple(out.shape) != (*q.shape[:3], v.shape[-1]):
        return None  # a private op whose layout changed under us: do not guess
    return out, lse.float()


def _fused_lse_with_keys(q, k, v, scale):
    """(out, o^K, lse) from one kernel call whose value is [v | k]: the output and the key-weighted mean the
    entropy needs share one softmax. Float32 on the CPU only (elsewhere the statistics' float32 copies differ from
    the inputs the output is computed from); None where not served. The CPU kernel wants one head size for q, k and
    v, so q and k are padded with zeros to 2d: their dot products, hence the scores and the lse, do not change."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or v.dtype != torch.float32 or v.shape[-1] != k.shape[-1]:
        return None
    d = v.shape[-1]
    res = _fused_lse(_side_by_side(q, None), _side_by_side(k, None), _side_by_side(v, k), scale)
    if res is None:
        return None
    both, lse = res
    return both[..., :d], both[..., d:], lse


def _side_by_side(x, right):
    """[x | right] along the last dimension, zeros where `right` is None (one allocation, each half written once)."""
    out = x.new_empty(*x.shape[:-1], 2 * x.shape[-1])
    d = x.shape[-1]
    out[..., :d] = x
    if right is None:
        out[..., d:] = 0
    else:
        out[..., d:] = right
    return out


def _grouped(q, hkv):
    """(B, Hq, T, d) -> (B, Hkv, G, T, d): query head h uses kv head h // G (repeat_interleave order)."""
    b, hq, t, d = q.shape
    return q.reshape(b, hkv, hq // hkv, t, d)


def fused_attention(q, k, v, scale, sinks=None, key_positions=4, with_stats=True, remove_sink=False):
    """Causal attention (no window, no soft-cap) through a fused kernel; `remove_sink`: with the sink removed.

    Returns (out (B,Hq,T,dv) in q.dtype, RowStats or None), or None when no fused op serves this device/dtype.
    """
    joint = _fused_lse_with_keys(q, k, v, scale) if with_stats else None
    first = joint[::2] if joint is not None else _fused_lse(q, k, v, scale)
    if first is None:
        return None
    out, lse_native = first
    if sinks is not None:
        out = _with_learned_sink(out, lse_native, sinks)
    if remove_sink and q.shape[2] > 1:
        later = _fused_lse(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], scale)  # keys 1..t for queries t = 1..T-1
        if later is None:
            return None
        rest = later[0] if sinks is None else _with_learned_sink(*later, sinks)
        out = torch.cat([out[:, :, :1], rest], dim=2)
    if not with_stats:
        return out, None

    # Statistics from float32 copies of q and k: exact for half inputs, finite where half scores overflow.
    q32, k32 = q.float(), k.float()
    second = joint[1:] if joint is not None else _fused_lse(q32, k32, k32, scale)
    if second is None:
        return None
    o_key, lse = second
    b, hq, t, _ = q.shape
    kk = min(key_positions, t)
    scores = torch.einsum("bhgtd,bhkd->bhgtk", _grouped(q32, k.shape[1]), k32[:, :, :kk]).reshape(b, hq, t, kk)
    scores = scores * scale
    q_dot_ok = (q32 * o_key).sum(-1) * scale  # s q_t . o^K_t = E_p[score]
    if sinks is None:
        lse_all, p_sink, entropy = lse, None, lse - q_dot_ok
    else:
        s = sinks.float().view(1, -1, 1)
        lse_all = torch.logaddexp(lse, s)
        p_sink = torch.exp(s - lse_all)
        # Keys carry mass exp(lse - lse_all); the sink adds its own -p log p term.
        entropy = lse_all - torch.exp(lse - lse_all) * q_dot_ok - p_sink * s
    keys = torch.exp(scores - lse_all.unsqueeze(-1))
    future = torch.arange(kk, device=q.device)[None, :] > torch.arange(t, device=q.device)[:, None]
    keys = keys.masked_fill(future, 0.0)
    return out, RowStats(a0=keys[..., 0], entropy=entropy, keys=keys, sink=p_sink)


def _with_learned_sink(out, lse, sinks):
    """Rescale a fused output by the share of the keys against a learned sink logit per head (GPT-OSS `s_aux`)."""
    s = sinks.float().view(1, -1, 1)
    return (out.float() * torch.exp(lse - torch.logaddexp(lse, s)).unsqueeze(-1)).to(out.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Blocked route


def blocked_attention(
    q, k, v, scale, window=None, softcap=None, sinks=None, key_positions=4, block_rows=None, remove_sink=False
):
    """Exact attention by blocks of query rows, float32 inside. Returns (out (B,Hq,T,dv) in q.dtype, RowStats).

    `remove_sink`: the probabilities on key 0 of queries 1..T-1 are set to zero and the rows renormalised before
    they weight the values (the statistics then describe that edited attention)."""
    b, hq, t, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    kk = min(key_positions, t)
    qg = _grouped(q, hkv)
    k32, v32 = k.float(), v.float()
    pos = torch.arange(t, device=q.device)
    if block_rows is None:
        # A block of C rows sees at most C + window - 1 keys; capping C at the window bounds that by 2 * window.
        cols = t if window is None else min(t, 2 * window)
        block_rows = max(1, BLOCK_BYTES // (4 * b * hq * cols))
        if window is not None:
            block_rows = min(block_rows, window)
    sink_col = None if sinks is None else sinks.float().view(1, hkv, g, 1, 1)

    out = torch.empty(b, hkv, g, t, dv, device=q.device, dtype=torch.float32)
    a_keys = torch.zeros(b, hkv, g, t, kk, device=q.device, dtype=torch.float32)
    entropy = torch.empty(b, hkv, g, t, device=q.device, dtype=torch.float32)
    p_sink = None if sinks is None else torch.empty(b, hkv, g, t, device=q.device, dtype=torch.float32)
    for t0 in range(0, t, block_rows):
        t1 = min(t, t0 + block_rows)
        lo = 0 if window is None else max(0, t0 - window + 1)  # keys before lo are invisible to the whole block
        rows, cols = pos[t0:t1], pos[lo:t1]
        scores = torch.einsum("bhgcd,bhkd->bhgck", qg[:, :, :, t0:t1].float(), k32[:, :, lo:t1]) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = cols[None, :] <= rows[:, None]
        if window is not None:
            visible &= cols[None, :] > rows[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sink_col is not None:
            scores = torch.cat([scores, sink_col.expand(*scores.shape[:-1], 1)], dim=-1)
        p = torch.softmax(scores, dim=-1)
        if remove_sink and lo == 0:
            later = (rows > 0).view(1, 1, 1, -1, 1)
            # renormalised by what is left summed, not by 1 - p0, which loses digits where p0 is near 1
            kept = torch.cat([torch.zeros_like(p[..., :1]), p[..., 1:]], dim=-1) / p[..., 1:].sum(-1, keepdim=True)
            p = torch.where(later, kept, p)
        entropy[:, :, :, t0:t1] = -torch.special.xlogy(p, p).sum(-1)
        if sink_col is not None:
            p_sink[:, :, :, t0:t1] = p[..., -1]
            p = p[..., :-1]
        out[:, :, :, t0:t1] = torch.einsum("bhgck,bhkd->bhgcd", p, v32[:, :, lo:t1])
        n = min(kk, t1) - lo  # first-K keys inside this block's key range
        if n > 0:
            a_keys[:, :, :, t0:t1, lo : lo + n] = p[..., :n]

    def flat(x):
        return None if x is None else x.reshape(b, hq, *x.shape[3:])

    keys = flat(a_keys)
    stats = RowStats(a0=keys[..., 0], entropy=flat(entropy), keys=keys, sink=flat(p_sink))
    return flat(out).to(q.dtype), stats


# ---------------------------------------------------------------------------------------------------------------
# The registered function


def choose_route(t: int, window, softcap) -> str:
    """'fused' when a causal kernel computes exactly this attention, else 'blocked'."""
    if softcap is not None or (window is not None and window < t):
        return "blocked"
    return "fused"


def sinkstats_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry point: returns (attn_output (B,T,Hq,dv), None) like the model's own attention."""
    window, softcap, sinks = _read_options(module, query, key, value, attention_mask, dropout, kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    collector = _ACTIVE.get()
    with_stats = collector is not None and collector.record
    key_positions = collector.key_positions if with_stats else 1
    remove = collector is not None and collector.remove_sink

    result = None
    if choose_route(query.shape[2], window, softcap) == "fused":
        result = fused_attention(query, key, value, scale, sinks, key_positions, with_stats, remove)
    if result is None:
        result = blocked_attention(query, key, value, scale, window, softcap, sinks, key_positions, remove_sink=remove)
    out, stats = result

    if with_stats:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            _refuse(module, f"attention module {type(module).__name__} has no layer_idx")
        collector.add(layer_idx, stats, key, value)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "sinkstats" with transformers (idempotent; done on import)."""
    AttentionInterface.register(ATTENTION_NAME, sinkstats_attention)


register()
