"""A run of DCP folders or torch.save files keeps its model between steps, as a run of Hugging Face folders does:
one model built, each step's tensors copied into it, every statistic and digest bit-identical to a fresh build;
the key map runs once per replay over the real tensors (plus once over their names and shapes, for the memory
budget) and the loader builds transformers' config once, from the opened checkpoint."""

import sys
from dataclasses import replace

import pytest
import xarray as xr

from pipeline.checkpoints import keymaps
from pipeline.checkpoints.discover import discover
from pipeline.cli import compose
from pipeline.probe import build_probe
from pipeline.replay import ModelCache, ReplaySettings, replay
from tests import trainer_ckpts as tc

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ReplaySettings(device="cpu", dtype="float32", measure=["outputs"])


def torchtitan_run(root):
    reference = tc.llama(seed=1)
    for i, step in enumerate((100, 200, 300)):
        tc.torchtitan_step(root / "run", step, tc.llama(seed=1 + i))
    config = str(root / "config.json")
    reference.config.to_json_file(config)
    return [replace(c, model_config=config) for c in discover(str(root / "run"), quiet_seconds=0)]


def nanogpt_run(root):
    for i, step in enumerate((100, 200, 300)):
        tc.nanogpt_checkpoint(root / "run" / f"step_{step}", tc.gpt2(seed=20 + i), step)
    return discover(str(root / "run"), quiet_seconds=0)


@pytest.fixture
def counted(monkeypatch):
    """How many models transformers built, key map runs over real and meta tensors, and config objects the
    opened checkpoint made (`checkpoints.model_config` makes its own to fingerprint and route a config)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    counts = {"builds": 0, "apply": 0, "plan": 0, "configs": 0}

    def counting(owner, name, key, wrap=staticmethod):
        original = getattr(owner, name)

        def counted_call(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrap(counted_call) if wrap else counted_call)

    counting(AutoModelForCausalLM, "from_config", "builds")
    counting(keymaps, "apply", "apply", wrap=None)
    counting(keymaps, "plan", "plan", wrap=None)
    original_from_dict = PretrainedConfig.from_dict.__func__

    def from_dict(cls, *args, **kwargs):
        counts["configs"] += sys._getframe(1).f_code.co_filename.endswith("opened.py")
        return original_from_dict(cls, *args, **kwargs)

    monkeypatch.setattr(PretrainedConfig, "from_dict", classmethod(from_dict))
    return counts


@pytest.mark.parametrize("make_run", [torchtitan_run, nanogpt_run], ids=["dcp", "torch.save"])
def test_a_mapped_run_builds_its_model_once(tmp_path, make_run, counted):
    found = make_run(tmp_path)
    assert [c.step for c in found] == [100, 200, 300] and found[0].format in ("dcp", "torch")
    probe = build_probe(compose(["probe.rows=2", "probe.seq_len=16"]).probe, {"vocab_size": 101})
    fresh = [replay(c, probe, SETTINGS) for c in found]
    assert counted == {"builds": 3, "apply": 3, "plan": 3, "configs": 3}
    for key in counted:
        counted[key] = 0
    models = ModelCache()
    kept = [replay(c, probe, SETTINGS, models=models) for c in found]
    assert counted == {"builds": 1, "apply": 3, "plan": 3, "configs": 3}
    for a, b in zip(fresh, kept, strict=True):
        xr.testing.assert_identical(a, b)  # bit for bit, the digest included
    assert len({str(ds.weights_digest.values) for ds in kept}) == 3
    assert fresh[0]["sink_mass"].values.tolist() != fresh[1]["sink_mass"].values.tolist()
