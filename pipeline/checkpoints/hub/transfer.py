"""Requests to the Hub with a deadline, and one file's bytes checked against its listed size and hash."""

from __future__ import annotations

import hashlib
import queue
import threading
import time

LISTERS = 8  # file listings requested at once


class NoAnswer(Exception):
    """A request to the Hub did not finish in the time it was given."""


class WrongBytes(Exception):
    """A download's bytes are not those the listing describes: another try would get the same."""


def get_checked(url: str, tmp: str, size: int, digest: str, timeout: float, stop: threading.Event) -> None:
    """The file at `url` into `tmp`; WrongBytes when its bytes are not the `size` bytes of hash `digest` (a
    sha256, or a git blob id: the sha1 of `blob <size>\\0` and the bytes)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    hasher = hashlib.sha256() if len(digest) == 64 else hashlib.sha1(b"blob %d\0" % size)
    got = 0
    with (
        open(tmp, "wb") as f,
        get_session().stream("GET", url, headers=build_hf_headers(), timeout=timeout, follow_redirects=True) as r,
    ):
        hf_raise_for_status(r)
        for chunk in r.iter_bytes():
            if stop.is_set():  # past the deadline: this thread was left behind
                return
            got += len(chunk)
            if got > size:
                raise WrongBytes(f"the Hub sent more than the {size} bytes its listing gave; nothing kept")
            hasher.update(chunk)
            f.write(chunk)
    if got < size:  # cut short: worth another try
        raise OSError(f"the transfer ended after {got} of {size} bytes")
    if hasher.hexdigest() != digest:
        kind = "sha256" if len(digest) == 64 else "git blob id"
        raise WrongBytes(f"the bytes served have {kind} {hasher.hexdigest()}, not the {digest} the listing gave")


def in_time(calls: dict, seconds: float, at_once: int = LISTERS) -> dict:
    """{key: function} -> {key: (its result, None) or (None, what it raised)}, each call given `seconds` from its
    start, or NoAnswer. The calls run in daemon threads: one past its time is left behind, never joined, so
    neither a timeout nor Ctrl-C (in the main thread, which only waits here) waits for the Hub."""
    answers: queue.Queue = queue.Queue()
    todo, running, out = list(calls.items()), {}, {}

    def call(key, function):
        try:
            answers.put((key, (function(), None)))
        except BaseException as e:  # handed to the caller
            answers.put((key, (None, e)))

    while todo or running:
        while todo and len(running) < at_once:
            key, function = todo.pop(0)
            running[key] = time.monotonic() + seconds
            threading.Thread(target=call, args=(key, function), daemon=True, name="hub-request").start()
        try:
            key, answer = answers.get(timeout=max(0.0, min(running.values()) - time.monotonic()))
        except queue.Empty:
            now = time.monotonic()
            for key in [k for k, due in running.items() if due <= now]:
                del running[key]
                out[key] = (None, NoAnswer(f"no answer within {seconds:g} s"))
            continue
        if running.pop(key, None) is not None:
            out[key] = answer
    return out


def transport_errors() -> tuple[type[Exception], ...]:
    """The connection errors (refused, timed out, dropped) of the HTTP library huggingface_hub talks through: httpx
    in 1.x, httpx2 in 2.x. `HfApi` calls raise them as they are; found through the client's public session, so the
    library is huggingface_hub's choice, not a dependency of ours."""
    import sys

    from huggingface_hub import get_session

    library = sys.modules.get(type(get_session()).__module__.partition(".")[0])
    error = getattr(library, "TransportError", None)
    return (error,) if isinstance(error, type) and issubclass(error, Exception) else ()
