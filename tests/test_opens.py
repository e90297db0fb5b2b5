"""Each checkpoint file is opened as few times as the replay needs: a checkpoint is opened once
(`pipeline.checkpoints.opened`) and handed to everything that reads it.

Opens are counted in this process: Python's `open`/`os.open` through the interpreter's "open" audit event,
`safetensors.safe_open` (which opens files from Rust, unseen by the audit hook) by a spy put in place of every
reference to it that loaded modules hold (transformers' included), and `torch.load` by a spy.
"""

import collections
import os
import sys

import pytest
import safetensors
import torch
from ckpt_factory import save_checkpoint

from pipeline.cli import compose, run
from pipeline.probe import build_probe
from pipeline.records import Checkpoint
from pipeline.replay import ModelCache, ReplaySettings, replay
from tests import trainer_ckpts as tc

pytestmark = pytest.mark.usefixtures("one_thread")

_COUNTS: collections.Counter | None = None  # the open counter recording now, if any


def _audit(event, args):
    if _COUNTS is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _COUNTS[os.path.realpath(os.fsdecode(args[0]))] += 1


sys.addaudithook(_audit)  # a hook cannot be removed: it records only while a test's counter is set


@pytest.fixture
def opens(monkeypatch):
    """A Counter {real path: opens} recording while the test runs; `opens.loads` counts torch.load per path."""
    global _COUNTS
    import transformers.modeling_utils  # noqa: F401

    import pipeline.replay.layered  # noqa: F401  (every module that may call safe_open is loaded before the spy)

    counts = collections.Counter()
    counts.loads = collections.Counter()
    safe_open, load = safetensors.safe_open, torch.load

    def spy_safe_open(path, *args, **kwargs):
        counts[os.path.realpath(os.fspath(path))] += 1
        return safe_open(path, *args, **kwargs)

    def spy_load(f, *args, **kwargs):
        counts.loads[os.path.realpath(os.fspath(f))] += 1
        return load(f, *args, **kwargs)

    for module in list(sys.modules.values()):
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if value is safe_open:
                monkeypatch.setattr(module, name, spy_safe_open)
    monkeypatch.setattr(torch, "load", spy_load)
    _COUNTS = counts
    yield counts
    _COUNTS = None


def of(counts, folder, name):
    return counts[os.path.realpath(os.path.join(folder, name))]


def hf_checkpoints(root, steps):
    out = []
    for step in steps:
        folder, _ = save_checkpoint(root / f"checkpoint-{step}", step=step, seed=step)
        out.append(Checkpoint(step, str(folder), (str(folder / "model.safetensors"),), complete=True))
    return out


@pytest.mark.parametrize("max_device_memory", [None, "1KB"], ids=["whole", "layered"])
def test_a_folder_replay_opens_the_weights_at_most_twice_and_the_config_once(tmp_path, opens, max_device_memory):
    first, second = hf_checkpoints(tmp_path, [1, 2])
    probe = build_probe(compose(["probe.rows=2", "probe.seq_len=16"]).probe, {"vocab_size": 101})
    settings = ReplaySettings(device="cpu", dtype="float32", measure=[], max_device_memory=max_device_memory)
    models = ModelCache()
    opens.clear()
    replay(first, probe, settings, second, models=models)
    replay(second, probe, settings, models=models)  # whole: into the model kept from the first
    for c in (first, second):
        assert of(opens, c.path, "config.json") == 1
    # the replay's own open; the second's weights were also opened by the first replay's read-ahead (which only
    # asks the kernel to start reading them)
    assert of(opens, first.path, "model.safetensors") == 1
    assert of(opens, second.path, "model.safetensors") == 2
    assert not opens.loads


def test_a_folder_run_opens_each_config_once_and_the_first_once_more_for_the_store(tmp_path, opens):
    hf_checkpoints(tmp_path / "run", [0, 10, 20])
    store = tmp_path / "s.zarr"
    opens.clear()
    settings = ["checkpoints.quiet_seconds=0", "stages=[replay]", "probe.rows=2", "probe.seq_len=16"]
    assert run(compose([f"checkpoints.root={tmp_path / 'run'}", f"store.path={store}", *settings])) == 0
    folders = [tmp_path / "run" / f"checkpoint-{s}" for s in (0, 10, 20)]
    # the driver reads the first checkpoint's config to set the store up, in its own process on a cluster
    assert [of(opens, f, "config.json") for f in folders] == [2, 1, 1]
    assert [of(opens, f, "model.safetensors") for f in folders] == [1, 2, 2]


def test_a_torch_save_run_loads_each_file_once_and_the_first_once_more_for_the_store(tmp_path, opens):
    tc.nanogpt_series(tmp_path / "out", [0, 100, 200], "step_{}/ckpt.pt")
    store = tmp_path / "s.zarr"
    opens.clear()
    settings = ["checkpoints.quiet_seconds=0", "stages=[replay]", "probe.rows=2", "probe.seq_len=16"]
    assert run(compose([f"checkpoints.root={tmp_path / 'out'}", f"store.path={store}", *settings])) == 0
    files = [tmp_path / "out" / f"step_{s}" / "ckpt.pt" for s in (0, 100, 200)]
    # the driver's set-up derives the first one's config and key map from one load
    assert [opens.loads[os.path.realpath(f)] for f in files] == [2, 1, 1]


def test_the_route_and_the_fingerprint_are_worked_out_once_per_replay(tmp_path, monkeypatch):
    """Both come from the config, once per checkpoint."""
    from torch import nn

    from pipeline.checkpoints import model_config

    [c] = hf_checkpoints(tmp_path, [1])
    probe = build_probe(compose(["probe.rows=2", "probe.seq_len=16"]).probe, {"vocab_size": 101})
    calls = collections.Counter()
    for name in ("attention_route", "config_fingerprint"):
        original = getattr(model_config, name)

        def spy(arg, _name=name, _original=original):
            calls[_name, "model" if isinstance(arg, nn.Module) else "config"] += 1
            return _original(arg)

        for module in list(sys.modules.values()):
            if module.__name__.startswith("pipeline") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, spy)
    ds = replay(c, probe, ReplaySettings(device="cpu", dtype="float32", measure=[]))
    # measure checks the model it is handed by its class (a class attribute), whatever the checkpoint
    assert calls["attention_route", "config"] == 1 and calls["config_fingerprint", "config"] == 1
    assert ds.attrs["attention_route"] == "sinkstats"
