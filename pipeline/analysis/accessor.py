"""``ds.sinks.<method>(...)``: the analysis functions bound to one probe group, generated from one table so that
each function's signature, defaults and docstring exist once."""

from __future__ import annotations

import functools
import inspect

import xarray as xr

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
from .pairs import positional_index_pair, same_weights
from .selection import done, layer_sink_mass, sink_score, training_loss

# accessor method -> the function it calls with the Dataset as its first argument
METHODS = {
    "score": sink_score,
    "layer_mean": layer_sink_mass,
    "sink_rate": sink_rate,
    "emergence_step": emergence_step,
    "first_crossing_step": first_crossing_step,
    "onset_layer": onset_layer,
    "early_share": early_share,
    "profile_change": profile_change,
    "convergence_step": convergence_step,
    "massive_activation_ratio": massive_activation_ratio,
    "writer_ratio": writer_ratio,
    "circuit_writer": circuit_writer,
    "writer_settle_step": writer_settle_step,
    "recognition_step": recognition_step,
    "mixing_effect": mixing_effect,
    "circuit_share": circuit_share,
    "circuit_convergence_step": circuit_convergence_step,
    "training_loss": training_loss,
    "same_weights": same_weights,
    "positional_index": positional_index_pair,  # this group as the fixed-first-token probe
}


def _bound(name: str, fn):
    """A method calling ``fn(self._ds, ...)``, with ``fn``'s docstring and its signature but the first parameter."""

    def method(self, *args, **kwargs):
        return fn(self._ds, *args, **kwargs)

    functools.update_wrapper(method, fn)
    method.__name__, method.__qualname__ = name, f"SinkAccessor.{name}"
    signature = inspect.signature(fn)
    own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(parameters=[own, *list(signature.parameters.values())[1:]])
    return method


@xr.register_dataset_accessor("sinks")
class SinkAccessor:
    """``ds.sinks.<function>(...)``: the analysis functions bound to one probe group (or to several runs of one,
    from ``pipeline.open_runs``: answers per run). The methods are those of ``METHODS``."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    @property
    def done(self) -> xr.Dataset:
        return done(self._ds)


for _name, _fn in METHODS.items():
    setattr(SinkAccessor, _name, _bound(_name, _fn))
