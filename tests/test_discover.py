import json
import os
import pickle
import shutil
import time

import fsspec
import pytest
import torch
from ckpt_factory import (
    backdate,
    break_config,
    make_run,
    save_checkpoint,
    save_pickled_only,
    shards,
    touch,
)

from pipeline.checkpoints.discover import discover
from pipeline.errors import CheckpointError


def settled(root, **kwargs):
    """discover() an hour from now, when the quiet period of whatever a test just changed is over."""
    return discover(root, now=time.time() + 3600, **kwargs)


def by_step(found):
    return {c.step: c for c in found}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything unpickles a file."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# ------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize(
    "layout, name",
    [
        ("checkpoint-{}", "checkpoint-20"),
        ("step{}", "step20"),
        ("step_{}", "step_20"),
        ("step-{}", "step-20"),
        ("iter_{:07d}", "iter_0000020"),
        ("global_step{}", "global_step20"),
    ],
)
def test_each_layout_names_its_step(tmp_path, layout, name):
    make_run(tmp_path, [3, 20, 100], layout=layout, trainer_state=False)
    found = discover(str(tmp_path))
    assert [c.step for c in found] == [3, 20, 100]  # numeric order, not name order
    assert all(c.complete and c.reason is None for c in found)
    assert found[1].path == str(tmp_path / name)
    assert found[1].weight_files == (str(tmp_path / name / "model.safetensors"),)
    assert all(c.tokens_seen is None for c in found)


def test_trainer_state_gives_step_and_tokens(tmp_path):
    save_checkpoint(tmp_path / "checkpoint-7", step=70, tokens_seen=123_456)
    save_checkpoint(tmp_path / "checkpoint-8", step=80)  # HF Trainer writes 0 tokens when it does not count them
    save_checkpoint(tmp_path / "checkpoint-0", step=0)
    found = by_step(discover(tmp_path))
    assert sorted(found) == [0, 70, 80]
    assert found[70].path.endswith("checkpoint-7")
    assert found[70].tokens_seen == 123_456
    assert found[80].tokens_seen is None
    assert found[0].tokens_seen == 0


def test_sharded_dtypes_tied_and_training_files_are_complete(tmp_path, no_unpickling):
    save_checkpoint(tmp_path / "step1", step=1, sharded=True)
    save_checkpoint(tmp_path / "step2", step=2, dtype=torch.bfloat16, sharded=True, tie=True)
    save_checkpoint(tmp_path / "step3", step=3, dtype=torch.float16, training_files=True)
    found = by_step(discover(tmp_path))
    assert all(c.complete for c in found.values()), [c.reason for c in found.values()]
    expected = tuple(str(p) for p in shards(tmp_path / "step1"))
    assert len(expected) > 1 and found[1].weight_files == expected
    assert found[3].weight_files == (str(tmp_path / "step3" / "model.safetensors"),)


def test_non_checkpoint_entries_are_ignored(tmp_path):
    save_checkpoint(tmp_path / "checkpoint-5", step=5)
    for name in ["runs", "logs", "checkpoint-final", "checkpoint-5-old", "step", "steps10"]:
        (tmp_path / name).mkdir()
    (tmp_path / "step100.pt").write_bytes(b"x")
    (tmp_path / "checkpoint-9").write_text("a file, not a folder")
    (tmp_path / "config.json").write_text("{}")  # root-level files do not make the root a checkpoint here
    assert [c.step for c in discover(tmp_path)] == [5]


def test_checkpoints_under_other_names_are_pointed_out(tmp_path, caplog):
    save_checkpoint(tmp_path / "ckpt100", step=100)
    save_checkpoint(tmp_path / "epoch-3", step=300)
    (tmp_path / "logs").mkdir()
    with caplog.at_level("WARNING", logger="pipeline.checkpoints.discover"):
        assert discover(tmp_path) == []
    assert "ignoring ckpt100, epoch-3: they hold a checkpoint, but their names give no step" in caplog.text


def test_nested_global_step_folder_is_not_a_checkpoint(tmp_path):
    # DeepSpeed writes checkpoint-N/global_stepN/ with its optimizer shards; only direct children count
    folder, _ = save_checkpoint(tmp_path / "checkpoint-10", step=10)
    (folder / "global_step10").mkdir()
    torch.save({}, folder / "global_step10" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    backdate(folder, 3600)
    found = discover(tmp_path)
    assert [(c.step, c.complete) for c in found] == [(10, True)]


def test_empty_run_finds_nothing(tmp_path):
    assert discover(tmp_path) == []


# ------------------------------------------------------------------------------------------ the root itself


def test_root_may_be_one_checkpoint(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step42", trainer_state=False)
    [c] = discover(folder)
    assert (c.step, c.complete, c.path) == (42, True, str(folder))

    other, _ = save_checkpoint(tmp_path / "final-model", step=900)  # the step from trainer_state.json
    assert [c.step for c in discover(other)] == [900]


def test_root_may_be_one_deepspeed_checkpoint(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-100", step=100)
    (folder / "global_step100").mkdir()
    torch.save({}, folder / "global_step100" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    backdate(folder, 3600)
    [c] = discover(folder)
    assert (c.step, c.complete, c.path) == (100, True, str(folder))


def test_root_checkpoint_without_a_step_is_an_error(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "final-model", trainer_state=False)
    with pytest.raises(CheckpointError) as err:
        discover(folder)
    assert err.value.path == str(folder)
    assert "training step is unknown" in err.value.problem


def test_root_with_its_own_model_and_checkpoint_folders_lists_the_folders(tmp_path):
    # HF Trainer's save_model() writes the final model into output_dir beside its checkpoint-N folders
    save_checkpoint(tmp_path, step=30)
    make_run(tmp_path, [10, 20])
    assert [c.step for c in discover(tmp_path)] == [10, 20]


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        discover(tmp_path / "file")


# ------------------------------------------------------------------------------------------ incomplete folders


def test_missing_shard(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-4", step=4, sharded=True)
    gone = shards(folder)[1]
    gone.unlink()
    [c] = settled(tmp_path)
    assert not c.complete
    assert c.reason == f"{gone.name} listed in model.safetensors.index.json is missing"
    assert str(gone) in c.weight_files


def test_missing_config(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-4", step=4)
    break_config(folder, "missing")
    [c] = settled(tmp_path)
    assert (c.complete, c.reason) == (False, "config.json is missing")


def test_unusable_index(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-4", step=4, sharded=True)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": {"a": "../x.safetensors"}}')
    [c] = settled(tmp_path)
    assert not c.complete and "model.safetensors.index.json is unusable" in c.reason and "outside" in c.reason
    (folder / "model.safetensors.index.json").write_text('{"metadata": {')
    [c] = settled(tmp_path)
    assert not c.complete and "model.safetensors.index.json is unusable" in c.reason


def test_half_written_trainer_state(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-4", step=4)
    (folder / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    [c] = settled(tmp_path)
    assert c.step == 4 and not c.complete
    assert c.reason.startswith("trainer_state.json is not a valid JSON object")


def test_empty_and_weightless_folders(tmp_path):
    (tmp_path / "step1").mkdir()
    folder, _ = save_checkpoint(tmp_path / "step2", trainer_state=False)
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    found = by_step(settled(tmp_path))
    assert found[1].reason == (
        "config.json is missing; no weights: neither model.safetensors nor model.safetensors.index.json"
    )
    assert not found[1].unreadable  # an empty folder is one about to be written
    assert found[2].unreadable and found[2].reason == (
        "no model.safetensors or model.safetensors.index.json (found weights.safetensors); it holds config.json, "
        "generation_config.json, weights.safetensors"
    )


def test_pickled_weights_are_reported_never_loaded(tmp_path, no_unpickling):
    save_pickled_only(tmp_path / "checkpoint-3")
    [c] = settled(tmp_path)
    assert (c.step, c.complete, c.weight_files) == (3, False, ())
    assert "only pickled weights (pytorch_model.bin)" in c.reason
    assert "never loaded" in c.reason and "convert them to safetensors" in c.reason
    assert "optimizer.pt" not in c.reason  # training state is not mistaken for weights


@pytest.mark.parametrize("name", ["checkpoint-6.tmp", "step6-tmp", "tmp-checkpoint-6", "step_6.partial"])
def test_staging_folder_names(tmp_path, name):
    save_checkpoint(tmp_path / name, trainer_state=False)
    [c] = settled(tmp_path)
    assert (c.step, c.complete) == (6, False)
    assert c.reason == f"its name {name!r} marks a checkpoint still being written"


@pytest.mark.parametrize(
    "marker",
    [
        "model.safetensors.tmp",
        "model-00001-of-00002.safetensors.partial",
        ".incomplete",
        "unfinished",
        "tmpa8f3k2",
        "sub/x.tmp",
    ],
)
def test_marker_files_inside(tmp_path, marker):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-6", step=6)
    (folder / marker).parent.mkdir(exist_ok=True)
    (folder / marker).write_bytes(b"")
    backdate(folder, 3600)
    [c] = discover(tmp_path)
    assert not c.complete
    assert c.reason == f"{marker} marks files still being written"


def test_marker_beside_the_folder(tmp_path):
    save_checkpoint(tmp_path / "step6", step=6)
    save_checkpoint(tmp_path / "step60", step=60)
    (tmp_path / "step6-unfinished").write_text("")
    found = by_step(discover(tmp_path))
    assert found[6].reason == "marker 'step6-unfinished' next to it says it is still being written"
    assert found[60].complete


def test_ordinary_names_are_not_markers(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-6", step=6)
    for name in ["chat_template.jinja", "tokenizer_config.json", "temperature.json", "latest", "zero_to_fp32.py"]:
        (folder / name).write_text("x")
    backdate(folder, 3600)
    [c] = discover(tmp_path)
    assert c.complete, c.reason


def test_recently_modified(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-6", step=6)
    shard = folder / "model.safetensors"
    touch(shard)
    mtime = os.stat(shard).st_mtime
    [c] = discover(tmp_path, now=mtime + 3.2)
    assert (c.complete, c.reason) == (False, "modified 3 s ago; waiting 30 s quiet period")
    [c] = discover(tmp_path, now=mtime + 31)
    assert c.complete
    [c] = discover(tmp_path, quiet_seconds=0, now=mtime)
    assert c.complete
    [c] = discover(tmp_path, quiet_seconds=120, now=mtime + 31)
    assert c.reason == "modified 31 s ago; waiting 120 s quiet period"


def test_recent_change_deep_inside_counts(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "checkpoint-6", step=6)
    (folder / "global_step6").mkdir()
    (folder / "global_step6" / "optim_states.pt").write_bytes(b"")
    backdate(folder, 3600)
    touch(folder / "global_step6" / "optim_states.pt")
    [c] = discover(tmp_path)
    assert not c.complete and c.reason.startswith("modified 0 s ago")


def test_several_problems_are_all_told(tmp_path):
    folder, _ = save_checkpoint(tmp_path / "step9.tmp", sharded=True, trainer_state=False)
    shards(folder)[0].unlink()
    break_config(folder, "missing")
    [c] = discover(tmp_path, now=time.time())
    assert c.reason.split("; ")[0] == "config.json is missing"
    assert "listed in model.safetensors.index.json is missing" in c.reason
    assert "'step9.tmp' marks a checkpoint still being written" in c.reason
    assert "waiting 30 s quiet period" in c.reason


def test_a_folder_removed_while_discovering_is_skipped(tmp_path, monkeypatch):
    make_run(tmp_path, [1, 2])
    from pipeline.checkpoints import discover as mod

    walk = mod._Folder.walk

    def rotating(self):
        if self.path.endswith("checkpoint-1"):
            shutil.rmtree(self.path)
        return walk(self)

    monkeypatch.setattr(mod._Folder, "walk", rotating)
    assert [c.step for c in discover(tmp_path)] == [2]


# ------------------------------------------------------------------------------------------ one folder per step


def test_two_complete_folders_for_one_step_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "step100", trainer_state=False)
    save_checkpoint(tmp_path / "checkpoint-100", step=100)
    save_checkpoint(tmp_path / "checkpoint-200", step=200)
    found = settled(tmp_path)
    assert [c.step for c in found] == [100, 200]
    c = found[0]
    assert not c.complete and c.unreadable and c.path == str(tmp_path / "checkpoint-100")
    assert c.reason == (
        "2 complete checkpoints claim step 100 (checkpoint-100, step100); sinktrace will not guess which one to "
        "replay: remove or rename all but one"
    )


def test_complete_folder_wins_over_its_staging_copy(tmp_path):
    save_checkpoint(tmp_path / "checkpoint-100", step=100)
    save_checkpoint(tmp_path / "checkpoint-100.tmp", step=100)
    [c] = settled(tmp_path)
    assert c.complete and c.path == str(tmp_path / "checkpoint-100")


def test_incomplete_claimants_are_named(tmp_path):
    save_checkpoint(tmp_path / "step5-tmp", trainer_state=False)
    save_checkpoint(tmp_path / "tmp-checkpoint-5", trainer_state=False)
    [c] = settled(tmp_path)
    assert not c.complete and c.path == str(tmp_path / "step5-tmp")
    assert c.reason.endswith("; step 5 is also claimed by tmp-checkpoint-5")


# ------------------------------------------------------------------------------------------ torch.save files


def save_torch(path, step=None, **extra):
    """A torch.save file holding a model state dict, and a step field when given (nanoGPT's iter_num)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.ones(2)}, **({"iter_num": step} if step is not None else {}), **extra}, path)
    return path


@pytest.mark.parametrize("fmt", ["auto", "torch"])
def test_step_folder_holding_one_torch_file_of_any_name(tmp_path, fmt):
    a = save_torch(tmp_path / "step_5" / "ckpt.pt", 5)
    b = save_torch(tmp_path / "step-10" / "weights.pth")
    c = save_torch(tmp_path / "iter_0000015" / "last.ckpt")
    save_torch(tmp_path / "iter_0000015" / "optimizer.pt")  # training state beside the model is no candidate
    found = settled(tmp_path, format=fmt)
    assert [(c.step, c.complete, c.format, c.step_source) for c in found] == [
        (5, True, "torch", "folder name"),
        (10, True, "torch", "folder name"),
        (15, True, "torch", "folder name"),
    ]
    assert [c.weight_files for c in found] == [(str(a),), (str(b),), (str(c),)]


def test_root_files_named_with_their_step(tmp_path):
    names = {10: "ckpt_10.pt", 20: "run-20.pth", 30: "model_000030.pt", 40: "ema_40.ckpt", 50: "iter-000050-ckpt.pth"}
    for name in names.values():
        save_torch(tmp_path / name)  # the step is the name's: the files record none
    save_torch(tmp_path / "optimizer_60.pt")
    save_torch(tmp_path / "ckpt.pt", 70)  # nanoGPT's live file beside the series it was copied into
    backdate(tmp_path, 3600)
    found = discover(tmp_path)
    assert [(c.step, c.complete, c.step_source, c.weight_files) for c in found] == [
        (step, True, "file name", (str(tmp_path / name),)) for step, name in names.items()
    ]


def test_root_that_is_a_step_folder_holding_a_torch_file(tmp_path):
    save_torch(tmp_path / "step_7" / "model.pt")
    backdate(tmp_path, 3600)
    [c] = discover(tmp_path / "step_7")
    assert (c.step, c.complete, c.format) == (7, True, "torch")


def test_several_torch_files_in_a_folder_are_ambiguous_unless_one_is_litgpts(tmp_path):
    save_torch(tmp_path / "step_1" / "model.pt")
    save_torch(tmp_path / "step_1" / "ema.pt")
    save_torch(tmp_path / "step_2" / "lit_model.pth")
    save_torch(tmp_path / "step_2" / "initial.pth")
    one, two = settled(tmp_path)
    assert (one.complete, one.unreadable, one.weight_files) == (False, True, ())
    assert one.reason == (
        "2 torch.save files (ema.pt, model.pt) and sinktrace will not guess which one holds the model: keep one per "
        "step folder, or save them as <name>_<N>.pt in the run's folder; it holds ema.pt, model.pt"
    )
    assert two.complete and two.weight_files == (str(tmp_path / "step_2" / "lit_model.pth"),)


@pytest.mark.parametrize(
    "fmt, reason",
    [
        ("dcp", "no DCP (.metadata and *.distcp) weights (checkpoints.format=dcp); it holds ckpt.pt"),
        (
            "hf",
            "config.json is missing; no safetensors weights, only torch.save files (ckpt.pt): set "
            "checkpoints.format=torch; it holds ckpt.pt",
        ),
    ],
)
def test_a_finished_folder_in_another_format_is_unreadable_not_waited_for(tmp_path, fmt, reason):
    save_torch(tmp_path / "step_3" / "ckpt.pt", 3)
    [c] = settled(tmp_path, format=fmt)
    assert (c.step, c.complete, c.unreadable, c.reason) == (3, False, True, reason)


def test_unknown_file_is_unreadable_once_quiet_and_unfinished_before(tmp_path):
    folder = tmp_path / "step_4"
    folder.mkdir()
    (folder / "weights.npz").write_bytes(b"PK")
    [c] = discover(tmp_path, now=time.time())  # just written: it may still become a checkpoint
    assert not c.unreadable and "quiet period" in c.reason
    [c] = settled(tmp_path)
    assert c.unreadable and c.reason == (
        "config.json is missing; no weights: neither model.safetensors nor model.safetensors.index.json; it holds "
        "weights.npz"
    )


# ------------------------------------------------------------------------------------------ fsspec


def test_fsspec_url_matches_local(tmp_path):
    make_run(tmp_path, [1, 2], sharded=True)
    save_pickled_only(tmp_path / "checkpoint-3")
    shards(tmp_path / "checkpoint-2")[0].unlink()
    fs = fsspec.filesystem("memory")
    base = f"/sinktrace-test-{os.getpid()}-{time.time_ns()}"
    try:
        fs.put(str(tmp_path), base, recursive=True)
        local = discover(tmp_path, quiet_seconds=0)
        remote = discover(f"memory://{base}", quiet_seconds=0)
        assert [(c.step, c.complete, c.reason) for c in remote] == [(c.step, c.complete, c.reason) for c in local]
        assert remote[0].path == f"memory://{base}/checkpoint-1"
        assert all(w.startswith(f"memory://{base}/checkpoint-1/model-") for w in remote[0].weight_files)
        # memory files carry their creation time, which is also their last change: just written, so not quiet
        assert "quiet period" in discover(f"memory://{base}")[0].reason
        with pytest.raises(FileNotFoundError):
            discover(f"memory://{base}/nope")
    finally:
        fs.rm(base, recursive=True)


def test_file_url(tmp_path):
    make_run(tmp_path, [1])
    assert [c.path for c in discover(f"file://{tmp_path}")] == [str(tmp_path / "checkpoint-1")]


def test_trainer_state_of_a_real_trainer_layout(tmp_path):
    """The fields the HF Trainer writes (TrainerState.save_to_json): only global_step and the token count matter."""
    folder, _ = save_checkpoint(tmp_path / "checkpoint-500", trainer_state=False, training_files=True)
    state = {
        "best_global_step": None,
        "best_metric": None,
        "epoch": 1.0,
        "eval_steps": 500,
        "global_step": 500,
        "is_hyper_param_search": False,
        "log_history": [{"loss": 2.1, "step": 500}],
        "max_steps": 1000,
        "num_input_tokens_seen": 2048000,
        "num_train_epochs": 2,
        "save_steps": 500,
        "total_flos": 1.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
    backdate(folder, 3600)
    [c] = discover(tmp_path)
    assert (c.step, c.tokens_seen, c.complete) == (500, 2048000, True)
