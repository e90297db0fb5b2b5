"""DCP folders and torch.save files read from object storage (moto's S3 server on 127.0.0.1, tests/s3server.py) by
byte ranges: each trainer's layout (tests/trainer_ckpts.py) is discovered in the bucket and replays as its local copy
does, whole and layer by layer, with the same weights digest, reading the model's bytes and never the optimizer's."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import byteranges
from pipeline.checkpoints.discover import discover
from pipeline.checkpoints.formats.dcp import _model_entries, read_metadata
from pipeline.checkpoints.opened import open_checkpoint
from pipeline.checkpoints.safetensorsfile import SafetensorsFile
from pipeline.checkpoints.statedict import Saved
from pipeline.errors import CheckpointError
from pipeline.replay.layered import open_layered
from pipeline.replay.load import load_model
from pipeline.replay.measure import measure
from tests import trainer_ckpts as tc
from tests.s3server import s3_fixture

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

BUCKET = "sinktrace-remote-formats"
s3 = s3_fixture(BUCKET)


@pytest.fixture
def asked(monkeypatch):
    """Every (file, [start, stop)) handed to the byte-range reader."""
    out, read_files = [], byteranges.read_files

    def spy(ranges, plan=byteranges.ReadPlan()):
        out.extend((f, r) for f, rs in ranges.items() for r in rs)
        return read_files(ranges, plan)

    monkeypatch.setattr(byteranges, "read_files", spy)
    return out


def upload(s3, root: Path, name: str) -> str:
    s3.put(str(root), f"{BUCKET}/{name}", recursive=True)
    return f"s3://{BUCKET}/{name}"


def found(root) -> list:
    return discover(str(root), quiet_seconds=0)


def assert_same_replay(local, remote, vocab: int, **how):
    """The two checkpoints replay to the same statistics (float32, within 1e-6) and the same weights digest: the
    remote one whole and layer by layer, against the local one whole."""
    ids = np.random.default_rng(1).integers(0, vocab - 1, size=(3, 24))
    ids[:, 0] = 5
    opened = [open_checkpoint(replace(c, **how)) for c in (local, remote, remote)]
    a = load_model(opened[0], device="cpu", dtype="float32")
    b = load_model(opened[1], device="cpu", dtype="float32")
    want, got = measure(a, ids, measures=()), measure(b, ids, measures=())
    with open_layered(opened[2], device="cpu", dtype="float32") as (c, run_rows):
        layered = measure(c, ids, run_rows=run_rows, measures=())
        layered_digest = opened[2].digest.result()
    for stats in (got, layered):
        assert set(stats) == set(want)
        for name in want:
            np.testing.assert_allclose(stats[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert opened[0].digest.result() == opened[1].digest.result() == layered_digest is not None


def dcp_spans(folder: Path, url: str) -> tuple[set, set, set]:
    """({(data file URL, [start, stop))} of the model's chunks, the same of every other entry's, and of the
    safetensors flavour's headers), from `.metadata` and, for the safetensors flavour, each data file's header."""
    metadata = read_metadata(str(folder))
    model = {entry for entry, _ in _model_entries(metadata).values()}
    spans: tuple[set, set, set] = (set(), set(), set())
    for index, info in metadata.storage_data.items():
        path, file = folder / info.relative_path, f"{url}/{info.relative_path}"
        if path.read_bytes()[8:9] == b"{":
            header = SafetensorsFile(str(path))
            span = header.spans()[index.fqn]
            spans[2].add((file, (0, header.data_start)))
        else:
            span = (info.offset, info.offset + info.length)
        spans[index.fqn not in model].add((file, span))
    return spans


def torch_spans(path: Path, url: str, model_key: str | None) -> tuple[set, set]:
    """The same for a torch.save file: each tensor's storage record, the model's (under `model_key`, or the whole
    file) and the rest."""
    obj = torch.load(path, map_location="meta", weights_only=True)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)

    model = {storage_span(t, url) for t in tensors(obj[model_key] if model_key else obj)}
    rest = {storage_span(t, url) for k, v in obj.items() if k != model_key for t in tensors(v)} - model
    return model, rest


def assert_reads_only(asked, model: set, other: set, headers: set = frozenset(), under: str = "s3://"):
    """Every model span was read; every range read from files `under` (the bucket: not the local replay's) lies
    inside one (or inside a file's header), and none touches another."""
    asked = [(f, r) for f, r in asked if f.startswith(under)]
    assert model <= set(asked)
    for f, (a, b) in asked:
        assert any(f == g and c <= a and b <= d for g, (c, d) in model | headers), (f, a, b)
        assert not any(f == g and a < d and c < b for g, (c, d) in other), (f, a, b)


# ------------------------------------------------------------------------------------------ DCP


def test_torchtitan_from_s3(s3, tmp_path, asked):
    model = tc.llama(seed=1)
    folder = tc.torchtitan_step(tmp_path / "run", 100, model)
    url = upload(s3, tmp_path / "run", "titan")
    [local], [remote] = found(tmp_path / "run"), found(url)
    assert (remote.step, remote.format, remote.complete) == (100, "dcp", True)
    model.config.to_json_file(tmp_path / "config.json")
    assert_same_replay(local, remote, 101, model_config=str(tmp_path / "config.json"))
    assert_reads_only(asked, *dcp_spans(folder, f"{url}/step-100"))


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per-layer"])
def test_megatron_from_s3(s3, tmp_path, asked, per_layer):
    model = tc.llama(seed=2)
    folder = tc.megatron_iteration(tmp_path / "run", 500, model, per_layer=per_layer)
    url = upload(s3, tmp_path / "run", f"megatron-{per_layer}")
    [local], [remote] = found(tmp_path / "run"), found(url)
    assert (remote.step, remote.format, remote.complete) == (500, "dcp", True)
    model.config.to_json_file(tmp_path / "config.json")
    assert_same_replay(local, remote, 101, model_config=str(tmp_path / "config.json"), key_map="megatron_gpt")
    assert_reads_only(asked, *dcp_spans(folder, f"{url}/iter_0000500"))


def test_fsdp_trainer_from_s3(s3, tmp_path, asked):
    """The config comes from the config.json in the bucket; the optimizer's DCP folder beside the model's is never
    read."""
    model = tc.llama(seed=3)
    folder = tc.fsdp_trainer_checkpoint(tmp_path / "run", 30, model, final_save=True)
    url = upload(s3, tmp_path / "run", "fsdp")
    [local], [remote] = found(tmp_path / "run"), found(url)
    assert (remote.step, remote.format, remote.step_source) == (30, "dcp", "trainer_state.json")
    assert_same_replay(local, remote, 101)
    model_spans, _, _ = dcp_spans(folder / "pytorch_model_fsdp_0", f"{url}/checkpoint-30/pytorch_model_fsdp_0")
    assert_reads_only(asked, model_spans, set())
    assert not any("optimizer_0" in f for f, _ in asked)


def test_dcp_safetensors_flavour_from_s3(s3, tmp_path, asked):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    model = tc.llama(seed=4)
    folder = tmp_path / "run" / "step-7"
    names = tc.torchtitan_names(model)
    tc._dcp_save(
        {**names, "optimizer": tc._adam_state(names)},
        folder,
        storage_writer=FileSystemWriter(str(folder), serialization_format=SerializationFormat.SAFETENSORS),
    )
    url = upload(s3, tmp_path / "run", "titan-safetensors")
    [local], [remote] = found(tmp_path / "run"), found(url)
    model.config.to_json_file(tmp_path / "config.json")
    assert_same_replay(local, remote, 101, model_config=str(tmp_path / "config.json"))
    assert_reads_only(asked, *dcp_spans(folder, f"{url}/step-7"))


def test_olmo_core_from_s3(s3, tmp_path, asked):
    """Written by OLMo-core itself (model and optimizer in one DCP); its config.json is read from the bucket."""
    root, references = tc.olmo_run(tmp_path / "run", [10])
    url = upload(s3, root, "olmo")
    [local], [remote] = found(root), found(url)
    assert (remote.step, remote.format) == (10, "dcp")
    assert_same_replay(local, remote, 101)
    assert_reads_only(asked, *dcp_spans(root / "step10" / "model_and_optim", f"{url}/step10/model_and_optim"))


def test_a_missing_or_truncated_distcp_on_s3_is_named(s3, tmp_path):
    model = tc.llama()
    folder = tc.torchtitan_step(tmp_path / "run", 1, model)
    model.config.to_json_file(tmp_path / "config.json")
    config = str(tmp_path / "config.json")
    url = upload(s3, tmp_path / "run", "titan-broken")
    data = f"{url}/step-1/__0_0.distcp"
    s3.pipe(data.removeprefix("s3://"), (folder / "__0_0.distcp").read_bytes()[:1000])
    [c] = found(url)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is truncated") as err:
        load_model(replace(c, model_config=config))
    assert err.value.path == data
    s3.rm(data.removeprefix("s3://"))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp listed in \.metadata is missing") as err:
        load_model(replace(c, model_config=config))
    assert err.value.path == data


# ------------------------------------------------------------------------------------------ torch.save


def test_nanogpt_from_s3(s3, tmp_path, asked):
    """The step (iter_num) and the config (model_args) come from the pickle alone; the optimizer state in the same
    file is never read."""
    model = tc.gpt2(seed=8)
    path = tc.nanogpt_checkpoint(tmp_path / "out", model, 2000)
    url = upload(s3, tmp_path / "out", "nanogpt")
    [local], [remote] = found(tmp_path / "out"), found(url)
    assert (remote.step, remote.format, remote.step_source) == (2000, "torch", "iter_num field")
    asked.clear()  # what discovery read is no part of the replay
    assert_same_replay(local, remote, model.config.vocab_size)
    assert_reads_only(asked, *torch_spans(path, f"{url}/ckpt.pt", "model"))


def test_nanochat_from_s3(s3, tmp_path, asked):
    """The config comes from meta_<step>.json in the bucket; the optimizer's file beside the model's is never read."""
    model = tc.nanochat_model(seed=9)
    path = tc.nanochat_checkpoint(tmp_path / "d2", 500, model)
    url = upload(s3, tmp_path / "d2", "nanochat")
    [local], [remote] = found(tmp_path / "d2"), found(url)
    assert (remote.step, remote.format) == (500, "torch")
    assert_same_replay(local, remote, model.config.vocab_size)
    assert_reads_only(asked, *torch_spans(path, f"{url}/{path.name}", None))
    assert not any("optim_" in f for f, _ in asked)


def test_litgpt_from_s3(s3, tmp_path, asked):
    model = tc.llama(seed=11)
    folder = tc.litgpt_step(tmp_path / "out", 1000, model)
    url = upload(s3, tmp_path / "out", "litgpt")
    [local], [remote] = found(tmp_path / "out"), found(url)
    assert (remote.step, remote.format) == (1000, "torch")
    assert_same_replay(local, remote, 101)  # the config from model_config.yaml in the bucket
    model_spans, _ = torch_spans(folder / "lit_model.pth", f"{url}/step-00001000/lit_model.pth", "model")
    assert_reads_only(asked, model_spans, set())


def test_a_legacy_torch_file_on_s3_is_refused_in_one_line(s3, tmp_path):
    model = tc.nanochat_model()
    path = tc.nanochat_checkpoint(tmp_path / "d2", 500, model)
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    url = upload(s3, tmp_path / "d2", "legacy")
    [local], [remote] = found(tmp_path / "d2"), found(url)
    load_model(local)  # read whole from the local disk
    with pytest.raises(CheckpointError, match=r"legacy \(pre-zip\) format, which is read from a local disk only"):
        load_model(remote)


# ------------------------------------------------------------------------------------------ a subset at a time


@pytest.mark.parametrize("where", ["local", "s3"])
def test_saved_tensors_reads_only_the_names_asked(s3, tmp_path, asked, where):
    path = tc.nanogpt_checkpoint(tmp_path / "out", tc.gpt2(seed=12), 10)
    titan = tc.torchtitan_names(tc.llama(seed=12))
    folder = tc.torchtitan_step(tmp_path / "run", 1, tc.llama(seed=12))
    roots = [tmp_path / "out", tmp_path / "run"]
    if where == "s3":
        roots = [upload(s3, root, f"subset/{root.name}") for root in roots]
    [nanogpt], [titan_step] = found(roots[0]), found(roots[1])

    saved = Saved(nanogpt)
    names = ["_orig_mod.transformer.h.1.attn.c_attn.weight", "_orig_mod.transformer.wte.weight"]
    whole = torch.load(path, weights_only=True)["model"]
    assert saved.specs() == {name: (tuple(t.shape), t.dtype) for name, t in whole.items()}
    asked.clear()
    got = saved.tensors(names)
    assert list(got) == names and all(torch.equal(got[n], whole[n]) for n in names)
    meta = torch.load(path, map_location="meta", weights_only=True)["model"]
    assert sorted(asked) == sorted(storage_span(meta[n], nanogpt.weight_files[0]) for n in names)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt holds no model tensor nope"):
        saved.tensors(["nope"])

    saved = Saved(titan_step)
    names = ["layers.0.attention.wq.weight", "norm.weight"]
    assert saved.specs() == {name: (tuple(t.shape), t.dtype) for name, t in titan.items()}
    asked.clear()
    got = saved.tensors(names)
    assert list(got) == names and all(torch.equal(got[n], titan[n]) for n in names)
    model, other, _ = dcp_spans(folder, titan_step.weight_files[0])
    chunks = {span for span in model if any(span in dcp_spans_of(folder, titan_step, n) for n in names)}
    assert_reads_only(asked, chunks, other | (model - chunks), under="")
    with pytest.raises(CheckpointError, match=r"\.metadata lists no model tensor nope"):
        saved.tensors(["nope"])


def storage_span(t: torch.Tensor, url: str) -> tuple:
    s = t.untyped_storage()
    return (url, (s._checkpoint_offset, s._checkpoint_offset + s.nbytes()))


def dcp_spans_of(folder: Path, ckpt, name: str) -> set:
    return {
        (f"{ckpt.weight_files[0]}/{info.relative_path}", (info.offset, info.offset + info.length))
        for index, info in read_metadata(str(folder)).storage_data.items()
        if index.fqn == name
    }


# ------------------------------------------------------------------------------------------ through the command


@pytest.mark.slow
def test_a_run_from_s3_stores_what_the_local_run_stores(s3, tmp_path, capsys):
    """Two torchtitan steps, the bucket's copy of step 1 cut short: that step fails naming its data file, and step 2
    is stored as the local run stores it, the same weights digest included."""
    import pipeline
    from pipeline.cli import compose, run

    root = tmp_path / "run"
    good = tc.torchtitan_step(root, 1, tc.llama(seed=1))
    tc.torchtitan_step(root, 2, tc.llama(seed=2))
    tc.llama().config.to_json_file(tmp_path / "config.json")
    url = upload(s3, root, "titan-run")
    data = f"{url}/step-1/__0_0.distcp"
    s3.pipe(data.removeprefix("s3://"), (good / "__0_0.distcp").read_bytes()[:5000])

    def replay(at, store):
        args = [f"checkpoints.root={at}", "checkpoints.quiet_seconds=0", f"store.path={store}", "stages=[replay]"]
        code = run(compose([*args, f"checkpoints.model_config={tmp_path / 'config.json'}", "probe.rows=4"]))
        (group,) = pipeline.open_sinks(store).children
        return code, pipeline.open_sinks(store, group)

    code, want = replay(root, tmp_path / "local.zarr")
    assert code == 0 and list(want.status.values) == ["done", "done"]
    code, got = replay(url, tmp_path / "remote.zarr")
    assert code == 1 and list(got.status.values) == ["failed", "done"]
    error = got.error.sel(step=1).item()
    assert data in error and "truncated" in error
    assert data in capsys.readouterr().err
    assert got.weights_digest.sel(step=2).item() == want.weights_digest.sel(step=2).item() != ""
    for name in ("sink_mass", "entropy", "key_mass"):
        np.testing.assert_allclose(got[name].sel(step=2), want[name].sel(step=2), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ refused


def test_a_dcp_entry_stored_with_transforms_is_refused_naming_its_file(tmp_path):
    import pickle

    model = tc.llama()
    folder = tc.torchtitan_step(tmp_path / "run", 1, model)
    metadata = read_metadata(str(folder))
    for info in metadata.storage_data.values():
        info.transform_descriptors = ["zstd"]
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    model.config.to_json_file(tmp_path / "config.json")
    [c] = found(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"stored transformed \(zstd\)") as err:
        load_model(replace(c, model_config=str(tmp_path / "config.json")))
    assert err.value.path == str(folder / "__0_0.distcp")


def test_a_torch_file_saved_big_endian_is_refused_naming_it(tmp_path, monkeypatch):
    """torch records the saving machine's byte order; its meta-device load cannot swap the bytes (it crashes)."""
    import sys
    import types

    path = tc.nanochat_checkpoint(tmp_path / "d2", 500, tc.nanochat_model())
    state = torch.load(path, weights_only=True)
    with monkeypatch.context() as m:  # torch.save writes sys.byteorder: what a big-endian machine writes
        m.setattr(torch.serialization, "sys", types.SimpleNamespace(**{**vars(sys), "byteorder": "big"}))
        torch.save(state, path)
    [c] = found(tmp_path / "d2")
    with pytest.raises(CheckpointError, match=r"model_000500\.pt was saved on a big-endian machine") as err:
        load_model(c)
    assert err.value.path == str(path)


def test_safetensors_read_through_a_model_config_from_s3(s3, tmp_path, monkeypatch):
    """A Hugging Face folder read through `checkpoints.model_config` (the state-dict route) replays from the bucket
    as locally, and the file's tensors are asked for at once (merged requests in flight), not one call per tensor."""
    from tests.ckpt_factory import save_checkpoint

    folder, saved = save_checkpoint(tmp_path / "run" / "checkpoint-100", step=100)
    url = upload(s3, tmp_path / "run", "hf-mapped")
    [local], [remote] = found(tmp_path / "run"), found(url)
    how = {"model_config": str(folder / "config.json")}
    assert_same_replay(local, remote, 101, **how)
    calls, read_files = [], byteranges.read_files

    def spy(ranges, plan=byteranges.ReadPlan()):
        calls.append({f: len(r) for f, r in ranges.items()})
        return read_files(ranges, plan)

    monkeypatch.setattr(byteranges, "read_files", spy)
    tensors = Saved(replace(remote, **how)).tensors()
    assert set(tensors) == set(saved) and all(torch.equal(tensors[k], saved[k]) for k in saved)
    assert calls == [{f"{url}/checkpoint-100/model.safetensors": len(saved)}]
