"""The `sinktrace` command: a Hydra app that wires discover -> replay (Dask) -> commit (Zarr) -> report."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from . import hydra_app, settings
from .errors import CheckpointError, ClusterLost, UsageError, describe
from .locations import default_store_path, exists, sinktrace_home
from .settings import CONF_MODULE, compose, new_spelling

__all__ = ["compose", "main", "run"]  # compose: the config as the command line builds it, for notebooks and tests

settings.register()


def checkpoint_root(cfg: DictConfig) -> tuple[str, float]:
    """The folder to replay and its quiet period; with no root, the demo run (built on first use)."""
    if cfg.checkpoints.root:
        return str(cfg.checkpoints.root), float(cfg.checkpoints.quiet_seconds)
    from .demo import ensure_demo_run
    from .signals import Interrupted, interruptible

    # the demo is written atomically by this process, so there is nothing to wait for
    try:
        with interruptible():  # each checkpoint is renamed into place when whole: stopping anywhere is safe
            return str(ensure_demo_run(sinktrace_home() / "demo")), 0.0
    except Interrupted as e:
        e.during = " while training the demo run"
        e.kept = "the checkpoints it saved are kept and its training resumes from the last one"
        raise


def fit_probe_to_demo(cfg: DictConfig) -> None:
    """Probe the demo run at its trained length unless told otherwise: the demo model never saw a query farther than
    that from position 0, and its sink there is not what it learnt (docs/data.md, the demo run). A length other than
    the default is kept, with a note when it is longer than the rows the model was trained on."""
    from .demo import DemoRecipe
    from .settings import RandomProbeSettings

    trained = DemoRecipe().seq_len
    if cfg.probe.kind != "random" or cfg.probe.seq_len <= trained:
        return
    if cfg.probe.seq_len == RandomProbeSettings.seq_len:
        print(f"sinktrace: the demo run was trained on {trained}-token rows: probing it with probe.seq_len={trained}")
        cfg.probe.seq_len = trained
    else:
        print(
            f"sinktrace: the demo run was trained on {trained}-token rows: queries beyond them (probe.seq_len="
            f"{cfg.probe.seq_len}) sit at distances from position 0 it never saw"
        )


def store_path(cfg: DictConfig, root: str) -> str:
    return str(cfg.store.path) if cfg.store.path else default_store_path(root)


def run(cfg: DictConfig) -> int:
    """Run the configured stages; returns the exit status (0: all good, 1: some checkpoint failed or is unreadable,
    2: usage, or every checkpoint found unreadable; 128 + the signal's number: interrupted by Ctrl-C or SIGTERM)."""
    from .signals import Interrupted

    report_failed = False
    try:
        settings.check(cfg)
        from .driver import check_root, check_store_path

        if cfg.store.path:
            check_store_path(str(cfg.store.path))
        if cfg.checkpoints.root:
            check_root(str(cfg.checkpoints.root))
        if cfg.stages == ["compare"]:  # it reads the stores in compare.stores alone
            from .compare import compare_stage

            compare_stage(cfg)
            return 0
        if "replay" in cfg.stages and not cfg.checkpoints.root:
            fit_probe_to_demo(cfg)
        if "replay" in cfg.stages or not cfg.store.path:
            root, quiet = checkpoint_root(cfg)
        else:  # the report reads the store alone: no checkpoints to find, no demo to build
            root, quiet = None, 0.0
        store = store_path(cfg, root)
        outcome = None
        if "replay" in cfg.stages:
            from .driver import replay_stage

            outcome = replay_stage(cfg, root, quiet, store, on_stored=tensorboard_scalars(cfg, store))
            if outcome.unreadable and len(outcome.unreadable) == outcome.found:
                return summary(outcome)  # nothing could be read, so there is nothing to report on
        if "report" in cfg.stages and not (outcome and outcome.failures and not exists(store)):  # all failed
            try:
                report_stage(cfg, store)
            except OSError as e:  # an output's failure: what the store holds is untouched
                print(f"sinktrace: error: the report was not written: {describe(e)}", file=sys.stderr)
                report_failed = True
        if "compare" in cfg.stages:
            from .compare import compare_stage

            compare_stage(cfg)
    except UsageError as e:
        print(f"sinktrace: error: {e}", file=sys.stderr)
        return 2
    except (ClusterLost, CheckpointError) as e:  # CheckpointError: discovery could not read the step of a file
        print(f"sinktrace: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(
            f"\nsinktrace: interrupted by {e}{e.during}; {e.kept}: run the same command again to resume",
            file=sys.stderr,
        )
        return e.exit_status
    print_same_weights(store)
    return summary(outcome) or int(report_failed)


def summary(outcome) -> int:
    """Print what did not go as planned; the exit status."""
    if outcome is None:
        return 0
    for step in outcome.gone:
        print(f"step {step}: gone, deleted before it was replayed (e.g. by the trainer's save_total_limit)")
    if outcome.unreadable:
        print(
            f"\nsinktrace: {len(outcome.unreadable)} of {outcome.found} checkpoint(s) hold nothing sinktrace can read "
            "(unreadable, not replayed):",
            file=sys.stderr,
        )
        for c in outcome.unreadable:
            print(f"  step {c.step} ({c.path}): {c.reason}", file=sys.stderr)
        if len(outcome.unreadable) == outcome.found:  # most likely a wrong checkpoints.format or root
            return 2
    if outcome.failures:
        where = (
            "recorded as failed in the store, unless an earlier result was kept"
            if outcome.stored
            else "no store was made, since no checkpoint could be opened"
        )
        print(f"\n{len(outcome.failures)} checkpoint(s) failed ({where}; rerun to retry):", file=sys.stderr)
        for step, error in outcome.failures:
            print(f"  step {step}: {error}", file=sys.stderr)
    for error in outcome.output_errors:
        print(f"sinktrace: error: an output was not written: {error}", file=sys.stderr)
    return 1 if outcome.failures or outcome.unreadable or outcome.output_errors else 0


def tensorboard_scalars(cfg: DictConfig, store_location: str):
    """With report.tensorboard: what writes each step the replay stores as TensorBoard scalars, as it is stored."""
    if not cfg.report.tensorboard:
        return None
    from .report.tensorboard import write_scalars

    return lambda steps: write_scalars(store_location, str(cfg.report.tensorboard), steps=steps, eps=cfg.report.eps)


def report_stage(cfg: DictConfig, store_location: str) -> None:
    from .report import summary_table, write_report
    from .store.cube import open_sinks

    if not exists(store_location):
        raise UsageError(f"store.path={store_location}: no store there yet; run the replay stage first")
    page = write_report(store_location, cfg.report.out_dir or None, eps=float(cfg.report.eps))
    if cfg.report.tensorboard:
        from .report.tensorboard import write_scalars

        write_scalars(store_location, str(cfg.report.tensorboard), eps=float(cfg.report.eps))
    for name, node in sorted(open_sinks(store_location).children.items()):
        ds = node.to_dataset()
        print(f"\nprobe {name}:")
        print(summary_table(ds, eps=float(cfg.report.eps)))
    print(f"\nstore:  {store_location}\nreport: {page}")
    if cfg.report.tensorboard:
        print(f"tensorboard scalars: {cfg.report.tensorboard}")


def print_same_weights(store_location: str) -> None:
    """Flag, per probe group, the steps whose weights equal another step's (docs/data.md, weights_digest)."""
    from .analysis import probe_groups, same_weights_lines
    from .store.cube import open_sinks

    try:
        groups = probe_groups(open_sinks(store_location)) if exists(store_location) else {}
    except KeyError:  # a store folder without probe groups yet
        groups = {}
    for name, ds in groups.items():
        for line in same_weights_lines(ds):
            print(f"sinktrace: probe {name}: {line}")


replay_main = hydra_app.command(CONF_MODULE, "config", run, rewrite=new_spelling, unknown_key=settings.no_such_setting)


def main() -> None:
    """`sinktrace [overrides]` replays; `sinktrace check [overrides]` checks the measuring routes on this machine
    (pipeline/check.py). A Hydra override always holds `=` (or starts with `+`, `~`), so `check` is no override."""
    if sys.argv[1:2] == ["check"]:
        from .check import run as check

        sys.exit(check([new_spelling(a) for a in sys.argv[2:]]))
    replay_main()
