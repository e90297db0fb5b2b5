"""Layer-by-layer replay (`pipeline.replay.layered`): the same statistics as whole-model replay, one block resident at a
time, every weight read once, and bad files named."""

import gc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.devices import device_budget
from pipeline.errors import CheckpointError
from pipeline.records import Checkpoint
from pipeline.replay import ReplaySettings, layered, replay
from pipeline.replay.layered import open_layered
from pipeline.replay.load import parameters_on_meta
from pipeline.replay.measure import measure
from pipeline.store.schema import MEASURED
from tests.ckpt_factory import save_checkpoint, shards
from tests.reference import reference_extra, reference_stats
from tests.test_families import FAMILIES, assert_stats_close, build, probe

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def ckpt(folder) -> Checkpoint:
    return Checkpoint(step=0, path=str(folder), complete=True)


def measure_layered(folder, ids, **kwargs):
    with open_layered(ckpt(folder), device="cpu", dtype="float32") as (model, run_rows):
        return measure(model, ids, batch_size=2, key_positions=4, run_rows=run_rows, **kwargs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_whole_model_and_reference(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path)
    ids = probe()
    got = measure_layered(tmp_path, ids, measures=tuple(MEASURED))
    assert_stats_close(
        got, measure(model, ids, batch_size=2, key_positions=4, measures=tuple(MEASURED)), rtol=1e-6, atol=1e-6
    )
    assert_stats_close(got, reference_stats(model, ids, key_positions=4) | reference_extra(model, ids))


@pytest.fixture
def streamed(monkeypatch):
    """For each block call: how many blocks hold real weights, and how many real tensors of the MLP's up_proj shape
    are alive anywhere in the process (after how many one block holds); and every tensor read from the files."""
    reads, resident, alive = [], [], []
    read = layered.BlockStream._read

    def counting_read(self, index):
        out = read(self, index)
        reads.extend(out)
        return out

    monkeypatch.setattr(layered.BlockStream, "_read", counting_read)
    run_rows = layered.BlockStream.run_rows

    def watching(self, body, batches, *args):
        blocks = list(self.blocks)  # run_rows swaps stand-ins into the list; count the blocks themselves
        shape = blocks[0].mlp.up_proj.weight.shape
        alive.append(sum(p.shape == shape for p in blocks[0].parameters()))  # first: how many a block holds

        def real_tensors():
            return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and not o.is_meta and o.shape == shape)

        before = real_tensors()  # other tests' models may be alive too (a model kept for reuse)

        def count(module, args):
            resident.append(sum(not next(b.parameters()).is_meta for b in blocks))
            alive.append(real_tensors() - before)

        hooks = [b.register_forward_pre_hook(count) for b in blocks]
        try:
            return run_rows(self, body, batches, *args)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(layered.BlockStream, "run_rows", watching)
    return reads, resident, alive


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets torch's deprecated aliases
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.slow
def test_one_block_resident_and_every_tensor_read_once(tmp_path, streamed, sharded):
    folder, saved = save_checkpoint(tmp_path / "c", sharded=sharded, num_hidden_layers=4)
    names = sorted(k for k in saved if k != "lm_head.weight")
    del saved  # its tensors would be counted as alive
    reads, resident, alive = streamed
    ids = np.random.default_rng(0).integers(0, 101, (5, 16))
    measure_layered(folder, ids)
    assert resident == [1] * (4 * 3)  # 4 blocks x 3 micro-batches (2 + 2 + 1 rows), one block held each time
    # the weights of blocks done are freed, not only detached: at most this block's and the next one's, being read
    per_block, *alive = alive
    assert per_block * 1 <= min(alive) and max(alive) <= per_block * 2, (per_block, alive)
    assert sorted(reads) == names  # once each; the output head never


def test_replay_goes_layer_by_layer_over_budget_and_matches(trained_run, monkeypatch):
    from pipeline.checkpoints.model_config import read_config
    from pipeline.cli import compose
    from pipeline.probe import build_probe

    c = Checkpoint(step=150, path=str(trained_run / "checkpoint-150"), complete=True)
    probe_ = build_probe(compose(["probe.rows=6", "probe.seq_len=40"]).probe, read_config(c))
    whole = replay(c, probe_, ReplaySettings(batch_size=4, max_device_memory=None))
    opened = []
    monkeypatch.setattr(layered.BlockStream, "__enter__", lambda self: opened.append(self) or self)
    streamed = replay(c, probe_, ReplaySettings(batch_size=4, max_device_memory="64KiB"))
    assert len(opened) == 1
    for name in whole.data_vars:
        np.testing.assert_allclose(streamed[name].values, whole[name].values, rtol=1e-6, atol=1e-7, err_msg=name)
    assert streamed.attrs == whole.attrs


def test_within_budget_the_whole_model_is_loaded(trained_run, monkeypatch):
    from pipeline.checkpoints.model_config import read_config
    from pipeline.cli import compose
    from pipeline.probe import build_probe

    c = Checkpoint(step=0, path=str(trained_run / "checkpoint-0"), complete=True)
    probe_ = build_probe(compose(["probe.rows=2", "probe.seq_len=16"]).probe, read_config(c))
    monkeypatch.setattr(layered, "open_layered", None)  # calling it would fail
    for budget in ("auto", "1GB", None):
        replay(c, probe_, ReplaySettings(max_device_memory=budget))


def test_budget_settings():
    assert device_budget(None, "cpu") is None
    assert device_budget("8GB", "cpu") == 8 * 10**9
    assert device_budget("512MiB", "cpu") == 512 * 2**20
    assert device_budget(123456, "cpu") == 123456
    assert device_budget("auto", "cpu") > 2**30
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError, match="replay.max_device_memory"):
            device_budget(bad, "cpu")


def test_bad_budget_is_a_usage_error(trained_run, tmp_path, capsys):
    from pipeline.cli import compose, run

    cfg = compose(
        [
            f"checkpoints.root={trained_run}",
            "checkpoints.quiet_seconds=0",
            f"store.path={tmp_path / 's.zarr'}",
            "stages=[replay]",
            "replay.max_device_memory=lots",
        ]
    )
    assert run(cfg) == 2
    assert "replay.max_device_memory='lots'" in capsys.readouterr().err


def test_missing_block_tensor_is_named(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lack 1 of the model's weights \(model.layers.1.mlp.up_proj.weight\)"):
        measure_layered(folder, np.ones((1, 8), dtype=np.int64))


def test_unexpected_and_misshapen_tensors_are_named(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"no place for \(model.layers.0.self_attn.q_proj.bias\)"):
        measure_layered(folder, np.ones((1, 8), dtype=np.int64))

    folder, _ = save_checkpoint(tmp_path / "d")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 48)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.down_proj.weight is \(32, 48\) in the file"):
        measure_layered(folder, np.ones((1, 8), dtype=np.int64))


def test_truncated_shard_is_named_before_anything_runs(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "c", sharded=True)
    last = shards(folder)[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{last.name} is not a valid safetensors file"):
        measure_layered(folder, np.ones((1, 8), dtype=np.int64))


def test_skeleton_patch_acts_only_in_its_own_thread():
    import threading

    built = {}
    with parameters_on_meta():
        built["here"] = torch.nn.Linear(2, 2)
        other = threading.Thread(target=lambda: built.setdefault("there", torch.nn.Linear(2, 2)))
        other.start()
        other.join()
    assert built["here"].weight.is_meta and not built["there"].weight.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and it is gone afterwards


@pytest.mark.slow
def test_cli_store_is_the_same_either_way(trained_run, tmp_path):
    import xarray as xr

    from pipeline.cli import run
    from tests.test_cli import group_name, replay_cfg

    stores = {}
    for budget in ("null", "64KiB"):
        stores[budget] = str(tmp_path / f"{budget}.zarr")
        assert run(replay_cfg(trained_run, stores[budget], f"replay.max_device_memory={budget}")) == 0
    whole, streamed = (xr.open_datatree(s, engine="zarr")[group_name(s)].to_dataset() for s in stores.values())
    assert list(streamed.status.values) == ["done"] * 4
    for name in whole.data_vars:
        np.testing.assert_allclose(streamed[name].values, whole[name].values, rtol=1e-6, atol=1e-7, err_msg=name)


def test_whole_model_out_of_memory_falls_back_to_layer_by_layer(trained_run, monkeypatch):
    import pipeline.replay.load as load_mod
    from pipeline.checkpoints.model_config import read_config
    from pipeline.cli import compose
    from pipeline.probe import build_probe

    c = Checkpoint(step=150, path=str(trained_run / "checkpoint-150"), complete=True)
    probe_ = build_probe(compose(["probe.rows=3", "probe.seq_len=24"]).probe, read_config(c))
    want = replay(c, probe_, ReplaySettings(max_device_memory=None))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(load_mod, "load_model", out_of_memory)
    got = replay(c, probe_, ReplaySettings(max_device_memory="1GB"))
    for name in want.data_vars:
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(torch.OutOfMemoryError):  # with no budget there is nothing to fall back within
        replay(c, probe_, ReplaySettings(max_device_memory=None))


@pytest.mark.slow
def test_tensors_transformers_drops_on_loading_are_no_error(tmp_path):
    model = build("gpt2")
    model.save_pretrained(tmp_path)
    ids = probe()
    want = measure_layered(tmp_path, ids)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32)  # an old GPT-2 export's causal-mask buffer
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_stats_close(measure_layered(tmp_path, ids), want, rtol=0, atol=0)


def test_blocks_beyond_the_config_are_an_error_before_any_block_runs(tmp_path, monkeypatch):
    folder, _ = save_checkpoint(tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    tensors |= {k.replace("layers.1.", "layers.2."): v.clone() for k, v in tensors.items() if ".layers.1." in k}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(layered.BlockStream, "run_rows", None)  # never reached
    with pytest.raises(CheckpointError, match=r"hold 9 tensors .* no place for \(model.layers.2."):
        measure_layered(folder, np.ones((1, 8), dtype=np.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu_both_ways_match_the_cpu(trained_run):
    from pipeline.checkpoints.model_config import read_config
    from pipeline.cli import compose
    from pipeline.probe import build_probe

    c = Checkpoint(step=150, path=str(trained_run / "checkpoint-150"), complete=True)
    probe_ = build_probe(compose(["probe.rows=6", "probe.seq_len=40"]).probe, read_config(c))
    cpu = replay(c, probe_, ReplaySettings(device="cpu", batch_size=4, max_device_memory=None))
    for budget in (None, 1):
        gpu = replay(c, probe_, ReplaySettings(device="cuda", dtype="float32", batch_size=4, max_device_memory=budget))
        for name in cpu.data_vars:
            np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-4, atol=1e-5, err_msg=name)
