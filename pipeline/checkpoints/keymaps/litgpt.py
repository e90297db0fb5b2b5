"""litgpt's (and lit-gpt's, as in TinyLlama's code) Llama-style names -> transformers' LlamaForCausalLM.

Follows litgpt's scripts/convert_lit_checkpoint.py (`copy_weights_llama`): renames, and splits the fused
attention weight: litgpt's `attn.qkv` holds all query heads, then all key heads, then all value heads; lit-gpt's
older `attn.attn` holds, per key/value group, that group's query heads, its key head and its value head (the
`qkv_split` of that version). litgpt's rotary embedding is half-split like transformers', so no rows move.
Only Llama-style litgpt models (RMSNorm, LLaMAMLP, no bias, full rotary, sequential residual) are mapped.
"""

import os

from . import Rule, split_grouped_qkv, split_rows

SIGNATURE = r"^(?:_orig_mod\.)?transformer\.h\.\d+\.attn\.(?:qkv|attn)\.weight$"
P = r"(?:_orig_mod\.)?"
H = P + r"transformer\.h\.(\d+)\."
QKV = (
    "model.layers.{0}.self_attn.q_proj.weight",
    "model.layers.{0}.self_attn.k_proj.weight",
    "model.layers.{0}.self_attn.v_proj.weight",
)


RULES = [
    Rule(P + r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    Rule(P + r"transformer\.ln_f\.weight", "model.norm.weight"),
    Rule(P + r"lm_head\.weight", "lm_head.weight"),
    Rule(H + r"norm_1\.weight", "model.layers.{0}.input_layernorm.weight"),
    Rule(H + r"norm_2\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    Rule(
        H + r"attn\.qkv\.weight",
        QKV,
        split_rows("num_attention_heads*head_dim", "num_key_value_heads*head_dim", "num_key_value_heads*head_dim"),
    ),
    Rule(H + r"attn\.attn\.weight", QKV, split_grouped_qkv),
    Rule(H + r"attn\.proj\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    Rule(H + r"mlp\.fc_1\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    Rule(H + r"mlp\.fc_2\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    Rule(H + r"mlp\.proj\.weight", "model.layers.{0}.mlp.down_proj.weight"),
]


def saved_config(saved) -> dict | None:
    """From the model_config.yaml litgpt saves beside the weights."""
    described = saved.description(os.path.join(os.path.dirname(saved.weight_file), "model_config.yaml"))
    return hf_config(described) if described else None


def hf_config(cfg: dict) -> dict | None:
    """LlamaConfig from litgpt's model_config.yaml, or None when the model is not Llama-style."""
    llama_like = (
        cfg.get("norm_class_name") == "RMSNorm"
        and cfg.get("mlp_class_name") == "LLaMAMLP"
        and not cfg.get("bias", False)
        and float(cfg.get("rotary_percentage", 1.0)) == 1.0
        and not cfg.get("parallel_residual", False)
    )
    if not llama_like:
        return None
    n_head = int(cfg["n_head"])
    n_embd = int(cfg["n_embd"])
    return {
        "model_type": "llama",
        "hidden_size": n_embd,
        "num_hidden_layers": int(cfg["n_layer"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(cfg.get("n_query_groups") or n_head),
        "head_dim": int(cfg.get("head_size") or n_embd // n_head),
        "intermediate_size": int(cfg["intermediate_size"]),
        "vocab_size": int(cfg.get("padded_vocab_size") or cfg["vocab_size"]),
        "max_position_embeddings": int(cfg.get("block_size", 4096)),
        "rms_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "rope_theta": float(cfg.get("rope_base", 10000)),
        "tie_word_embeddings": False,
    }
