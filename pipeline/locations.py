"""Where things are: local paths and fsspec URLs, sinktrace's cache folder, atomic small-file writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from .errors import CheckpointError, UsageError

# the extra that installs a protocol's fsspec filesystem (fsspec names the package for the others)
PROTOCOL_EXTRAS = {"s3": "s3", "s3a": "s3"}


def is_url(path: str) -> bool:
    """True for a remote fsspec URL (s3://, gs://, memory://, ...); `file://` counts as a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def check_protocol(location: str, key: str) -> None:
    """UsageError, naming what to install, when the fsspec filesystem for a URL's protocol is not installed."""
    protocol = str(location).split("://", 1)[0]
    if not is_url(location) or protocol == "hf":  # hf:// revisions are listed by huggingface_hub, not fsspec
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        extra = PROTOCOL_EXTRAS.get(protocol)
        need = f"pip install 'sinktrace[{extra}]'" if extra else str(e)
        raise UsageError(
            f"{key}={location}: {protocol}:// URLs need a package that is not installed ({need})"
        ) from None
    except ValueError as e:  # a protocol fsspec does not know
        raise UsageError(f"{key}={location}: {e}") from None


# How long object storage may keep sinktrace waiting (`checkpoints.request_timeout`, `checkpoints.download_timeout`),
# set for this process by `bound_waits`: botocore's connect and read timeouts for each attempt, and a deadline for a
# whole ranged read, its retries included.
_WAITS = {"request": 0.0, "download": 0.0}
ATTEMPTS = 3  # botocore's tries of one request (s3fs retries on its own, within the deadline)


def bound_waits(request_timeout: float, download_timeout: float) -> None:
    """Bound every wait on object storage in this process: each s3 filesystem made from now on connects and reads
    with `request_timeout` seconds of silence at most per attempt, and each ranged read gives up after
    `download_timeout` seconds in all. fsspec's own configuration for s3 is kept otherwise."""
    from fsspec.config import conf

    _WAITS.update(request=float(request_timeout), download=float(download_timeout))
    for protocol in PROTOCOL_EXTRAS:
        given = dict(conf.get(protocol) or {})
        config = dict(given.get("config_kwargs") or {})
        config.update(connect_timeout=float(request_timeout), read_timeout=float(request_timeout))
        config.setdefault("retries", {"max_attempts": ATTEMPTS, "mode": "standard"})
        conf[protocol] = {**given, "config_kwargs": config}


def object_storage_deadline() -> float:
    """The seconds a ranged read of object storage may take in all (0: unbounded, `bound_waits` not called)."""
    return _WAITS["download"]


def local_path(path: str | os.PathLike) -> str:
    """A local path or `file://` URL as an absolute path, `~` expanded."""
    return os.path.abspath(os.path.expanduser(os.fspath(path).removeprefix("file://")))


def join(folder: str, name: str) -> str:
    return posixpath.join(folder, name) if is_url(folder) else os.path.join(local_path(folder), name)


# The most bytes a file read whole may hold (`checkpoints.max_read_size`): configs, indexes, trainer_state.json,
# DCP's .metadata. Their size is looked up first, so that a file of gigabytes is refused before it is read.
_READ_LIMIT = {"bytes": 1 << 30, "setting": "1GB"}


def bound_reads(setting: str | int) -> None:
    """Set, for this process, the most bytes a file read whole may hold (a size such as "1GB", or a count)."""
    from dask.utils import parse_bytes

    _READ_LIMIT.update(bytes=parse_bytes(setting), setting=str(setting))


def check_read_size(path: str, size: int) -> None:
    """CheckpointError naming the file, its size and the setting, when a file to be read whole is larger than
    `checkpoints.max_read_size`."""
    if size > _READ_LIMIT["bytes"]:
        raise CheckpointError(
            path,
            f"{posixpath.basename(path.rstrip('/'))} holds {size:,} bytes, more than checkpoints.max_read_size="
            f"{_READ_LIMIT['setting']} allows for a file read whole; raise the setting if the file is genuine",
        )


def read_bytes(path: str) -> bytes:
    """The whole file (local, or a URL), its size checked first (`check_read_size`)."""
    if is_url(path):
        import fsspec

        with fsspec.open(path, "rb") as f:
            check_read_size(path, f.size)
            return f.read()
    with open(local_path(path), "rb") as f:
        check_read_size(path, os.fstat(f.fileno()).st_size)
        return f.read()


def is_file(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        return fs.isfile(remote)
    return os.path.isfile(local_path(path))


def list_names(folder: str) -> list[str]:
    """The names of the entries in a folder (local, or a URL)."""
    if is_url(folder):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(folder)
        return [posixpath.basename(p.rstrip("/")) for p in fs.ls(remote, detail=False)]
    return os.listdir(local_path(folder))


def file_size(path: str) -> int:
    if is_url(path):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        return fs.size(remote)
    return os.path.getsize(local_path(path))


def exists(location: str) -> bool:
    if is_url(location):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return fs.exists(path)
    return os.path.exists(local_path(location))


def sinktrace_home() -> Path:
    """The cache folder: the demo run, the stores of runs given without `store.path`, benchmark checkpoints."""
    return Path(os.environ.get("SINKTRACE_HOME", "~/.cache/sinktrace")).expanduser()


def default_store_path(root: str) -> str:
    """A stable store location for a checkpoint root, so the same command run twice resumes."""
    resolved = root if is_url(root) else local_path(root)
    name = Path(resolved.rstrip("/")).name or "run"
    digest = hashlib.sha1(resolved.encode()).hexdigest()[:8]
    return str(sinktrace_home() / "runs" / f"{name}-{digest}" / "sinks.zarr")


def write_json_atomic(path: str | os.PathLike, obj, **dumps) -> None:
    """Write JSON so that a reader (or a crash) never sees half a file. The bytes go to a new file of a fresh name
    beside it, which replaces `path`: a symlink at `path` is replaced, never followed, so its target is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, **dumps))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_folder(path: str) -> None:
    """CheckpointError unless a checkpoint folder (local, or a URL) exists."""
    if is_url(path):
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        if not fs.isdir(remote):
            raise CheckpointError(path, "the checkpoint folder does not exist")
    elif not os.path.isdir(local_path(path)):
        raise CheckpointError(local_path(path), "the checkpoint folder does not exist")


@contextlib.contextmanager
def local_folder(path: str, weights: bool = True):
    """A checkpoint folder on the local disk: itself, or for a URL a temporary copy of the files loading reads
    (config, index, remote code, and with `weights` the safetensors files), removed afterwards. Optimizer states
    and other pickles stay."""
    check_folder(path)
    if not is_url(path):
        yield local_path(path)
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    wanted = (".json", ".py", *([".safetensors"] if weights else []))
    tmp = tempfile.mkdtemp(prefix="sinktrace-ckpt-")
    try:
        for info in fs.ls(remote, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if info.get("type") != "directory" and name.endswith(wanted):
                fs.get_file(info["name"], os.path.join(tmp, name))
        try:
            yield tmp
        except CheckpointError as e:  # name the user's file, not our temporary copy
            url = fs.unstrip_protocol(remote)
            raise CheckpointError(e.path.replace(tmp, url), e.problem.replace(tmp, url)) from e.__cause__
    finally:
        # safe even while the model's tensors are memory-mapped: the open mapping keeps the data alive
        shutil.rmtree(tmp, ignore_errors=True)
