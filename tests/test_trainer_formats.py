"""Runs written by from-scratch trainers (DCP folders, torch.save files) replay unconverted and match eager
attention on the equivalent transformers model; bad input of each format is refused with a clear error."""

import os
import pickle
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xarray as xr

from pipeline.checkpoints.discover import discover
from pipeline.checkpoints.statedict import hf_config
from pipeline.cli import compose, run
from pipeline.errors import CheckpointError
from pipeline.probe import build_probe
from pipeline.replay.load import load_model
from pipeline.replay.measure import measure
from tests import trainer_ckpts as tc
from tests.reference import STATS, reference_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

ROWS, SEQ = 3, 24


def probe_ids(vocab=101, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 1, size=(ROWS, SEQ))
    ids[:, 0] = 5
    return ids


def assert_matches(ckpt, reference, **how):
    """`how`: the record's key_map and model_config, as `checkpoints.*` would set them."""
    ids = probe_ids(reference.config.vocab_size)
    got = measure(load_model(replace(ckpt, **how), device="cpu", dtype="float32"), ids, measures=())
    want = reference_stats(reference, ids)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def config_file(model, path) -> str:
    model.config.to_json_file(path)
    return str(path)


def one(root, **kwargs):
    found = discover(str(root), quiet_seconds=0, **kwargs)
    assert len(found) >= 1
    return found


# ------------------------------------------------------------------------------------------ each trainer


def test_torchtitan_run(tmp_path):
    a, b = tc.llama(seed=1), tc.llama(seed=2)
    tc.torchtitan_step(tmp_path / "run", 100, a)
    tc.torchtitan_step(tmp_path / "run", 200, b, release="0.3")
    found = one(tmp_path / "run")
    assert [(c.step, c.format, c.step_source, c.complete) for c in found] == [
        (100, "dcp", "folder name", True),
        (200, "dcp", "folder name", True),
    ]
    config = config_file(a, tmp_path / "config.json")
    assert_matches(found[0], a, model_config=config)
    assert_matches(found[1], b, model_config=config, key_map="torchtitan_llama")


def test_dcp_safetensors_flavour(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    model = tc.llama(seed=3)
    folder = tmp_path / "run" / "step-7"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            tc.torchtitan_names(model),
            storage_writer=FileSystemWriter(str(folder), serialization_format=SerializationFormat.SAFETENSORS),
        )
    [c] = one(tmp_path / "run")
    assert c.format == "dcp"
    assert_matches(c, model, model_config=config_file(model, tmp_path / "config.json"))


def test_hugging_face_storage_writer_folder(tmp_path):
    """DCP's HuggingFaceStorageWriter writes plain safetensors (no config.json): read as hf with a model config."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model = tc.llama(seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(tc.hf_state(model), storage_writer=HuggingFaceStorageWriter(str(tmp_path / "run" / "step-3")))
    [c] = one(tmp_path / "run")
    assert c.format == "hf" and not c.complete and "config.json is missing" in c.reason
    [c] = one(tmp_path / "run", format="hf", model_config=config_file(model, tmp_path / "config.json"))
    assert c.complete and c.model_config == str(tmp_path / "config.json")
    assert_matches(c, model)


def test_megatron_run(tmp_path):
    a, b = tc.llama(seed=5), tc.llama(seed=6)
    tc.megatron_iteration(tmp_path / "run", 500, a)
    tc.megatron_iteration(tmp_path / "run", 1000, b)
    found = one(tmp_path / "run")
    assert [(c.step, c.format, c.complete) for c in found] == [(500, "dcp", True), (1000, "dcp", True)]
    config = config_file(a, tmp_path / "config.json")
    assert_matches(found[0], a, model_config=config)
    assert_matches(found[1], b, model_config=config, key_map="megatron_gpt")


def test_megatron_iteration_beyond_the_tracker_is_still_being_written(tmp_path):
    model = tc.llama()
    tc.megatron_iteration(tmp_path / "run", 500, model)
    tc.megatron_iteration(tmp_path / "run", 1000, model, tracker=False)
    found = one(tmp_path / "run")
    assert [c.complete for c in found] == [True, False]
    assert "newer than the iteration latest_checkpointed_iteration.txt names (500)" in found[1].reason


def test_fsdp_trainer_run_takes_the_config_its_final_save_wrote(tmp_path):
    model = tc.llama(seed=7)
    tc.fsdp_trainer_checkpoint(tmp_path / "run", 30, model, final_save=True)
    [c] = one(tmp_path / "run")
    assert (c.step, c.format, c.step_source, c.complete) == (30, "dcp", "trainer_state.json", True)
    assert c.weight_files[0].endswith("pytorch_model_fsdp_0")
    assert_matches(c, model)


def test_only_model_tensors_are_read(tmp_path, monkeypatch):
    from pipeline.checkpoints import byteranges
    from pipeline.checkpoints.formats.dcp import read_metadata

    asked, read_files = [], byteranges.read_files

    def spy(ranges, plan=byteranges.ReadPlan()):
        asked.extend((os.path.basename(f), r) for f, rs in ranges.items() for r in rs)
        return read_files(ranges, plan)

    monkeypatch.setattr(byteranges, "read_files", spy)
    model = tc.llama()
    folder = tc.torchtitan_step(tmp_path / "run", 1, model)
    [c] = one(tmp_path / "run")
    load_model(replace(c, model_config=config_file(model, tmp_path / "config.json")))
    chunks = {
        i.fqn: (s.relative_path, (s.offset, s.offset + s.length))
        for i, s in read_metadata(str(folder)).storage_data.items()
    }
    model = {chunks[name] for name in tc.torchtitan_names(model)}
    assert model <= set(asked)  # every chunk of the model, and nothing but bytes inside them
    assert all(any(f == g and a <= b and d <= e for g, (a, e) in model) for f, (b, d) in asked)


def test_olmo_core_run_written_by_olmo_core(tmp_path):
    root, references = tc.olmo_run(tmp_path / "run", [10, 20])
    found = one(root)
    assert [(c.step, c.format, c.step_source) for c in found] == [
        (10, "dcp", "folder name"),
        (20, "dcp", "folder name"),
    ]
    assert found[0].weight_files[0].endswith("model_and_optim")
    for c in found:  # the config comes from OLMo-core's own config.json in the step folder
        assert_matches(c, references[c.step])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_nanogpt_run(tmp_path, bias, compiled):
    model = tc.gpt2(seed=8, bias=bias)
    tc.nanogpt_checkpoint(tmp_path / "out", model, 2000, bias=bias, compiled=compiled)
    [c] = one(tmp_path / "out")
    assert (c.step, c.format, c.step_source) == (2000, "torch", "iter_num field")
    assert_matches(c, model)


def test_a_nanogpt_file_is_loaded_once_per_replay(tmp_path, monkeypatch):
    """key_map=auto and the config from model_args: the map, the config and the tensors come from one torch.load."""
    from pipeline.replay import replay
    from pipeline.settings import ReplaySettings

    model = tc.gpt2(seed=15)
    path = tc.nanogpt_checkpoint(tmp_path / "out", model, 400)
    [c] = one(tmp_path / "out")
    probe = build_probe(compose(["probe.rows=3", "probe.seq_len=16"]).probe, hf_config(c))
    loads = []
    original = torch.load

    def counting(f, *args, **kwargs):
        loads.append(str(f))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    ds = replay(c, probe, ReplaySettings(device="cpu", dtype="float32", measure=[]))
    assert loads == [str(path)]
    want = reference_stats(model, probe.tokens)
    np.testing.assert_allclose(ds["sink_mass"].values, want["sink_mass"], rtol=1e-5, atol=1e-5)


def test_nanochat_run(tmp_path):
    a, b = tc.nanochat_model(seed=9), tc.nanochat_model(seed=10)
    tc.nanochat_checkpoint(tmp_path / "d2", 500, a)
    tc.nanochat_checkpoint(tmp_path / "d2", 1000, b)
    found = one(tmp_path / "d2")
    assert [(c.step, c.format, c.step_source) for c in found] == [
        (500, "torch", "file name"),
        (1000, "torch", "file name"),
    ]
    assert_matches(found[0], a)
    assert_matches(found[1], b)


def test_litgpt_run(tmp_path):
    model = tc.llama(seed=11)
    tc.litgpt_step(tmp_path / "out", 1000, model)
    [c] = one(tmp_path / "out")
    assert (c.step, c.format, c.step_source) == (1000, "torch", "folder name")
    assert_matches(c, model)  # config from model_config.yaml


def test_tinyllama_iterations(tmp_path):
    model = tc.llama(seed=12)
    tc.tinyllama_iteration(tmp_path / "out", 20000, model)
    [c] = one(tmp_path / "out")
    assert (c.step, c.format, c.step_source) == (20000, "torch", "file name")
    assert_matches(c, model, model_config=config_file(model, tmp_path / "config.json"))


def test_sinktrace_replays_unconverted_runs(tmp_path):
    """The command itself, on a nanoGPT run (config from model_args) and a torchtitan run (model_config)."""
    gpt = tc.gpt2(seed=13)
    tc.nanogpt_checkpoint(tmp_path / "nano", gpt, 300)
    store = tmp_path / "nano.zarr"
    base = ["checkpoints.quiet_seconds=0", "stages=[replay]", "probe.rows=4", "probe.seq_len=16"]
    assert run(compose([f"checkpoints.root={tmp_path / 'nano'}", f"store.path={store}", *base])) == 0
    tree = xr.open_datatree(store, engine="zarr")
    (name,) = tree.children
    ds = tree[name].to_dataset()
    assert list(ds.step.values) == [300] and list(ds.status.values) == ["done"]
    assert ds.attrs["step_source"] == {"iter_num field": [300]}
    assert ds.attrs["checkpoint_format"] == ["torch"] and ds.attrs["architecture"] == "gpt2"

    llama = tc.llama(seed=14)
    tc.torchtitan_step(tmp_path / "titan", 5, llama)
    store = tmp_path / "titan.zarr"
    config = config_file(llama, tmp_path / "config.json")
    assert (
        run(
            compose(
                [
                    f"checkpoints.root={tmp_path / 'titan'}",
                    f"store.path={store}",
                    *base,
                    f"checkpoints.model_config={config}",
                ]
            )
        )
        == 0
    )
    tree = xr.open_datatree(store, engine="zarr")
    (name,) = tree.children
    ds = tree[name].to_dataset()
    assert list(ds.status.values) == ["done"] and ds.attrs["key_map"] == "torchtitan_llama"
    assert np.isfinite(ds.sink_mass.values).all()


def test_a_run_that_does_not_describe_its_model_is_a_usage_error(tmp_path, capsys):
    tc.torchtitan_step(tmp_path / "run", 5, tc.llama())
    cfg = compose(
        [
            f"checkpoints.root={tmp_path / 'run'}",
            "checkpoints.quiet_seconds=0",
            f"store.path={tmp_path / 's.zarr'}",
            "stages=[replay]",
        ]
    )
    assert run(cfg) == 2
    assert "checkpoints.model_config" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


def test_a_new_trainer_format_is_one_key_map_module_and_one_registry_line(tmp_path, monkeypatch):
    """A map module named in the registry is all a new trainer needs: `auto` finds it, its `saved_config` hook gives
    the model's config from what the trainer saved, its rules rename the tensors, and the settings list it."""
    import types

    from pipeline import settings
    from pipeline.checkpoints import keymaps
    from pipeline.checkpoints.keymaps import Rule
    from pipeline.checkpoints.statedict import resolve_key_map

    assert settings.KEY_MAPS == ("auto", *keymaps.NAMES)
    shipped = {p.stem for p in Path(keymaps.__file__).parent.glob("*.py")} - {"__init__"}
    assert shipped == set(keymaps.NAMES)

    def saved_config(saved):  # this trainer keeps its transformers config in the file, as "hparams"
        return saved.torch_file()["hparams"]

    toy = types.ModuleType("pipeline.checkpoints.keymaps.toy")
    toy.SIGNATURE = r"^toy\.layers\.\d+\."
    toy.RULES = [Rule(r"toy\.(.+)", "model.{0}"), Rule(r"head\.weight", "lm_head.weight")]
    toy.saved_config = saved_config
    monkeypatch.setitem(sys.modules, toy.__name__, toy)  # the new module ...
    monkeypatch.setattr(keymaps, "MAPS", ("toy", *keymaps.MAPS))  # ... and its registry line
    monkeypatch.setattr(keymaps, "NAMES", ("none", *keymaps.MAPS))

    model = tc.llama(seed=16)
    names = {k.replace("model.", "toy.", 1).replace("lm_head.", "head.", 1): v for k, v in tc.hf_state(model).items()}
    (tmp_path / "run").mkdir()
    torch.save({"model": names, "hparams": model.config.to_dict()}, tmp_path / "run" / "toy_100.pt")
    [c] = one(tmp_path / "run")
    assert (c.step, c.format, c.key_map) == (100, "torch", "auto")
    assert resolve_key_map(c) == "toy" and hf_config(c)["model_type"] == "llama"
    assert_matches(c, model)


# ------------------------------------------------------------------------------------------ series kept by hand

SERIES = [0, 100, 200]
NANOGPT_SETTINGS = ["checkpoints.format=torch", "checkpoints.key_map=nanogpt"]
REPLAY = ["checkpoints.quiet_seconds=0", "stages=[replay]", "probe.rows=3", "probe.seq_len=16", "replay.dtype=float32"]


@pytest.mark.parametrize("layout", ["step_{}/ckpt.pt", "ckpt_{}.pt"])
@pytest.mark.slow
def test_nanogpt_series_kept_by_hand_replays_through_the_command(tmp_path, layout):
    models = tc.nanogpt_series(tmp_path / "out", SERIES, layout)
    store = tmp_path / "s.zarr"
    settings = [f"checkpoints.root={tmp_path / 'out'}", *NANOGPT_SETTINGS, *REPLAY, "replay.device=cpu"]
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", *settings, f"store.path={store}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "3 checkpoint(s), 3 ready, 0 not yet" in res.stdout

    tree = xr.open_datatree(store, engine="zarr")
    (name,) = tree.children
    ds = tree[name].to_dataset()
    assert ds.step.values.tolist() == SERIES and set(ds.status.values.tolist()) == {"done"}
    source = "folder name" if "/" in layout else "file name"
    assert ds.attrs["step_source"] == {source: SERIES} and ds.attrs["key_map"] == "nanogpt"
    # the probe the run built, from the config it derived from nanoGPT's model_args
    first = discover(str(tmp_path / "out"), quiet_seconds=0, format="torch", key_map="nanogpt")[0]
    probe = build_probe(compose(settings).probe, hf_config(first))
    for step, model in models.items():
        want = reference_stats(model, probe.tokens)
        assert set(STATS) <= set(want)
        for stat in STATS:
            np.testing.assert_allclose(
                ds[stat].sel(step=step).values, want[stat], rtol=1e-5, atol=1e-5, err_msg=f"step {step}: {stat}"
            )


def test_a_run_sinktrace_cannot_read_is_listed_and_exits_2(tmp_path, capsys):
    tc.nanogpt_series(tmp_path / "out", SERIES, "step_{}/ckpt.pt")
    store = tmp_path / "s.zarr"
    base = [f"checkpoints.root={tmp_path / 'out'}", "checkpoints.quiet_seconds=0", f"store.path={store}"]
    assert run(compose([*base, "checkpoints.format=dcp"])) == 2  # the default stages: replay, then report
    out, err = capsys.readouterr()
    assert "3 checkpoint(s), 0 ready, 0 not yet, 3 unreadable" in out and "nothing to replay" in out
    assert "3 of 3 checkpoint(s) hold nothing sinktrace can read (unreadable, not replayed):" in err
    lines = [line.strip() for line in err.splitlines() if line.startswith("  step ")]
    assert lines == [
        f"step {s} ({tmp_path / 'out' / f'step_{s}'}): no DCP (.metadata and *.distcp) weights "
        "(checkpoints.format=dcp); it holds ckpt.pt"
        for s in SERIES
    ]
    assert not store.exists()


def test_readable_steps_replay_and_the_unreadable_are_listed(tmp_path, capsys):
    tc.nanogpt_series(tmp_path / "out", SERIES[:2], "step_{}/ckpt.pt")
    odd = tmp_path / "out" / "step_300"
    odd.mkdir()
    (odd / "weights.npz").write_bytes(b"PK\x03\x04")  # a kind of file sinktrace does not read
    tc.backdate(tmp_path / "out", 3600)
    store = tmp_path / "s.zarr"
    assert (
        run(compose([f"checkpoints.root={tmp_path / 'out'}", *NANOGPT_SETTINGS, *REPLAY, f"store.path={store}"])) == 1
    )
    out, err = capsys.readouterr()
    assert "3 checkpoint(s), 2 ready, 0 not yet, 1 unreadable" in out
    assert "1 of 3 checkpoint(s) hold nothing sinktrace can read (unreadable, not replayed):" in err
    assert (
        f"  step 300 ({odd}): no torch.save (*.pt, *.pth, *.ckpt) weights (checkpoints.format=torch); it holds "
        "weights.npz" in err
    )
    ds = xr.open_datatree(store, engine="zarr")
    (name,) = ds.children
    assert ds[name].to_dataset().status.values.tolist() == ["done", "done"]


# ------------------------------------------------------------------------------------------ bad input


class _Trap:
    """Unpickling this would run a shell command (its __reduce__ names os.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_naming_a_disallowed_class_is_refused_and_nothing_runs(tmp_path):
    model = tc.llama()
    folder = tc.torchtitan_step(tmp_path / "run", 1, model)
    from pipeline.checkpoints.formats.dcp import read_metadata

    metadata = read_metadata(str(folder))
    marker = tmp_path / "pwned"
    metadata.planner_data = {"x": _Trap(marker)}
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    [c] = one(tmp_path / "run")
    with pytest.raises(CheckpointError) as err:
        load_model(replace(c, model_config=config_file(model, tmp_path / "config.json")))
    assert str(folder / ".metadata") in str(err.value)
    assert "names posix.system" in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


def test_missing_distcp_file_is_named(tmp_path):
    model = tc.llama()
    folder = tc.torchtitan_step(tmp_path / "run", 1, model)
    (folder / "__0_0.distcp").unlink()
    [c] = one(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp listed in \.metadata is missing") as err:
        load_model(replace(c, model_config=config_file(model, tmp_path / "config.json")))
    assert err.value.path == str(folder / "__0_0.distcp")


def test_dcp_without_metadata_is_still_being_written(tmp_path):
    folder = tc.torchtitan_step(tmp_path / "run", 1, tc.llama())
    (folder / ".metadata").unlink()
    [c] = one(tmp_path / "run")
    assert not c.complete and "no .metadata, which DCP writes last" in c.reason


def test_map_leaving_tensors_unused_lists_them(tmp_path):
    model = tc.llama()
    names = tc.torchtitan_names(model) | {"layers.0.attention.wq_extra.weight": torch.ones(3)}
    tc._dcp_save(names, tmp_path / "run" / "step-1")
    [c] = one(tmp_path / "run")
    config = config_file(model, tmp_path / "config.json")
    with pytest.raises(
        CheckpointError,
        match=r"key map torchtitan_llama leaves 1 tensors unused "
        r"\(layers\.0\.attention\.wq_extra\.weight\)",
    ):
        load_model(replace(c, model_config=config))
    with pytest.raises(CheckpointError, match=r"key map megatron_gpt leaves 22 tensors unused"):
        load_model(replace(c, model_config=config, key_map="megatron_gpt"))


def test_model_tensor_nothing_fills_is_named(tmp_path):
    model = tc.llama()
    names = tc.torchtitan_names(model)
    del names["layers.1.ffn_norm.weight"]
    tc._dcp_save(names, tmp_path / "run" / "step-1")
    [c] = one(tmp_path / "run")
    with pytest.raises(
        CheckpointError,
        match=r"nothing in the checkpoint fills 1 of the model's tensors "
        r"\(model\.layers\.1\.post_attention_layernorm\.weight\)",
    ):
        load_model(replace(c, model_config=config_file(model, tmp_path / "config.json")))


def test_torch_file_needing_full_unpickling_is_refused_and_nothing_runs(tmp_path):
    model = tc.nanochat_model()
    path = tc.nanochat_checkpoint(tmp_path / "d2", 500, model)
    marker = tmp_path / "pwned"
    sd = torch.load(path, weights_only=True)
    torch.save({**sd, "extra": _Trap(marker)}, path)
    [c] = one(tmp_path / "d2")
    needs_more = r"model_000500\.pt needs more than torch\.load\(weights_only=True\)"
    with pytest.raises(CheckpointError, match=needs_more) as err:
        load_model(c)
    assert err.value.path == str(path)
    assert not marker.exists()


def test_unknown_format_and_key_map_are_usage_errors(tmp_path, capsys):
    tc.nanochat_checkpoint(tmp_path / "d2", 500, tc.nanochat_model())
    base = [f"checkpoints.root={tmp_path / 'd2'}", "checkpoints.quiet_seconds=0", f"store.path={tmp_path / 's.zarr'}"]
    assert run(compose([*base, "checkpoints.format=safetensor"])) == 2
    assert "checkpoints.format=safetensor: choose from auto, hf, dcp, torch" in capsys.readouterr().err
    assert run(compose([*base, "checkpoints.key_map=titan"])) == 2
    assert "checkpoints.key_map=titan: choose from auto, none, torchtitan_llama" in capsys.readouterr().err


def test_truncated_metadata_is_named(tmp_path):
    model = tc.llama()
    folder = tc.torchtitan_step(tmp_path / "run", 1, model)
    data = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data[: len(data) // 2])
    [c] = one(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"\.metadata is not readable DCP metadata") as err:
        load_model(replace(c, model_config=config_file(model, tmp_path / "config.json")))
    assert err.value.path == str(folder / ".metadata")


def test_torch_file_with_a_tensor_the_map_does_not_know(tmp_path):
    model = tc.nanochat_model()
    path = tc.nanochat_checkpoint(tmp_path / "d2", 500, model)
    sd = torch.load(path, weights_only=True)
    torch.save({**sd, "transformer.h.0.attn.c_gate.weight": torch.ones(2)}, path)
    [c] = one(tmp_path / "d2")
    with pytest.raises(
        CheckpointError,
        match=r"key map nanochat leaves 1 tensors unused "
        r"\(transformer\.h\.0\.attn\.c_gate\.weight\)",
    ):
        load_model(c)
