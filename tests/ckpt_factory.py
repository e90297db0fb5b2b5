"""Tiny checkpoints in the layouts trainers write, healthy and broken, for tests.

Every writer returns what a test needs to check the result (the folder, and the saved state dict so loaded
weights can be compared). Files are back-dated by `age` seconds (default an hour) so that discovery's quiet
period is over; `touch` makes a file fresh again.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

HOUR = 3600.0
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=101,
    max_position_embeddings=64,
)
SHARD_SIZE = "30KB"  # splits the float32 tiny model into a few shards


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def tiny_model(*, seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32, **overrides):
    """A random tiny Llama with non-trivial weights (norms too, so a norm left at its init is noticed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tie, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.to(dtype).eval()


def save_checkpoint(
    folder,
    *,
    step: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    sharded: bool = False,
    tie: bool = False,
    trainer_state: bool = True,
    tokens_seen: int | None = None,
    training_files: bool = False,
    age: float = HOUR,
    **config_overrides,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a tiny model as a Hugging Face checkpoint folder; return (folder, state dict as saved).

    Args:
        step: global_step written to trainer_state.json (when trainer_state is True).
        sharded: several `model-0000k-of-0000n.safetensors` plus model.safetensors.index.json.
        tie: tied input/output embeddings (lm_head.weight is then not saved).
        tokens_seen: num_input_tokens_seen in trainer_state.json (0, as the HF Trainer writes it, when None).
        training_files: also write optimizer.pt, scheduler.pt, rng_state.pth and training_args.bin.
        age: back-date every file by this many seconds.
    """
    folder = Path(folder)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = tiny_model(seed=seed, tie=tie, dtype=dtype, **config_overrides)
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE if sharded else "10GB")
    if trainer_state:
        state = {
            "global_step": step if step is not None else 0,
            "num_input_tokens_seen": tokens_seen or 0,
            "log_history": [{"step": step, "loss": 1.0}],
            "epoch": 0.5,
        }
        (folder / "trainer_state.json").write_text(json.dumps(state))
    if training_files:
        write_training_files(folder)
    backdate(folder, age)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_training_files(folder) -> None:
    """The pickles the HF Trainer writes beside the weights (never to be loaded by sinktrace)."""
    folder = Path(folder)
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3}]}, folder / "optimizer.pt")
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    torch.save({"output_dir": "x"}, folder / "training_args.bin")


def save_pickled_only(folder, *, age: float = HOUR) -> Path:
    """config.json plus pytorch_model.bin: the old format sinktrace refuses to unpickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    write_training_files(folder)
    backdate(folder, age)
    return folder


def make_run(root, steps, layout: str = "checkpoint-{}", **kwargs) -> dict[int, Path]:
    """Checkpoints for several steps under `root`, named with `layout` (a format string for the step)."""
    return {s: save_checkpoint(Path(root) / layout.format(s), step=s, seed=s, **kwargs)[0] for s in steps}


# ------------------------------------------------------------------------------------------ damage


def shards(folder) -> list[Path]:
    """The shard files listed in the folder's index, in order."""
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    return [Path(folder) / n for n in sorted(set(index["weight_map"].values()))]


def truncate(path, keep: int | None = None) -> Path:
    """Cut a file short (by default to two thirds), as a crash mid-write leaves it."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: (2 * len(data) // 3) if keep is None else keep])
    return path


def garbage_header(path) -> Path:
    """Overwrite the safetensors JSON header with bytes that are not JSON (the length prefix stays valid)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"\xff" * n
    path.write_bytes(bytes(data))
    return path


def break_config(folder, kind: str) -> Path:
    """kinds: 'missing', 'json' (not JSON), 'no_model_type', 'list' (a JSON array), 'unknown_type'."""
    path = Path(folder) / "config.json"
    if kind == "missing":
        path.unlink()
        return path
    config = json.loads(path.read_text())
    if kind == "json":
        path.write_text(path.read_text()[:40])
    elif kind == "no_model_type":
        del config["model_type"]
        path.write_text(json.dumps(config))
    elif kind == "list":
        path.write_text(json.dumps([config]))
    elif kind == "unknown_type":
        config["model_type"] = "sinktrace_mystery"
        path.write_text(json.dumps(config))
    else:
        raise ValueError(kind)
    return path


def edit_config(folder, **changes) -> Path:
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


def touch(path, seconds_ago: float = 0.0) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def backdate(folder, seconds: float) -> None:
    """Set every file and folder under `folder` (and the folder) to `seconds` ago."""
    t = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (t, t))
    os.utime(folder, (t, t))


REMOTE_CODE_CONFIG = """
from transformers import LlamaConfig


class MysteryConfig(LlamaConfig):
    model_type = "sinktrace_remote"
"""
REMOTE_CODE_MODEL = """
from transformers import LlamaForCausalLM

from .configuration_mystery import MysteryConfig


class MysteryForCausalLM(LlamaForCausalLM):
    config_class = MysteryConfig
"""


def make_remote_code(folder) -> Path:
    """Turn a saved tiny Llama into an architecture only its own shipped code (auto_map) can build."""
    folder = Path(folder)
    (folder / "configuration_mystery.py").write_text(REMOTE_CODE_CONFIG)
    (folder / "modeling_mystery.py").write_text(REMOTE_CODE_MODEL)
    edit_config(
        folder,
        model_type="sinktrace_remote",
        architectures=["MysteryForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_mystery.MysteryConfig",
            "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM",
        },
    )
    return folder
