"""Fixtures the whole suite shares, and the rules every test runs under (docs/testing.md says why)."""

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from filelock import FileLock

# multiprocessing's own helpers live as long as the process that started them: never a test's leftover
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "multiprocessing.semaphore_tracker")


def _share_cores() -> int:
    """Under pytest-xdist, give each worker its own share of the cores this run may use (its CPU affinity, which
    the processes it starts inherit), so that `replay.threads=auto` and torch's thread count size themselves to
    that share: two workers each taking every core would only make their OpenMP threads wait for each other."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if cores and worker and 1 < count <= len(cores):
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count :: count])
        return len(os.sched_getaffinity(0))
    return max(1, min(2, len(cores) or os.cpu_count() or 1))


def _controller(config) -> bool:
    """Whether this process is the pytest-xdist controller, which runs no test (its children are the workers)."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def pytest_configure(config):
    # a run stopped by SIGTERM (a CI time limit, `kill`) ends as an interruption, with the summary so far and each
    # running test's processes ended by its fixtures, as Ctrl-C does; not as a crash that reads like a failure
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    if _controller(config):
        return
    threads = _share_cores()
    import torch

    torch.set_num_threads(threads)  # more threads than cores only adds contention


# Modules whose tests all run on one pytest-xdist worker, in one block scheduled first: they share module-scoped
# fixtures that take minutes (the wheel's fresh environment) or start real clusters, built once that way.
ONE_WORKER = ("tests/test_package.py", "tests/test_cluster.py")


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups of ONE_WORKER, every other test on whichever worker is free. (pytest-xdist
    3.8 groups `xdist_group` tests by renaming `item._nodeid`, which pytest 9.2 no longer reads: its groups are
    silently split between workers.) Larger groups are sent first, so the longest block never starts last."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER else nodeid

    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("registry"):  # minutes of installing: never in the quick lane
            item.add_marker(pytest.mark.slow)


def _children() -> list[psutil.Process]:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if not any(h in " ".join(p.cmdline()) for h in _HELPERS):
                found.append(p)
        except psutil.Error:  # ended, or a zombie
            found.append(p)
    return found


def _end(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(autouse=True)
def _ends_what_it_starts():
    """Whatever processes a test started (the command line, Dask schedulers and workers, servers) are ended when
    it ends, whether it passed, failed, timed out or was interrupted. Processes of module- or session-scoped
    fixtures started before the test are left to those fixtures."""
    before = {p.pid for p in _children()}
    yield
    _end([p for p in _children() if p.pid not in before])


def pytest_sessionfinish(session, exitstatus):
    if not _controller(session.config):
        _end(_children())  # what a module- or session-scoped fixture left


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (and the thread count restored afterwards)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def sinktrace_home(tmp_path, monkeypatch):
    """Keep caches, stores and Hydra sweep folders out of the user's home."""
    home = tmp_path / "sinktrace-home"
    monkeypatch.setenv("SINKTRACE_HOME", str(home))
    return home


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `build` fills, built once for the whole run: under pytest-xdist the first worker to ask builds it
    and the others wait for it and share it. For data tests only read (copy it before changing it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    folder, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A short real training run of the demo model: 4 checkpoints, read-only for tests (copy before changing)."""
    from pipeline.demo import build_demo_run

    def build(folder):
        build_demo_run(folder / "run", steps=150, every=50, seed=0, progress=False)

    return built_once(tmp_path_factory, "trained", build) / "run"


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, free to break."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst
