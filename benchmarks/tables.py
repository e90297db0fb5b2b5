"""The benchmark's results as one JSON document (rows, ratios, agreement with eager, targets) and as a printed table."""

from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.devices import parse_dtype

from . import gib
from .fixtures import param_count
from .peers import LABELS as PEER_LABELS
from .peers import PEERS
from .timing import device_name

LABELS = {
    "sinktrace": "sinktrace replay",
    "layered": "sinktrace, layer by layer",
    "eager": "eager+output_attentions",
    "sdpa": "compute floor (sdpa)",
    "read": "read floor",
}
# GPU targets: statistics forward / sdpa forward, up to 8,192 tokens and up to 32,768
FLOOR_TARGETS = ((8192, 1.3), (32768, 2.0))
EAGER_TARGET_LEN, EAGER_SPEEDUP, EAGER_MEMORY_SHARE = 2048, 3.0, 0.1
READ_TARGET_SHARE, READ_TARGET_MIN_CKPTS = 0.85, 8
# CPU targets: the statistics forward / sdpa forward at T = 512 to 2,048; a small run's end-to-end time against a
# plain transformers script; large runs (T >= 1,024) against the fastest and the leanest peer
CPU_FLOOR_LENS, CPU_FLOOR_LIMIT = (512, 2048), 1.3
SMALL_RUN_LIMIT = 1.2
CONCURRENT_LIMIT = 2.5  # two runs at once, each against one run alone: twice the work on the same cores, plus slack
LARGE_RUN_LEN, LARGE_RUN_SPEEDUP, LARGE_RUN_MEMORY_SHARE = 1024, 2.0, 0.5


@dataclass
class Measured:
    """What one benchmark run measured, which `assemble` turns into the JSON document."""

    cfg: DictConfig
    preset: str
    command: str
    device: str
    ckpts: list
    bytes_per_ckpt: int
    model_config: dict
    read: dict  # the read floor
    results: dict  # (contender, T) -> its row
    contenders: list[str]
    started: datetime.datetime
    budget: int | None  # eager's memory budget in bytes
    peers: dict = field(default_factory=dict)  # (peer, T) -> its row
    small: dict = field(default_factory=dict)  # the small run's rows, as `peers`
    concurrent: dict = field(default_factory=dict)  # two runs at once


def assemble(m: Measured) -> dict:
    cfg, device, read, results, contenders = m.cfg, m.device, m.read, m.results, m.contenders
    ckpts, bytes_per_ckpt, model_config, budget = m.ckpts, m.bytes_per_ckpt, m.model_config, m.budget
    import numpy as np
    import torch
    import transformers

    read_ok = read.get("status") == "ok"
    read_s = bytes_per_ckpt / read["bytes_per_s"] if read_ok else None
    rows, agreement = [], {}
    for t in (int(x) for x in cfg.probe.seq_lens):
        got = {c: results[(c, t)] for c in contenders}
        eager, sdpa = got.get("eager", {}), got.get("sdpa", {})
        for c in contenders:
            r = got[c]
            rows.append(table_row(t, c, r, eager, sdpa, read_s))
        rows.append(
            table_row(
                t,
                "read",
                {"status": read.get("status", "error"), "e2e_s": read_s, "note": read.get("note", "")},
                eager,
                sdpa,
                read_s,
            )
        )
        e = got.get("eager", {})
        for c in ("sinktrace", "layered"):
            s = got.get(c, {})
            if s.get("status") == "ok" and e.get("status") == "ok":
                agreement[f"{c}@{t}"] = {
                    "max_abs_sink_mass": float(np.max(np.abs(np.subtract(s["sink_mass"], e["sink_mass"])))),
                    "max_abs_entropy": float(np.max(np.abs(np.subtract(s["entropy"], e["entropy"])))),
                }
    doc = {
        "command": m.command,
        "preset": m.preset,
        "created": m.started.isoformat(timespec="seconds"),
        "device": {
            "kind": "cuda" if device.startswith("cuda") else "cpu",
            "name": device_words(device, results),
            "cpu_count": os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sinktrace": version(),
        },
        "model": {"parameters": param_count(cfg.model), "dtype": str(cfg.dtype), "config": model_config},
        "checkpoints": {
            "root": str(Path(ckpts[0].path).parent),
            "count": len(ckpts),
            "steps": [c.step for c in ckpts],
            "bytes_per_checkpoint": bytes_per_ckpt,
        },
        "probe": {
            "seq_lens": [int(x) for x in cfg.probe.seq_lens],
            "batch_size": int(cfg.probe.batch_size),
            "seed": int(cfg.probe.seed),
        },
        "settings": {
            "isolate": str(cfg.isolate),
            "warmup": int(cfg.warmup),
            "forward_repeats": int(cfg.forward_repeats),
            "logits_to_keep": int(cfg.logits_to_keep),
            "eager_budget_bytes": budget,
            "cold_cache": str(cfg.cold_cache),
            "small_run_layers": int(cfg.small_run.layers),
        },
        "read_floor": read,
        "rows": rows,
        "agreement_with_eager": agreement,
        "details": {f"{c}@{t}": details(r) for (c, t), r in results.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    doc["peers"] = peer_rows(m.peers, results)
    doc["small_run"] = peer_rows(m.small, {})
    doc["concurrent_runs"] = m.concurrent
    doc["targets"] = targets(doc)
    return finite(doc)


def peer_rows(peers: dict, results: dict) -> list[dict]:
    """The peers' rows: whole-process wall and CPU seconds, peak RSS, ratios to the fastest and leanest peer
    (sinktrace excluded), and the largest sink-mass difference from the eager reference of the same run (the
    eager contender's, else the transformers script's: both read the eager attention matrices)."""
    import numpy as np

    rows = []
    for t in sorted({t for _, t in peers}):
        got = {p: r for (p, tt), r in peers.items() if tt == t}
        others = [r for p, r in got.items() if p != "sinktrace" and r["status"] == "ok"]
        fastest = min((r["wall_s"] for r in others), default=None)
        leanest = min((r["peak_rss_bytes"] for r in others), default=None)
        eager = results.get(("eager", t), {})
        reference = eager if eager.get("status") == "ok" else got.get("transformers", {})
        for p in PEERS:
            if p not in got:
                continue
            r = got[p]
            ok = r["status"] == "ok"
            diff = None
            if ok and reference.get("status", "ok") == "ok" and reference.get("sink_mass") is not None:
                diff = float(np.max(np.abs(np.subtract(r["sink_mass"], reference["sink_mass"]))))
            rows.append(
                {
                    "seq_len": t,
                    "contender": p,
                    "label": PEER_LABELS[p],
                    "status": r["status"],
                    "note": r.get("note", ""),
                    "checkpoints": len(r.get("sink_mass") or []) or None,
                    "wall_s": r.get("wall_s") if ok else None,
                    "cpu_s": r.get("cpu_s") if ok else None,
                    "peak_rss_bytes": r.get("peak_rss_bytes") if ok else None,
                    "wall_vs_fastest_peer": r["wall_s"] / fastest if ok and fastest else None,
                    "rss_vs_leanest_peer": r["peak_rss_bytes"] / leanest if ok and leanest else None,
                    "max_abs_sink_mass_vs_eager": diff,
                    "versions": r.get("versions", {}),
                }
            )
    return rows


def device_words(device: str, results: dict) -> str:
    if not device.startswith("cuda"):
        return device_name(device)
    names = [r["device_name"] for r in results.values() if r.get("device_name")]
    return names[0] if names else device


def table_row(t, contender, r, eager, sdpa, read_s) -> dict:
    ok = r.get("status") == "ok"
    e2e, fwd = (r.get("e2e_s"), r.get("forward_s")) if ok else (None, None)
    # the floor timed right after each statistics forward, in the same process: steadier than the floor's own row
    paired = r.get("paired_floor") if ok else None

    def ratio(a, ref_row, key):
        b = ref_row.get(key) if ref_row.get("status") == "ok" else None
        return a / b if a is not None and b else None

    return {
        "seq_len": t,
        "rows": r.get("rows"),
        "contender": contender,
        "label": LABELS[contender],
        "status": r.get("status", "error"),
        "note": r.get("note", "") or "",
        "e2e_s_per_ckpt": e2e,
        "forward_s": fwd,
        "e2e_vs_eager": ratio(e2e, eager, "e2e_s"),
        "forward_vs_eager": ratio(fwd, eager, "forward_s"),
        "forward_vs_sdpa": paired["ratio"] if paired else ratio(fwd, sdpa, "forward_s"),
        "forward_cpu_s": r.get("forward_cpu_s") if ok else None,
        "forward_cpu_vs_sdpa": (
            paired["ratio_cpu"] if paired else ratio(r.get("forward_cpu_s") if ok else None, sdpa, "forward_cpu_s")
        ),
        "e2e_vs_read": e2e / read_s if e2e is not None and read_s else None,
        "peak_rss_bytes": r.get("peak_rss_bytes"),
        "peak_device_bytes": r.get("peak_device_bytes"),
        "cold_cache": (r.get("cache") or {}).get("cold"),
    }


def details(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("sink_mass", "entropy")}


def targets(doc: dict) -> list[dict]:
    """The GPU targets, judged from the rows (judged=false on the CPU, where they do not apply)."""
    on_gpu = doc["device"]["kind"] == "cuda"
    rows = {(r["seq_len"], r["contender"]): r for r in doc["rows"]}
    lens = doc["probe"]["seq_lens"]
    out = []

    def add(name, value, limit, passed, note=""):
        out.append({"target": name, "value": value, "limit": limit, "pass": passed, "judged": on_gpu, "note": note})

    for t in lens:
        limit = next((lim for top, lim in FLOOR_TARGETS if t <= top), None)
        if limit is None:
            continue
        r = rows.get((t, "sinktrace"))
        v = r and r["forward_vs_sdpa"]
        add(
            f"statistics forward <= {limit}x the compute floor at T={t}",
            v,
            limit,
            None if v is None else v <= limit,
            "" if v is not None else "not measured",
        )
    if EAGER_TARGET_LEN in lens:
        s, e = rows.get((EAGER_TARGET_LEN, "sinktrace")), rows.get((EAGER_TARGET_LEN, "eager"))
        if s and e and s["status"] == "ok":
            if e["status"] == "oom":
                add(
                    f">= {EAGER_SPEEDUP}x faster than eager at T={EAGER_TARGET_LEN} (end to end)",
                    None,
                    EAGER_SPEEDUP,
                    True,
                    "eager ran out of memory",
                )
                add(
                    f"<= {EAGER_MEMORY_SHARE} of eager's peak device memory at T={EAGER_TARGET_LEN}",
                    None,
                    EAGER_MEMORY_SHARE,
                    True,
                    "eager ran out of memory",
                )
            elif e["status"] == "ok":
                speed = e["e2e_s_per_ckpt"] / s["e2e_s_per_ckpt"]
                fwd_speed = e["forward_s"] / s["forward_s"] if s["forward_s"] else None
                add(
                    f">= {EAGER_SPEEDUP}x faster than eager at T={EAGER_TARGET_LEN} (end to end)",
                    speed,
                    EAGER_SPEEDUP,
                    speed >= EAGER_SPEEDUP,
                    f"forward alone: {fwd_speed:.2f}x" if fwd_speed else "",
                )
                sd, ed = s["peak_device_bytes"], e["peak_device_bytes"]
                share = sd / ed if sd and ed else None
                add(
                    f"<= {EAGER_MEMORY_SHARE} of eager's peak device memory at T={EAGER_TARGET_LEN}",
                    share,
                    EAGER_MEMORY_SHARE,
                    None if share is None else share <= EAGER_MEMORY_SHARE,
                    "" if share is not None else "no device memory figures (CPU)",
                )
    for t in lens:
        s, w = rows.get((t, "layered")), rows.get((t, "sinktrace"))
        if s and w and s["status"] == "ok" and w["status"] == "ok":
            limit = layered_memory_limit(doc, w, t)
            v = s["peak_device_bytes"]
            add(
                f"layer by layer at T={t}: peak device memory <= two blocks' weights + embeddings + activations (GiB)",
                None if v is None else gib(v),
                None if limit is None else gib(limit),
                None if v is None or limit is None else v <= limit,
                "limit: the whole-model replay's peak, less the weights beyond the embeddings and two blocks, "
                "plus every probe row's hidden state"
                if v is not None
                else "no device memory figures (CPU)",
            )
    out += cpu_targets(doc, rows, on_gpu)
    n = doc["checkpoints"]["count"]
    read = doc["read_floor"]
    t = min(lens)
    s = rows.get((t, "sinktrace"))
    if s and s["status"] == "ok" and read.get("status") == "ok":
        share = doc["checkpoints"]["bytes_per_checkpoint"] / s["e2e_s_per_ckpt"] / read["bytes_per_s"]
        enough = n >= READ_TARGET_MIN_CKPTS
        add(
            f"replay throughput >= {READ_TARGET_SHARE:.0%} of the read floor over {READ_TARGET_MIN_CKPTS}+ "
            f"checkpoints (T={t})",
            share,
            READ_TARGET_SHARE,
            (share >= READ_TARGET_SHARE) if enough else None,
            "" if enough else f"only {n} checkpoints: not judged (checkpoints.count={READ_TARGET_MIN_CKPTS} or more)",
        )
    return out


def cpu_targets(doc: dict, rows: dict, on_gpu: bool) -> list[dict]:
    """The statistics forward against the compute floor and large runs against the fastest and the leanest peer
    (judged on the CPU), and the small run's fixed cost against a plain transformers script (judged anywhere)."""
    out = []

    def add_cpu(name, value, limit, passed, note="", judged=not on_gpu):
        out.append({"target": name, "value": value, "limit": limit, "pass": passed, "judged": judged, "note": note})

    for t in doc["probe"]["seq_lens"]:
        r = rows.get((t, "sinktrace"))
        v = r["forward_cpu_vs_sdpa"] if r else None
        if CPU_FLOOR_LENS[0] <= t <= CPU_FLOOR_LENS[1] and v is not None:
            paired = (doc["details"].get(f"sinktrace@{t}") or {}).get("paired_floor")
            how = f"wall {r['forward_vs_sdpa']:.2f}x" + (", paired with the floor in one process" if paired else "")
            a = (doc["details"].get(f"sdpa@{t}") or {}).get("attention") or {}
            bound = f"; attention alone: {attention_bound(a):.2f}x" if "with_stats" in a else ""
            add_cpu(
                f"statistics forward <= {CPU_FLOOR_LIMIT}x the compute floor at T={t} (CPU seconds)",
                v,
                CPU_FLOOR_LIMIT,
                v <= CPU_FLOOR_LIMIT,
                how + bound,
            )
    small = {r["contender"]: r for r in doc["small_run"]}
    s, p = small.get("sinktrace"), small.get("transformers")
    if s and p and s["status"] == "ok" and p["status"] == "ok":
        v = s["wall_s"] / p["wall_s"]
        add_cpu(
            f"small run (one checkpoint of a {doc['settings']['small_run_layers']}-layer model, T="
            f"{s['seq_len']}) end to end <= {SMALL_RUN_LIMIT}x a plain transformers script",
            v,
            SMALL_RUN_LIMIT,
            v <= SMALL_RUN_LIMIT,
            f"{s['wall_s']:.2f} s against {p['wall_s']:.2f} s",
            judged=True,
        )
    c = doc.get("concurrent_runs") or {}
    if c.get("status") == "ok":
        add_cpu(
            f"two sinktrace runs at once on one machine, each <= {CONCURRENT_LIMIT}x one run alone",
            c["ratio"],
            CONCURRENT_LIMIT,
            c["ratio"] <= CONCURRENT_LIMIT,
            f"{c['alone_s']:.2f} s alone, {c['together_s'][0]:.2f} s and {c['together_s'][1]:.2f} s at once",
            judged=True,
        )
    for t in sorted({r["seq_len"] for r in doc["peers"]}):
        if t < LARGE_RUN_LEN:
            continue
        got = {r["contender"]: r for r in doc["peers"] if r["seq_len"] == t}
        s = got.get("sinktrace")
        others = [r for c, r in got.items() if c != "sinktrace" and r["status"] == "ok"]
        if not s or s["status"] != "ok" or not others:
            continue
        fastest = min(others, key=lambda r: r["wall_s"])
        speed = fastest["wall_s"] / s["wall_s"]
        add_cpu(
            f">= {LARGE_RUN_SPEEDUP}x faster than the fastest peer at T={t}",
            speed,
            LARGE_RUN_SPEEDUP,
            speed >= LARGE_RUN_SPEEDUP,
            f"fastest peer: {fastest['label']}",
        )
        leanest = min(others, key=lambda r: r["peak_rss_bytes"])
        share = s["peak_rss_bytes"] / leanest["peak_rss_bytes"]
        add_cpu(
            f"<= {LARGE_RUN_MEMORY_SHARE} of the leanest peer's peak memory at T={t}",
            share,
            LARGE_RUN_MEMORY_SHARE,
            share <= LARGE_RUN_MEMORY_SHARE,
            f"leanest peer: {leanest['label']}",
        )
    return out


def layered_memory_limit(doc: dict, whole: dict, seq_len: int) -> int | None:
    """What layer-by-layer replay may hold on the device: the whole-model replay's peak, with the weights of all
    blocks but two taken out and the hidden states of every probe row (kept between blocks) put in."""
    c = doc["model"]["config"]
    if whole.get("peak_device_bytes") is None or "hidden_size" not in c:
        return None
    h = c["hidden_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    itemsize = parse_dtype(doc["model"]["dtype"]).itemsize
    attn = 2 * h * c["num_attention_heads"] * hd + 2 * h * kv * hd
    block = itemsize * (attn + 3 * h * c["intermediate_size"] + 2 * h)
    weights = doc["checkpoints"]["bytes_per_checkpoint"]
    hidden = itemsize * (whole.get("rows") or 0) * seq_len * h
    return int(whole["peak_device_bytes"] - weights + itemsize * c["vocab_size"] * h + 2 * block + hidden)


def attention_bound(a: dict) -> float:
    """The statistics forward's ratio to the floor if nothing but its attention cost more."""
    return 1 + a["share"] * (a["with_stats"] - 1)


def finite(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def version() -> str:
    from pipeline import __version__

    return __version__


def fmt_s(v) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 1e-3:
        return f"{v * 1e3:.1f}ms"
    return f"{v * 1e6:.0f}us"


def fmt_x(v) -> str:
    return "-" if v is None else (f"{v:.2f}x" if v < 100 else f"{v:.0f}x")


def fmt_gib(v) -> str:
    return "n/a" if v is None else f"{gib(v):.2f}"


def short(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('note', '')}"
    parts = []
    if row.get("e2e_s") is not None:
        parts.append(f"{fmt_s(row['e2e_s'])} per checkpoint end to end")
    if row.get("forward_s") is not None:
        parts.append(f"forward {fmt_s(row['forward_s'])}")
    return ", ".join(parts)


def render(doc: dict) -> str:
    """The table, the read floor and the targets as text."""
    on_gpu = doc["device"]["kind"] == "cuda"
    ck, rf = doc["checkpoints"], doc["read_floor"]
    lines = [
        f"sinktrace bench: {doc['command']}",
        f"device: {doc['device']['name']}; torch {doc['versions']['torch']}, transformers "
        f"{doc['versions']['transformers']}",
        f"model: {doc['model']['parameters'] / 1e6:.1f} M parameters, {doc['model']['dtype']}; "
        f"{ck['count']} checkpoints of {gib(ck['bytes_per_checkpoint']):.3f} GiB under {ck['root']}",
    ]
    if rf.get("status") == "ok":
        cache = rf["cache"]
        cold = {True: "cold (verified with mincore)", False: "NOT cold", None: "cold, unverified"}[cache["cold"]]
        disk = rf.get("storage_read_bytes")
        disk_words = f", {disk / rf['bytes']:.0%} of the bytes came from storage" if disk is not None else ""
        lines.append(
            f"read floor: {rf['bytes_per_s'] / 1e9:.3g} GB/s over {rf['files']} files, {cold} via {cache['method']}"
            f"{disk_words}; warm {rf['warm_bytes_per_s'] / 1e9:.3g} GB/s"
            + (f" ({cache['note']})" if cache["note"] else "")
        )
    else:
        lines.append(f"read floor: {rf.get('status')}: {rf.get('note')}")
    lines.append(
        "e2e: read + build + probe forward + statistics, per checkpoint (read floor: its files' read time); "
        "fwd: the probe forward with the weights already on the device; ratios are time / reference time; "
        "sinktrace's fwd/sdpa: paired with the floor's forward in its own process (medians of per-pair ratios)"
        + (
            ""
            if on_gpu
            else "; cpu: the same ratio in CPU seconds of the process (steadier than wall time on a shared machine)"
        )
    )
    header = [
        "T",
        "rows",
        "contender",
        "e2e s",
        "fwd s",
        "e2e/eager",
        "fwd/eager",
        "fwd/sdpa",
        *([] if on_gpu else ["cpu"]),
        "e2e/read",
        "RSS GiB",
        "dev GiB",
        "note",
    ]
    table = []
    for r in doc["rows"]:
        ok = r["status"] == "ok"
        measured = r["contender"] != "read" and r["status"] != "skipped"  # an out-of-memory row keeps its peaks
        note = (
            r["note"]
            if not ok
            else ("" if r["cold_cache"] is not False or r["contender"] in ("sdpa", "read") else "page cache not cold")
        )
        if not ok and r["status"] not in note:
            note = f"{r['status']}: {note}"
        table.append(
            [
                str(r["seq_len"]),
                str(r["rows"] or "-"),
                r["label"],
                fmt_s(r["e2e_s_per_ckpt"]),
                fmt_s(r["forward_s"]),
                fmt_x(r["e2e_vs_eager"]),
                fmt_x(r["forward_vs_eager"]),
                fmt_x(r["forward_vs_sdpa"]),
                *([] if on_gpu else [fmt_x(r.get("forward_cpu_vs_sdpa"))]),
                fmt_x(r["e2e_vs_read"]),
                fmt_gib(r["peak_rss_bytes"]) if measured else "-",
                (fmt_gib(r["peak_device_bytes"]) if on_gpu else "n/a") if measured else "-",
                note,
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header[:-1])]
    fmt = lambda cells: "  ".join(  # noqa: E731
        [c.rjust(w) if i not in (2,) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))] + [cells[-1]]
    ).rstrip()
    lines.append("")
    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths] + [""]))
    previous = None
    for row in table:
        if previous is not None and row[0] != previous:
            lines.append("")
        previous = row[0]
        lines.append(fmt(row))
    scope = {r.get("peak_rss_scope") for r in doc["details"].values() if "peak_rss_scope" in r}
    lines.append("")
    lines.append(
        "RSS: peak host memory (VmHWM) of each contender "
        + (
            "in its own subprocess"
            if doc["settings"]["isolate"] != "none"
            else "in this process, reset before each (includes the benchmark's own memory)"
        )
        + ("" if scope <= {"since reset"} else "; process-wide high-water where the reset was not possible")
        + ("; dev: torch.cuda.max_memory_allocated, weights included" if on_gpu else "; dev: n/a on the CPU")
    )
    if doc["agreement_with_eager"]:
        worst = max(doc["agreement_with_eager"].items(), key=lambda kv: kv[1]["max_abs_sink_mass"])
        lines.append(
            f"agreement with eager: max |sink mass difference| {worst[1]['max_abs_sink_mass']:.2g} "
            f"({worst[0].replace('@', ' at T=')}), "
            f"max |entropy difference| "
            f"{max(v['max_abs_entropy'] for v in doc['agreement_with_eager'].values()):.2g} nats"
        )
    for key, r in sorted(doc["details"].items(), key=lambda kv: int(kv[0].split("@")[1])):
        if key.startswith("sinktrace@") and r.get("status") == "ok":
            b, io = r["breakdown"], r.get("io") or {}
            disk = (
                f", {io['read_bytes'] / ck['bytes_per_checkpoint']:.2f}x the weight bytes read from storage, "
                f"{io['rchar'] / ck['bytes_per_checkpoint']:.2f}x through read calls"
                if io
                else ""
            )
            lines.append(
                f"sinktrace replay at T={key.split('@')[1]}: load {fmt_s(b['load_s'])} + measure "
                f"{fmt_s(b['measure_s'])} + rest {fmt_s(b['other_s'])} per checkpoint{disk}"
                + "; each replay read the next checkpoint ahead"
            )
        a = r.get("attention") if key.startswith("sdpa@") and r.get("status") == "ok" else None
        if a:
            lines.append(
                f"compute floor at T={key.split('@')[1]}: attention {a['share']:.0%} of its forward (CPU seconds); "
                + (
                    f"sinktrace's attention with its statistics {a['with_stats']:.2f}x without them, so "
                    f"{attention_bound(a):.2f}x the floor from attention alone"
                    if "with_stats" in a
                    else a["note"]
                )
            )
        if key.startswith("eager@") and r.get("status") == "ok":
            b = r["breakdown"]
            lines.append(
                f"eager at T={key.split('@')[1]}: from_pretrained {fmt_s(b['from_pretrained_s'])} + forward "
                f"and statistics {fmt_s(b['forward_and_stats_s'])} per checkpoint"
            )
    for title, peer_table in (("peers", doc["peers"]), ("small run", doc["small_run"])):
        if peer_table:
            lines += ["", render_peers(title, peer_table)]
    lines.append("")
    judged = [tg for tg in doc["targets"] if tg["judged"]]
    lines.append(("GPU" if on_gpu else "CPU") + " targets:" if judged else "targets: none judged in this run")
    for tg in judged:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[tg["pass"]]
        value = "-" if tg["value"] is None else f"{tg['value']:.3g}"
        lines.append(f"  {verdict:4}  {tg['target']}: {value}" + (f" ({tg['note']})" if tg["note"] else ""))
    if not on_gpu:
        lines.append("GPU targets: not judged on the CPU (they are in the JSON for reference).")
    return "\n".join(lines)


def render_peers(title: str, rows: list[dict]) -> str:
    """The peers' table: each a whole program in its own process, from its start to its exit."""
    header = ["T", "ckpts", title, "wall s", "CPU s", "RSS GiB", "wall/fastest", "RSS/leanest", "|d sink|", "note"]
    table = [
        [
            str(r["seq_len"]),
            str(r["checkpoints"] or "-"),
            r["label"],
            fmt_s(r["wall_s"]),
            fmt_s(r["cpu_s"]),
            fmt_gib(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-",
            fmt_x(r["wall_vs_fastest_peer"]),
            fmt_x(r["rss_vs_leanest_peer"]),
            "-" if r["max_abs_sink_mass_vs_eager"] is None else f"{r['max_abs_sink_mass_vs_eager']:.1g}",
            r["note"] if r["status"] != "ok" else "",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header[:-1])]
    fmt = lambda cells: "  ".join(  # noqa: E731
        [c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))] + [cells[-1]]
    ).rstrip()
    lines = [fmt(header), fmt(["-" * w for w in widths] + [""]), *map(fmt, table)]
    lines.append(
        f"{title}: whole processes, start to exit (imports included); wall/fastest and RSS/leanest against "
        "the fastest and the leanest peer other than sinktrace; |d sink|: max |sink mass - eager's|"
    )
    return "\n".join(lines)
