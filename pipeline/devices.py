"""Devices, dtypes and memory: what `replay.device`, `replay.dtype` and `replay.max_device_memory` mean."""

from __future__ import annotations

import os

import torch

from .choices import dtype_name

# safetensors' dtype names -> torch, for the floating types a model's weights come in
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def resolve_device(device: str) -> str:
    """`auto` is the GPU where torch sees one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def concrete_device(device) -> torch.device:
    """A bare "cuda" made the current GPU, as transformers resolves it (its loader threads would take GPU 0)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def parse_dtype(dtype) -> torch.dtype | None:
    """A dtype name ("bf16", "float32", "torch.float16": `choices.dtype_name`) or torch dtype; None for "auto"."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        return dtype
    name = dtype_name(dtype)
    return None if name == "auto" else getattr(torch, name)


def load_dtype(dtype, device, stored: torch.dtype) -> torch.dtype:
    """`dtype` parsed; "auto" is float32 on the CPU and the checkpoint's own (`stored`) on an accelerator."""
    return parse_dtype(dtype) or (torch.float32 if torch.device(device).type == "cpu" else stored)


def device_budget(setting, device: str | torch.device) -> int | None:
    """`replay.max_device_memory` in bytes: an int, a size like "8GB" or "512MiB", null (no limit), or "auto":
    70% of the device's memory (the GPU's, or the machine's RAM on the CPU), leaving the rest for activations."""
    if setting is None:
        return None
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device.index or torch.cuda.current_device()).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(0.7 * total)
    from dask.utils import parse_bytes

    try:
        budget = parse_bytes(setting)
    except (ValueError, TypeError):
        raise ValueError(
            f"replay.max_device_memory={setting!r}: give a size like 24GB or 512MiB, auto, or null"
        ) from None
    if budget <= 0:
        raise ValueError(f"replay.max_device_memory={setting!r}: must be positive")
    return budget


def available_host_bytes() -> int:
    """Memory the OS can hand out now without swapping (MemAvailable), page cache it may take back included; without
    /proc/meminfo, the free pages alone (a lower bound).

    Raises:
        OSError: the OS tells neither.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        raise OSError("this OS tells neither /proc/meminfo's MemAvailable nor the free pages") from None


def release_pinned() -> None:
    """Hand pinned staging memory back to the OS: torch caches it, and locked pages cannot be swapped out."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def use_threads(setting, workers_here: int = 1) -> int:
    """Set torch's thread count for replays: `setting` ("auto": the cores this process may run on, shared by the
    worker processes on this machine). More threads than cores only make OpenMP threads wait for each other."""
    if setting == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        setting = max(1, cores // max(1, workers_here))
    if torch.get_num_threads() != int(setting):
        torch.set_num_threads(int(setting))
    return int(setting)
