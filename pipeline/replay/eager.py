"""The eager route: sink statistics from the probabilities a model's own eager attention returns
(`output_attentions=True`), for families whose attention transformers does not route through its
AttentionInterface, so the sinkstats function (pipeline/replay/attention.py) never sees it.

Every statistic of the contract comes out, exactly as eager attention computes it:

- attention statistics from each layer's (rows, heads, T, T) probabilities, reduced as soon as the attention module
  returns them (a hook that runs before transformers' own output recorder, then hands on None in their place), so
  one layer's matrices for one slice of probe rows are alive at a time;
- keys (after any rotary embedding) and values from the key/value cache the model passes them to: a cache that
  records them and stores nothing, so the forward sees an empty cache, as without one;
- the residual stream from the same block hooks as the sinkstats route.

The price is the T x T matrix: probe rows run in slices small enough that one layer's matrices stay under
EAGER_BYTES (at least one row).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from .attention import Collector, RowStats, UnsupportedAttention

# Bytes of one layer's float32 attention matrices for one slice of probe rows.
EAGER_BYTES = 256 * 2**20


class _RecordingCache(DynamicCache):
    """Receives each layer's keys and values as the model caches them; keeps them for the attention hook only."""

    def __init__(self, pending: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.pending = pending

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.pending[int(layer_idx)] = (key_states, value_states)
        return key_states, value_states


def slice_rows(config, seq_len: int, batch_size: int) -> int:
    """Probe rows per forward on the eager route: at most `batch_size`, and one layer's matrices under EAGER_BYTES."""
    heads = config.get_text_config().num_attention_heads
    return max(1, min(batch_size, EAGER_BYTES // (4 * heads * seq_len * seq_len)))


class EagerHooks:
    """Hooks on each block's attention modules that turn the returned probabilities into the Collector's sums."""

    def __init__(self, blocks: nn.ModuleList, collector: Collector, arch: str):
        self.collector, self.arch = collector, arch
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            for module in block.modules():
                if module is not block and "att" in type(module).__name__.lower():
                    # prepend: transformers' recorder of output_attentions must find None, not keep every layer
                    self.handles.append(module.register_forward_hook(self._hook(i), prepend=True))

    def _hook(self, layer: int):
        def hook(module, args, output):
            if not (isinstance(output, (tuple, list)) and len(output) > 1 and torch.is_tensor(output[1])):
                return None
            p = output[1]
            if p.ndim != 4 or p.shape[-1] != p.shape[-2]:
                return None
            kv = self.pending.pop(layer, None)
            if kv is None:
                raise UnsupportedAttention(
                    f"model_type={self.arch!r}: {type(module).__name__} of block {layer} returns attention "
                    "probabilities but never hands its keys and values to a key/value cache, where the eager route "
                    f"reads them (cache layers seen: {sorted(self.pending)})"
                )
            key, value = kv
            self.collector.add(layer, row_stats(p, self.collector.key_positions), key, value)
            return type(output)([output[0], None, *output[2:]])

        return hook

    def forward(self, body):
        """`body` as measure calls it (`forward(input_ids=...)`), with output_attentions on and the recording cache."""
        name = "cache" if "cache" in inspect.signature(type(body).forward).parameters else "past_key_values"

        def run(input_ids):
            return body(
                input_ids=input_ids, output_attentions=True, use_cache=True, **{name: _RecordingCache(self.pending)}
            )

        return run

    def remove(self):
        for h in self.handles:
            h.remove()


def row_stats(p: torch.Tensor, key_positions: int) -> RowStats:
    """RowStats of eager probabilities p (B, H, T, T); future keys hold 0 there already."""
    p = p.float()
    kk = min(key_positions, p.shape[-1])
    keys = p[..., :kk]
    return RowStats(a0=keys[..., 0], entropy=-torch.special.xlogy(p, p).sum(-1), keys=keys, sink=None)
