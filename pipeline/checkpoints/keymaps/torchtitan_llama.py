"""torchtitan's Llama 3 (and Llama 2) names -> transformers' LlamaForCausalLM.

Follows torchtitan's `Llama3StateDictAdapter.to_hf` (torchtitan/models/llama3/state_dict_adapter.py), which
`scripts/checkpoint_conversion/convert_to_hf.py` runs: renames one to one, and permutes the rows of wq and wk from
the interleaved rotary layout torchtitan (like Meta's reference code) computes with (its ComplexRoPE), pairs
(0,1), (2,3), ..., to the half-split layout transformers' `rotate_half` uses, pairs (0, d/2), (1, d/2+1), ...
This is the same permutation as transformers' convert_llama_weights_to_hf.py `permute`. Names of torchtitan 0.3
(`attention.qkv_linear.wq`, `lm_head`) and of earlier releases (`attention.wq`, `output`) are both read.
"""

from . import Rule, head_dim

SIGNATURE = r"(?:^|\.)layers\.\d+\.attention\.(?:qkv_linear\.)?wq\.weight$"


def to_half_split(w, n_heads: int, d: int):
    rows, cols = w.shape
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def _q(w, config):
    return to_half_split(w, config.num_attention_heads, head_dim(config))


def _k(w, config):
    return to_half_split(w, config.num_key_value_heads, head_dim(config))


L = r"layers\.(\d+)\."
QKV = r"attention\.(?:qkv_linear\.)?"  # torchtitan 0.3 keeps wq, wk, wv under attention.qkv_linear
RULES = [
    Rule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    Rule(L + QKV + r"wq\.weight", "model.layers.{0}.self_attn.q_proj.weight", _q),
    Rule(L + QKV + r"wk\.weight", "model.layers.{0}.self_attn.k_proj.weight", _k),
    Rule(L + QKV + r"wv\.weight", "model.layers.{0}.self_attn.v_proj.weight"),
    Rule(L + r"attention\.wo\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    Rule(L + r"feed_forward\.w1\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    Rule(L + r"feed_forward\.w2\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    Rule(L + r"feed_forward\.w3\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    Rule(L + r"attention_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    Rule(L + r"ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    Rule(r"norm\.weight", "model.norm.weight"),
    Rule(r"(?:output|lm_head)\.weight", "lm_head.weight"),  # `lm_head` from torchtitan 0.3 on
    Rule(r"freqs_cis", ()),  # torchtitan's rotary table, a buffer recomputed by the model
]
