"""Emergence analysis over the sink cube: plain functions and the ``ds.sinks`` accessor.

The modules: ``per_run`` (several runs compared), ``selection`` (probe groups, done steps, the sink score),
``emergence``, ``circuit`` (the P0 circuit and over-mixing), ``pairs`` (same weights, the positional index) and
``accessor`` (``ds.sinks``, generated from a table of these functions).

Every function takes one probe group's Dataset (dims step, layer, head, ...) as the
store holds it and keeps only the steps whose ``status`` is "done": failed and
pending steps are dropped from the step axis, not treated as zeros. The results are
DataArrays whose ``attrs`` say what was computed (``definition``, ``eps``,
``convention``), so a saved result still tells how it was made. They stay lazy
when the cube is Dask-backed; only the tiny ``status`` array is read eagerly.

Several runs compared (``pipeline.open_runs``: a ``run`` dimension, steps a run lacks
NaN with status ``missing``): every function runs on each run's own cube and stacks
the answers along ``run`` (docs/data.md, "Runs compared").

Conventions (docs/data.md, "Decisions"):

* ``convention="stored"`` (the default) uses ``sink_mass`` as stored: attention on
  key 0 averaged over queries t = 1..T-1.
* ``convention="gu"`` uses Gu et al.'s (ICLR 2025) first-token score, the mean over
  all T queries including query 0 (whose weight on key 0 is always 1):
  ``score = (1 + (T - 1) * sink_mass) / T``, T = the probe length
  (``probe_seq_len`` in the group attrs). Their sink rate thresholds it at
  eps = 0.3 on 64-token probes; Barbero et al. use eps = 0.8.
"""

from .accessor import SinkAccessor
from .circuit import (
    circuit_convergence_step,
    circuit_share,
    circuit_writer,
    mixing_effect,
    recognition_step,
    writer_ratio,
    writer_settle_step,
)
from .emergence import (
    convergence_step,
    early_share,
    emergence_step,
    first_crossing_step,
    massive_activation_ratio,
    onset_layer,
    profile_change,
    sink_rate,
)
from .pairs import first_token_pair, positional_index, positional_index_pair, same_weights
from .pairs import same_weights_lines as same_weights_lines
from .per_run import MISSING as MISSING
from .per_run import RUN as RUN
from .per_run import one_run, run_names
from .selection import Convention as Convention
from .selection import (
    done,
    layer_sink_mass,
    probe_groups,
    probe_length,
    sink_score,
    training_loss,
    uniform_sink_mass,
)

__all__ = [
    "SinkAccessor",
    "circuit_convergence_step",
    "circuit_share",
    "circuit_writer",
    "convergence_step",
    "done",
    "early_share",
    "emergence_step",
    "first_crossing_step",
    "first_token_pair",
    "layer_sink_mass",
    "massive_activation_ratio",
    "mixing_effect",
    "recognition_step",
    "onset_layer",
    "one_run",
    "positional_index",
    "positional_index_pair",
    "probe_groups",
    "probe_length",
    "profile_change",
    "run_names",
    "training_loss",
    "writer_ratio",
    "writer_settle_step",
    "same_weights",
    "sink_rate",
    "sink_score",
    "uniform_sink_mass",
]
