"""nanoGPT's GPT names -> transformers' GPT2LMHeadModel.

Follows nanoGPT's `GPT.from_pretrained` mapping (model.py), run backwards: the names are GPT-2's, and the four
weights GPT-2 keeps in `Conv1D` layout (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are transposed from
nanoGPT's `nn.Linear`. torch.compile's `_orig_mod.` prefix is dropped (nanoGPT saves the compiled model's state
dict); the causal-mask buffer `attn.bias` is no weight. A model trained with `bias=False` has no bias tensors;
GPT-2 always has them, and zeros are its exact equivalent, so they are filled with zeros.
"""

import torch

from . import NO_TOKEN_IDS, Rule, check_settings

SIGNATURE = r"^(?:_orig_mod\.)?transformer\.h\.\d+\.attn\.c_attn\.weight$"
P = r"(?:_orig_mod\.)?"
H = P + r"transformer\.h\.(\d+)\."
TRANSPOSED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _t(w, config):
    return w.t().contiguous()


RULES = [
    Rule(P + r"transformer\.(wte|wpe)\.weight", "transformer.{0}.weight"),
    Rule(P + r"transformer\.ln_f\.(weight|bias)", "transformer.ln_f.{0}"),
    Rule(P + r"lm_head\.weight", "lm_head.weight"),
    Rule(H + r"(ln_1|ln_2)\.(weight|bias)", "transformer.h.{0}.{1}.{2}"),
    Rule(H + r"attn\.bias", ()),
    *[
        Rule(H + name.replace(".", r"\.") + r"\.weight", f"transformer.h.{{0}}.{name}.weight", _t)
        for name in TRANSPOSED
    ],
    *[Rule(H + name.replace(".", r"\.") + r"\.bias", f"transformer.h.{{0}}.{name}.bias") for name in TRANSPOSED],
]


def complete(out: dict, config) -> None:
    """bias=False: GPT-2's biases as zeros (the network nanoGPT computed), only when no bias was saved at all."""
    if any(k.endswith(".bias") for k in out):
        return
    d, ref = config.n_embd, out["transformer.wte.weight"]
    zeros = {"ln_1": d, "ln_2": d, "attn.c_attn": 3 * d, "attn.c_proj": d, "mlp.c_fc": 4 * d, "mlp.c_proj": d}
    for i in range(config.n_layer):
        for name, n in zeros.items():
            out[f"transformer.h.{i}.{name}.bias"] = torch.zeros(n, dtype=ref.dtype)
    out["transformer.ln_f.bias"] = torch.zeros(d, dtype=ref.dtype)


def saved_config(saved) -> dict | None:
    """From the `model_args` nanoGPT's train.py saves in ckpt.pt."""
    if saved.ckpt.format != "torch":
        return None
    args = saved.torch_file().get("model_args")
    return hf_config(args, f"{saved.weight_file} (model_args)") if isinstance(args, dict) else None


# nanoGPT's GPTConfig (model.py): every field but dropout shapes the network; `bias` is carried by `complete`.
CARRIED = frozenset({"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size"})
INERT = frozenset({"dropout"})


def hf_config(model_args: dict, where: str = "model_args") -> dict:
    """GPT2Config from nanoGPT's `model_args` (n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout).
    nanoGPT's MLP uses nn.GELU() (exact erf), hence activation_function="gelu"; its LayerNorm eps is 1e-5.

    Raises:
        Unmapped: a field nanoGPT's GPTConfig does not have (a fork's addition), which may change the network.
    """
    check_settings(model_args, carried=CARRIED, inert=INERT, defaults={}, where=where, trainer="nanoGPT")
    return {
        "model_type": "gpt2",
        "n_layer": int(model_args["n_layer"]),
        "n_head": int(model_args["n_head"]),
        "n_embd": int(model_args["n_embd"]),
        "n_positions": int(model_args["block_size"]),
        "vocab_size": int(model_args["vocab_size"]),
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **NO_TOKEN_IDS,
    }
