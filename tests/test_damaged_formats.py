"""Damaged and hostile DCP folders and torch.save files, made from real ones (written by
`torch.distributed.checkpoint.save` and `torch.save` in tests/trainer_ckpts.py) and then cut short or rewritten:
each fails its own step with one line naming the file, the other steps are replayed, nothing in them runs, and no
file outside the checkpoint is read."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

import pipeline
from pipeline.checkpoints.formats.dcp import read_metadata
from pipeline.cli import compose, run
from tests import trainer_ckpts as tc
from tests.ckpt_factory import make_run, truncate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

REPO = Path(__file__).resolve().parents[1]
TENSOR = "layers.0.attention.wo.weight"  # a 32 x 32 projection of the tiny Llama


class Trap:
    """Unpickling this would create `marker` (its __reduce__ names os.system)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def args_for(root, store, *extra) -> list[str]:
    return [
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=4",
        "probe.seq_len=16",
        *extra,
    ]


def replay(capsys, root, store, *extra) -> tuple[int, str]:
    code = run(compose(args_for(root, store, *extra)))
    out = capsys.readouterr()
    return code, out.out + out.err


def group(store):
    (name,) = pipeline.open_sinks(store).children  # the one probe group of the run
    return pipeline.open_sinks(store, name)


def statuses(store) -> dict[int, str]:
    ds = group(store)
    return dict(zip(ds.step.values.tolist(), ds.status.values.tolist()))


def error_of(store, step) -> str:
    return group(store).error.sel(step=step).item()


def assert_one_line(out: str, step: int, *words: str) -> str:
    """The line reporting the step's failure, which holds every one of `words`; no traceback anywhere."""
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if f"step {step} failed" in line or f"step {step}:" in line]
    assert lines, out
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ DCP


@pytest.fixture
def titan(tmp_path):
    """A torchtitan run of steps 1 and 2 (different weights), the model config it needs, and the store path."""
    root = tmp_path / "run"
    tc.torchtitan_step(root, 1, tc.llama(seed=1))
    tc.torchtitan_step(root, 2, tc.llama(seed=2))
    config = tmp_path / "config.json"
    tc.llama().config.to_json_file(config)
    return root, f"checkpoints.model_config={config}", tmp_path / "s.zarr"


def rewrite_metadata(folder: Path, change) -> None:
    """Change the folder's `.metadata` (a real torch Metadata object) with `change(metadata)` and pickle it back."""
    metadata = read_metadata(str(folder))
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_truncated_distcp_fails_its_step_naming_the_file(titan, capsys):
    root, config, store = titan
    data = root / "step-1" / "__0_0.distcp"
    truncate(data, keep=data.stat().st_size // 4)  # inside the model's tensors, which come first
    code, out = replay(capsys, root, store, config)
    assert code == 1
    assert_one_line(out, 1, str(data), "truncated")
    assert statuses(store) == {1: "failed", 2: "done"}
    assert str(data) in error_of(store, 1)


@pytest.mark.slow
def test_a_truncated_distcp_on_a_processes_cluster_fails_its_step_and_ends(titan):
    root, config, store = titan
    data = root / "step-1" / "__0_0.distcp"
    truncate(data, keep=data.stat().st_size // 4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args_for(root, store, config, "cluster=processes", "cluster.n_workers=1")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, out
    assert_one_line(out, 1, str(data), "truncated")
    assert statuses(store) == {1: "failed", 2: "done"}


def test_metadata_whose_shape_disagrees_with_the_data_fails_its_step(titan, capsys):
    root, config, store = titan

    def reshape(metadata):  # as many elements, another shape: the chunks still cover the tensor
        md = metadata.state_dict_metadata[TENSOR]
        md.size = torch.Size([16, 64])
        md.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([16, 64]))]

    rewrite_metadata(root / "step-1", reshape)
    code, out = replay(capsys, root, store, config)
    assert code == 1
    assert_one_line(out, 1, str(root / "step-1" / "__0_0.distcp"), TENSOR)
    assert statuses(store) == {1: "failed", 2: "done"}


def test_a_pickle_inside_a_distcp_is_refused_and_nothing_runs(titan, tmp_path, capsys):
    root, config, store = titan
    folder = root / "step-1"
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"weight": Trap(marker)}, payload)
    data = folder / "__0_0.distcp"
    offset = data.stat().st_size
    with open(data, "ab") as f:  # the tensor's bytes now a pickle that would run a command
        f.write(payload.getvalue())

    def point(metadata):
        info = metadata.storage_data[MetadataIndex(TENSOR, torch.Size([0, 0]))]
        info.offset, info.length = offset, len(payload.getvalue())

    rewrite_metadata(folder, point)
    code, out = replay(capsys, root, store, config)
    assert code == 1
    assert_one_line(out, 1, str(data), "posix.system")
    assert statuses(store) == {1: "failed", 2: "done"}
    assert not marker.exists()


@pytest.mark.parametrize("chunks", [[ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([16, 32]))], []])
def test_chunks_that_leave_part_of_a_tensor_uncovered_fail_the_step(titan, capsys, chunks):
    root, config, store = titan

    def uncover(metadata):
        metadata.state_dict_metadata[TENSOR].chunks = chunks

    rewrite_metadata(root / "step-1", uncover)
    code, out = replay(capsys, root, store, config)
    assert code == 1
    covered = sum(c.sizes.numel() for c in chunks)
    assert_one_line(out, 1, str(root / "step-1" / ".metadata"), TENSOR, f"cover {covered} of its 1024 elements")
    assert statuses(store) == {1: "failed", 2: "done"}


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_data_file_outside_the_checkpoint_folder_is_refused(titan, capsys, how):
    """step-1's `.metadata` pointed at step-2's data file (same layout, other weights): read, it would store step 2's
    statistics as step 1's."""
    root, config, store = titan
    other = root / "step-2" / "__0_0.distcp"
    path = "../step-2/__0_0.distcp" if how == "relative" else str(other)

    def elsewhere(metadata):
        for info in metadata.storage_data.values():
            info.relative_path = path

    rewrite_metadata(root / "step-1", elsewhere)
    code, out = replay(capsys, root, store, config)
    assert code == 1
    assert_one_line(out, 1, str(root / "step-1" / ".metadata"), path, "outside the checkpoint's folder")
    assert statuses(store) == {1: "failed", 2: "done"}


# ------------------------------------------------------------------------------------------ torch.save


def test_a_truncated_nanogpt_file_is_one_line(tmp_path, capsys):
    """nanoGPT's ckpt.pt holds the run's only step, read by discovery (its iter_num)."""
    path = tc.nanogpt_checkpoint(tmp_path / "out", tc.gpt2(), 300)
    truncate(path)
    code, out = replay(capsys, tmp_path / "out", tmp_path / "s.zarr")
    assert code == 1
    [line] = [line for line in out.splitlines() if "error" in line]
    assert str(path) in line and "not a readable torch.save file" in line
    assert "Traceback" not in out


def test_a_nanogpt_file_carrying_code_is_refused_in_one_line_naming_the_global(tmp_path, capsys):
    path = tc.nanogpt_checkpoint(tmp_path / "out", tc.gpt2(), 300)
    marker = tmp_path / "pwned"
    obj = torch.load(path, weights_only=True)
    torch.save({**obj, "config": Trap(marker)}, path)
    code, out = replay(capsys, tmp_path / "out", tmp_path / "s.zarr")
    assert code == 1
    [line] = [line for line in out.splitlines() if "error" in line]
    assert str(path) in line and "refused" in line and "posix.system" in line
    assert "likely succeed" not in out and "weights_only=False" not in out and "Traceback" not in out
    assert not marker.exists()


def nanochat_run(folder, steps=(500, 600)) -> dict[int, Path]:
    return {step: tc.nanochat_checkpoint(folder, step, tc.nanochat_model(seed=step)) for step in steps}


def test_a_tensor_declaring_more_elements_than_its_bytes_fails_the_step(tmp_path, capsys):
    """An embedding saved as one row expanded (stride 0) to every row: a few hundred bytes in the file declare the
    whole matrix; it would be materialised whole and its statistics stored."""
    paths = nanochat_run(tmp_path / "d2")
    sd = torch.load(paths[600], weights_only=True)
    wte = sd["transformer.wte.weight"]
    sd["transformer.wte.weight"] = wte[:1].clone().expand(wte.shape)  # its storage: the one row
    torch.save(sd, paths[600])
    saved = torch.load(paths[600], weights_only=True)["transformer.wte.weight"]
    assert saved.stride() == (0, 1) and saved.untyped_storage().nbytes() == 128
    store = tmp_path / "s.zarr"
    code, out = replay(capsys, tmp_path / "d2", store)
    assert code == 1
    assert_one_line(out, 600, str(paths[600]), "transformer.wte.weight", "3232 elements", "128 bytes")
    assert statuses(store) == {500: "done", 600: "failed"}


# ------------------------------------------------------------------------------------------ the first checkpoint


def _refused_metadata(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2, 3):
        tc.torchtitan_step(root, step, tc.llama(seed=step))
    config = tmp_path / "config.json"
    tc.llama().config.to_json_file(config)
    rewrite_metadata(root / "step-1", lambda md: setattr(md, "planner_data", {"x": Trap(tmp_path / "pwned")}))
    return root, [f"checkpoints.model_config={config}"], 1, str(root / "step-1" / ".metadata"), "posix.system"


def _refused_torch_file(tmp_path):
    paths = nanochat_run(tmp_path / "d2", (500, 600, 700))
    sd = torch.load(paths[500], weights_only=True)
    torch.save({**sd, "extra": Trap(tmp_path / "pwned")}, paths[500])
    return tmp_path / "d2", [], 500, str(paths[500]), "posix.system"


def _truncated_torch_file(tmp_path):
    paths = nanochat_run(tmp_path / "d2", (500, 600, 700))
    truncate(paths[500])
    return tmp_path / "d2", [], 500, str(paths[500]), "not a readable torch.save file"


def _invalid_config(tmp_path):
    folders = make_run(tmp_path / "run", [0, 10, 20])
    (folders[0] / "config.json").write_text("{not json")
    return tmp_path / "run", [], 0, str(folders[0] / "config.json"), "not valid JSON"


def _unknown_model_type(tmp_path):
    folders = make_run(tmp_path / "run", [0, 10, 20])
    config = json.loads((folders[0] / "config.json").read_text())
    (folders[0] / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
    return tmp_path / "run", [], 0, str(folders[0] / "config.json"), "unknown model_type 'nosuchmodel'"


@pytest.mark.parametrize(
    "damage", [_refused_metadata, _refused_torch_file, _truncated_torch_file, _invalid_config, _unknown_model_type]
)
def test_a_bad_first_checkpoint_fails_only_itself(tmp_path, capsys, damage):
    root, extra, bad, path, problem = damage(tmp_path)
    store = tmp_path / "s.zarr"
    code, out = replay(capsys, root, store, *extra)
    assert code == 1
    assert_one_line(out, bad, path, problem)
    status = statuses(store)
    assert status.pop(bad) == "failed" and set(status.values()) == {"done"} and len(status) == 2
    assert path in error_of(store, bad)
    assert "likely succeed" not in out and "weights_only=False" not in out  # torch's advice to unpickle fully
    assert not (tmp_path / "pwned").exists()


def test_a_run_whose_every_checkpoint_is_bad_reports_each(tmp_path, capsys):
    """With the default stages: no report is drawn from the store that nothing set up, and the failures are the
    message."""
    paths = nanochat_run(tmp_path / "d2")
    for path in paths.values():
        truncate(path)
    args = [a for a in args_for(tmp_path / "d2", tmp_path / "s.zarr") if not a.startswith("stages=")]
    assert run(compose(args)) == 1
    out = capsys.readouterr()
    for step, path in paths.items():
        assert_one_line(out.out + out.err, step, str(path), "not a readable torch.save file")
    assert "no store there yet" not in out.err
