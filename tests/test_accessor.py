"""The ``ds.sinks`` accessor is generated from one table: each method has its function's signature (less the
Dataset), defaults and docstring, and returns what the function returns."""

import inspect

import numpy as np
import xarray as xr

import pipeline
from pipeline import analysis as an
from pipeline.analysis.accessor import METHODS


def test_each_method_has_its_functions_signature_and_defaults():
    ds = xr.Dataset({"sink_mass": ("step", [0.1])})
    assert set(METHODS) | {"done"} == {n for n in dir(ds.sinks) if not n.startswith("_")}
    for name, fn in METHODS.items():
        method = getattr(ds.sinks, name)
        want = list(inspect.signature(fn).parameters.values())[1:]
        assert list(inspect.signature(method).parameters.values()) == want, name
        assert method.__doc__ == fn.__doc__ and method.__name__ == name
        assert fn is getattr(an, fn.__name__)  # every method's function is public
    # the defaults a reader relies on, once
    assert inspect.signature(ds.sinks.sink_rate).parameters["eps"].default == 0.3
    assert inspect.signature(ds.sinks.convergence_step).parameters["window"].default == 3


def test_methods_answer_as_their_functions():
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"sink_mass": (("step", "layer", "head"), rng.random((4, 2, 3)))},
        coords={"step": [0, 10, 20, 30], "status": ("step", np.array(["done", "done", "failed", "done"]))},
        attrs={"probe_seq_len": 16},
    )
    xr.testing.assert_identical(ds.sinks.sink_rate(0.5, dim="head"), an.sink_rate(ds, 0.5, dim="head"))
    xr.testing.assert_identical(ds.sinks.score(convention="gu"), an.sink_score(ds, "gu"))
    xr.testing.assert_identical(ds.sinks.done, an.done(ds))
    assert ds.sinks.done.sizes["step"] == 3
    assert isinstance(ds.sinks, pipeline.SinkAccessor)
