"""The digest of a checkpoint's weights, stored per step as `weights_digest`, so that two steps holding the same
weights are found (public suites serve one checkpoint under several step names).

Definition: sha256 over the lines `name dtype shape sha256(bytes)`, one per tensor of the safetensors files, in
name order, where `bytes` are the tensor's data exactly as stored and dtype is the safetensors name (F32, BF16, ...).
So it depends on the tensors alone: not on how they are split into shards, on the order in the files, on metadata,
or on which route (whole model or layer by layer) loads them.

It is computed while the checkpoint is replayed: `start_digest` hashes the tensors of the files the replay opened
(their memory maps: the pages loading reads anyway) on background threads, which release the GIL, while the model
loads and runs.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..devices import SAFETENSORS_FLOATS
from ..errors import CheckpointError
from .safetensorsfile import SafetensorsFile

_HASHERS = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="sinktrace-digest")
_DRIVER = ThreadPoolExecutor(1, thread_name_prefix="sinktrace-digest-driver")


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
    """The digest of the tensors in these opened safetensors files, computed in the background. For weights read by
    byte ranges from object storage none is computed (it would read every byte once more), and the step's digest
    stays empty."""
    if not all(f.local for f in files):
        done: Future = Future()
        done.set_result(None)
        return PendingDigest(done)
    tensors = [
        (name, dtype, list(f.get_slice(name).get_shape()), f.raw(name))
        for f in files
        for name, dtype in f.dtypes().items()
    ]
    names = [name for name, *_ in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(os.path.dirname(files[0].path), f"tensors stored twice across the files: {dup[:3]}")
    return PendingDigest(_DRIVER.submit(_combine, tensors))


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
    lines = "".join(f"{name} {dtype} {shape} {h}\n" for (name, dtype, shape, _), h in zip(tensors, hashes))
    return hashlib.sha256(lines.encode()).hexdigest()
