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

import dataclasses
import math
import os
import pathlib
import pickle
import warnings
from typing import TYPE_CHECKING

from ...errors import CheckpointError, describe, some

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

    Before a byte of data is read, the metadata is checked against the folder: every data file it lists lies
    inside the folder and exists, every model tensor's chunks cover each of its elements exactly once, and each
    chunk's bytes lie within its file.

    Raises:
        CheckpointError: the metadata is unreadable, refused or inconsistent, a data file is missing, outside the
            folder or cut short, or reading one fails; the message names the file.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    metadata = read_metadata(folder)
    entries = _model_entries(metadata)
    wanted = entries if names is None else {n: entries[n] for n in names}
    files = _data_files(folder, metadata)
    _check_chunks(folder, metadata, [entry for entry, _ in wanted.values()])

    class AllowListReader(FileSystemReader):
        """torch's own file-system reader, given the metadata the allow-list unpickler read, reading one data file
        at a time so that a failure names its file."""

        def read_metadata(self, *args, **kwargs):
            return metadata

        def read_data(self, plan, planner):
            by_file: dict[str, list] = {}
            for item in plan.items:
                by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for name, items in by_file.items():
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except Exception as e:
                    raise CheckpointError(os.path.join(folder, name), f"{name} cannot be read: {describe(e)}") from None
            return super().read_data(dataclasses.replace(plan, items=[]), planner)

    if files and all(_is_safetensors(os.path.join(folder, f)) for f in files):
        return _read_safetensors(folder, sorted(files), wanted)
    state = {entry: torch.empty(shape, dtype=dtype) for entry, (shape, dtype) in wanted.values()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=AllowListReader(folder), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(folder, f"reading the DCP data files failed: {describe(e)}") from e
    except CheckpointException as e:  # not an Exception: what the reader raised, wrapped with its traceback
        raise _unwrapped(folder, e) from None
    return {n: state[entry] for n, (entry, _) in wanted.items()}


def _unwrapped(folder: str, e: BaseException) -> BaseException:
    """The error inside torch's CheckpointException: a CheckpointError as it is, an interrupt (Ctrl-C, SIGTERM)
    as it is, anything else as a CheckpointError."""
    inner = [exc for exc, _ in e.failures.values()]
    for exc in inner:
        if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
            return exc
    cause = describe(inner[0]) if inner else describe(e)
    return CheckpointError(folder, f"reading the DCP data files failed: {cause}")


def _data_files(folder: str, metadata) -> set[str]:
    """The data files `.metadata` lists, each checked to lie inside the checkpoint's folder and to exist."""
    files = {info.relative_path for info in (metadata.storage_data or {}).values()}
    for name in sorted(files, key=str):
        parts = pathlib.PurePath(name).parts if isinstance(name, str) and "\0" not in name else ()
        if not parts or os.path.isabs(name) or ".." in parts:
            raise CheckpointError(
                os.path.join(folder, METADATA_NAME),
                f"{METADATA_NAME} lists the data file {name!r}, which lies outside the checkpoint's folder: refused",
            )
    missing = sorted(f for f in files if not os.path.isfile(os.path.join(folder, f)))
    if missing:
        raise CheckpointError(
            os.path.join(folder, missing[0]),
            f"{some(missing)} listed in {METADATA_NAME} {'is' if len(missing) == 1 else 'are'} missing",
        )
    return files


def _check_chunks(folder: str, metadata, entries: list[str]) -> None:
    """Every element of each entry is in exactly one chunk (else the rest of the tensor would be whatever memory
    torch.empty gave), and every chunk's bytes lie within its data file (else the file was cut short)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    path = os.path.join(folder, METADATA_NAME)
    sizes: dict[str, int] = {}
    for entry in entries:
        md = metadata.state_dict_metadata[entry]
        shape, chunks = tuple(md.size), list(md.chunks)
        total = math.prod(shape)
        for c in chunks:
            if (
                len(c.offsets) != len(shape)
                or len(c.sizes) != len(shape)
                or any(o < 0 or n < 0 or o + n > dim for o, n, dim in zip(c.offsets, c.sizes, shape))
            ):
                raise CheckpointError(
                    path,
                    f"{entry}: a chunk at {list(c.offsets)} of size {list(c.sizes)} lies outside the tensor's "
                    f"{list(shape)}",
                )
        covered = sum(math.prod(c.sizes) for c in chunks)
        if covered != total or _overlap(chunks):
            raise CheckpointError(
                path,
                f"{entry}: the chunks {METADATA_NAME} lists cover {covered} of its {total} elements"
                f"{' (some twice)' if covered == total else ''}: the checkpoint does not hold the whole tensor",
            )
        for c in chunks:
            info = (metadata.storage_data or {}).get(MetadataIndex(entry, c.offsets))
            if info is None:
                raise CheckpointError(path, f"{entry}: no data file holds its chunk at {list(c.offsets)}")
            file = os.path.join(folder, info.relative_path)
            if file not in sizes:
                sizes[file] = os.path.getsize(file)
            if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[file]:
                raise CheckpointError(
                    file,
                    f"{info.relative_path} is truncated: {METADATA_NAME} puts {entry} at bytes {info.offset} to "
                    f"{info.offset + info.length}, and the file has {sizes[file]}",
                )


def _overlap(chunks) -> bool:
    """Whether two chunks share an element: swept along the first dimension, so that chunks sharded along it (the
    usual layout) are compared with their neighbours only."""
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks if math.prod(c.sizes))
    for i, (off, size) in enumerate(boxes):
        for other_off, other_size in boxes[i + 1 :]:
            if off and other_off[0] >= off[0] + size[0]:
                break
            if all(a < b + m and b < a + n for a, n, b, m in zip(off, size, other_off, other_size)):
                return True
    return False


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
