"""Unit tests of the sinkstats attention function against an explicit float64 softmax."""

import types

import pytest
import torch

from pipeline.replay import attention as A

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def make_qkv(b=2, hq=6, hkv=2, t=37, d=16, dtype=torch.float32, seed=0, magnitude=1.0):
    """Random q, k, v with a strong sink: key 0 of each kv head points along its queries' mean direction."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g) * magnitude
    q = q + 1.5 * magnitude * torch.randn(1, hq, 1, d, generator=g)  # a shared direction per head
    k = torch.randn(b, hkv, t, d, generator=g) * magnitude
    if hq % hkv == 0:
        k[:, :, 0] = q.reshape(b, hkv, hq // hkv, t, d).mean((2, 3))
    v = torch.randn(b, hkv, t, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def explicit(q, k, v, scale, window=None, softcap=None, sinks=None):
    """Full T x T softmax in float64: (out (B,Hq,T,dv), probs over keys (B,Hq,T,T), sink prob, entropy)."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = q.shape[2]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (j <= i) & (True if window is None else (j > i - window))
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    p = torch.softmax(s, -1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    sink = p[..., t] if sinks is not None else None
    p = p[..., :t]
    return p @ v, p, sink, entropy


def check(stats, out, ref, k_pos=4, atol=5e-6):
    r_out, p, sink, ent = ref
    torch.testing.assert_close(out.double(), r_out, atol=atol, rtol=0)
    torch.testing.assert_close(stats.a0.double(), p[..., 0], atol=atol, rtol=0)
    torch.testing.assert_close(stats.keys.double(), p[..., :k_pos], atol=atol, rtol=0)
    torch.testing.assert_close(stats.entropy.double(), ent, atol=10 * atol, rtol=0)
    if sink is None:
        assert stats.sink is None
    else:
        torch.testing.assert_close(stats.sink.double(), sink, atol=atol, rtol=0)


SCALE = 16**-0.5


def test_inputs_have_a_sink():
    q, k, v = make_qkv()
    _, p, _, _ = explicit(q, k, v, SCALE)
    later = p[:, :, 8:, 0].mean()
    assert later > 0.12, later  # far above the uniform 1/(t+1), so wrong formulas show


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fused_matches_explicit(hq, hkv, with_sinks):
    q, k, v = make_qkv(hq=hq, hkv=hkv)
    sinks = torch.linspace(-1.0, 3.0, hq) if with_sinks else None
    out, stats = A.fused_attention(q, k, v, SCALE, sinks, key_positions=4)
    check(stats, out, explicit(q, k, v, SCALE, sinks=sinks))


@pytest.mark.parametrize(
    "window,softcap,with_sinks,block_rows",
    [
        (None, None, False, 5),
        (None, 2.0, False, 7),
        (5, None, False, 3),  # key 0 falls outside for t >= 5
        (5, 2.0, True, 4),
        (1, None, True, 2),  # each query sees only itself (and the sink)
        (12, None, False, None),
        (100, None, True, 16),  # window longer than T: plain causal
    ],
)
def test_blocked_matches_explicit(window, softcap, with_sinks, block_rows):
    q, k, v = make_qkv()
    sinks = torch.linspace(-2.0, 2.0, q.shape[1]) if with_sinks else None
    out, stats = A.blocked_attention(q, k, v, SCALE, window, softcap, sinks, key_positions=4, block_rows=block_rows)
    check(stats, out, explicit(q, k, v, SCALE, window, softcap, sinks))
    if window is not None and window < q.shape[2]:
        assert torch.all(stats.a0[:, :, window:] == 0)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_fused_and_blocked_agree(with_sinks):
    q, k, v = make_qkv(t=50, seed=3)
    sinks = torch.randn(q.shape[1]) if with_sinks else None
    out_f, s_f = A.fused_attention(q, k, v, SCALE, sinks, key_positions=3)
    out_b, s_b = A.blocked_attention(q, k, v, SCALE, None, None, sinks, key_positions=3, block_rows=9)
    torch.testing.assert_close(out_f, out_b, atol=2e-6, rtol=0)
    for name in ("a0", "keys", "sink"):
        if getattr(s_f, name) is not None:
            torch.testing.assert_close(getattr(s_f, name), getattr(s_b, name), atol=2e-6, rtol=0)
    torch.testing.assert_close(s_f.entropy, s_b.entropy, atol=2e-5, rtol=0)


def test_fewer_queries_than_key_positions():
    q, k, v = make_qkv(t=3)
    out, stats = A.fused_attention(q, k, v, SCALE, key_positions=4)
    assert stats.keys.shape[-1] == 3
    check(stats, out, explicit(q, k, v, SCALE), k_pos=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("route", ["fused", "blocked"])
def test_half_inputs_finite_and_close(dtype, route):
    q, k, v = make_qkv(dtype=dtype)
    sinks = torch.linspace(-1.0, 1.0, q.shape[1]).to(dtype)
    if route == "fused":
        out, stats = A.fused_attention(q, k, v, SCALE, sinks)
    else:
        out, stats = A.blocked_attention(q, k, v, SCALE, 9, 3.0, sinks)
    assert out.dtype == dtype
    ref = explicit(q, k, v, SCALE, sinks=sinks) if route == "fused" else explicit(q, k, v, SCALE, 9, 3.0, sinks)
    # The statistics come from float32 copies of the half inputs, so they match to float32 precision;
    # the output goes through the half kernel like the model's own attention.
    check(stats, torch.zeros_like(ref[0]), (torch.zeros_like(ref[0]),) + ref[1:], atol=1e-5)
    torch.testing.assert_close(out.double(), ref[0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("route", ["fused", "blocked"])
def test_half_scores_beyond_half_range_stay_finite(route):
    # Early-training checkpoints: q.k can exceed what fp16 represents (65504) although q and k themselves fit.
    q, k, v = make_qkv(dtype=torch.float16, magnitude=60.0)
    assert (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)).abs().max() > 65504
    fn = A.fused_attention if route == "fused" else A.blocked_attention
    _, stats = fn(q, k, v, SCALE)
    for x in (stats.a0, stats.entropy, stats.keys):
        assert torch.isfinite(x).all()
    _, p, _, ent = explicit(q, k, v, SCALE)
    # Scores of order 1e4 carry float32 rounding of order 1e-3 into the exponent.
    torch.testing.assert_close(stats.a0.double(), p[..., 0], atol=1e-2, rtol=0)
    torch.testing.assert_close(stats.entropy.double(), ent, atol=1e-2, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The registered entry point


def fake_module(layer_idx=0, **config):
    cfg = types.SimpleNamespace(model_type="fake", **config)
    return types.SimpleNamespace(layer_idx=layer_idx, config=cfg, is_causal=True)


def call(module, q, k, v, **kwargs):
    kwargs.setdefault("scaling", SCALE)
    return A.sinkstats_attention(module, q, k, v, None, **kwargs)


def test_registered():
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping[A.ATTENTION_NAME] is A.sinkstats_attention


@pytest.mark.parametrize(
    "window,softcap,route", [(None, None, "fused"), (37, None, "fused"), (36, None, "blocked"), (None, 5.0, "blocked")]
)
def test_entry_point_routes_and_layout(window, softcap, route, monkeypatch):
    q, k, v = make_qkv()
    taken = []
    for name in ("fused_attention", "blocked_attention"):
        orig = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _o=orig, _n=name, **kw: taken.append(_n) or _o(*a, **kw))
    with A.collecting(4) as col:
        out, weights = call(fake_module(), q, k, v, sliding_window=window, softcap=softcap, position_ids=None)
    assert taken == [f"{route}_attention"]
    assert weights is None and out.shape == (2, 37, 6, 16) and out.is_contiguous()
    r_out, p, _, ent = explicit(q, k, v, SCALE, window, softcap)
    torch.testing.assert_close(out.double(), r_out.transpose(1, 2), atol=2e-6, rtol=0)
    sums = col.layers[0]
    assert sums.rows == 2
    torch.testing.assert_close(sums.a0, p[..., 0].sum(0), atol=5e-6, rtol=0)
    torch.testing.assert_close(sums.entropy, ent.sum(0), atol=5e-5, rtol=0)
    kn = torch.linalg.vector_norm(k.double(), dim=-1).sum(0)
    torch.testing.assert_close(sums.key_norm, kn, atol=1e-5, rtol=0)


def test_micro_batches_add_up():
    q, k, v = make_qkv(b=4)
    with A.collecting(2) as whole:
        call(fake_module(), q, k, v)
    with A.collecting(2) as parts:
        call(fake_module(), q[:1], k[:1], v[:1])
        call(fake_module(), q[1:], k[1:], v[1:])
    a, b = whole.layers[0], parts.layers[0]
    assert a.rows == b.rows == 4
    for name in ("a0", "entropy", "keys", "key_norm", "value_norm"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0)


def test_no_collector_no_stats():
    q, k, v = make_qkv()
    out, _ = call(fake_module(), q, k, v)
    torch.testing.assert_close(out.double(), explicit(q, k, v, SCALE)[0].transpose(1, 2), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,module,match",
    [
        ({"score_mod": lambda s, *a: s}, fake_module(), "score_mod"),
        ({"cu_seq_lens_q": torch.tensor([0, 37])}, fake_module(), "cu_seq_lens_q"),
        ({"is_causal": False}, fake_module(), "non-causal"),
        ({"dropout": 0.1}, fake_module(), "dropout"),
        ({"position_ids": torch.arange(1, 38)[None]}, fake_module(), "position_ids"),
        ({}, fake_module(layer_types=["sliding_attention"], sliding_window=8), "sliding-window layer"),
        ({}, fake_module(layer_types=["chunked_attention"]), "chunked_attention"),
        ({}, fake_module(sliding_window=8), "not passed"),
        ({}, fake_module(attention_chunk_size=8), "chunked"),
    ],
)
def test_refuses_what_it_would_get_wrong(kwargs, module, match):
    q, k, v = make_qkv()
    with pytest.raises(A.UnsupportedAttention, match="model_type='fake'") as err:
        call(module, q, k, v, **kwargs)
    assert match in str(err.value)


def test_refuses_shapes():
    q, k, v = make_qkv(hq=6, hkv=4)
    with pytest.raises(A.UnsupportedAttention, match="multiple"):
        call(fake_module(), q, k, v)
    q, k, v = make_qkv()
    with pytest.raises(A.UnsupportedAttention, match="key length"):
        call(fake_module(), q[:, :, :5], k, v)
    with pytest.raises(A.UnsupportedAttention, match="mask"):
        A.sinkstats_attention(fake_module(), q, k, v, torch.zeros(1, 1, 37, 37), scaling=SCALE)
