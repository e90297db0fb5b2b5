"""The `sinktrace` command: a Hydra app that wires discover -> replay (Dask) -> commit (Zarr) -> report."""

from __future__ import annotations

import datetime as dt
import sys

from omegaconf import DictConfig, OmegaConf

from . import hydra_app, settings
from .errors import UsageError
from .locations import default_store_path, exists, sinktrace_home
from .records import Checkpoint

CONF_MODULE = "pipeline.conf"
STAGES = ("replay", "report")
# keys that moved into the group they configure: the old spelling still works
MOVED_KEYS = {"device": "replay.device", "dtype": "replay.dtype"}

settings.register()


def new_spelling(arg: str) -> str:
    """`device=cuda` -> `replay.device=cuda` (and `dtype=`)."""
    key, eq, value = arg.partition("=")
    return f"{MOVED_KEYS[key]}={value}" if eq and key in MOVED_KEYS else arg


def checkpoint_root(cfg: DictConfig) -> tuple[str, float]:
    """The folder to replay and its quiet period; with no root, the demo run (built on first use)."""
    if cfg.checkpoints.root:
        return str(cfg.checkpoints.root), float(cfg.checkpoints.quiet_seconds)
    from .demo import ensure_demo_run

    # the demo is written atomically by this process, so there is nothing to wait for
    return str(ensure_demo_run(sinktrace_home() / "demo")), 0.0


def store_path(cfg: DictConfig, root: str) -> str:
    return str(cfg.store.path) if cfg.store.path else default_store_path(root)


def run(cfg: DictConfig) -> int:
    """Run the configured stages; returns the exit status (0: all good, 1: some checkpoint failed, 2: usage)."""
    try:
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown:
            raise UsageError(f"stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
        root, quiet = checkpoint_root(cfg)
        store = store_path(cfg, root)
        failures = replay_stage(cfg, root, quiet, store) if "replay" in cfg.stages else []
        if "report" in cfg.stages:
            report_stage(cfg, store)
    except UsageError as e:
        print(f"sinktrace: error: {e}", file=sys.stderr)
        return 2
    if failures:
        print(f"\n{len(failures)} checkpoint(s) failed (recorded as failed in the store; rerun to retry):", file=sys.stderr)
        for step, error in failures:
            print(f"  step {step}: {error}", file=sys.stderr)
        return 1
    return 0


def select(checkpoints: list[Checkpoint], steps) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """Split into (replayable, skipped), honouring replay.steps."""
    if steps is not None:
        wanted = {int(s) for s in steps}
        unknown = wanted - {c.step for c in checkpoints}
        if unknown:
            raise UsageError(f"replay.steps: no checkpoint for step(s) {sorted(unknown)}")
        checkpoints = [c for c in checkpoints if c.step in wanted]
    return [c for c in checkpoints if c.complete], [c for c in checkpoints if not c.complete]


def replay_stage(cfg: DictConfig, root: str, quiet: float, store_location: str) -> list[tuple[int, str]]:
    from .devices import device_budget
    from .discover import discover
    from .dispatch import run_replays
    from .load import config_fingerprint, read_config
    from .probe import build_probe, probe_attrs
    from .store import SinkStore

    try:
        device_budget(cfg.replay.max_device_memory, "cpu")  # a typo stops here, not in every replay task
    except ValueError as e:
        raise UsageError(str(e)) from None
    checkpoints = discover(root, quiet_seconds=quiet)
    ready, skipped = select(checkpoints, cfg.replay.steps)
    print(f"sinktrace: {root}: {len(checkpoints)} checkpoint(s), {len(ready)} ready, {len(skipped)} skipped")
    for c in skipped:
        print(f"  skipped step {c.step} ({c.path}): {c.reason}")
    if not ready:
        print("sinktrace: nothing to replay")
        return []

    model_config = read_config(ready[0])
    try:
        probe = build_probe(cfg.probe, model_config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fingerprint = config_fingerprint(model_config)
    store = SinkStore(store_location, probe.name)
    store.prepare(
        [c.step for c in ready],
        tokens_seen={c.step: c.tokens_seen for c in ready},
        attrs={
            **probe_attrs(probe),
            "architecture": model_config.get("model_type", "unknown"),
            "config_fingerprint": fingerprint,
            "checkpoint_root": root,
            "config": OmegaConf.to_yaml(cfg, resolve=True),
            "sinktrace_version": _version(),
            "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    status = store.status()
    todo = [c for c in ready if cfg.replay.overwrite or status.get(c.step) != "done"]
    done = sum(status.get(c.step) == "done" for c in ready)
    print(f"sinktrace: store {store_location} group {probe.name!r}: {done} done, {len(todo)} to replay")
    failures = run_replays(cfg.cluster, todo, probe, OmegaConf.to_object(cfg.replay), store, fingerprint)
    store.finalize()
    return failures


def report_stage(cfg: DictConfig, store_location: str) -> None:
    from .report import summary_table, write_report
    from .store import open_sinks

    if not exists(store_location):
        raise UsageError(f"store.path={store_location}: no store there yet; run the replay stage first")
    page = write_report(store_location, cfg.report.out_dir or None, eps=float(cfg.report.eps))
    for name, node in sorted(open_sinks(store_location).children.items()):
        ds = node.to_dataset()
        print(f"\nprobe {name}:")
        print(summary_table(ds, eps=float(cfg.report.eps)))
    print(f"\nstore:  {store_location}\nreport: {page}")


def _version() -> str:
    from . import __version__

    return __version__


main = hydra_app.command(CONF_MODULE, "config", run, rewrite=new_spelling)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would build, for use from Python (notebooks, tests)."""
    return hydra_app.compose(CONF_MODULE, "config", overrides, rewrite=new_spelling)
