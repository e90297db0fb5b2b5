"""`report.tensorboard=DIR`: each stored step's sink measures as TensorBoard scalars, keyed by the training step.

They go into ``DIR/<probe group>/``, so a TensorBoard started on a folder above DIR shows them as one run per probe
next to the training loss. Each step gets its own event file (``events.out.tfevents.<step>.sinktrace``), written
whole under a temporary name and renamed over the old one: writing a step again (a rerun, `replay.overwrite`)
replaces its points instead of adding a second set. A TensorBoard already running reads new steps as they come, and
a rewritten earlier step after a restart (it does not go back to files it has read).

Tags: ``sink_mass/layer_NN`` and ``entropy/layer_NN`` (mean over heads), ``sinks/sink_rate`` (share of heads above
``report.eps``), ``sinks/onset_layer`` (left out at steps where no layer is above eps); where ``replay.measure``
stored them, ``p0_circuit/share_layers_0_1`` and ``p0_circuit/writer`` (pipeline.analysis.circuit_share and
circuit_writer) and ``p0_similarity/layer_NN``. The event files are written with the ``tensorboard`` package's own
record writer and protocol buffers: the extra ``pip install 'sinktrace[tensorboard]'``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xarray as xr

from .. import analysis as an
from ..settings import needs_tensorboard
from ..store.schema import MEASURED

SUFFIX = ".sinktrace"
_STEP_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.sinktrace$")


def step_file(group_dir: Path, step: int) -> Path:
    return group_dir / f"events.out.tfevents.{int(step):012d}{SUFFIX}"


def step_scalars(ds: xr.Dataset, eps: float = 0.3) -> dict[int, dict[str, float]]:
    """step -> {tag: value} for the done steps of one probe group (NaN values left out)."""
    d = an.done(ds)
    columns: dict[str, xr.DataArray] = {}
    mass, entropy = an.layer_sink_mass(d), d["entropy"].mean("head") if "entropy" in d else None
    for layer in d["layer"].values:
        columns[f"sink_mass/layer_{int(layer):02d}"] = mass.sel(layer=layer)
        if entropy is not None:
            columns[f"entropy/layer_{int(layer):02d}"] = entropy.sel(layer=layer)
        if "p0_similarity" in d:
            columns[f"p0_similarity/layer_{int(layer):02d}"] = d["p0_similarity"].sel(layer=layer)
    columns["sinks/sink_rate"] = an.sink_rate(d, eps)
    columns["sinks/onset_layer"] = an.onset_layer(d, eps)
    if all(name in d for name in MEASURED["outputs"]):
        columns["p0_circuit/share_layers_0_1"] = an.circuit_share(d, k=2)
        columns["p0_circuit/writer"] = an.circuit_writer(d)
    values = {tag: np.asarray(column.values, dtype=float) for tag, column in columns.items()}
    return {
        int(step): {tag: float(v[i]) for tag, v in values.items() if np.isfinite(v[i])}
        for i, step in enumerate(d["step"].values)
    }


def write_step(group_dir: Path, step: int, scalars: dict[str, float]) -> Path:
    """One step's scalars as one event file, replacing the step's earlier file."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    path = step_file(group_dir, step)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # TensorBoard reads only names holding "tfevents"
    now = time.time()
    with open(tmp, "wb") as f:
        writer = RecordWriter(f)
        writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in sorted(scalars.items())]
        )
        writer.write(event_pb2.Event(wall_time=now, step=int(step), summary=summary).SerializeToString())
    os.replace(tmp, path)
    return path


def write_scalars(
    store_location: str, log_dir: str | os.PathLike, *, steps: Iterable[int] | None = None, eps: float = 0.3
) -> list[Path]:
    """Write the scalars of every probe group's done steps (only ``steps``, where given) under ``log_dir``.

    With no ``steps``, every done step is written and the files of steps no longer done are removed, so the
    folder mirrors the store. Returns the files written."""
    needs_tensorboard()
    from ..store.cube import open_sinks
    from .html import safe_name

    wanted = None if steps is None else {int(s) for s in steps}
    written = []
    for name, ds in an.probe_groups(open_sinks(store_location)).items():
        group_dir = Path(log_dir) / safe_name(name)
        group_dir.mkdir(parents=True, exist_ok=True)
        if wanted is not None:
            ds = ds.sel(step=[s for s in ds["step"].values.tolist() if s in wanted])
        keep = [v for v in ("sink_mass", "entropy", "p0_similarity", *MEASURED["outputs"]) if v in ds.data_vars]
        per_step = step_scalars(ds[keep].load(), eps)
        for step, scalars in per_step.items():
            written.append(write_step(group_dir, step, scalars))
        if wanted is None:
            for old in group_dir.iterdir():
                match = _STEP_FILE.match(old.name)
                if match and int(match.group(1)) not in per_step:
                    old.unlink()
    return written
