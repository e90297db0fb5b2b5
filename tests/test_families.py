"""measure() against the eager reference, statistic by statistic, on tiny random models of each supported family."""

import numpy as np
import pytest
import torch
import transformers as tf

from pipeline.replay import attention
from pipeline.replay import measure as measure_module
from pipeline.replay.measure import find_blocks, is_supported, measure, support_problem
from pipeline.store.schema import MEASURED, qbin_edges
from tests.reference import STATS, eager_blocks, reference_extra, reference_stats

SEQ_LEN, ROWS, VOCAB = 32, 3, 96
FIRST = 5  # the probe's first token (not 0: some configs make 0 the padding index, which gets no gradient)
WINDOW = 8  # shorter than SEQ_LEN, so key 0 leaves the window for later queries
# Large init makes attention peaky (scores of a few units), so a wrong formula moves the numbers visibly.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.2,
)


def _no_gqa(**extra):
    return {k: v for k, v in COMMON.items() if k not in ("num_key_value_heads", "head_dim")} | extra


FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "qwen3": lambda: tf.Qwen3Config(**COMMON),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmo2": lambda: tf.Olmo2Config(**COMMON),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_no_gqa(rotary_pct=0.25, use_parallel_residual=True)),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        initializer_range=0.2,
        scale_attn_by_inverse_layer_idx=True,
    ),
    "gemma2": lambda: tf.Gemma2Config(
        **(COMMON | {"num_hidden_layers": 3}),
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
    ),
    "gpt_oss": lambda: tf.GptOssConfig(
        **(COMMON | {"num_hidden_layers": 3}), sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2
    ),
}
EXPECTED = set(STATS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def build(family, dtype=torch.float32, **overrides):
    config = FAMILIES[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attention.ATTENTION_NAME)
    if family == "gpt_oss":  # learned sink logits around the size of the scores, so their mass is far from 0 and 1
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(2.0, 1.0)
    seed_sink(model.eval())
    return model.to(dtype)


def seed_sink(model, steps=30, lr=0.2):
    """Give the first token a sink, as training does: a few Adam steps on its embedding alone, maximising the
    attention later queries pay to key 0 (eager attention for the gradients)."""
    emb = model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(p is emb)
    others = torch.arange(len(emb)) != FIRST
    model.set_attn_implementation("eager")
    opt = torch.optim.Adam([emb], lr=lr)
    ids = torch.as_tensor(probe())
    for _ in range(steps):
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
        loss = -torch.stack([a[:, :, 1:, 0].mean() for a in out.attentions]).log().mean()
        opt.zero_grad()
        loss.backward()
        emb.grad[others] = 0
        opt.step()
    model.set_attn_implementation(attention.ATTENTION_NAME)
    emb.requires_grad_(False)


def probe(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ_LEN), generator=g)
    ids[:, 0] = FIRST
    return ids.numpy()


def assert_stats_close(got, want, rtol=1e-5, atol=1e-5):
    assert set(got) == set(want)
    for name in sorted(want):
        assert got[name].dtype == np.float64, name
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


def uniform_by_q(window):
    """sink_mass_by_q of heads that spread attention evenly over the keys they see: where a wrong formula drifts."""
    t = np.arange(SEQ_LEN)
    a0 = np.where(t < (window or SEQ_LEN), 1.0 / (t + 1), 0.0)
    edges = qbin_edges(SEQ_LEN)
    return np.array([a0[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_reference(family):
    model = build(family)
    ids = probe()
    got = measure(model, ids, batch_size=2, key_positions=4, measures=())  # 3 rows: micro-batches of 2 and 1
    want = reference_stats(model, ids, key_positions=4)
    expected = EXPECTED | ({"learned_sink_mass"} if family == "gpt_oss" else set())
    assert set(got) == expected

    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    assert got["sink_mass"].shape == (n_layers, n_heads)
    assert got["sink_mass_by_q"].shape == (n_layers, n_heads, len(qbin_edges(SEQ_LEN)) - 1)
    assert got["key_mass"].shape == (n_layers, n_heads, 4)
    assert got["key_norm"].shape == (n_layers, n_kv)
    assert got["resid_median"].shape == (n_layers,)
    assert_stats_close(got, want)
    np.testing.assert_array_equal(got["key_mass"][..., 0], got["sink_mass"])

    # Sensitivity: every layer has heads far from uniform attention; windowed layers see key 0 only early on.
    for i, block in enumerate(find_blocks(model)):
        window = getattr(getattr(block, "self_attn", None), "sliding_window", None)
        if family == "mistral":
            window = cfg.sliding_window
        assert np.abs(got["sink_mass_by_q"][i] - uniform_by_q(window)).max() > 0.05, (family, i)
        if window:
            assert np.all(got["sink_mass_by_q"][i, :, -1] == 0)  # queries 16..31 are past the window
    if family == "gpt_oss":
        assert 0.05 < got["learned_sink_mass"].mean() < 0.95


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(tied):
    model = build("llama", tie_word_embeddings=tied)
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, 0.2)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    ids = probe()
    assert_stats_close(measure(model, ids, measures=()), reference_stats(model, ids))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_writers_similarity_and_mixing_match_reference(family):
    """Sublayer output norms (by residual algebra), similarities, and collapse and sensitivity with the sink kept
    and removed (eager attention with its matrix edited) against the eager reference, every family."""
    model = build(family)
    ids = probe()
    got = measure(model, ids, batch_size=2, measures=tuple(MEASURED))
    want = reference_extra(model, ids)
    n_layers = model.config.num_hidden_layers
    for name, value in want.items():
        assert got[name].shape == ((n_layers, 2) if name in ("collapse", "sensitivity") else (n_layers,)), name
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    # the extra passes leave the probe pass's statistics as they were
    assert_stats_close({k: v for k, v in got.items() if k not in want}, measure(model, ids, batch_size=2, measures=()))
    # removing the sink changes what the model computes: the check above would not catch a no-op removal otherwise
    assert np.abs(got["collapse"][:, 1] - got["collapse"][:, 0]).max() > 1e-3
    assert np.isfinite(got["sensitivity"]).all() and (got["sensitivity"] > 0).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sink_removed_pass_equals_edited_eager_attention(family):
    """Every block's output with the sink removed, against eager attention whose matrix is edited, float32."""
    model = build(family)
    ids = probe()
    outs = {}
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: outs.update({i: (o[0] if isinstance(o, tuple) else o)}))
        for i, b in enumerate(find_blocks(model))
    ]
    try:
        with torch.no_grad(), attention.removing_sink():
            model.base_model(input_ids=torch.as_tensor(ids), use_cache=False)
    finally:
        for h in hooks:
            h.remove()  # before the reference copies the model, hooks included
    got = np.stack([outs[i].double().numpy() for i in range(len(outs))])
    diffs = []
    want = eager_blocks(
        model,
        ids,
        remove_sink=True,
        compare=lambda mine, theirs: diffs.append(float((mine.double() - theirs.double()).abs().max())),
    )[2]
    kept = eager_blocks(model, ids)[2]
    # each attention call, on the same inputs: the edited matrix against sinkstats' removal
    assert len(diffs) == model.config.num_hidden_layers and max(diffs) < 1e-5, diffs
    # the whole forward: float32 rounding of two different kernels, carried through every block (GPT-OSS's
    # router amplifies it to 2e-5 with the sink kept too)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.abs(want - kept).max() > 0.1  # the edit matters on these models


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(family, dtype):
    model = build(family, dtype)
    ids = probe()
    got = measure(model, ids)
    want = reference_stats(model, ids)  # the same half weights, run in float32
    for name, value in got.items():
        assert np.isfinite(value).all(), name
    # Half activations round at 3e-3 (bf16) / 5e-4 (fp16) relative, amplified by peaky attention.
    for name in ("sink_mass", "sink_mass_by_q", "key_mass", "learned_sink_mass"):
        if name in want:
            np.testing.assert_allclose(got[name], want[name], atol=0.05, err_msg=name)
    np.testing.assert_allclose(got["entropy"], want["entropy"], atol=0.15, err_msg="entropy")
    for name in EXPECTED - {"sink_mass", "sink_mass_by_q", "key_mass", "entropy"}:
        np.testing.assert_allclose(got[name], want[name], rtol=0.05, err_msg=name)


def test_batch_size_does_not_change_results():
    model = build("gpt_oss")
    ids = probe()
    assert_stats_close(measure(model, ids, batch_size=1), measure(model, ids, batch_size=3), rtol=1e-6, atol=1e-6)


def _median_rows():
    g = torch.Generator().manual_seed(0)
    n = 20_000  # past the length where rows are bracketed from a sample first
    stride = (n // measure_module._SAMPLE) | 1
    trap = torch.rand(2, n, generator=g) + 1
    trap[:, ::stride] = 0  # the sample sees only the smallest values: its bracket misses the middle
    return {
        "normal": torch.randn(3, n, generator=g).abs(),
        "odd count": torch.randn(2, n + 1, generator=g).abs(),
        "ties": torch.randint(0, 4, (2, n), generator=g).float(),
        "sorted": torch.sort(torch.rand(2, n, generator=g)).values,
        "outliers": torch.cat([torch.full((2, 500), 1e4), torch.rand(2, n, generator=g)], 1),
        "bracket misses": trap,
        "short": torch.rand(3, 7, generator=g),
    }


@pytest.mark.parametrize("case", sorted(_median_rows()))
def test_median_is_numpys(case):
    x = _median_rows()[case]
    np.testing.assert_array_equal(measure_module._median(x).numpy(), np.median(x.double().numpy(), axis=-1))


def test_resid_median_of_long_rows_matches_reference():
    """Rows of (T-1) x D values long enough that the median is bracketed from a sample before selecting."""
    model = build("llama")
    ids = torch.randint(0, VOCAB, (2, 300), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = FIRST
    assert 299 * COMMON["hidden_size"] > 4 * measure_module._SAMPLE
    got = measure(model, ids, measures=())["resid_median"]
    np.testing.assert_allclose(got, reference_stats(model, ids)["resid_median"], rtol=1e-5)


def test_refuses_model_loaded_with_other_attention():
    model = build("llama")
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="sinkstats"):
        measure(model, probe())


def test_refuses_layer_that_bypasses_attention_interface():
    model = build("llama")
    attn = model.model.layers[1].self_attn
    attn.forward = lambda hidden_states, *a, **kw: (torch.zeros_like(hidden_states), None)
    with pytest.raises(attention.UnsupportedAttention, match=r"model_type='llama'.*\[1\].*bypasses"):
        measure(model, probe())


def test_refuses_window_hidden_in_mask():
    # Qwen2-MoE applies its sliding window through the mask only; sinkstats never sees it.
    config = tf.Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,
    )
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attention.ATTENTION_NAME).eval()
    with pytest.raises(attention.UnsupportedAttention, match="qwen2_moe.*sliding"):
        measure(model, probe())


def test_support_helper():
    for family in FAMILIES:
        assert is_supported(FAMILIES[family]()), family
    assert is_supported(build("llama"))
    assert support_problem(tf.FalconConfig()) is None  # the eager route (tests/test_eager.py)
    assert "chunked" in support_problem(tf.Llama4TextConfig(attention_chunk_size=8))


def test_qbin_edges():
    assert qbin_edges(64).tolist() == [1, 2, 4, 8, 16, 32, 64]
    assert qbin_edges(40).tolist() == [1, 2, 4, 8, 16, 32, 40]
    assert qbin_edges(33).tolist() == [1, 2, 4, 8, 16, 32, 33]
    assert qbin_edges(2).tolist() == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision GPU matrix needs CUDA")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_family_on_gpu_in_half_precision(family, dtype, record_property):
    """The GPU matrix: fused CUDA kernels in half precision against eager in the same dtype and device."""
    model = build(family).to("cuda", dtype)
    ids = probe()
    got = measure(model, torch.as_tensor(ids, device="cuda"))
    want = reference_stats(model, ids, keep_dtype=True)
    worst = max(float(np.abs(got[n] - want[n]).max()) for n in ("sink_mass", "sink_mass_by_q", "key_mass", "entropy"))
    record_property("max_abs_error", worst)
    print(f"{family} {dtype}: max abs error {worst:.2e}")
    for name in ("sink_mass", "sink_mass_by_q", "key_mass", "entropy", "learned_sink_mass"):
        if name in want:
            np.testing.assert_allclose(got[name], want[name], atol=2e-3, err_msg=name)
