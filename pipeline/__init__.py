"""sinktrace: replay training checkpoints and trace how attention sinks form.

The public API: `open_sinks` and `demo_store` to get a store, `open_runs` to line several runs' stores up along a
`run` dimension, the analysis functions of `pipeline.analysis` (also
bound to each probe group as the accessor `ds.sinks`, registered on import), and the module `pipeline.replay` for
scripting a replay (`replay`, `ReplaySettings`, `PhaseTimes`, `ModelCache`, `open_checkpoint`). Importing the
package loads xarray, not torch: `pipeline.replay` loads torch and transformers when it is imported.
"""

from .analysis import (
    SinkAccessor,
    circuit_convergence_step,
    circuit_share,
    circuit_writer,
    convergence_step,
    done,
    early_share,
    emergence_step,
    first_crossing_step,
    first_token_pair,
    layer_sink_mass,
    massive_activation_ratio,
    mixing_effect,
    one_run,
    onset_layer,
    positional_index,
    positional_index_pair,
    probe_groups,
    probe_length,
    profile_change,
    recognition_step,
    run_names,
    same_weights,
    sink_rate,
    sink_score,
    training_loss,
    uniform_sink_mass,
    writer_ratio,
    writer_settle_step,
)
from .runs import open_runs
from .version import __version__

__all__ = [
    "__version__",
    # a store
    "open_sinks",
    "open_runs",
    "demo_store",
    # the analysis functions, and the `ds.sinks` accessor that binds them to a probe group
    "SinkAccessor",
    "probe_groups",
    "done",
    "probe_length",
    "uniform_sink_mass",
    "sink_score",
    "layer_sink_mass",
    "sink_rate",
    "emergence_step",
    "first_crossing_step",
    "onset_layer",
    "early_share",
    "profile_change",
    "convergence_step",
    "massive_activation_ratio",
    "writer_ratio",
    "circuit_writer",
    "writer_settle_step",
    "recognition_step",
    "mixing_effect",
    "circuit_share",
    "circuit_convergence_step",
    "training_loss",
    "same_weights",
    "positional_index",
    "positional_index_pair",
    "first_token_pair",
    "run_names",
    "one_run",
    # scripting a replay (a module: it loads torch when imported)
    "replay",
]


def open_sinks(path: str, group: str | None = None):
    """Open a sinktrace store: the probe group named as an xarray.Dataset; with no group, the whole store as an
    xarray.DataTree (one node per probe, however many there are)."""
    from .store.cube import open_sinks as _open

    return _open(path, group)


def demo_store() -> str:
    """The demo run's store, building and replaying the demo run first if needed."""
    from .cli import checkpoint_root, compose, run, store_path

    cfg = compose(["stages=[replay]"])
    status = run(cfg)
    if status != 0:
        raise RuntimeError(f"replaying the demo run failed (exit status {status})")
    return store_path(cfg, checkpoint_root(cfg)[0])
