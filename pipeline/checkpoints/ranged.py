"""safetensors files on object storage (any fsspec URL), read by byte ranges: the header first, then each tensor
when it is asked for, so that a replay reads the tensors it needs and nothing else (layer by layer, the output head
is never read) and never lands a copy of the file on the local disk.

The format (https://huggingface.co/docs/safetensors/index#format): an 8-byte little-endian header length N, N bytes
of JSON mapping each tensor name to its dtype, shape and [begin, end) byte offsets into the data that follows, and
an optional `__metadata__` entry. The header is checked the way `safetensors.safe_open` checks it, so a truncated
or damaged file fails here, before any tensor is read. The object exposes the subset of safe_open's interface that
sinktrace uses (keys, get_slice(...).get_shape() / get_dtype() / [...], get_tensor).
"""

from __future__ import annotations

import json
import math
import struct

import torch

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
}
# one request brings the header of most checkpoints; a larger one costs a second request
FIRST_READ = 1 << 16


class RangedSafetensors:
    """One safetensors file behind an fsspec URL. Raises ValueError (the reason) for a malformed header or a file
    whose size does not match it, OSError/FileNotFoundError as the storage reports them."""

    def __init__(self, url: str):
        import fsspec

        # start= and end= by name: s3fs's cat_file takes a version id second
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        size = self.fs.size(self.path)
        head = self.fs.cat_file(self.path, start=0, end=min(size, FIRST_READ))
        if len(head) < 8:
            raise ValueError(f"file of {size} bytes is too small to hold a header")
        (n,) = struct.unpack("<Q", head[:8])
        if n > size - 8:
            raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
        raw = head[8 : 8 + n] if 8 + n <= len(head) else self.fs.cat_file(self.path, start=8, end=8 + n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries = {name: _entry(name, info) for name, info in header.items()}
        _check_coverage(self._entries, size - self._start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[...]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end), _ = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        data = bytearray(self.fs.cat_file(self.path, start=self._start + begin, end=self._start + end))
        if len(data) != end - begin:
            raise OSError(f"{self.url}: read {len(data)} of {end - begin} bytes of {name}")
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


class _Slice:
    def __init__(self, file: RangedSafetensors, name: str):
        self.file, self.name = file, name

    def get_shape(self) -> list[int]:
        return list(self.file._entries[self.name][1])

    def get_dtype(self) -> str:
        return self.file._entries[self.name][3]

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.file.read(self.name)
        return tensor if index is Ellipsis else tensor[index]


def _entry(name: str, info) -> tuple:
    if not isinstance(info, dict):
        raise ValueError(f"header entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}, which safetensors does not define")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"tensor {name!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
    return DTYPES[dtype], tuple(shape), (begin, end), dtype


def _check_coverage(entries: dict, data_size: int) -> None:
    """The tensors must tile the data exactly, as safe_open demands: no gap, no overlap, nothing after."""
    at = 0
    for _, _, (begin, end), _ in sorted(entries.values(), key=lambda e: e[2]):
        if begin != at:
            raise ValueError(f"tensor data does not follow on at byte {at} (next begins at {begin})")
        at = end
    if at != data_size:
        raise ValueError(f"the tensors take {at} bytes but the file holds {data_size} after the header")
