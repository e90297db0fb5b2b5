"""Where a run's checkpoints come from: every `checkpoints.root` is a source, and the driver and the cluster code
speak to each through the one interface below.

- a folder, on the local disk or behind fsspec (`s3://`, `gs://`, `memory://`, ...): `Folder`, read by `discover`;
  its checkpoints' files are already where replay reads them;
- a Hugging Face Hub repository (`hf://<org>/<name>`): `hub.HubRun`, which fetches each step revision's files into
  the Hugging Face cache a few checkpoints ahead of the replay and deletes them once the step is stored.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Protocol

from ..records import Checkpoint


class Source(Protocol):
    """The checkpoints of one `checkpoints.root`, and their files while they are replayed."""

    root: str

    def discover(self, steps: list[int] | None = None) -> list[Checkpoint]:
        """One record per step, sorted by step; each says whether it is ready (`complete`) or why not (`reason`).
        `steps` (replay.steps) may narrow what is looked at; the caller still selects from what comes back."""

    def with_config(self, ckpt: Checkpoint) -> Checkpoint:
        """`ckpt` with its config.json readable at its path (the run's probe and store are set up from it)."""

    def start(self, todo: list[Checkpoint]) -> None:
        """Make the files of `todo` available, in this order (at once, or in the background)."""

    def arrived(self, wait: bool) -> list[tuple[Checkpoint, Exception | None]]:
        """The checkpoints of `todo` whose files became available since the last call, each with None or the
        reason they cannot be had; `wait`: block until there is at least one (never called once all came)."""

    def release(self, ckpt: Checkpoint) -> None:
        """The step is stored (or failed): its files are no longer needed."""

    def gone(self, ckpt: Checkpoint) -> bool:
        """Whether the checkpoint was deleted since it was listed (a trainer rotating old checkpoints away)."""

    def close(self) -> None:
        """The run is over: stop making files available, and free what was not released."""


class Folder:
    """A run's folder (a local path or an fsspec URL): listing it is `discover`, and its files need no fetching."""

    def __init__(self, root: str, settings, quiet_seconds: float):
        self.root, self.settings, self.quiet = str(root), settings, quiet_seconds
        self._pending: list[Checkpoint] = []

    def discover(self, steps=None) -> list[Checkpoint]:
        from .discover import discover

        c = self.settings
        # how to read each checkpoint (model_config, key_map, read_concurrency, waits) travels on its record to the
        # worker
        found = discover(
            self.root,
            quiet_seconds=self.quiet,
            format=str(c.format),
            key_map=str(c.key_map),
            model_config=os.path.expanduser(str(c.model_config)) if c.model_config else None,
        )
        waits = {
            "request_timeout": float(c.request_timeout),
            "download_timeout": float(c.download_timeout),
            "max_read_size": str(c.max_read_size),
        }
        return [dataclasses.replace(ckpt, read_concurrency=int(c.read_concurrency), **waits) for ckpt in found]

    def with_config(self, ckpt: Checkpoint) -> Checkpoint:
        return ckpt

    def start(self, todo: list[Checkpoint]) -> None:
        self._pending = list(todo)

    def arrived(self, wait: bool) -> list[tuple[Checkpoint, Exception | None]]:
        out, self._pending = [(c, None) for c in self._pending], []
        return out

    def release(self, ckpt: Checkpoint) -> None:
        pass

    def gone(self, ckpt: Checkpoint) -> bool:
        from ..locations import exists

        try:
            return not exists(ckpt.path)
        except OSError:  # an object store that cannot be asked now: the failure is reported as it is
            return False

    def close(self) -> None:
        self._pending = []


def open_source(root: str, settings, quiet_seconds: float) -> Source:
    """The source of `checkpoints.root`; `settings` is the `checkpoints` group."""
    from .hub import HubRun, is_hub

    return HubRun(root, settings) if is_hub(root) else Folder(root, settings, quiet_seconds)
