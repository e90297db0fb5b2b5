"""The whole path a user walks: checkpoint folder -> sinktrace -> Zarr store -> xarray."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

import pipeline
from pipeline.cli import compose, run
from pipeline.records import Checkpoint
from tests.reference import STATS


def replay_cfg(root, store, *extra):
    return compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=8",
            "probe.seq_len=32",
            *extra,
        ]
    )


def group_name(store):
    tree = xr.open_datatree(store, engine="zarr")
    (name,) = tree.children
    return name


def test_replay_matches_eager_reference_on_a_trained_run(trained_run, tmp_path):
    from pipeline.checkpoints.model_config import read_config
    from pipeline.probe import build_probe
    from pipeline.replay.load import load_model
    from tests.reference import reference_stats

    store = str(tmp_path / "s.zarr")
    assert run(replay_cfg(trained_run, store)) == 0

    name = group_name(store)
    ds = xr.open_datatree(store, engine="zarr")[name].to_dataset()
    for var in STATS:
        assert var in ds, var
    assert ds.sink_mass.dims == ("step", "layer", "head")
    assert ds.sink_mass_by_q.dims == ("step", "layer", "head", "qbin")
    assert ds.key_mass.dims == ("step", "layer", "head", "key")
    assert ds.key_norm.dims == ("step", "layer", "kv_head")
    assert ds.resid_norm.dims == ("step", "layer")
    assert list(ds.step.values) == [0, 50, 100, 150]
    assert list(pipeline.open_sinks(store, name).status.values) == ["done"] * 4
    assert ds.attrs["probe_seq_len"] == 32 and ds.attrs["probe_first_token"] == "bos"
    assert "config" in ds.attrs and "sinktrace_version" in ds.attrs

    # the independent reference: eager attention with output_attentions=True, float32
    cfg = replay_cfg(trained_run, store)
    last = Checkpoint(step=150, path=str(trained_run / "checkpoint-150"), complete=True)
    probe = build_probe(cfg.probe, read_config(last))
    model = load_model(last, device="cpu", dtype="float32", attn_implementation="eager")
    ref = reference_stats(model, probe.tokens, key_positions=4)
    got = ds.sel(step=150)
    for var in STATS:
        np.testing.assert_allclose(got[var].values, ref[var], atol=1e-5, rtol=1e-5, err_msg=var)
    # the run is trained: the first-token sink has started to form in layer 0
    assert got.sink_mass.sel(layer=0).mean() > ds.sel(step=0).sink_mass.sel(layer=0).mean()


def test_rerun_skips_done_steps_and_overwrite_recomputes(trained_run, tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    assert run(replay_cfg(trained_run, store, "replay.steps=[0,50]")) == 0
    assert "0 done, 2 to replay" in capsys.readouterr().out
    assert run(replay_cfg(trained_run, store)) == 0
    assert "2 done, 2 to replay" in capsys.readouterr().out
    assert run(replay_cfg(trained_run, store)) == 0
    assert "4 done, 0 to replay" in capsys.readouterr().out
    assert run(replay_cfg(trained_run, store, "replay.overwrite=true")) == 0
    assert "4 done, 4 to replay" in capsys.readouterr().out


def test_new_probe_writes_a_new_group_and_keeps_the_old(trained_run, tmp_path):
    store = str(tmp_path / "s.zarr")
    assert run(replay_cfg(trained_run, store, "replay.steps=[0]")) == 0
    before = pipeline.open_sinks(store, group_name(store)).load()
    assert run(replay_cfg(trained_run, store, "replay.steps=[0]", "probe.first_token=random")) == 0
    tree = xr.open_datatree(store, engine="zarr")
    assert sorted(tree.children) == ["random-T32-r8-s0-bos", "random-T32-r8-s0-random"]
    xr.testing.assert_identical(pipeline.open_sinks(store, "random-T32-r8-s0-bos").load(), before)


def test_bad_checkpoint_is_marked_failed_and_the_others_replay(run_copy, tmp_path, capsys):
    shard = run_copy / "checkpoint-50" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated mid-write
    store = str(tmp_path / "s.zarr")
    assert run(replay_cfg(run_copy, store)) == 1
    err = capsys.readouterr().err
    assert "step 50" in err and "model.safetensors" in err
    ds = pipeline.open_sinks(store, group_name(store))
    assert list(ds.status.values) == ["done", "failed", "done", "done"]
    assert "model.safetensors" in str(ds.error.sel(step=50).values)
    assert np.isfinite(ds.sink_mass.sel(step=[0, 100, 150])).all()
    assert np.isnan(ds.sink_mass.sel(step=50)).all()


def test_an_overwrite_that_fails_keeps_the_stored_result(run_copy, tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    assert run(replay_cfg(run_copy, store)) == 0
    before = pipeline.open_sinks(store, group_name(store)).sink_mass.load()
    (run_copy / "checkpoint-100" / "config.json").write_text("{not json")
    assert run(replay_cfg(run_copy, store, "replay.overwrite=true")) == 1
    assert "step 100: CheckpointError" in capsys.readouterr().err  # reported...
    after = pipeline.open_sinks(store, group_name(store))
    assert after.status.values.tolist() == ["done"] * 4  # ...but the earlier result stays
    xr.testing.assert_equal(after.sink_mass, before)


def test_probe_token_outside_vocabulary_is_a_clear_error(trained_run, tmp_path, capsys):
    bad = tmp_path / "probe.npy"
    np.save(bad, np.full((2, 16), 10_000, dtype=np.int64))
    cfg = compose(
        [
            f"checkpoints.root={trained_run}",
            "checkpoints.quiet_seconds=0",
            f"store.path={tmp_path / 's.zarr'}",
            "probe=tokens",
            f"probe.path={bad}",
        ]
    )
    assert run(cfg) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "10000" in err and "vocabulary" in err


def test_unknown_stage_is_a_clear_error(trained_run, tmp_path, capsys):
    assert run(replay_cfg(trained_run, tmp_path / "s.zarr", "stages=[replay,plot]")) == 2
    assert "unknown stage" in capsys.readouterr().err


def cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        **kw,
    )


@pytest.mark.slow
def test_unknown_config_key_is_rejected_by_name(tmp_path):
    res = cli("probe.sq_len=3")
    assert res.returncode != 0
    assert "probe.sq_len" in res.stderr + res.stdout


@pytest.mark.slow
def test_multirun_writes_one_group_per_probe_length(trained_run, tmp_path):
    store = tmp_path / "s.zarr"
    res = cli(
        "-m",
        f"checkpoints.root={trained_run}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=4",
        "replay.steps=[0,150]",
        "probe.seq_len=16,32",
    )
    assert res.returncode == 0, res.stderr
    tree = xr.open_datatree(store, engine="zarr")
    assert sorted(tree.children) == ["random-T16-r4-s0-bos", "random-T32-r4-s0-bos"]
    assert tree["random-T16-r4-s0-bos"].sizes["qbin"] == 4 and tree["random-T32-r4-s0-bos"].sizes["qbin"] == 5
    for name in tree.children:
        assert list(pipeline.open_sinks(str(store), name).status.values) == ["done", "done"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(run_copy, tmp_path):
    # more checkpoints, so the kill lands mid-run
    import shutil

    for step in (200, 250, 300, 350):
        shutil.copytree(run_copy / "checkpoint-150", run_copy / f"checkpoint-{step}")
        state = run_copy / f"checkpoint-{step}" / "trainer_state.json"
        state.write_text(state.read_text().replace('"global_step": 150', f'"global_step": {step}'))
    args = [
        f"checkpoints.root={run_copy}",
        "checkpoints.quiet_seconds=0",
        "stages=[replay]",
        "probe.rows=8",
        "probe.seq_len=32",
    ]
    # the clean replay and the resume are in this process: only the killed run needs a process of its own
    reference = tmp_path / "reference.zarr"
    assert run(compose([*args, f"store.path={reference}"])) == 0

    store = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, f"store.path={store}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            done = (pipeline.open_sinks(str(store), "random-T32-r8-s0-bos").status == "done").sum().item()
        except Exception:
            continue
        if done >= 2:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = pipeline.open_sinks(str(store), "random-T32-r8-s0-bos")
    assert (killed.status != "done").any(), "the kill came too late to test anything"

    assert run(compose([*args, f"store.path={store}"])) == 0
    a = pipeline.open_sinks(str(store), "random-T32-r8-s0-bos").load()
    b = pipeline.open_sinks(str(reference), "random-T32-r8-s0-bos").load()
    xr.testing.assert_equal(a.drop_attrs(), b.drop_attrs())


@pytest.mark.slow
def test_report_stage_alone_redraws_from_the_store(trained_run, tmp_path, capsys, sinktrace_home):
    store = tmp_path / "s.zarr"
    assert run(replay_cfg(trained_run, store)) == 0
    cfg = compose(
        [
            f"store.path={store}",  # no checkpoints.root: the store is all the report reads
            "stages=[report]",
            f"report.out_dir={tmp_path / 'report'}",
        ]
    )
    assert run(cfg) == 0
    out = capsys.readouterr().out
    assert "layer" in out and str(store) in out
    assert any(p.suffix == ".png" for p in (tmp_path / "report").iterdir())
    assert not (sinktrace_home / "demo").exists()  # the demo run is neither built nor replayed


HEAVY_IMPORTS = (
    "import sys\n"
    "from pipeline.cli import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as e:\n"
    "    assert e.code == 0, e.code\n"
    "print('imported:', sorted(m for m in ('torch', 'transformers', 'distributed') if m in sys.modules))\n"
)


@pytest.mark.slow
def test_default_run_never_imports_dask_and_report_never_imports_torch(trained_run, tmp_path):
    """The default in-process replay never loads Dask; `stages=[report]` never loads a model library."""
    store = tmp_path / "s.zarr"
    args = [f"checkpoints.root={trained_run}", "checkpoints.quiet_seconds=0", "probe.rows=8", "probe.seq_len=32"]
    res = subprocess.run(
        [sys.executable, "-c", HEAVY_IMPORTS, *args, f"store.path={store}", "stages=[replay]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "imported: ['torch', 'transformers']" in res.stdout, res.stdout[-2000:]

    res = subprocess.run(
        [
            sys.executable,
            "-c",
            HEAVY_IMPORTS,
            *args,
            f"store.path={store}",
            "stages=[report]",
            f"report.out_dir={tmp_path / 'report'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "imported: []" in res.stdout, res.stdout[-2000:]


def test_measure_switches_loss_and_mixing_reach_the_store(trained_run, tmp_path, capsys):
    import json

    from pipeline.store.cube import open_sinks

    store = str(tmp_path / "s.zarr")
    assert (
        run(replay_cfg(trained_run, store, "replay.steps=[0,100]", "replay.measure=[outputs,similarity,loss,mixing]"))
        == 0
    )
    ds = open_sinks(store, group_name(store))
    state = json.loads((trained_run / "checkpoint-100" / "trainer_state.json").read_text())
    logged = [e["loss"] for e in state["log_history"] if "loss" in e and e["step"] <= 100]
    assert "loss" in ds.coords and float(ds["loss"].sel(step=100)) == logged[-1]
    assert ds["collapse"].dims == ("step", "layer", "sink") and ds["sink"].values.tolist() == ["kept", "removed"]
    for name in ("attn_out_norm_p0", "mlp_out_norm", "p0_similarity", "rest_similarity", "sensitivity"):
        assert np.isfinite(ds[name].values).all(), name
    assert ds.sinks.mixing_effect()["collapse"].sizes == {"step": 2, "layer": ds.sizes["layer"]}

    assert run(replay_cfg(trained_run, store, "replay.measure=[loss,typo]")) == 2
    assert "replay.measure: unknown group(s) ['typo']" in capsys.readouterr().err
