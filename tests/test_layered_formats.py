"""Layer-by-layer replay of checkpoints read through a key map (DCP folders, torch.save files, safetensors with a
model_config): the same statistics and digest as the whole-model route, one block's tensors read at a time, the
optimizer's never, and each step recording the route it took."""

import gc
import re
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from pipeline.checkpoints import byteranges, keymaps
from pipeline.checkpoints.discover import discover
from pipeline.checkpoints.statedict import Saved, hf_config
from pipeline.cli import compose
from pipeline.errors import CheckpointError
from pipeline.probe import build_probe
from pipeline.replay import ReplaySettings, layered, replay, step
from tests import trainer_ckpts as tc
from tests.ckpt_factory import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

WHOLE = ReplaySettings(device="cpu", dtype="float32", batch_size=2, max_device_memory=None)
LAYERED = replace(WHOLE, max_device_memory="1KiB")  # every model is larger: block by block


def found(root, model=None, tmp_path=None, **how):
    """The one checkpoint discovery finds under `root`; with `model`, its config given as checkpoints.model_config."""
    [c] = discover(str(root), quiet_seconds=0)
    if model is not None:
        model.config.to_json_file(tmp_path / "config.json")
        how["model_config"] = str(tmp_path / "config.json")
    return replace(c, **how)


def write(fmt: str, tmp_path, monkeypatch, layers: int = 2):
    """A checkpoint of format `fmt` as its trainer writes it (tests/trainer_ckpts.py), found by discovery."""
    run = tmp_path / "run"
    llama = tiny_model(seed=3, num_hidden_layers=layers)
    if fmt == "torchtitan":
        tc.torchtitan_step(run, 100, llama)
        return found(run, llama, tmp_path)
    if fmt == "megatron-stacked":
        tc.megatron_iteration(run, 500, llama)
        return found(run, llama, tmp_path, key_map="megatron_gpt")
    if fmt == "megatron-per-layer":
        tc.megatron_iteration(run, 500, llama, per_layer=True)
        return found(run, llama, tmp_path)
    if fmt == "fsdp-trainer":
        tc.fsdp_trainer_checkpoint(run, 30, llama, final_save=True)
        return found(run)
    if fmt == "dcp-safetensors":
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            writer = FileSystemWriter(str(run / "step-7"), serialization_format=SerializationFormat.SAFETENSORS)
            dcp.save(tc.torchtitan_names(llama), storage_writer=writer)
        return found(run, llama, tmp_path)
    if fmt == "hf-with-model-config":  # safetensors read through the `none` map, the config given
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tc.hf_state(llama), storage_writer=HuggingFaceStorageWriter(str(run / "step-3")))
        llama.config.to_json_file(tmp_path / "config.json")
        [c] = discover(str(run), quiet_seconds=0, format="hf", model_config=str(tmp_path / "config.json"))
        return c
    if fmt.startswith("nanogpt"):
        bias = fmt == "nanogpt"
        tc.nanogpt_checkpoint(run, tc.gpt2(seed=8, bias=bias), 2000, bias=bias)
        return found(run)
    if fmt == "nanochat":
        tc.nanochat_checkpoint(run, 500, tc.nanochat_model(seed=9))
        return found(run)
    if fmt == "litgpt":
        tc.litgpt_step(run, 1000, llama)
        return found(run)
    if fmt == "tinyllama":
        tc.tinyllama_iteration(run, 20000, llama)
        return found(run, llama, tmp_path)
    if fmt == "olmo-core":
        root, _ = tc.olmo_run(run, [10])
        return found(root)
    raise ValueError(fmt)


FORMATS = [
    "torchtitan",
    "megatron-stacked",
    "megatron-per-layer",
    "fsdp-trainer",
    "dcp-safetensors",
    "hf-with-model-config",
    "nanogpt",
    "nanogpt-without-biases",  # the biases the key map's `complete` adds fall in every block
    "nanochat",
    "litgpt",
    "tinyllama",
    "olmo-core",
]


def probe_for(c):
    return build_probe(compose(["probe.rows=3", "probe.seq_len=16"]).probe, hf_config(c))


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_by_layer_equals_whole_model(fmt, tmp_path, monkeypatch):
    c = write(fmt, tmp_path, monkeypatch)
    probe = probe_for(c)
    whole = replay(c, probe, WHOLE)
    streamed = replay(c, probe, LAYERED)
    assert set(streamed.data_vars) == set(whole.data_vars) and "attn_out_norm" in whole.data_vars
    for name in whole.data_vars:
        np.testing.assert_allclose(streamed[name].values, whole[name].values, rtol=1e-6, atol=1e-6, err_msg=name)
    digest = str(whole.weights_digest.values)
    assert len(digest) == 64 and str(streamed.weights_digest.values) == digest
    for ds, route in ((whole, "whole"), (streamed, "layered")):
        replayed = [str(ds[k].values) for k in ("replay_route", "replay_device", "replay_dtype")]
        assert replayed == [route, "cpu", "float32"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc.get_objects() meets torch's deprecated aliases
@pytest.mark.parametrize("fmt", ["torchtitan", "megatron-stacked", "litgpt"])
def test_one_block_read_at_a_time_and_never_the_optimizer(fmt, tmp_path, monkeypatch):
    c = write(fmt, tmp_path, monkeypatch, layers=4)
    probe = probe_for(c)
    asked, ranges, resident, alive = [], [], [], []
    tensors, read_files = Saved.tensors, byteranges.read_files
    run_rows, load = layered.BlockStream.run_rows, layered.SavedBlockStream._load

    def asking(self, names=None):
        asked.append(names)
        return tensors(self, names)

    def reading(spans, *args):
        ranges.extend((f, r) for f, rs in spans.items() for r in rs)
        return read_files(spans, *args)

    def real_tensors(shape):  # with data of their own: not views, nor the fused tensor that split ones are views of
        real = [o for o in gc.get_objects() if torch.is_tensor(o) and not o.is_meta]
        bases = {id(o._base) for o in real if o._base is not None}
        return sum(
            1
            for o in real
            if o.shape == shape and id(o) not in bases and o.untyped_storage().nbytes() == o.numel() * o.element_size()
        )

    def watching(self, body, batches, *args):
        blocks = list(self.blocks)
        self.watched = (blocks[0].mlp.up_proj.weight.shape, real_tensors(blocks[0].mlp.up_proj.weight.shape))

        def count(module, args):
            resident.append(sum(not next(b.parameters()).is_meta for b in blocks))

        hooks = [b.register_forward_pre_hook(count) for b in blocks]
        try:
            return run_rows(self, body, batches, *args)
        finally:
            for h in hooks:
                h.remove()

    def loading(self, index, part):  # no read in flight here: the next block's starts after this one is loaded
        if index is not None:
            shape, before = self.watched
            alive.append(real_tensors(shape) - before)
        return load(self, index, part)

    monkeypatch.setattr(Saved, "tensors", asking)
    monkeypatch.setattr(byteranges, "read_files", reading)
    monkeypatch.setattr(layered.BlockStream, "run_rows", watching)
    monkeypatch.setattr(layered.SavedBlockStream, "_load", loading)
    ds = replay(c, probe, LAYERED)
    assert str(ds.replay_route.values) == "layered"
    assert resident == [1] * (4 * 2)  # 4 blocks x 2 micro-batches (2 + 1 rows), one block holding weights each time
    assert alive == [2] * 4  # the block being loaded (gate_proj and up_proj): those of the blocks done are freed
    # the part outside the blocks (the head with it, for the digest), then each block's own checkpoint tensors
    assert len(asked) == 1 + 4 and None not in asked
    assert set().union(*asked) == set(Saved(c).tensor_names())
    for i, names in enumerate(asked[1:]):
        layers = {int(m.group(1)) for n in names if (m := re.search(r"(?:layers|h)\.(\d+)\.", n))}
        stacked = [n for n in names if n.startswith("decoder.layers.") and not re.match(r"decoder\.layers\.\d", n)]
        assert layers == ({i} if not stacked else set()), names
    assert not set(asked[0]) & set().union(*asked[1:]) or fmt == "megatron-stacked"
    assert ranges
    if c.format == "dcp":  # never a byte of the optimizer's entries
        optimizer = optimizer_spans(c)
        assert optimizer and not [r for r in ranges if any(overlaps(r, o) for o in optimizer)]


def overlaps(a, b) -> bool:
    (f, (x, y)), (g, (u, v)) = a, b
    return f == g and x < v and u < y


def optimizer_spans(c) -> list:
    """(file, [start, stop)) of every entry of a DCP folder that is not the model's."""
    from pipeline.checkpoints.formats.dcp import _model_entries, read_metadata

    metadata = read_metadata(c.weight_files[0])
    model = {entry for entry, _ in _model_entries(metadata).values()}
    return [
        (f"{c.weight_files[0]}/{info.relative_path}", (info.offset, info.offset + info.length))
        for index, info in metadata.storage_data.items()
        if index.fqn not in model
    ]


def test_out_of_memory_with_the_whole_model_falls_back_to_layer_by_layer(tmp_path, monkeypatch):
    c = write("nanochat", tmp_path, monkeypatch)
    probe = probe_for(c)
    whole = replay(c, probe, WHOLE)

    def short_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(step, "_replay_whole", short_of_memory)
    streamed = replay(c, probe, replace(WHOLE, max_device_memory="1TB"))
    assert str(streamed.replay_route.values) == "layered"
    np.testing.assert_allclose(streamed.sink_mass.values, whole.sink_mass.values, rtol=1e-6, atol=1e-6)


def test_a_plan_names_what_apply_makes_and_a_subset_is_that_part_of_it():
    model = tiny_model(seed=4, num_hidden_layers=3)
    names = tc.megatron_names(model)  # block tensors stacked over layers: one source feeds every block
    specs = {k: (tuple(t.shape), t.dtype) for k, t in names.items()}
    plan = keymaps.plan("megatron_gpt", specs, model.config, "ckpt")
    whole = keymaps.apply("megatron_gpt", names, model.config, "ckpt")
    assert {k: (tuple(t.shape), t.dtype) for k, t in plan.outputs.items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in whole.items()
    }
    assert all(t.is_meta for t in plan.outputs.values())
    assert set(whole) == set(model.state_dict())
    for i in range(3):
        targets = [k for k in whole if k.startswith(f"model.layers.{i}.")]
        sources = plan.feeding(targets)
        assert "decoder.layers.mlp.linear_fc1.weight" in sources and "output_layer.weight" not in sources
        part = plan.subset({k: names[k] for k in sources}, targets)
        assert set(part) == set(targets)
        for k, t in part.items():
            assert torch.equal(t, whole[k]), k
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k  # not a view of the stack


def test_a_plan_raises_what_apply_raises():
    model = tiny_model(seed=4)
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tc.torchtitan_names(model).items()}
    with pytest.raises(CheckpointError, match=r"leaves 1 tensors unused \(bogus\)"):
        keymaps.plan("torchtitan_llama", specs | {"bogus": ((2,), torch.float32)}, model.config, "ckpt")
    with pytest.raises(CheckpointError, match="two tensors become lm_head.weight"):
        keymaps.plan("torchtitan_llama", specs | {"lm_head.weight": specs["output.weight"]}, model.config, "ckpt")


def test_a_misshapen_tensor_is_named_before_any_block_runs(tmp_path, monkeypatch):
    c = write("torchtitan", tmp_path, monkeypatch)
    other = tiny_model(seed=3, intermediate_size=48)
    other.config.to_json_file(tmp_path / "config.json")  # the config says 48 where the checkpoint holds 64
    monkeypatch.setattr(layered.BlockStream, "run_rows", None)  # running a block would fail otherwise
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight is \(64, 32\) in the checkpoint but \(48, 32\)"):
        replay(c, probe_for(c), LAYERED)


def test_the_store_records_each_steps_route(tmp_path):
    """The command, on a nanoGPT run: under a budget the steps go layer by layer, and the store says so."""
    import xarray as xr

    from pipeline.cli import run

    tc.nanogpt_series(tmp_path / "out", [100, 200], "ckpt_{}.pt")
    settings = ["checkpoints.format=torch", "checkpoints.key_map=nanogpt", "checkpoints.quiet_seconds=0"]
    settings += ["stages=[replay]", "probe.rows=3", "probe.seq_len=16", "replay.device=cpu", "replay.dtype=float32"]
    stores = {}
    for budget in ("null", "1KiB"):
        stores[budget] = tmp_path / f"{budget}.zarr"
        cfg = [f"checkpoints.root={tmp_path / 'out'}", f"store.path={stores[budget]}", *settings]
        assert run(compose([*cfg, f"replay.max_device_memory={budget}"])) == 0
    whole, streamed = (next(iter(xr.open_datatree(s, engine="zarr").children.values())).ds for s in stores.values())
    assert whole.replay_route.values.tolist() == ["whole"] * 2 and whole.replay_device.values.tolist() == ["cpu"] * 2
    assert streamed.replay_route.values.tolist() == ["layered"] * 2
    assert streamed.replay_dtype.values.tolist() == ["float32"] * 2
    assert streamed.weights_digest.values.tolist() == whole.weights_digest.values.tolist()
    np.testing.assert_allclose(streamed.sink_mass.values, whole.sink_mass.values, rtol=1e-6, atol=1e-6)


def test_the_peak_memory_benchmark_replays_its_checkpoints_both_ways(tmp_path):
    """benchmarks/peak_memory.py at a tiny size, in this process: its DCP and safetensors checkpoints replay to the
    same statistics by either route (the figures themselves are the benchmark's, never a test's)."""
    from benchmarks.peak_memory import ROUTES, replay_once, write_checkpoints

    records = write_checkpoints(tmp_path, layers=2, width=64)
    got = {(fmt, route): replay_once(record, ROUTES[route]) for fmt, record in records.items() for route in ROUTES}
    assert [r["route"] for r in got.values()] == ["whole", "layered"] * 2
    means = [r["sink_mass_mean"] for r in got.values()]
    np.testing.assert_allclose(means, means[0], rtol=1e-6)
    assert all(
        r["peak_mib"] >= r["before_mib"] > 0 and r["anon_peak_mib"] >= r["anon_before_mib"] for r in got.values()
    )


def test_a_truncated_dcp_data_file_is_named(tmp_path, monkeypatch):
    c = write("torchtitan", tmp_path, monkeypatch)
    [data] = (tmp_path / "run" / "step-100").glob("*.distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 6])  # the model entries come first, then the optimizer
    with pytest.raises(CheckpointError, match=rf"{data.name} is truncated"):
        replay(c, probe_for(c), LAYERED)
