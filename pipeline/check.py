"""`sinktrace check`: the measuring routes proved on this machine, against eager attention, family by family.

For every supported family a tiny random model is built in memory (a transformers config and `from_config`,
seeded; nothing is downloaded or written), put on the replay's device in the replay's dtype, and the probe is run
through it twice: by `measure` on the family's own route (pipeline/replay/measure.py: `sinkstats` or `eager`), and by
eager attention with `output_attentions=True` (pipeline/replay/reference.py, which shares no code with either route),
in the same dtype on the same device. Every statistic of the two must agree within the dtype's tolerance.

Run it first on a new GPU machine and after upgrading torch or transformers: the fused GPU kernels, and the model
code of a new transformers release, are exactly what the CPU tests cannot vouch for.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError

USAGE = "usage: sinktrace check [replay.device=...] [replay.dtype=...] [other overrides of the sinktrace config]"

SEQ_LEN, ROWS, VOCAB = 64, 4, 128
FIRST = 5  # the probe's first token (not 0, which some configs make the padding index)
WINDOW = 16  # shorter than SEQ_LEN, so the windowed layers leave key 0 behind
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    # large weights make attention peaky (scores of a few units), so a wrong formula moves the numbers visibly
    initializer_range=0.2,
)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, initializer_range=0.2)


def _without(*keys, **extra):
    return {k: v for k, v in COMMON.items() if k not in keys} | extra


def _configs() -> dict[str, Callable]:
    """The README's supported families, each as a tiny config exercising what sets it apart."""
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**COMMON),
        "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW),
        "qwen2": lambda: tf.Qwen2Config(**COMMON),
        "qwen3": lambda: tf.Qwen3Config(**COMMON),
        # every token takes every expert: a router choosing otherwise on a rounding would swamp what is checked
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **COMMON, num_experts=2, num_experts_per_tok=2, moe_intermediate_size=32
        ),
        "olmo2": lambda: tf.Olmo2Config(**COMMON),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            **_without("num_key_value_heads", "head_dim", rotary_pct=0.25, use_parallel_residual=True)
        ),
        "gpt2": lambda: tf.GPT2Config(
            **SMALL, n_embd=64, n_layer=2, n_head=4, n_positions=128, scale_attn_by_inverse_layer_idx=True
        ),
        "gemma2": lambda: tf.Gemma2Config(
            **COMMON, sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=2.0
        ),
        "gpt_oss": lambda: tf.GptOssConfig(**COMMON, sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=2),
        "nanochat": lambda: tf.NanoChatConfig(**_without("head_dim")),
        "stablelm": lambda: tf.StableLmConfig(**_without("head_dim", qk_layernorm=True)),
        "falcon": lambda: tf.FalconConfig(**SMALL, num_hidden_layers=2, num_attention_heads=4),
        "bloom": lambda: tf.BloomConfig(**SMALL, n_layer=2, n_head=4),
        "gpt_neo": lambda: tf.GPTNeoConfig(
            **SMALL,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=WINDOW,
            max_position_embeddings=128,
        ),
        "mpt": lambda: tf.MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
        "biogpt": lambda: tf.BioGptConfig(**SMALL, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        "xglm": lambda: tf.XGLMConfig(
            vocab_size=VOCAB, d_model=64, num_layers=2, attention_heads=4, ffn_dim=96, init_std=0.2
        ),
    }


FAMILIES = tuple(
    "llama mistral qwen2 qwen3 qwen3_moe olmo2 gpt_neox gpt2 gemma2 gpt_oss nanochat "
    "stablelm falcon bloom gpt_neo mpt biogpt xglm".split()
)

# Tolerance on each statistic's difference, max |route - eager| / (1 + |eager|) (np.allclose with rtol = atol),
# by the dtype both sides run in. float32 (and float64): the tests' bound; what is left is summation order, about
# 1e-7. Half precision: the two sides round activations differently, and eager's probabilities are themselves
# stored in half (a probability near 1 is off by up to half a unit in the last place: 2^-9 = 2e-3 in bfloat16,
# 2^-12 = 2.4e-4 in float16), which the next layer compounds. On the CPU the largest differences over every family
# were 3.5e-3 (bfloat16) and 1.3e-3 (float16); the bounds leave about three times that for other kernels. Wrong
# formulas move more: in bfloat16 an attention scale 10% off moved the entropy by 5.7e-2, a sliding window left out
# moved it by 1.8e-1 and the sink mass by 4.1e-2.
TOLERANCES = {"float64": 1e-5, "float32": 1e-5, "bfloat16": 1e-2, "float16": 4e-3}

# Table columns: each the largest difference over the statistics it names.
COLUMNS = {
    "sink_mass": ("sink_mass", "sink_mass_by_q"),
    "entropy": ("entropy",),
    "key_mass": ("key_mass",),
    "learned_sink": ("learned_sink_mass",),
    "key_norm": ("key_norm_p0", "key_norm"),
    "value_norm": ("value_norm_p0", "value_norm"),
    "resid": ("resid_norm_p0", "resid_norm", "resid_max_p0", "resid_median"),
}


@dataclass
class FamilyResult:
    family: str
    route: str = "?"
    differences: dict[str, float] = field(default_factory=dict)  # statistic -> scaled difference
    seconds: dict[str, float] = field(default_factory=dict)  # "route" and "eager" forwards
    error: str | None = None

    def passed(self, tolerance: float) -> bool:
        # written so that a NaN difference fails
        return self.error is None and all(d <= tolerance for d in self.differences.values())


def difference(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / (1 + |want|): within `tol` exactly when np.allclose(got, want, rtol=tol, atol=tol)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    d = np.abs(got - want) / (1.0 + np.abs(want))
    return float("nan") if not np.isfinite(d).all() else float(d.max())


def probe_tokens(seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(ROWS, SEQ_LEN), dtype=np.int64)
    ids[:, 0] = FIRST
    return ids


def build_model(family: str, device: str, dtype):
    """The family's tiny model, seeded, built for its route, on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    from .replay.load import quiet_transformers
    from .replay.measure import attention_route

    torch.manual_seed(0)
    with quiet_transformers():
        config = _configs()[family]()
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_route(config))
    if family == "nanochat":  # its own init leaves some projections at zero: no attention pattern to check
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
    for module in model.modules():  # learned sink logits (GPT-OSS) around the scores, so their mass is in between
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            with torch.no_grad():
                module.sinks.normal_(2.0, 1.0)
    return model.to(device=device, dtype=dtype).eval()


def check_family(family: str, device: str, dtype, *, batch_size: int = 16, key_positions: int = 4) -> FamilyResult:
    """One family: its route's statistics against eager's, and both forwards' wall times."""
    from .replay.measure import attention_route, measure
    from .replay.reference import reference_stats
    from .replay.step import PhaseTimes

    result = FamilyResult(family)
    try:
        model = build_model(family, device, dtype)
        result.route = attention_route(model)
        ids = probe_tokens()
        times = PhaseTimes(device)
        # on an accelerator the first call of each kernel pays for loading and tuning it: a run first, untimed
        for timed in (False, True) if device != "cpu" else (True,):
            with times.phase("route") if timed else contextlib.nullcontext():
                got = measure(model, ids, batch_size=batch_size, key_positions=key_positions, measures=())
        for timed in (False, True) if device != "cpu" else (True,):
            want = reference_stats(model, ids, key_positions, keep_dtype=True, times=times if timed else None)
    except Exception as e:  # a family this torch or transformers breaks is a finding, not a crash of the check
        result.error = f"{type(e).__name__}: {e}".splitlines()[0]
        return result
    result.seconds = dict(times.seconds)
    missing = sorted(set(want) ^ set(got))
    if missing:
        result.error = f"statistics on one side only: {', '.join(missing)}"
    result.differences = {name: difference(got[name], want[name]) for name in sorted(set(want) & set(got))}
    return result


@contextlib.contextmanager
def transformers_errors_only():
    """transformers' warnings about the tiny made-up configs (token ids outside their small vocabulary, rotary
    scaling meant for longer contexts) say nothing about the user's models: only its errors are shown."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def tolerance_for(dtype) -> float:
    return TOLERANCES[str(dtype).removeprefix("torch.")]


def table(results: list[FamilyResult], tolerance: float) -> str:
    """One line per family: its route, the largest difference per column of statistics, the tolerance, the route's
    forward time over eager's, and the verdict."""
    header = ["family", "route", *COLUMNS, "tolerance", "time", "result"]
    rows = []
    for r in results:
        cells = []
        for names in COLUMNS.values():
            values = [r.differences[n] for n in names if n in r.differences]
            cells.append(f"{max(values):.1e}" if values else "-")
        eager = r.seconds.get("eager")
        ratio = f"{r.seconds['route'] / eager:.2f}x" if eager and "route" in r.seconds else "-"
        verdict = "ok" if r.passed(tolerance) else ("error" if r.error else "FAIL")
        rows.append([r.family, r.route, *cells, f"{tolerance:.0e}", ratio, verdict])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def resolve(cfg) -> tuple[str, object]:
    """The device and dtype a replay with these settings would use on a checkpoint stored in bfloat16 (as most
    checkpoints are): `auto` is the GPU where there is one, and there the checkpoint's own bfloat16; on the CPU
    float32."""
    import torch

    from .devices import load_dtype, resolve_device

    device = resolve_device(str(cfg.replay.device))
    try:
        return device, load_dtype(str(cfg.replay.dtype), device, torch.bfloat16)
    except ValueError as e:
        raise UsageError(f"replay.dtype={cfg.replay.dtype}: {e}") from None


def run(overrides: list[str], families: tuple[str, ...] = FAMILIES) -> int:
    """The command: 0 when every family is within tolerance, 1 when one is not (or fails), 2 for bad settings."""
    from . import hydra_app, settings
    from .settings import compose

    if any(a in ("-h", "--help") for a in overrides):
        print(USAGE)
        return 0
    try:
        if any(a.startswith("-") for a in overrides):
            raise UsageError(f"{next(a for a in overrides if a.startswith('-'))}: no such option; {USAGE}")
        try:
            cfg = compose(overrides)
        except hydra_app.COMPOSITION_ERRORS as e:
            raise UsageError(hydra_app.composition_message(e, settings.no_such_setting)) from None
        settings.check(cfg)
        if cfg.replay.key_positions >= SEQ_LEN:
            raise UsageError(f"replay.key_positions={cfg.replay.key_positions}: the check's probe has {SEQ_LEN} tokens")
        device, dtype = resolve(cfg)
    except UsageError as e:
        print(f"sinktrace check: error: {e}", file=sys.stderr)
        return 2
    import torch
    import transformers

    from .devices import use_threads

    use_threads(cfg.replay.threads)
    tolerance = tolerance_for(dtype)
    print(
        f"sinktrace check: {len(families)} families, each a tiny random model on {device} in "
        f"{str(dtype).removeprefix('torch.')}, its route against eager attention (torch {torch.__version__}, "
        f"transformers {transformers.__version__})\n"
        f"probe: {ROWS} rows x {SEQ_LEN} tokens; each column: max |route - eager| / (1 + |eager|) over its "
        "statistics; time: the route's measuring forward / eager's forward\n",
        flush=True,
    )
    start = time.perf_counter()
    with transformers_errors_only():
        results = [
            check_family(f, device, dtype, batch_size=cfg.replay.batch_size, key_positions=cfg.replay.key_positions)
            for f in families
        ]
    print(table(results, tolerance))
    for r in results:
        if r.error:
            print(f"{r.family}: {r.error}")
    bad = [r.family for r in results if not r.passed(tolerance)]
    took = time.perf_counter() - start
    if bad:
        print(
            f"\nsinktrace check: {len(bad)} of {len(results)} families outside the tolerance or failing: "
            f"{', '.join(bad)} ({took:.1f} s)",
            file=sys.stderr,
        )
        return 1
    print(f"\nall {len(results)} families within {tolerance:.0e} of eager attention ({took:.1f} s)")
    return 0


def main() -> None:
    from .settings import new_spelling

    sys.exit(run([new_spelling(a) for a in sys.argv[1:]]))


if __name__ == "__main__":
    main()
