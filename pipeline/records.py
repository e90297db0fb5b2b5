"""Plain records passed between stages (picklable, so Dask can ship them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder found by discovery."""

    step: int
    path: str  # the checkpoint folder
    weight_files: tuple[str, ...] = ()  # hf: safetensors files; dcp: the folder with .metadata; torch: the file
    complete: bool = False
    reason: str | None = None  # why it is not replayable (yet), when complete is False
    # finished, yet holding nothing sinktrace can read (reason names its files): reported, never waited for
    unreadable: bool = False
    tokens_seen: int | None = None
    quiet_in: float | None = None  # complete but for its quiet period, which ends in this many seconds
    modified: float | None = None  # its files' newest modification time, when discovery could tell
    format: str = "hf"  # hf | dcp | torch (pipeline/checkpoints/formats/)
    step_source: str = "folder name"  # where `step` came from: folder name, file name, trainer_state.json, a field
    # How to read it, from the `checkpoints` config (pipeline/checkpoints/statedict.py): the tensor names' map, and a
    # Hugging Face config.json (or its folder) for checkpoints that do not describe their architecture.
    key_map: str = "auto"
    model_config: str | None = None
    # byte ranges in flight per file when the weights are read from object storage (`checkpoints.read_concurrency`)
    read_concurrency: int = 16
    # the waits on object storage allowed (`checkpoints.request_timeout`, `checkpoints.download_timeout`)
    request_timeout: float = 60.0
    download_timeout: float = 3600.0
    max_read_size: str = "1GB"  # the most a file read whole may hold (`checkpoints.max_read_size`)
    loss: float | None = None  # the training loss logged at (or last before) this step
    # where the step came from beyond its folder (a Hub repository: revision, commit, the weights' sha256), JSON
    # types only: it is recorded in the store
    provenance: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Probe:
    """The fixed token batch every checkpoint is measured on."""

    name: str  # the store group
    kind: str  # "random", "tokens" or "text"
    tokens: np.ndarray = field(repr=False)  # int64 [rows, seq_len]
    seed: int | None
    first_token: str  # keep | bos | random
    source: str | None = None  # the .npy path for kind=tokens, the text file for kind=text
    # kind=text: how rows were cut, the text file's sha256, where the tokenizer came from and its vocabulary's sha256
    packing: str | None = None
    text_sha256: str | None = None
    tokenizer: str | None = None
    vocab_sha256: str | None = None

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])
