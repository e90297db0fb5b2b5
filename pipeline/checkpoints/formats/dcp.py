"""PyTorch Distributed Checkpoints (DCP): a folder of `*.distcp` data files and a `.metadata` index, on the local
disk or behind an fsspec URL.

Read in one process, without torch's reader: `.metadata` says where each chunk of each tensor lies (a data file, a
byte offset and a length), so the model's chunks are read by byte ranges (`checkpoints.byteranges`), all the data
files' at once, and the optimizer state beside them is never read: a checkpoint costs its model's bytes, from the
local disk or object storage alike. Each chunk of torch's own flavour is a `torch.save` stream, loaded with
`torch.load(weights_only=True)`; in the safetensors flavour each data file is a safetensors file, whose header gives
the chunk's bytes.

`.metadata` is a pickle, and torch's reader unpickles it with the standard unpickler, which can run any code the
file names. Here it is unpickled by an allow-list unpickler instead: only the dataclasses DCP's metadata is made of
(torch.distributed.checkpoint.metadata and the file-system writers' per-entry `_StorageInfo`, torch's or
OLMo-core's identical one), `torch.Size`,
torch dtypes and layouts, and `pathlib` paths (the checkpoint id DCP records); anything else is refused with an
error naming the class, before anything is built.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pathlib
import pickle
import posixpath
from typing import TYPE_CHECKING

from ...errors import CheckpointError, describe, some
from ...locations import is_url, join, local_path, read_bytes
from .. import byteranges

if TYPE_CHECKING:
    import torch

METADATA_NAME = ".metadata"
ZIP_MAGIC = b"PK\x03\x04"  # how a torch.save stream starts
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

    path = join(folder, METADATA_NAME)
    try:
        metadata = _AllowListUnpickler(io.BytesIO(read_bytes(path)), path).load()
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


def read_tensors(
    folder: str, names=None, plan: byteranges.ReadPlan = byteranges.ReadPlan(), metadata=None
) -> dict[str, torch.Tensor]:
    """The model's tensors (all of them, or those in `names`), named as by `tensor_specs`, read on the CPU by byte
    ranges. `metadata`: the folder's, already read.

    Before a byte of data is read, the metadata is checked against the folder: every data file it lists lies
    inside the folder and exists, every wanted tensor's chunks cover each of its elements exactly once, and each
    chunk's bytes lie within its file.

    Raises:
        CheckpointError: the metadata is unreadable, refused or inconsistent, a data file is missing, outside the
            folder or cut short, or reading one fails; the message names the file.
    """
    metadata = metadata or read_metadata(folder)
    entries = _model_entries(metadata)
    unknown = sorted(set(names or ()) - set(entries))
    if unknown:
        raise CheckpointError(join(folder, METADATA_NAME), f"{METADATA_NAME} lists no model tensor {some(unknown)}")
    wanted = entries if names is None else {n: entries[n] for n in names}
    sizes = _data_files(folder, metadata)
    chunks = _check_chunks(folder, metadata, [entry for entry, _ in wanted.values()], sizes)
    if chunks and _is_safetensors(folder, chunks[0][1][1]):
        return _read_safetensors(folder, wanted, chunks, plan)
    asked, slots = {}, []
    for entry, (c, info) in chunks:
        file = join(folder, info.relative_path)
        asked.setdefault(file, []).append((info.offset, info.offset + info.length))
        slots.append((entry, c, file, len(asked[file]) - 1))
    return _assemble(wanted, slots, _read(folder, asked, plan), _load_chunk)


def _assemble(wanted: dict, slots: list, data: dict, load) -> dict[str, torch.Tensor]:
    """Each wanted tensor from its chunks: `slots` [(entry, chunk, file, index of its bytes in data[file])],
    `load(file, entry, bytes, chunk, dtype)` the chunk's tensor. A tensor saved whole is its one chunk's tensor."""
    import torch

    by_entry = {entry: (name, spec) for name, (entry, spec) in wanted.items()}
    counts = collections.Counter(entry for entry, *_ in slots)
    whole = {entry for entry, n in counts.items() if n == 1}
    out = {}
    for entry, c, file, i in slots:
        name, (shape, dtype) = by_entry[entry]
        chunk = load(file, entry, data[file][i], c, dtype)
        data[file][i] = None  # let each chunk's bytes go once it is placed
        if entry in whole:
            out[name] = chunk
            continue
        if name not in out:
            out[name] = torch.empty(shape, dtype=dtype)
        out[name][tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes))] = chunk
    return out


def _read(folder: str, asked: dict[str, list[tuple[int, int]]], plan) -> dict[str, list[bytes]]:
    try:
        return byteranges.read_files(asked, plan)
    except OSError as e:
        name = next((f for f in asked if f in str(e)), folder)
        raise CheckpointError(name, f"{posixpath.basename(name)} cannot be read: {describe(e)}") from None


def _load_chunk(file: str, entry: str, data: bytes, chunk, dtype):
    """One chunk of the torch flavour: a torch.save stream holding a tensor of the chunk's sizes and dtype."""
    import torch

    from .torchfile import refusal

    name = posixpath.basename(file)
    try:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message advises full unpickling, which is never done here
        raise CheckpointError(
            file, f"{name} cannot be read: {entry} needs more than torch.load(weights_only=True): {refusal(e)}"
        ) from None
    except Exception as e:
        raise CheckpointError(file, f"{name} cannot be read: {entry}: {describe(e)}") from None
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != dtype:
        got = f"a {tuple(tensor.shape)} {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor)
        raise CheckpointError(
            file,
            f"{name} holds {got} for the chunk of {entry} at {list(chunk.offsets)}, where {METADATA_NAME} says "
            f"{tuple(chunk.sizes)} {dtype}",
        )
    return tensor


def _data_files(folder: str, metadata) -> dict[str, int]:
    """{data file .metadata lists: its size}, each checked to lie inside the checkpoint's folder and to exist."""
    files = {info.relative_path for info in (metadata.storage_data or {}).values()}
    for name in sorted(files, key=str):
        parts = pathlib.PurePath(name).parts if isinstance(name, str) and "\0" not in name else ()
        if not parts or os.path.isabs(name) or ".." in parts or "://" in name:
            raise CheckpointError(
                join(folder, METADATA_NAME),
                f"{METADATA_NAME} lists the data file {name!r}, which lies outside the checkpoint's folder: refused",
            )
    sizes = _sizes(folder, files)
    missing = sorted(f for f in files if f not in sizes)
    if missing:
        raise CheckpointError(
            join(folder, missing[0]),
            f"{some(missing)} listed in {METADATA_NAME} {'is' if len(missing) == 1 else 'are'} missing",
        )
    return sizes


def _sizes(folder: str, files: set[str]) -> dict[str, int]:
    """The sizes of those of `files` that exist: one listing of the folder on object storage."""
    if not is_url(folder):
        paths = {f: os.path.join(local_path(folder), f) for f in files}
        return {f: os.path.getsize(p) for f, p in paths.items() if os.path.isfile(p)}
    import fsspec

    fs, remote = fsspec.core.url_to_fs(folder)
    try:
        listed = {
            posixpath.relpath(info["name"], remote.rstrip("/")): info.get("size")
            for info in fs.find(remote, detail=True).values()
        }
    except FileNotFoundError:
        listed = {}
    return {f: int(listed[f]) for f in files if listed.get(f) is not None}


def _check_chunks(folder: str, metadata, entries: list[str], sizes: dict[str, int]) -> list[tuple[str, tuple]]:
    """Every element of each entry is in exactly one chunk (else the rest of the tensor would be whatever memory
    torch.empty gave), and every chunk's bytes lie within its data file (else the file was cut short). Returns
    [(entry, (chunk, its storage info))]."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    path = join(folder, METADATA_NAME)
    out = []
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
            file, size = join(folder, info.relative_path), sizes[info.relative_path]
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    file,
                    f"{info.relative_path}: {entry} is stored transformed ({', '.join(info.transform_descriptors)}), "
                    "which sinktrace does not read: save the checkpoint without storage transforms",
                )
            if info.offset < 0 or info.length < 0 or info.offset + info.length > size:
                raise CheckpointError(
                    file,
                    f"{info.relative_path} is truncated: {METADATA_NAME} puts {entry} at bytes {info.offset} to "
                    f"{info.offset + info.length}, and the file has {size}",
                )
            out.append((entry, (c, info)))
    return out


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


def _is_safetensors(folder: str, info) -> bool:
    """Whether the data files are of the safetensors flavour: torch's stores each chunk as a torch.save stream, a zip
    archive starting at the chunk's offset, the safetensors flavour each file as a safetensors file, which starts
    with its header's length. The first bytes of a wanted chunk (`info`, its storage info) tell."""
    file = join(folder, info.relative_path)
    head = _read(folder, {file: [(info.offset, info.offset + 4)]}, byteranges.ONE_AT_A_TIME)[file][0]
    return head != ZIP_MAGIC


def _read_safetensors(folder: str, wanted: dict, chunks: list, plan) -> dict[str, torch.Tensor]:
    """The safetensors flavour of DCP (`FileSystemWriter(serialization_format=SAFETENSORS)`): every data file is a
    safetensors file holding, under the entry's name, the chunk `.metadata` puts in it. torch 2.13's own
    FileSystemReader cannot read these back (it hands them to torch.load); here each file's header gives the chunk's
    bytes, read by byte ranges."""
    import torch

    from ..safetensorsfile import DTYPES, SafetensorsFile

    wanted_dtype = {entry: dtype for entry, (_, dtype) in wanted.values()}
    headers, asked, slots = {}, {}, []
    for entry, (c, info) in chunks:
        file = join(folder, info.relative_path)
        if file not in headers:
            try:
                headers[file] = SafetensorsFile(file)
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    file, f"{info.relative_path} is not a readable safetensors data file ({e})"
                ) from None
        header = headers[file]
        if entry not in header.dtypes():
            raise CheckpointError(file, f"{info.relative_path} does not hold {entry}, which {METADATA_NAME} puts there")
        stored = (tuple(header.get_slice(entry).get_shape()), DTYPES[header.dtypes()[entry]])
        if stored != (tuple(c.sizes), wanted_dtype[entry]):
            raise CheckpointError(
                file,
                f"{info.relative_path} holds {entry} as {stored[0]} {stored[1]}, where {METADATA_NAME} says "
                f"{tuple(c.sizes)} {wanted_dtype[entry]}",
            )
        asked.setdefault(file, []).append(header.spans()[entry])
        slots.append((entry, c, file, len(asked[file]) - 1))

    def load(file, entry, data, chunk, dtype):
        if not data:
            return torch.empty(tuple(chunk.sizes), dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(tuple(chunk.sizes))

    return _assemble(wanted, slots, _read(folder, asked, plan), load)
