"""nanochat's GPT names -> transformers' NanoChatForCausalLM.

Follows transformers' models/nanochat/convert_nanochat_checkpoints.py: renames only (nanochat's weightless RMSNorms
and its rotary sign convention are built into transformers' NanoChat model). The architecture comes from the
`model_config` of nanochat's `meta_<step>.json` beside the weights.
"""

import os
import re

from . import NO_TOKEN_IDS, Rule, check_settings

SIGNATURE = r"^(?:_orig_mod\.)?transformer\.h\.\d+\.attn\.c_q\.weight$"
P = r"(?:_orig_mod\.)?"
H = P + r"transformer\.h\.(\d+)\."
RULES = [
    Rule(P + r"transformer\.wte\.weight", "model.embed_tokens.weight"),
    Rule(P + r"lm_head\.weight", "lm_head.weight"),
    Rule(H + r"attn\.c_q\.weight", "model.layers.{0}.self_attn.q_proj.weight"),
    Rule(H + r"attn\.c_k\.weight", "model.layers.{0}.self_attn.k_proj.weight"),
    Rule(H + r"attn\.c_v\.weight", "model.layers.{0}.self_attn.v_proj.weight"),
    Rule(H + r"attn\.c_proj\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    Rule(H + r"mlp\.c_fc\.weight", "model.layers.{0}.mlp.fc1.weight"),
    Rule(H + r"mlp\.c_proj\.weight", "model.layers.{0}.mlp.fc2.weight"),
]


def saved_config(saved) -> dict | None:
    """From the `model_config` in the meta_<step>.json nanochat saves beside model_<step>.pt."""
    if saved.ckpt.format != "torch":
        return None
    m = re.search(r"model_(\d+)\.pt$", saved.weight_file)
    meta = os.path.join(os.path.dirname(saved.weight_file), f"meta_{m.group(1)}.json") if m else ""
    described = saved.description(meta).get("model_config")
    return hf_config(described, meta) if isinstance(described, dict) else None


# nanochat's GPTConfig (nanochat/gpt.py), the fields transformers' converter reads; a field a later nanochat added
# (sliding-window patterns and the like) is not known to map, and refuses the run.
CARRIED = frozenset({"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"})


def hf_config(model_config: dict, where: str = "meta.json") -> dict:
    """NanoChatConfig from meta_<step>.json's model_config (sequence_len, vocab_size, n_layer, n_head, n_kv_head,
    n_embd), as convert_nanochat_checkpoints.py builds it: MLP width 4 x n_embd, logits soft-capped at 15.

    Raises:
        Unmapped: a field of model_config that the converter does not carry.
    """
    check_settings(model_config, carried=CARRIED, inert=(), defaults={}, where=where, trainer="nanochat")
    n_embd, n_head = int(model_config["n_embd"]), int(model_config["n_head"])
    return {
        "model_type": "nanochat",
        "hidden_size": n_embd,
        "num_hidden_layers": int(model_config["n_layer"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(model_config.get("n_kv_head", n_head)),
        "intermediate_size": 4 * n_embd,
        "vocab_size": int(model_config["vocab_size"]),
        "max_position_embeddings": int(model_config["sequence_len"]),
        "tie_word_embeddings": False,
        **NO_TOKEN_IDS,
    }
