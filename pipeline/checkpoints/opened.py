"""An opened checkpoint: everything a replay needs to know about one checkpoint, each worked out once.

`open_checkpoint(ckpt)` is where a replay reads a checkpoint's files; everything else (the driver's store set-up,
the model builder, the layer-by-layer route, the measurement, the step's dataset) asks the object it returns. What
it holds is worked out when first asked for and kept, so a fact no caller needs is never read (the driver asks for
the config and the key map only, and a Hub checkpoint's weights are not fetched by then):

- `config`: the Hugging Face config as a dict (config.json, `checkpoints.model_config`, or what the trainer saved:
  `statedict.hf_config`), `fingerprint` (`model_config.config_fingerprint`) and `route` (`attention_route`);
- `mapped` (whether it goes through `statedict`), `key_map` (resolved: `none` for a folder transformers reads);
- `saved` (`statedict.Saved`: the trainer's files, a torch.save file loaded once) for mapped checkpoints;
- `transformers_config`: transformers' config object, built from `config` once for every use in a replay;
- `plan` (the key map over the tensors' names and shapes, nothing read) and `state_dict()` (the tensors in
  transformers' names) for mapped checkpoints;
- `weight_files` (each safetensors file opened once, its header checked: `safetensorsfile.SafetensorsFile`),
  `weights` ({name: safetensors dtype}), `stored_bytes` and `tensors()` for Hugging Face folders;
- `digest`: the weights' digest, hashed in the background from the files opened, or, for a mapped checkpoint, from
  its tensors in transformers' names as the loader reads them (`state_dict()` or the layer-by-layer route's parts).
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import CheckpointError, describe
from ..locations import check_folder, join
from ..records import Checkpoint
from .byteranges import ReadPlan
from .digest import PendingDigest, start_digest, start_tensor_digest
from .model_config import attention_route, config_fingerprint
from .safetensorsfile import SafetensorsFile
from .statedict import Saved, hf_config, needs_mapping, resolve_key_map
from .weightfiles import CONFIG_NAME, check_written, open_weight_files


class OpenedCheckpoint:
    """One checkpoint, opened. Its facts are properties, each computed once; a CheckpointError raised while working
    one out names the file and the problem, as reading the file would."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.mapped = needs_mapping(ckpt)
        self.saved = Saved(ckpt) if self.mapped else None
        self._digest: PendingDigest | None = None

    def __repr__(self) -> str:
        return f"OpenedCheckpoint(step={self.ckpt.step}, path={self.ckpt.path!r}, format={self.ckpt.format!r})"

    @property
    def path(self) -> str:
        return self.ckpt.path

    @property
    def format(self) -> str:
        return self.ckpt.format

    @property
    def config_path(self) -> str:
        """Where the config comes from: `checkpoints.model_config`, or the checkpoint itself."""
        return os.path.expanduser(self.ckpt.model_config) if self.ckpt.model_config else self.ckpt.path

    @functools.cached_property
    def config(self) -> dict:
        if not self.mapped:
            check_folder(self.ckpt.path)
        return hf_config(self.ckpt, self.saved)

    @functools.cached_property
    def fingerprint(self) -> str:
        return config_fingerprint(self.config)

    @functools.cached_property
    def route(self) -> str:
        return attention_route(self.config)

    @functools.cached_property
    def key_map(self) -> str:
        return resolve_key_map(self.ckpt, self.saved) if self.mapped else "none"

    @functools.cached_property
    def transformers_config(self):
        """transformers' config object (a PretrainedConfig) for `config`; the caller checks the architecture first
        (`model_config.check_architecture`). Not for a model whose code ships with the checkpoint."""
        from transformers import CONFIG_MAPPING

        if self.mapped:
            where, problem = self.config_path, "transformers rejects the model config"
        else:
            where, problem = join(self.path, CONFIG_NAME), "transformers rejects it"
        try:
            return CONFIG_MAPPING[self.config["model_type"]].from_dict(self.config)
        except Exception as e:
            raise CheckpointError(where, f"{problem}: {describe(e)}") from e

    @functools.cached_property
    def plan(self):
        """A mapped checkpoint's key map over its tensors' names and shapes (`keymaps.plan`): nothing is read."""
        from . import keymaps

        return keymaps.plan(self.key_map, self.saved.specs(), self.transformers_config, self.path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A mapped checkpoint's tensors in transformers' names and layouts, on the CPU (the key map applied to the
        tensors read), their digest started (`digest`). Each call reads them again: the loader asks once."""
        from . import keymaps

        tensors = keymaps.apply(self.key_map, self.saved.tensors(), self.transformers_config, self.path)
        self._digest = start_tensor_digest(tensors)
        return tensors

    @property
    def step_attrs(self) -> dict:
        """What the step's dataset records of the model (`schema.STEP_ATTRS`)."""
        return {
            "architecture": self.config.get("model_type", "unknown"),
            "config_fingerprint": self.fingerprint,
            "attention_route": self.route,
        }

    @functools.cached_property
    def weight_files(self) -> list[SafetensorsFile]:
        """A Hugging Face folder's safetensors files, opened, their headers checked, and (local files) checked to be
        written: nothing preallocated and still zero."""
        files = open_weight_files(self.ckpt.path, self.read_plan)
        model_type = self.config.get("model_type")
        for f in files:  # an object store shows an object only once it is whole: nothing there is preallocated
            if f.local:
                check_written(f, model_type)
        return files

    @property
    def read_plan(self) -> ReadPlan:
        """How the weight files' tensors are read from object storage (`checkpoints.read_concurrency`)."""
        return ReadPlan(concurrency=self.ckpt.read_concurrency)

    @functools.cached_property
    def weights(self) -> dict[str, str]:
        """{tensor name: safetensors dtype} over the weight files."""
        return {name: dtype for f in self.weight_files for name, dtype in f.dtypes().items()}

    @property
    def stored_bytes(self) -> int:
        return sum(f.size for f in self.weight_files)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the weight files, read from the files opened: a local file's share its memory map, a
        URL's are read by byte ranges, `read_plan.concurrency` requests in flight."""
        return {name: t for f in self.weight_files for name, t in f.read_many(f.keys()).items()}

    @property
    def digest(self) -> PendingDigest:
        """The weights' digest (`checkpoints.digest`), hashed in the background: a Hugging Face folder's from the
        files opened (started when first asked for), a mapped checkpoint's from the tensors the loader read."""
        if self._digest is None:
            if self.mapped:
                raise RuntimeError(f"{self!r}: its tensors have not been read, so there is no digest yet")
            self._digest = start_digest(self.weight_files)
        return self._digest

    def digest_from(self, digest: PendingDigest) -> None:
        """Record the digest of a mapped checkpoint's tensors read part by part (the layer-by-layer route)."""
        self._digest = digest


def open_checkpoint(ckpt: Checkpoint | OpenedCheckpoint) -> OpenedCheckpoint:
    """The checkpoint, opened (an opened one is returned as it is). Nothing is read until a fact is asked for."""
    return ckpt if isinstance(ckpt, OpenedCheckpoint) else OpenedCheckpoint(ckpt)
