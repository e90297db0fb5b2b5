"""Ctrl-C and SIGTERM: stop between steps, never in the middle of writing one."""

from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(BaseException):  # noqa: N818  (like KeyboardInterrupt, it is not an error of the run's)
    """A SIGINT or SIGTERM arrived; the exit status says which (128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        # what the message after it says was being done and what is kept; the demo's build says its own (cli.py)
        self.during = ""
        self.kept = "every step stored so far is kept, the one in progress is left pending"

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_deferring = 0
_pending: int | None = None


def _handler(signum, frame):
    global _pending
    if _deferring:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible():
    """While inside, SIGINT and SIGTERM raise Interrupted in the main thread (elsewhere: nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred():
    """A signal that arrives inside is raised when the block ends, so that what the block writes is whole."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)
