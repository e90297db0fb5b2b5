"""The two kinds of failure sinktrace reports to its users, and how it words them."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint cannot be replayed; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def __reduce__(self):  # keep both fields when Dask pickles the exception
        return (type(self), (self.path, self.problem))


class UsageError(Exception):
    """A mistake in the command or its config: reported in one line, no traceback, exit status 2."""


def describe(e: BaseException, limit: int = 600) -> str:
    """An exception on one line: libraries' messages span lines, and a failed step's record must not."""
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message if len(message) <= limit else message[:limit] + ' ...'}"


def some(names: list[str], n: int = 3) -> str:
    """The first few of a list of names, and how many more there are."""
    shown = ", ".join(names[:n])
    return shown if len(names) <= n else f"{shown} and {len(names) - n} more"


class ClusterLost(Exception):
    """The Dask scheduler went away mid-run: what was stored stays stored, and the rerun resumes."""
