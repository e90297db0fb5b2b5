"""The state dict of a checkpoint in transformers' names, whatever wrote it, and the config of its model.

Replay asks two things of a checkpoint that transformers cannot load by itself (a DCP folder, a `torch.save`
file, or safetensors under a trainer's names): `hf_config` (the Hugging Face config describing its network) and
its tensors (`Saved`, renamed and reshaped for that network by `OpenedCheckpoint.state_dict`). The reading is
the format modules' job (`formats/`), the renaming the key maps' (`keymaps/`). A replay hands both the same
`Saved`, so a torch.save file's pickle (or DCP's .metadata) is read once for the key map, the config and the
tensors, and the tensors are read by byte ranges, a subset at a time if the caller asks so (`Saved.specs`,
`Saved.tensors(names)`), from the local disk or any fsspec URL.

Where the config comes from, first that applies: `checkpoints.model_config` (a config.json, or a folder holding
one); a Hugging Face config.json in the checkpoint's folder; for tensors already in transformers' names (the
Trainer's FSDP SHARDED_STATE_DICT checkpoints, which hold no config.json), the config.json in the run folder above
them, which the Trainer's `save_model` writes at the end of training when the model is saved whole; the
checkpoint's own description of its architecture, as its key map's `saved_config` hook reads it (nanoGPT's
`model_args`, nanochat's `meta_<step>.json`, litgpt's `model_config.yaml`, the `model` section of the config.json
OLMo-core saves in each step folder), when it maps onto a transformers architecture exactly: a setting its key map
neither carries nor knows to leave the network unchanged refuses the run, naming the setting. Otherwise the
checkpoint cannot be replayed and a ModelConfigNeeded error says which key to set. Both settings travel on the
Checkpoint record (`model_config`, `key_map`), so the worker that loads a checkpoint knows how to read it.
"""

from __future__ import annotations

import json
import os
import posixpath

import torch

from ..errors import CheckpointError, some
from ..locations import is_file, is_url, join, read_bytes
from ..records import Checkpoint
from .byteranges import ReadPlan
from .model_config import read_config
from .safetensorsfile import DTYPES
from .weightfiles import open_weight_files


class ModelConfigNeeded(CheckpointError):
    """The checkpoint does not say which transformers architecture it is: `checkpoints.model_config` must."""


def needs_mapping(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint goes through this module (else transformers' from_pretrained reads the folder)."""
    return ckpt.format != "hf" or bool(ckpt.model_config) or ckpt.key_map not in ("auto", "none")


class Saved:
    """One checkpoint's files as its trainer saved them, on the local disk or behind an fsspec URL: the small ones
    (DCP's .metadata, a torch.save file's pickle, safetensors headers) read at most once while this object lives,
    the tensors read by byte ranges when asked for, only those asked for. Key maps' `saved_config` hooks read what
    the trainer saved through it."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._loaded: dict | None = None
        self._metadata = None
        self._safetensors: list | None = None

    @property
    def weight_file(self) -> str:
        """The torch.save file, or the folder holding the DCP."""
        return self.ckpt.weight_files[0]

    @property
    def plan(self) -> ReadPlan:
        return ReadPlan(concurrency=self.ckpt.read_concurrency)

    def torch_file(self) -> dict:
        """The torch.save file's top-level dict (`torchfile.load`: tensors on the meta device, no data read)."""
        if self._loaded is None:
            from .formats import torchfile

            self._loaded = torchfile.load(self.weight_file)
        return self._loaded

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name: (shape, dtype)} of the model's tensors under the checkpoint's own names, no tensor data read."""
        ckpt = self.ckpt
        if ckpt.format == "dcp":
            from .formats import dcp

            return dcp.tensor_specs(self.weight_file, self._dcp_metadata())
        if ckpt.format == "torch":
            return {name: (tuple(t.shape), t.dtype) for name, t in self._torch_tensors().items()}
        return {
            name: (tuple(f.get_slice(name).get_shape()), DTYPES[dtype])
            for f in self._safetensors_files()
            for name, dtype in f.dtypes().items()
        }

    def tensor_names(self) -> list[str]:
        """The names of the model's tensors, without reading their data."""
        return list(self.specs())

    def tensors(self, names=None) -> dict[str, torch.Tensor]:
        """The model's tensors (all of them, or those in `names`) under the names the checkpoint gives them: only
        their bytes are read, the optimizer's never."""
        ckpt = self.ckpt
        if ckpt.format == "dcp":
            from .formats import dcp

            return dcp.read_tensors(self.weight_file, names, self.plan, self._dcp_metadata())
        if ckpt.format == "torch":
            from .formats import torchfile

            tensors = self._torch_tensors()
            unknown = sorted(set(names or ()) - set(tensors))
            if unknown:
                name = posixpath.basename(self.weight_file)
                raise CheckpointError(self.weight_file, f"{name} holds no model tensor {some(unknown)}")
            wanted = tensors if names is None else {n: tensors[n] for n in names}
            return torchfile.read(self.weight_file, wanted, self.plan)
        files = self._safetensors_files()
        where = {name: f for f in files for name in f.keys()}
        unknown = sorted(set(names or ()) - set(where))
        if unknown:
            raise CheckpointError(ckpt.path, f"the weight files hold no tensor {some(unknown)}")
        wanted = list(where) if names is None else list(names)
        by_file: dict[str, tuple] = {}
        for name in wanted:  # each file's tensors asked at once: on a URL, requests merged and in flight
            by_file.setdefault(where[name].path, (where[name], []))[1].append(name)
        read = {}
        for f, group in by_file.values():
            read.update(f.read_many(group, self.plan))
        return {name: read[name] for name in wanted}

    def _torch_tensors(self) -> dict[str, torch.Tensor]:
        from .formats import torchfile

        return torchfile.model_tensors(self.torch_file(), self.weight_file)

    def _dcp_metadata(self):
        if self._metadata is None:
            from .formats import dcp

            self._metadata = dcp.read_metadata(self.weight_file)
        return self._metadata

    def _safetensors_files(self) -> list:
        if self._safetensors is None:
            self._safetensors = open_weight_files(self.ckpt.path, self.plan)
        return self._safetensors

    def description(self, path: str) -> dict:
        """A JSON or YAML file a trainer saved beside its weights (local or behind a URL), as a dict ({} when there
        is none)."""
        import yaml

        if not path or not is_file(path):
            return {}
        name = posixpath.basename(path) if is_url(path) else os.path.basename(path)
        try:
            described = yaml.safe_load(read_bytes(path).decode("utf-8"))  # JSON is YAML
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CheckpointError(path, f"{name} is not readable JSON or YAML ({e})") from None
        if not isinstance(described, dict):
            raise CheckpointError(path, f"{name} holds a {type(described).__name__}, not a mapping")
        return described


def hf_config(ckpt: Checkpoint, saved: Saved | None = None) -> dict:
    """The Hugging Face config (as a dict with a model_type) of the checkpoint's network. `saved`: the checkpoint's
    files as read so far (a Saved of `ckpt`), which the config may come from.

    Raises:
        ModelConfigNeeded: nothing describes the architecture unambiguously.
        CheckpointError: a config file is unreadable.
    """
    if ckpt.model_config:
        return read_config(os.path.expanduser(ckpt.model_config))
    if ckpt.format == "hf" or _is_hf_config(ckpt.path):
        return read_config(ckpt.path)
    from . import keymaps

    saved = saved if saved is not None else Saved(ckpt)
    name = resolve_key_map(ckpt, saved)
    run_folder = posixpath.dirname(ckpt.path.rstrip("/")) if is_url(ckpt.path) else os.path.dirname(ckpt.path)
    if name == "none" and run_folder and _is_hf_config(run_folder):
        return read_config(run_folder)  # the Trainer's save_model at the end of training, above its checkpoints
    derive = getattr(keymaps.module(name), "saved_config", None)
    try:
        derived = derive(saved) if derive else None
    except keymaps.Unmapped as e:  # a setting the map cannot carry: the run is refused, as with no config at all
        raise ModelConfigNeeded(
            e.path, f"{e.problem}; to replay it anyway, set checkpoints.model_config to a Hugging Face config.json"
        ) from None
    except (KeyError, TypeError, ValueError) as e:
        raise ModelConfigNeeded(
            ckpt.path,
            f"the architecture the trainer saved beside the weights is incomplete ({type(e).__name__}: {e}): set "
            "checkpoints.model_config to a Hugging Face config.json for the network it holds",
        ) from None
    if derived is None and name == "none" and ckpt.format == "dcp":
        raise ModelConfigNeeded(
            ckpt.path,
            "the tensors carry transformers' names but no config.json says which model they make, neither in the "
            f"checkpoint nor in the run folder above it ({run_folder}), where the Trainer's save_model writes one "
            "at the end of training: set checkpoints.model_config to that model's config.json",
        )
    if derived is None:
        raise ModelConfigNeeded(
            ckpt.path,
            f"the checkpoint ({ckpt.format} format, key map {name}) does not describe its architecture in a way that "
            "maps onto a transformers model: set checkpoints.model_config to a Hugging Face config.json (or a "
            "folder holding one) for the network it holds",
        )
    return derived


def resolve_key_map(ckpt: Checkpoint, saved: Saved | None = None) -> str:
    """The checkpoint's key map; for `auto` the map its tensor names show (read from the metadata or headers)."""
    from . import keymaps

    if ckpt.key_map != "auto":
        keymaps.module(ckpt.key_map)  # a typo fails here, naming the choices
        return ckpt.key_map
    return keymaps.detect((saved if saved is not None else Saved(ckpt)).tensor_names())


def _is_hf_config(folder: str) -> bool:
    try:
        config = json.loads(read_bytes(join(folder, "config.json")))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("model_type"), str)
