import json
import os
import pickle
import sys
import time

import fsspec
import pytest
import torch
from ckpt_factory import (
    break_config,
    edit_config,
    garbage_header,
    make_remote_code,
    save_checkpoint,
    save_pickled_only,
    shards,
    truncate,
)
from safetensors.torch import load_file, save_file

from pipeline.checkpoints.model_config import config_fingerprint, read_config
from pipeline.checkpoints.weightfiles import validate_weights
from pipeline.errors import CheckpointError
from pipeline.records import Checkpoint
from pipeline.replay.load import ModelCache, load_model


def ckpt(folder, step=0) -> Checkpoint:
    return Checkpoint(step=step, path=str(folder), complete=True)


def load(folder, **kwargs):
    return load_model(ckpt(folder), attn_implementation=kwargs.pop("attn_implementation", "eager"), **kwargs)


def assert_same_weights(model, saved, dtype):
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(saved)
    for name, tensor in saved.items():
        assert loaded[name].dtype == dtype, name
        assert torch.equal(loaded[name], tensor.to(dtype)), name


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_weights_round_trip(tmp_path, sharded, dtype, tie):
    folder, saved = save_checkpoint(tmp_path / "step1", dtype=dtype, sharded=sharded, tie=tie)
    assert (len(shards(folder)) > 1) if sharded else (folder / "model.safetensors").exists()
    model = load(folder)  # auto on the CPU: float32, the saved values exactly (every format widens exactly)
    assert_same_weights(model, saved, torch.float32)
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tie

    native = load(folder, dtype=dtype)
    assert_same_weights(native, saved, dtype)


def test_single_file(tmp_path):
    folder, saved = save_checkpoint(tmp_path / "step1", dtype=torch.bfloat16)
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "trainer_state.json",
    ]
    assert_same_weights(load(folder, dtype="bfloat16"), saved, torch.bfloat16)


@pytest.mark.parametrize(
    "name, dtype",
    [("float16", torch.float16), ("fp16", torch.float16), ("bf16", torch.bfloat16), (torch.float32, torch.float32)],
)
def test_explicit_dtype_is_honoured(tmp_path, name, dtype):
    folder, saved = save_checkpoint(tmp_path / "step1")
    assert_same_weights(load(folder, dtype=name), saved, dtype)


def test_bad_dtype(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    for bad in ["int8", "float8", torch.int64]:
        with pytest.raises(ValueError, match="dtype"):
            load(folder, dtype=bad)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_auto_dtype_on_an_accelerator_is_the_checkpoints_own(tmp_path, monkeypatch, stored):
    from pipeline.replay import load as mod

    folder, _ = save_checkpoint(tmp_path / "step1", dtype=stored, sharded=True)
    seen = {}
    monkeypatch.setattr(
        mod, "_from_pretrained", lambda folder, device, dtype, *a: seen.update(dtype=dtype) or torch.nn.Module()
    )
    load_model(ckpt(folder), device="cuda", attn_implementation="eager")
    assert seen["dtype"] == stored
    load_model(ckpt(folder), device="cpu", attn_implementation="eager")
    assert seen["dtype"] == torch.float32


def test_training_files_are_never_unpickled(tmp_path, no_unpickling):
    folder, saved = save_checkpoint(tmp_path / "checkpoint-3", step=3, training_files=True)
    assert_same_weights(load(folder), saved, torch.float32)


def test_sinkstats_is_the_default_attention(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    model = load_model(ckpt(folder))
    assert model.config._attn_implementation == "sinkstats"


def test_fsspec_checkpoint(tmp_path):
    folder, saved = save_checkpoint(tmp_path / "step1", sharded=True, training_files=True)
    fs = fsspec.filesystem("memory")
    base = f"/sinktrace-load-{os.getpid()}-{time.time_ns()}"
    try:
        fs.put(str(folder), base, recursive=True)
        url = f"memory://{base}"
        assert read_config(Checkpoint(0, url)) == read_config(ckpt(folder))
        assert_same_weights(load_model(Checkpoint(0, url), attn_implementation="eager"), saved, torch.float32)
        with pytest.raises(CheckpointError, match="does not exist"):
            load_model(Checkpoint(0, url + "-nope"))
        fs.pipe(f"{base}/model-00002-of-00004.safetensors", b"short")
        with pytest.raises(CheckpointError) as err:
            load_model(Checkpoint(0, url))
        check_error(err, f"{url}/model-00002-of-00004.safetensors", "is not a valid safetensors file")
    finally:
        fs.rm(base, recursive=True)


# ------------------------------------------------------------------------------------------ bad weights


def check_error(err, path, *fragments):
    assert err.value.path == str(path)
    for fragment in fragments:
        assert fragment in err.value.problem, (fragment, err.value.problem)
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_weights(tmp_path, sharded):
    folder, _ = save_checkpoint(tmp_path / "step1", sharded=sharded)
    bad = shards(folder)[1] if sharded else folder / "model.safetensors"
    truncate(bad)
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(
        err,
        bad,
        f"{bad.name} is not a valid safetensors file",
        "incomplete metadata, file not fully covered",
        "truncated",
    )


@pytest.mark.parametrize(
    "keep, says", [(0, "header too small"), (5, "header too small"), (60, "invalid header length")]
)
def test_header_cut_short(tmp_path, keep, says):
    folder, _ = save_checkpoint(tmp_path / "step1")
    bad = truncate(folder / "model.safetensors", keep=keep)
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, bad, says)


def test_garbage_header(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1", sharded=True)
    bad = garbage_header(shards(folder)[0])
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, bad, f"{bad.name} is not a valid safetensors file", "Error while deserializing header")


def test_missing_shard(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1", sharded=True)
    gone = shards(folder)[2]
    gone.unlink()
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, gone, f"{gone.name} is missing (listed in model.safetensors.index.json)")


def test_index_maps_a_tensor_to_the_wrong_shard(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1", sharded=True)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, other = shards(folder)[0].name, shards(folder)[1].name
    moved = next(k for k, v in index["weight_map"].items() if v == other)
    index["weight_map"][moved] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, folder / first, f"{first} lacks {moved}, which model.safetensors.index.json says it holds")


def test_unusable_index(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1", sharded=True)
    index_path = folder / "model.safetensors.index.json"
    index_path.write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, index_path, "model.safetensors.index.json is unusable")
    index_path.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, index_path, "it has no weight_map")


def test_pickled_only_is_refused_unread(tmp_path, no_unpickling):
    folder = save_pickled_only(tmp_path / "checkpoint-3")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, folder, "only pickled weights (pytorch_model.bin)", "never loaded", "convert them to safetensors")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load(tmp_path / "gone")
    check_error(err, tmp_path / "gone", "the checkpoint folder does not exist")


def test_no_weights(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, folder, "no weights: neither model.safetensors nor model.safetensors.index.json")


def test_missing_tensor_is_not_left_random(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, folder, "the safetensors files lack 1 of the model's weights (model.norm.weight)", "random values")


def test_tied_checkpoint_under_an_untied_config(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1", tie=True)
    edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, folder, "lack 1 of the model's weights (lm_head.weight)")


def test_unexpected_tensor(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(
        err,
        folder,
        "hold 1 tensors the model built from config.json has no place for",
        "model.layers.0.self_attn.q_proj.bias",
    )


def test_shapes_that_do_not_fit_the_config(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    edit_config(folder, intermediate_size=48)
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(
        err,
        folder,
        "6 weights do not fit config.json",
        "model.layers.0.mlp.down_proj.weight is (32, 64) in the file but (32, 48) in the model",
    )


# ------------------------------------------------------------------------------------------ bad config


@pytest.mark.parametrize(
    "kind, says",
    [
        ("missing", "config.json is missing"),
        ("json", "config.json is not valid JSON (Unterminated string starting at: line 3, column 5)"),
        ("no_model_type", "has no model_type"),
        ("list", "holds a JSON list, not an object"),
    ],
)
def test_bad_config(tmp_path, kind, says):
    folder, _ = save_checkpoint(tmp_path / "step1")
    path = break_config(folder, kind)
    for call in (lambda: load(folder), lambda: read_config(ckpt(folder))):
        with pytest.raises(CheckpointError) as err:
            call()
        check_error(err, path, says)


def test_config_not_utf8(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    (folder / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError) as err:
        read_config(ckpt(folder))
    check_error(err, folder / "config.json", "is not UTF-8 text")


def test_config_transformers_rejects(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    edit_config(folder, num_attention_heads=5)  # 32 is not divisible by 5
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(
        err,
        folder / "config.json",
        "transformers rejects it:",
        "The hidden size (32) is not a multiple of the number of attention heads (5)",
    )
    assert err.value.__cause__ is not None  # the original error stays attached for debugging


def test_unknown_architecture(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    path = break_config(folder, "unknown_type")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(
        err,
        path,
        "unknown model_type 'sinktrace_mystery'",
        "does not know this architecture",
        "remote code is off (replay.trust_remote_code=false)",
    )
    with pytest.raises(CheckpointError) as err:
        load(folder, trust_remote_code=True)
    check_error(err, path, "auto_map names no AutoConfig or AutoModelForCausalLM")


def test_known_architecture_without_a_causal_lm(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1")
    path = edit_config(folder, model_type="vit")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(err, path, "model_type 'vit' has no causal language model class")


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE and puts it on sys.path: keep both in tmp_path."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


def test_remote_code_only_when_trusted(tmp_path, modules_cache):
    folder, saved = save_checkpoint(tmp_path / "step1")
    make_remote_code(folder)
    with pytest.raises(CheckpointError) as err:
        load(folder)
    check_error(
        err,
        folder / "config.json",
        "unknown model_type 'sinktrace_remote'",
        "replay.trust_remote_code=false",
        "set replay.trust_remote_code=true to run it",
    )
    model = load(folder, trust_remote_code=True)
    assert type(model).__name__ == "MysteryForCausalLM"
    assert_same_weights(model, saved, torch.float32)
    # remote config classes are not in transformers' registry, so the raw keys are hashed; they still agree
    assert config_fingerprint(model.config.to_dict()) == config_fingerprint(read_config(ckpt(folder)))


# ------------------------------------------------------------------------------------------ config helpers


def test_read_config(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step1", dtype=torch.bfloat16)
    config = read_config(ckpt(folder))
    assert config["model_type"] == "llama" and config["vocab_size"] == 101 and config["bos_token_id"] == 1
    assert read_config(str(folder)) == config


def test_fingerprint_is_the_architecture(tmp_path):
    a, _ = save_checkpoint(tmp_path / "a", seed=1, dtype=torch.float32)
    b, _ = save_checkpoint(tmp_path / "b", seed=2, dtype=torch.bfloat16, sharded=True)
    c, _ = save_checkpoint(tmp_path / "c", hidden_size=64)
    fa, fb, fc = (config_fingerprint(read_config(ckpt(x))) for x in (a, b, c))
    assert fa == fb != fc
    assert len(fa) == 64 and int(fa, 16) >= 0

    raw = read_config(ckpt(a))
    noisy = {
        **raw,
        "transformers_version": "9.9.9",
        "_name_or_path": "/else",
        "torch_dtype": "float16",
        "use_cache": False,
        "_attn_implementation_autoset": True,
    }
    assert config_fingerprint(noisy) == fa
    assert config_fingerprint({**raw, "rms_norm_eps": 1e-5}) != fa
    # a config.json that leaves a default out describes the same network as one that spells it out
    assert config_fingerprint({k: v for k, v in raw.items() if k != "attention_bias"}) == fa


def test_fingerprint_of_a_loaded_model_matches_its_config_json(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "a", dtype=torch.bfloat16, tie=True)
    model = load(folder)
    assert config_fingerprint(model.config.to_dict()) == config_fingerprint(read_config(ckpt(folder)))


def test_fingerprint_of_an_unknown_architecture(tmp_path):
    raw = {"model_type": "sinktrace_mystery", "hidden_size": 8, "transformers_version": "1"}
    assert config_fingerprint(raw) == config_fingerprint({**raw, "transformers_version": "2"})
    assert config_fingerprint(raw) != config_fingerprint({**raw, "hidden_size": 16})


def test_validate_weights_reports_dtypes(tmp_path):
    folder, saved = save_checkpoint(tmp_path / "a", dtype=torch.bfloat16, sharded=True)
    dtypes = validate_weights(str(folder))
    assert sorted(dtypes) == sorted(saved) and set(dtypes.values()) == {"BF16"}


def test_a_released_model_is_reused_with_the_next_checkpoints_weights(tmp_path):
    first, _ = save_checkpoint(tmp_path / "step1", seed=1)
    second, saved = save_checkpoint(tmp_path / "step2", seed=2)
    models = ModelCache()
    model = load_model(ckpt(first), attn_implementation="eager", models=models)
    assert models.take(("anything",)) is None  # nothing kept while the model is out
    models.give_back(model)
    again = load_model(ckpt(second), attn_implementation="eager", models=models)
    assert again is model  # built once, loaded twice
    models.give_back(again)
    models.clear()
    third = load_model(ckpt(second), attn_implementation="eager", models=models)
    assert third is not model  # cleared: built again
    assert_same_weights(again, saved, torch.float32)


def test_a_model_is_not_reused_across_architectures(tmp_path):
    small, _ = save_checkpoint(tmp_path / "step1")
    wide, saved = save_checkpoint(tmp_path / "step2", hidden_size=48)
    models = ModelCache()
    model = load_model(ckpt(small), attn_implementation="eager", models=models)
    models.give_back(model)
    other = load_model(ckpt(wide), attn_implementation="eager", models=models)
    assert other is not model
    assert_same_weights(other, saved, torch.float32)


def test_read_ahead_asks_for_the_files_unless_they_would_crowd_out_the_current_one(tmp_path, monkeypatch):
    import pipeline.replay.load as load_mod

    folder, _ = save_checkpoint(tmp_path / "step1", sharded=True)
    c = Checkpoint(step=1, path=str(folder), weight_files=tuple(str(p) for p in shards(folder)), complete=True)
    asked = []
    monkeypatch.setattr(load_mod.os, "posix_fadvise", lambda fd, off, n, advice: asked.append(advice), raising=False)
    load_mod.read_ahead(c)
    assert asked == [os.POSIX_FADV_WILLNEED] * len(shards(folder)) and len(asked) > 1
    asked.clear()
    size = sum(p.stat().st_size for p in shards(folder))
    monkeypatch.setattr(load_mod, "available_host_bytes", lambda: size)  # the checkpoint is over half of it
    load_mod.read_ahead(c)
    assert asked == []


def test_available_memory_without_proc_meminfo_needs_no_psutil(monkeypatch):
    import builtins

    from pipeline.devices import available_host_bytes

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setitem(sys.modules, "psutil", None)  # a test dependency only: the product must not need it
    page = os.sysconf("SC_PAGE_SIZE")
    assert 0 < available_host_bytes() <= os.sysconf("SC_PHYS_PAGES") * page
    assert available_host_bytes() % page == 0  # whole free pages


def test_weight_bytes_of_a_url_checkpoint_come_without_a_download(tmp_path, monkeypatch):
    import pipeline.replay.load as load_mod

    folder, saved = save_checkpoint(tmp_path / "step1", sharded=True, dtype=torch.bfloat16)
    local = load_mod.weights_in_memory(ckpt(folder), "cpu")
    assert local[0] == torch.float32
    # bf16 on disk, float32 loaded: twice the tensor bytes (plus the files' headers, a few % of this tiny model)
    assert local[1] == pytest.approx(2 * sum(t.numel() * 2 for t in saved.values()), rel=0.1)
    fs = fsspec.filesystem("memory")
    base = f"/sinktrace-bytes-{os.getpid()}-{time.time_ns()}"
    try:
        fs.put(str(folder), base, recursive=True)
        monkeypatch.setattr(load_mod, "local_folder", None)  # a download would call it
        assert load_mod.weights_in_memory(Checkpoint(0, f"memory://{base}"), "cpu") == local
    finally:
        fs.rm(base, recursive=True)
