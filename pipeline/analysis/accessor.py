"""``ds.sinks.<method>(...)``: the analysis functions bound to one probe group, generated from one table so that
each function's signature, defaults and docstring exist once."""

from __future__ import annotations

import functools
import inspect

import xarray as xr

from . import circuit, emergence, pairs, selection

# accessor method -> the function it calls with the Dataset as its first argument
METHODS = {
    "score": selection.sink_score,
    "layer_mean": selection.layer_sink_mass,
    "sink_rate": emergence.sink_rate,
    "emergence_step": emergence.emergence_step,
    "first_crossing_step": emergence.first_crossing_step,
    "onset_layer": emergence.onset_layer,
    "early_share": emergence.early_share,
    "profile_change": emergence.profile_change,
    "convergence_step": emergence.convergence_step,
    "massive_activation_ratio": emergence.massive_activation_ratio,
    "writer_ratio": circuit.writer_ratio,
    "circuit_writer": circuit.circuit_writer,
    "writer_settle_step": circuit.writer_settle_step,
    "recognition_step": circuit.recognition_step,
    "mixing_effect": circuit.mixing_effect,
    "circuit_share": circuit.circuit_share,
    "circuit_convergence_step": circuit.circuit_convergence_step,
    "training_loss": selection.training_loss,
    "same_weights": pairs.same_weights,
    "positional_index": pairs.positional_index_pair,  # this group as the fixed-first-token probe
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
        return selection.done(self._ds)


for _name, _fn in METHODS.items():
    setattr(SinkAccessor, _name, _bound(_name, _fn))
