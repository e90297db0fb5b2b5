"""probe=text: real text tokenized with the checkpoint's own tokenizer, by document or as a packed stream.

The tokenizers are built here with the `tokenizers` library (a word-level model trained on the test's own text),
wrapped as transformers' fast tokenizer and saved into the checkpoint folders with `save_pretrained`, as a trainer
saves its tokenizer beside the model.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
import xarray as xr
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import pipeline
from pipeline.cli import compose, run
from tests.ckpt_factory import save_checkpoint
from tests.reference import STATS, reference_stats

WORDS = (
    "the a cat dog sat ran on in under over mat park tree house river stone bird fish small large red green "
    "quick slow old new and then while because every some"
).split()
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny Llama's config names 1 as BOS and 2 as EOS
T, ROWS = 16, 4


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(18, 30)))) for _ in range(n)]


def build_tokenizer(texts: list[str], words: int | None = None) -> Tokenizer:
    """A word-level tokenizer trained on `texts` (its vocabulary: the special tokens, then the words by count)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = len(SPECIAL) + (words or len(WORDS))
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=SPECIAL))
    return tok


def save_tokenizer(tok: Tokenizer, folder) -> None:
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """Two tiny Llama checkpoints, each with the tokenizer saved beside it, and a text file of 8 documents."""
    base = tmp_path_factory.mktemp("text")
    docs = documents(8, seed=0)
    tok = build_tokenizer(docs)
    root = base / "run"
    for step in (0, 10):
        folder, _ = save_checkpoint(root / f"checkpoint-{step}", step=step, seed=step)
        save_tokenizer(tok, folder)
    text = base / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n")
    return root, text, docs, tok


def text_cfg(root, store, path, *extra):
    return compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "stages=[replay]",
            "probe=text",
            f"probe.path={path}",
            f"probe.seq_len={T}",
            f"probe.rows={ROWS}",
            "replay.measure=[]",
            *extra,
        ]
    )


def error_lines(capsys) -> list[str]:
    """What sinktrace reported on stderr besides the progress bar."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("sinktrace: ")]


def only_group(store) -> xr.Dataset:
    (name,) = xr.open_datatree(store, engine="zarr").children
    return pipeline.open_sinks(str(store), name).load()


@pytest.mark.parametrize("packing", ["document", "stream"])
def test_text_probe_replay_matches_eager_reference_and_records_the_probe(text_run, tmp_path, packing):
    root, text, docs, tok = text_run
    store = tmp_path / "s.zarr"
    assert run(text_cfg(root, store, text, f"probe.packing={packing}")) == 0
    ds = only_group(store)
    ids = ds.probe_tokens.values
    assert ids.shape == (ROWS, T) and ids.dtype == np.int64 and ds.probe_tokens.dims == ("probe_row", "probe_position")
    encoded = [tok.encode(d).ids for d in docs]
    if packing == "document":  # each row a document's start, distinct documents in file order
        starts = [next(i for i, e in enumerate(encoded) if e[:T] == row.tolist()) for row in ids]
        assert starts == sorted(set(starts))
    else:  # each row a slice of the documents joined with EOS (id 2) between them
        stream = sum(([2, *e] if i else e for i, e in enumerate(encoded)), [])
        windows = {tuple(stream[o : o + T]) for o in range(len(stream) - T + 1)}
        assert all(tuple(row) in windows for row in ids.tolist())
        assert sum(row[0] in [e[0] for e in encoded] for row in ids.tolist()) < ROWS  # not all at a document start

    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    assert ds.attrs["probe_kind"] == "text" and ds.attrs["probe_packing"] == packing
    assert ds.attrs["probe_text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert ds.attrs["probe_vocab_sha256"] == hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    assert ds.attrs["probe_tokenizer"] == str(root / "checkpoint-0")
    assert ds.attrs["probe_first_token"] == "keep" and ds.attrs["probe_source"] == str(text)
    assert ds.attrs["probe_tokens_sha256"] == hashlib.sha256(ids.tobytes()).hexdigest()
    assert list(ds.status.values) == ["done", "done"]

    for step in (0, 10):
        model = LlamaForCausalLM.from_pretrained(root / f"checkpoint-{step}", dtype=torch.float32)
        ref = reference_stats(model, ids, key_positions=4)
        got = ds.sel(step=step)
        for var in STATS:
            np.testing.assert_allclose(got[var].values, ref[var], atol=1e-5, rtol=1e-5, err_msg=f"{step} {var}")


def test_the_same_settings_write_the_same_group_and_a_rerun_resumes(text_run, tmp_path, capsys):
    root, text, _, _ = text_run
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for store in (a, b):
        assert run(text_cfg(root, store, text, "probe.packing=stream", "probe.seed=3")) == 0
    xr.testing.assert_identical(only_group(a).drop_attrs(), only_group(b).drop_attrs())
    (name,) = xr.open_datatree(a, engine="zarr").children
    assert name.startswith("text-docs-stream-T16-r4-") and name.endswith("-keep")
    capsys.readouterr()
    assert run(text_cfg(root, a, text, "probe.packing=stream", "probe.seed=3")) == 0
    assert "2 done, 0 to replay" in capsys.readouterr().out
    # another seed cuts other rows: another group beside the first
    assert run(text_cfg(root, a, text, "probe.packing=stream", "probe.seed=4")) == 0
    assert len(xr.open_datatree(a, engine="zarr").children) == 2


def test_first_token_policy_applies_to_document_rows(text_run, tmp_path):
    root, text, docs, tok = text_run
    store = tmp_path / "s.zarr"
    assert run(text_cfg(root, store, text, "probe.first_token=bos")) == 0
    ids = only_group(store).probe_tokens.values
    assert (ids[:, 0] == 1).all()  # the model's BOS id at position 0, the documents' tokens after it
    encoded = [tok.encode(d).ids for d in docs]
    assert all(any(e[1:T] == row[1:].tolist() for e in encoded) for row in ids)


def test_json_lines_and_a_pinned_tokenizer_folder(text_run, tmp_path):
    root, _, docs, tok = text_run
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join(docs))
    pinned = tmp_path / "tokenizer"
    save_tokenizer(tok, pinned)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert run(text_cfg(root, a, lines, f"probe.tokenizer={pinned}", "replay.steps=[0]")) == 0
    assert run(text_cfg(root, b, plain, "replay.steps=[0]")) == 0
    got, want = only_group(a), only_group(b)
    np.testing.assert_array_equal(got.probe_tokens.values, want.probe_tokens.values)
    assert got.attrs["probe_tokenizer"] == str(pinned)


def test_a_tokenizer_that_changes_between_checkpoints_fails_its_step_unless_pinned(text_run, tmp_path, capsys):
    root, text, docs, tok = text_run
    run_root = tmp_path / "run"
    for step in (0, 10):
        save_checkpoint(run_root / f"checkpoint-{step}", step=step, seed=step)
    save_tokenizer(tok, run_root / "checkpoint-0")
    save_tokenizer(build_tokenizer(documents(8, seed=1), words=20), run_root / "checkpoint-10")  # other ids
    store = tmp_path / "s.zarr"
    assert run(text_cfg(run_root, store, text)) == 1
    err = capsys.readouterr().err
    assert "step 10: TokenizerError" in err and "probe.tokenizer=" in err
    assert list(only_group(store).status.values) == ["done", "failed"]

    pinned = tmp_path / "s2.zarr"
    assert run(text_cfg(run_root, pinned, text, f"probe.tokenizer={run_root / 'checkpoint-0'}")) == 0
    assert list(only_group(pinned).status.values) == ["done", "done"]


def test_no_tokenizer_anywhere_is_a_usage_error_naming_probe_tokenizer(tmp_path, capsys):
    root = tmp_path / "run"
    save_checkpoint(root / "checkpoint-0", step=0)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(documents(8, seed=0)))
    capsys.readouterr()
    assert run(text_cfg(root, tmp_path / "s.zarr", text)) == 2
    (err,) = error_lines(capsys)
    assert "probe.tokenizer" in err and str(root / "checkpoint-0") in err
    assert not (tmp_path / "s.zarr").exists()


def test_the_tokenizer_beside_checkpoints_model_config_is_used(text_run, tmp_path):
    _, text, docs, tok = text_run
    root = tmp_path / "run"
    save_checkpoint(root / "checkpoint-0", step=0)
    beside = tmp_path / "model"
    beside.mkdir()
    (beside / "config.json").write_bytes((root / "checkpoint-0" / "config.json").read_bytes())
    save_tokenizer(tok, beside)
    store = tmp_path / "s.zarr"
    assert run(text_cfg(root, store, text, f"checkpoints.model_config={beside / 'config.json'}")) == 0
    assert only_group(store).attrs["probe_tokenizer"] == str(beside)


BAD_FILES = {
    "empty.txt": (b"\n \n\n", "empty"),
    "binary.txt": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    "latin1.txt": ("caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
    "notext.jsonl": (b'{"text": "a cat"}\n{"body": "a dog"}\n', 'line 2: no "text" field'),
    "broken.jsonl": (b'{"text": "a cat"}\n{"text": \n', "line 2: not JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_text_is_a_one_line_error_before_any_work(tmp_path, capsys, name):
    data, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    store = tmp_path / "s.zarr"
    # the root is never looked at: the text is checked with the settings
    assert run(text_cfg(tmp_path / "no-such-run", store, path)) == 2
    (err,) = error_lines(capsys)
    assert f"probe.path={path}" in err and message in err, err
    assert not store.exists()


def test_a_missing_text_file_is_a_usage_error(tmp_path, capsys):
    assert run(text_cfg(tmp_path, tmp_path / "s.zarr", tmp_path / "nope.txt")) == 2
    assert f"probe.path={tmp_path / 'nope.txt'}: no such file" in capsys.readouterr().err
    text = tmp_path / "docs.txt"
    text.write_text("the cat sat")
    assert run(text_cfg(tmp_path, tmp_path / "s.zarr", text, "probe.packing=shuffled")) == 2
    (err,) = error_lines(capsys)
    assert err == "sinktrace: error: probe.packing=shuffled: choose from document, stream"
    assert run(compose([f"checkpoints.root={tmp_path}", "probe=text"])) == 2  # no probe.path at all
    (err,) = error_lines(capsys)
    assert (
        err
        == "sinktrace: error: probe.path: probe=text needs one, a text file or JSON lines: give probe.path=/path/to/it"
    )


def test_text_too_short_for_the_rows_is_an_error_before_any_replay(text_run, tmp_path, capsys):
    root, _, _, _ = text_run
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat\n\nthe dog ran")  # 6 + EOS + 3 tokens
    store = tmp_path / "s.zarr"
    assert run(text_cfg(root, store, short, "probe.packing=stream")) == 2
    assert "10 tokens in all, shorter than one row of probe.seq_len=16" in capsys.readouterr().err
    assert run(text_cfg(root, store, short)) == 2
    assert "0 of its 2 document(s) have at least probe.seq_len=16 tokens" in capsys.readouterr().err
    assert not store.exists()


def test_a_probe_name_reused_for_other_ids_is_refused(text_run, tmp_path, capsys):
    root, text, _, _ = text_run
    store = tmp_path / "s.zarr"
    assert run(text_cfg(root, store, text, "probe.name=mine", "replay.steps=[0]")) == 0
    before = only_group(store)
    assert run(text_cfg(root, store, text, "probe.name=mine", "probe.packing=stream", "replay.steps=[0]")) == 2
    assert "group 'mine' holds the results of other probe token ids" in capsys.readouterr().err
    xr.testing.assert_identical(only_group(store), before)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub on the loopback address (tests/hub_server.py) and an empty Hugging Face cache of the test's own."""
    from huggingface_hub import constants

    from pipeline.checkpoints import hub as hubmod
    from tests.hub_server import FakeHub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hubmod, "RETRY_WAIT", 0.01)
    server = FakeHub().start()
    server.patch_client(monkeypatch)
    yield server
    server.stop()


@pytest.mark.slow
def test_a_hub_repository_serves_its_tokenizer_and_offline_runs_read_it_from_the_cache(
    text_run, hub, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    root, text, _, _ = text_run
    for step in (0, 10):
        names = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        hub.add_folder("org/text", f"step{step}", root / f"checkpoint-{step}", names)
    local = tmp_path / "local.zarr"
    assert run(text_cfg(root, local, text)) == 0
    online = tmp_path / "hub.zarr"
    assert run(text_cfg("hf://org/text", online, text, "checkpoints.keep_downloads=true")) == 0
    got, want = only_group(online), only_group(local)
    assert got.attrs["probe_tokenizer"] == "hf://org/text@step0"
    assert got.attrs["probe_vocab_sha256"] == want.attrs["probe_vocab_sha256"]
    np.testing.assert_array_equal(got.probe_tokens.values, want.probe_tokens.values)
    np.testing.assert_allclose(got.sink_mass.values, want.sink_mass.values, atol=1e-6)
    # the second revision lists the same tokenizer files (by hash): they are not fetched again
    assert [rev for rev, name in hub.served if name == "tokenizer.json"] == ["step0"]

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = tmp_path / "offline.zarr"
    assert run(text_cfg("hf://org/text", offline, text)) == 0
    np.testing.assert_array_equal(only_group(offline).probe_tokens.values, want.probe_tokens.values)


def test_probe_tokenizer_may_name_a_hub_repository(text_run, hub, tmp_path, capsys):
    root, text, _, _ = text_run
    names = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    hub.add_folder("org/tokenizer", "main", root / "checkpoint-0", names)
    local, pinned = tmp_path / "local.zarr", tmp_path / "pinned.zarr"
    assert run(text_cfg(root, local, text, "replay.steps=[0]")) == 0
    assert run(text_cfg(root, pinned, text, "replay.steps=[0]", "probe.tokenizer=org/tokenizer")) == 0
    got, want = only_group(pinned), only_group(local)
    assert got.attrs["probe_tokenizer"] == "org/tokenizer"
    np.testing.assert_array_equal(got.probe_tokens.values, want.probe_tokens.values)
    capsys.readouterr()
    missing = tmp_path / "missing.zarr"
    assert run(text_cfg(root, missing, text, "replay.steps=[0]", "probe.tokenizer=org/missing")) == 2
    (err,) = error_lines(capsys)
    assert "probe.tokenizer=org/missing: no such folder, and the Hub repository org/missing gave no tokenizer" in err
    assert not missing.exists()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_a_usage_error(text_run, tmp_path, capsys):
    root, _, _, _ = text_run
    words = [f"w{i}" for i in range(150)]  # 153 ids with the special tokens; the tiny model has 101
    text = tmp_path / "many.txt"
    text.write_text("\n\n".join(" ".join(words[i : i + 20]) for i in range(0, 150, 10)))
    big = tmp_path / "big"
    save_tokenizer(build_tokenizer([" ".join(words)], words=150), big)
    store = tmp_path / "s.zarr"
    capsys.readouterr()
    assert run(text_cfg(root, store, text, f"probe.tokenizer={big}")) == 2
    (err,) = error_lines(capsys)
    assert f"probe.tokenizer ({big}) on probe.path={text}" in err and "outside the model's vocabulary [0, 101)" in err
    assert not store.exists()


@pytest.mark.slow
def test_the_notebook_sets_a_text_probe_beside_the_random_tokens(tmp_path, monkeypatch, tmp_path_factory):
    from tests.cubes import realistic_cube, write_store
    from tests.test_notebook import _images, _run, _text, share_planted

    share_planted(tmp_path_factory, monkeypatch)

    text = realistic_cube("keep", failed=())
    text.attrs.update(
        probe_kind="text",
        probe_packing="stream",
        probe_tokenizer="/data/run/checkpoint-0",
        probe_text_sha256="ab" * 32,
    )
    text = text.assign_coords(probe_tokens=(("probe_row", "probe_position"), np.ones((4, 64), dtype=np.int64)))
    store = write_store(tmp_path / "sinks.zarr", {"text-wiki": text, "random": realistic_cube("random", seed=1)})
    nb = _run(store, monkeypatch)
    assert (
        "text-wiki: packing stream, tokenizer /data/run/checkpoint-0, text sha256 abababababab, ids (4, 64)"
        in _text(nb)
    )
    assert _images(nb) == 5 + 1 + 1  # sections 1-4, the planted circuit and the text probe's (no first-token pair)


def test_probe_ids_a_killed_writer_left_unwritten_are_written_again(tmp_path):
    """The ids' array is named a coordinate only after its data is in: an array created and never filled (a kill
    in between) is written again by the next run."""
    import zarr

    from pipeline.store.cube import SinkStore
    from pipeline.store.schema import PROBE_DIMS, PROBE_TOKENS

    path, ids = str(tmp_path / "s.zarr"), np.arange(12, dtype=np.int64).reshape(3, 4) + 7
    SinkStore(path, "g").prepare([0])
    group = zarr.open_group(path, mode="r+", path="g")
    group.create_array(PROBE_TOKENS, shape=ids.shape, dtype=np.int64, dimension_names=list(PROBE_DIMS))  # no data
    SinkStore(path, "g").prepare([0, 10], probe_tokens=ids)
    got = pipeline.open_sinks(path, "g")
    assert PROBE_TOKENS in got.coords and got[PROBE_TOKENS].dims == PROBE_DIMS
    np.testing.assert_array_equal(got[PROBE_TOKENS].values, ids)
    SinkStore(path, "g").prepare([20], probe_tokens=ids * 0)  # recorded once: a later prepare leaves it
    np.testing.assert_array_equal(pipeline.open_sinks(path, "g")[PROBE_TOKENS].values, ids)
