"""Megatron-Core GPT names (torch_dist checkpoints, Transformer Engine layer specs) -> LlamaForCausalLM.

Follows Megatron-LM's Llama converter (tools/checkpoint/saver_llama_mistral.py / loader_core.py) and
Megatron-Bridge's Llama bridge: the fused `linear_qkv` holds, for each key/value group in turn, that group's
query heads, then its key head, then its value head, and is split back into q_proj, k_proj and v_proj; the fused
`linear_fc1` of a gated MLP holds the gate rows then the up rows; the pre-attention and pre-MLP RMSNorm weights
live inside the fused linears (`layer_norm_weight`). Megatron's rotary embedding is half-split by default
(`rotary_interleaved=False`), like transformers'. torch_dist saves a block's tensors either per layer
(`decoder.layers.<i>.`) or stacked along a leading layer axis (`decoder.layers.`); both are read.
"""

import torch

from . import Rule, split_grouped_qkv

SIGNATURE = r"(?:^|\.)decoder\.(?:layers|final_layernorm)\."


def _fc1(w, config):
    gate, up = torch.chunk(w, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def _stacked(transform=None):
    """The same layout change, for a tensor stacked over layers: applied per layer, returned layer by layer."""

    def per_layer(w, config):
        out = [transform(layer, config) if transform else layer for layer in w.unbind(0)]
        if transform is None:
            return tuple(t.contiguous() for t in out)
        return tuple(t for parts in out for t in parts)

    return per_layer


L = r"decoder\.layers\.(\d+)\."
PER_LAYER = [
    (r"self_attention\.linear_qkv\.layer_norm_weight", ("input_layernorm.weight",), None),
    (
        r"self_attention\.linear_qkv\.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        split_grouped_qkv,
    ),
    (r"self_attention\.linear_proj\.weight", ("self_attn.o_proj.weight",), None),
    (r"mlp\.linear_fc1\.layer_norm_weight", ("post_attention_layernorm.weight",), None),
    (r"mlp\.linear_fc1\.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), _fc1),
    (r"mlp\.linear_fc2\.weight", ("mlp.down_proj.weight",), None),
]
TOP = [
    Rule(r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    Rule(r"decoder\.final_layernorm\.weight", "model.norm.weight"),
    Rule(r"output_layer\.weight", "lm_head.weight"),
]


def rules(config):
    out = list(TOP)
    for pattern, names, transform in PER_LAYER:
        targets = tuple(f"model.layers.{{0}}.{n}" for n in names)
        out.append(Rule(L + pattern, targets if len(targets) > 1 else targets[0], transform))
        stacked = tuple(f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in names)
        out.append(Rule(r"decoder\.layers\." + pattern, stacked, _stacked(transform)))
    return out
