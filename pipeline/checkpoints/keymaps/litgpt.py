"""litgpt's (and lit-gpt's, as in TinyLlama's code) Llama-style names -> transformers' Llama (Qwen 2, Qwen 3).

Follows litgpt's scripts/convert_lit_checkpoint.py (`copy_weights_llama`): renames, and splits the fused
attention weight: litgpt's `attn.qkv` holds all query heads, then all key heads, then all value heads; lit-gpt's
older `attn.attn` holds, per key/value group, that group's query heads, its key head and its value head (the
`qkv_split` of that version). litgpt's rotary embedding is half-split like transformers', so no rows move.
Only Llama-style litgpt models (RMSNorm, LLaMAMLP, full rotary, sequential residual) are mapped; every other
setting of model_config.yaml is carried into the LlamaConfig or, at a value other than litgpt's default, refuses
the run by name.
"""

import os

from . import NO_TOKEN_IDS, Rule, check_settings, split_grouped_qkv, split_rows, unmapped

SIGNATURE = r"^(?:_orig_mod\.)?transformer\.h\.\d+\.attn\.(?:qkv|attn)\.weight$"
P = r"(?:_orig_mod\.)?"
H = P + r"transformer\.h\.(\d+)\."
QKV = (
    "model.layers.{0}.self_attn.q_proj.weight",
    "model.layers.{0}.self_attn.k_proj.weight",
    "model.layers.{0}.self_attn.v_proj.weight",
)
QKV_OF = tuple(t.replace(".weight", ".{1}") for t in QKV)
QKV_ROWS = ("num_attention_heads*head_dim", "num_key_value_heads*head_dim", "num_key_value_heads*head_dim")
LLAMA3_ADJUSTMENTS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}

RULES = [
    Rule(P + r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    Rule(P + r"transformer\.ln_f\.weight", "model.norm.weight"),
    Rule(P + r"lm_head\.weight", "lm_head.weight"),
    Rule(H + r"norm_1\.weight", "model.layers.{0}.input_layernorm.weight"),
    Rule(H + r"norm_2\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    Rule(H + r"attn\.qkv\.(weight|bias)", QKV_OF, split_rows(*QKV_ROWS)),
    Rule(H + r"attn\.attn\.weight", QKV, split_grouped_qkv),
    Rule(H + r"attn\.proj\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
    Rule(H + r"attn\.norm_(q|k)\.weight", "model.layers.{0}.self_attn.{1}_norm.weight"),
    Rule(H + r"mlp\.fc_1\.(weight|bias)", "model.layers.{0}.mlp.gate_proj.{1}"),
    Rule(H + r"mlp\.fc_2\.(weight|bias)", "model.layers.{0}.mlp.up_proj.{1}"),
    Rule(H + r"mlp\.proj\.(weight|bias)", "model.layers.{0}.mlp.down_proj.{1}"),
]


# litgpt 0.5.13's `litgpt.config.Config`: model_config.yaml holds every field (`save_config` dumps `asdict`).
TRAINER = "litgpt"
CARRIED = frozenset(
    {
        "block_size",
        "n_layer",
        "n_embd",
        "n_head",
        "head_size",
        "n_query_groups",
        "intermediate_size",
        "vocab_size",
        "padded_vocab_size",
        "norm_eps",
        "rope_base",
        "rope_adjustments",
        "rope_condense_ratio",
        "bias",
        "attn_bias",
        "norm_qk",
        "norm_qk_type",
        # required to hold a Llama's value (checked in hf_config), not their class defaults, which are Pythia's
        "norm_class_name",
        "mlp_class_name",
        "parallel_residual",
        "rotary_percentage",
    }
)
# gelu_approximate shapes GptNeoxMLP's and GemmaMLP's GELU only, never LLaMAMLP's SiLU
INERT = frozenset({"name", "hf_config", "padding_multiple", "gelu_approximate"})
DEFAULTS = {
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "shared_attention_norm": False,
    "attention_scores_scalar": None,
    "sliding_window_size": None,
    "sliding_window_indices": None,
    "attention_logit_softcapping": None,
    "rope_interleave": False,
    "moe_intermediate_size": None,
    "n_expert": 0,
    "n_shared_expert": None,
    "n_expert_groups": None,
    "n_topk_groups": None,
    "n_topk_scores_per_group": None,
    "n_expert_per_token": 0,
    "first_k_dense_replace": None,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
    "scale_embeddings": False,
    "lm_head_bias": False,
    "final_logit_softcapping": None,
    "norm_1": True,
    "norm_2": True,
    "latent_attention": None,
    "rope_local_base_freq": None,
    "rope_indices": None,
}
LLAMA = {"norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "parallel_residual": False}


def saved_config(saved) -> dict | None:
    """From the model_config.yaml litgpt saves beside the weights."""
    path = os.path.join(os.path.dirname(saved.weight_file), "model_config.yaml")
    described = saved.description(path)
    return hf_config(described, path) if described else None


def hf_config(cfg: dict, where: str = "model_config.yaml") -> dict:
    """The transformers config (Llama, Qwen 2 or Qwen 3: `family`) of litgpt's model_config.yaml, as litgpt's
    convert_lit_checkpoint.py pairs them.

    Raises:
        Unmapped: a setting of `cfg` (read from `where`) that the transformers config cannot express.
    """
    check_settings(cfg, carried=CARRIED, inert=INERT, defaults=DEFAULTS, where=where, trainer=TRAINER)
    for field, value in LLAMA.items():
        if field in cfg and cfg[field] != value:
            raise unmapped(where, TRAINER, field, cfg[field], f"only a Llama-style model, {field}={value!r}, is mapped")
    if float(cfg.get("rotary_percentage", 1.0)) != 1.0:
        raise unmapped(
            where, TRAINER, "rotary_percentage", cfg["rotary_percentage"], "transformers' Llama rotates every dimension"
        )
    n_head = int(cfg["n_head"])
    n_embd = int(cfg["n_embd"])
    return {
        **family(cfg, where),
        "hidden_size": n_embd,
        "num_hidden_layers": int(cfg["n_layer"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(cfg.get("n_query_groups") or n_head),
        "head_dim": int(cfg.get("head_size") or n_embd // n_head),
        "intermediate_size": int(cfg["intermediate_size"]),
        "vocab_size": int(cfg.get("padded_vocab_size") or cfg["vocab_size"]),
        "max_position_embeddings": int(cfg.get("block_size", 4096)),
        "rms_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "rope_parameters": rope_parameters(cfg, where),
        "tie_word_embeddings": False,
        **NO_TOKEN_IDS,
    }


def family(cfg: dict, where: str) -> dict:
    """The transformers family whose block is litgpt's Llama-style block with its biases and QK-norm: Llama
    (`bias`: a bias on every linear layer but the head, as Llama's two flags put them), Qwen 2 (`attn_bias` alone:
    biased query, key and value projections only) or Qwen 3 (`norm_qk`: an RMSNorm over each head's queries and
    keys before the rotation)."""
    bias, attn_bias, norm_qk = (bool(cfg.get(k, False)) for k in ("bias", "attn_bias", "norm_qk"))
    if norm_qk and cfg.get("norm_qk_type", "default") != "default":  # without norm_qk, the type selects nothing
        raise unmapped(where, TRAINER, "norm_qk_type", cfg["norm_qk_type"], "only a per-head QK-norm is mapped")
    if norm_qk and (bias or attn_bias):
        field = "bias" if bias else "attn_bias"
        raise unmapped(where, TRAINER, field, True, "transformers' Qwen 3 block biases the output projection alike")
    if norm_qk:
        return {"model_type": "qwen3", "attention_bias": False}
    if attn_bias and not bias:
        return {"model_type": "qwen2"}
    return {"model_type": "llama", "attention_bias": bias, "mlp_bias": bias}


def rope_parameters(cfg: dict, where: str) -> dict:
    """transformers' rope_parameters for litgpt's rotary settings (litgpt.model.build_rope_cache): plain RoPE;
    `rope_adjustments` with low/high frequency factors (Llama 3.x) is transformers' `llama3`; with a factor alone,
    `linear`; `rope_condense_ratio` divides the positions, which is `linear` scaling by that ratio."""
    theta = float(cfg.get("rope_base", 10000))
    adjust = cfg.get("rope_adjustments")
    condense = cfg.get("rope_condense_ratio", 1)
    if adjust and condense not in (1, 1.0, None):
        raise unmapped(where, TRAINER, "rope_condense_ratio", condense, "with rope_adjustments as well")
    if not adjust:
        if condense in (1, 1.0, None):
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "linear", "factor": float(condense), "rope_theta": theta}
    if not isinstance(adjust, dict) or set(adjust) - {"factor"} and set(adjust) != LLAMA3_ADJUSTMENTS:
        raise unmapped(where, TRAINER, "rope_adjustments", adjust, "only Llama 3's and a plain factor are mapped")
    if set(adjust) == {"factor"}:
        return {"rope_type": "linear", "factor": float(adjust["factor"]), "rope_theta": theta}
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(adjust["factor"]),
        "low_freq_factor": float(adjust["low_freq_factor"]),
        "high_freq_factor": float(adjust["high_freq_factor"]),
        "original_max_position_embeddings": int(adjust["original_max_seq_len"]),
    }
