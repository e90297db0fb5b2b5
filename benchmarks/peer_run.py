"""One peer's whole run, as its user would write it: `python peer_run.py KIND JOB_JSON RESULT_JSON`.

Run by file path in a fresh interpreter (the peer's own environment where it has one), it imports nothing of
sinktrace, so that the process the benchmark times holds the peer's imports and work only. For every checkpoint
folder it loads the model the way the peer's documentation shows, runs the probe, takes the attention
probabilities the peer returns and reduces them to sink mass and entropy per (layer, head), query 0 excluded,
averaged over queries 1..T-1 and rows (as sinktrace's statistics), for the agreement check.

Kinds:
- `transformers`: `AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")` and a forward
  with `output_attentions=True`;
- `transformer_lens`: `TransformerBridge.boot_transformers(folder, tokenizer=...)` and
  `run_with_cache(tokens, names_filter=...)`, the patterns read from `cache["pattern", layer]`;
- `nnsight`: `LanguageModel(folder, tokenizer=..., attn_implementation="eager")` and a trace saving each
  layer's `self_attn.output[1]`.
TransformerLens and nnsight need a tokenizer even when given token ids; the benchmark's folders hold none, so a
stand-in word-level tokenizer over the model's vocabulary is passed, as a user of such a folder must.
"""

from __future__ import annotations

import json
import os
import sys
import time


def stand_in_tokenizer(vocab_size: int, folder: str):
    """A word-level tokenizer over the model's vocabulary, saved in `folder` and loaded from there (TransformerLens
    loads it again by its path)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    special = {"bos_token": "t0", "unk_token": "t0", "pad_token": "t0"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


class Reduce:
    """Running sums of sink mass and entropy over (layer, head) from (rows, heads, T, T) probabilities."""

    def __init__(self):
        self.sink = self.ent = None
        self.n = 0

    def add(self, layer: int, n_layers: int, p) -> None:
        import torch

        if self.sink is None:
            self.sink = torch.zeros(n_layers, p.shape[1], dtype=torch.float64)
            self.ent = torch.zeros_like(self.sink)
        q = p[:, :, 1:, :].float()
        self.sink[layer] += q[..., 0].sum((0, 2)).double().cpu()
        self.ent[layer] += torch.special.entr(q).sum(-1).sum((0, 2)).double().cpu()

    def result(self, rows: int, seq_len: int):
        denom = rows * (seq_len - 1)
        out = (self.sink / denom).tolist(), (self.ent / denom).tolist()
        self.sink = self.ent = None
        return out


def over_checkpoints(job, ids, load, patterns):
    """Sink mass and entropy per checkpoint: `load(folder)` builds the peer's model, `patterns(model, batch)` returns
    each layer's (rows, heads, T, T) attention probabilities for a batch of token ids."""
    import torch

    sinks, ents = [], []
    for folder in job["checkpoints"]:
        model = load(folder)
        red = Reduce()
        with torch.inference_mode():
            for start in range(0, ids.shape[0], job["batch_size"]):
                layers = patterns(model, ids[start : start + job["batch_size"]])
                for layer, p in enumerate(layers):
                    red.add(layer, len(layers), p)
                del layers
        s, e = red.result(*ids.shape)
        sinks.append(s)
        ents.append(e)
        del model
    return sinks, ents


def run_transformers(job, ids, dtype):
    import transformers
    from transformers import AutoModelForCausalLM

    def load(folder):
        return (
            AutoModelForCausalLM.from_pretrained(
                folder, attn_implementation="eager", dtype=dtype, local_files_only=True
            )
            .to(job["device"])
            .eval()
        )

    def patterns(model, batch):
        return model(input_ids=batch, output_attentions=True, use_cache=False).attentions

    return (*over_checkpoints(job, ids, load, patterns), {"transformers": transformers.__version__})


def run_transformer_lens(job, ids, dtype):
    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = stand_in_tokenizer(job["vocab_size"], job["tokenizer_dir"])

    def load(folder):
        return TransformerBridge.boot_transformers(folder, device=job["device"], dtype=dtype, tokenizer=tokenizer)

    def patterns(bridge, batch):
        _, cache = bridge.run_with_cache(batch, names_filter=lambda name: name.endswith("hook_pattern"))
        return [cache["pattern", layer] for layer in range(bridge.cfg.n_layers)]

    return (
        *over_checkpoints(job, ids, load, patterns),
        {"transformer_lens": version_of("transformer_lens", transformer_lens)},
    )


def run_nnsight(job, ids, dtype):
    import nnsight
    from nnsight import LanguageModel

    tokenizer = stand_in_tokenizer(job["vocab_size"], job["tokenizer_dir"])

    def load(folder):
        return LanguageModel(
            folder,
            tokenizer=tokenizer,
            attn_implementation="eager",
            dtype=dtype,
            device_map=job["device"],
            dispatch=True,
        )

    def patterns(model, batch):
        saved = []  # filled inside the trace: nnsight cannot bind new local names in a function
        with model.trace(batch):
            for layer in model.model.layers:
                saved.append(layer.self_attn.output[1].save())
        return saved

    return (*over_checkpoints(job, ids, load, patterns), {"nnsight": version_of("nnsight", nnsight)})


def version_of(name: str, module) -> str:
    from importlib.metadata import version

    return getattr(module, "__version__", None) or version(name)


RUNS = {"transformers": run_transformers, "transformer_lens": run_transformer_lens, "nnsight": run_nnsight}


def main(kind: str, job_file: str, result_file: str) -> int:
    t0 = time.perf_counter()
    with open(job_file) as f:
        job = json.load(f)
    import numpy as np
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    dtype = getattr(torch, job["dtype"])
    ids = torch.from_numpy(np.load(job["probe"])).to(job["device"])
    sinks, ents, versions = RUNS[kind](job, ids, dtype)
    result = {"sink_mass": sinks, "entropy": ents, "versions": versions, "inside_s": time.perf_counter() - t0}
    tmp = result_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
