"""Every fault a user meets beside a live training run ends in a clear message and a store with nothing lost."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import pipeline
from pipeline.cli import compose, run
from pipeline.hydra_app import composition_problem
from tests.ckpt_factory import backdate, make_run, save_checkpoint

GROUP = "random-T16-r4-s0-bos"


def cfg_for(root, store, *extra):
    return compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=4",
            "probe.seq_len=16",
            *extra,
        ]
    )


def files_of(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A run of three checkpoints and its store, made once for the module: tests get copies (below)."""
    base = tmp_path_factory.mktemp("faults")
    make_run(base / "run", [0, 10, 20])
    assert run(cfg_for(base / "run", base / "s.zarr")) == 0
    return base


@pytest.fixture
def small_run(built, tmp_path, request) -> Path:
    """The run: a copy of its own for the test to change, or, for a test of the store (`stored`), the module's run
    the store was made from (a store names its run), which such a test only reads."""
    if "stored" in request.fixturenames:
        return built / "run"
    return Path(shutil.copytree(built / "run", tmp_path / "run"))  # modification times kept: past the quiet period


@pytest.fixture
def stored(small_run, built, tmp_path) -> Path:
    """A copy of the store of `small_run`, replayed whole, for the test to change."""
    return Path(shutil.copytree(built / "s.zarr", tmp_path / "s.zarr"))


# ------------------------------------------------------------------ settings checked before any work

BAD_SETTINGS = [
    (["replay.batch_size=0"], "replay.batch_size=0: must be a whole number of at least 1"),
    (["replay.batch_size=-3"], "replay.batch_size=-3"),
    (["replay.key_positions=0"], "replay.key_positions=0"),
    (["replay.dtype=int8"], "replay.dtype=int8: choose from auto, float32, bfloat16, float16"),
    (["replay.device=tpu"], "replay.device=tpu: choose from"),
    (["replay.threads=0"], "replay.threads=0"),
    (["replay.max_device_memory=lots"], "replay.max_device_memory='lots'"),
    (["probe.first_token=first"], "probe.first_token=first: choose from"),
    (["stages=[replay,plot]"], "unknown stage"),
    (["report.eps=2"], "report.eps=2"),
]


@pytest.mark.parametrize("extra,message", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_and_exit_2_and_touches_nothing(stored, small_run, extra, message, capsys):
    before = files_of(stored)
    assert run(cfg_for(small_run, stored, "replay.overwrite=true", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sinktrace: error: ") and message in err, err
    assert files_of(stored) == before


def test_cuda_without_cuda_is_a_usage_error(stored, small_run, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run(cfg_for(small_run, stored, "replay.device=cuda")) == 2
    assert "replay.device=cuda: this torch" in capsys.readouterr().err


def test_the_old_spelling_of_device_and_dtype_still_works():
    cfg = compose(["device=cpu", "dtype=bfloat16"])
    assert (cfg.replay.device, cfg.replay.dtype) == ("cpu", "bfloat16")


DTYPE_SPELLINGS = {
    "auto": None,
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
    "FP32": "float32",
    "float": "float32",
    "torch.bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "half": "float16",
}


@pytest.mark.parametrize("spelling,torch_name", DTYPE_SPELLINGS.items())
def test_a_dtype_setting_the_replay_takes_passes_the_check(spelling, torch_name):
    import torch

    from pipeline.devices import parse_dtype
    from pipeline.settings import check

    check(compose([f"replay.dtype={spelling}", "stages=[report]"]))
    assert parse_dtype(spelling) == (None if torch_name is None else getattr(torch, torch_name))


@pytest.mark.parametrize("spelling", ["int8", "float8", "fp8", "complex64"])
def test_a_dtype_setting_the_check_refuses_the_replay_refuses_alike(spelling):
    from pipeline.devices import parse_dtype
    from pipeline.errors import UsageError
    from pipeline.settings import check

    message = f"replay.dtype={spelling}: choose from auto, float32, bfloat16, float16, float64"
    with pytest.raises(UsageError) as refused:
        check(compose([f"replay.dtype={spelling}", "stages=[report]"]))
    assert str(refused.value) == message
    with pytest.raises(ValueError) as refused:
        parse_dtype(spelling)
    assert str(refused.value) == message


def test_every_key_map_setting_the_check_takes_is_a_key_map_module():
    from pipeline.checkpoints import keymaps
    from pipeline.settings import KEY_MAPS, check

    for name in KEY_MAPS:
        check(compose([f"checkpoints.key_map={name}", "stages=[report]"]))
        if name != "auto":
            assert isinstance(keymaps.module(name).SIGNATURE, str), name


@pytest.mark.parametrize("policy", ["auto", "keep", "bos", "random"])
def test_every_first_token_setting_the_check_takes_builds_a_probe(policy):
    from pipeline.probe import build_probe
    from pipeline.settings import check

    cfg = compose([f"probe.first_token={policy}", "probe.rows=2", "probe.seq_len=4", "stages=[report]"])
    check(cfg)
    probe = build_probe(cfg.probe, {"vocab_size": 50, "bos_token_id": 1})
    assert probe.first_token == ("bos" if policy == "auto" else policy)
    assert probe.tokens.shape == (2, 4)


@pytest.mark.parametrize(
    "override,message",
    [
        ("replay.batch_size=abc", "replay.batch_size=abc"),
        ("replay.batchsize=3", "replay.batchsize: no such setting"),
        ("probe.sq_len=3", "probe.sq_len: no such setting"),
    ],
)
def test_what_does_not_compose_is_named_in_one_line(override, message):
    problem = composition_problem("pipeline.conf", "config", [override])
    assert problem is not None and "\n" not in problem and message in problem, problem


def test_an_appended_key_that_does_not_exist_is_refused(stored, small_run, capsys):
    assert run(cfg_for(small_run, stored, "+replay.anything=1")) == 2
    assert "replay.anything: no such setting" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["file", "foreign folder", "missing root", "root is a file"])
def test_bad_paths_are_usage_errors(small_run, tmp_path, case, capsys):
    store, root = tmp_path / "s.zarr", small_run
    if case == "file":
        store.write_text("not a store")
    elif case == "foreign folder":
        store.mkdir()
        (store / "notes.txt").write_text("mine")
    elif case == "missing root":
        root = tmp_path / "nowhere"
    else:
        root = tmp_path / "a-file"
        root.write_text("x")
    assert run(cfg_for(root, store)) == 2
    err = capsys.readouterr().err
    assert ("store.path=" if case in ("file", "foreign folder") else "checkpoints.root=") in err
    if case == "foreign folder":
        assert (store / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_command_line_says_it_in_one_line_with_exit_2(tmp_path):
    for args, message in (
        [["replay.batch_size=abc"], "replay.batch_size=abc"],
        [["replay.batch_size=0"], "replay.batch_size=0"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", "pipeline", *args, f"store.path={tmp_path / 's.zarr'}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / "s.zarr").exists()


def test_an_empty_root_is_a_usage_error_not_the_demo(tmp_path, sinktrace_home, capsys):
    store = tmp_path / "s.zarr"
    assert compose(["checkpoints.root="]).checkpoints.root == ""  # what `checkpoints.root=$UNSET` composes to
    assert run(cfg_for("", store)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sinktrace: error: checkpoints.root= is empty"), err
    assert not store.exists() and not (sinktrace_home / "demo").exists()
    from pipeline import settings

    settings.check(compose([]))  # while no root at all is still the demo run


def cli_bounded(args, timeout=180, prefix=()):
    """The command line in its own process group, killed with everything it started if it runs past `timeout`."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "pipeline", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"sinktrace {' '.join(map(str, args))} still ran after {timeout} s")
    return proc.returncode, out, err


@pytest.mark.parametrize(
    "cluster,message",
    [
        (["cluster=processes", "cluster.n_workers=0"], "cluster.build.n_workers=0: give at least 1"),
        (["cluster=processes", "cluster.threads_per_worker=0"], "cluster.build.threads_per_worker=0: give at least 1"),
        (["cluster=gpus", "cluster.build.n_workers=0"], "cluster.build.n_workers=0: give at least 1"),
        (["cluster=slurm", "cluster.jobs=0"], "cluster.jobs=0: give at least 1"),
    ],
)
@pytest.mark.slow
def test_a_cluster_without_workers_is_a_usage_error_not_a_hang(small_run, tmp_path, cluster, message):
    store = tmp_path / "s.zarr"
    args = [f"checkpoints.root={small_run}", "checkpoints.quiet_seconds=0", f"store.path={store}", "stages=[replay]"]
    rc, _, err = cli_bounded([*args, *cluster])
    assert rc == 2 and err.count("\n") == 1 and f"sinktrace: error: {message}" in err, err
    assert not store.exists()


# ------------------------------------------------------------------ discovery of live runs


def test_a_root_without_checkpoints_names_the_layouts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(cfg_for(tmp_path / "empty", tmp_path / "s.zarr")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint there" in err and "checkpoint-<N>" in err and "global_step<N>" in err


def test_a_checkpoint_in_its_quiet_period_is_waited_for(tmp_path, capsys):
    root = tmp_path / "run"
    make_run(root, [0, 10, 20], age=0)  # just copied
    cfg = compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=2",
            f"store.path={tmp_path / 's.zarr'}",
            "stages=[replay]",
            "probe.rows=4",
            "probe.seq_len=16",
        ]
    )
    t0 = time.monotonic()
    assert run(cfg) == 0
    assert time.monotonic() - t0 >= 1.5
    out = capsys.readouterr().out
    assert "waiting" in out and "checkpoints.quiet_seconds=2" in out and "nothing to replay" not in out
    assert pipeline.open_sinks(tmp_path / "s.zarr", GROUP).status.values.tolist() == ["done"] * 3


def test_the_trainer_writes_its_state_last(tmp_path):
    from pipeline.checkpoints.discover import discover

    save_checkpoint(tmp_path / "checkpoint-5", step=5, trainer_state=False, training_files=True)
    (c,) = discover(str(tmp_path), quiet_seconds=0)
    assert not c.complete and "no trainer_state.json, which the Trainer writes last" in c.reason


def test_a_checkpoint_rotated_away_while_queued_is_gone_not_failed(small_run, tmp_path, monkeypatch, capsys):
    import pipeline.replay.step as replay_mod

    real = replay_mod.replay

    def rotating(ckpt, *a, **kw):
        if ckpt.step == 0:
            shutil.rmtree(small_run / "checkpoint-10")  # save_total_limit deletes an older checkpoint
        return real(ckpt, *a, **kw)

    monkeypatch.setattr(replay_mod, "replay", rotating)
    store = tmp_path / "s.zarr"
    assert run(cfg_for(small_run, store)) == 0
    out = capsys.readouterr()
    assert "step 10: gone" in out.out and "failed" not in out.err
    ds = pipeline.open_sinks(store, GROUP)
    assert dict(zip(ds.step.values.tolist(), ds.status.values.tolist())) == {0: "done", 10: "pending", 20: "done"}


def test_a_step_beyond_int64_is_skipped_with_a_warning(small_run, tmp_path, caplog):
    huge = "checkpoint-99999999999999999999999"
    shutil.copytree(small_run / "checkpoint-20", small_run / huge)
    (small_run / huge / "trainer_state.json").unlink()  # its step is then the folder name's
    store = tmp_path / "s.zarr"
    with caplog.at_level("WARNING", logger="pipeline.checkpoints.discover"):
        assert run(cfg_for(small_run, store)) == 0
    assert huge in caplog.text and "skipping" in caplog.text
    assert pipeline.open_sinks(store, GROUP).status.values.tolist() == ["done"] * 3


# ------------------------------------------------------------------ suspect data


def zero_tail(path: Path, nbytes: int) -> bytes:
    data = bytearray(path.read_bytes())
    original = bytes(data)
    data[-nbytes:] = bytes(nbytes)
    path.write_bytes(bytes(data))
    return original


def test_a_preallocated_file_fails_its_step_and_is_replayed_once_written(small_run, tmp_path, capsys):
    weights = small_run / "checkpoint-20" / "model.safetensors"
    original = zero_tail(weights, 8 * 1024)  # the file's end (model.norm, then weights) not written yet
    backdate(small_run, 3600)
    store = tmp_path / "s.zarr"
    assert run(cfg_for(small_run, store)) == 1
    err = capsys.readouterr().err
    assert "looks preallocated and not yet written" in err and "model.norm.weight" in err
    assert pipeline.open_sinks(store, GROUP).status.sel(step=20).item() == "failed"

    weights.write_bytes(original)
    assert run(cfg_for(small_run, store)) == 0
    assert pipeline.open_sinks(store, GROUP).status.values.tolist() == ["done"] * 3


def test_zero_initialised_projections_are_not_suspect(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipeline.checkpoints.safetensorsfile import SafetensorsFile
    from pipeline.checkpoints.weightfiles import check_written

    path = tmp_path / "model.safetensors"
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(8, 4),
            "model.norm.weight": torch.ones(4),
            "model.z_out_proj.weight": torch.zeros(64, 64),
        },
        str(path),
    )
    check_written(
        SafetensorsFile(str(path))
    )  # a zero-initialised output layer last in the file is a real step-0 checkpoint
    save_file({"model.embed_tokens.weight": torch.randn(8, 4), "model.norm.weight": torch.zeros(4)}, str(path))
    check_written(SafetensorsFile(str(path)), "gemma2")  # norms that scale by (1 + weight) start at zero
    with pytest.raises(Exception, match="model.norm.weight"):
        check_written(SafetensorsFile(str(path)), "llama")


def test_a_zero_run_longer_than_the_byte_scan_is_followed_back_tensor_by_tensor(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from pipeline.checkpoints import weightfiles
    from pipeline.checkpoints.safetensorsfile import SafetensorsFile
    from pipeline.errors import CheckpointError

    monkeypatch.setattr(weightfiles, "_SCAN_LIMIT", 2048)  # stands for 256 MiB against GB-sized shards
    monkeypatch.setattr(weightfiles, "_TAIL", 1024)
    monkeypatch.setattr(weightfiles, "_CHUNK", 1024)
    path = tmp_path / "model-00002-of-00002.safetensors"
    torch.manual_seed(0)
    tensors = {f"model.layers.0.{p}_proj.weight": torch.randn(64, 64) for p in ("a", "b", "c")}
    save_file({**tensors, "model.layers.0.d_proj.weight": torch.zeros(64, 64)}, str(path))
    weightfiles.check_written(
        SafetensorsFile(str(path))
    )  # a zero-initialised projection last: 16 KiB of zeros, from a tensor's start
    zero_tail(path, 16 * 1024 + 5000)  # and the write stopped 5000 bytes before the end of c_proj
    with pytest.raises(CheckpointError, match=r"starting inside model\.layers\.0\.c_proj\.weight.*d_proj"):
        weightfiles.check_written(SafetensorsFile(str(path)))


def test_a_preallocated_shard_of_projections_only_fails_its_step(tmp_path, capsys):
    root = tmp_path / "run"
    make_run(root, [0, 10], sharded=True)
    # the third shard holds only layer 1's projections; its writer stopped inside o_proj (layout printed below)
    shard = root / "checkpoint-10" / "model-00003-of-00004.safetensors"
    original = zero_tail(shard, 5000)
    backdate(root, 3600)
    store = tmp_path / "s.zarr"
    assert run(cfg_for(root, store)) == 1
    err = capsys.readouterr().err
    assert "model-00003-of-00004.safetensors looks preallocated and not yet written" in err, err
    assert "its last 5000 bytes are zeros" in err and "self_attn.o_proj.weight" in err
    assert pipeline.open_sinks(store, GROUP).status.values.tolist() == ["done", "failed"]
    shard.write_bytes(original)
    assert run(cfg_for(root, store)) == 0


# ------------------------------------------------------------------ one writer


def test_a_second_run_on_a_store_is_refused_naming_the_holder(stored, small_run, capsys):
    from pipeline.store.lock import StoreLock

    before = files_of(stored)
    with StoreLock(str(stored)):
        assert run(cfg_for(small_run, stored, "replay.overwrite=true")) == 2
    err = capsys.readouterr().err
    assert f"process {os.getpid()} on" in err and "is being written by" in err and ".lock" in err
    assert files_of(stored) == before
    assert run(cfg_for(small_run, stored, "replay.overwrite=true")) == 0  # released


def test_a_store_reached_through_a_symlink_is_the_same_store_to_the_lock(stored, small_run, tmp_path, capsys):
    from pipeline.store.lock import StoreLock

    link = tmp_path / "link.zarr"
    link.symlink_to(stored, target_is_directory=True)
    before = files_of(stored)
    with StoreLock(str(stored)):
        assert run(cfg_for(small_run, link, "replay.overwrite=true")) == 2
    err = capsys.readouterr().err
    assert f"process {os.getpid()} on" in err and "is being written by" in err, err
    assert files_of(stored) == before


@pytest.mark.parametrize("name", ["s.zarr.lock.json", "s.zarr.lock"])
def test_a_lock_file_that_is_a_symlink_never_writes_its_target(stored, small_run, tmp_path, name, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / name).unlink(missing_ok=True)  # the lock file the first run left (filelock keeps it)
    (tmp_path / name).symlink_to(victim)
    if name.endswith(".json"):  # the holder file is replaced, link and all
        assert run(cfg_for(small_run, stored)) == 0
    else:  # the lock itself is refused: following it would lock (and could truncate) another file
        assert run(cfg_for(small_run, stored)) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"sinktrace: error: store.path={stored}: its lock file {stored}.lock is a symlink, " + (
            "never followed: remove it"
        )
    assert victim.read_text() == "mine"


@pytest.mark.slow
def test_a_store_in_a_read_only_folder_is_one_line_naming_the_folder(small_run, tmp_path):
    # Root writes through permission bits: as root, the command runs without the capabilities that allow that
    # (setpriv drops them from its bounding set), so the kernel refuses the writes as it would for any user.
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root, and setpriv (util-linux) is not there to drop root's override")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        args = [f"checkpoints.root={small_run}", "checkpoints.quiet_seconds=0", f"store.path={folder / 's.zarr'}"]
        rc, _, err = cli_bounded([*args, "stages=[replay]"], prefix=prefix)
    finally:
        folder.chmod(0o755)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"store.path={folder / 's.zarr'}: cannot write in {folder}" in err and "being written by" not in err, err
    assert list(folder.iterdir()) == []


def test_a_step_marked_done_without_data_is_replayed(stored, small_run):
    group = zarr.open_group(str(stored), path=GROUP, mode="r+")
    i = group["step"][:].tolist().index(10)
    for name, array in group.arrays():
        if name not in ("step", "status", "error", "tokens_seen") and array.dtype.kind == "f":
            array[i] = np.nan  # a write that was lost, its status left saying done
    ds = pipeline.open_sinks(stored, GROUP)
    assert ds.status.sel(step=10).item() == "pending" and "data is missing" in ds.error.sel(step=10).item()
    from pipeline.store.cube import SinkStore

    assert SinkStore(str(stored), GROUP).status()[10] == "pending"
    assert run(cfg_for(small_run, stored)) == 0
    assert np.isfinite(pipeline.open_sinks(stored, GROUP).sink_mass.sel(step=10)).all()


# ------------------------------------------------------------------ quiet, safe defaults


def test_the_default_run_opens_no_socket_and_starts_no_scheduler(small_run, tmp_path, monkeypatch):
    import psutil

    import pipeline.replay.step as replay_mod

    real, seen = replay_mod.replay, []

    def watching(*a, **kw):
        seen.append([c for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN])
        return real(*a, **kw)

    monkeypatch.setattr(replay_mod, "replay", watching)
    assert run(cfg_for(small_run, tmp_path / "s.zarr")) == 0
    assert len(seen) == 3 and seen == [[], [], []]


def test_a_failing_step_is_one_line_and_verbose_adds_the_traceback(small_run, tmp_path, capsys):
    (small_run / "checkpoint-10" / "config.json").write_text("{not json")
    backdate(small_run, 3600)
    assert run(cfg_for(small_run, tmp_path / "a.zarr")) == 1
    out = capsys.readouterr()
    assert "step 10 failed: CheckpointError" in out.out + out.err
    assert "Traceback" not in out.out + out.err and "Compute Failed" not in out.out + out.err
    assert run(cfg_for(small_run, tmp_path / "b.zarr", "verbose=true")) == 1
    assert "Traceback" in capsys.readouterr().out


def test_auto_map_alone_is_not_another_architecture(small_run):
    from pipeline.checkpoints.model_config import config_fingerprint, read_config

    config = read_config(str(small_run / "checkpoint-0"))
    assert config_fingerprint({**config, "auto_map": {"AutoConfig": "x.Config"}}) == config_fingerprint(config)


# ------------------------------------------------------------------ interrupts


def wait_for_done(store: Path, n: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if (pipeline.open_sinks(store, GROUP).status == "done").sum().item() >= n:
                return
        except Exception:
            pass
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_an_interrupt_stops_between_steps_and_the_rerun_finishes(tmp_path, sig):
    root = tmp_path / "run"
    make_run(root, list(range(0, 120, 10)))
    args = [
        sys.executable,
        "-m",
        "pipeline",
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        "stages=[replay]",
        "probe.rows=4",
        "probe.seq_len=16",
    ]
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen([*args, f"store.path={store}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_done(store, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    ds = pipeline.open_sinks(store, GROUP)
    status = ds.status.values.tolist()
    assert set(status) <= {"done", "pending"} and "pending" in status
    done = ds.status == "done"
    assert np.isfinite(ds.sink_mass.where(done, drop=True)).all()  # every step marked done holds its data
    assert not (store.parent / "s.zarr.lock.json").exists()

    assert run(cfg_for(root, store)) == 0  # the rerun: in this process, as only the interrupted run needs its own
    reference = tmp_path / "ref.zarr"
    assert run(cfg_for(root, reference)) == 0
    xr.testing.assert_equal(
        pipeline.open_sinks(store, GROUP).load().drop_attrs(), pipeline.open_sinks(reference, GROUP).load().drop_attrs()
    )
