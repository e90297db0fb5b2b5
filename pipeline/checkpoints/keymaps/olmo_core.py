"""OLMo-core's Transformer names -> transformers' Olmo2ForCausalLM (or LlamaForCausalLM for pre-norm blocks).

Follows OLMo-core's own conversion, `olmo_core.nn.hf.convert` (OLMO_CORE_TO_HF_WEIGHT_MAPPINGS, with the
MODEL_TYPE_SPECIFIC_* overrides for Llama-style blocks): renames only; OLMo-core's rotary embedding is half-split
like transformers', so no rows move. In OLMo 2's reordered-norm block the attention and feed-forward norms come
after their sublayers (post_attention_layernorm, post_feedforward_layernorm); in the default pre-norm block they
come before (input_layernorm, post_attention_layernorm).
"""

import os

from . import Rule

SIGNATURE = r"(?:^|\.)blocks\.\d+\.attention\.w_q\.weight$"
B = r"blocks\.(\d+)\."


def rules(config):
    pre_norm = config.model_type in ("llama", "qwen3")
    attention_norm = "input_layernorm" if pre_norm else "post_attention_layernorm"
    feed_forward_norm = "post_attention_layernorm" if pre_norm else "post_feedforward_layernorm"
    return [
        Rule(r"embeddings\.weight", "model.embed_tokens.weight"),
        Rule(r"lm_head\.norm\.weight", "model.norm.weight"),
        Rule(r"lm_head\.w_out\.weight", "lm_head.weight"),
        Rule(B + r"attention\.w_q\.weight", "model.layers.{0}.self_attn.q_proj.weight"),
        Rule(B + r"attention\.w_k\.weight", "model.layers.{0}.self_attn.k_proj.weight"),
        Rule(B + r"attention\.w_v\.weight", "model.layers.{0}.self_attn.v_proj.weight"),
        Rule(B + r"attention\.w_out\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
        Rule(B + r"attention\.q_norm\.weight", "model.layers.{0}.self_attn.q_norm.weight"),
        Rule(B + r"attention\.k_norm\.weight", "model.layers.{0}.self_attn.k_norm.weight"),
        Rule(B + r"feed_forward\.w1\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
        Rule(B + r"feed_forward\.w2\.weight", "model.layers.{0}.mlp.down_proj.weight"),
        Rule(B + r"feed_forward\.w3\.weight", "model.layers.{0}.mlp.up_proj.weight"),
        Rule(B + r"attention_norm\.weight", "model.layers.{0}." + attention_norm + ".weight"),
        Rule(B + r"feed_forward_norm\.weight", "model.layers.{0}." + feed_forward_norm + ".weight"),
    ]


def saved_config(saved) -> dict | None:
    """From the `model` section of the config.json OLMo-core's ConfigSaverCallback writes into the step folder."""
    if saved.ckpt.format != "dcp":
        return None
    described = saved.description(os.path.join(saved.ckpt.path, "config.json")).get("model")
    return hf_config(described) if isinstance(described, dict) else None


def hf_config(model: dict) -> dict | None:
    """The transformers config of an OLMo-core TransformerConfig (the `model` section of the config.json that
    OLMo-core's ConfigSaverCallback writes into every checkpoint folder), as olmo_core.nn.hf.config.get_hf_config
    builds it, for the two plain layouts it maps one to one: OLMo 2's reordered-norm block with QK-norm over the
    whole projection (Olmo2ForCausalLM), and the default pre-norm block without QK-norm (LlamaForCausalLM).
    None for anything else (mixtures of experts, sliding windows, per-head QK-norm, biases, ...)."""
    block = model.get("block") or {}
    attention = block.get("sequence_mixer") or block.get("attention") or {}
    rope = attention.get("rope") or {}
    feed_forward = block.get("feed_forward") or {}
    norm = block.get("layer_norm") or {}
    plain = (
        block.get("name") in ("reordered_norm", "default")
        and not attention.get("bias")
        and attention.get("name", "default") == "default"
        and rope.get("name", "default") == "default"
        and not rope.get("scaling")
        and float(rope.get("partial_rotary_factor", 1.0)) == 1.0
        and not attention.get("use_head_qk_norm")
        and not attention.get("attention_sinks")
        and not attention.get("sliding_window")
        and not attention.get("gate")
        and feed_forward.get("activation", "silu") == "silu"
        and not feed_forward.get("bias")
        and norm.get("name") == "rms"
        and not block.get("feed_forward_moe")
    )
    qk_norm = attention.get("qk_norm") is not None
    reordered = block.get("name") == "reordered_norm"
    if not plain or qk_norm != reordered or "hidden_size" not in feed_forward:
        return None
    n_heads = int(attention["n_heads"])
    return {
        "model_type": "olmo2" if reordered else "llama",
        "hidden_size": int(model["d_model"]),
        "num_hidden_layers": int(model["n_layers"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(attention.get("n_kv_heads") or n_heads),
        "intermediate_size": int(feed_forward["hidden_size"]),
        "vocab_size": int(model["vocab_size"]),
        "rms_norm_eps": float(norm.get("eps", 1e-5)),
        "rope_theta": float(rope.get("theta", 500_000)),
        "tie_word_embeddings": bool(model.get("tie_word_embeddings", False)),
        "attention_bias": False,
    }
