"""The replay stage, driver side: discovery rounds, waiting for checkpoints, the store, the one writer.

Every root is a source (pipeline/checkpoints/sources.py): the driver lists its checkpoints, hands the ready ones to
the dispatcher (pipeline/cluster/dispatch.py), which replays them where the `cluster` group says and hands back each
result as it finishes, and writes each into the store, alone.

Without `replay.watch`, one round replays what is complete, after waiting for checkpoints that only lack their
quiet period. With it, rounds repeat every `replay.poll_seconds` until `replay.until_step` is stored,
`replay.idle_timeout` passes with nothing new, or Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import traceback
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from .errors import UsageError
from .locations import check_protocol, is_url, local_path
from .records import Checkpoint


@dataclass
class Outcome:
    """What the replays came to: steps stored, failed (with the reason) and gone (deleted while queued); outputs
    that could not be written; and what the last look at the run found: how many checkpoints, and those holding
    nothing sinktrace can read."""

    done: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    found: int = 0
    unreadable: list[Checkpoint] = field(default_factory=list)
    output_errors: list[str] = field(default_factory=list)  # outputs written as steps are stored (TensorBoard)
    stored: bool = False  # whether the run has a store (none when no checkpoint could be opened)


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


def _resolved(root: str) -> str:
    return root.rstrip("/") if is_url(root) else os.path.realpath(local_path(root))


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

    def __init__(self, cfg: DictConfig, root: str, quiet: float, store_location: str, on_stored=None):
        self.cfg, self.root, self.quiet, self.store_location = cfg, root, quiet, store_location
        self.on_stored = on_stored  # called with each step as it is stored (the TensorBoard scalars)
        self.settings = OmegaConf.to_object(cfg.replay)
        self.outcome = Outcome()
        self.store = self.probe = self.fingerprint = None
        self._attrs: dict = {}
        self._previous: dict[int, str] = {}
        self.tried: dict[int, float | None] = {}  # step -> its files' newest mtime when it was replayed
        self.announced = False
        self.step_sources: dict[str, list[int]] = {}  # where the step numbers came from (discovery's step_source)
        self.formats: set[str] = set()
        from .checkpoints.sources import open_source
        from .locations import bound_reads, bound_waits

        bound_waits(cfg.checkpoints.request_timeout, cfg.checkpoints.download_timeout)
        bound_reads(cfg.checkpoints.max_read_size)
        self.source = open_source(root, cfg.checkpoints, quiet)

    def __call__(self) -> Outcome:
        try:
            return self._rounds()
        finally:
            self.source.close()

    def _rounds(self) -> Outcome:
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
                    if waiting and str(self.root).startswith("hf://"):  # a revision never changes: none ever will
                        raise UsageError(
                            f"checkpoints.root={self.root}: none of its {len(waiting)} revision(s) can be replayed "
                            "(each is listed above with the reason it was skipped)"
                        )
                    print("sinktrace: nothing to replay")
                break
        if self.store is not None:
            self.store.finalize()
        self.outcome.stored = self.store is not None
        return self.outcome

    def _discover(self, strict: bool) -> list[Checkpoint]:
        from .checkpoints.discover import LAYOUTS

        try:
            checkpoints = self.source.discover(self.settings.steps)
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
        from .probe.tokenizer import changed_tokenizers

        for step, error in changed_tokenizers(self.cfg.probe, self.probe, fresh, self.source).items():
            early[step] = error  # a text probe's ids would mean other text to this checkpoint
            self.outcome.failures.append((step, error))
            print(f"step {step} failed: {error}")
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
            probe_tokens=self.probe.tokens,
            attrs={
                **self._attrs,
                "step_source": self.step_sources,
                "checkpoint_format": sorted({*self.formats, *(c.format for c in fresh)}),
            },
        )
        self.formats = {*self.formats, *(c.format for c in fresh)}
        self._attrs = {}  # the run's attributes go in once
        status = self.store.status()
        for step, error in early.items():  # as _write records a failure
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
        before it fail their own step: returns {step: error} for them (each also reported as it happens).

        A checkpoint the model config does not fit (`Misfit`) is set aside: when a later one fits, the config is
        right and that checkpoint is replayed like the others (its replay names what is wrong with its files); when
        none fits, the config is wrong and the run stops before anything is stored.
        """
        from .errors import CheckpointError
        from .replay.fits import Misfit

        failed, misfits = {}, []
        for ckpt in fresh:
            try:
                self._open_store_from(ckpt)
                return failed
            except Misfit as e:
                misfits.append((ckpt.step, e))
            except CheckpointError as e:
                self._failed_early(failed, ckpt.step, e)
        if misfits and not failed:
            raise UsageError(str(misfits[0][1]))
        for step, e in misfits:
            self._failed_early(failed, step, e)
        return failed

    def _failed_early(self, failed: dict[int, str], step: int, e: Exception) -> None:
        error = f"{type(e).__name__}: {e}"
        failed[step] = error
        self.outcome.failures.append((step, error))
        print(f"step {step} failed: {error}")

    def _open_store_from(self, first: Checkpoint) -> None:
        from .checkpoints.model_config import check_architecture
        from .checkpoints.opened import open_checkpoint
        from .checkpoints.sources import Folder
        from .checkpoints.statedict import ModelConfigNeeded
        from .probe import build_probe, open_store, probe_attrs
        from .replay.fits import check_fits
        from .version import __version__

        first = self.source.with_config(first)  # a Hub revision's config.json is fetched first
        opened = open_checkpoint(first)  # its config and key map only: the weights are the replay's to read
        try:
            model_config = opened.config
        except ModelConfigNeeded as e:
            raise UsageError(str(e)) from None
        check_architecture(first.model_config or first.path, model_config, self.settings.trust_remote_code)
        if opened.mapped and isinstance(self.source, Folder):  # a Hub revision's weights are not fetched yet
            check_fits(opened, self.settings.trust_remote_code)
        key_map = opened.key_map
        try:
            self.probe = build_probe(self.cfg.probe, model_config, first, self.source)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.fingerprint = opened.fingerprint
        self.store = open_store(self.store_location, self.probe)
        stored = self.store.attrs().get("checkpoint_root")
        if stored and _resolved(stored) != _resolved(self.root):  # its steps would pass for this run's, done
            raise UsageError(
                f"store.path={self.store_location} holds the run of checkpoints.root={stored}, not {self.root}: give "
                "each run its own store (in a multirun over checkpoints.root, leave store.path out or put "
                "${hydra:job.num} in it)"
            )
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
        """Replay `todo` where the cluster config says, and write each result into the store as it comes back."""
        from .cluster.dispatch import results

        for ckpt, result in results(self.cfg.cluster, self.source, todo, self.probe, self.settings):
            self._write(ckpt, result, bar)
            self.source.release(ckpt)
            bar.update()

    def _write(self, ckpt: Checkpoint, result, bar) -> None:
        """A failure is recorded as failed, except on a step that was done before (an overwrite): that step keeps
        its stored result and the failure is only reported. A checkpoint deleted while it waited is reported as
        gone."""
        from .signals import deferred

        if isinstance(result, BaseException) and self.source.gone(ckpt):
            self.outcome.gone.append(ckpt.step)
            bar.write(f"step {ckpt.step} gone: {ckpt.path} was deleted before it was replayed")
            return
        with deferred():  # Ctrl-C or SIGTERM while the step is written waits until it is written
            try:
                if isinstance(result, BaseException):
                    raise result
                if result.attrs.get("config_fingerprint") != self.fingerprint:
                    raise ValueError(
                        f"{ckpt.path}/config.json describes another architecture than the run's first checkpoint"
                    )
                self.store.write_step(ckpt.step, result)
                self.outcome.done.append(ckpt.step)
            except Exception as e:  # one bad checkpoint must not stop the others
                error = f"{type(e).__name__}: {e}"
                if self._previous.get(ckpt.step) != "done":
                    self.store.mark_failed(ckpt.step, error)
                self.outcome.failures.append((ckpt.step, error))
                bar.write(f"step {ckpt.step} failed: {error}")
                if self.cfg.verbose:
                    bar.write("".join(traceback.format_exception(e)))
                return
        if self.on_stored is not None:
            self._output(ckpt.step, bar)

    def _output(self, step: int, bar) -> None:
        """Hand a stored step to the outputs written as the run goes (TensorBoard): a failure there is the output's,
        not the checkpoint's, whose step stays `done`; it is reported once and sets the exit status."""
        try:
            self.on_stored([step])
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if error not in self.outcome.output_errors:
                self.outcome.output_errors.append(error)
                bar.write(f"sinktrace: error: step {step} is stored, but an output could not be written: {error}")

    def _waiting_for(self, waiting: list[Checkpoint], idle: float) -> str:
        pending = [c for c in waiting if c.step not in self.tried and not c.unreadable]
        if pending:
            c = min(pending, key=lambda c: c.step)
            return f"waiting for step {c.step}: {c.reason}"
        left = self.settings.idle_timeout - idle
        until = f" or step {self.settings.until_step}" if self.settings.until_step is not None else ""
        return f"waiting for new checkpoints{until} (stopping after {left:.0f} s more with none)"


def replay_stage(cfg: DictConfig, root: str, quiet: float, store_location: str, on_stored=None) -> Outcome:
    from .signals import interruptible
    from .store.lock import StoreLock

    check_store_path(store_location)
    with StoreLock(store_location), interruptible():
        return Run(cfg, root, quiet, store_location, on_stored)()
