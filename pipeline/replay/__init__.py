"""The `replay` stage (configured by `conf/replay/`): one checkpoint in, its sink statistics out.

`step.replay` runs one checkpoint; `load` builds its model, `layered` runs it block by block when its weights exceed
`replay.max_device_memory`, `attention` and `measure` collect the statistics (`eager` for families outside
transformers' attention interface), and `reference` is the independent eager reference `sinktrace check` and the
tests compare with. For scripting a replay: `replay`, `ReplaySettings`, `PhaseTimes`, `ModelCache`,
`open_checkpoint` / `OpenedCheckpoint` (a checkpoint opened once, whose config, key map, attention route, fingerprint
and weights `replay` and the loaders take instead of re-reading its files), and `fused_attention`, the attention
kernel with its statistics, for timing it apart from a forward. Importing this package loads torch and
transformers.
"""

from ..checkpoints.opened import OpenedCheckpoint, open_checkpoint
from ..settings import ReplaySettings
from .attention import fused_attention
from .load import ModelCache
from .step import PhaseTimes, replay

__all__ = [
    "replay",
    "ReplaySettings",
    "PhaseTimes",
    "ModelCache",
    "OpenedCheckpoint",
    "open_checkpoint",
    "fused_attention",
]
