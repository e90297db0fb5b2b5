"""PyTorch Distributed Checkpoints (DCP): a folder of `*.distcp` data files and a `.metadata` index.

Read in one process, without a process group, by torch's own reader (`torch.distributed.checkpoint.load` with
`no_dist=True` and a `FileSystemReader`), asking only for the model's tensors: DCP reads an entry only when the
state dict handed to it names it, so optimizer state is never read and a checkpoint costs its model's bytes.

`.metadata` is a pickle, and torch's reader unpickles it with the standard unpickler, which can run any code the
file names. Here it is unpickled by an allow-list unpickler instead: only the dataclasses DCP's metadata is made of
(torch.distributed.checkpoint.metadata and the file-system writers' per-entry `_StorageInfo`, torch's or
OLMo-core's identical one), `torch.Size`,
torch dtypes and layouts, and `pathlib` paths (the checkpoint id DCP records); anything else is refused with an
error naming the class, before anything is built. The data files hold tensors, which torch's reader loads with
`torch.load(weights_only=True)` (or reads as safetensors, for the safetensors flavour of DCP).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import warnings
from typing import TYPE_CHECKING

from ..errors import CheckpointError, some

if TYPE_CHECKING:
    import torch

METADATA_NAME = ".metadata"
# Entries under these roots are training state, never the model: skipped without reading a byte.
TRAINING_ROOTS = (
    "optimizer",
    "optim",
    "lr_scheduler",
    "scheduler",
    "dataloader",
    "train_state",
    "rng_state",
    "rerun_state_machine_state",
    "trainer",
)
_METADATA_CLASSES = {
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "BytesStorageMetadata",
    "_MEM_FORMAT_ENCODING",
}
# The per-entry storage record: torch's, and OLMo-core's own (olmo_core/distributed/checkpoint/filesystem.py, a
# dataclass of the same relative_path, offset and length, written by its RemoteFileSystemWriter), read as torch's.
_STORAGE_INFO_MODULES = ("torch.distributed.checkpoint.filesystem", "olmo_core.distributed.checkpoint.filesystem")


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        import torch
        import torch.distributed.checkpoint.filesystem as dcp_fs
        import torch.distributed.checkpoint.metadata as dcp_md

        if module == "torch.distributed.checkpoint.metadata" and name in _METADATA_CLASSES:
            return getattr(dcp_md, name)
        if name == "_StorageInfo" and module in _STORAGE_INFO_MODULES:
            return dcp_fs._StorageInfo
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout  # how torch pickles a layout: by its name, looked up here in a fixed table
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return pathlib.PurePosixPath if "Posix" in name else pathlib.PureWindowsPath
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise CheckpointError(
            self.path,
            f"{METADATA_NAME} names {module}.{name}, which is not one of the classes DCP metadata is made of; "
            "refused without building anything (unpickling it could run code)",
        )


def _layout(name: str):
    import torch

    layouts = {str(x): x for x in (torch.strided, torch.sparse_coo, torch.sparse_csr, torch._mkldnn)}
    if name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layouts[name]


def read_metadata(folder: str):
    """The DCP folder's `.metadata`, unpickled with the allow-list unpickler.

    Raises:
        CheckpointError: `.metadata` is missing, truncated, names a class outside the allow-list, or is not DCP
            metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(folder, METADATA_NAME)
    try:
        with open(path, "rb") as f:
            metadata = _AllowListUnpickler(f, path).load()
    except FileNotFoundError:
        raise CheckpointError(path, f"{METADATA_NAME} is missing: the checkpoint is incomplete") from None
    except CheckpointError:
        raise
    except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError, ...
        raise CheckpointError(path, f"{METADATA_NAME} is not readable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(path, f"{METADATA_NAME} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def tensor_specs(folder: str, metadata=None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the model's tensors in a DCP folder, training state left out.

    The model's entries are those under `model.` when there are any (OLMo-core, the Hugging Face Trainer's FSDP
    checkpoints, `dcp.save({"model": ...})`), named without that prefix; otherwise every tensor entry outside the
    training-state roots (torchtitan and Megatron-Core save the model's entries at the top level).
    """
    return {name: spec for name, (_, spec) in _model_entries(metadata or read_metadata(folder)).items()}


def _model_entries(metadata) -> dict[str, tuple[str, tuple]]:
    """{model tensor name: (its DCP entry name, (shape, dtype))}."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = {
        name: (tuple(md.size), md.properties.dtype)
        for name, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)  # bytes entries (extra states, RNG) are not weights
    }
    prefixed = {name[len("model.") :]: (name, spec) for name, spec in entries.items() if name.startswith("model.")}
    if prefixed:
        return prefixed
    return {name: (name, spec) for name, spec in entries.items() if name.split(".", 1)[0] not in TRAINING_ROOTS}


def read_tensors(folder: str, names=None) -> dict[str, torch.Tensor]:
    """The model's tensors (all of them, or those in `names`), named as by `tensor_specs`, read on the CPU.

    Raises:
        CheckpointError: the metadata is unreadable or refused, a data file is missing, or reading one fails.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = read_metadata(folder)
    entries = _model_entries(metadata)
    wanted = entries if names is None else {n: entries[n] for n in names}
    files = {info.relative_path for info in (metadata.storage_data or {}).values()}
    missing = sorted(f for f in files if not os.path.isfile(os.path.join(folder, f)))
    if missing:
        raise CheckpointError(
            os.path.join(folder, missing[0]),
            f"{some(missing)} listed in {METADATA_NAME} {'is' if len(missing) == 1 else 'are'} missing",
        )

    class AllowListReader(FileSystemReader):
        """torch's own file-system reader, given the metadata the allow-list unpickler read."""

        def read_metadata(self, *args, **kwargs):
            return metadata

    if files and all(_is_safetensors(os.path.join(folder, f)) for f in files):
        return _read_safetensors(folder, sorted(files), wanted)
    state = {entry: torch.empty(shape, dtype=dtype) for entry, (shape, dtype) in wanted.values()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=AllowListReader(folder), no_dist=True)
    except Exception as e:
        raise CheckpointError(folder, f"reading the DCP data files failed: {type(e).__name__}: {e}") from e
    return {n: state[entry] for n, (entry, _) in wanted.items()}


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with its header's length and then the JSON header; torch.save's is a zip."""
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _read_safetensors(folder: str, files: list[str], wanted: dict) -> dict[str, torch.Tensor]:
    """The safetensors flavour of DCP (`FileSystemWriter(serialization_format=SAFETENSORS)`): every data file is a
    safetensors file whose `DCP_SHARDING_INFO` metadata gives each chunk's offsets in its full tensor. torch 2.13's
    own FileSystemReader cannot read these back (it hands them to torch.load), so chunks are placed here."""
    import json

    import torch
    from safetensors import SafetensorError, safe_open

    by_entry = {entry: name for name, (entry, _) in wanted.items()}
    out = {name: torch.empty(shape, dtype=dtype) for name, (_, (shape, dtype)) in wanted.items()}
    filled = dict.fromkeys(out, 0)
    for name in files:
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as f:
                sharding = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO") or "{}")
                for key in f.keys():
                    if key not in by_entry:
                        continue
                    chunk = f.get_tensor(key)
                    offsets = sharding.get(key, {}).get("saved_offsets") or [0] * chunk.ndim
                    where = tuple(slice(o, o + n) for o, n in zip(offsets, chunk.shape))
                    out[by_entry[key]][where] = chunk
                    filled[by_entry[key]] += chunk.numel()
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(path, f"{name} is not a readable safetensors data file ({e})") from None
    short = sorted(n for n, count in filled.items() if count != out[n].numel())
    if short:
        raise CheckpointError(folder, f"the data files do not cover {some(short)}: chunks are missing")
    return out
