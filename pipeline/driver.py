"""The replay stage, driver side: discovery rounds, waiting for checkpoints, the store, the one writer.

Without `replay.watch`, one round replays what is complete, after waiting for checkpoints that only lack their
quiet period. With it, rounds repeat every `replay.poll_seconds` until `replay.until_step` is stored,
`replay.idle_timeout` passes with nothing new, or Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time

from omegaconf import DictConfig, OmegaConf

from .cluster.dispatch import Outcome, run_replays
from .errors import UsageError
from .locations import check_protocol, is_url, local_path
from .records import Checkpoint


def select(checkpoints: list[Checkpoint], steps, *, strict: bool = True) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """Split into (replayable, skipped), honouring replay.steps (`strict`: a step asked for must exist)."""
    if steps is not None:
        wanted = {int(s) for s in steps}
        unknown = wanted - {c.step for c in checkpoints}
        if unknown and strict:
            raise UsageError(f"replay.steps: no checkpoint for step(s) {sorted(unknown)}")
        checkpoints = [c for c in checkpoints if c.step in wanted]
    return [c for c in checkpoints if c.complete], [c for c in checkpoints if not c.complete]


def check_root(root: str) -> None:
    check_protocol(root, "checkpoints.root")
    if not is_url(root) and not os.path.isdir(local_path(root)):
        what = "is not a folder" if os.path.exists(local_path(root)) else "does not exist"
        raise UsageError(f"checkpoints.root={root}: {what}")


def check_store_path(location: str) -> None:
    """A store path must be free, or hold a Zarr store (a sinktrace store's root is a Zarr group)."""
    if is_url(location):
        check_protocol(location, "store.path")
        return
    path = local_path(location)
    if os.path.isfile(path):
        raise UsageError(f"store.path={location}: a file is there, not a store; choose another store.path")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "zarr.json")):
        raise UsageError(
            f"store.path={location}: that folder holds something other than a sinktrace store; choose another "
            "store.path (an empty or new folder)"
        )


class Run:
    """One replay stage: the probe and the store are set up from the first checkpoint that is ready."""

    def __init__(self, cfg: DictConfig, root: str, quiet: float, store_location: str):
        self.cfg, self.root, self.quiet, self.store_location = cfg, root, quiet, store_location
        self.settings = OmegaConf.to_object(cfg.replay)
        self.outcome = Outcome()
        self.store = self.probe = self.fingerprint = None
        self._attrs: dict = {}
        self._previous: dict[int, str] = {}
        self.tried: dict[int, float | None] = {}  # step -> its files' newest mtime when it was replayed
        self.announced = False
        self.step_sources: dict[str, list[int]] = {}  # where the step numbers came from (discovery's step_source)
        self.formats: set[str] = set()
        from .checkpoints.hub import HubRun, is_hub

        # where the checkpoints come from when their files are not on disk yet
        self.source = HubRun(root, cfg.checkpoints) if is_hub(root) else None

    def __call__(self) -> Outcome:
        from tqdm.auto import tqdm

        s = self.settings
        last_news = time.monotonic()
        with tqdm(total=0, desc="replay", unit="ckpt") as bar:
            while True:
                checkpoints = self._discover(strict=not s.watch)
                ready, waiting = select(checkpoints, s.steps, strict=not s.watch)
                todo = self._todo(ready)
                if todo:
                    bar.total += len(todo)
                    bar.refresh()
                    self._replay(todo, bar)
                    last_news = time.monotonic()
                    continue  # look again at once: more may have been written meanwhile
                if s.watch:
                    if s.until_step is not None and any(step >= s.until_step for step in self.tried):
                        bar.write(f"sinktrace: step {max(self.tried)} reached replay.until_step={s.until_step}")
                        break
                    idle = time.monotonic() - last_news
                    if idle >= s.idle_timeout:
                        bar.write(f"sinktrace: nothing new for {idle:.0f} s (replay.idle_timeout); stopping")
                        break
                    bar.set_postfix_str(self._waiting_for(waiting, idle), refresh=True)
                    time.sleep(min(s.poll_seconds, max(0.05, s.idle_timeout - idle)))
                    continue
                quiet = [c for c in waiting if c.quiet_in is not None and c.step not in self.tried]
                if quiet:
                    wait = max(c.quiet_in for c in quiet) + 0.1
                    bar.write(
                        f"sinktrace: waiting {wait:.0f} s for {len(quiet)} checkpoint(s) to stay unchanged for "
                        f"checkpoints.quiet_seconds={self.quiet:g} (step {', '.join(str(c.step) for c in quiet)})"
                    )
                    time.sleep(wait)
                    continue
                if not self.tried and not ready:
                    print("sinktrace: nothing to replay")
                break
        if self.store is not None:
            self.store.finalize()
        return self.outcome

    def _discover(self, strict: bool) -> list[Checkpoint]:
        from .checkpoints.discover import LAYOUTS, discover

        c = self.cfg.checkpoints
        try:
            if self.source is not None:
                checkpoints = self.source.discover(self.settings.steps)
            else:
                # how to read each checkpoint (model_config, key_map) travels on its record to the worker
                checkpoints = discover(
                    self.root,
                    quiet_seconds=self.quiet,
                    format=str(c.format),
                    key_map=str(c.key_map),
                    model_config=os.path.expanduser(str(c.model_config)) if c.model_config else None,
                )
        except (FileNotFoundError, NotADirectoryError) as e:
            raise UsageError(f"checkpoints.root: {e}") from None
        if not checkpoints and strict:
            raise UsageError(f"checkpoints.root={self.root}: no checkpoint there; looked for {LAYOUTS}")
        ready, skipped = select(checkpoints, self.settings.steps, strict=strict)
        unreadable = [c for c in skipped if c.unreadable]
        self.outcome.found, self.outcome.unreadable = len(ready) + len(skipped), unreadable
        if not self.announced:
            # the unreadable ones are listed once, when the run ends (cli.summary)
            print(
                f"sinktrace: {self.root}: {len(checkpoints)} checkpoint(s), {len(ready)} ready, "
                f"{len(skipped) - len(unreadable)} not yet" + (f", {len(unreadable)} unreadable" if unreadable else "")
            )
            for c in skipped:
                if not c.unreadable:
                    print(f"  skipped step {c.step} ({c.path}): {c.reason}")
            self.announced = True
        return checkpoints

    def _todo(self, ready: list[Checkpoint]) -> list[Checkpoint]:
        fresh = [c for c in ready if c.step not in self.tried or self.tried[c.step] != c.modified]
        if not fresh:
            return []
        first_round = not self.outcome.done and not self.outcome.failures
        early = {}  # checkpoints that failed while the store was set up: {step: error}
        if self.store is None:
            early = self._open_store(fresh)
            if self.store is None:  # every one of them failed
                for c in fresh:
                    self.tried[c.step] = c.modified
                return []
        for c in fresh:
            steps = self.step_sources.setdefault(c.step_source, [])
            if c.step not in steps:
                steps.append(c.step)
        provenance = {str(c.step): c.provenance for c in fresh if c.provenance}
        if provenance:  # with the steps earlier runs recorded
            stored = self.store.attrs().get("checkpoint_provenance", {})
            self._attrs["checkpoint_provenance"] = {**stored, **provenance}
        self.store.prepare(
            [c.step for c in fresh],
            tokens_seen={c.step: c.tokens_seen for c in fresh},
            loss={c.step: c.loss for c in fresh} if "loss" in self.settings.measure else {},
            attrs={
                **self._attrs,
                "step_source": self.step_sources,
                "checkpoint_format": sorted({*self.formats, *(c.format for c in fresh)}),
            },
        )
        self.formats = {*self.formats, *(c.format for c in fresh)}
        self._attrs = {}  # the run's attributes go in once
        status = self.store.status()
        for step, error in early.items():  # as run_replays records a failure
            if status.get(step) != "done":
                self.store.mark_failed(step, error)
                status[step] = "failed"
        todo = [c for c in fresh if c.step not in early and (self.settings.overwrite or status.get(c.step) != "done")]
        for c in fresh:
            self.tried[c.step] = c.modified
        if first_round:
            done = sum(status.get(c.step) == "done" for c in fresh)
            print(
                f"sinktrace: store {self.store_location} group {self.probe.name!r}: {done} done, {len(todo)} to replay"
            )
        self._previous = status
        return todo

    def _open_store(self, fresh: list[Checkpoint]) -> dict[int, str]:
        """Set up the probe and the store from the first of `fresh` whose config and format can be read. Those
        before it fail their own step: returns {step: error} for them (each also reported as it happens)."""
        from .errors import CheckpointError

        failed = {}
        for ckpt in fresh:
            try:
                self._open_store_from(ckpt)
                return failed
            except CheckpointError as e:
                error = f"{type(e).__name__}: {e}"
                failed[ckpt.step] = error
                self.outcome.failures.append((ckpt.step, error))
                print(f"step {ckpt.step} failed: {error}")
        return failed

    def _open_store_from(self, first: Checkpoint) -> None:
        from .checkpoints.model_config import check_architecture
        from .checkpoints.opened import open_checkpoint
        from .checkpoints.statedict import ModelConfigNeeded
        from .probe import build_probe, probe_attrs
        from .store.cube import SinkStore
        from .version import __version__

        if self.source is not None:  # its config.json is fetched first
            first = dataclasses.replace(first, path=self.source.first_config([first]))
        opened = open_checkpoint(first)  # its config and key map only: the weights are the replay's to read
        try:
            model_config = opened.config
        except ModelConfigNeeded as e:
            raise UsageError(str(e)) from None
        check_architecture(first.model_config or first.path, model_config, self.settings.trust_remote_code)
        key_map = opened.key_map
        try:
            self.probe = build_probe(self.cfg.probe, model_config)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.fingerprint = opened.fingerprint
        self.store = SinkStore(self.store_location, self.probe.name)
        self._attrs = {
            **probe_attrs(self.probe),
            "architecture": model_config.get("model_type", "unknown"),
            "config_fingerprint": self.fingerprint,
            "checkpoint_root": self.root,
            "key_map": key_map,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "sinktrace_version": __version__,
            "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def _replay(self, todo: list[Checkpoint], bar) -> None:
        got = run_replays(
            self.cfg.cluster,
            todo,
            self.probe,
            self.settings,
            self.store,
            self.fingerprint,
            previous=self._previous,
            verbose=bool(self.cfg.verbose),
            bar=bar,
            source=self.source,
        )
        for name in ("done", "failures", "gone"):
            getattr(self.outcome, name).extend(getattr(got, name))

    def _waiting_for(self, waiting: list[Checkpoint], idle: float) -> str:
        pending = [c for c in waiting if c.step not in self.tried and not c.unreadable]
        if pending:
            c = min(pending, key=lambda c: c.step)
            return f"waiting for step {c.step}: {c.reason}"
        left = self.settings.idle_timeout - idle
        until = f" or step {self.settings.until_step}" if self.settings.until_step is not None else ""
        return f"waiting for new checkpoints{until} (stopping after {left:.0f} s more with none)"


def replay_stage(cfg: DictConfig, root: str, quiet: float, store_location: str) -> Outcome:
    from .signals import interruptible
    from .store.lock import StoreLock

    check_store_path(store_location)
    with StoreLock(store_location), interruptible():
        return Run(cfg, root, quiet, store_location)()
