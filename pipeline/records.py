"""Plain records passed between stages (picklable, so Dask can ship them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class CheckpointError(Exception):
    """A checkpoint cannot be replayed; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def __reduce__(self):  # keep both fields when Dask pickles the exception
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder found by discovery."""

    step: int
    path: str  # the checkpoint folder
    weight_files: tuple[str, ...] = ()  # safetensors files, absolute paths
    complete: bool = False
    reason: str | None = None  # why it is not replayable (yet), when complete is False
    tokens_seen: int | None = None


@dataclass(frozen=True)
class Probe:
    """The fixed token batch every checkpoint is measured on."""

    name: str  # the store group
    kind: str  # "random" or "tokens"
    tokens: np.ndarray = field(repr=False)  # int64 [rows, seq_len]
    seed: int | None
    first_token: str  # keep | bos | random
    source: str | None = None  # the .npy path for kind=tokens

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])
