"""A Hugging Face checkpoint folder's files: which ones hold the weights, and whether their headers hold up.

Shared by discovery (is the folder finished?) and loading (is every file it will read sound?), so that both
resolve the weight files the way transformers does: model.safetensors first, else model.safetensors.index.json
and the shards it lists. Pickled weights are recognised only to be refused: unpickling can run code.
"""

from __future__ import annotations

import json
import os
import posixpath
import re

import torch

from ..devices import SAFETENSORS_FLOATS
from ..errors import CheckpointError, some
from ..locations import file_size, is_file, is_url, join, list_names, read_bytes
from .byteranges import ReadPlan
from .safetensorsfile import SafetensorsFile

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
TRAINER_STATE_NAME = "trainer_state.json"
# Pickles a trainer writes beside the weights; they never hold the model, so they neither count as weights nor
# make a folder "pickled-only".
TRAINING_STATE = re.compile(
    r"^(optimizer|scheduler|lr_scheduler|scaler|rng_state|training_args)([-_.].*)?\.(pt|pth|bin)$"
    r"|optim_states\.pt$",
    re.IGNORECASE,
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickled_weights(names) -> list[str]:
    """The names (relative paths) that look like pickled model weights, training state excluded."""
    return sorted(
        n for n in names if n.lower().endswith(PICKLE_SUFFIXES) and not TRAINING_STATE.search(posixpath.basename(n))
    )


def pickles_refused(pickles: list[str]) -> str:
    return (
        f"only pickled weights ({some(pickles)}); pickled files are never loaded because unpickling can run code: "
        "convert them to safetensors (model.save_pretrained(..., safe_serialization=True))"
    )


def shard_names(index) -> list[str]:
    """The shard files a parsed model.safetensors.index.json lists, sorted; ValueError if malformed."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError("it has no weight_map (tensor name -> shard file)")
    shards = set()
    for name in weight_map.values():
        if not isinstance(name, str) or not name:
            raise ValueError(f"its weight_map maps to {name!r}, not a file name")
        norm = posixpath.normpath(name)
        if norm.startswith("..") or posixpath.isabs(norm) or "\\" in name:
            raise ValueError(f"its weight_map names {name!r}, outside the checkpoint folder")
        shards.add(name)
    return sorted(shards)


def weight_files(folder: str) -> list[tuple[str, list[str] | None]]:
    """The safetensors files of a folder (local, or an fsspec URL) that transformers loads, each with the tensors
    the index says it holds (None: no index). CheckpointError when there are none, or only pickles, or the index is
    broken."""
    single = join(folder, SAFE_WEIGHTS_NAME)
    if is_file(single):
        return [(single, None)]
    index_path = join(folder, SAFE_INDEX_NAME)
    if not is_file(index_path):
        pickles = pickled_weights(list_names(folder))
        if pickles:
            raise CheckpointError(folder, pickles_refused(pickles))
        raise CheckpointError(folder, f"no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")
    try:
        index = json.loads(read_bytes(index_path).decode("utf-8"))
        shards = shard_names(index)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
        raise CheckpointError(index_path, f"{SAFE_INDEX_NAME} is unusable: {e}") from None
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(tensor)
    return [(join(folder, shard), by_shard[shard]) for shard in shards]


def weight_paths(folder: str) -> list[str]:
    return [path for path, _ in weight_files(folder)]


def validate_weights(folder: str) -> dict[str, str]:
    """Check the safetensors files transformers will load; return {tensor name: safetensors dtype, e.g. "BF16"}.
    Only headers are read, never tensor data. Raises as `open_weight_files`."""
    dtypes = {}
    for f in open_weight_files(folder):
        dtypes.update(f.dtypes())
    return dtypes


def open_weight_files(folder: str, plan: ReadPlan = ReadPlan()) -> list[SafetensorsFile]:
    """The safetensors files transformers would load from the folder (local, or a URL), each opened once and its
    header checked; `plan` says how a URL's tensors are read (`SafetensorsFile.read_many`).

    Raises:
        CheckpointError: a file is missing, truncated or malformed, the index is broken or maps a tensor to a
            shard that lacks it, or the folder holds only pickled weights.
    """
    return [_open_safetensors(path, expected, plan) for path, expected in weight_files(folder)]


# Weights that are never all zero in a model that was initialised, let alone trained: embeddings start at random
# values, norm scales at one. (Projections may start at zero: some recipes zero-initialise output layers.)
NEVER_ZERO_EMBEDDINGS = re.compile(r"(embed\w*|wte|wpe)\.weight$", re.IGNORECASE)
NEVER_ZERO = re.compile(r"(norm|ln_\w*|ln\d*|embed\w*|wte|wpe)\.weight$", re.IGNORECASE)
# families whose norms scale by (1 + weight), so a norm weight starts at zero
ZERO_CENTRED_NORMS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "qwen3_next", "recurrent_gemma"})
_TAIL = 64 * 1024
_SCAN_LIMIT = 256 * 2**20
_CHUNK = 2**20
# A write that stopped inside a tensor leaves that tensor non-zero up to a point and zero from there to the end of
# the file. 1 KiB is 256 float32 (512 bf16) values at a tensor's end that are exactly zero while the values before
# them are not: initialised or trained weights never do that by chance, while a tensor that is entirely zero
# (a zero-initialised projection or bias at step 0) starts its zeros at its own first byte and passes.
LONG_ZERO_RUN = 1024


def check_written(file: SafetensorsFile, model_type: str | None = None) -> None:
    """Refuse a local safetensors file whose data looks preallocated and not yet written: its data region ends in
    a run of zeros that starts inside a tensor (LONG_ZERO_RUN bytes of it or more) or covers a weight that is never
    zero, or such a weight anywhere is entirely zero. A complete header over zeros is what a writer that
    preallocates the file leaves until the bytes arrive."""
    never_zero = NEVER_ZERO_EMBEDDINGS if model_type in ZERO_CENTRED_NORMS else NEVER_ZERO
    path, read = file.path, file.bytes_at
    name = os.path.basename(path)
    spans = file.spans()
    start, end = file.data_start, file.size
    zeros_from = _zero_tail(read, start, end)
    cut = []
    if zeros_from > start and read(zeros_from - 1, zeros_from) == b"\0":  # the byte scan stopped inside the run
        zeros_from, cut = _zero_run_start(read, zeros_from, spans)
    cut = cut or [k for k, (a, b) in spans.items() if a < zeros_from and b - zeros_from >= LONG_ZERO_RUN]
    if cut:
        covered = [k for k, (a, b) in spans.items() if a >= zeros_from and b > a]
        covered.sort(key=lambda k: (not never_zero.search(k), k))  # the weights that are never zero first
        raise CheckpointError(
            path,
            f"{name} looks preallocated and not yet written: its last {end - zeros_from} bytes are zeros, "
            f"starting inside {cut[0]}, which is not zero before them{f', over {some(covered)}' if covered else ''}"
            ": what a write that stopped there leaves. Rerun once the file is complete; the step is replayed "
            "again then",
        )
    suspects = [k for k, (a, b) in spans.items() if a >= zeros_from and b > a and never_zero.search(k)]
    if not suspects:
        for k, (a, b) in spans.items():
            if never_zero.search(k) and 0 < b - a <= 2**20 and not any(file.raw(k)):
                suspects.append(k)
    if suspects:
        tail = f" its last {end - zeros_from} bytes are zeros, and" if zeros_from < end else ""
        raise CheckpointError(
            path,
            f"{name} looks preallocated and not yet written:{tail} {some(sorted(suspects))} "
            f"{'is' if len(suspects) == 1 else 'are'} entirely zero, which a norm or embedding weight never is. "
            "Rerun once the file is complete; the step is replayed again then",
        )


def _zero_tail(read, start: int, end: int) -> int:
    """Where the run of zero bytes that ends the file begins (`end`: the file does not end in zeros)."""
    pos = end
    while pos > start and end - pos < _SCAN_LIMIT:
        n = min(_TAIL if pos == end else _CHUNK, pos - start)
        chunk = read(pos - n, pos)
        stripped = chunk.rstrip(b"\0")
        if stripped:
            return pos - n + len(stripped)
        pos -= n
    return pos


def _zero_run_start(read, pos: int, spans: dict[str, tuple[int, int]]) -> tuple[int, list[str]]:
    """Where a run of zeros known from `pos` to the file's end starts, found without reading more than the first
    and last _TAIL bytes of each tensor it walks back over: (its start, []), or (`pos`, [the tensor]) when the
    tensor holding `pos` is not zero at its first bytes (the run starts inside it, at a byte not read)."""
    for k, (a, b) in sorted(spans.items(), key=lambda item: item[1], reverse=True):
        if a >= pos:
            continue
        hi = min(b, pos)  # the tensor's bytes from hi on are zero
        n = min(_TAIL, hi - a)
        stripped = read(hi - n, hi).rstrip(b"\0")
        if stripped:
            return hi - n + len(stripped), []
        pos = hi - n
        if pos > a:
            if any(read(a, a + min(_TAIL, pos - a))):
                return pos, [k]
            pos = a  # zero at both ends: taken as zero throughout
    return pos, []


def main_dtype(weights: dict[str, str]) -> torch.dtype:
    """The floating dtype most of the weights are stored in (counting tensors: norms kept in float32 inside a
    bf16 checkpoint are a minority). float32 when no weight is of a known floating type (e.g. fp8)."""
    counts: dict[torch.dtype, int] = {}
    for st in weights.values():
        if st in SAFETENSORS_FLOATS:
            counts[SAFETENSORS_FLOATS[st]] = counts.get(SAFETENSORS_FLOATS[st], 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _open_safetensors(path: str, expected: list[str] | None, plan: ReadPlan) -> SafetensorsFile:
    name = posixpath.basename(path) if is_url(path) else os.path.basename(path)
    missing = f"{name} is missing" + (f" (listed in {SAFE_INDEX_NAME})" if expected else "")
    if not is_url(path) and not os.path.exists(path):
        raise CheckpointError(path, missing)
    try:
        f = SafetensorsFile(path, plan)
        dtypes = f.dtypes()
    except FileNotFoundError:
        raise CheckpointError(path, missing) from None
    except ValueError as e:  # HeaderError
        raise CheckpointError(
            path,
            f"{name} is not a valid safetensors file ({e}; {file_size(path)} bytes): truncated, damaged or still "
            "being written",
        ) from None
    except OSError as e:
        raise CheckpointError(path, f"{name} cannot be read ({e.strerror or e})") from None
    if not dtypes:
        raise CheckpointError(path, f"{name} holds no tensors")
    if expected:
        absent = [k for k in expected if k not in dtypes]
        if absent:
            raise CheckpointError(
                path, f"{name} lacks {some(absent)}, which {SAFE_INDEX_NAME} says it holds ({len(absent)} tensors)"
            )
    return f
