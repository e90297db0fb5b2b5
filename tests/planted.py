"""Checkpoint series with a position-zero circuit planted in the weights: a positive control for the P0 measures.

Every weight is set by hand, so what the measures should read is known before sinktrace runs. A series is a folder of
Hugging Face checkpoints (`checkpoint-<step>/`: config.json, model.safetensors, trainer_state.json) whose steps carry
a circuit *strength* a in [0, 1] that rises along the series (`STRENGTHS`); at a = 0 nothing is planted and every
attention head attends uniformly.

Both families have three blocks and two heads of 16 dimensions in a 32-wide residual stream; nothing in block 2
writes anything, and blocks 1 and 2 only read:

* block 0 writes the *marker*, a fixed direction m, at position 0 and (in GPT-2 exactly, in Llama nearly) nowhere
  else; its MLP is the sublayer that writes it (`circuit_writer` = 0.5; in Llama on probes shorter than 24
  tokens or so, beyond which the recognising head's averaging alone passes `writer_ratio` 3, see docs/data.md);
* every head of blocks 1 and 2 is a *sink head*: its key reads the marker coordinate of its normalised input and its
  query is a positive constant, so it attends to position 0 as far as the marker stands out there. Their value and
  output weights are zero, so they change nothing downstream.

GPT-2 (learned absolute positions, ``family="gpt2"``). Token vectors live in dimensions 2..31 with zero mean and unit
norm, m = (e0 - e1) / sqrt 2, and position 0's embedding is a * m (later positions get small zero-mean vectors in the
token dimensions). Because every vector but position 0's is orthogonal to m and has zero mean, LayerNorm leaves
position t >= 1 with a marker coordinate of exactly 0, while position 0 gets l = a sqrt(d) / sqrt(a^2 + 1) whatever its
token. Block 0's attention is switched off (zero weights); its MLP has one ReLU unit that reads the marker coordinate
and writes `GAMMA["gpt2"]` * l along m: it writes exactly nothing at t >= 1. Position 0 leaves block 0 as M m + tok,
M = a + GAMMA * l. The sink heads' queries are their bias (a constant), so the score of key s is
beta * LN(h_s)_m / 4 (4 = sqrt of the head width): 0 for every s >= 1 and S = beta * M sqrt(d) / sqrt(M^2 + 1) / 4
for s = 0. Query t therefore puts exactly e^S / (e^S + t) on position 0 with any tokens: the sink is positional,
`positional_index` is 1 exactly, and `p0_similarity` = (M^2 + C) / (M^2 + 1) with C the mean cosine of the probe's
first-token vectors over row pairs (`p0_similarity`).

Llama (rotary positions, ``family="llama"``): no position enters the residual stream. Token embeddings are
c e0 + tok(x), tok a unit vector in dimensions 16..31, c = `C_LLAMA` small. Block 0 recognises position 0 through
the causal mask alone: head 0 attends uniformly (zero query and key weights) and its value and output copy
-a * tok(x_s) into the residual stream; query 0 can attend only to itself (a softmax over one key is exactly 1), so
position 0 keeps c e0 + (1 - a) tok(x_0), at a = 1 the same vector for every first token, while position t keeps
c e0 + tok(x_t) - a * mean(tok(x_0..x_t)). Block 0's MLP (ReLU gate and up both read e0) writes
gamma * (e0 coordinate after RMSNorm)^2 along m = e1, i.e. gamma * c^2 / (|h|^2 / d): large where the token content
has been cancelled, small elsewhere. The sink heads' keys read e1 and their queries e0 after RMSNorm, both in the
slowest rotary pair (rope_theta 1e9: it turns by under 1e-6 rad over the probe), so rotary positions play no part.
The mechanism is exact at position 0; elsewhere the marker is small but not 0, and it is as large as at position 0
where every token so far is one and the same (no causal block without positions can tell position 1 of "a a" from
position 0 of "a": both residuals are identical), so such rows share the sink among those positions
(`tied_sink_mass`).

The control (``control=True``) has the same weights except that the marker is bound to a token instead of a
position: in GPT-2 a * m moves from position 0's embedding into the BOS token's; in Llama head 0's output is zero and
the BOS token's content is shrunk by (1 - a) instead. With BOS at position 0 the model is the planted one there; with
any other first token position 0 is an ordinary token and the sink is gone (`positional_index` 0).

A planted circuit is a mechanism, not a training trajectory: its strengths are chosen, the steps are labels, and
nothing says a trained model builds its circuit this way or at this pace.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

FAMILIES = ("gpt2", "llama")
STEPS = (0, 100, 200, 300, 400)
STRENGTHS = (0.0, 0.25, 0.5, 0.85, 1.0)
WIDTH, HEAD_DIM, VOCAB, MAX_POSITIONS = 32, 16, 64, 32
BOS = VOCAB - 1
GAMMA = {"gpt2": 0.8, "llama": 2.0 / WIDTH}  # block 0's MLP gain (Llama: gamma * c^2 * d = marker at a = 1 / c^2)
BETA = {"gpt2": (3.0, 1.5), "llama": (40.0, 20.0)}  # the sink heads' query scale, head 0 and head 1
C_LLAMA = 0.1  # the constant every Llama token embedding carries along e0
SLOW = HEAD_DIM // 2 - 1  # the head dimension of the slowest rotary pair (rotate_half pairs i with i + HEAD_DIM/2)
SEED = 0


def token_vectors(family: str, seed: int = SEED) -> np.ndarray:
    """(VOCAB, WIDTH) unit token vectors: GPT-2's in dimensions 2.. with zero mean, Llama's in dimensions 16.."""
    rng = np.random.default_rng(seed)
    out = np.zeros((VOCAB, WIDTH))
    if family == "gpt2":
        raw = rng.standard_normal((VOCAB, WIDTH - 2))
        raw -= raw.mean(1, keepdims=True)
        out[:, 2:] = raw
    else:
        out[:, HEAD_DIM:] = rng.standard_normal((VOCAB, WIDTH - HEAD_DIM))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def marker(family: str) -> np.ndarray:
    m = np.zeros(WIDTH)
    if family == "gpt2":
        m[0], m[1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    else:
        m[1] = 1.0
    return m


def position0_marker(family: str, strength: float) -> float:
    """M: the marker coordinate of position 0 after block 0 (with BOS there, for the control too)."""
    a, d = strength, WIDTH
    if family == "gpt2":
        return a + GAMMA["gpt2"] * a * math.sqrt(d) / math.sqrt(a * a + 1)
    c = C_LLAMA
    return GAMMA["llama"] * c * c * d / (c * c + (1 - a) ** 2)


def p0_similarity(family: str, strength: float, mean_cos: float) -> float:
    """The planted p0_similarity after block 0 (and 1, 2: they write nothing), for a probe whose first tokens have a
    mean pairwise cosine `mean_cos` (over row pairs; same-token pairs count 1)."""
    m2 = position0_marker(family, strength) ** 2
    if family == "gpt2":
        return (m2 + mean_cos) / (m2 + 1)
    c2, keep2 = C_LLAMA**2, (1 - strength) ** 2
    return (c2 + m2 + keep2 * mean_cos) / (c2 + m2 + keep2)


def gpt2_sink_mass(strength: float, seq_len: int) -> np.ndarray:
    """The planted GPT-2 sink heads' sink_mass, (heads,): mean over queries t = 1..T-1 of e^S / (e^S + t)."""
    big_m = position0_marker("gpt2", strength)
    ln_m = big_m * math.sqrt(WIDTH) / math.sqrt(big_m**2 + 1)
    t = np.arange(1, seq_len)
    return np.array([np.mean(1 / (1 + t * math.exp(-b * ln_m / math.sqrt(HEAD_DIM)))) for b in BETA["gpt2"]])


def mean_pair_cosine(vectors: np.ndarray) -> float:
    """Mean cosine over the ordered pairs of distinct rows."""
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(u)
    s = u.sum(0)
    return float((s @ s - n) / (n * (n - 1)))


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


def config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=BOS)
    if family == "gpt2":
        return GPT2Config(
            n_embd=WIDTH,
            n_layer=3,
            n_head=WIDTH // HEAD_DIM,
            n_inner=8,
            n_positions=MAX_POSITIONS,
            activation_function="relu",
            layer_norm_epsilon=1e-12,
            **common,
        )
    return LlamaConfig(
        hidden_size=WIDTH,
        num_hidden_layers=3,
        num_attention_heads=WIDTH // HEAD_DIM,
        num_key_value_heads=WIDTH // HEAD_DIM,
        intermediate_size=8,
        hidden_act="relu",
        rms_norm_eps=1e-12,
        rope_theta=1e9,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        **common,
    )


def planted_model(family: str, strength: float, *, control: bool = False):
    """The model of one checkpoint: the circuit at `strength`, or the token-bound control."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    cfg = config(family)
    model = (GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms at 1 (their biases at 0), every other weight at 0: what is planted below is all there is
            p.fill_(1.0 if name.endswith("weight") and ("ln_" in name or "norm" in name) else 0.0)
        (_plant_gpt2 if family == "gpt2" else _plant_llama)(model, strength, control)
        if family == "llama":  # an untied head that reads the tokens back (no statistic reads it)
            model.lm_head.weight.copy_(_t(token_vectors(family)))
    return model


def _plant_gpt2(model, a: float, control: bool) -> None:
    tr, m = model.transformer, _t(marker("gpt2"))
    tok = token_vectors("gpt2")
    rng = np.random.default_rng(SEED + 1)
    positions = rng.standard_normal((MAX_POSITIONS, WIDTH - 2))
    positions -= positions.mean(1, keepdims=True)
    tr.wpe.weight[:, 2:] = _t(0.5 * positions / np.linalg.norm(positions, axis=1, keepdims=True))
    tr.wpe.weight[0] = 0.0
    tr.wte.weight.copy_(_t(tok))
    if control:
        tr.wte.weight[BOS] += a * m
    else:
        tr.wpe.weight[0] = a * m
    # block 0: attention off; one ReLU unit reads the marker coordinate and writes it back GAMMA times
    block = tr.h[0]
    block.mlp.c_fc.weight[:, 0] = m  # Conv1D: y = x @ W
    block.mlp.c_proj.weight[0] = GAMMA["gpt2"] * m
    for block in tr.h[1:]:
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # columns: q | k | v
        for head, beta in enumerate(BETA["gpt2"]):
            b[head * HEAD_DIM] = beta  # a constant query
            w[:, WIDTH + head * HEAD_DIM] = m  # the key reads the marker


def _plant_llama(model, a: float, control: bool) -> None:
    body = model.model
    tok = token_vectors("llama")
    emb = tok.copy()
    emb[:, 0] = C_LLAMA
    if control:
        emb[BOS, HEAD_DIM:] *= 1 - a
    body.embed_tokens.weight.copy_(_t(emb))
    attn = body.layers[0].self_attn
    # the values of head 0 are the token part of RMSNorm(embedding): every embedding has norm^2 c^2 + 1
    scale = 1 / math.sqrt((C_LLAMA**2 + 1) / WIDTH)
    for j in range(HEAD_DIM):
        attn.v_proj.weight[j, HEAD_DIM + j] = 1.0
        attn.o_proj.weight[HEAD_DIM + j, j] = 0.0 if control else -a / scale
    mlp = body.layers[0].mlp
    mlp.gate_proj.weight[0, 0] = 1.0
    mlp.up_proj.weight[0, 0] = 1.0
    mlp.down_proj.weight[1, 0] = GAMMA["llama"]
    for layer in body.layers[1:]:
        for head, beta in enumerate(BETA["llama"]):
            layer.self_attn.q_proj.weight[head * HEAD_DIM + SLOW, 0] = beta  # e0: a positive constant
            layer.self_attn.k_proj.weight[head * HEAD_DIM + SLOW, 1] = 1.0  # e1: the marker


def write_series(
    root, family: str, *, control: bool = False, steps=STEPS, strengths=STRENGTHS, age: float = 3600.0
) -> dict[int, Path]:
    """Write one checkpoint per (step, strength) under `root`; return {step: folder}. Files are back-dated by `age`
    seconds so discovery's quiet period is over."""
    root = Path(root)
    out = {}
    for step, strength in zip(steps, strengths):
        folder = root / f"checkpoint-{step}"
        planted_model(family, strength, control=control).save_pretrained(folder)
        state = {
            "global_step": step,
            "log_history": [{"step": step, "loss": 1.0 - 0.5 * strength, "planted_strength": strength}],
        }
        (folder / "trainer_state.json").write_text(json.dumps(state))
        out[step] = folder
    t = time.time() - age
    for path in [root, *root.rglob("*")]:
        os.utime(path, (t, t))
    return out


def recognition_step(family: str, mean_cos: float, steps=STEPS, strengths=STRENGTHS, threshold: float = 0.9):
    """The planted recognition step: the first step from which the planted p0_similarity stays above `threshold`."""
    above = [p0_similarity(family, a, mean_cos) > threshold for a in strengths]
    for i in range(len(steps)):
        if all(above[i:]):
            return steps[i]
    return math.nan


def llama_marker(tokens: np.ndarray, strength: float) -> np.ndarray:
    """(rows, T): the marker block 0's MLP writes in the planted Llama on probe rows `tokens`, from the
    construction's arithmetic: gamma * c^2 / (|h|^2 / d), h = c e0 + tok(x_t) - a * mean(tok(x_0..x_t))."""
    c = C_LLAMA
    tok = token_vectors("llama")[tokens]  # (rows, T, D)
    mean = np.cumsum(tok, axis=1) / np.arange(1, tokens.shape[1] + 1)[:, None]
    return GAMMA["llama"] * c * c / ((c * c + np.square(np.linalg.norm(tok - strength * mean, axis=-1))) / WIDTH)


def writer_ratios(family: str, tokens: np.ndarray, strength: float) -> tuple[float, float]:
    """The planted `writer_ratio` of block 0 (attention, MLP) on probe rows `tokens` (rows, T), from the
    construction's arithmetic: GPT-2's attention writes nothing (NaN) and its MLP only at position 0 (inf for a > 0);
    Llama's attention writes -a * mean(tok(x_0..x_t)) and its MLP the marker (`llama_marker`)."""
    if family == "gpt2":
        return math.nan, (math.inf if strength > 0 else math.nan)
    tok = token_vectors(family)[tokens]
    attn = np.linalg.norm(np.cumsum(tok, axis=1) / np.arange(1, tokens.shape[1] + 1)[:, None], axis=-1)  # times a
    mlp = llama_marker(tokens, strength)
    attn_ratio = attn[:, 0].mean() / attn[:, 1:].mean() if strength > 0 else math.nan
    return float(attn_ratio), float(mlp[:, 0].mean() / mlp[:, 1:].mean())


def tied_sink_mass(tokens: np.ndarray) -> float:
    """Sink mass of a saturated Llama sink head on probe rows `tokens`: a row whose first r + 1 tokens are one token
    has r + 1 positions in position 0's state (block 0 cannot tell them apart), and query t splits its attention
    evenly over those among keys 0..t. Mean over rows and queries 1..T-1."""
    rows, seq_len = tokens.shape
    total = 0.0
    for row in tokens:
        run = int(np.argmax(row != row[0])) if (row != row[0]).any() else seq_len  # leading copies of row[0]
        total += sum(1 / min(t + 1, run) for t in range(1, seq_len))
    return total / (rows * (seq_len - 1))
