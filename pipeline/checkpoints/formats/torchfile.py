"""Single files written by `torch.save`: nanoGPT's `ckpt.pt`, nanochat's `model_<step>.pt`, litgpt's
`lit_model.pth`, lit-gpt's `iter-<N>-ckpt.pth`.

Read only with `torch.load(weights_only=True)`, memory-mapped (the tensors' bytes are read when used, so the
optimizer state saved beside the model is never read): torch's restricted unpickler builds tensors and plain
containers and nothing else. A file that needs more is refused with an error naming it, never loaded with
`weights_only=False`, which would run whatever code the file names.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch

from ...errors import CheckpointError, describe

STEP_FIELDS = ("iter_num", "step")  # nanoGPT and lit-gpt write iter_num; others a plain step


def load(path: str) -> dict:
    """The file's top-level object (a dict), tensors memory-mapped.

    Raises:
        CheckpointError: the file is missing, damaged, needs full unpickling, or holds no dict.
    """
    try:
        mmap = zipfile.is_zipfile(path)  # only torch's zip format can be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(path, f"{os.path.basename(path)} is missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            path,
            f"{os.path.basename(path)} needs more than torch.load(weights_only=True) to be read: {_refusal(e)}; it "
            "is refused, because full unpickling can run code: save the model's state_dict alone",
        ) from None
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(
            path, f"{os.path.basename(path)} is not a readable torch.save file ({describe(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{os.path.basename(path)} holds a {type(obj).__name__}, not a state dict")
    return obj


def _refusal(e: pickle.UnpicklingError) -> str:
    """What torch's restricted unpickler refused, without the advice around it (which suggests full unpickling)."""
    text = str(e)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return f"its pickle names the global {named.group(1)}"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    said = [p for p in paragraphs if "weights_only" not in p and not p.startswith(("Weights only", "Check the"))]
    return " ".join(said[0].split()) if said else "its pickle holds more than tensors and plain containers"


def model_tensors(obj: dict, path: str) -> dict[str, torch.Tensor]:
    """The model's state dict inside a loaded file: its `model` (or `state_dict`) entry, or the file itself.

    Raises:
        CheckpointError: no tensors, or a tensor that declares more elements than its storage holds bytes for (a
            zero stride spreads a few bytes over any shape, and materialising it would take that shape's memory).
    """
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, f"{os.path.basename(path)} holds no model tensors (no 'model' state dict)")
    for name, t in tensors.items():
        held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if t.numel() * t.element_size() > held:
            raise CheckpointError(
                path,
                f"{os.path.basename(path)}: tensor {name} declares {t.numel()} elements of {t.dtype} (shape "
                f"{list(t.shape)}, strides {list(t.stride())}) but its storage holds {held} bytes: not a tensor a "
                "model was saved with",
            )
    return tensors


def step_field(obj: dict) -> tuple[int, str] | None:
    """The training step a file records, and the field it came from."""
    for field in STEP_FIELDS:
        value = obj.get(field)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, int) and not isinstance(value, bool):
            return value, field
    return None
