"""sinktrace as a user installs it: the wheel, installed into a fresh virtual environment with its declared
dependencies resolved from the package registry as `pip install` resolves them (the newest releases; nothing from
the test environment), run from a folder outside the repository.

The environment is made once per module (torch 2.13.0 first: any other torch requirement would fetch a CUDA
build of several GB); the tests that use it are marked `registry`, and all of the module's tests run on one
pytest-xdist worker (conftest's `ONE_WORKER`), which builds it once. uv installs the packages where the test
environment has it (the `test` extra): the same resolution as pip's, the newest releases, in seconds rather than
minutes, with its cache answering for the registry on later runs; pip still picks torch's file, as the machine's
pip settings say. The extras get a second environment of their own.

Checkpoints, the Hub and the S3 server are made here, by the test environment, and every number the installed
sinktrace stores is compared with what this environment computes for the same checkpoints."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.cli import compose, run
from tests import trainer_ckpts as tc
from tests.ckpt_factory import make_run
from tests.hub_server import FakeHub
from tests.test_object_storage import BUCKET, s3  # noqa: F401 (the moto server fixture)

REPO = Path(__file__).resolve().parent.parent
PROBE = ["probe.rows=4", "probe.seq_len=16"]
GROUP = "random-T16-r4-s0-bos"  # the store group of that probe
STEPS = [0, 100]
INSTALL_TIMEOUT = 1800  # seconds for one `pip install` from the registry
RUN_TIMEOUT = 600  # seconds for one command of the installed sinktrace
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")

pytestmark = pytest.mark.slow  # and on one worker: tests/conftest.py's ONE_WORKER


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (whl,) = out.glob("sinktrace-*.whl")
    return whl


def test_the_wheel_carries_the_config_groups(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for group in sorted(p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")):
        assert f"pipeline/{group}" in names, group
    assert not any(n.startswith(("tests/", "conf/", "benchmarks/")) for n in names)  # the benchmark runs from a clone


@pytest.mark.parametrize("args", [["nonsense.key=1"], ["--bogus"]])
def test_python_dash_m_pipeline_names_itself_sinktrace(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("sinktrace: error: "), bad.stderr
    assert "__main__" not in bad.stderr


# ------------------------------------------------------------------------------------------ the installed wheel


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Venv:
    """A virtual environment of its own, run with none of the test environment's variables that would leak the
    test environment's packages in (PYTHONPATH and the like)."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        self.python, self.sinktrace = str(root / "bin" / "python"), str(root / "bin" / "sinktrace")

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(SINKTRACE_HOME=str(self.home / "sinktrace"), HF_HOME=str(self.home / "hf"), **extra)
        env.pop("HF_HUB_OFFLINE", None)
        return env

    def run(self, args, *, cwd: Path, timeout: float = RUN_TIMEOUT, ok: bool = True, **env):
        done = subprocess.run(
            [str(a) for a in args], cwd=cwd, env=self.env(**env), capture_output=True, text=True, timeout=timeout
        )
        if ok and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, args))}\nexit status {done.returncode}\n--- stdout\n{_tail(done.stdout)}\n"
                f"--- stderr\n{_tail(done.stderr)}"
            )
        return done

    def pip_install(self, *specs, cwd: Path) -> None:
        """`pip install specs`, resolved from the registry: by uv where there is one, else by pip."""
        if UV is None:
            self.run([self.python, "-m", "pip", "install", "-q", *specs], cwd=cwd, timeout=INSTALL_TIMEOUT)
        else:
            self.run([UV, "pip", "install", "-q", "--python", self.python, *specs], cwd=cwd, timeout=INSTALL_TIMEOUT)

    def torch_file(self, spec: str, cwd: Path) -> str:
        """The torch wheel pip picks for `spec` with this machine's pip settings (uv does not read them: where a
        CPU build lies on disk, uv would fetch a CUDA build of several GB instead)."""
        out = cwd / "torch-wheel"
        self.run([self.python, "-m", "pip", "download", "-q", "--no-deps", "-d", out, spec], cwd=cwd, timeout=600)
        (found,) = out.glob("torch-*.whl")
        return str(found)

    def replay(self, root, store, *extra, cwd: Path, **env):
        args = [f"checkpoints.root={root}", "checkpoints.quiet_seconds=0", f"store.path={store}", "stages=[replay]"]
        return self.run([self.sinktrace, *args, *PROBE, *extra], cwd=cwd, **env)

    def sinks(self, store, cwd: Path) -> dict:
        """The store as the installed `pipeline.open_sinks` reads it: steps, status, sink_mass."""
        code = (
            "import json, sys, pipeline\n"
            "tree = pipeline.open_sinks(sys.argv[1])\n"
            "(group,) = tree.children\n"
            "ds = pipeline.open_sinks(sys.argv[1], group).load()\n"
            "print(json.dumps({'group': group, 'step': ds.step.values.tolist(), 'status': ds.status.values.tolist(), "
            "'sink_mass': ds.sink_mass.values.tolist()}))"
        )
        return json.loads(self.run([self.python, "-c", code, store], cwd=cwd).stdout.strip().splitlines()[-1])


def fresh_env(root: Path, spec: str) -> Venv:
    """A fresh virtual environment with torch 2.13.0 and then `spec` (the wheel, with extras or not), everything
    else from the registry."""
    env = Venv(root / "env", root / "home")
    subprocess.run([sys.executable, "-m", "venv", str(env.root)], check=True, timeout=300)
    env.pip_install("torch==2.13.0" if UV is None else env.torch_file("torch==2.13.0", root), cwd=root)
    env.pip_install(spec, cwd=root)
    return env


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Venv:
    """The wheel alone, as `pip install sinktrace` leaves it."""
    return fresh_env(tmp_path_factory.mktemp("venv"), str(wheel))


@pytest.fixture(scope="module")
def extras(wheel, tmp_path_factory) -> Venv:
    """The wheel with both extras, in an environment of its own: the one without them stays without them whatever
    order the tests run in (uv takes torch and the rest from its cache: seconds)."""
    return fresh_env(tmp_path_factory.mktemp("extras"), f"{wheel}[s3,slurm]")


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """A folder outside the repository, for the working directory of every installed command."""
    return tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A small Hugging Face layout run and its store as the test environment computes it."""
    base = tmp_path_factory.mktemp("folder-run")
    folders = make_run(base / "run", STEPS, trainer_state=False)
    return folders, reference(base / "run", base / "reference.zarr")


def reference(root, store) -> dict:
    """The replay of `root` by this environment's sinktrace, in this process, as `Venv.sinks` gives it."""
    args = [f"checkpoints.root={root}", "checkpoints.quiet_seconds=0", f"store.path={store}", "stages=[replay]"]
    assert run(compose([*args, *PROBE])) == 0
    (group,) = pipeline.open_sinks(str(store)).children
    ds = pipeline.open_sinks(str(store), group).load()
    return {
        "group": group,
        "step": ds.step.values.tolist(),
        "status": ds.status.values.tolist(),
        "sink_mass": ds.sink_mass.values,
    }


def assert_same(got: dict, want: dict) -> None:
    assert (got["group"], got["step"]) == (want["group"], want["step"])
    assert got["status"] == want["status"] == ["done"] * len(got["step"])
    mass = np.asarray(got["sink_mass"], dtype=float)
    assert np.isfinite(mass).all() and (mass >= 0).all() and (mass <= 1).all()
    np.testing.assert_allclose(mass, want["sink_mass"], rtol=1e-5, atol=1e-6)


@pytest.mark.registry
def test_the_installed_environment_holds_only_what_sinktrace_declares(venv, folder_run, elsewhere, tmp_path):
    where = venv.run([venv.python, "-c", "import pipeline; print(pipeline.__file__)"], cwd=elsewhere)
    assert where.stdout.strip().startswith(str(venv.root)), where.stdout  # the wheel's copy, not the clone's
    venv.run([venv.python, "-m", "pip", "check"], cwd=elsewhere)  # every requirement met, none conflicting
    paths = venv.run([venv.python, "-c", "import sys; print('\\n'.join(sys.path))"], cwd=elsewhere).stdout
    entries = [Path(p) for p in paths.splitlines() if p]
    for outside in (REPO, Path(sys.prefix)):  # neither the clone nor the test environment is on the path
        assert not any(e == outside or outside in e.parents for e in entries), paths
    # the extras are not there yet: each is installed and exercised by its own test below
    for module in ("s3fs", "dask_jobqueue", "bokeh"):
        missing = venv.run([venv.python, "-c", f"import {module}"], cwd=elsewhere, ok=False)
        assert "ModuleNotFoundError" in missing.stderr, module
    # what needs an extra says which, in one line
    folders, _ = folder_run
    needs = {
        "s3": [f"checkpoints.root=s3://{BUCKET}/run"],
        "dashboard": [
            f"checkpoints.root={next(iter(folders.values())).parent}",
            "cluster=processes",
            "cluster.dashboard=true",
            "checkpoints.quiet_seconds=0",
            f"store.path={tmp_path}/d.zarr",
        ],
    }
    for extra, args in needs.items():
        refused = venv.run([venv.sinktrace, "stages=[replay]", *args], cwd=elsewhere, ok=False)
        assert refused.returncode == 2, refused.stderr
        assert f"(pip install 'sinktrace[{extra}]')" in refused.stderr.strip().splitlines()[-1], refused.stderr

    help_ = venv.run([venv.sinktrace, "--help"], cwd=elsewhere)
    assert help_.stdout.startswith("sinktrace replays a folder of training checkpoints")  # the packaged config's
    assert "checkpoints.root" in help_.stdout and "sinktrace check" in help_.stdout


@pytest.mark.registry
def test_installed_folder_replay_report_and_open_sinks(venv, folder_run, elsewhere, tmp_path):
    folders, want = folder_run
    root = next(iter(folders.values())).parent
    store = tmp_path / "folder.zarr"
    venv.replay(root, store, cwd=elsewhere)
    assert_same(venv.sinks(store, elsewhere), want)

    report = venv.run(
        [venv.sinktrace, f"store.path={store}", "stages=[report]", f"report.out_dir={tmp_path}/report"], cwd=elsewhere
    )
    assert f"probe {GROUP}:" in report.stdout and "report:" in report.stdout
    page = Path(report.stdout.strip().splitlines()[-1].split("report:", 1)[1].strip())
    assert page.is_file() and page.stat().st_size > 0


@pytest.mark.registry
def test_installed_hub_replay_and_its_cache_when_the_hub_is_unreachable(venv, folder_run, elsewhere, tmp_path):
    folders, want = folder_run
    hub = FakeHub()
    for step, folder in folders.items():
        hub.add_folder("org/tiny", f"step{step}", folder, names=["config.json", "model.safetensors"])
    hub.start()
    try:
        store = tmp_path / "hub.zarr"
        done = venv.replay(
            "hf://org/tiny", store, "checkpoints.keep_downloads=true", cwd=elsewhere, HF_ENDPOINT=hub.endpoint
        )
    finally:
        hub.stop()
    assert_same(venv.sinks(store, elsewhere), want)
    assert sorted(rev for rev, name in hub.served if name == "model.safetensors") == ["step0", "step100"]
    assert "HTTP Request" not in done.stdout + done.stderr  # the HTTP library's line per request stays quiet

    # the Hub gone (nothing listens on port 9): the client's connection error is caught, the cache replays
    offline = tmp_path / "offline.zarr"
    done = venv.replay("hf://org/tiny", offline, cwd=elsewhere, HF_ENDPOINT="http://127.0.0.1:9")
    assert "cannot reach the Hub" in done.stdout + done.stderr
    assert_same(venv.sinks(offline, elsewhere), want)


@pytest.mark.registry
def test_installed_dcp_and_torch_save_replays(venv, elsewhere, tmp_path):
    dcp_root, torch_root = tmp_path / "fsdp", tmp_path / "nanogpt"
    # the Trainer's FSDP sharded checkpoint (DCP), and the config.json its final save_model writes above it
    tc.fsdp_trainer_checkpoint(dcp_root, 30, tc.llama(seed=3), final_save=True)
    tc.nanogpt_checkpoint(torch_root, tc.gpt2(seed=4), 300)  # nanoGPT's torch.save ckpt.pt
    for root in (dcp_root, torch_root):
        store = tmp_path / f"{root.name}.zarr"
        venv.replay(root, store, cwd=elsewhere)
        assert_same(venv.sinks(store, elsewhere), reference(root, tmp_path / f"{root.name}-reference.zarr"))


@pytest.mark.registry
def test_installed_s3_extra_replays_from_a_bucket(extras, s3, folder_run, elsewhere, tmp_path):  # noqa: F811
    folders, want = folder_run
    root = next(iter(folders.values())).parent
    s3.put(str(root), f"{BUCKET}/package-run", recursive=True)
    store = tmp_path / "s3.zarr"
    # AWS_ENDPOINT_URL and the test credentials, set by the fixture, point the installed s3fs at the server
    extras.replay(f"s3://{BUCKET}/package-run", store, cwd=elsewhere)
    assert_same(extras.sinks(store, elsewhere), want)


@pytest.mark.registry
def test_installed_slurm_extra_writes_the_job_script(extras, elsewhere):
    code = (
        "from pipeline.cluster import factories\n"
        "from pipeline.cli import compose\n"
        "cfg = compose(['cluster=slurm', 'cluster.build.queue=gpu', 'cluster.build.gpus_per_job=2',\n"
        "               'cluster.jobs=0', 'cluster.build.interface=lo']).cluster\n"
        "client, cluster = factories.connect(cfg)  # no job submitted: cluster.jobs=0\n"
        "try:\n"
        "    print(cluster.job_script())\n"
        "finally:\n"
        "    factories.close(client, cluster)\n"
    )
    script = extras.run([extras.python, "-c", code], cwd=elsewhere).stdout
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH --gpus=2",
        "--nworkers 2",
        "--resources GPU=1",
        "--preload pipeline.cluster.factories",
    ):
        assert line in script, (line, script)
