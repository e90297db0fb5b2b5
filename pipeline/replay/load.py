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

A worker keeps the model between checkpoints (`ModelCache`): consecutive checkpoints of one config are copied into
it instead of building a model each time, whichever route they come by.

Every file is read once (`checkpoints.opened`): the model is built from the config already read and the tensors of
the weight files already opened, so transformers reads no file itself, but for a model whose code ships with the
checkpoint (remote code), which transformers builds from the folder.

Checkpoints in other formats (DCP folders, torch.save files) or under a trainer's names come through their key map
instead (`OpenedCheckpoint.state_dict`): the model is built from their config with empty parameters, which then take
the checkpoint's tensors, with the same checks (nothing missing, unexpected or of the wrong shape).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch import nn

from ..checkpoints.model_config import check_architecture, model_class
from ..checkpoints.opened import OpenedCheckpoint, open_checkpoint
from ..checkpoints.weightfiles import CONFIG_NAME, main_dtype
from ..devices import (
    SAFETENSORS_FLOATS,
    available_host_bytes,
    concrete_device,
    load_dtype,
    parse_dtype,
    release_pinned,
)
from ..errors import CheckpointError, describe, some
from ..locations import is_url, join, local_folder
from ..records import Checkpoint


class ModelCache:
    """The model a worker keeps between checkpoints. Building a model (from_pretrained) costs more than reading a
    small checkpoint, so consecutive checkpoints of one architecture reuse it: `load_model` takes it out, the
    replay gives it back when done. One model at a time: memory is for the checkpoint being replayed. A model
    taken out is never handed to another thread until it is given back."""

    def __init__(self):
        self._lock = threading.Lock()
        self._kept: tuple[tuple, torch.nn.Module] | None = None
        self._lent: dict[int, tuple] = {}  # id(model) -> the architecture key it was built for

    def take(self, key: tuple):
        with self._lock:
            if self._kept is None or self._kept[0] != key:
                return None
            model, self._kept = self._kept[1], None
            return model

    def lend(self, key: tuple, model) -> None:
        with self._lock:
            self._lent[id(model)] = key

    def give_back(self, model) -> None:
        with self._lock:
            key = self._lent.pop(id(model), None)
            if key is not None:
                self._kept = (key, model)

    def clear(self) -> None:
        """Drop the kept model, freeing its memory."""
        with self._lock:
            self._kept = None


def load_model(
    ckpt: Checkpoint | OpenedCheckpoint,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sinkstats",
    models: ModelCache | None = None,
):
    """Build the checkpoint's causal LM from its config.json and safetensors weights, in eval mode. The weights'
    digest is then being hashed in the background: the opened checkpoint's `digest`.

    Checkpoints of other formats, or with a `model_config` or a `key_map` set, get their config and tensors from
    the opened checkpoint's key map (`OpenedCheckpoint.state_dict`) and are built whole (see `_from_state_dict`).

    Args:
        ckpt: the checkpoint, or the checkpoint opened (`checkpoints.opened`), whose files are then not read again.
            Its `path` may be a local folder or an fsspec URL, whose headers and tensors are read by byte ranges.
        device: where the model goes ("cpu", "cuda", "cuda:1", a torch.device).
        dtype: "auto" (the checkpoint's own weight dtype on accelerators, float32 on CPU), or an explicit
            float32 / bfloat16 / float16 / float64 (names like "bf16" or torch dtypes).
        trust_remote_code: allow running modeling code shipped with the checkpoint (config.json `auto_map`),
            needed only for architectures transformers does not know. Off by default: it runs arbitrary code.
        attn_implementation: the transformers attention function; "sinkstats" (pipeline/replay/attention.py) measures
            the sink statistics, "eager" or "sdpa" are plain attention.
        models: where a model of the same architecture may be waiting, whatever the checkpoint's format; give the
            model back to it when done.

    Raises:
        CheckpointError: the checkpoint cannot be loaded; the message names the file and the problem.
        ValueError: `dtype` is not a floating dtype this function knows.
    """
    opened = open_checkpoint(ckpt)
    device = torch.device(device)
    parse_dtype(dtype)  # a bad dtype fails before any file is read
    if attn_implementation == "sinkstats":
        from . import attention  # noqa: F401  (registers "sinkstats" with transformers on import)

    if opened.mapped:
        config = mapped_config(opened, trust_remote_code)
        tensors = opened.state_dict()
        want = load_dtype(dtype, device, stored_dtype(tensors))
    else:
        want = checked(opened, device, dtype, trust_remote_code)
        opened.digest  # noqa: B018  (hashing starts now, beside the build)
    key = (opened.mapped, opened.fingerprint, str(device), want, attn_implementation)
    built = models.take(key) if models is not None else None
    if opened.mapped:
        if built is not None:
            _assign_into(built, opened.path, tensors, want)
            model = built
        else:
            model = _from_state_dict(opened, config, tensors, device, want, attn_implementation)
    elif built is not None and _load_into(built, opened):
        model = built
    else:
        model = _from_pretrained(opened, device, want, trust_remote_code, attn_implementation)
    if models is not None:
        models.lend(key, model)
    return model


def weights_in_memory(ckpt: Checkpoint | OpenedCheckpoint, device, dtype="auto") -> tuple[torch.dtype, int]:
    """The dtype `load_model(ckpt, device=device, dtype=dtype)` loads the weights in, and the bytes they then take
    (from the files' sizes, scaled from the dtype most of them are stored in). Reads headers only (for a URL, by
    byte ranges); for a checkpoint read through its key map, from the shapes of its mapped tensors (`plan`)."""
    opened = open_checkpoint(ckpt)
    if opened.mapped:
        mapped_config(opened, False)
        outputs = opened.plan.outputs
        want = load_dtype(dtype, device, stored_dtype(outputs))
        return want, sum(t.numel() for t in outputs.values()) * want.itemsize
    main = main_dtype(opened.weights)
    want = load_dtype(dtype, device, main)
    return want, opened.stored_bytes * want.itemsize // main.itemsize


def read_ahead(ckpt: Checkpoint) -> None:
    """Ask the kernel to start reading a checkpoint's weight files into the page cache, without waiting: the next
    checkpoint is read from disk while the current one runs. A no-op where the OS or the path does not allow it, and
    for a checkpoint over half the available memory: its pages would push out those of the one being replayed."""
    if not hasattr(os, "posix_fadvise") or ckpt.format != "hf":  # DCP and torch.save files hold optimizer state too
        return
    local = [p for p in ckpt.weight_files if not is_url(p)]
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


def checked(opened: OpenedCheckpoint, device, dtype, trust_remote_code: bool) -> torch.dtype:
    """What every way of loading a Hugging Face folder checks first: config.json, the architecture, every weight
    file's header (and that a local one is written). Returns the dtype the weights are to be loaded in."""
    check_architecture(opened.path, opened.config, trust_remote_code)
    return load_dtype(dtype, device, main_dtype(opened.weights))


def remote_code(opened: OpenedCheckpoint, trust_remote_code: bool) -> bool:
    """Whether transformers builds the model from code shipped with the checkpoint (config.json's `auto_map`)."""
    return trust_remote_code and isinstance(opened.config.get("auto_map"), dict)


# --------------------------------------------------------------------------------------------- checks


def check_loading(folder: str, info: dict) -> None:
    """transformers only warns about these; each one means the model would not be the checkpoint's model."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = ", ".join(f"{k} is {tuple(a)} in the file but {tuple(b)} in the model" for k, a, b in mismatched[:3])
        raise CheckpointError(folder, f"{len(mismatched)} weights do not fit config.json: {shown}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointError(
            folder,
            f"the safetensors files lack {len(missing)} of the model's weights ({some(missing)}); "
            "they would run with random values",
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        raise CheckpointError(
            folder,
            f"the safetensors files hold {len(unexpected)} tensors the model built from config.json has no place "
            f"for ({some(unexpected)}): config.json and the weights disagree",
        )


# --------------------------------------------------------------------------------------------- building


def _load_into(model, opened: OpenedCheckpoint) -> bool:
    """Copy a checkpoint's tensors into a model built for the same architecture. False when the file's names or
    shapes are not exactly the model's (transformers renames or fuses some families' weights on loading: those go
    through from_pretrained every time); the caller then drops this model, which may be partly overwritten."""
    params, weights = model.state_dict(), opened.weights
    tied = {name for name in params if name not in weights and _shares_storage(params, name, weights)}
    if set(weights) - set(params) or set(params) - set(weights) - tied:
        return False
    cuda = next(iter(params.values())).is_cuda
    files = opened.weight_files
    if any(tuple(f.get_slice(name).get_shape()) != tuple(params[name].shape) for f in files for name in f.keys()):
        return False
    with torch.no_grad():
        for f in files:  # a URL's tensors by byte ranges, several in flight
            for name, tensor in f.read_many(f.keys()).items():
                # from pinned memory the copy to the GPU is a DMA that runs while the next tensor is read
                params[name].copy_(tensor.pin_memory() if cuda else tensor, non_blocking=True)
    if cuda:
        torch.cuda.synchronize()
        release_pinned()
    return True


def _shares_storage(params: dict, name: str, present) -> bool:
    ptr = params[name].data_ptr()
    return any(params[other].data_ptr() == ptr for other in present if other in params)


def _from_state_dict(opened: OpenedCheckpoint, config, tensors: dict, device, want, attn_implementation):
    """Build the model from a config and "the state dict in transformers' names" (`OpenedCheckpoint.state_dict`):
    the parameters start on the meta device (no random init, no memory) and take the checkpoint's tensors."""
    from transformers import AutoModelForCausalLM

    try:
        with parameters_on_meta(), quiet_transformers():
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=want)
    except Exception as e:
        raise CheckpointError(opened.config_path, f"transformers could not build the model: {describe(e)}") from e
    expected = check_state_dict(opened.path, tensors, model)
    model.load_state_dict({k: t.to(want) for k, t in tensors.items() if k in expected}, strict=False, assign=True)
    model.tie_weights()
    return model.to(concrete_device(device)).eval()


def _assign_into(model, where: str, tensors: dict, want) -> None:
    """Copy a mapped state dict into a model built for the same config, as `_from_state_dict` would have assigned
    it: the tied weights (the output head sharing the embedding) keep following the weight they are tied to."""
    expected = check_state_dict(where, tensors, model)
    tied = set(model.all_tied_weights_keys) if getattr(model, "all_tied_weights_keys", None) else set()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in expected and name not in tied:
                expected[name].copy_(tensor.to(want))


def mapped_config(opened: OpenedCheckpoint, trust_remote_code: bool):
    """transformers' config object for a checkpoint read through its key map (`OpenedCheckpoint`'s, built once),
    its architecture checked."""
    check_architecture(opened.config_path, opened.config, trust_remote_code)
    return opened.transformers_config


def stored_dtype(tensors: dict) -> torch.dtype:
    """The floating dtype most of a state dict's tensors (real or on the meta device) are in."""
    return main_dtype({k: _ST_NAMES.get(t.dtype, "") for k, t in tensors.items()})


def check_state_dict(where: str, tensors: dict, model) -> dict:
    """That a state dict in transformers' names (tensors real or on the meta device) fills `model` exactly: nothing
    missing (but tied weights), unexpected or of the wrong shape. Returns the model's state dict.

    Raises:
        CheckpointError: naming the checkpoint and the tensors.
    """
    expected = model.state_dict()
    tied = set(model.all_tied_weights_keys) if getattr(model, "all_tied_weights_keys", None) else set()
    missing = sorted(k for k in expected if k not in tensors and k not in tied)
    unexpected = sorted(k for k in tensors if k not in expected)
    mismatched = [
        (k, tuple(tensors[k].shape), tuple(expected[k].shape))
        for k in sorted(expected)
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        shown = ", ".join(f"{k} is {a} in the checkpoint but {b} in the model" for k, a, b in mismatched[:3])
        raise CheckpointError(where, f"{len(mismatched)} tensors do not fit the model config: {shown}")
    if missing:
        raise CheckpointError(
            where,
            f"nothing in the checkpoint fills {len(missing)} of the model's tensors ({some(missing)}); they would "
            "run with random values: check checkpoints.key_map and checkpoints.model_config",
        )
    if unexpected:
        raise CheckpointError(
            where,
            f"the key map yields {len(unexpected)} tensors the model has no place for ({some(unexpected)}): the "
            "model config and the checkpoint disagree",
        )
    return expected


_ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_FLOATS.items()}


def _from_pretrained(opened: OpenedCheckpoint, device, dtype, trust_remote_code, attn_implementation):
    """transformers' from_pretrained over the config already read and the tensors of the files already opened;
    with remote code, over the folder (a URL's files copied first), which transformers then reads itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if remote_code(opened, trust_remote_code):
        with local_folder(opened.path) as folder:
            try:
                config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
            except Exception as e:
                raise CheckpointError(join(folder, CONFIG_NAME), f"transformers rejects it: {describe(e)}") from e
            files = {"use_safetensors": True, "local_files_only": True}
            return _build(AutoModelForCausalLM, folder, config, files, folder, device, dtype, True, attn_implementation)
    config = opened.transformers_config
    # the class itself: AutoModelForCausalLM.from_pretrained looks for remote code in a folder even when handed tensors
    tensors = {"state_dict": opened.tensors()}
    return _build(
        model_class(config), None, config, tensors, opened.path, device, dtype, trust_remote_code, attn_implementation
    )


def _build(builder, folder, config, source: dict, where, device, dtype, trust_remote_code, attn_implementation):
    """`builder.from_pretrained(folder, config=config, **source)`; `where` names the checkpoint in errors."""
    from transformers.utils import is_accelerate_available

    # Loading straight onto the device needs a device_map, which transformers only takes with accelerate
    # installed; without it, load on the CPU and move.
    direct = device.type != "cpu" and is_accelerate_available()
    device = concrete_device(device)
    try:
        with quiet_transformers():
            model, info = builder.from_pretrained(
                folder,
                config=config,
                **source,
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
        raise CheckpointError(where, f"transformers could not build the model from it: {describe(e)}") from e
    check_loading(where, info)
    if not direct and device.type != "cpu":
        model = model.to(device)
    return model.eval()


_META = threading.local()  # set in the thread building a skeleton; other threads build models as usual
_PATCH = {"depth": 0, "register": None}
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device but their buffers real, as accelerate's
    init_empty_weights(include_buffers=False) does: non-persistent buffers (rotary frequencies) are in no file.
    The patch of nn.Module.register_parameter acts only in this thread: a Dask worker may build models in others."""
    with _PATCH_LOCK:
        if _PATCH["depth"] == 0:
            register = _PATCH["register"] = nn.Module.register_parameter

            def on_meta(module, name, param):
                register(module, name, param)
                if param is not None and getattr(_META, "active", False):
                    p = module._parameters[name]
                    module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

            nn.Module.register_parameter = on_meta
        _PATCH["depth"] += 1
    _META.active = True
    try:
        yield
    finally:
        _META.active = False
        with _PATCH_LOCK:
            _PATCH["depth"] -= 1
            if _PATCH["depth"] == 0:
                nn.Module.register_parameter = _PATCH["register"]


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
