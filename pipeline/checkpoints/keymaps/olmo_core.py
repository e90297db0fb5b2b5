"""OLMo-core's Transformer names -> transformers' Olmo2ForCausalLM (or LlamaForCausalLM for pre-norm blocks).

Follows OLMo-core's own conversion, `olmo_core.nn.hf.convert` (OLMO_CORE_TO_HF_WEIGHT_MAPPINGS, with the
MODEL_TYPE_SPECIFIC_* overrides for Llama-style blocks): renames only; OLMo-core's rotary embedding is half-split
like transformers', so no rows move. In OLMo 2's reordered-norm block the attention and feed-forward norms come
after their sublayers (post_attention_layernorm, post_feedforward_layernorm); in the default pre-norm block they
come before (input_layernorm, post_attention_layernorm).
"""

import os

from . import NO_TOKEN_IDS, Accepts, Rule, check_settings, unmapped

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
        Rule(B + r"attention\.w_(q|k|v)\.(weight|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}"),
        Rule(B + r"attention\.w_out\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
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
    path = os.path.join(saved.ckpt.path, "config.json")
    described = saved.description(path).get("model")
    return hf_config(described, path) if isinstance(described, dict) else None


# ai2-olmo-core 3.0.0's config classes, as `as_config_dict` saves them (fields left at None are omitted; `_CLASS_`
# names the class). Per class: the fields carried, those that do not change the forward pass in float32 (training
# precision, initialisation, dropout, kernels), and the defaults of the rest.
FLAG = Accepts((None, False))
PRECISION = {"_CLASS_", "dtype", "full_precision"}
MODEL = (
    {"d_model", "vocab_size", "n_layers", "block", "lm_head", "tie_word_embeddings", "name"},
    PRECISION | {"init_method", "init_seed", "init_std", "embedding_init_std", "freeze_params"},
    {"embedding_norm": None, "block_pattern": None, "block_overrides": None, "embed_scale": None},
)
BLOCK = (
    {"sequence_mixer", "attention", "layer_norm", "feed_forward", "name"},
    PRECISION | {"dropout"},
    {"feed_forward_moe": None, "attention_residual_alpha": None, "feed_forward_residual_alpha": None},
)
ATTENTION = (
    {"n_heads", "n_kv_heads", "head_dim", "rope", "qk_norm", "name", "type", "bias"},
    PRECISION
    | {"dropout", "use_flash", "backend", "use_recompute_qkv_prep", "mxfp8_save_qkv_for_backward"}
    | {"mxfp8_projections", "mxfp8_qkv_projection", "mxfp8_out_projection"},
    {
        "gate": None,
        "clip_qkv": None,
        "sliding_window": None,
        "use_head_qk_norm": FLAG,
        "scalable_softmax": False,
        "qk_norm_per_head_gains": None,
        "attention_sinks": False,
    },
)
ROPE = ({"theta", "name"}, PRECISION, {"no_global_rope": False, "scaling": None, "partial_rotary_factor": 1.0})
NORM = ({"eps", "name"}, PRECISION, {"elementwise_affine": Accepts((None, True)), "bias": FLAG})
FEED_FORWARD = ({"hidden_size", "name"}, PRECISION, {"bias": FLAG, "activation": "silu"})
LM_HEAD = ({"layer_norm", "name"}, PRECISION | {"loss_implementation"}, {"bias": FLAG})
# the `name` fields, which select a class's variant: the one value each that transformers' models reproduce
NAMES = {"model": "default", "attention": "default", "rope": "default", "norm": "rms", "feed_forward": "default"}


def hf_config(model: dict, where: str = "config.json") -> dict:
    """The transformers config of an OLMo-core TransformerConfig (the `model` section of the config.json that
    OLMo-core's ConfigSaverCallback writes into every checkpoint folder), as olmo_core.nn.hf.config.get_hf_config
    builds it, for the two plain layouts it maps one to one: OLMo 2's reordered-norm block with QK-norm over the
    whole projection (Olmo2ForCausalLM), and the default pre-norm block without QK-norm (LlamaForCausalLM), with
    or without biased attention projections.

    Raises:
        Unmapped: any other setting (mixtures of experts, sliding windows, gates, learned sinks, per-head QK-norm,
        feed-forward biases, ...) at a value other than OLMo-core's default, named with its place in the config.
    """
    block = model.get("block") or {}
    attention = block.get("sequence_mixer") or block.get("attention") or {}
    mixer = "block.sequence_mixer" if "sequence_mixer" in block else "block.attention"
    rope = attention.get("rope") or {}
    feed_forward = block.get("feed_forward") or {}
    norm = block.get("layer_norm") or {}
    head = model.get("lm_head") or {}
    norms = {"block.layer_norm": norm, f"{mixer}.qk_norm": attention.get("qk_norm"), "lm_head.layer_norm": None}
    norms["lm_head.layer_norm"] = head.get("layer_norm")
    parts = [
        ("model", "", model, MODEL),
        ("block", "block.", block, BLOCK),
        ("attention", f"{mixer}.", attention, ATTENTION),
        ("rope", f"{mixer}.rope.", rope, ROPE),
        ("feed_forward", "block.feed_forward.", feed_forward, FEED_FORWARD),
        ("lm_head", "lm_head.", head, LM_HEAD),
        *(("norm", f"{place}.", n, NORM) for place, n in norms.items() if n is not None),
    ]
    for kind, prefix, settings, (carried, inert, defaults) in parts:
        check_settings(
            settings, carried=carried, inert=inert, defaults=defaults, where=where, trainer=TRAINER, prefix=prefix
        )
        if kind in NAMES and settings.get("name", NAMES[kind]) != NAMES[kind]:
            raise unmapped(where, TRAINER, prefix + "name", settings["name"], f"only {NAMES[kind]!r} is mapped")
    if attention.get("type", "attention") != "attention":
        raise unmapped(where, TRAINER, f"{mixer}.type", attention["type"], "only attention is mapped")
    if block.get("name") not in ("reordered_norm", "default"):
        raise unmapped(where, TRAINER, "block.name", block.get("name"), "only reordered_norm and default are mapped")
    reordered = block["name"] == "reordered_norm"
    if (attention.get("qk_norm") is not None) != reordered:
        raise unmapped(
            where,
            TRAINER,
            f"{mixer}.qk_norm",
            attention.get("qk_norm"),
            f"transformers' {'OLMo 2' if reordered else 'Llama'} block {'has' if reordered else 'has no'} QK-norm",
        )
    eps = {place: float(n.get("eps") or 1e-5) for place, n in norms.items() if n is not None}
    if len(set(eps.values())) > 1:
        place, value = next((p, v) for p, v in eps.items() if v != eps["block.layer_norm"])
        raise unmapped(where, TRAINER, f"{place}.eps", value, "transformers' model has one rms_norm_eps for all norms")
    if "hidden_size" not in feed_forward:
        raise KeyError("block.feed_forward.hidden_size")
    n_heads = int(attention["n_heads"])
    return {
        "model_type": "olmo2" if reordered else "llama",
        "hidden_size": int(model["d_model"]),
        "num_hidden_layers": int(model["n_layers"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(attention.get("n_kv_heads") or n_heads),
        **({"head_dim": int(attention["head_dim"])} if attention.get("head_dim") else {}),
        "intermediate_size": int(feed_forward["hidden_size"]),
        "vocab_size": int(model["vocab_size"]),
        "rms_norm_eps": eps["block.layer_norm"],
        "rope_theta": float(rope.get("theta", 500_000)),
        "tie_word_embeddings": bool(model.get("tie_word_embeddings", False)),
        "attention_bias": bool(attention.get("bias")),  # on all four projections, in both
        **NO_TOKEN_IDS,
    }


TRAINER = "OLMo-core"
