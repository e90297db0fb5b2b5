"""Load stage: build a checkpoint's model with transformers, after checking every file it will read.

transformers does the building and the loading (`AutoModelForCausalLM.from_pretrained` with
`use_safetensors=True` and `local_files_only=True`: never a pickle, never the network). What this module adds is
the checking first, so that bad input stops with a CheckpointError naming the file and the problem instead of a
stack trace from deep inside transformers, or worse, a model that silently runs with random weights:

- config.json: present, a JSON object, with a `model_type` that transformers knows (or remote code allowed);
- weights: model.safetensors, or every shard model.safetensors.index.json lists, each opened with
  `safetensors.safe_open`, which validates the header and that the data covers the file exactly (so a truncated
  file fails), and each holding the tensors the index maps to it;
- after loading: no parameter missing (it would be left at its random init), unexpected or of the wrong shape.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading

import torch

from .discover import CONFIG_NAME, PICKLE_SUFFIXES, SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME, TRAINING_STATE, shard_names
from .records import Checkpoint, CheckpointError

# safetensors dtype names -> torch, for the floating types a model's weights come in
_ST_FLOAT = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
# Models built in this process, ready for the next checkpoint of the same architecture (see release_model).
_BUILT: dict[tuple, torch.nn.Module] = {}
_BUILT_LOCK = threading.Lock()

# Keys that do not change the network a config describes: bookkeeping, runtime switches, the storage dtype.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "name_or_path", "use_cache", "attn_implementation",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript",
})


def load_model(
    ckpt: Checkpoint,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sinkstats",
):
    """Build the checkpoint's causal LM from its config.json and safetensors weights, in eval mode.

    Args:
        ckpt: the checkpoint (its `path` may be a local folder or an fsspec URL; a URL is copied to a
            temporary local folder first).
        device: where the model goes ("cpu", "cuda", "cuda:1", a torch.device).
        dtype: "auto" (the checkpoint's own weight dtype on accelerators, float32 on CPU), or an explicit
            float32 / bfloat16 / float16 / float64 (names like "bf16" or torch dtypes).
        trust_remote_code: allow running modeling code shipped with the checkpoint (config.json `auto_map`),
            needed only for architectures transformers does not know. Off by default: it runs arbitrary code.
        attn_implementation: the transformers attention function; "sinkstats" (pipeline/attention.py) measures
            the sink statistics, "eager" or "sdpa" are plain attention.

    Raises:
        CheckpointError: the checkpoint cannot be loaded; the message names the file and the problem.
        ValueError: `dtype` is not a floating dtype this function knows.
    """
    device = torch.device(device)
    _parse_dtype(dtype)  # a bad dtype fails before any file is read
    if attn_implementation == "sinkstats":
        from . import attention  # noqa: F401  (registers "sinkstats" with transformers on import)

    with _local_folder(ckpt.path) as folder:
        config, weights, want = checked_folder(folder, device, dtype, trust_remote_code)
        key = (config_fingerprint(config), str(device), want, attn_implementation)
        with _BUILT_LOCK:
            built = _BUILT.pop(key, None)  # taken, so no other thread of this worker uses it meanwhile
        if built is not None and _load_into(built, folder, weights):
            model = built
        else:
            model = _from_pretrained(folder, device, want, trust_remote_code, attn_implementation)
        model._sinktrace_key = key
        return model


def release_model(model) -> None:
    """Hand a model back for the next checkpoint of the same architecture in this process: building a model
    (from_pretrained) costs more than reading a small checkpoint, so a replay reuses one per architecture."""
    key = getattr(model, "_sinktrace_key", None)
    if key is not None:
        with _BUILT_LOCK:
            _BUILT.clear()  # one model at a time: memory is for the checkpoint being replayed
            _BUILT[key] = model


def forget_models() -> None:
    """Drop the model kept for reuse (see release_model), freeing its memory."""
    with _BUILT_LOCK:
        _BUILT.clear()


def weights_in_memory(ckpt: Checkpoint, device, dtype="auto") -> tuple[torch.dtype, int]:
    """The dtype `load_model(ckpt, device=device, dtype=dtype)` loads the weights in, and the bytes they then take
    (from the files' sizes, scaled from the dtype most of them are stored in). Reads headers only; for a URL, not
    even those: the stored dtype is config.json's, so that nothing is downloaded twice."""
    if _is_url(ckpt.path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(ckpt.path)
        files = ckpt.weight_files or [p for p in fs.ls(root, detail=False) if p.endswith(".safetensors")]
        stored = sum(fs.size(p) for p in files)
        config = read_config(ckpt)
        try:
            main = _parse_dtype(config.get("dtype") or config.get("torch_dtype") or "float32") or torch.float32
        except ValueError:
            main = torch.float32
    else:
        with _local_folder(ckpt.path) as folder:
            main = _main_dtype(validate_weights(folder))
            stored = sum(os.path.getsize(p) for p in _weight_paths(folder))
    want = _load_dtype(dtype, device, main)
    return want, stored * want.itemsize // main.itemsize


def read_ahead(ckpt: Checkpoint) -> None:
    """Ask the kernel to start reading a checkpoint's weight files into the page cache, without waiting: the next
    checkpoint is read from disk while the current one runs. A no-op where the OS or the path does not allow it, and
    for a checkpoint over half the available memory: its pages would push out those of the one being replayed."""
    if not hasattr(os, "posix_fadvise"):
        return
    local = [p for p in ckpt.weight_files if not _is_url(p)]
    try:
        if sum(os.path.getsize(p) for p in local) > available_host_bytes() // 2:
            return
    except OSError:
        return
    for path in local:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def available_host_bytes() -> int:
    """Memory the OS can hand out now without swapping (MemAvailable), page cache it may take back included."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def read_config(ckpt: Checkpoint | str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict, checked to be a JSON object with a `model_type`.

    Raises:
        CheckpointError: config.json is missing, unreadable, not JSON, or names no model_type.
    """
    folder = ckpt.path if isinstance(ckpt, Checkpoint) else os.fspath(ckpt)
    path = _join(folder, CONFIG_NAME)
    try:
        raw = _read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(path, "config.json is missing: transformers cannot tell what model to build") from None
    except OSError as e:
        raise CheckpointError(path, f"config.json cannot be read ({e.strerror or e})") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"config.json is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        where = f"{e.msg}: line {e.lineno}, column {e.colno}"
        raise CheckpointError(path, f"config.json is not valid JSON ({where})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"config.json holds a JSON {type(config).__name__}, not an object")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(
            path, "config.json has no model_type, so transformers cannot tell which architecture to build"
        )
    return config


def config_fingerprint(config: dict) -> str:
    """sha256 of the architecture a config describes, the same for the raw config.json and for `model.config.to_dict()`.

    Dropped before hashing: bookkeeping and runtime keys (transformers_version, dtype/torch_dtype, _name_or_path,
    use_cache, any `_`-prefixed key, ...) and keys equal to transformers' generic PreTrainedConfig defaults
    (which `to_dict()` adds and config.json omits). Known architectures are first filled in with their own
    defaults, so a config.json that omits a default and one that spells it out hash the same.
    """
    return hashlib.sha256(
        json.dumps(_normalise(config), sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def checked_folder(folder: str, device, dtype, trust_remote_code: bool) -> tuple[dict, dict[str, str], torch.dtype]:
    """What every way of loading checks first: config.json, the architecture, every weight file's header.
    Returns the config, {tensor name: safetensors dtype} and the dtype the weights are to be loaded in."""
    config = read_config(folder)
    _check_architecture(folder, config, trust_remote_code)
    weights = validate_weights(folder)
    return config, weights, _load_dtype(dtype, device, _main_dtype(weights))


def _load_dtype(dtype, device, stored: torch.dtype) -> torch.dtype:
    """`dtype` parsed; "auto" is float32 on the CPU and the checkpoint's own (`stored`) on an accelerator."""
    return _parse_dtype(dtype) or (torch.float32 if torch.device(device).type == "cpu" else stored)


def concrete_device(device) -> torch.device:
    """A bare "cuda" made the current GPU, as transformers resolves it (its loader threads would take GPU 0)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def validate_weights(folder: str) -> dict[str, str]:
    """Check the safetensors files transformers will load; return {tensor name: safetensors dtype, e.g. "BF16"}.

    Resolves the files like transformers does (model.safetensors first, else model.safetensors.index.json).
    Only headers are read, never tensor data.

    Raises:
        CheckpointError: a file is missing, truncated or malformed, the index is broken or maps a tensor to a
            shard that lacks it, or the folder holds only pickled weights.
    """
    dtypes = {}
    for path, expected in _weight_files(folder):
        dtypes.update(_open_safetensors(path, expected))
    return dtypes


def _weight_files(folder: str) -> list[tuple[str, list[str] | None]]:
    """The safetensors files transformers loads, each with the tensors the index says it holds (None: no index)."""
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [(single, None)]
    index_path = os.path.join(folder, SAFE_INDEX_NAME)
    if not os.path.isfile(index_path):
        names = sorted(os.listdir(folder))
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES) and not TRAINING_STATE.search(n)]
        if pickles:
            raise CheckpointError(
                folder,
                f"only pickled weights ({', '.join(pickles)}); pickled files are never loaded because unpickling "
                "can run code: convert them to safetensors",
            )
        raise CheckpointError(folder, f"no weights: neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}")
    try:
        index = json.loads(_read_bytes(index_path).decode("utf-8"))
        shards = shard_names(index)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError included
        raise CheckpointError(index_path, f"{SAFE_INDEX_NAME} is unusable: {e}") from None
    by_shard: dict[str, list[str]] = {}
    for tensor, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(tensor)
    return [(os.path.join(folder, *shard.split("/")), by_shard[shard]) for shard in shards]


# --------------------------------------------------------------------------------------------- checks


def _open_safetensors(path: str, expected: list[str] | None) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    name = os.path.basename(path)
    if not os.path.exists(path):
        raise CheckpointError(path, f"{name} is missing" + (f" (listed in {SAFE_INDEX_NAME})" if expected else ""))
    try:
        with safe_open(path, framework="pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except SafetensorError as e:
        size = os.path.getsize(path)
        raise CheckpointError(
            path,
            f"{name} is not a valid safetensors file ({e}; {size} bytes): truncated, damaged or still being written",
        ) from None
    except OSError as e:
        raise CheckpointError(path, f"{name} cannot be read ({e.strerror or e})") from None
    if not dtypes:
        raise CheckpointError(path, f"{name} holds no tensors")
    if expected:
        absent = [k for k in expected if k not in dtypes]
        if absent:
            raise CheckpointError(
                path, f"{name} lacks {_some(absent)}, which {SAFE_INDEX_NAME} says it holds ({len(absent)} tensors)"
            )
    return dtypes


def _check_architecture(folder: str, config: dict, trust_remote_code: bool) -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = os.path.join(folder, CONFIG_NAME)
    model_type = config["model_type"]
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if model_type in CONFIG_MAPPING:
        if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING and not (
            trust_remote_code and "AutoModelForCausalLM" in auto_map
        ):
            raise CheckpointError(
                path,
                f"model_type {model_type!r} has no causal language model class in transformers "
                f"{transformers.__version__}",
            )
        return
    if not trust_remote_code:
        hint = (
            " config.json's auto_map points to modeling code shipped with the checkpoint: pass "
            "trust_remote_code=True to run it, only if you trust its source"
            if auto_map else ""
        )
        raise CheckpointError(
            path,
            f"unknown model_type {model_type!r}: transformers {transformers.__version__} does not know this "
            f"architecture, and remote code is off (trust_remote_code=False).{hint}",
        )
    missing = [k for k in ("AutoConfig", "AutoModelForCausalLM") if k not in auto_map]
    if missing:
        raise CheckpointError(
            path,
            f"unknown model_type {model_type!r}: transformers {transformers.__version__} does not know this "
            f"architecture and config.json's auto_map names no {' or '.join(missing)} to load remote code from",
        )


def _check_loading(folder: str, info: dict) -> None:
    """transformers only warns about these; each one means the model would not be the checkpoint's model."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = ", ".join(f"{k} is {tuple(a)} in the file but {tuple(b)} in the model" for k, a, b in mismatched[:3])
        raise CheckpointError(folder, f"{len(mismatched)} weights do not fit config.json: {shown}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            folder,
            f"the safetensors files lack {len(missing)} of the model's weights ({_some(missing)}); "
            "they would run with random values",
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        raise CheckpointError(
            folder,
            f"the safetensors files hold {len(unexpected)} tensors the model built from config.json has no place "
            f"for ({_some(unexpected)}): config.json and the weights disagree",
        )


# --------------------------------------------------------------------------------------------- building


def _load_into(model, folder: str, weights: dict[str, str]) -> bool:
    """Copy a checkpoint's tensors into a model built for the same architecture. False when the file's names or
    shapes are not exactly the model's (transformers renames or fuses some families' weights on loading: those go
    through from_pretrained every time); the caller then drops this model, which may be partly overwritten."""
    from safetensors import safe_open

    params = model.state_dict()
    tied = {name for name in params if name not in weights and _shares_storage(params, name, weights)}
    if set(weights) - set(params) or set(params) - set(weights) - tied:
        return False
    cuda = next(iter(params.values())).is_cuda
    with torch.no_grad():
        for path in _weight_paths(folder):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if tuple(f.get_slice(name).get_shape()) != tuple(params[name].shape):
                        return False
                    tensor = f.get_tensor(name)
                    # from pinned memory the copy to the GPU is a DMA that runs while the next tensor is read
                    params[name].copy_(tensor.pin_memory() if cuda else tensor, non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
        _release_pinned()
    return True


def _release_pinned() -> None:
    """Hand pinned staging memory back to the OS: torch caches it, and locked pages cannot be swapped out."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _shares_storage(params: dict, name: str, present) -> bool:
    ptr = params[name].data_ptr()
    return any(params[other].data_ptr() == ptr for other in present if other in params)


def _weight_paths(folder: str) -> list[str]:
    return [path for path, _ in _weight_files(folder)]


def _from_pretrained(folder, device, dtype, trust_remote_code, attn_implementation):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    # Loading straight onto the device needs a device_map, which transformers only takes with accelerate
    # installed; without it, load on the CPU and move.
    direct = device.type != "cpu" and is_accelerate_available()
    device = concrete_device(device)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(os.path.join(folder, CONFIG_NAME), f"transformers rejects it: {_describe(e)}") from e
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder,
                config=config,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                dtype=dtype,
                attn_implementation=attn_implementation,
                ignore_mismatched_sizes=True,  # so that we, not a bare RuntimeError, report the shapes
                output_loading_info=True,
                **({"device_map": {"": device}} if direct else {}),
            )
    except torch.OutOfMemoryError:  # the machine's problem, not the checkpoint's: the caller may retry elsewhere
        raise
    except Exception as e:
        raise CheckpointError(folder, f"transformers could not build the model from it: {_describe(e)}") from e
    _check_loading(folder, info)
    if not direct and device.type != "cpu":
        model = model.to(device)
    return model.eval()


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-call progress bars ("Loading weights", "Writing model shards") under our own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _describe(e: Exception) -> str:
    message = " ".join(str(e).split())  # transformers' messages span lines; keep the record on one
    return f"{type(e).__name__}: {message if len(message) <= 600 else message[:600] + ' ...'}"


def _parse_dtype(dtype) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto', float32, bfloat16, float16 or float64; got {dtype!r}")
    return _DTYPE_NAMES[name]


def _main_dtype(weights: dict[str, str]) -> torch.dtype:
    """The floating dtype most of the weights are stored in (counting tensors: norms kept in float32 inside a
    bf16 checkpoint are a minority). float32 when no weight is of a known floating type (e.g. fp8)."""
    counts: dict[torch.dtype, int] = {}
    for st in weights.values():
        if st in _ST_FLOAT:
            counts[_ST_FLOAT[st]] = counts.get(_ST_FLOAT[st], 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


# --------------------------------------------------------------------------------------------- config hashing


@functools.cache
def _generic_defaults() -> dict:
    from transformers import PreTrainedConfig

    return PreTrainedConfig().to_dict()


def _normalise(config: dict) -> dict:
    config = copy.deepcopy(config)
    model_type = config.get("model_type")
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
            config = CONFIG_MAPPING[model_type].from_dict(config).to_dict()
    except Exception:  # an odd config still gets a fingerprint, from its raw keys
        pass
    return _strip(config)


def _strip(obj):
    if isinstance(obj, dict):
        generic = _generic_defaults() if "model_type" in obj else {}
        return {
            k: _strip(v) for k, v in obj.items()
            if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS and not (k in generic and generic[k] == v)
        }
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- files


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if _is_url(folder) else os.path.join(folder.removeprefix("file://"), name)


def _read_bytes(path: str) -> bytes:
    if _is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def _local_folder(path: str):
    """The checkpoint as a local folder: itself, or for a URL a temporary copy of the files loading reads
    (config, index, safetensors, remote code), removed afterwards. Optimizer states and other pickles stay."""
    if not _is_url(path):
        folder = os.path.abspath(path.removeprefix("file://"))
        if not os.path.isdir(folder):
            raise CheckpointError(folder, "the checkpoint folder does not exist")
        yield folder
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    if not fs.isdir(remote):
        raise CheckpointError(path, "the checkpoint folder does not exist")
    tmp = tempfile.mkdtemp(prefix="sinktrace-ckpt-")
    try:
        for info in fs.ls(remote, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if info.get("type") != "directory" and name.endswith((".json", ".safetensors", ".py")):
                fs.get_file(info["name"], os.path.join(tmp, name))
        try:
            yield tmp
        except CheckpointError as e:  # name the user's file, not our temporary copy
            url = fs.unstrip_protocol(remote)
            raise CheckpointError(e.path.replace(tmp, url), e.problem.replace(tmp, url)) from e.__cause__
    finally:
        # safe even while the model's tensors are memory-mapped: the open mapping keeps the data alive
        shutil.rmtree(tmp, ignore_errors=True)


def _some(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown if len(names) <= n else f"{shown} and {len(names) - n} more"
