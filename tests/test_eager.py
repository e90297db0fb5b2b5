"""The eager route (`pipeline.replay.eager`): families outside transformers' AttentionInterface, measured from their own
eager attention probabilities, against the independent eager reference; whole-model, layer by layer, through the CLI."""

import numpy as np
import pytest
import torch
import transformers as tf
import xarray as xr

from pipeline.checkpoints.model_config import read_config
from pipeline.cli import compose, run
from pipeline.probe import build_probe
from pipeline.records import Checkpoint
from pipeline.replay import eager
from pipeline.replay.attention import UnsupportedAttention
from pipeline.replay.layered import open_layered
from pipeline.replay.measure import attention_route, measure, support_problem
from tests.reference import reference_stats
from tests.test_families import COMMON, EXPECTED, FAMILIES, SEQ_LEN, VOCAB, assert_stats_close, probe, seed_sink

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead

SMALL = dict(vocab_size=VOCAB, hidden_size=64, initializer_range=0.2)
EAGER_FAMILIES = {
    # partial rotary (a quarter of each head), grouped-query attention, per-head q/k layer norms
    "stablelm": lambda: tf.StableLmConfig(**{k: v for k, v in COMMON.items() if k != "head_dim"}, qk_layernorm=True),
    # multi-query attention (one key/value head), rotary, parallel attention and MLP
    "falcon": lambda: tf.FalconConfig(**SMALL, num_hidden_layers=2, num_attention_heads=4),
    # ALiBi position biases, no position embedding
    "bloom": lambda: tf.BloomConfig(**SMALL, n_layer=2, n_head=4),
    # learned positions, a local (windowed) layer after a global one
    "gpt_neo": lambda: tf.GPTNeoConfig(
        **SMALL,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=128,
    ),
    # ALiBi, fused query/key/value projection
    "mpt": lambda: tf.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    # learned positions, scaled embeddings
    "biogpt": lambda: tf.BioGptConfig(**SMALL, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
    # sinusoidal positions
    "xglm": lambda: tf.XGLMConfig(
        vocab_size=VOCAB, d_model=64, num_layers=2, attention_heads=4, ffn_dim=96, init_std=0.2
    ),
}


def build(family):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(EAGER_FAMILIES[family](), attn_implementation="eager").eval()
    seed_sink(model)
    model.config._attn_implementation = "eager"  # seed_sink switches back to sinkstats
    return model


def test_routes():
    for family in EAGER_FAMILIES:
        config = EAGER_FAMILIES[family]()
        assert attention_route(config) == "eager", family
        assert attention_route(config.to_dict()) == "eager", family
        assert support_problem(config) is None, family
    for family in FAMILIES:
        assert attention_route(FAMILIES[family]()) == "sinkstats", family
    assert attention_route({"model_type": "sinktrace_mystery"}) == "sinkstats"  # loading names the problem


@pytest.mark.parametrize("family", sorted(EAGER_FAMILIES))
def test_eager_family_matches_reference(family):
    model = build(family)
    ids = probe()
    got = measure(model, ids, batch_size=2, key_positions=4, measures=())
    assert set(got) == EXPECTED
    assert_stats_close(got, reference_stats(model, ids, key_positions=4))
    assert np.all(got["sink_mass"] > 0) and not np.allclose(got["sink_mass"], got["sink_mass"].mean())
    with_defaults = measure(model, ids, batch_size=2, key_positions=4)  # sublayer outputs are left out here
    assert set(with_defaults) == EXPECTED | {"p0_similarity", "rest_similarity"}
    if family == "gpt_neo":  # the local layer's window (8) hides key 0 from the last bin's queries
        assert np.all(got["sink_mass_by_q"][1, :, -1] == 0) and np.all(got["sink_mass_by_q"][0, :, -1] > 0)


def test_rows_run_in_slices_that_bound_the_matrices(monkeypatch):
    model = build("stablelm")
    ids = probe()
    whole = measure(model, ids, batch_size=16)
    sizes = []
    forward = model.base_model.forward

    def recording(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    # one row's float32 matrices of one layer: 4 heads x 32 x 32 x 4 bytes
    monkeypatch.setattr(eager, "EAGER_BYTES", 4 * 32 * 32 * 4)
    monkeypatch.setattr(model.base_model, "forward", recording)
    sliced = measure(model, ids, batch_size=16)
    assert sizes == [1, 1, 1]
    assert_stats_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_attention_matrices_are_not_kept():
    """The hook hands None on in place of each layer's matrices, so no layer's outlive its reduction."""
    model = build("stablelm")
    seen = []
    handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    try:
        measure(model, probe())
    finally:
        handle.remove()
    assert seen == [None]


def test_refuses_family_whose_keys_never_reach_a_cache():
    torch.manual_seed(0)
    config = tf.OpenAIGPTConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert attention_route(model) == "eager"
    with pytest.raises(UnsupportedAttention, match="model_type='openai-gpt'.*block 0.*key/value cache"):
        measure(model, probe())


def test_refuses_model_loaded_with_sinkstats():
    model = build("stablelm")
    model.config._attn_implementation = "sinkstats"
    with pytest.raises(ValueError, match="needs attn_implementation='eager'"):
        measure(model, probe())


@pytest.mark.parametrize("family", ["stablelm", "falcon"])
def test_layer_by_layer_matches_whole_model(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path)
    ids = probe()
    ckpt = Checkpoint(step=0, path=str(tmp_path), complete=True)
    with open_layered(ckpt, device="cpu", dtype="float32", attn_implementation="eager") as (streamed, run_rows):
        got = measure(streamed, ids, batch_size=2, run_rows=run_rows)
    assert_stats_close(got, measure(model, ids, batch_size=2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layered", [False, True])
def test_cli_replays_stablelm_through_the_eager_route(layered, tmp_path):
    root, store = tmp_path / "run", str(tmp_path / "s.zarr")
    models = {}
    for step in (10, 20):
        models[step] = build("stablelm")
        with torch.no_grad():  # two different checkpoints
            models[step].model.layers[0].mlp.down_proj.weight.mul_(step / 5)
        models[step].save_pretrained(root / f"checkpoint-{step}")
    extra = ["replay.max_device_memory=1KB"] if layered else []
    cfg = compose(
        [
            f"checkpoints.root={root}",
            "checkpoints.quiet_seconds=0",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=4",
            f"probe.seq_len={SEQ_LEN}",
            *extra,
        ]
    )
    assert run(cfg) == 0

    tree = xr.open_datatree(store, engine="zarr")
    (name,) = tree.children
    ds = tree[name].to_dataset()
    assert ds.attrs["attention_route"] == "eager" and ds.attrs["architecture"] == "stablelm"
    assert list(ds.status.values) == ["done", "done"]
    probe_ids = build_probe(cfg.probe, read_config(root / "checkpoint-10")).tokens
    for step, model in models.items():
        want = reference_stats(model, probe_ids)
        for var in sorted(EXPECTED):
            np.testing.assert_allclose(ds[var].sel(step=step).values, want[var], rtol=1e-5, atol=1e-5, err_msg=var)
    assert not np.allclose(ds.sink_mass.sel(step=10), ds.sink_mass.sel(step=20))
