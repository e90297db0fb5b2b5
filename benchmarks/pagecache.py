"""The page cache: emptying it of the checkpoint files (so that a timed pass reads from storage), checking that it
is empty (mincore), and the read floor: how fast the files come off storage when nothing else is done with them."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import mmap
import os
import sys
import time
from pathlib import Path

# A page cache emptied to at most this share of the files' bytes counts as cold.
COLD_RESIDENT_MAX = 0.01


def read_floor(files: list[str], how: str, chunk: int = 16 * 2**20) -> dict:
    """Read every file once from a cold page cache (then once more, warm), in bytes per second."""
    cache = drop_page_cache(files, how)
    buf = bytearray(chunk)
    view = memoryview(buf)

    def read_all() -> tuple[int, float]:
        total = 0
        t0 = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while n := f.readinto(view):
                    total += n
        return total, time.perf_counter() - t0

    io0 = read_io()
    total, seconds = read_all()
    io1 = read_io()
    _, warm_seconds = read_all()
    disk = None if io0 is None or io1 is None else io1["read_bytes"] - io0["read_bytes"]
    return {
        "status": "ok",
        "bytes": total,
        "files": len(files),
        "seconds": seconds,
        "bytes_per_s": total / seconds,
        "warm_bytes_per_s": total / warm_seconds,
        "storage_read_bytes": disk,  # what the block layer read during the cold pass (/proc/self/io read_bytes)
        "cache": cache,
    }


def read_io() -> dict | None:
    """This process's I/O counters: rchar (bytes passed by read calls) and read_bytes (fetched from storage)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}
    except (OSError, KeyError, ValueError):
        return None


def io_per_ckpt(io0, io1, n: int) -> dict | None:
    if io0 is None or io1 is None:
        return None
    return {k: (io1[k] - io0[k]) / n for k in io0}


@functools.cache
def libc():
    """The C library, with mmap, munmap and mincore typed."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def resident_fraction(paths: list[str]) -> float | None:
    """Share of the files' bytes in the page cache (mincore over a mapping of each file); None where unknown."""
    import numpy as np

    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = libc()
        page = os.sysconf("SC_PAGE_SIZE")
        resident = total = 0
        for path in paths:
            size = os.path.getsize(path)
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr is None or addr == ctypes.c_void_p(-1).value:
                    return None
                try:
                    pages = (size + page - 1) // page
                    vec = (ctypes.c_ubyte * pages)()
                    if lib.mincore(addr, size, vec) != 0:
                        return None
                    resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
                finally:
                    lib.munmap(addr, size)
            finally:
                os.close(fd)
            total += pages * page
        return resident / total if total else 0.0
    except (OSError, AttributeError):
        return None


def drop_page_cache(paths: list[str], how: str = "auto") -> dict:
    """Evict the files from the page cache: posix_fadvise(POSIX_FADV_DONTNEED) per file (no root needed, touches
    only these files), and with how=auto, `echo 1 > /proc/sys/vm/drop_caches` when pages stay resident (root).
    Returns the method, the resident share afterwards (mincore), whether that counts as cold, and notes."""
    gc.collect()  # mapped pages of dead tensors cannot be evicted
    notes, methods = [], []
    if how == "off":
        resident = resident_fraction(paths)
        return {
            "method": "off",
            "resident_after": resident,
            "cold": False,
            "note": "page cache not dropped (cold_cache=off)",
        }
    if how in ("auto", "fadvise"):
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # dirty pages cannot be dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            methods.append("posix_fadvise(DONTNEED)")
        except (OSError, AttributeError) as e:
            notes.append(f"posix_fadvise failed ({e})")
    resident = resident_fraction(paths)
    if how == "drop_caches" or (how == "auto" and (not methods or (resident or 0.0) > COLD_RESIDENT_MAX)):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            methods.append("drop_caches")
        except OSError as e:
            notes.append(f"cannot write /proc/sys/vm/drop_caches ({e.strerror or e})")
        resident = resident_fraction(paths)
    if not methods:
        cold = False
    elif resident is None:
        cold = None
        notes.append("residency unknown (no mincore): cache dropped, not verified")
    else:
        cold = resident <= COLD_RESIDENT_MAX
        if not cold:
            notes.append(f"{resident:.0%} of the bytes stayed in the page cache")
    return {"method": " + ".join(methods) or "none", "resident_after": resident, "cold": cold, "note": "; ".join(notes)}
