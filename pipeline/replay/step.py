"""Replay stage: one checkpoint in, a few kilobytes of sink statistics out (runs on a Dask worker)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from ..checkpoints.opened import OpenedCheckpoint, open_checkpoint
from ..devices import concrete_device, device_budget, resolve_device
from ..errors import CheckpointError
from ..records import Checkpoint, Probe
from ..settings import ReplaySettings
from ..store.schema import DIMS, OPTIONAL, SINK_LABELS, STEP_ATTRS, STRING, qbin_edges
from .load import ModelCache

log = logging.getLogger("sinktrace")


@dataclass
class PhaseTimes:
    """Seconds one replay spent building and loading the model (`load`) and running the probe (`measure`), the
    device synchronised at each phase's end: wall-clock `seconds`, and `cpu_seconds` of this process over the same
    phases (all its threads). Layer by layer, blocks are read during `measure`."""

    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - c0


def replay(
    ckpt: Checkpoint | OpenedCheckpoint,
    probe: Probe,
    settings: ReplaySettings,
    read_next: Checkpoint | None = None,
    *,
    models: ModelCache | None = None,
    times: PhaseTimes | None = None,
) -> xr.Dataset:
    """Build the checkpoint's model, run the probe through it and return its statistics (no step dim).

    `ckpt`: the checkpoint, opened here (`checkpoints.opened`: each of its files read once), or already opened.
    `read_next`: the checkpoint that will be replayed after this one; its files are read from disk meanwhile.
    `models`: the model kept from the previous checkpoint, reused when the architecture is the same.
    `times`: filled with the seconds each phase took.
    Weights larger than `settings.max_device_memory`, or a whole model that runs out of device memory under such a
    budget, are streamed block by block instead (pipeline/replay/layered.py), whatever the checkpoint's format. The
    step records which route it took, on which device and in which dtype (`replay_route`, `replay_device`,
    `replay_dtype`).
    """
    from .load import weights_in_memory

    device = resolve_device(settings.device)
    times = times if times is not None else PhaseTimes(device)
    opened = open_checkpoint(ckpt)
    budget = device_budget(settings.max_device_memory, device)
    dtype, nbytes = weights_in_memory(opened, device, settings.dtype) if budget is not None else (settings.dtype, 0)
    if budget is None or nbytes <= budget:
        try:
            return _replay_whole(opened, probe, settings, device, dtype, read_next, models, times)
        except torch.OutOfMemoryError:
            if budget is None:
                raise
        log.warning("%s: out of device memory with the whole model loaded; replaying it layer by layer", opened.path)
    if models is not None:
        models.clear()  # the memory a kept model holds is what the device is short of
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return _replay_layered(opened, probe, settings, device, dtype, read_next, times)


def _replay_whole(opened, probe, settings, device, dtype, read_next, models, times):
    from .load import load_model, read_ahead

    with times.phase("load"):
        model = load_model(
            opened,
            device=device,
            dtype=dtype,
            trust_remote_code=settings.trust_remote_code,
            attn_implementation=opened.route,
            models=models,
        )
    if read_next is not None:
        read_ahead(read_next)
    with times.phase("measure"):
        stats = _measure(opened, model, probe, settings)
    digest = opened.digest.result()  # before the model goes back for another replay to load into
    replayed = _replayed("whole", device, model)
    if models is not None:
        models.give_back(model)
    return to_dataset(stats, opened.step_attrs, probe.seq_len, digest, replayed)


def _replay_layered(opened, probe, settings, device, dtype, read_next, times):
    from .layered import open_layered
    from .load import read_ahead

    with contextlib.ExitStack() as stack:
        with times.phase("load"):  # not the measure phase inside it
            model, run_rows = stack.enter_context(
                open_layered(
                    opened,
                    device=device,
                    dtype=dtype,
                    trust_remote_code=settings.trust_remote_code,
                    attn_implementation=opened.route,
                )
            )
        if read_next is not None:
            read_ahead(read_next)
        with times.phase("measure"):
            stats = _measure(opened, model, probe, settings, run_rows)
        digest = opened.digest.result()
        replayed = _replayed("layered", device, model)
    return to_dataset(stats, opened.step_attrs, probe.seq_len, digest, replayed)


def _replayed(route: str, device: str, model) -> dict[str, str]:
    """How a step was replayed, as the store records it (`schema.REPLAY_COORDS`)."""
    dtype = str(model.dtype).removeprefix("torch.")
    return {"replay_route": route, "replay_device": str(concrete_device(device)), "replay_dtype": dtype}


def _measure(opened, model, probe, settings, run_rows=None):
    from .measure import measure

    vocab = model.get_input_embeddings().num_embeddings
    if int(probe.tokens.max()) >= vocab:
        raise CheckpointError(
            opened.path,
            f"probe {probe.name!r} holds token id {int(probe.tokens.max())}, "
            f"outside this model's vocabulary of {vocab}",
        )
    return measure(
        model,
        probe.tokens,
        batch_size=settings.batch_size,
        key_positions=settings.key_positions,
        run_rows=run_rows,
        measures=[m for m in settings.measure if m != "loss"],
    )


def to_dataset(
    stats: dict[str, np.ndarray],
    step_attrs: dict,
    seq_len: int,
    weights_digest: str | None = None,
    replayed: dict[str, str] | None = None,
) -> xr.Dataset:
    """One step's statistics as a Dataset, with `step_attrs` (`OpenedCheckpoint.step_attrs`: the model's
    architecture, config fingerprint and attention route) as its attributes; `weights_digest`
    (`checkpoints.digest`) and `replayed` (`replay_route`, `replay_device`, `replay_dtype`) become scalar
    coordinates."""
    missing = [name for name in DIMS if name not in stats and name not in OPTIONAL]
    if missing:
        raise RuntimeError(f"the measurement returned no {', '.join(missing)}")
    data_vars = {
        name: (DIMS[name], np.asarray(value, dtype=np.float64)) for name, value in stats.items() if name in DIMS
    }
    n_layer, n_head = data_vars["sink_mass"][1].shape
    edges = np.asarray(qbin_edges(seq_len))
    n_qbin = data_vars["sink_mass_by_q"][1].shape[-1]
    if len(edges) != n_qbin + 1:
        raise RuntimeError("the measurement's qbin edges do not match sink_mass_by_q")
    coords = {
        "layer": np.arange(n_layer),
        "head": np.arange(n_head),
        "kv_head": np.arange(data_vars["key_norm"][1].shape[-1]),
        "key": np.arange(data_vars["key_mass"][1].shape[-1]),
        "qbin": np.arange(n_qbin),
        "qbin_start": ("qbin", edges[:-1].astype(np.int64)),
        "qbin_stop": ("qbin", edges[1:].astype(np.int64)),
    }
    if any("sink" in dims for dims, _ in data_vars.values()):
        coords["sink"] = np.array(SINK_LABELS, dtype=STRING)
    if weights_digest is not None:
        coords["weights_digest"] = weights_digest
    coords |= replayed or {}
    return xr.Dataset(data_vars, coords=coords, attrs={name: step_attrs[name] for name in STEP_ATTRS})
