"""The contenders: what each one does with the same checkpoints and probe, and what it reports (seconds per
checkpoint end to end, the forward alone, the statistics it computed for the agreement check)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.devices import parse_dtype

from . import gib
from .pagecache import drop_page_cache, io_per_ckpt, read_io
from .timing import free, median_time, sync, weight_files


@contextlib.contextmanager
def copy_of(ckpt):
    """A throw-away copy of a checkpoint, beside it (same file system), removed afterwards. Warm-up runs on it, so
    that whatever the warm-up leaves mapped (a model kept for reuse holds its weights) pins the copy's pages in
    the page cache, not those of the files the timed pass reads."""
    src = Path(ckpt.path)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-warmup-", dir=src.parent))
    try:
        dst = tmp / src.name
        shutil.copytree(src, dst)
        files = tuple(str(dst / Path(f).relative_to(src)) for f in ckpt.weight_files)
        yield dataclasses.replace(ckpt, path=str(dst), weight_files=files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_sinktrace(job, ckpts, tokens, meta, peaks) -> dict:
    import torch

    from pipeline.records import Probe
    from pipeline.replay import ModelCache, PhaseTimes, ReplaySettings, replay

    device = job["device"]
    layered = job["kind"] == "layered"  # a 1-byte budget: every checkpoint streams block by block
    settings = ReplaySettings(
        device=device,
        dtype=job["dtype"],
        batch_size=job["batch_size"],
        key_positions=job["key_positions"],
        max_device_memory=1 if layered else None,
    )
    probe = Probe(name=meta["name"], kind="random", tokens=tokens, seed=meta["seed"], first_token=meta["first_token"])
    # the model kept between checkpoints, as a sinktrace worker keeps it (the warm-up builds it)
    models = ModelCache()
    if job["warmup"]:
        with copy_of(ckpts[0]) as copy:
            for _ in range(job["warmup"]):
                replay(copy, probe, settings, models=models)
    free(device)

    # end to end, from a cold page cache; each replay is told the next checkpoint, as the sinktrace driver does
    cache = drop_page_cache(weight_files(ckpts), job["cold_cache"])
    times = PhaseTimes(device)
    sink, entropy = [], []
    io0 = read_io()
    sync(device)
    t0 = time.perf_counter()
    for c, nxt in zip(ckpts, [*ckpts[1:], None]):
        ds = replay(c, probe, settings, read_next=nxt, models=models, times=times)
        sink.append(ds["sink_mass"].values.tolist())
        entropy.append(ds["entropy"].values.tolist())
    sync(device)
    e2e = (time.perf_counter() - t0) / len(ckpts)
    io1 = read_io()
    # the replay's peaks; the floor's model loaded below beside the kept one is not the replay's memory
    peak_host, peak_device = peaks.host(), peaks.device()

    # the statistics forward alone, weights already on the device: the `measure` phase of a replay whose model is
    # kept (layer by layer, the forward is the replay)
    fwd = fwd_cpu = paired = None
    if not layered:

        def stats() -> tuple[float, float]:
            phases = PhaseTimes(device)
            replay(ckpts[0], probe, settings, models=models, times=phases)
            return phases.seconds["measure"], phases.cpu_seconds["measure"]

        floor_model = hf_load(ckpts[0].path, device, job["dtype"], "sdpa")
        ids = torch.from_numpy(tokens).to(device)
        fwd, fwd_cpu, paired = paired_forwards(
            stats,
            floor_forward(floor_model, ids, job["batch_size"], job["logits_to_keep"]),
            job["forward_repeats"],
            device,
        )
        del floor_model
    models.clear()
    free(device)
    n = len(ckpts)
    load_s, measure_s = times.seconds.get("load", 0.0) / n, times.seconds.get("measure", 0.0) / n
    return {
        "e2e_s": e2e,
        "forward_s": fwd,
        "forward_cpu_s": fwd_cpu,
        "paired_floor": paired,
        "breakdown": {"load_s": load_s, "measure_s": measure_s, "other_s": e2e - load_s - measure_s},
        "cache": cache,
        "io": io_per_ckpt(io0, io1, n),
        "sink_mass": sink,
        "entropy": entropy,
        "peak_rss_bytes": peak_host,
        "peak_rss_scope": peaks.host_scope,
        "peak_device_bytes": peak_device,
    }


def floor_forward(model, ids, batch_size: int, logits_to_keep: int):
    """The compute floor's forward: the probe in micro-batches through a model loaded with plain sdpa attention,
    logits for the last `logits_to_keep` positions."""
    import torch

    def forward():
        with torch.inference_mode():
            for start in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[start : start + batch_size], use_cache=False, logits_to_keep=logits_to_keep)

    return forward


def paired_forwards(stats, floor, repeats: int, device: str):
    """Median wall and CPU seconds of the statistics forward (`stats()` returns its wall and CPU seconds), and its
    ratios to the compute floor's forward run right after it, pair by pair: a machine's speed drifts between
    processes and over minutes (by a fifth on a shared 2-core machine), so a ratio of two medians taken apart moves
    more than the statistics' own cost."""
    floor()  # warm-up: sdpa's first call (the statistics forward's code just ran in the end-to-end pass)
    pairs = [(stats(), median_time(floor, 1, device, warm=False)) for _ in range(repeats)]
    paired = {
        "forward_s": statistics.median(f[0] for _, f in pairs),
        "forward_cpu_s": statistics.median(f[1] for _, f in pairs),
        "ratio": statistics.median(s[0] / f[0] for s, f in pairs),
        "ratio_cpu": statistics.median(s[1] / f[1] for s, f in pairs),
    }
    return statistics.median(s[0] for s, _ in pairs), statistics.median(s[1] for s, _ in pairs), paired


def eager_attention_bytes(n_layers: int, n_heads: int, seq_len: int, batch: int, itemsize: int) -> int:
    """Estimated memory of eager attention with output_attentions=True over one forward: every layer's
    (batch, heads, T, T) weights are kept for the output, plus one layer's scores and float32 softmax in flight,
    plus the float32 copy and entropy terms of one row's matrices while reducing them."""
    per_layer = batch * n_heads * seq_len * seq_len
    retained = n_layers * per_layer * itemsize
    in_flight = per_layer * (2 * itemsize + 4)
    reducing = n_heads * seq_len * seq_len * 4 * 2
    return retained + in_flight + reducing


def eager_stats(model, ids, batch_size: int, logits_to_keep: int):
    """Sink mass and entropy (layer, head) from the T x T matrices eager attention returns; query 0 excluded,
    averaged over queries 1..T-1 and rows like sinktrace's statistics."""
    import torch

    n_rows, t = ids.shape
    sink = ent = None
    with torch.inference_mode():
        for start in range(0, n_rows, batch_size):
            out = model(
                input_ids=ids[start : start + batch_size],
                output_attentions=True,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
            if sink is None:
                n_layers, n_heads = len(out.attentions), out.attentions[0].shape[1]
                sink = torch.zeros(n_layers, n_heads, dtype=torch.float64, device=ids.device)
                ent = torch.zeros_like(sink)
            for layer, a in enumerate(out.attentions):
                for r in range(a.shape[0]):
                    p = a[r, :, 1:, :].float()  # (heads, T-1, T)
                    sink[layer] += p[..., 0].sum(-1).double()
                    ent[layer] += torch.special.entr(p).sum(-1).sum(-1).double()
                    del p
            del out
    denom = n_rows * (t - 1)
    return (sink / denom).cpu().numpy(), (ent / denom).cpu().numpy()


def hf_load(path: str, device: str, dtype: str, attn: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    direct = device != "cpu" and is_accelerate_available()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        attn_implementation=attn,
        dtype=parse_dtype(dtype),
        local_files_only=True,
        **({"device_map": device} if direct else {}),
    )
    if device != "cpu" and not direct:
        model = model.to(device)
    return model.eval()


def run_eager(job, ckpts, tokens, meta, peaks) -> dict:
    import torch

    device = job["device"]
    config = json.loads((Path(ckpts[0].path) / "config.json").read_text())
    itemsize = parse_dtype(job["dtype"]).itemsize
    need = eager_attention_bytes(
        config["num_hidden_layers"],
        config["num_attention_heads"],
        tokens.shape[1],
        min(job["batch_size"], tokens.shape[0]),
        itemsize,
    )
    budget = job["eager_budget_bytes"]
    if budget is not None and need > budget:
        return {
            "status": "skipped",
            "note": f"skipped: would need {gib(need):.1f} GiB for the T x T attention "
            f"matrices (eager_budget_gib={gib(budget):.3g})",
            "estimated_bytes": need,
        }
    ids = torch.from_numpy(tokens).to(device)
    bs, keep = job["batch_size"], job["logits_to_keep"]

    for _ in range(job["warmup"]):
        model = hf_load(ckpts[0].path, device, job["dtype"], "eager")
        eager_stats(model, ids, bs, keep)
        del model
    free(device)

    cache = drop_page_cache(weight_files(ckpts), job["cold_cache"])
    loads, sink, entropy = [], [], []
    io0 = read_io()
    sync(device)
    t0 = time.perf_counter()
    for c in ckpts:
        t1 = time.perf_counter()
        model = hf_load(c.path, device, job["dtype"], "eager")
        sync(device)
        loads.append(time.perf_counter() - t1)
        s, h = eager_stats(model, ids, bs, keep)
        sink.append(s.tolist())
        entropy.append(h.tolist())
        del model
    sync(device)
    e2e = (time.perf_counter() - t0) / len(ckpts)
    io1 = read_io()
    free(device)

    model = hf_load(ckpts[0].path, device, job["dtype"], "eager")
    fwd, fwd_cpu = median_time(
        functools.partial(eager_stats, model, ids, bs, keep), job["forward_repeats"], device, warm=False
    )
    del model
    n = len(ckpts)
    return {
        "e2e_s": e2e,
        "forward_s": fwd,
        "forward_cpu_s": fwd_cpu,
        "breakdown": {"from_pretrained_s": sum(loads) / n, "forward_and_stats_s": e2e - sum(loads) / n},
        "cache": cache,
        "io": io_per_ckpt(io0, io1, n),
        "estimated_bytes": need,
        "sink_mass": sink,
        "entropy": entropy,
    }


def run_sdpa(job, ckpts, tokens, meta, peaks) -> dict:
    import torch

    device = job["device"]
    model = hf_load(ckpts[0].path, device, job["dtype"], "sdpa")
    ids = torch.from_numpy(tokens).to(device)
    bs, keep = job["batch_size"], job["logits_to_keep"]
    peaks.reset()  # weights already on the device: the floor's peak is that of the forward (weights included)
    forward = floor_forward(model, ids, bs, keep)
    fwd, fwd_cpu = median_time(forward, job["forward_repeats"], device, warm=job["warmup"] > 0)
    return {
        "e2e_s": None,
        "forward_s": fwd,
        "forward_cpu_s": fwd_cpu,
        "attention": attention_share(
            forward, fwd_cpu, model.config.get_text_config().num_hidden_layers, job["forward_repeats"], device
        ),
    }


def attention_share(forward, forward_cpu_s: float, layers: int, repeats: int, device: str) -> dict | None:
    """What bounds the statistics forward against this floor: the share of the floor's forward (`forward_cpu_s`
    CPU seconds) spent in PyTorch's sdpa, and sinktrace's fused attention kernel with its statistics against the
    same kernel without them, on the same queries, keys and values (every layer's, of the first micro-batch).

    The sdpa calls are timed and their inputs kept by a `TorchFunctionMode` around one forward: PyTorch's own
    interception of its functions, so that nothing of transformers is patched. None: the forward made no sdpa call
    (nothing to compare)."""
    import torch
    from torch.overrides import TorchFunctionMode

    from pipeline.replay import fused_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    inside, calls = [0.0], []

    class TimedSdpa(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is not sdpa:
                return func(*args, **kwargs)
            sync(device)
            t0 = time.process_time()
            out = func(*args, **kwargs)
            sync(device)
            inside[0] += time.process_time() - t0
            if len(calls) < layers:
                query, key, value = args[:3]
                calls.append((query, key, value, kwargs.get("scale") or query.shape[-1] ** -0.5))
            return out

    with TimedSdpa():
        forward()
    if not calls:
        return None
    share = inside[0] / forward_cpu_s

    def run(with_stats):
        with torch.inference_mode():
            for q, k, v, scale in calls:
                if fused_attention(q, k, v, scale, with_stats=with_stats) is None:
                    raise RuntimeError("no fused kernel serves this device and dtype")

    try:
        plain = median_time(lambda: run(False), repeats, device, warm=True)[1]
        stats = median_time(lambda: run(True), repeats, device, warm=True)[1]
    except RuntimeError as e:
        return {"share": share, "note": str(e)}
    return {"share": share, "with_stats": stats / plain}


# the contenders in table order, and the function each job kind runs ("layered" is the replay with a 1-byte budget)
RUNS = {"sinktrace": run_sinktrace, "layered": run_sinktrace, "eager": run_eager, "sdpa": run_sdpa}
CONTENDERS = tuple(RUNS)
