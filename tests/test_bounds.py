"""Hostile inputs and settings meet a bound before they cost anything: a huge text probe is read only as far as its
rows need, a file of NUL bytes is refused from its first block, output settings are checked with the others (exit 2,
one line), an output that cannot be written leaves its steps `done`, a torch.save storage declaring more than its
file holds is refused before any byte is asked for, and names reach matplotlib as text, never as mathtext."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from pipeline.cli import compose, run
from pipeline.errors import CheckpointError, UsageError
from tests.ckpt_factory import make_run

WORDS = "the a cat dog sat ran on in under over mat park tree house river stone".split()


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("sinktrace: ")]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer of WORDS, saved as a checkpoint's tokenizer files are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )
    return folder


@pytest.mark.slow
def test_a_200_mb_text_gives_its_rows_with_the_process_under_1_gb(tokenizer_dir, tmp_path):
    """One document of 200 MB (the text a probe file of one long document holds): both packings take their rows
    from its start, in a process whose peak resident memory stays under 1 GB (reading it whole and tokenizing all of
    it took many GB)."""
    rng = np.random.default_rng(0)
    line = " ".join(rng.choice(WORDS, size=200)) + "\n"
    block = line * ((1 << 20) // len(line))
    path = tmp_path / "long.txt"
    with open(path, "w") as f:
        for _ in range(200 * (1 << 20) // len(block)):
            f.write(block)
    assert path.stat().st_size > 195 << 20
    script = textwrap.dedent(
        f"""
        import json, resource
        import numpy as np
        from transformers import AutoTokenizer
        from pipeline.probe.text import check_text, rows_of_text
        tok = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})
        check_text({str(path)!r})
        out = {{}}
        for packing, rows in (("document", 1), ("stream", 4)):
            got, sha = rows_of_text({str(path)!r}, tok, packing, 16, rows, np.random.default_rng(0), tok.eos_token_id)
            out[packing] = got.tolist()
        out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(out))
        """
    )

    def limit_memory():  # the code before bounds took tens of GB: fail fast rather than take the machine's
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, preexec_fn=limit_memory
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["peak_kib"] < 1 << 20, f"peak RSS {out['peak_kib'] >> 10} MiB"
    ids = [3 + WORDS.index(w) for w in line.split()]
    assert out["document"] == [ids[:16]]  # the document's first tokens
    windows = {tuple(ids[o : o + 16]) for o in range(4 * 16 - 16 + 1)}  # the stream's first 4 x 16 tokens
    assert len(out["stream"]) == 4 and all(tuple(row) in windows for row in out["stream"])


def test_a_2_gb_file_of_nul_bytes_is_refused_from_its_first_block(tmp_path, capsys):
    path = tmp_path / "zeros.txt"
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # sparse: no disk taken
    read_before = _bytes_read()
    cfg = compose(["probe=text", f"probe.path={path}", f"checkpoints.root={tmp_path}", f"store.path={tmp_path}/s"])
    assert run(cfg) == 2
    assert _bytes_read() - read_before < 64 << 20
    (err,) = error_lines(capsys)
    assert err == f"sinktrace: error: probe.path={path}: a binary file (it holds NUL bytes), not text"


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# ------------------------------------------------------------------------------------------ output settings


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds") / "run"
    make_run(root, [0, 10])
    return root


def replay_args(root, store, *extra) -> list[str]:
    return [
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "probe.rows=2",
        "probe.seq_len=8",
        "replay.measure=[]",
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["stages=[replay]", "report.tensorboard={file}"], "report.tensorboard={file}: a file is there, not a folder"),
        (["stages=[report]", "report.tensorboard={file}"], "report.tensorboard={file}: a file is there, not a folder"),
        (["stages=[report]", "report.out_dir={file}/x"], "report.out_dir={file}/x: {file} is a file"),
        (["stages=[compare]", "compare.out_dir={file}"], "compare.out_dir={file}: a file is there, not a folder"),
        (["probe.name=.."], "probe.name=..: not a group name"),
        (["probe.name=a/b"], "probe.name=a/b: not a group name"),
        (["probe.name=__x"], "probe.name=__x: not a group name"),
    ],
)
def test_a_bad_output_setting_is_one_line_before_any_work(tiny_run, tmp_path, capsys, extra, message):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    store = tmp_path / "s.zarr"
    assert run(compose(replay_args(tiny_run, store, *(e.format(file=file) for e in extra)))) == 2
    out = capsys.readouterr()
    (line,) = out.err.strip().splitlines()
    assert line == f"sinktrace: error: {message.format(file=file)}" or line.startswith(
        f"sinktrace: error: {message.format(file=file)}"
    ), line
    assert "Traceback" not in out.err + out.out
    assert not store.exists() and file.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_tensorboard_folder_is_one_line(tiny_run, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert run(compose(replay_args(tiny_run, tmp_path / "s.zarr", f"report.tensorboard={folder}/tb"))) == 2
    finally:
        folder.chmod(0o755)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"report.tensorboard={folder}/tb: {folder} is not writable" in line


def test_an_output_that_cannot_be_written_leaves_every_step_done(tiny_run, tmp_path, capsys, monkeypatch):
    """The TensorBoard folder fails while the replay runs (here: replaced by a file after the check): every step is
    still stored `done`, the output's error is reported once, and the exit status says so."""
    import pipeline.cli
    from pipeline.store.cube import open_sinks

    def broken(cfg, store):
        def write(steps):
            raise NotADirectoryError(f"[Errno 20] Not a directory: '{tmp_path}/tb/x'")

        return write

    monkeypatch.setattr(pipeline.cli, "tensorboard_scalars", broken)
    store = tmp_path / "s.zarr"
    assert run(compose(replay_args(tiny_run, store, "stages=[replay]"))) == 1
    (name,) = [n for n in os.listdir(store) if not n.startswith((".", "zarr"))]
    ds = open_sinks(str(store), name)
    assert ds.status.values.tolist() == ["done", "done"]
    out = capsys.readouterr()
    assert "failed" not in out.err and "failed" not in out.out
    lines = [x for x in out.err.splitlines() if "an output was not written" in x]
    assert lines == [
        f"sinktrace: error: an output was not written: NotADirectoryError: [Errno 20] Not a directory: "
        f"'{tmp_path}/tb/x'"
    ]


def test_when_the_only_checkpoint_fails_the_summary_says_no_store_was_made(tmp_path, capsys):
    root = tmp_path / "run"
    (folder,) = make_run(root, [5]).values()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
    store = tmp_path / "s.zarr"
    assert run(compose(replay_args(root, store, "stages=[replay]"))) == 1
    err = capsys.readouterr().err
    assert "no store was made" in err and "recorded as failed in the store" not in err
    assert not store.exists()


# ------------------------------------------------------------------------------------------ torch.save sizes


def test_a_torch_save_storage_declaring_2_40_elements_is_refused_naming_tensor_file_and_size(tmp_path):
    from pipeline.checkpoints import byteranges
    from pipeline.checkpoints.formats import torchfile

    buffer = io.BytesIO()
    torch.save({"model": {"wte.weight": torch.ones(2, 3)}}, buffer)
    path = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"K\x06") == 1  # the storage's element count, 6, as a one-byte int
                data = data.replace(b"K\x06", b"\x8a\x06" + (1 << 40).to_bytes(6, "little"))
            dst.writestr(info, data)
    obj = torchfile.load(str(path))
    tensors = torchfile.model_tensors(obj, str(path))
    with pytest.raises(CheckpointError) as err:
        torchfile.read(str(path), tensors, byteranges.ONE_AT_A_TIME)
    assert err.value.path == str(path)
    assert (
        f"ckpt.pt: tensor wte.weight declares a storage of {4 << 40} bytes ({1 << 40} elements of torch.float32)"
        in err.value.problem
    )


# ------------------------------------------------------------------------------------------ labels


def test_names_holding_dollars_are_drawn_as_text(tmp_path, capsys):
    from tests.cubes import constant_cube, write_store

    stores = []
    for i, name in enumerate(["$\\alpha_{$", "run $x^$"]):
        ds = constant_cube([[0.1, 0.5, 0.6], [0.1, 0.2, 0.4]])
        ds.attrs["checkpoint_root"] = f"/runs/{name}"
        stores.append(write_store(tmp_path / f"{i}.zarr", {"probe_$_keep": ds}))
    out = tmp_path / "cmp"
    assert (
        run(compose(["stages=[compare]", f"compare.stores=[{stores[0]},{stores[1]}]", f"compare.out_dir={out}"])) == 0
    )
    assert (out / "emergence.png").stat().st_size > 1000
    assert run(compose(["stages=[report]", f"store.path={stores[0]}", f"report.out_dir={tmp_path / 'rep'}"])) == 0
    assert (tmp_path / "rep" / "index.html").exists()


def test_a_tokenizer_far_larger_than_the_model_vocabulary_is_refused_before_it_is_loaded(tiny_run, tmp_path, capsys):
    folder = tmp_path / "huge-tokenizer"
    folder.mkdir()
    with open(folder / "tokenizer.json", "wb") as f:  # its size alone refuses it: the bytes are never parsed
        f.truncate(20 << 20)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 10)
    cfg = compose(replay_args(tiny_run, tmp_path / "s.zarr", "probe=text", f"probe.path={text}"))
    cfg.probe.tokenizer = str(folder)
    assert run(cfg) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(
        f"sinktrace: error: probe.tokenizer: {folder}/tokenizer.json is {20 << 20:,} bytes, more than a tokenizer of "
        "the model's 101 token ids takes"
    ), line
    assert not (tmp_path / "s.zarr").exists()


def test_a_config_larger_than_max_read_size_fails_its_step_naming_file_size_and_setting(tmp_path, capsys):
    root = tmp_path / "run"
    folders = make_run(root, [0, 10])
    config = folders[10] / "config.json"
    size = config.stat().st_size
    store = tmp_path / "s.zarr"
    # the bound is met at step 10 only: its config.json padded past it (spaces are valid JSON)
    config.write_text(config.read_text() + " " * 4096)
    assert run(compose(replay_args(root, store, "stages=[replay]", f"checkpoints.max_read_size={size + 1024}"))) == 1
    from pipeline.store.cube import open_sinks

    (name,) = [n for n in os.listdir(store) if not n.startswith((".", "zarr"))]
    assert open_sinks(str(store), name).status.values.tolist() == ["done", "failed"]
    err = capsys.readouterr().err
    assert f"config.json holds {size + 4096:,} bytes, more than checkpoints.max_read_size={size + 1024} allows" in err


# ------------------------------------------------------------------------------------------ Hub


def test_when_every_hub_revision_is_refused_the_run_ends_non_zero_in_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from pipeline.checkpoints import hub as hubmod
    from tests.ckpt_factory import save_checkpoint
    from tests.hub_server import FakeHub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hubmod, "RETRY_WAIT", 0.01)
    folder, state = save_checkpoint(tmp_path / "step10", step=10, trainer_state=False)
    pickled = tmp_path / "pytorch_model.bin"
    torch.save(state, pickled)
    server = FakeHub().start()
    try:
        server.patch_client(monkeypatch)
        server.add(
            "org/pickles",
            "step10",
            {"config.json": (folder / "config.json").read_bytes(), "pytorch_model.bin": pickled.read_bytes()},
        )
        store = tmp_path / "hub.zarr"
        assert run(compose(["checkpoints.root=hf://org/pickles", f"store.path={store}", "stages=[replay]"])) == 2
    finally:
        server.stop()
    out = capsys.readouterr()
    assert "skipped step 10" in out.out and "nothing to replay" not in out.out
    (line,) = [x for x in out.err.splitlines() if x.startswith("sinktrace: ")]
    assert line == (
        "sinktrace: error: checkpoints.root=hf://org/pickles: none of its 1 revision(s) can be replayed (each is "
        "listed above with the reason it was skipped)"
    )


def test_a_report_that_cannot_be_written_is_one_line_and_the_store_is_untouched(tmp_path, capsys, monkeypatch):
    import pipeline.report
    from tests.cubes import constant_cube, write_store

    store = write_store(tmp_path / "s.zarr", {"probe_keep": constant_cube([[0.1, 0.5, 0.6]])})
    before = sorted(p.relative_to(store) for p in store.rglob("*"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.report, "write_report", full_disk)
    assert run(compose(["stages=[report]", f"store.path={store}", f"report.out_dir={tmp_path / 'rep'}"])) == 1
    out = capsys.readouterr()
    assert (
        out.err.strip() == "sinktrace: error: the report was not written: OSError: [Errno 28] No space left on device"
    )
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


class Unlisted:
    """A class torch's restricted unpickler does not allow."""


def test_a_dcp_chunk_holding_a_pickle_is_refused_without_torchs_advice_to_unpickle(tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    from pipeline.checkpoints.formats import dcp

    payload = io.BytesIO()
    torch.save({"weight": Unlisted()}, payload)
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([4]))
    file = str(tmp_path / "__0_0.distcp")
    with pytest.raises(CheckpointError) as err:
        dcp._load_chunk(file, "tok_embeddings.weight", payload.getvalue(), chunk, torch.float32)
    assert err.value.path == file
    assert err.value.problem == (
        "__0_0.distcp cannot be read: tok_embeddings.weight needs more than torch.load(weights_only=True): its pickle "
        f"names the global {Unlisted.__module__}.Unlisted"
    )


# ------------------------------------------------------------------------------------------ files read whole


@pytest.fixture
def max_read_size(monkeypatch):
    """Sets `checkpoints.max_read_size` for one test (as the driver does), from its default whatever an earlier run
    in this process set; the process's bound comes back after."""
    from pipeline import locations

    monkeypatch.setattr(locations, "_READ_LIMIT", {"bytes": 1 << 30, "setting": "1GB"})
    return locations.bound_reads


def read_size_refusal(path, size: int, setting) -> str:
    return (
        f"{os.path.basename(str(path).rstrip('/'))} holds {size:,} bytes, more than checkpoints.max_read_size="
        f"{setting} allows for a file read whole"
    )


def test_a_hub_index_larger_than_max_read_size_is_refused_naming_file_size_and_setting(tmp_path, max_read_size):
    from pipeline.checkpoints.hub.convert import index_shards

    path = tmp_path / "model.safetensors.index.json"
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    path.write_text(json.dumps({"weight_map": {"a": shards[1], "b": shards[0]}}) + " " * 4096)
    size = path.stat().st_size
    assert index_shards(str(path)) == shards  # within the bound, read as before
    max_read_size(4096)
    with pytest.raises(CheckpointError) as e:
        index_shards(str(path))
    assert e.value.path == str(path)
    assert e.value.problem.startswith(read_size_refusal(path, size, 4096)), e.value.problem


def test_a_hub_journal_larger_than_max_read_size_is_not_read_and_its_files_stay(tmp_path, max_read_size, caplog):
    from pipeline.checkpoints.hub.cache import _read_journal

    journal = tmp_path / "fetched.json"
    journal.write_text(json.dumps([str(tmp_path / "blob")]) + " " * 4096)
    size = journal.stat().st_size
    assert _read_journal(journal) == {str(tmp_path / "blob")}
    max_read_size(4096)
    with caplog.at_level("WARNING"):
        assert _read_journal(journal) == set()  # nothing adopted, so nothing it lists is deleted
    assert read_size_refusal(journal, size, 4096) in caplog.text


@pytest.mark.parametrize("remote", [False, True], ids=["folder", "url"])
def test_a_later_checkpoints_tokenizer_larger_than_max_read_size_fails_its_step(
    tokenizer_dir, tmp_path, monkeypatch, max_read_size, remote
):
    """The first checkpoint's tokenizer was loaded; a later checkpoint's own tokenizer files are checked against
    `checkpoints.max_read_size` before they are fetched or loaded, and that step fails naming the file."""
    import fsspec

    from pipeline.probe import tokenizer as tokenizers
    from pipeline.probe.tokenizer import _load, changed_tokenizers
    from pipeline.records import Checkpoint, Probe

    first = _load(str(tokenizer_dir), str(tokenizer_dir))
    tokens = np.zeros((1, 4), np.int64)
    probe = Probe("p", "text", tokens, 0, "keep", tokenizer=first.name, vocab_sha256=first.vocab_sha256)
    if remote:
        fs = fsspec.filesystem("memory")
        folder = f"memory://{tmp_path.name}/step-10"
        fs.put(str(tokenizer_dir), f"/{tmp_path.name}/step-10", recursive=True)
    else:
        folder = str(tmp_path / "step-10")
        shutil.copytree(tokenizer_dir, folder)
    later = [Checkpoint(10, folder)]
    try:
        monkeypatch.setattr(tokenizers, "_VOCABS", {})  # its files not loaded yet
        assert changed_tokenizers({}, probe, later) == {}  # within the bound: the same vocabulary
        size = (tokenizer_dir / "tokenizer.json").stat().st_size
        max_read_size(size - 1)
        monkeypatch.setattr(tokenizers, "_VOCABS", {})
        (error,) = changed_tokenizers({}, probe, later).values()
    finally:
        if remote:
            fs.rm(f"/{tmp_path.name}", recursive=True)
    assert error.startswith("TokenizerError: its tokenizer could not be read"), error
    assert f"step-10/tokenizer.json: {read_size_refusal('tokenizer.json', size, size - 1)}" in error, error


def test_a_store_lock_holder_file_is_read_only_as_far_as_a_holder_takes(tmp_path):
    from pipeline.store.lock import StoreLock

    store = tmp_path / "s.zarr"
    with StoreLock(str(store)) as held:
        holder = json.dumps({"host": "h", "pid": 4242, "since": "then"})
        with open(held.holder_path, "w") as f:
            f.write(holder)
        with pytest.raises(UsageError, match="process 4242 on h"):
            StoreLock(str(store)).__enter__()
        # a holder file sinktrace never wrote (its JSON after a megabyte of spaces) is not read to its end
        with open(held.holder_path, "w") as f:
            f.write(" " * (1 << 20) + holder)
        with pytest.raises(UsageError, match="being written by another process"):
            StoreLock(str(store)).__enter__()


def test_a_token_probe_larger_than_max_read_size_is_refused_before_it_is_loaded(tmp_path, max_read_size):
    from pipeline.probe.batch import load_token_file

    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(64, dtype=np.int64).reshape(2, 32))
    size = path.stat().st_size
    assert load_token_file(str(path), 100).shape == (2, 32)
    max_read_size(size - 1)
    with pytest.raises(ValueError) as e:
        load_token_file(str(path), 100)
    assert str(e.value).startswith(f"probe.path={path}: {read_size_refusal(path, size, size - 1)}"), e.value


def test_a_hub_tokenizer_larger_than_max_read_size_is_refused_from_its_listing(max_read_size):
    """A Hub revision's tokenizer files are refused from the sizes its listing gives, before any is downloaded."""
    from types import SimpleNamespace

    from pipeline.checkpoints.hub import HubRun
    from pipeline.checkpoints.hub.revisions import Revision

    hub = HubRun.__new__(HubRun)  # only what fetching a step's listed files uses
    files = {"tokenizer_config.json": (300, "a" * 40), "tokenizer.json": (5000, "b" * 64)}
    hub.repo_id, hub.storage = "org/name", "/nowhere"
    hub.revisions = {10: Revision("step10", "c" * 40, 10, None, files)}
    fetched = []
    hub.cache = SimpleNamespace(download=lambda rev, name: fetched.append(name))
    assert hub.fetch_files(10, list(files)) == os.path.join("/nowhere", "snapshots", "c" * 40)
    assert fetched == list(files)
    fetched.clear()
    max_read_size(4096)
    with pytest.raises(CheckpointError) as e:
        hub.fetch_files(10, list(files))
    assert e.value.path == "hf://org/name@step10/tokenizer.json"
    assert e.value.problem.startswith(read_size_refusal("tokenizer.json", 5000, 4096)), e.value.problem
    assert fetched == []  # nothing downloaded, not even the smaller file
