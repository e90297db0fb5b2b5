import os
import shutil
from pathlib import Path

import pytest
import torch

# the suite runs on 2 cores; more threads than cores only adds contention
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (and the thread count restored afterwards)."""
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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A short real training run of the demo model: 4 checkpoints, read-only for tests (copy before changing)."""
    from pipeline.demo import build_demo_run

    root = tmp_path_factory.mktemp("trained") / "run"
    build_demo_run(root, steps=150, every=50, seed=0, progress=False)
    return root


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, free to break."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst
