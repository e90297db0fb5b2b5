"""The demo run builder: checkpoint layout, the task's rules on real batches, resuming after a kill."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import demo
from pipeline.demo import (
    BOS,
    COMPLETE_MARKER,
    DemoRecipe,
    build_demo_run,
    demo_batch,
    demo_config,
    demo_task,
    ensure_demo_run,
)
from tests.demo_emergence import emergence_table

TINY = dict(steps=60, every=20, seed=0, batch_size=8)  # the default model, a smaller batch: seconds to build
TINY_STEPS = [0, 20, 40, 60]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 60-step run with checkpoints every 20 steps, built once for the tests that only read it."""
    return build_demo_run(tmp_path_factory.mktemp("demo") / "run", progress=False, **TINY)


def checkpoint_dirs(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))


def weights(root, step):
    return load_file(root / f"checkpoint-{step}" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------ the layout


def test_tiny_build_writes_loadable_trainer_checkpoints(tiny_run):
    from transformers import AutoModelForCausalLM

    assert checkpoint_dirs(tiny_run) == sorted(f"checkpoint-{s}" for s in TINY_STEPS)
    assert (tiny_run / COMPLETE_MARKER).is_file()
    assert not list(tiny_run.glob("*.tmp"))
    for step in TINY_STEPS:
        folder = tiny_run / f"checkpoint-{step}"
        assert {"config.json", "model.safetensors", "trainer_state.json"} <= {p.name for p in folder.iterdir()}
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == step
        assert state["num_input_tokens_seen"] == step * TINY["batch_size"] * DemoRecipe.seq_len
        assert [entry["step"] for entry in state["log_history"]] == [s for s in TINY_STEPS if 0 < s <= step]

        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert model.config.bos_token_id == BOS
        assert model.config.vocab_size == DemoRecipe.vocab_size
        tokens = demo_batch(demo_task(seed=0), batch_size=2, seq_len=DemoRecipe.seq_len, seed=0, step=0)
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        assert logits.shape == (2, DemoRecipe.seq_len, DemoRecipe.vocab_size)
        assert torch.isfinite(logits).all()


def test_training_moves_the_weights_and_lowers_the_loss(tiny_run):
    first, last = weights(tiny_run, 0), weights(tiny_run, 60)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    history = json.loads((tiny_run / "checkpoint-60" / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["loss"] < history[0]["loss"] < np.log(DemoRecipe.vocab_size) + 0.1


def test_demo_config_is_a_small_llama_with_bos():
    config = demo_config()
    assert config.model_type == "llama"
    assert config.bos_token_id == BOS
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 64, 2)
    assert config.max_position_embeddings == DemoRecipe.seq_len == 32  # the trained length, and no more


def test_gpt2_family_trains_and_saves_a_gpt2_without_dropout(tmp_path):
    from transformers import AutoModelForCausalLM

    root = build_demo_run(tmp_path / "run", steps=2, every=2, batch_size=4, family="gpt2", progress=False)
    model = AutoModelForCausalLM.from_pretrained(root / "checkpoint-2")
    assert model.config.model_type == "gpt2"
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (4, 64, 32)
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0
    assert any(not torch.equal(weights(root, 0)[k], weights(root, 2)[k]) for k in weights(root, 0))


@pytest.mark.parametrize("field, value", [("family", "bert"), ("packing", "document")])
def test_unknown_family_or_packing_is_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        DemoRecipe(**{field: value})


def test_schedule_includes_step_zero_and_the_last_step():
    assert DemoRecipe(steps=100, every=30).schedule() == [0, 30, 60, 90, 100]
    assert DemoRecipe(steps=60, every=20).schedule() == TINY_STEPS


# -------------------------------------------------------------------------------------------------- the task


@pytest.mark.parametrize("seed", [0, 7])
def test_batches_follow_the_bigram_backcopy_rules(seed):
    task = demo_task(seed=seed)
    tokens = demo_batch(task, batch_size=64, seq_len=64, seed=seed, step=3).numpy()
    assert tokens.shape == (64, 64) and tokens.dtype == np.int64
    assert (tokens[:, 0] == BOS).all()
    assert ((tokens[:, 1:] >= 1) & (tokens[:, 1:] < task.vocab_size)).all()  # BOS only at position 0
    assert not task.is_trigger(tokens[:, 1]).any()  # a trigger right after BOS would copy BOS

    copies = bigrams = 0
    for row in tokens:
        for t in range(1, len(row) - 1):
            if task.is_trigger(row[t]):
                assert row[t + 1] == row[t - 1], (row, t)
                copies += 1
            else:
                assert int(row[t + 1]) in task.allowed_next(int(row[t])), (row, t)
                bigrams += 1
    assert copies > 50 and bigrams > 5 * copies  # both rules are exercised, copies are the rarer case
    # a bigram step lands on a trigger with probability trigger_share
    assert abs(copies / bigrams - DemoRecipe.trigger_share) < 0.03


def test_stream_packed_rows_are_windows_of_the_task_without_bos():
    task = demo_task(seed=0)
    tokens = demo_batch(task, batch_size=64, seq_len=32, seed=0, step=3, packing="stream").numpy()
    assert tokens.shape == (64, 32)
    assert ((tokens >= 1) & (tokens < task.vocab_size)).all()  # no BOS anywhere, position 0 included
    assert len(set(tokens[:, 0])) > 32  # position 0 holds whatever token the cut left there
    copies = 0
    for row in tokens:
        for t in range(1, len(row) - 1):  # from t = 1 on the rules hold (a copy at t = 0 repeats a token cut off)
            if task.is_trigger(row[t]):
                assert row[t + 1] == row[t - 1], (row, t)
                copies += 1
            else:
                assert int(row[t + 1]) in task.allowed_next(int(row[t])), (row, t)
    assert copies > 50
    assert torch.equal(
        demo_batch(task, batch_size=8, seq_len=32, seed=0, step=3, packing="stream"),
        demo_batch(task, batch_size=8, seq_len=32, seed=0, step=3, packing="stream"),
    )


def test_the_chain_is_a_fixed_random_sparse_chain():
    task = demo_task(seed=0)
    assert demo_task(seed=0).triggers == task.triggers
    np.testing.assert_array_equal(demo_task(seed=0).successors, task.successors)
    assert demo_task(seed=1).triggers != task.triggers or not np.array_equal(
        demo_task(seed=1).successors, task.successors
    )
    assert len(task.triggers) == DemoRecipe.n_triggers
    np.testing.assert_allclose(task.probs[1:].sum(axis=1), 1.0)
    for token in range(1, task.vocab_size):  # a few plain successors, plus every trigger
        assert len(task.allowed_next(token) - set(task.triggers)) == DemoRecipe.branching
        assert set(task.triggers) <= task.allowed_next(token)
    # the bigram rule is stochastic: a frequent token is followed by several different tokens in real batches
    tokens = demo_batch(task, batch_size=64, seq_len=64, seed=0, step=0).numpy()
    prev, nxt = tokens[:, 1:-1].ravel(), tokens[:, 2:].ravel()
    keep = ~task.is_trigger(tokens[:, :-2].ravel()) & ~task.is_trigger(prev)
    common = np.bincount(prev[keep]).argmax()
    assert len(set(nxt[keep][prev[keep] == common])) > 1


def test_a_lower_concentration_gives_sharper_bigrams():
    flat, sharp = demo_task(seed=0), demo_task(seed=0, concentration=0.2)
    assert sharp.triggers == flat.triggers
    np.testing.assert_allclose(sharp.probs[1:].sum(axis=1), 1.0)
    top = {
        name: task.probs[1:, : DemoRecipe.branching].max(axis=1).mean()
        for name, task in (("flat", flat), ("sharp", sharp))
    }
    assert top["sharp"] > top["flat"] + 0.1, top
    with pytest.raises(ValueError, match="concentration must be > 0"):
        DemoRecipe(concentration=0)


def test_batches_are_deterministic_by_seed_and_step():
    task = demo_task(seed=0)
    a = demo_batch(task, batch_size=8, seq_len=64, seed=0, step=5)
    assert torch.equal(a, demo_batch(task, batch_size=8, seq_len=64, seed=0, step=5))
    assert not torch.equal(a, demo_batch(task, batch_size=8, seq_len=64, seed=0, step=6))
    assert not torch.equal(a, demo_batch(task, batch_size=8, seq_len=64, seed=1, step=5))


# ------------------------------------------------------------------------------------------ resuming a build


def test_rebuild_after_losing_the_last_checkpoint_resumes(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    kept = (run / "checkpoint-40" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(run / "checkpoint-60")
    (run / COMPLETE_MARKER).unlink()
    half = run / "checkpoint-60.tmp"  # what a kill during the save leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100)

    build_demo_run(run, progress=False, **TINY)

    assert checkpoint_dirs(run) == sorted(f"checkpoint-{s}" for s in TINY_STEPS)
    assert not list(run.glob("*.tmp"))
    assert (run / COMPLETE_MARKER).is_file()
    assert (run / "checkpoint-40" / "model.safetensors").stat().st_mtime_ns == kept  # resumed, not restarted
    assert_same_weights(weights(run, 60), weights(tiny_run, 60))
    state = json.loads((run / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60 and [e["step"] for e in state["log_history"]] == [20, 40, 60]


def test_kill_during_a_save_leaves_no_complete_looking_checkpoint(tiny_run, tmp_path, monkeypatch):
    write_state = demo._write_trainer_state

    def killed_at_40(folder, recipe, step, log_history):
        if step == 40:
            raise KeyboardInterrupt
        write_state(folder, recipe, step, log_history)

    monkeypatch.setattr(demo, "_write_trainer_state", killed_at_40)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build_demo_run(run, progress=False, **TINY)
    assert checkpoint_dirs(run) == ["checkpoint-0", "checkpoint-20", "checkpoint-40.tmp"]
    assert not (run / COMPLETE_MARKER).exists()

    monkeypatch.setattr(demo, "_write_trainer_state", write_state)
    build_demo_run(run, progress=False, **TINY)
    assert checkpoint_dirs(run) == sorted(f"checkpoint-{s}" for s in TINY_STEPS)
    assert_same_weights(weights(run, 60), weights(tiny_run, 60))  # the resumed run is the uninterrupted one


def test_a_finished_build_is_not_redone(tiny_run, tmp_path, monkeypatch):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    monkeypatch.setattr(demo, "_train", lambda *a, **k: pytest.fail("a complete run was trained again"))
    assert build_demo_run(run, progress=False, **TINY) == run


def test_a_folder_with_another_recipe_is_refused(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(ValueError, match="another recipe.*steps"):
        build_demo_run(run, progress=False, **(TINY | {"steps": 80}))
    assert checkpoint_dirs(run) == sorted(f"checkpoint-{s}" for s in TINY_STEPS)


def test_ensure_demo_run_builds_once_into_the_cache(tmp_path, monkeypatch):
    root = ensure_demo_run(tmp_path, steps=4, every=2, seed=0, batch_size=8, progress=False)
    assert root.parent == tmp_path and root.name == DemoRecipe(steps=4, every=2, batch_size=8).name()
    assert checkpoint_dirs(root) == ["checkpoint-0", "checkpoint-2", "checkpoint-4"]

    monkeypatch.setattr(demo, "_train", lambda *a, **k: pytest.fail("the cached run was rebuilt"))
    assert ensure_demo_run(tmp_path, steps=4, every=2, seed=0, batch_size=8, progress=False) == root
    assert DemoRecipe(steps=4, every=2, seed=1, batch_size=8).name() != root.name


def test_two_builders_of_one_folder_take_turns(tmp_path, monkeypatch):
    """Two first runs at once (two processes, or here two threads, each with its own lock file handle): one trains,
    the other waits and finds the run complete."""
    import threading
    import time

    recipe = dict(steps=4, every=2, seed=0, batch_size=8)
    calls, start = [], threading.Barrier(2)

    def train(root, recipe, progress):  # stands in for the training: long enough for the other builder to arrive
        calls.append("start")
        time.sleep(0.5)
        for step in recipe.schedule():
            (root / f"checkpoint-{step}").mkdir()
            (root / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        calls.append("end")

    def build():
        start.wait()
        build_demo_run(tmp_path / "run", progress=False, **recipe)

    monkeypatch.setattr(demo, "_train", train)
    builders = [threading.Thread(target=build) for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    assert calls == ["start", "end"]


def test_emergence_table_reads_every_checkpoint(tiny_run):
    table = emergence_table(tiny_run, rows=4)
    assert [row["step"] for row in table] == TINY_STEPS
    for row in table:
        assert 0 < row["non_trigger"] < 1 and 0 < row["all"] < 1 and 0 < row["random"] < 1
    # at initialisation attention is close to uniform over the t+1 visible keys: mean of 1/(t+1) over t=1..T-1
    T = DemoRecipe.seq_len
    uniform = np.mean([1 / (t + 1) for t in range(1, T)])
    assert abs(table[0]["all"] - uniform) < 0.01


def test_the_demo_run_is_probed_at_its_trained_length(trained_run, monkeypatch, sinktrace_home, capsys):
    from pipeline import open_sinks
    from pipeline.cli import compose, fit_probe_to_demo, run, store_path

    monkeypatch.setattr(demo, "ensure_demo_run", lambda cache: trained_run)  # the demo recipe, fewer steps
    cfg = compose(["stages=[replay]", "probe.rows=4", "replay.steps=[0]"])
    assert cfg.probe.seq_len == 64  # the default probe, for any other run
    assert run(cfg) == 0
    assert "trained on 32-token rows: probing it with probe.seq_len=32" in capsys.readouterr().out
    ds = open_sinks(store_path(cfg, str(trained_run)), "random-T32-r4-s0-bos")
    assert ds.attrs["probe_seq_len"] == DemoRecipe.seq_len == 32 and ds.sizes["layer"] == 4

    shorter = compose(["probe.seq_len=16"])
    fit_probe_to_demo(shorter)
    assert shorter.probe.seq_len == 16
    capsys.readouterr()
    longer = compose(["probe.seq_len=48"])  # a length asked for is kept, with a note
    fit_probe_to_demo(longer)
    assert longer.probe.seq_len == 48
    said = capsys.readouterr().out
    assert "queries beyond them (probe.seq_len=48) sit at distances from position 0 it never saw" in said
