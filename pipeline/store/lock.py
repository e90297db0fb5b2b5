"""One writer per store: an exclusive lock held for the whole run.

On a local disk the lock is an OS file lock (`filelock`) on `<store>.lock`: the kernel drops it when its process
ends, however it ends, so a lock left by a killed run never blocks the next one. Who holds it (host, process id,
since when) is written beside it, in `<store>.lock.json`, for the message a second run prints. On object storage
there is no such lock: the holder file itself is the lock, a best effort (two runs that start within the same
second can both win, and a run killed there leaves the file behind: remove it by hand once sure the run is gone).
Readers (xarray, the report) never take the lock.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket

from ..errors import UsageError
from ..locations import is_url, local_path, write_json_atomic

# The most of a holder file read: one is a hundred bytes; a larger one was not written by sinktrace, and what it
# names is not shown (the refusal says "another process").
HOLDER_BYTES = 1 << 16


class StoreLock:
    def __init__(self, store: str):
        self.store = store
        # one lock per store however it is reached: through a symlink, `..` or a relative path
        self.lock_path = (store.rstrip("/") if is_url(store) else os.path.realpath(local_path(store))) + ".lock"
        self.holder_path = self.lock_path + ".json"
        self._lock = None

    def __enter__(self) -> StoreLock:
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if is_url(self.store):
            self._enter_remote(me)
            return self
        from filelock import FileLock, Timeout

        try:
            os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
            self._lock = FileLock(self.lock_path, timeout=0)
            self._lock.acquire()
        except Timeout:  # (an OSError too)
            raise UsageError(self._refusal(self._holder_local(), self.lock_path)) from None
        except OSError as e:
            raise UsageError(self._cannot_write(e)) from None
        try:
            write_json_atomic(self.holder_path, me)
        except OSError as e:
            self._lock.release()
            raise UsageError(self._cannot_write(e)) from None
        return self

    def __exit__(self, *exc) -> None:
        if is_url(self.store):
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.holder_path)
            fs.rm_file(path)
            return
        try:
            os.remove(self.holder_path)
        except OSError:
            pass
        self._lock.release()

    def _holder_local(self) -> dict:
        try:
            with open(os.open(self.holder_path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                return _holder(f.read(HOLDER_BYTES + 1))
        except (OSError, ValueError):
            return {}

    def _enter_remote(self, me: dict) -> None:
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.holder_path)
        if fs.exists(path):
            try:
                holder = _holder(fs.cat_file(path, start=0, end=HOLDER_BYTES + 1))
            except ValueError:
                holder = {}
            raise UsageError(self._refusal(holder, self.holder_path))
        fs.pipe_file(path, json.dumps(me).encode())

    def _cannot_write(self, e: OSError) -> str:
        """Why the lock could not be taken when no other run holds it: never "being written by" then."""
        folder = os.path.dirname(e.filename or self.lock_path)  # the folder it tried to create a file or folder in
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (
                f"store.path={self.store}: cannot write in {folder} ({e.strerror}); the store and its lock file "
                "go there: make the folder writable, or choose another store.path"
            )
        if e.errno == errno.ELOOP:  # filelock opens with O_NOFOLLOW
            return f"store.path={self.store}: its lock file {self.lock_path} is a symlink, never followed: remove it"
        return f"store.path={self.store}: cannot take its lock {e.filename or self.lock_path} ({e.strerror or e})"

    def _refusal(self, holder: dict, lock: str) -> str:
        who = (
            f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {holder.get('since', '?')})"
            if holder
            else "another process"
        )
        return (
            f"store.path={self.store} is being written by {who}: one run writes a store at a time. Wait for it to "
            f"finish, or choose another store.path. If that process is gone and the lock stayed (a network file "
            f"system or object store can keep it), remove {lock}."
        )


def _holder(raw: bytes) -> dict:
    """The holder a holder file names; ValueError when it is not one sinktrace wrote (too long, not JSON)."""
    if len(raw) > HOLDER_BYTES:
        raise ValueError(f"longer than {HOLDER_BYTES} bytes")
    return json.loads(raw)
