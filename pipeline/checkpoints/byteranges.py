"""Many byte ranges of a file (or of several files), read at once: from a local file by positioned reads, from
object storage (any fsspec URL) with several requests in flight.

On object storage a request's cost is mostly its latency (tens of milliseconds for the first byte), not its size,
so reading a checkpoint's few hundred tensors one request at a time spends nearly all its time waiting. Here the
ranges are sorted, neighbours closer than `gap` bytes are merged into one request (up to `max_request` bytes:
the bytes between them are read and dropped, which costs less than a round trip), and up to `concurrency`
requests are in flight at once, each on its own thread (fsspec's filesystems are thread-safe).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

from ..locations import is_url, local_path


@dataclass(frozen=True)
class ReadPlan:
    """How ranges are read: `concurrency` requests in flight (1: one at a time), neighbours within `gap` bytes
    merged into one request of at most `max_request` bytes."""

    concurrency: int = 16
    gap: int = 1 << 20
    max_request: int = 64 << 20


ONE_AT_A_TIME = ReadPlan(concurrency=1, gap=0, max_request=0)
S3_POOL = 10  # botocore's default max_pool_connections


def coalesce(ranges: list[tuple[int, int]], plan: ReadPlan) -> list[tuple[int, int]]:
    """The requests that cover `ranges` ([start, stop) pairs): sorted, neighbours merged as `plan` allows."""
    merged: list[list[int]] = []
    for start, stop in sorted(set(ranges)):
        if (
            merged
            and start - merged[-1][1] <= plan.gap
            and max(stop, merged[-1][1]) - merged[-1][0] <= plan.max_request
        ):
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def read_ranges(path: str, ranges: list[tuple[int, int]], plan: ReadPlan = ReadPlan()) -> list[bytes]:
    """The bytes of each [start, stop) range of the file, in the order asked.

    Raises:
        OSError: a read fails or comes back short (the file is shorter than a range), naming the file.
    """
    return read_files({path: ranges}, plan)[path]


def read_files(ranges: dict[str, list[tuple[int, int]]], plan: ReadPlan = ReadPlan()) -> dict[str, list[bytes]]:
    """{file: the bytes of each of its [start, stop) ranges, in the order asked}, the requests of all the files in
    flight together (a sharded checkpoint's files are read at once, not one after another).

    Raises:
        OSError: a read fails or comes back short (the file is shorter than a range), naming the file.
    """
    requests = {path: coalesce(asked, plan) for path, asked in ranges.items() if asked}
    fetchers, fds = {}, []
    try:
        for path in requests:
            if is_url(path):
                fs, remote = _filesystem(path, plan.concurrency)
                fetchers[path] = functools.partial(cat_range, fs, remote, path)
            else:
                fds.append(os.open(local_path(path), os.O_RDONLY))
                fetchers[path] = functools.partial(_pread, fds[-1])
        jobs = [(path, request) for path, asked in requests.items() for request in asked]

        def fetch(job):
            return fetchers[job[0]](*job[1])

        got = _in_threads(fetch, jobs, plan.concurrency)
    finally:
        for fd in fds:
            os.close(fd)
    by_file: dict[str, list] = {path: [] for path in requests}
    for (path, (start, stop)), data in zip(jobs, got):
        _check_length(path, start, stop, data)
        by_file[path].append(data)
    out: dict[str, list[bytes]] = {}
    for path, asked in ranges.items():
        out[path] = []
        for start, stop in asked:
            i = _covering(requests[path], start)
            at = start - requests[path][i][0]
            out[path].append(bytes(memoryview(by_file[path][i])[at : at + stop - start]))
    return out


def cat_range(fs, remote: str, url: str, start: int, stop: int) -> bytes:
    """The bytes [start, stop) of an object, as `bounded` asks for them; OSError naming the URL when the answer
    holds fewer or more bytes than asked for."""
    # start= and end= by name: s3fs's cat_file takes a version id second
    data = bounded(fs, url, f"bytes {start}-{stop}", "cat_file", remote, start=start, end=stop)
    _check_length(url, start, stop, data)
    return data


def _check_length(path: str, start: int, stop: int, data: bytes) -> None:
    if len(data) != stop - start:
        what = "shorter than the range" if len(data) < stop - start else "longer than the range asked for"
        raise OSError(f"{path}: read {len(data)} of the {stop - start} bytes at {start}: the answer is {what}")


def bounded(fs, url: str, what: str, method: str, *args, **kwargs):
    """fs.method(*args, **kwargs) on object storage: the whole call, its retries included, bounded by the
    object-storage deadline (`locations.bound_waits`), and any error of the transport (aiohttp, botocore, s3fs) an
    OSError naming the URL (a missing object stays FileNotFoundError)."""
    from fsspec.asyn import AsyncFileSystem

    from ..errors import describe
    from ..locations import object_storage_deadline

    deadline = object_storage_deadline()
    try:
        if isinstance(fs, AsyncFileSystem) and deadline:
            return getattr(fs, method)(*args, timeout=deadline, **kwargs)
        return getattr(fs, method)(*args, **kwargs)
    except TimeoutError:  # fsspec's FSTimeoutError: the deadline passed
        raise OSError(f"{url}: no whole answer for {what} within checkpoints.download_timeout={deadline:g} s") from None
    except FileNotFoundError:
        raise
    except Exception as e:
        if "ClientPayloadError" in {c.__name__ for c in type(e).__mro__}:  # aiohttp's, by name: s3fs brings it
            raise OSError(
                f"{url}: reading {what} failed: the answer is shorter than its declared length, the connection "
                f"closed before its end ({describe(e)})"
            ) from None
        raise OSError(f"{url}: reading {what} failed: {describe(e)}") from None


def _in_threads(fn, jobs: list, concurrency: int) -> list:
    """fn(job) for each of `jobs`, in order, with up to `concurrency` running at once on daemon threads. The caller
    waits in short steps, so that Ctrl-C or SIGTERM ends it at once even while a request hangs (the threads are left
    behind, never joined: a hanging request must not hold the process); the first error is raised as soon as it
    comes, and no more jobs are started."""
    if concurrency <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []
    todo = iter(enumerate(jobs))
    lock = threading.Lock()
    left = [len(jobs)]
    finished = threading.Event()

    def work():
        while not errors:
            with lock:
                i, job = next(todo, (None, None))
            if i is None:
                return
            try:
                results[i] = fn(job)
            except BaseException as e:
                errors.append(e)
                finished.set()
                return
            with lock:
                left[0] -= 1
                if not left[0]:
                    finished.set()

    for _ in range(min(concurrency, len(jobs))):
        threading.Thread(target=work, name="sinktrace-ranges", daemon=True).start()
    while not finished.wait(0.5):
        pass
    if errors:
        raise errors[0]
    return results


def _pread(fd: int, start: int, stop: int) -> bytes:
    return os.pread(fd, stop - start, start)


def _filesystem(path: str, concurrency: int):
    """fsspec's (filesystem, path) for a URL. s3fs's connections come from botocore's pool of
    `max_pool_connections` (10 by default), which would hold requests beyond the tenth back: for more in flight the
    pool is made as large (other settings of fsspec's configuration for s3 kept)."""
    import fsspec
    from fsspec.config import conf

    if fsspec.core.split_protocol(path)[0] in ("s3", "s3a") and concurrency > S3_POOL:
        given = dict((conf.get("s3") or {}).get("config_kwargs") or {})
        pool = max(int(given.get("max_pool_connections", S3_POOL)), concurrency)
        return fsspec.core.url_to_fs(path, config_kwargs={**given, "max_pool_connections": pool})
    return fsspec.core.url_to_fs(path)


def _covering(requests: list[tuple[int, int]], start: int) -> int:
    import bisect

    return bisect.bisect_right(requests, (start, float("inf"))) - 1
