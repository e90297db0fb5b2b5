"""The `sinktrace` command: a Hydra app that wires discover -> replay (Dask) -> commit (Zarr) -> report."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .records import Checkpoint

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STAGES = ("replay", "report")
log = logging.getLogger("sinktrace")

# exit status of the Hydra job(s) in this process: a multirun must not stop at its first failing job
_exit_status = 0


class UsageError(Exception):
    """A mistake in the command or its config: reported in one line, no traceback."""


def home() -> Path:
    return Path(os.environ.get("SINKTRACE_HOME", "~/.cache/sinktrace")).expanduser()


def default_store_path(root: str) -> str:
    resolved = root if "://" in root else str(Path(root).expanduser().resolve())
    name = Path(resolved.rstrip("/")).name or "run"
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:8]
    return str(home() / "runs" / f"{name}-{digest}" / "sinks.zarr")


def checkpoint_root(cfg: DictConfig) -> tuple[str, float]:
    """The folder to replay and its quiet period; with no root, the demo run (built on first use)."""
    if cfg.checkpoints.root:
        return str(cfg.checkpoints.root), float(cfg.checkpoints.quiet_seconds)
    from .demo import ensure_demo_run

    # the demo is written atomically by this process, so there is nothing to wait for
    return str(ensure_demo_run(home() / "demo")), 0.0


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
    from .discover import discover
    from .layered import device_budget
    from .load import config_fingerprint, read_config
    from .probe import build_probe, probe_attrs
    from .replay import ReplaySettings
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
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    status = store.status()
    todo = [c for c in ready if cfg.replay.overwrite or status.get(c.step) != "done"]
    done = sum(status.get(c.step) == "done" for c in ready)
    print(f"sinktrace: store {store_location} group {probe.name!r}: {done} done, {len(todo)} to replay")
    settings = ReplaySettings(
        device=str(cfg.device),
        dtype=str(cfg.dtype),
        batch_size=int(cfg.replay.batch_size),
        key_positions=int(cfg.replay.key_positions),
        trust_remote_code=bool(cfg.replay.trust_remote_code),
        max_device_memory=cfg.replay.max_device_memory,
    )
    failures = run_replays(cfg.cluster, todo, probe, settings, store, fingerprint)
    store.finalize()
    return failures


def run_replays(cluster_cfg, todo, probe, settings, store, fingerprint) -> list[tuple[int, str]]:
    """Replay on Dask workers; the driver alone writes each result into the store as it arrives."""
    from distributed import Client, as_completed
    from tqdm.auto import tqdm

    from .replay import replay

    failures = []
    if not todo:
        return failures
    client, cluster = connect(cluster_cfg)
    try:
        futures = {
            client.submit(replay, c, probe, settings, nxt, key=f"replay-{probe.name}-{c.step}", pure=False): c
            for c, nxt in zip(todo, [*todo[1:], None])
        }
        with tqdm(total=len(futures), desc="replay", unit="ckpt") as bar:
            for future in as_completed(futures):
                ckpt = futures[future]
                try:
                    ds = future.result()
                    if ds.attrs.get("config_fingerprint") != fingerprint:
                        raise ValueError(
                            f"{ckpt.path}/config.json describes another architecture than the run's first checkpoint"
                        )
                    store.write_step(ckpt.step, ds)
                except Exception as e:  # one bad checkpoint must not stop the others
                    error = f"{type(e).__name__}: {e}"
                    store.mark_failed(ckpt.step, error)
                    failures.append((ckpt.step, error))
                    bar.write(f"step {ckpt.step} failed: {error}")
                bar.update()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return failures


def connect(cluster_cfg):
    from distributed import Client

    # Hydra's job logging sets the root logger to INFO; the scheduler's bookkeeping would drown the progress bar
    logging.getLogger("distributed").setLevel(logging.WARNING)

    if "address" in cluster_cfg:
        return Client(cluster_cfg.address), None
    cluster = instantiate(cluster_cfg, _convert_="all")
    return Client(cluster), cluster


def report_stage(cfg: DictConfig, store_location: str) -> None:
    from .report import summary_table, write_report
    from .store import open_sinks

    if not _exists(store_location):
        raise UsageError(f"store.path={store_location}: no store there yet; run the replay stage first")
    page = write_report(store_location, cfg.report.out_dir or None, eps=float(cfg.report.eps))
    tree = open_sinks(store_location)
    groups = tree.children.items() if hasattr(tree, "children") else [(tree.attrs.get("probe_name", "probe"), tree)]
    for name, node in groups:
        ds = node.to_dataset() if hasattr(node, "to_dataset") else node
        print(f"\nprobe {name}:")
        print(summary_table(ds, eps=float(cfg.report.eps)))
    print(f"\nstore:  {store_location}\nreport: {page}")


def _exists(location: str) -> bool:
    if "://" in location:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return Path(location).exists()


def _version() -> str:
    from . import __version__

    return __version__


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    global _exit_status
    _exit_status = max(_exit_status, run(cfg))


def main() -> None:
    _hydra_main()
    sys.exit(_exit_status)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would build, for use from Python (notebooks, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])
