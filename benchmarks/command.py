"""The benchmark command: its config, the checks on it, and one run of every contender at every probe length."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline import hydra_app
from pipeline.errors import UsageError
from pipeline.locations import sinktrace_home, write_json_atomic

from . import GIB, LOG_PREFIX, gib
from .contenders import CONTENDERS
from .fixtures import default_checkpoint_root, ensure_checkpoints, find_checkpoints, make_probes, param_count
from .jobs import JobRunner, run_job
from .peers import PEERS, concurrent_runs, run_peers
from .tables import Measured, assemble, render, short
from .timing import device_name

CONF_MODULE = "benchmarks.conf"
ISOLATE = ("length", "contender", "none")
COLD_CACHE = ("auto", "fadvise", "drop_caches", "off")


def preset_spelling(arg: str) -> str:
    """`preset=cpu` is shorthand for the config group `bench_preset=cpu`."""
    return "bench_preset=" + arg.removeprefix("preset=") if arg.startswith("preset=") else arg


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would build (for Python callers and tests)."""
    return hydra_app.compose(CONF_MODULE, "bench", overrides, rewrite=preset_spelling)


def run_bench(cfg: DictConfig, overrides: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0: every contender ran, possibly out of memory or skipped by
    its budget; 1: a contender failed with an error; 2: a usage error)."""
    try:
        result = bench(cfg, overrides)
    except UsageError as e:
        print(f"{LOG_PREFIX} error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


main = hydra_app.command(CONF_MODULE, "bench", run_bench, rewrite=preset_spelling)


def command_line(cfg, overrides: list[str] | None) -> str:
    """The command line as typed (under @hydra.main), or as it would be typed (from Python: `overrides`)."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ValueError, ImportError):  # not under @hydra.main
            overrides = [f"bench_preset={cfg.preset_name}"]
    return " ".join(["python -m benchmarks", *map(shlex.quote, overrides)])


def bench(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Build or reuse the checkpoints, run every contender at every probe length, print the table, write the JSON.

    Returns the JSON document as a dict (its `out` key says where it was written)."""
    import torch

    from pipeline.devices import resolve_device

    command, preset = command_line(cfg, overrides), str(cfg.preset_name)
    check_config(cfg)
    device = resolve_device(str(cfg.device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={cfg.device}: CUDA is not available here")
    if device == "cpu" and not cfg.allow_cpu:
        raise UsageError(
            f"preset {preset!r} builds a {model_words(cfg)} for a GPU and no CUDA device is available; on the CPU "
            "run `python -m benchmarks bench_preset=cpu` (or add allow_cpu=true to run this one anyway)"
        )
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    started = dt.datetime.now(dt.UTC)
    root = Path(cfg.checkpoints.root).expanduser() if cfg.checkpoints.root else default_checkpoint_root(cfg)
    print(f"{LOG_PREFIX} {command}")
    # (no CUDA call in this process: the contenders' subprocesses have the device to themselves)
    where = device_name(device) if device == "cpu" or cfg.isolate == "none" else device
    print(
        f"{LOG_PREFIX} preset {preset}: {model_words(cfg)}, {cfg.checkpoints.count} checkpoints, probe lengths "
        f"{list(cfg.probe.seq_lens)}, on {where}"
    )
    ensure_checkpoints(cfg, root)
    ckpts = find_checkpoints(root, int(cfg.checkpoints.count))
    weight_bytes = [sum(os.path.getsize(f) for f in c.weight_files) for c in ckpts]
    bytes_per_ckpt = statistics.mean(weight_bytes)
    model_config = json.loads((Path(ckpts[0].path) / "config.json").read_text())

    contenders = [c for c in CONTENDERS if c in cfg.contenders]
    budget = eager_budget_bytes(cfg, device)
    out_path = Path(cfg.out).expanduser() if cfg.out else default_out_path(preset, started)
    with tempfile.TemporaryDirectory(prefix="sinktrace-bench-") as work:
        probes = make_probes(cfg, model_config, Path(work))
        base_job = {
            "checkpoints": [dataclasses.asdict(c) for c in ckpts],
            "probes": probes,
            "device": device,
            "dtype": str(cfg.dtype),
            "batch_size": int(cfg.probe.batch_size),
            "key_positions": int(cfg.probe.key_positions),
            "warmup": int(cfg.warmup),
            "forward_repeats": int(cfg.forward_repeats),
            "logits_to_keep": int(cfg.logits_to_keep),
            "eager_budget_bytes": budget,
            "cold_cache": str(cfg.cold_cache),
            "threads": int(cfg.threads) if cfg.threads else None,
        }
        runner = JobRunner(str(cfg.isolate), Path(work), float(cfg.job_timeout_s))
        print(f"{LOG_PREFIX} read floor: {len(ckpts)} checkpoints x {gib(bytes_per_ckpt):.3g} GiB")
        read = run_job({**base_job, "kind": "read", "seq_lens": []})  # in this process: it only reads files
        read = read.get("read") or {"status": "error", "note": read.get("error", "no result")}
        results: dict[tuple[str, int], dict] = {}
        seq_lens = [int(t) for t in cfg.probe.seq_lens]
        groups = [[t] for t in seq_lens] if cfg.isolate != "contender" else [seq_lens]
        for lens in groups:
            for contender in contenders:
                print(f"{LOG_PREFIX} {contender} at T={','.join(map(str, lens))} ...", flush=True)
                got = runner.run({**base_job, "kind": contender, "seq_lens": lens})
                for t in lens:
                    row = got.get("results", {}).get(str(t))
                    if row is None:
                        row = {"status": got.get("status", "error"), "note": got.get("error", "no result")}
                    results[(contender, t)] = row
                    print(f"{LOG_PREFIX}   T={t}: {short(row)}", flush=True)
        peer_job = {**base_job, "vocab_size": int(model_config["vocab_size"])}
        peer_probes = {str(t): probes[str(t)] for t in cfg.peers.seq_lens} if cfg.peers.contenders else {}
        peers = run_peers(cfg, ckpts, peer_probes, peer_job, Path(work), list(cfg.peers.contenders))
        small, concurrent = small_run(cfg, peer_job, Path(work)) if cfg.small_run.enabled else ({}, {})

    doc = assemble(
        Measured(
            cfg=cfg,
            preset=preset,
            command=command,
            device=device,
            ckpts=ckpts,
            bytes_per_ckpt=bytes_per_ckpt,
            model_config=model_config,
            read=read,
            results=results,
            contenders=contenders,
            started=started,
            budget=budget,
            peers=peers,
            small=small,
            concurrent=concurrent,
        )
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc["out"] = str(out_path)
    write_json_atomic(out_path, doc, indent=1, allow_nan=False)
    print()
    print(render(doc))
    print(f"\n{LOG_PREFIX} JSON: {out_path}")
    return doc


def small_run(cfg: DictConfig, job: dict, work: Path) -> tuple[dict, dict]:
    """sinktrace's command and the plain transformers script on one checkpoint of a `small_run.layers`-layer model;
    then, with `small_run.concurrent`, sinktrace's command alone and twice at once on it."""
    small = OmegaConf.merge(
        cfg,
        {
            "model": {"num_hidden_layers": int(cfg.small_run.layers)},
            "checkpoints": {"count": 1, "root": None},
            "probe": {"seq_lens": [int(cfg.small_run.seq_len)], "rows": int(cfg.small_run.rows), "max_tokens": None},
        },
    )
    root = default_checkpoint_root(small)
    print(f"{LOG_PREFIX} small run: one checkpoint of a {model_words(small)}")
    ensure_checkpoints(small, root)
    ckpts = find_checkpoints(root, 1)
    (work / "small").mkdir()
    probes = make_probes(small, json.loads((Path(ckpts[0].path) / "config.json").read_text()), work / "small")
    rows = run_peers(
        small, ckpts, probes, job, work / "small", ["sinktrace", "transformers"], int(cfg.small_run.repeats)
    )
    if not cfg.small_run.concurrent:
        return rows, {}
    ((t, meta),) = probes.items()
    probe = {"path": meta["path"], "seq_len": int(t), "rows": meta["rows"], "seed": meta["seed"]}
    return rows, concurrent_runs(ckpts, probe, job, work / "small", float(cfg.job_timeout_s))


def check_config(cfg: DictConfig) -> None:
    if cfg.isolate not in ISOLATE:
        raise UsageError(f"isolate={cfg.isolate!r}: choose from {list(ISOLATE)}")
    if cfg.cold_cache not in COLD_CACHE:
        raise UsageError(f"cold_cache={cfg.cold_cache!r}: choose from {list(COLD_CACHE)}")
    unknown = [c for c in cfg.contenders if c not in CONTENDERS]
    if unknown:
        raise UsageError(f"contenders: unknown {unknown}; choose from {list(CONTENDERS)}")
    if int(cfg.checkpoints.count) < 1:
        raise UsageError("checkpoints.count must be at least 1")
    lens = [int(t) for t in cfg.probe.seq_lens]
    if not lens or min(lens) < 8:
        raise UsageError(f"probe.seq_lens={lens}: give lengths of at least 8 tokens")
    if max(lens) > int(cfg.model.max_position_embeddings):
        raise UsageError(
            f"probe.seq_lens reaches {max(lens)} tokens but model.max_position_embeddings is "
            f"{cfg.model.max_position_embeddings}"
        )
    if int(cfg.probe.key_positions) >= min(lens):
        raise UsageError("probe.key_positions must be shorter than every probe length")
    unknown = [c for c in cfg.peers.contenders if c not in PEERS]
    if unknown:
        raise UsageError(f"peers.contenders: unknown {unknown}; choose from {list(PEERS)}")
    missing = [int(t) for t in cfg.peers.seq_lens if int(t) not in lens]
    if cfg.peers.contenders and missing:
        raise UsageError(f"peers.seq_lens: {missing} not in probe.seq_lens={lens}")


def model_words(cfg) -> str:
    n = param_count(cfg.model)
    size = f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M"
    return f"{size}-parameter Llama ({cfg.model.num_hidden_layers} layers, {cfg.model.hidden_size} wide) in {cfg.dtype}"


def default_out_path(preset: str, started: dt.datetime) -> Path:
    return sinktrace_home() / "bench" / "results" / f"{preset}-{started.strftime('%Y%m%d-%H%M%S')}.json"


def eager_budget_bytes(cfg, device: str) -> int | None:
    if cfg.eager_budget_gib is not None:
        return int(float(cfg.eager_budget_gib) * GIB)
    if device == "cpu":
        from pipeline.devices import available_host_bytes

        return int(available_host_bytes() * 0.5)
    return None
