"""Each key map checked against the trainer's own model: the network sinktrace builds from what the trainer saved
computes the trainer model's logits and attention, or the run is refused, naming the setting.

For every map, a seeded property test draws configurations from the trainer's option space (head counts and
groups, head dims, rope bases and scalings, biases, norms, tied heads), builds the trainer's own model with random
weights (where the trainer's library is not installed here, the transformers model its converter targets), saves
it with the trainer's own writers (else under its names and layouts), and replays it: logits within 1e-5 in float32,
each head's attention matrix within 1e-5 of the one the trainer model computes, and sinktrace's measured statistics
equal to eager attention's on the model it built. A configuration with a setting the map does not carry must be
refused, and the refusal must name that setting.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.checkpoints import keymaps
from pipeline.checkpoints.discover import discover
from pipeline.checkpoints.statedict import ModelConfigNeeded, hf_config
from pipeline.replay.load import load_model
from pipeline.replay.measure import measure
from tests.ckpt_factory import backdate
from tests.reference import reference_stats

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

CONFIGS = 20  # per trainer
T = 16  # probe length: longer than the smallest original context drawn, so rope scaling shows


def probe(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, T))


def noisy(model, seed: int, std: float = 0.3):
    """Weights far from any initialisation, so that attention is peaked and every setting shows in the logits;
    norm weights near one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def replayed(root: Path):
    """What sinktrace builds from the run at `root` (its one checkpoint), in float32."""
    backdate(root, 3600)
    [ckpt] = discover(str(root), quiet_seconds=0)
    return ckpt, load_model(ckpt, device="cpu", dtype="float32")


def eager_attention(model, ids) -> list[torch.Tensor]:
    ref = copy.deepcopy(model).float().eval()
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        return list(ref(input_ids=torch.as_tensor(ids), output_attentions=True).attentions)


def causal_softmax(q, k, scale: float) -> torch.Tensor:
    """The attention matrix of a query and key as a trainer hands them to its attention kernel (key/value heads
    repeated for grouped queries where the trainer has not yet), computed explicitly."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    return torch.softmax(((q @ k.mT) * scale).masked_fill(~causal, float("-inf")), dim=-1)


def assert_same_network(model, ids, logits, attentions) -> None:
    """`model` (sinktrace's) against the trainer model's logits and per-layer attention matrices, and sinktrace's
    measurement against eager attention on `model`."""
    with torch.no_grad():
        got = model(input_ids=torch.as_tensor(ids)).logits
    # float32 sums in another order (SDPA against eager, fused against split projections): 1e-5 of logits near 5
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    for layer, (mine, theirs) in enumerate(zip(eager_attention(model, ids), attentions, strict=True)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5, msg=lambda m, i=layer: f"layer {i}: {m}")
    stats, want = measure(model, ids, measures=()), reference_stats(model, ids)
    for name in want:
        np.testing.assert_allclose(stats[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def refused(root: Path, field: str) -> None:
    backdate(root, 3600)
    [ckpt] = discover(str(root), quiet_seconds=0)
    with pytest.raises(ModelConfigNeeded, match=rf"setting \S*{field}="):
        hf_config(ckpt)


# ------------------------------------------------------------------------------------------ litgpt

needs_litgpt = pytest.mark.skipif(
    importlib.util.find_spec("litgpt") is None, reason="scripts/install.sh installs litgpt beside the test extra"
)

# Settings the litgpt map does not carry, each with a value that changes the network (refused by name).
LITGPT_REFUSED = {
    "norm_qk_type": "olmo2",
    "attention_scores_scalar": 3,
    "scale_embeddings": True,
    "rotary_percentage": 0.5,
    "final_logit_softcapping": 5.0,
    "attention_logit_softcapping": 5.0,
    "post_attention_norm": True,
    "lm_head_bias": True,
    "rope_interleave": True,
    "parallel_residual": True,
    "norm_class_name": "LayerNorm",
}


def litgpt_config(rng: random.Random, extra: str | None = None):
    """A Llama-style litgpt Config drawn from the option space its map claims, with setting `extra` of
    LITGPT_REFUSED."""
    from litgpt.config import Config

    n_head = rng.choice([1, 2, 4])
    options = dict(
        name="tiny",
        block_size=64,
        n_layer=rng.choice([1, 2]),
        n_embd=rng.choice([16, 24, 32]),
        n_head=n_head,
        n_query_groups=rng.choice([g for g in (1, 2, 4) if n_head % g == 0]),
        head_size=rng.choice([4, 8, 12]),
        vocab_size=(vocab := rng.randrange(40, 90)),
        padded_vocab_size=vocab,
        norm_class_name="RMSNorm",
        norm_eps=rng.choice([1e-5, 1e-6]),
        mlp_class_name="LLaMAMLP",
        intermediate_size=rng.choice([24, 40]),
        parallel_residual=False,
        rotary_percentage=1.0,
        rope_base=rng.choice([100, 10000, 500000]),
    )
    block = rng.choice(["llama", "biased", "qkv-biased", "qk-norm"])  # Llama, Qwen 2 or Qwen 3 in transformers
    options["bias"] = block == "biased"
    options["attn_bias"] = block == "qkv-biased"
    options["norm_qk"] = block == "qk-norm"
    rope = rng.choice(["plain", "llama3", "llama3", "linear", "condense"])
    if rope == "llama3":  # Llama 3.x's scaling, with an original context the probe outruns
        options["rope_adjustments"] = {
            "factor": rng.choice([2.0, 8.0, 32.0]),
            "low_freq_factor": 1.0,
            "high_freq_factor": rng.choice([2.0, 4.0]),
            "original_max_seq_len": rng.choice([4, 8, 12]),
        }
    elif rope == "linear":
        options["rope_adjustments"] = {"factor": rng.choice([2.0, 4.0])}
    elif rope == "condense":
        options["rope_condense_ratio"] = rng.choice([2, 4])
    if extra is not None:
        options[extra] = LITGPT_REFUSED[extra]
    if extra == "norm_qk_type":  # the kind of a QK-norm there is
        options |= {"norm_qk": True, "bias": False, "attn_bias": False}
    return Config(**options)


def litgpt_run(root: Path, config, seed: int):
    """litgpt pretrain's `step-<N:08d>/` from litgpt's own model and writers: `fabric.save` of the training state
    (the model's state dict under "model") into lit_model.pth, and `litgpt.utils.save_config`'s model_config.yaml."""
    from litgpt.model import GPT
    from litgpt.utils import save_config

    torch.manual_seed(seed)
    model = noisy(GPT(config), seed)
    folder = root / "step-00000040"
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iter_num": 160, "step_count": 40}, folder / "lit_model.pth")
    save_config(config, folder)
    return model


def litgpt_outputs(model, ids):
    """The litgpt model's logits and each layer's attention matrix (its scaled_dot_product_attention, recomputed
    explicitly from the query and key it is given, as litgpt's own softcapping path does)."""
    matrices = []

    def recording(attn):
        original = attn.scaled_dot_product_attention

        def sdpa(q, k, v, mask=None):
            matrices.append(causal_softmax(q, k, attn.mscale**2 / attn.config.head_size**0.5))
            return original(q, k, v, mask)

        return sdpa

    for block in model.transformer.h:
        block.attn.scaled_dot_product_attention = recording(block.attn)
    with torch.no_grad():
        logits = model(torch.as_tensor(ids))
    return logits, matrices


@needs_litgpt
@pytest.mark.parametrize("field", sorted(LITGPT_REFUSED))
def test_litgpt_settings_the_map_does_not_carry_are_refused_by_name(tmp_path, field):
    config = litgpt_config(random.Random(field), field)
    litgpt_run(tmp_path / "out", config, 0)
    refused(tmp_path / "out", field)


@needs_litgpt
def test_litgpt_llama3_rope_is_transformers_llama3(tmp_path):
    """A Llama 3.x run: the config sinktrace derives is transformers' own llama3 rope scaling."""
    from litgpt.config import Config

    config = Config.from_name("Llama-3.2-1B", n_layer=1, n_embd=32, n_head=4, n_query_groups=2, head_size=8)
    config = dataclasses.replace(config, padded_vocab_size=64, vocab_size=64, intermediate_size=48)
    litgpt_run(tmp_path / "out", config, 0)
    backdate(tmp_path / "out", 3600)
    [ckpt] = discover(str(tmp_path / "out"), quiet_seconds=0)
    derived = hf_config(ckpt)
    assert derived["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert {derived[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {None}


@needs_litgpt
def test_an_unknown_litgpt_setting_is_refused_by_name(tmp_path):
    """A field litgpt 0.5.13 does not have (a later release's, or a fork's) is not dropped."""
    from litgpt.config import Config

    config = Config.from_name("pythia-14m")
    saved = dataclasses.asdict(config) | {
        "norm_class_name": "RMSNorm",
        "mlp_class_name": "LLaMAMLP",
        "parallel_residual": False,
        "rotary_percentage": 1.0,
        "bias": False,
        "intermediate_size": 64,
        "attention_sink_tokens": 4,
    }
    with pytest.raises(keymaps.Unmapped, match=r"model_config.yaml: litgpt setting attention_sink_tokens=4 is unknown"):
        keymaps.module("litgpt").hf_config(saved, "model_config.yaml")
    assert yaml.safe_dump(saved)  # the file as litgpt writes it holds plain values only


@needs_litgpt
def test_litgpts_final_folder_is_named_at_discovery_and_replays_at_its_step_count(tmp_path, caplog):
    """litgpt pretrain's `final/` (save_checkpoint of the whole training state at the end) has no step in its
    name: discovery names it with how to replay it, and given as the root its step is the optimizer steps its
    step-<N> folders count (step_count), not the micro-batches (iter_num)."""
    import shutil

    litgpt_run(tmp_path / "out", litgpt_config(random.Random(2)), 2)
    shutil.copytree(tmp_path / "out" / "step-00000040", tmp_path / "out" / "final")
    backdate(tmp_path / "out", 3600)
    with caplog.at_level("WARNING", logger="pipeline.checkpoints.discover"):
        assert [c.step for c in discover(str(tmp_path / "out"), quiet_seconds=0)] == [40]
    assert "ignoring final: they hold a checkpoint, but their names give no step" in caplog.text
    assert "set checkpoints.root to it" in caplog.text
    [final] = discover(str(tmp_path / "out" / "final"), quiet_seconds=0)
    assert (final.step, final.step_source) == (40, "step_count field")


# ------------------------------------------------------------------------------------------ OLMo-core


def olmo_config(rng: random.Random, **extra):
    """An OLMo-core TransformerConfig drawn from the two block layouts its map claims (OLMo 2's reordered norms
    with QK-norm, and the pre-norm Llama block), with `extra` passed to `llama_like`."""
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    n_heads = rng.choice([1, 2, 4])
    reordered = rng.random() < 0.5
    options = dict(
        d_model=rng.choice([16, 32]),
        n_layers=rng.choice([1, 2]),
        n_heads=n_heads,
        n_kv_heads=rng.choice([g for g in (1, 2, 4) if n_heads % g == 0]),
        head_dim=rng.choice([None, 8, 12]),
        vocab_size=rng.randrange(40, 90),
        block_name=TransformerBlockType.reordered_norm if reordered else TransformerBlockType.default,
        qk_norm=reordered,
        layer_norm_eps=rng.choice([1e-5, 1e-6]),
        rope_theta=rng.choice([10_000, 500_000]),
        hidden_size_multiple_of=16,
        tie_word_embeddings=rng.random() < 0.3,
    )
    config = TransformerConfig.llama_like(**(options | extra))
    config.block.sequence_mixer.bias = rng.random() < 0.3  # biased q, k, v and output projections
    return config


def olmo_run(root: Path, config, seed: int, saved=None):
    """OLMo-core's `step<N>/`: its own model saved by its own checkpointer (save_model_and_optim_state into
    model_and_optim/), and the config.json its ConfigSaverCallback writes (the experiment config, whose `model` is
    `TransformerConfig.as_config_dict()`). `saved`: the config written, when not the model's."""
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    torch.manual_seed(seed)
    model = noisy(config.build(init_device="cpu"), seed)
    folder = root / "step40"
    save_model_and_optim_state(folder / "model_and_optim", model, torch.optim.AdamW(model.parameters()))
    (folder / "config.json").write_text(json.dumps({"run_name": "tiny", "model": (saved or config).as_config_dict()}))
    return model


def olmo_outputs(model, ids):
    """OLMo-core's logits and each layer's attention matrix, recomputed from the query and key its attention
    backend hands to PyTorch's SDPA."""
    from unittest import mock

    from olmo_core.nn.attention import backend

    sdpa, matrices = backend.F.scaled_dot_product_attention, []

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        matrices.append(causal_softmax(q, k, scale if scale is not None else q.shape[-1] ** -0.5))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    with mock.patch.object(backend.F, "scaled_dot_product_attention", recording), torch.no_grad():
        logits = model(torch.as_tensor(ids))
    return logits, matrices


WITH_LIBRARY = {  # a configuration drawn, the run written, the trainer model's outputs, its vocabulary
    "litgpt": (litgpt_config, litgpt_run, litgpt_outputs, "padded_vocab_size"),
    "olmo_core": (olmo_config, olmo_run, olmo_outputs, "vocab_size"),
}


@pytest.mark.parametrize("trainer", [pytest.param("litgpt", marks=needs_litgpt), "olmo_core"])
@pytest.mark.parametrize("seed", range(CONFIGS))
def test_maps_compute_the_trainers_own_model(tmp_path, trainer, seed):
    draw, write, outputs, vocab = WITH_LIBRARY[trainer]
    config = draw(random.Random(seed))
    model = write(tmp_path / "run", config, seed)
    ids = probe(getattr(config, vocab), seed)
    logits, attentions = outputs(model, ids)
    _, built = replayed(tmp_path / "run")
    assert_same_network(built, ids, logits, attentions)


def olmo_refused():
    """Settings the OLMo-core map does not carry, each as `llama_like` arguments and the field the refusal names."""
    from olmo_core.nn.attention import GateConfig, SlidingWindowAttentionConfig
    from olmo_core.nn.rope import PIRoPEScalingConfig

    return {
        "gate": ({"gate": GateConfig()}, "gate"),
        "sliding_window": ({"sliding_window": SlidingWindowAttentionConfig(pattern=[4, -1])}, "sliding_window"),
        "use_head_qk_norm": ({"use_head_qk_norm": True, "qk_norm": True}, "use_head_qk_norm"),
        "rope_scaling": ({"rope_scaling": PIRoPEScalingConfig(factor=2.0)}, "scaling"),
        "embed_scale": ({"embed_scale": 4.0}, "embed_scale"),
    }


@pytest.mark.parametrize("name", ["gate", "sliding_window", "use_head_qk_norm", "rope_scaling", "embed_scale"])
def test_olmo_core_settings_the_map_does_not_carry_are_refused_by_name(tmp_path, name):
    extra, field = olmo_refused()[name]
    rng = random.Random(name)
    plain = olmo_config(rng)
    olmo_run(tmp_path / "run", plain, 0, saved=olmo_config(random.Random(name), **extra))
    refused(tmp_path / "run", field)


def test_olmo_core_learned_sinks_and_feed_forward_biases_are_refused(tmp_path):
    """Settings on the block's parts themselves (learned sink logits, a biased MLP, scalable softmax), which
    llama_like does not take."""
    plain = olmo_config(random.Random(5))
    for part, field in (
        ("sequence_mixer", "attention_sinks"),
        ("feed_forward", "bias"),
        ("sequence_mixer", "scalable_softmax"),
    ):
        with_setting = copy.deepcopy(plain)
        setattr(getattr(with_setting.block, part), field, True)
        root = tmp_path / f"{part}-{field}"
        olmo_run(root, plain, 0, saved=with_setting)
        refused(root, f"{part}.{field}")


# ------------------------------------------------------------------------------------------ no trainer library here
# nanoGPT and nanochat ship no package (PyPI's `nanochat` is another project), megatron-core is not in the test
# extra, and torchtitan requires datasets, wandb and torchdata beside a model that needs FlexAttention: their maps
# are checked against the transformers model their converters target, its tensors written under the trainer's names
# and layouts (tests/trainer_ckpts.py).


def hf_outputs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)).logits
    return logits, eager_attention(model, ids)


def nanogpt_model(rng: random.Random):
    import transformers as tf

    n_head = rng.choice([1, 2, 4])
    config = tf.GPT2Config(
        n_layer=rng.choice([1, 2]),
        n_head=n_head,
        n_embd=n_head * rng.choice([4, 8, 12]),
        n_positions=rng.choice([32, 64]),
        vocab_size=rng.randrange(40, 90),
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 lies outside these vocabularies
        eos_token_id=None,
    )
    return tf.GPT2LMHeadModel(config)


def nanochat_model(rng: random.Random):
    import transformers as tf

    n_head = rng.choice([1, 2, 4])
    n_embd = n_head * rng.choice([4, 8, 12])
    config = tf.NanoChatConfig(
        vocab_size=rng.randrange(40, 90),
        hidden_size=n_embd,
        intermediate_size=4 * n_embd,
        num_hidden_layers=rng.choice([1, 2]),
        num_attention_heads=n_head,
        num_key_value_heads=rng.choice([g for g in (1, 2, 4) if n_head % g == 0]),
        max_position_embeddings=64,
    )
    return tf.NanoChatForCausalLM(config)


def torchtitan_model(rng: random.Random):
    from tests.ckpt_factory import tiny_config

    n_head = rng.choice([1, 2, 4])
    config = tiny_config(
        num_hidden_layers=rng.choice([1, 2]),
        num_attention_heads=n_head,
        num_key_value_heads=rng.choice([g for g in (1, 2, 4) if n_head % g == 0]),
        head_dim=rng.choice([4, 8, 12]),
        vocab_size=rng.randrange(40, 90),
        rope_parameters={"rope_type": "default", "rope_theta": rng.choice([100.0, 10000.0, 500000.0])},
    )
    import transformers as tf

    return tf.LlamaForCausalLM(config)


def write_nanogpt(root: Path, model, rng: random.Random) -> None:
    from tests import trainer_ckpts as tc

    bias = rng.random() < 0.7
    if not bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
    tc.nanogpt_checkpoint(root, model, 300, bias=bias, compiled=rng.random() < 0.5)


def write_nanochat(root: Path, model, rng: random.Random) -> None:
    from tests import trainer_ckpts as tc

    tc.nanochat_checkpoint(root, 500, model)


def write_torchtitan(root: Path, model, rng: random.Random) -> None:
    from tests import trainer_ckpts as tc

    tc.torchtitan_step(root, 5, model, release=rng.choice(["0.2", "0.3"]))
    model.config.to_json_file(root.parent / "config.json")  # torchtitan saves none: checkpoints.model_config


def write_megatron(root: Path, model, rng: random.Random) -> None:
    from tests import trainer_ckpts as tc

    tc.megatron_iteration(root, 500, model, per_layer=rng.random() < 0.5)
    model.config.to_json_file(root.parent / "config.json")  # Megatron-Core saves none: checkpoints.model_config


WITHOUT_LIBRARY = {
    "megatron": (torchtitan_model, write_megatron),
    "nanogpt": (nanogpt_model, write_nanogpt),
    "nanochat": (nanochat_model, write_nanochat),
    "torchtitan": (torchtitan_model, write_torchtitan),
}


@pytest.mark.parametrize("trainer", sorted(WITHOUT_LIBRARY))
@pytest.mark.parametrize("seed", range(CONFIGS))
def test_maps_of_trainers_without_a_library_here_compute_their_target_model(tmp_path, trainer, seed):
    rng = random.Random(f"{trainer}{seed}")
    make, write = WITHOUT_LIBRARY[trainer]
    model = noisy(make(rng), seed)
    root = tmp_path / "run"
    write(root, model, rng)
    ids = probe(model.config.vocab_size, seed)
    logits, attentions = hf_outputs(model, ids)
    backdate(root, 3600)
    given = {"model_config": str(tmp_path / "config.json")} if trainer in ("torchtitan", "megatron") else {}
    [ckpt] = discover(str(root), quiet_seconds=0, **given)
    built = load_model(ckpt, device="cpu", dtype="float32")
    assert_same_network(built, ids, logits, attentions)


# ------------------------------------------------------------------------------------------ the command


def replay_cli(root: Path, store: Path, *extra: str) -> int:
    from pipeline.cli import compose, run

    backdate(root, 3600)
    base = [f"checkpoints.root={root}", f"store.path={store}", "checkpoints.quiet_seconds=0", "stages=[replay]"]
    return run(compose([*base, "probe.rows=3", f"probe.seq_len={2 * T}", *extra]))


def stored(store: Path):
    import xarray as xr

    tree = xr.open_datatree(store, engine="zarr")
    (name,) = tree.children
    return tree[name].to_dataset()


@needs_litgpt
def test_a_litgpt_llama3_run_replays_as_litgpts_converter_and_eager_attention(tmp_path):
    """The command on a litgpt run with Llama 3.x rope scaling, against the reference its user would build:
    litgpt's own converter (convert_lit_checkpoint's copy_weights_llama) into transformers' Llama with the rope
    scaling of Llama 3, eager attention."""
    import transformers as tf
    from litgpt.scripts.convert_lit_checkpoint import copy_weights_llama

    config = litgpt_config(random.Random(3))
    config = dataclasses.replace(config, bias=False, attn_bias=False, norm_qk=False, rope_condense_ratio=1)
    config.rope_adjustments = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_seq_len": 8,
    }
    model = litgpt_run(tmp_path / "out", config, 3)
    converted = {}
    copy_weights_llama(config, converted, model.state_dict())
    llama = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=config.padded_vocab_size,
            hidden_size=config.n_embd,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_query_groups,
            head_dim=config.head_size,
            rms_norm_eps=config.norm_eps,
            rope_parameters={"rope_type": "llama3", "rope_theta": float(config.rope_base), **LLAMA3_HF},
        )
    )
    llama.load_state_dict(converted, strict=True)
    store = tmp_path / "s.zarr"
    assert replay_cli(tmp_path / "out", store) == 0
    ds = stored(store)
    assert list(ds.status.values) == ["done"]
    want = reference_stats(llama.eval(), ds.probe_tokens.values)
    for name in ("sink_mass", "entropy", "key_mass", "key_norm", "value_norm", "resid_norm"):
        np.testing.assert_allclose(ds[name].values[0], want[name], rtol=0, atol=1e-6, err_msg=name)


LLAMA3_HF = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


def assert_refused(code: int, capsys, store: Path, *words: str) -> None:
    """Exit 2, one line on stderr naming `words`, nothing stored."""
    err = capsys.readouterr().err
    said = [line for line in re.split(r"[\r\n]+", err) if line and not line.startswith("replay: ")]  # no bars
    assert code == 2, err
    assert len(said) == 1 and all(w in said[0] for w in words), err
    assert not store.exists()


@needs_litgpt
def test_an_unmapped_litgpt_setting_refuses_the_run(tmp_path, capsys):
    config = litgpt_config(random.Random(7), "attention_scores_scalar")
    litgpt_run(tmp_path / "out", config, 7)
    store = tmp_path / "s.zarr"
    code = replay_cli(tmp_path / "out", store)
    assert_refused(code, capsys, store, "attention_scores_scalar=3", "model_config.yaml", "litgpt")


def test_an_unknown_nanogpt_or_nanochat_field_refuses_the_run(tmp_path, capsys):
    """A fork's model_args field (nanoGPT) or a later nanochat's model_config field: not dropped, refused."""
    from tests import trainer_ckpts as tc

    path = tc.nanogpt_checkpoint(tmp_path / "nano", tc.gpt2(seed=2), 300)
    saved = torch.load(path, weights_only=False)
    saved["model_args"]["n_rotary"] = 16
    torch.save(saved, path)
    store = tmp_path / "nano.zarr"
    assert_refused(replay_cli(tmp_path / "nano", store), capsys, store, "nanoGPT setting n_rotary=16", "ckpt.pt")

    tc.nanochat_checkpoint(tmp_path / "chat", 500, tc.nanochat_model(seed=3))
    meta = tmp_path / "chat" / "meta_000500.json"
    described = yaml.safe_load(meta.read_text())
    described["model_config"]["window_pattern"] = "SSSL"
    meta.write_text(yaml.safe_dump(described))
    store = tmp_path / "chat.zarr"
    code = replay_cli(tmp_path / "chat", store)
    assert_refused(code, capsys, store, "nanochat setting window_pattern='SSSL'", "meta_000500.json")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_key_value_heads": 4}, "cannot lay out"),
        ({"vocab_size": 100}, "embed_tokens.weight is"),
        ({"head_dim": 16, "num_attention_heads": 2}, "cannot lay out"),
        ({"intermediate_size": 48}, "gate_proj.weight is"),
        ({"attention_bias": True}, "nothing in the checkpoint fills"),
        ({"tie_word_embeddings": True}, "ties the output head"),
    ],
)
def test_a_given_model_config_that_does_not_fit_the_tensors_refuses_the_run(tmp_path, capsys, change, words):
    from tests import trainer_ckpts as tc

    llama = tc.llama(seed=4)  # 4 heads, 2 key/value heads, head dim 8, vocabulary 101
    tc.torchtitan_step(tmp_path / "titan", 5, llama)
    config = llama.config.to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    store = tmp_path / "s.zarr"
    code = replay_cli(tmp_path / "titan", store, f"checkpoints.model_config={tmp_path / 'config.json'}")
    assert_refused(code, capsys, store, "config.json", words)


def test_an_fsdp_sharded_run_without_a_config_names_the_setting(tmp_path, capsys):
    """The Trainer writes no config.json with SHARDED_STATE_DICT: neither in the checkpoint nor, without a final
    FULL_STATE_DICT save_model, in the run folder."""
    from tests import trainer_ckpts as tc

    tc.fsdp_trainer_checkpoint(tmp_path / "run", 30, tc.llama(seed=5))
    store = tmp_path / "s.zarr"
    code = replay_cli(tmp_path / "run", store)
    assert_refused(code, capsys, store, "checkpoint-30", "run folder above it", "checkpoints.model_config")


def test_an_olmo_core_replay_shows_no_warning_about_defaults_sinktrace_filled(tmp_path, capfd):
    olmo_run(tmp_path / "run", olmo_config(random.Random(1)), 1)
    store = tmp_path / "s.zarr"
    assert replay_cli(tmp_path / "run", store) == 0
    out, err = capfd.readouterr()
    assert "token_id" not in out + err


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
