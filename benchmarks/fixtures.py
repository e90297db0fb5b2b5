"""The benchmark's fixtures: the checkpoints it writes (once, reused by later runs) and the probes it feeds them."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.errors import UsageError
from pipeline.locations import sinktrace_home, write_json_atomic

from . import LOG_PREFIX


def param_count(m) -> int:
    """Parameters of the Llama that `model` (a transformers.LlamaConfig's arguments) describes."""
    h, i, v, n = int(m.hidden_size), int(m.intermediate_size), int(m.vocab_size), int(m.num_hidden_layers)
    d = int(m.head_dim or h // m.num_attention_heads)
    attn = h * d * (2 * m.num_attention_heads + 2 * m.num_key_value_heads)
    per_layer = attn + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if m.tie_word_embeddings else 2) + h


def checkpoint_spec(cfg) -> dict:
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dtype": str(cfg.dtype),
        "seed": int(cfg.checkpoints.seed),
        "every": int(cfg.checkpoints.every),
        "format": 1,
    }


def default_checkpoint_root(cfg) -> Path:
    spec = checkpoint_spec(cfg)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    m = cfg.model
    return sinktrace_home() / "bench" / f"llama-{m.num_hidden_layers}x{m.hidden_size}-{cfg.dtype}-{digest}"


def ensure_checkpoints(cfg, root: Path) -> None:
    """Write the missing `checkpoint-<step>/` folders (config.json + model.safetensors) under `root`.

    Checkpoint 0 holds the model's random initialisation (seeded); checkpoint i scales each tensor of it by its own
    factor 1 + 0.01 sin(7i + j), so every checkpoint holds different bytes. Files are fsynced, so that their page
    cache can be dropped, and written under a `.tmp` name first."""
    import torch

    from pipeline.devices import parse_dtype

    spec = checkpoint_spec(cfg)
    spec_file = root / "bench-spec.json"
    if spec_file.exists():
        found = json.loads(spec_file.read_text())
        if found != spec:
            raise UsageError(
                f"checkpoints.root={root} holds benchmark checkpoints of another model or dtype ({spec_file}); "
                "choose another root, or delete that folder"
            )
    elif root.exists() and any(root.iterdir()):
        raise UsageError(f"checkpoints.root={root} is not empty and holds no bench-spec.json: not a benchmark folder")
    every = int(cfg.checkpoints.every)
    wanted = range(int(cfg.checkpoints.count))
    missing = [i for i in wanted if not (root / f"checkpoint-{i * every}" / "model.safetensors").is_file()]
    if not missing:
        print(f"{LOG_PREFIX} checkpoints: reusing {len(wanted)} under {root}")
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec_file, spec, indent=1, sort_keys=True)

    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"{LOG_PREFIX} checkpoints: writing {len(missing)} under {root}", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(int(cfg.checkpoints.seed))
    config = LlamaConfig(**spec["model"], use_cache=False)
    model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(spec["dtype"]), attn_implementation="sdpa")
    params = list(model.parameters())
    factors = [1.0] * len(params)
    with torch.no_grad():
        for i in missing:
            for j, p in enumerate(params):
                f = 1.0 + 0.01 * math.sin(7 * i + j) if i else 1.0
                p.mul_(f / factors[j])
                factors[j] = f
            folder = root / f"checkpoint-{i * every}"
            tmp = root / f"checkpoint-{i * every}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            write_json_atomic(tmp / "trainer_state.json", {"global_step": i * every}, indent=1, sort_keys=True)
            for f in tmp.iterdir():
                fsync_file(f)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            print(f"{LOG_PREFIX}   {folder.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    del model, params
    gc.collect()


def fsync_file(path: Path) -> None:
    """Flush a written file to storage: dirty pages cannot be dropped from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoints(root: Path, count: int):
    """The first `count` complete checkpoints under `root`, found the way sinktrace finds them."""
    from pipeline.checkpoints.discover import discover

    found = [c for c in discover(str(root), quiet_seconds=0) if c.complete]
    if len(found) < count:
        raise UsageError(f"{root}: discovery found {len(found)} complete checkpoints, the benchmark needs {count}")
    return found[:count]


def make_probes(cfg, model_config: dict, work: Path) -> dict:
    """One probe per length (pipeline.probe.build_probe: seeded random ids, BOS first), saved as .npy for workers."""
    import numpy as np

    from pipeline.probe import build_probe

    probes = {}
    for t in (int(x) for x in cfg.probe.seq_lens):
        rows = int(cfg.probe.rows)
        if cfg.probe.max_tokens:
            rows = max(1, min(rows, int(cfg.probe.max_tokens) // t))
        pcfg = OmegaConf.create(
            {
                "kind": "random",
                "name": None,
                "seq_len": t,
                "rows": rows,
                "seed": int(cfg.probe.seed),
                "first_token": "auto",
            }
        )
        probe = build_probe(pcfg, model_config)
        path = work / f"probe-{t}.npy"
        np.save(path, probe.tokens)
        probes[str(t)] = {
            "path": str(path),
            "name": probe.name,
            "rows": probe.rows,
            "seed": probe.seed,
            "first_token": probe.first_token,
        }
    return probes
