"""Single files written by `torch.save`: nanoGPT's `ckpt.pt`, nanochat's `model_<step>.pt`, litgpt's
`lit_model.pth`, lit-gpt's `iter-<N>-ckpt.pth`, on the local disk or behind an fsspec URL.

Read only with `torch.load(weights_only=True)`: torch's restricted unpickler builds tensors and plain containers
and nothing else. A file that needs more is refused with an error naming it, never loaded with
`weights_only=False`, which would run whatever code the file names.

torch.save's format is a zip archive: the pickle (`data.pkl`) and one uncompressed record per storage. `load` unpickles
it onto the meta device (`map_location="meta"`), which reads the zip's directory and the pickle only and gives each
storage the byte offset of its record (`_checkpoint_offset`, torch/serialization.py); `read` then reads the wanted
tensors' storages by byte ranges (`checkpoints.byteranges`) and rebuilds each tensor with its dtype, storage offset,
shape and strides. So a replay reads the model's bytes and never the optimizer state saved beside it, from the local
disk or object storage alike. Files in torch's legacy (pre-zip) format hold no such offsets: they are loaded whole,
from the local disk only.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile

import torch

from ...errors import CheckpointError, describe
from ...locations import file_size, is_url, local_path
from .. import byteranges

# litgpt's step_count counts optimizer steps, as its step-<N> folders do (its iter_num counts micro-batches);
# nanoGPT and lit-gpt write iter_num; others a plain step
STEP_FIELDS = ("step_count", "iter_num", "step")
ZIP_MAGIC = b"PK\x03\x04"
# the zip's directory and the pickle are read through this much read-ahead on object storage: a few requests, none
# running far into the tensors' bytes
_METADATA_BLOCK = 1 << 16


def load(path: str) -> dict:
    """The file's top-level object (a dict). From torch's zip format its tensors are on the meta device, their
    storages carrying where their bytes lie (`read` reads them); the one-element step fields (`STEP_FIELDS`) are
    read at once. A legacy file is loaded whole, from the local disk.

    Raises:
        CheckpointError: the file is missing, damaged, needs full unpickling, holds no dict, was saved big-endian,
            or is a legacy file behind a URL.
    """
    name = os.path.basename(path)
    try:
        with _open(path) as f:
            if f.read(4) != ZIP_MAGIC:
                if is_url(path):
                    raise CheckpointError(
                        path,
                        f"{name} is in torch's legacy (pre-zip) format, which is read from a local disk only: copy "
                        "it, or save it again with a current torch",
                    )
                obj = torch.load(path, map_location="cpu", weights_only=True)
            else:
                _check_byte_order(path, f)
                f.seek(0)
                obj = torch.load(f if is_url(path) else path, map_location="meta", weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(path, f"{name} is missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            path,
            f"{name} needs more than torch.load(weights_only=True) to be read: {refusal(e)}; it "
            "is refused, because full unpickling can run code: save the model's state_dict alone",
        ) from None
    except Exception as e:  # truncated zip, bad magic number, ...
        raise CheckpointError(path, f"{name} is not a readable torch.save file ({describe(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{name} holds a {type(obj).__name__}, not a state dict")
    steps = {f: v for f in STEP_FIELDS if isinstance(v := obj.get(f), torch.Tensor) and v.numel() == 1}
    return {**obj, **read(path, steps, byteranges.ONE_AT_A_TIME)} if steps else obj


def _open(path: str):
    if not is_url(path):
        return open(local_path(path), "rb")
    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    return fs.open(remote, "rb", block_size=_METADATA_BLOCK, cache_type="readahead")


def _check_byte_order(path: str, f) -> None:
    """Refuse a file saved on a big-endian machine: torch's meta-device load cannot swap its bytes (it crashes)."""
    with zipfile.ZipFile(f) as archive:
        recorded = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/byteorder")]
        order = archive.read(recorded[0]).decode(errors="replace") if recorded else "little"
    if order != sys.byteorder:
        raise CheckpointError(
            path,
            f"{os.path.basename(path)} was saved on a {order}-endian machine, and this one is {sys.byteorder}-"
            "endian: load it there and save it again",
        )


def read(path: str, tensors: dict[str, torch.Tensor], plan: byteranges.ReadPlan) -> dict[str, torch.Tensor]:
    """The tensors of `tensors` (from `load`, on the meta device) with their data, each storage's bytes read once
    by byte ranges (tensors that share a storage share it again). Tensors already in memory (a legacy file) are
    returned as they are.

    Raises:
        CheckpointError: the file is shorter than a storage's record, or cannot be read.
    """
    spans, size = {}, None
    for name, t in tensors.items():
        if t.is_meta:
            size = _size(path) if size is None else size
            storage = t.untyped_storage()
            spans[storage._checkpoint_offset] = (
                storage._checkpoint_offset,
                storage._checkpoint_offset + storage.nbytes(),
            )
            if spans[storage._checkpoint_offset][1] > size:  # never ask for more than the file holds
                raise CheckpointError(
                    path,
                    f"{os.path.basename(path)}: tensor {name} declares a storage of {storage.nbytes()} bytes "
                    f"({storage.nbytes() // t.element_size()} elements of {t.dtype}) at byte "
                    f"{storage._checkpoint_offset}, past the end of the file ({size} bytes)",
                )
    try:
        data = byteranges.read_files({path: list(spans.values())}, plan)[path] if spans else []
    except OSError as e:
        raise CheckpointError(path, f"{os.path.basename(path)} cannot be read ({describe(e)})") from None
    storages = {at: _storage(b) for at, b in zip(spans, data)}
    out = {}
    for name, t in tensors.items():
        if t.is_meta:
            storage = storages[t.untyped_storage()._checkpoint_offset]
            try:
                t = torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.shape, t.stride())
            except RuntimeError:  # its strides reach past the storage's bytes
                raise CheckpointError(
                    path,
                    f"{os.path.basename(path)}: tensor {name} (shape {list(t.shape)}, strides {list(t.stride())}, "
                    f"storage offset {t.storage_offset()}) reaches past its storage's {storage.nbytes()} bytes",
                ) from None
        out[name] = t
    return out


def _size(path: str) -> int:
    try:
        return file_size(path)
    except OSError as e:
        raise CheckpointError(path, f"{os.path.basename(path)} cannot be read ({describe(e)})") from None


def _storage(data: bytes) -> torch.UntypedStorage:
    if not data:
        return torch.UntypedStorage(0)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()


def refusal(e: pickle.UnpicklingError) -> str:
    """What torch's restricted unpickler refused, without the advice around it (which suggests full unpickling)."""
    text = str(e)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return f"its pickle names the global {named.group(1)}"
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    said = [p for p in paragraphs if "weights_only" not in p and not p.startswith(("Weights only", "Check the"))]
    return " ".join(said[0].split()) if said else "its pickle holds more than tensors and plain containers"


def model_tensors(obj: dict, path: str) -> dict[str, torch.Tensor]:
    """The model's state dict inside a loaded file: its `model` (or `state_dict`) entry, or the file itself (tensors
    on the meta device, as `load` gives them: `read` reads their data).

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
