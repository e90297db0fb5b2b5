"""The P0 measures recover a position-zero circuit planted in the weights (tests/planted.py).

First eager attention checks that each construction does what its docstring says; then each series is replayed by the
ordinary `sinktrace` command with a BOS and a random first token, and the stored measures are held against the
values the construction implies."""

import math

import numpy as np
import pytest
import torch

import pipeline
from pipeline import analysis as an
from pipeline.cli import compose, run
from tests import planted as pl

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, SEQ_LEN = 16, 16
U = an.uniform_sink_mass(SEQ_LEN)
CONTROL_STEPS = (0, 200, 400)
CONTROL_STRENGTHS = (0.0, 0.5, 1.0)
# A saturated Llama sink head (strength 0.85 and up) leaves at most this much of a query's attention off the keys in
# position 0's state: on these probes eager attention leaves at most 2.5e-5 (checked below with this bound)
SATURATION = 1e-4


def probe_rows(first_token: str) -> np.ndarray:
    """The rows sinktrace's default random probe (seed 0) gives these models."""
    from omegaconf import OmegaConf

    from pipeline.probe import build_probe

    cfg = OmegaConf.create(
        {"kind": "random", "name": None, "seq_len": SEQ_LEN, "rows": ROWS, "seed": 0, "first_token": first_token}
    )
    return build_probe(cfg, pl.config("gpt2").to_dict()).tokens


def eager(model, tokens):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens), output_attentions=True, output_hidden_states=True)


# ----------------------------------------------------------------------------------- the constructions themselves


@pytest.mark.parametrize("strength", [0.25, 1.0])
def test_gpt2_construction_is_exact(strength):
    model = pl.planted_model("gpt2", strength)
    m = torch.as_tensor(pl.marker("gpt2"), dtype=torch.float32)
    t = torch.arange(1, SEQ_LEN, dtype=torch.float64)
    big_m = pl.position0_marker("gpt2", strength)
    score = big_m * math.sqrt(pl.WIDTH) / math.sqrt(big_m**2 + 1) / math.sqrt(pl.HEAD_DIM)
    for first_token in ("bos", "random"):
        out = eager(model, probe_rows(first_token))
        after0 = out.hidden_states[1]
        # the marker: M at position 0 whatever the token, exactly 0 elsewhere
        np.testing.assert_allclose((after0[:, 0] @ m).numpy(), big_m, rtol=1e-5)
        assert torch.all(after0[:, 1:] @ m == 0)
        assert torch.allclose(out.attentions[0][:, :, 1:, 0], 1 / (t + 1).float())  # block 0 attends uniformly
        for layer in (1, 2):
            for head, beta in enumerate(pl.BETA["gpt2"]):
                want = 1 / (1 + t * math.exp(-beta * score))  # e^S / (e^S + t) at query t
                got = out.attentions[layer][:, head, 1:, 0].double()
                torch.testing.assert_close(got, want.expand_as(got), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strength", [0.85, 1.0])
def test_llama_construction_recognises_position_zero_by_the_causal_mask(strength):
    model = pl.planted_model("llama", strength)
    big_m = pl.position0_marker("llama", strength)
    for first_token in ("bos", "random"):
        tokens = probe_rows(first_token)
        out = eager(model, tokens)
        # query 0 sees only itself: the token content left at position 0 is (1 - a) of it, for any token
        tok = torch.as_tensor(pl.token_vectors("llama")[tokens[:, 0]], dtype=torch.float32)
        after0 = out.hidden_states[1]
        content = after0[:, 0, pl.HEAD_DIM :]
        torch.testing.assert_close(content, (1 - strength) * tok[:, pl.HEAD_DIM :], atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(after0[:, 0, 1].numpy(), big_m, rtol=1e-4)
        # elsewhere the marker is what the construction's arithmetic says, under a fifth of position 0's except on
        # positions that repeat the first token from the start (their residual is position 0's)
        marker = after0[..., 1].numpy()
        np.testing.assert_allclose(marker, pl.llama_marker(tokens, strength), rtol=1e-4)
        repeats = torch.as_tensor(np.cumprod(tokens == tokens[:, :1], axis=1).astype(bool))
        assert marker[:, 1:][~repeats[:, 1:].numpy()].max() < big_m / 5
        for layer in (1, 2):
            tied = out.attentions[layer][:, :, 1:, :].mul(repeats[:, None, None, :]).sum(-1)  # on position 0's state
            assert tied.min() > 1 - SATURATION
        assert torch.allclose(out.attentions[0][:, :, 1:, 0], 1 / torch.arange(2, SEQ_LEN + 1).float())


def test_control_binds_the_marker_to_the_bos_token():
    for family in pl.FAMILIES:
        planted, control = (pl.planted_model(family, 1.0, control=c) for c in (False, True))
        bos, random = probe_rows("bos"), probe_rows("random")
        # with BOS first, position 0 is the planted model's; with another first token the marker is gone
        h_planted, h_control = (eager(m, bos).hidden_states[1][:, 0] for m in (planted, control))
        torch.testing.assert_close(h_control, h_planted, atol=1e-5, rtol=1e-5)
        sink = eager(control, random).attentions[1][:, :, 1:, 0]
        assert sink.mean() <= U + 1e-6, family  # no more than uniform attention


# ------------------------------------------------------------------------------------- replayed by sinktrace


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """{(family, control): {first-token policy: group}} for the four series, each replayed by sinktrace twice."""
    root = tmp_path_factory.mktemp("planted")
    out = {}
    for family in pl.FAMILIES:
        for control in (False, True):
            run_dir = root / f"{family}-{'control' if control else 'planted'}"
            steps = dict(steps=CONTROL_STEPS, strengths=CONTROL_STRENGTHS) if control else {}
            pl.write_series(run_dir, family, control=control, **steps)
            store = run_dir.with_suffix(".zarr")
            for first_token in ("bos", "random"):
                args = [
                    f"checkpoints.root={run_dir}",
                    f"store.path={store}",
                    "stages=[replay]",
                    f"probe.rows={ROWS}",
                    f"probe.seq_len={SEQ_LEN}",
                    f"probe.first_token={first_token}",
                ]
                assert run(compose(args)) == 0
            groups = an.probe_groups(pipeline.open_sinks(str(store)))
            out[family, control] = {g.attrs["probe_first_token"]: g.load() for g in groups.values()}
            out[family, control]["store"] = store
    return out


@pytest.mark.parametrize("family", pl.FAMILIES)
def test_recognition_step_is_the_step_the_strength_passes_its_threshold(replayed, family):
    random = replayed[family, False]["random"]
    tokens = random["probe_tokens"].values
    mean_cos = pl.mean_pair_cosine(pl.token_vectors(family)[tokens[:, 0]])
    want = [pl.p0_similarity(family, a, mean_cos) for a in pl.STRENGTHS]
    for layer in range(3):  # blocks 1 and 2 write nothing: the same state after each
        np.testing.assert_allclose(random["p0_similarity"].sel(layer=layer).values, want, atol=2e-5)
    expected = pl.recognition_step(family, mean_cos)
    assert expected == 300  # the schedule puts strength 0.85 past the threshold in both families
    assert float(an.recognition_step(random)) == expected
    # the fixed-first-token group has p0_similarity 1 by construction and the analysis refuses it
    with pytest.raises(ValueError, match="first_token=random"):
        an.recognition_step(replayed[family, False]["bos"])


@pytest.mark.parametrize("family", pl.FAMILIES)
def test_the_writer_is_block_0s_mlp_and_the_share_is_all_in_layers_0_and_1(replayed, family):
    for policy in ("bos", "random"):
        ds = replayed[family, False][policy]
        tokens = ds["probe_tokens"].values
        ratio = an.writer_ratio(ds).sel(layer=0)
        writer = an.circuit_writer(ds).values
        for i, strength in enumerate(pl.STRENGTHS):
            attn, mlp = pl.writer_ratios(family, tokens, strength)
            got = ratio.isel(step=i).values
            np.testing.assert_allclose(got, [attn, mlp], rtol=1e-4, err_msg=f"{family} {policy} a={strength}")
            want = 0.0 if attn > 3 else 0.5 if mlp > 3 else math.nan
            np.testing.assert_equal(writer[i], want)
        assert set(writer[pl.STEPS.index(300) :]) == {0.5}  # block 0's MLP once recognised
        share = an.circuit_share(ds).values
        assert math.isnan(share[0])  # nothing written at strength 0
        np.testing.assert_allclose(share[1:], 1.0, rtol=1e-12)  # blocks 1 and 2 write nothing


def test_gpt2_positional_index_is_exactly_one_wherever_there_is_a_sink(replayed):
    groups = replayed["gpt2", False]
    index = an.positional_index({"bos": groups["bos"], "random": groups["random"]}).values
    for i, strength in enumerate(pl.STRENGTHS):
        mass = pl.gpt2_sink_mass(strength, SEQ_LEN)
        for policy in ("bos", "random"):
            for layer in (1, 2):
                got = groups[policy]["sink_mass"].isel(step=i).sel(layer=layer).values
                np.testing.assert_allclose(got, mass, rtol=1e-5)
        planted_layers = index[i, 1:]
        if mass.mean() - U > 0.05:
            np.testing.assert_allclose(planted_layers, 1.0, atol=1e-5)
        else:
            assert np.isnan(planted_layers).all()
    assert np.isnan(index[:, 0]).all()  # block 0 attends uniformly: no sink to compare


def test_llama_positional_index_is_near_one_from_the_recognition_step(replayed):
    groups = replayed["llama", False]
    index = an.positional_index({"bos": groups["bos"], "random": groups["random"]})
    tied = {p: pl.tied_sink_mass(groups[p]["probe_tokens"].values) for p in ("bos", "random")}
    for step in (300, 400):  # strengths 0.85 and 1: the sink heads saturate on position 0's state
        m = {p: float(groups[p]["sink_mass"].sel(step=step, layer=1).mean()) for p in tied}
        for p in tied:
            assert tied[p] - SATURATION <= m[p] <= tied[p] + 1e-6, (step, p, m[p], tied[p])
        # the index the construction allows: each mass within SATURATION of its tied value
        low = (tied["random"] - SATURATION - U) / (tied["bos"] - U)
        got = index.sel(step=step).values
        assert np.isnan(got[0])
        assert np.all((got[1:] >= low) & (got[1:] <= 1)), (step, got, low)
    # this probe's random first tokens: one row repeats its first token at position 1, so it splits its sink in two
    assert tied["bos"] == 1.0 and tied["random"] == pytest.approx(1 - 0.5 / ROWS)


@pytest.mark.parametrize("family", pl.FAMILIES)
def test_control_is_token_bound_and_never_recognised(replayed, family):
    groups = replayed[family, True]
    index = an.positional_index({"bos": groups["bos"], "random": groups["random"]})
    sink = an.layer_sink_mass(groups["bos"]).sel(layer=1).values
    assert sink[-1] - U > 0.05  # a sink with BOS first ...
    defined = index.sel(layer=[1, 2]).values[sink - U > 0.05]
    assert defined.size and np.all(defined == 0.0)  # ... that no other first token keeps: the token-bound value
    assert math.isnan(float(an.recognition_step(groups["random"])))
    assert float(groups["random"]["p0_similarity"].sel(layer=[0, 1]).max()) < 0.5


@pytest.mark.slow
def test_report_shows_the_planted_circuit(replayed, tmp_path):
    from pipeline.report.page import write_report

    page = write_report(str(replayed["llama", False]["store"]), str(tmp_path / "report"))
    text = page.read_text()
    random_section = text[text.index("<h2>Probe group <code>random-T16-r16-s0-random") :]
    assert "<td class=l>recognition step (p0_similarity in layers 0-1 stays &gt; 0.9)</td><td>300</td>" in (
        random_section
    )
    assert "<td>layer 0 MLP</td>" in random_section and "<td>100.0 %</td>" in random_section
    assert "step the writer settles</td><td>200</td>" in random_section
    for fig in ("p0_circuit", "p0_recognition"):
        assert (page.parent / f"random-T16-r16-s0-random_{fig}.png").stat().st_size > 10_000
    assert "positional index" in text
