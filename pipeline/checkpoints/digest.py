"""The digest of a checkpoint's weights, stored per step as `weights_digest`, so that two steps holding the same
weights are found (public suites serve one checkpoint under several step names).

Definition: sha256 over the lines `name dtype shape sha256(bytes)`, one per tensor of the safetensors files, in
name order, where `bytes` are the tensor's data exactly as stored and dtype is the safetensors name (F32, BF16, ...).
So it depends on the tensors alone: not on how they are split into shards, on the order in the files, on metadata,
or on which route (whole model or layer by layer) loads them.

It is computed while the checkpoint is replayed, from the bytes the replay reads. Local files: `start_digest`
hashes the tensors of the files the replay opened (their memory maps: the pages loading reads anyway) on background
threads, which release the GIL, while the model loads and runs. Files on object storage: each tensor's bytes are
hashed as they arrive (`SafetensorsFile.read_many`, its `hashes`), and a tensor the replay does not read (layer by
layer, the output head) is read for the digest alone when the digest is asked for: by byte ranges, in pieces of
`PIECE` bytes, each piece hashed and dropped. The same tensors give the same digest from either place.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..devices import SAFETENSORS_FLOATS
from ..errors import CheckpointError, describe
from .byteranges import ReadPlan, read_ranges
from .safetensorsfile import SafetensorsFile

_HASHERS = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="sinktrace-digest")
_DRIVER = ThreadPoolExecutor(1, thread_name_prefix="sinktrace-digest-driver")
PIECE = 8 << 20  # a tensor read for the digest alone: pieces of this many bytes, `concurrency` of them at a time


class PendingDigest:
    """A digest being computed; `result()` waits for it (a str of 64 hex digits). A model carrying one may be
    deep-copied: the copy shares it."""

    def __init__(self, future: Future):
        self._future = future

    def result(self) -> str:
        return self._future.result()

    def __deepcopy__(self, memo):
        return self


def start_digest(files: list[SafetensorsFile]) -> PendingDigest:
    """The digest of the tensors in these opened safetensors files: of local files computed in the background from
    their memory maps; of files on object storage from the hashes taken as the replay reads their tensors, once the
    digest is asked for (see the module's docstring)."""
    tensors = [
        (name, dtype, list(f.get_slice(name).get_shape()), f) for f in files for name, dtype in f.dtypes().items()
    ]
    names = [name for name, *_ in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(os.path.dirname(files[0].path), f"tensors stored twice across the files: {dup[:3]}")
    if not all(f.local for f in files):
        return _FromReads(tensors)
    return PendingDigest(_DRIVER.submit(_combine, [(n, d, s, f.raw(n)) for n, d, s, f in tensors]))


class _FromReads(PendingDigest):
    """The digest of tensors read by byte ranges: taken, when first asked for, from the hashes of the tensors the
    replay read, reading the others for it alone."""

    def __init__(self, tensors: list[tuple]):
        self._tensors, self._lock, self._value = tensors, threading.Lock(), None

    def result(self) -> str:
        with self._lock:
            if self._value is None:
                lines = [(name, dtype, shape, _hash_of(f, name)) for name, dtype, shape, f in self._tensors]
                self._value = _combine_hashes(lines)
            return self._value


def _hash_of(f: SafetensorsFile, name: str) -> str:
    """The sha256 of a tensor's bytes: taken as the replay read them, or read now, piece by piece, for it alone."""
    if name not in f.hashes:
        begin, end = f.spans()[name]
        pieces = [(a, min(a + PIECE, end)) for a in range(begin, end, PIECE)]
        step = max(1, f.plan.concurrency)
        hasher = hashlib.sha256()
        try:
            for i in range(0, len(pieces), step):  # at most `step` pieces in memory at once
                for data in read_ranges(f.path, pieces[i : i + step], ReadPlan(step, gap=0, max_request=PIECE)):
                    hasher.update(data)
        except OSError as e:
            raise CheckpointError(f.path, f"reading {name} for the weights' digest failed: {describe(e)}") from e
        return hasher.hexdigest()
    return f.hashes[name].result()


def start_tensor_digest(tensors: dict) -> PendingDigest:
    """The same digest over tensors already in memory: checkpoints of other formats (`statedict`), whose
    state dict in transformers' names is what the lines name (dtype as safetensors names it)."""
    names = {dtype: name for name, dtype in SAFETENSORS_FLOATS.items()}
    items = []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        items.append((name, names.get(t.dtype, str(t.dtype).removeprefix("torch.")), list(t.shape), data))
    return PendingDigest(_DRIVER.submit(_combine, items))


def tensor_lines(tensors: dict) -> dict[str, str]:
    """Each tensor's line of the digest, as `start_tensor_digest` writes it: a state dict read part by part (layer
    by layer) is hashed as each part is read, and `digest_of_lines` over all the parts' lines is its digest."""
    names = {dtype: name for name, dtype in SAFETENSORS_FLOATS.items()}
    items = []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        items.append((name, names.get(t.dtype, str(t.dtype).removeprefix("torch.")), list(t.shape), t))
    hashes = _HASHERS.map(lambda t: hashlib.sha256(memoryview(t[3].reshape(-1).view(torch.uint8).numpy())), items)
    return {name: f"{name} {dtype} {shape} {h.hexdigest()}\n" for (name, dtype, shape, _), h in zip(items, hashes)}


def digest_of_lines(lines: dict[str, str]) -> str:
    """The digest over every tensor's line (`tensor_lines`), in name order as `_combine` orders them."""
    return hashlib.sha256("".join(lines[name] for name in sorted(lines)).encode()).hexdigest()


def weights_digest(paths: list[str]) -> str:
    """The digest of these safetensors files, each opened and its header checked.

    Raises:
        CheckpointError: a file is unreadable or no valid safetensors file, naming it.
    """
    files = []
    for path in paths:
        try:
            files.append(SafetensorsFile(path))
        except OSError as e:
            raise CheckpointError(path, f"cannot be read for its digest ({e.strerror or e})") from None
        except ValueError as e:
            raise CheckpointError(path, f"is not a valid safetensors file ({e})") from None
    return start_digest(files).result()


def _combine(tensors) -> str:
    tensors = sorted(tensors, key=lambda t: t[0])
    hashes = _HASHERS.map(lambda t: hashlib.sha256(t[3]).hexdigest(), tensors)
    return _combine_hashes([(name, dtype, shape, h) for (name, dtype, shape, _), h in zip(tensors, hashes)])


def _combine_hashes(lines) -> str:
    """sha256 over the lines `name dtype shape sha256`, in name order."""
    text = "".join(f"{name} {dtype} {shape} {h}\n" for name, dtype, shape, h in sorted(lines, key=lambda t: t[0]))
    return hashlib.sha256(text.encode()).hexdigest()
