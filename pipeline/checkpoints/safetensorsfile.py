"""One safetensors file, its header parsed and checked once, its tensors read by name: from the local disk through
one memory map, or from object storage (any fsspec URL) by byte ranges, the header first, then the tensors when they
are asked for, so that a replay reads the tensors it needs and nothing else and never lands a copy of the file on
the local disk. `read_many` reads many tensors at once: from object storage with several requests in flight
(`byteranges.read_ranges`, as the file's `ReadPlan` says), and each tensor's sha256 is taken as its bytes arrive
(`hashes`), so that the weights' digest (`digest.py`) needs no second read of them.

The format (https://huggingface.co/docs/safetensors/index#format): an 8-byte little-endian header length N, N bytes
of JSON mapping each tensor name to its dtype, shape and [begin, end) byte offsets into the data that follows, and
an optional `__metadata__` entry. The header is checked the way `safetensors.safe_open` checks it (and a problem is
named in its words), so a truncated or damaged file fails here, before any tensor is read. The object exposes the
subset of safe_open's interface that sinktrace uses (keys, get_slice(...).get_shape() / get_dtype() / [...],
get_tensor), and `raw(name)`, a tensor's bytes as stored (local files), for the weights' digest and the check that
a file is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..locations import is_url, local_path
from .byteranges import ReadPlan, bounded, cat_range, read_ranges

# safetensors dtype names (safetensors/src/tensor.rs) -> torch
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}
# one request brings the header of most checkpoints; a larger one costs a second request
FIRST_READ = 1 << 16
MAX_HEADER = 100_000_000  # safetensors' own limit
# sha256 releases the GIL: tensors read from object storage are hashed while the next ones arrive
_HASHERS = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="sinktrace-hash")


class HeaderError(ValueError):
    """The file is no valid safetensors file; the message is safetensors' own wording of the problem."""

    def __init__(self, problem: str):
        super().__init__(f"Error while deserializing header: {problem}")


class SafetensorsFile:
    """One safetensors file, local or behind an fsspec URL, opened once. Raises HeaderError (a ValueError) for a
    malformed header or a file whose size does not match it, OSError/FileNotFoundError as the storage reports them.
    Tensors read from a local file share the memory map's pages (copy on write: the file is never changed); `plan`
    says how `read_many` reads a URL's tensors."""

    def __init__(self, path: str, plan: ReadPlan = ReadPlan()):
        self.path, self.plan = path, plan
        self._map = self._fs = None
        # {tensor name: the sha256 of its bytes, being taken}, for each tensor read_many read from object storage
        self.hashes: dict[str, Future] = {}
        if is_url(path):
            import fsspec

            self._fs, self._remote = fsspec.core.url_to_fs(path)
            self.size = bounded(self._fs, path, "its size", "size", self._remote)
            head = self._range(0, min(self.size, FIRST_READ))
        else:
            with open(local_path(path), "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size >= 8:
                    self._map = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
                head = self._map if self._map is not None else f.read()
        self._start, self._entries = parse_header(head, self.size, self._range)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def local(self) -> bool:
        return self._map is not None

    @property
    def data_start(self) -> int:
        """Where the tensors' data begins (after the header)."""
        return self._start

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def dtypes(self) -> dict[str, str]:
        """{tensor name: safetensors dtype name, e.g. "BF16"}."""
        return {name: entry[3] for name, entry in self._entries.items()}

    def spans(self) -> dict[str, tuple[int, int]]:
        """{tensor name: its [begin, end) in the file}."""
        return {name: (self._start + b, self._start + e) for name, (_, _, (b, e), _) in self._entries.items()}

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[...]

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes as stored: a view of the local file's map."""
        _, _, (begin, end), _ = self._entries[name]
        return self._map[self._start + begin : self._start + end]

    def bytes_at(self, start: int, stop: int) -> bytes:
        """The file's bytes [start, stop) (local files)."""
        return bytes(self._map[start:stop])

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end), _ = self._entries[name]
        if self._map is None:
            return self.read_many([name])[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.raw(name), dtype=dtype).reshape(shape)

    def read_many(self, names, plan: ReadPlan | None = None) -> dict[str, torch.Tensor]:
        """{name: tensor} for these tensors. A local file's share its memory map; a URL's are read by byte ranges,
        `plan` (default: the file's) saying how many requests are in flight, and each one's sha256 is then taken in
        the background (`hashes`).

        Raises:
            OSError: a read fails or comes back short, naming the file.
        """
        names = list(dict.fromkeys(names))
        if self._map is not None:
            return {name: self.read(name) for name in names}
        spans = self.spans()
        ranged = [name for name in names if spans[name][1] > spans[name][0]]
        got = dict(zip(ranged, read_ranges(self.path, [spans[name] for name in ranged], plan or self.plan)))
        out = {}
        for name in names:  # each tensor's bytes let go of once copied: they are held once, not twice
            dtype, shape, _, _ = self._entries[name]
            data = bytearray(got.pop(name, b""))
            # hashed from the tensor's own storage, which the replay never writes to
            self.hashes[name] = _HASHERS.submit(_sha256, data)
            out[name] = torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
        return out

    def _range(self, start: int, stop: int) -> bytes:
        if self._map is not None:
            return bytes(self._map[start:stop])
        return cat_range(self._fs, self._remote, self.path, start, stop)


def _sha256(data: bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


class _Slice:
    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name

    def get_shape(self) -> list[int]:
        return list(self.file._entries[self.name][1])

    def get_dtype(self) -> str:
        return self.file._entries[self.name][3]

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.file.read(self.name)
        return tensor if index is Ellipsis else tensor[index]


def parse_header(head, size: int, read) -> tuple[int, dict]:
    """The header of a safetensors file of `size` bytes whose first bytes are `head` (`read(start, stop)` reads
    more): (where the data starts, {name: (torch dtype, shape, (begin, end), safetensors dtype)}).

    Raises:
        HeaderError: the checks safe_open makes, in its words.
    """
    if size < 8 or len(head) < 8:
        raise HeaderError("header too small")
    (n,) = struct.unpack("<Q", bytes(head[:8]))
    if n > MAX_HEADER:
        raise HeaderError("header too large")
    if n > size - 8:
        raise HeaderError("invalid header length")
    raw = bytes(head[8 : 8 + n]) if 8 + n <= len(head) else read(8, 8 + n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HeaderError(f"invalid UTF-8 in header: {e}") from None
    except json.JSONDecodeError as e:
        raise HeaderError(f"invalid JSON in header: {e}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"invalid JSON in header: a {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    entries = {name: _entry(name, info) for name, info in header.items()}
    _check_coverage(entries, size - 8 - n)
    return 8 + n, entries


def _entry(name: str, info) -> tuple:
    if not isinstance(info, dict):
        raise HeaderError(f"invalid JSON in header: entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise HeaderError(f"invalid JSON in header: tensor {name!r} has dtype {dtype!r}, which sinktrace cannot read")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise HeaderError(f"invalid shape, data type, or offset for tensor {name!r} (shape {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise HeaderError(f"invalid shape, data type, or offset for tensor {name!r} (data_offsets {offsets!r})")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise HeaderError(f"invalid shape, data type, or offset for tensor {name!r}")
    return DTYPES[dtype], tuple(shape), (begin, end), dtype


def _check_coverage(entries: dict, data_size: int) -> None:
    """The tensors must tile the data exactly, as safe_open demands: no gap, no overlap, nothing after."""
    at = 0
    for _, _, (begin, end), _ in sorted(entries.values(), key=lambda e: e[2]):
        if begin != at:
            raise HeaderError("incomplete metadata, file not fully covered")
        at = end
    if at != data_size:
        raise HeaderError("incomplete metadata, file not fully covered")
