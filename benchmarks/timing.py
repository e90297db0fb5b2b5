"""What a contender's run is measured with: wall and CPU seconds, peak host and device memory, the device's name."""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def weight_files(ckpts) -> list[str]:
    return [f for c in ckpts for f in c.weight_files]


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()  # also load_model's CheckpointError around an allocation failure
    return "out of memory" in text or "can't allocate memory" in text


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def median_time(fn, repeats: int, device: str, warm: bool) -> tuple[float, float]:
    """Median wall-clock seconds of `repeats` calls, and median CPU seconds of this process over the same calls
    (all its threads: on a CPU shared with other work, CPU time drifts less with the load than wall time)."""
    if warm:
        fn()
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


class Peaks:
    """Peak host RSS (the kernel's VmHWM, reset through /proc/self/clear_refs; else getrusage's process-wide
    high-water) and peak device memory (torch.cuda.max_memory_allocated) since `reset()`."""

    def __init__(self, device: str):
        self.device_str = device
        self.host_scope = "process"

    def reset(self) -> None:
        import torch

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.host_scope = "since reset"
        except OSError:
            self.host_scope = "process"
        if self.device_str.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch.device(self.device_str))

    def host(self) -> int:
        if self.host_scope == "since reset":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    def device(self) -> int | None:
        import torch

        if not self.device_str.startswith("cuda"):
            return None
        return int(torch.cuda.max_memory_allocated(torch.device(self.device_str)))
