"""sinktrace installed as a wheel, as a user installs it, run from a folder outside the repository."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import xarray as xr

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
    )
    (whl,) = out.glob("sinktrace-*.whl")
    return whl


def test_the_wheel_carries_the_config_groups(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for group in sorted(p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")):
        assert f"pipeline/{group}" in names, group
    assert not any(n.startswith(("tests/", "conf/", "benchmarks/")) for n in names)  # the benchmark runs from a clone


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; the dependencies come from this environment."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # the test environment's packages, but not its editable sinktrace: a .pth line adds a folder to sys.path
    # without running the .pth files inside it, which is where an editable install hooks in
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return venv


def run_installed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_command_runs_from_anywhere(installed, trained_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python, sinktrace = str(installed / "bin" / "python"), str(installed / "bin" / "sinktrace")

    where = run_installed([python, "-c", "import pipeline; print(pipeline.__file__)"], elsewhere)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed)), where.stdout  # the wheel's copy, not the clone's

    help_ = run_installed([sinktrace, "--help"], elsewhere)
    assert help_.returncode == 0, help_.stderr
    assert help_.stdout.startswith("sinktrace is powered by Hydra")
    assert "checkpoints" in help_.stdout and "replay" in help_.stdout

    composed = run_installed(
        [
            python,
            "-c",
            (
                "from pipeline.cli import compose; cfg = compose(['replay.batch_size=4', 'probe.seq_len=32']); "
                "print(cfg.replay.batch_size, cfg.probe.seq_len, cfg.store.path)"
            ),
        ],
        elsewhere,
    )
    assert composed.returncode == 0, composed.stderr
    assert composed.stdout.split() == ["4", "32", "None"]

    store = tmp_path / "s.zarr"
    replayed = run_installed(
        [
            sinktrace,
            f"checkpoints.root={trained_run}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=4",
            "probe.seq_len=16",
            "replay.steps=[0,150]",
        ],
        elsewhere,
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    ds = xr.open_datatree(store, engine="zarr")["random-T16-r4-s0-bos"].to_dataset()
    assert ds.status.values.tolist() == ["done", "done"]
    assert float(ds.sink_mass.sel(step=150).mean()) > 0
