"""The Hub cache of one run: its files fetched ahead within a limit, checked, journalled and deleted once stored."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from functools import partial

from ...errors import CheckpointError, describe
from ...locations import read_bytes, write_json_atomic
from ...records import Checkpoint
from ..weightfiles import SAFE_INDEX_NAME
from .convert import convert, index_shards
from .revisions import PICKLE_INDEX, PREFIX, Revision, shards
from .transfer import NoAnswer, WrongBytes, get_checked, in_time

log = logging.getLogger(__package__)

AHEAD = 2  # checkpoints fetched ahead of the one being replayed
TRIES = 3  # attempts per file before its step fails
STALE_PARTIAL = 600  # seconds without a write after which a partial download is another run's leftover


class HubCache:
    """The files of the revisions being replayed: fetched `AHEAD` in a background thread while what is held stays
    within `limit` bytes, and deleted once their step is released, unless `keep`. What this run fetched and has not
    deleted is journalled in `workdir`, so that a killed run's files are the next run's to delete."""

    def __init__(
        self,
        root: str,
        repo_id: str,
        storage: str,
        workdir,
        revisions: dict[int, Revision],
        *,
        limit: int,
        keep: bool,
        offline: bool,
        request_timeout: float,
        download_timeout: float,
        retry_wait: float,
    ):
        self.root = root
        self.repo_id = repo_id
        self.storage = storage
        self.revisions = revisions  # the source's, by step
        self.limit = limit
        self.keep = keep
        self.offline = offline
        self.request_timeout = request_timeout
        self.download_timeout = download_timeout
        self.retry_wait = retry_wait
        self.converted = workdir / "converted"  # safetensors copies of pickled revisions
        # what sinktrace fetched and has not deleted yet: a killed run's files are this run's to delete
        self._journal = workdir / "fetched.json"
        self._downloaded: dict[int, list[str]] = {}  # step -> cache files this run created
        # the fetch thread claims files while the driver deletes a stored step's: one at a time
        self._files_lock = threading.RLock()
        self._leftover: set[str] = set() if self.keep else _read_journal(self._journal)
        self._held: dict[int, int] = {}  # step -> bytes fetched and not yet released
        self._cond = threading.Condition()
        self._ready: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def remove_stale_partials(self) -> None:
        """A download killed mid-file leaves `<blob>.<id>.incomplete`: never trusted (the client renames only a
        finished file), never resumed (each download writes a file of its own), so it would only take disk."""
        folder = os.path.join(self.storage, "blobs")
        for name in _blobs(self.storage):
            path = os.path.join(folder, name)
            try:
                if name.endswith(".incomplete") and time.time() - os.path.getmtime(path) > STALE_PARTIAL:
                    os.unlink(path)
                    log.info("%s: removed %s, left by an interrupted download", self.root, path)
            except OSError:
                pass

    def start(self, todo: list[Checkpoint]) -> None:
        """Fetch the checkpoints of `todo` in order, in the background, within the cache limit."""
        with self._cond:
            self._closed = False
        self._ready = queue.Queue()
        self._thread = threading.Thread(target=self._fetch_all, args=(list(todo),), daemon=True, name="hub-fetch")
        self._thread.start()

    def arrived(self, wait: bool) -> list[tuple[Checkpoint, Exception | None]]:
        """The checkpoints fetched since the last call (in the order of `start`), each with None or why its fetch
        failed; `wait`: wait for the next one when none is."""
        out = [self._ready.get()] if wait else []
        while True:
            try:
                out.append(self._ready.get_nowait())
            except queue.Empty:
                return out

    def release(self, ckpt: Checkpoint) -> None:
        """The step is stored (or failed): delete what this run downloaded for it, unless told to keep it."""
        if not self.keep:
            self._delete(ckpt.step)
        with self._cond:
            self._held.pop(ckpt.step, None)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop fetching, and delete what was fetched and not released (unless told to keep it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not self.keep:
            with self._files_lock:
                for step in list(self._downloaded):
                    self._delete(step)
                self._downloaded[-1], self._leftover = sorted(self._leftover), set()
                self._delete(-1)

    def _fetch_all(self, todo: list[Checkpoint]) -> None:
        for ckpt in todo:
            need = self._size(self.revisions[ckpt.step])
            with self._cond:
                self._cond.wait_for(
                    lambda need=need: (
                        self._closed
                        or not self._held
                        or (len(self._held) <= AHEAD and sum(self._held.values()) + need <= self.limit)
                    )
                )
                if self._closed:
                    return
                self._held[ckpt.step] = need
            if need > self.limit:
                log.warning(
                    "%s: revision %s takes %s, more than checkpoints.cache_limit; fetched alone",
                    self.root,
                    self.revisions[ckpt.step].name,
                    _size_text(need),
                )
            try:
                self._fetch(ckpt)
                with self._cond:  # what the files take on disk, whatever the listing said
                    if ckpt.step in self._held:
                        self._held[ckpt.step] = self._on_disk(ckpt.step)
                self._ready.put((ckpt, None))
            except Exception as e:  # the step fails; the others go on
                self._ready.put((ckpt, e))

    def _on_disk(self, step: int) -> int:
        total = 0
        with self._files_lock:
            paths = list(self._downloaded.get(step, ()))
        for path in paths:
            for folder, _, names in os.walk(path) if os.path.isdir(path) else [("", (), [path])]:
                for name in names:
                    try:
                        total += os.lstat(os.path.join(folder, name)).st_size
                    except OSError:
                        pass
        return total

    def _size(self, rev: Revision) -> int:
        size = sum(rev.files.get(n, (0, ""))[0] for n in rev.fetch)
        size += sum(rev.files[n][0] for n in shards(rev.files, rev.fetch))
        return size * (2 if rev.pickled else 1)  # a converted copy beside the pickles

    def _fetch(self, ckpt: Checkpoint) -> None:
        rev = self.revisions[ckpt.step]
        for name in rev.fetch:
            path = self.download(rev, name)
            if name in (SAFE_INDEX_NAME, PICKLE_INDEX):
                for shard in index_shards(path):
                    self.download(rev, shard)
        if rev.pickled:
            convert(os.path.join(self.storage, "snapshots", rev.commit), rev.fetch, ckpt.path)
            self._own(rev.step, ckpt.path)

    def download(self, rev: Revision, name: str) -> str:
        """One file into the cache, retried a few times; CheckpointError naming the file when it cannot be had."""
        snapshot = os.path.join(self.storage, "snapshots", rev.commit)
        pointer = os.path.join(snapshot, name)
        url = f"{PREFIX}{self.repo_id}@{rev.name}/{name}"
        # the blob's name is the listing's hash: the sha256 of an LFS file (the weights), else its git blob id
        blob = os.path.join(self.storage, "blobs", rev.files[name][1]) if name in rev.files else None
        with self._files_lock:
            # another step (two revisions of one commit, or of the same weights) or a killed run may have fetched
            # it: then it is ours to delete too, once every step that uses it is released
            present = os.path.exists(pointer)
            for path in (pointer, os.path.realpath(pointer)) if present else (blob,):
                if path is not None and (path in self._leftover or self._held_elsewhere(path)):
                    self._leftover.discard(path)
                    self._own(rev.step, path)
            if present:
                return pointer
            had_blob = blob is not None and os.path.exists(blob)
        if self.offline:
            raise CheckpointError(url, "not in the local Hugging Face cache, and the Hub is offline")
        if blob is None:  # an index's shard the listing lacks: no size or hash to check it against
            raise CheckpointError(url, "not in the revision's file listing")
        if not had_blob:
            self._fetch_blob(rev, name, url, blob)
            self._own(rev.step, blob)
        os.makedirs(snapshot, exist_ok=True)
        link = f"{pointer}.{uuid.uuid4().hex}.tmp"
        os.symlink(os.path.relpath(blob, snapshot), link)
        os.replace(link, pointer)
        self._own(rev.step, pointer)
        # the commit of the revision's name, for later offline runs (a branch name may hold slashes)
        refs = os.path.join(self.storage, "refs")
        ref = os.path.join(refs, rev.name)
        if _inside(ref, refs):
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(ref), exist_ok=True)
                with open(ref, "w") as f:
                    f.write(rev.commit)
        return pointer

    def _fetch_blob(self, rev: Revision, name: str, url: str, blob: str) -> None:
        """The file's bytes into `blob`, checked against the listing's size and hash, within the deadline."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        size, digest = rev.files[name]
        source = hf_hub_url(self.repo_id, name, revision=rev.commit)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        deadline = time.monotonic() + self.download_timeout
        for attempt in range(TRIES):
            tmp = f"{blob}.{uuid.uuid4().hex[:12]}.incomplete"
            stop = threading.Event()
            ((_, error),) = in_time(
                {0: partial(get_checked, source, tmp, size, digest, self.request_timeout, stop)},
                deadline - time.monotonic(),
            ).values()
            stop.set()
            if error is None:
                os.replace(tmp, blob)
                return
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(error, NoAnswer):
                raise CheckpointError(
                    url, f"not downloaded within checkpoints.download_timeout={self.download_timeout:g} s"
                ) from None
            if isinstance(error, WrongBytes):
                raise CheckpointError(url, str(error)) from None
            if isinstance(error, HfHubHTTPError):
                status = error.response.status_code if error.response is not None else None
                if status is not None and 400 <= status < 500 and status != 429:
                    raise CheckpointError(url, f"the Hub refused it: {describe(error)}") from None
            if not isinstance(error, Exception):
                raise error
            if attempt + 1 < TRIES:
                time.sleep(min(self.retry_wait * 2**attempt, max(0.0, deadline - time.monotonic())))
        raise CheckpointError(url, f"download failed {TRIES} times, last: {describe(error)}")

    def _held_elsewhere(self, path: str) -> bool:
        with self._files_lock:
            return any(path in files for files in self._downloaded.values())

    def _own(self, step: int, path: str) -> None:
        with self._files_lock:
            self._downloaded.setdefault(step, []).append(path)
            self._write_journal()

    def _write_journal(self) -> None:
        if self.keep:
            return
        with self._files_lock:
            owned = sorted({*self._leftover, *(p for files in self._downloaded.values() for p in files)})
            if owned:
                self._journal.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self._journal, owned)
            else:
                self._journal.unlink(missing_ok=True)

    def _delete(self, step: int) -> None:
        with self._files_lock:
            self._delete_unlocked(step)

    def _delete_unlocked(self, step: int) -> None:
        files = self._downloaded.pop(step, [])
        others = [p for held in self._downloaded.values() for p in held]
        # a file or blob another held step uses (the same commit, or the same weights) stays until it is released
        still_used = {*others, *(os.path.realpath(p) for p in others)}
        for path in files:
            if path in still_used or (not os.path.islink(path) and os.path.realpath(path) in still_used):
                continue
            if not any(_inside(path, cache) for cache in (self.storage, str(self.converted))):
                log.warning("%s: left %s alone: it lies outside the caches this run writes", self.root, path)
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                    os.rmdir(os.path.dirname(path))  # an emptied snapshot folder goes too
                except OSError:
                    pass
        self._write_journal()


def _inside(path: str, folder: str) -> bool:
    """Whether `path` (itself, not what a link there points to) lies inside `folder`, both resolved."""
    here = os.path.normpath(os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)))
    folder = os.path.realpath(folder)
    return here != folder and os.path.commonpath([here, folder]) == folder


def _read_journal(path) -> set[str]:
    try:
        return set(json.loads(read_bytes(str(path))))
    except (OSError, ValueError):  # none yet, or unreadable: nothing to adopt
        return set()
    except CheckpointError as e:  # larger than checkpoints.max_read_size: its files are left, never deleted
        log.warning("%s; the files it lists are left in the cache", e)
        return set()


def _blobs(storage: str) -> list[str]:
    try:
        return os.listdir(os.path.join(storage, "blobs"))
    except FileNotFoundError:
        return []


def _size_text(n: int) -> str:
    from dask.utils import format_bytes

    return format_bytes(n)
