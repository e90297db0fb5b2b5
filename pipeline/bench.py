"""`python -m pipeline.bench`: how fast and how lean sinktrace's replay is, against what else one could do.

One run builds its own checkpoints (random weights of a Llama-style model, saved as safetensors, reused by later
runs) and measures, on the same checkpoints and the same probe, for each probe length:

1. **sinktrace**: `pipeline.replay.replay` of each of N checkpoints, end to end (read, build, probe forward with
   the log-sum-exp statistics), and the statistics forward alone with the weights already on the device;
2. **eager** (the usual alternative): per checkpoint `AutoModelForCausalLM.from_pretrained(folder,
   attn_implementation="eager")` and a forward with `output_attentions=True`, reducing the returned T x T
   matrices to sink mass and entropy; end to end and forward alone;
3. **sdpa** (the compute floor): a plain forward with PyTorch's fused attention, no statistics, weights on the device;
4. **read** (the read floor): reading the checkpoints' weight files from a cold page cache, in bytes per second.

It prints one table (time per checkpoint, ratios against 2, 3 and 4, peak host and device memory) and writes it as
JSON. Presets: conf/bench_preset/ (gpu: the default, cpu, smoke). Timings are wall-clock seconds; each contender runs
in a fresh subprocess by default (`isolate`), so that its peak host memory is its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import math
import mmap
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
REPO_DIR = CONF_DIR.parent
CONTENDERS = ("sinktrace", "layered", "eager", "sdpa")
LABELS = {
    "sinktrace": "sinktrace replay",
    "layered": "sinktrace, layer by layer",
    "eager": "eager+output_attentions",
    "sdpa": "compute floor (sdpa)",
    "read": "read floor",
}
ISOLATE = ("length", "contender", "none")
COLD_CACHE = ("auto", "fadvise", "drop_caches", "off")
GIB = 2**30
# A page cache emptied to at most this share of the files' bytes counts as cold.
COLD_RESIDENT_MAX = 0.01
# GPU targets: statistics forward / sdpa forward, up to 8,192 tokens and up to 32,768
FLOOR_TARGETS = ((8192, 1.3), (32768, 2.0))
EAGER_TARGET_LEN, EAGER_SPEEDUP, EAGER_MEMORY_SHARE = 2048, 3.0, 0.1
READ_TARGET_SHARE, READ_TARGET_MIN_CKPTS = 0.85, 8

log_prefix = "sinktrace bench:"
_exit_status = 0


class UsageError(Exception):
    """A mistake in the command or its config: reported in one line, no traceback."""


# =============================================================================================== the command


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    global _exit_status
    _exit_status = max(_exit_status, run_bench(cfg))


def main() -> None:
    # `preset=cpu` is shorthand for the config group `bench_preset=cpu`
    sys.argv = [re.sub(r"^preset=", "bench_preset=", a) for a in sys.argv]
    _hydra_main()
    sys.exit(_exit_status)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would build (for Python callers and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [re.sub(r"^preset=", "bench_preset=", a) for a in overrides or []]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="bench", overrides=overrides, return_hydra_config=False)


def run_bench(cfg: DictConfig, overrides: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0: every contender ran, possibly out of memory or skipped by
    its budget; 1: a contender failed with an error; 2: a usage error)."""
    try:
        result = bench(cfg, overrides)
    except UsageError as e:
        print(f"{log_prefix} error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


def _command_line(cfg, overrides: list[str] | None) -> str:
    """The command line as typed (under @hydra.main), or as it would be typed (from Python: `overrides`)."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except (ValueError, ImportError):  # not under @hydra.main
            overrides = [f"bench_preset={cfg.preset_name}"]
    return " ".join(["python -m pipeline.bench", *map(shlex.quote, overrides)])


# =============================================================================================== the benchmark


def bench(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Build or reuse the checkpoints, run every contender at every probe length, print the table, write the JSON.

    Returns the JSON document as a dict (its `out` key says where it was written)."""
    import torch

    command, preset = _command_line(cfg, overrides), str(cfg.preset_name)
    _check_config(cfg)
    device = resolve_device(str(cfg.device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={cfg.device}: CUDA is not available here")
    if device == "cpu" and not cfg.allow_cpu:
        raise UsageError(
            f"preset {preset!r} builds a {_model_words(cfg)} for a GPU and no CUDA device is available; on the CPU "
            "run `python -m pipeline.bench bench_preset=cpu` (or add allow_cpu=true to run this one anyway)"
        )
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    started = dt.datetime.now(dt.UTC)
    root = Path(cfg.checkpoints.root).expanduser() if cfg.checkpoints.root else default_checkpoint_root(cfg)
    print(f"{log_prefix} {command}")
    # (no CUDA call in this process: the contenders' subprocesses have the device to themselves)
    where = device_name(device) if device == "cpu" or cfg.isolate == "none" else device
    print(f"{log_prefix} preset {preset}: {_model_words(cfg)}, {cfg.checkpoints.count} checkpoints, probe lengths "
          f"{list(cfg.probe.seq_lens)}, on {where}")
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
        print(f"{log_prefix} read floor: {len(ckpts)} checkpoints x {_gib(bytes_per_ckpt):.3g} GiB")
        read = run_job({**base_job, "kind": "read", "seq_lens": []})  # in this process: it only reads files
        read = read.get("read") or {"status": "error", "note": read.get("error", "no result")}
        results: dict[tuple[str, int], dict] = {}
        seq_lens = [int(t) for t in cfg.probe.seq_lens]
        groups = [[t] for t in seq_lens] if cfg.isolate != "contender" else [seq_lens]
        for lens in groups:
            for contender in contenders:
                print(f"{log_prefix} {contender} at T={','.join(map(str, lens))} ...", flush=True)
                got = runner.run({**base_job, "kind": contender, "seq_lens": lens})
                for t in lens:
                    row = got.get("results", {}).get(str(t))
                    if row is None:
                        row = {"status": got.get("status", "error"), "note": got.get("error", "no result")}
                    results[(contender, t)] = row
                    print(f"{log_prefix}   T={t}: {_short(row)}", flush=True)

    doc = assemble(cfg, preset, command, device, ckpts, bytes_per_ckpt, model_config, read, results, contenders,
                   started, budget)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc["out"] = str(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    os.replace(tmp, out_path)
    print()
    print(render(doc))
    print(f"\n{log_prefix} JSON: {out_path}")
    return doc


def _check_config(cfg: DictConfig) -> None:
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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def _model_words(cfg) -> str:
    n = _param_count(cfg.model)
    size = f"{n / 1e9:.3g} B" if n >= 1e8 else f"{n / 1e6:.3g} M"
    return f"{size}-parameter Llama ({cfg.model.num_hidden_layers} layers, {cfg.model.hidden_size} wide) in {cfg.dtype}"


def _param_count(m) -> int:
    h, i, v, n = int(m.hidden_size), int(m.intermediate_size), int(m.vocab_size), int(m.num_hidden_layers)
    d = int(m.head_dim or h // m.num_attention_heads)
    attn = h * d * (2 * m.num_attention_heads + 2 * m.num_key_value_heads)
    per_layer = attn + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if m.tie_word_embeddings else 2) + h


def _home() -> Path:
    return Path(os.environ.get("SINKTRACE_HOME", "~/.cache/sinktrace")).expanduser()


def default_out_path(preset: str, started: dt.datetime) -> Path:
    return _home() / "bench" / "results" / f"{preset}-{started.strftime('%Y%m%d-%H%M%S')}.json"


def eager_budget_bytes(cfg, device: str) -> int | None:
    if cfg.eager_budget_gib is not None:
        return int(float(cfg.eager_budget_gib) * GIB)
    if device == "cpu":
        from .load import available_host_bytes

        return int(available_host_bytes() * 0.5)
    return None


def _gib(n) -> float:
    return float(n) / GIB


# =============================================================================================== checkpoints


def checkpoint_spec(cfg) -> dict:
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dtype": str(cfg.dtype),
        "seed": int(cfg.checkpoints.seed),
        "every": int(cfg.checkpoints.every),
        "format": 1,
    }


def default_checkpoint_root(cfg) -> Path:
    spec = checkpoint_spec(cfg)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    m = cfg.model
    return _home() / "bench" / f"llama-{m.num_hidden_layers}x{m.hidden_size}-{cfg.dtype}-{digest}"


def ensure_checkpoints(cfg, root: Path) -> None:
    """Write the missing `checkpoint-<step>/` folders (config.json + model.safetensors) under `root`.

    Checkpoint 0 holds the model's random initialisation (seeded); checkpoint i scales each tensor of it by its own
    factor 1 + 0.01 sin(7i + j), so every checkpoint holds different bytes. Files are fsynced, so that their page
    cache can be dropped, and written under a `.tmp` name first."""
    import torch

    spec = checkpoint_spec(cfg)
    spec_file = root / "bench-spec.json"
    if spec_file.exists():
        found = json.loads(spec_file.read_text())
        if found != spec:
            raise UsageError(
                f"checkpoints.root={root} holds benchmark checkpoints of another model or dtype ({spec_file}); "
                "choose another root, or delete that folder"
            )
    elif root.exists() and any(root.iterdir()):
        raise UsageError(f"checkpoints.root={root} is not empty and holds no bench-spec.json: not a benchmark folder")
    every = int(cfg.checkpoints.every)
    wanted = range(int(cfg.checkpoints.count))
    missing = [i for i in wanted if not (root / f"checkpoint-{i * every}" / "model.safetensors").is_file()]
    if not missing:
        print(f"{log_prefix} checkpoints: reusing {len(wanted)} under {root}")
        return
    root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(spec_file, spec)

    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"{log_prefix} checkpoints: writing {len(missing)} under {root}", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(int(cfg.checkpoints.seed))
    config = LlamaConfig(**spec["model"], use_cache=False)
    model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(spec["dtype"]), attn_implementation="sdpa")
    params = list(model.parameters())
    factors = [1.0] * len(params)
    with torch.no_grad():
        for i in missing:
            for j, p in enumerate(params):
                f = 1.0 + 0.01 * math.sin(7 * i + j) if i else 1.0
                p.mul_(f / factors[j])
                factors[j] = f
            folder = root / f"checkpoint-{i * every}"
            tmp = root / f"checkpoint-{i * every}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            _write_json_atomic(tmp / "trainer_state.json", {"global_step": i * every})
            for f in tmp.iterdir():
                _fsync(f)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            print(f"{log_prefix}   {folder.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    del model, params
    gc.collect()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def find_checkpoints(root: Path, count: int):
    """The first `count` complete checkpoints under `root`, found the way sinktrace finds them."""
    from .discover import discover

    found = [c for c in discover(str(root), quiet_seconds=0) if c.complete]
    if len(found) < count:
        raise UsageError(f"{root}: discovery found {len(found)} complete checkpoints, the benchmark needs {count}")
    return found[:count]


def make_probes(cfg, model_config: dict, work: Path) -> dict:
    """One probe per length (pipeline.probe.build_probe: seeded random ids, BOS first), saved as .npy for workers."""
    import numpy as np

    from .probe import build_probe

    probes = {}
    for t in (int(x) for x in cfg.probe.seq_lens):
        rows = int(cfg.probe.rows)
        if cfg.probe.max_tokens:
            rows = max(1, min(rows, int(cfg.probe.max_tokens) // t))
        pcfg = OmegaConf.create(
            {"kind": "random", "name": None, "seq_len": t, "rows": rows, "seed": int(cfg.probe.seed),
             "first_token": "auto"}
        )
        probe = build_probe(pcfg, model_config)
        path = work / f"probe-{t}.npy"
        np.save(path, probe.tokens)
        probes[str(t)] = {"path": str(path), "name": probe.name, "rows": probe.rows, "seed": probe.seed,
                          "first_token": probe.first_token}
    return probes


# =============================================================================================== running jobs


class JobRunner:
    """Runs a job dict in this process (isolate=none) or in a fresh `python -c` subprocess."""

    def __init__(self, isolate: str, work: Path, timeout_s: float):
        self.isolate, self.work, self.timeout_s, self.n = isolate, work, timeout_s, 0

    def run(self, job: dict) -> dict:
        if self.isolate == "none":
            return run_job(job)
        self.n += 1
        stem = self.work / f"job-{self.n:02d}-{job['kind']}"
        job_file, result_file, log_file = (stem.with_suffix(s) for s in (".json", ".result.json", ".log"))
        job_file.write_text(json.dumps(job))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), env.get("PYTHONPATH")) if p)
        code = "import sys; from pipeline.bench import worker_main; sys.exit(worker_main(sys.argv[1], sys.argv[2]))"
        with open(log_file, "wb") as logf:
            try:
                proc = subprocess.run([sys.executable, "-c", code, str(job_file), str(result_file)],
                                      stdout=logf, stderr=subprocess.STDOUT, cwd=REPO_DIR, env=env,
                                      timeout=self.timeout_s)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        tail = _tail(log_file)
        if result_file.exists():
            return json.loads(result_file.read_text())
        if rc is None:
            return {"status": "error", "error": f"timed out after {self.timeout_s:g} s (job_timeout_s)"}
        if rc in (-9, 137):
            return {"status": "oom", "error": "the worker was killed (SIGKILL): most likely the kernel's "
                                              "out-of-memory killer"}
        print(tail, file=sys.stderr)
        return {"status": "error", "error": f"the worker exited with status {rc}: {tail.splitlines()[-1] if tail else ''}"}


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def worker_main(job_file: str, result_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    result = run_job(job)
    tmp = Path(result_file + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_file)
    return 0


def run_job(job: dict) -> dict:
    """One contender (or the read floor) at the job's probe lengths; returns {"results": {T: row}} or {"read": ...}."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from .records import Checkpoint

    hf_logging.disable_progress_bar()
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    ckpts = [Checkpoint(**{**c, "weight_files": tuple(c["weight_files"])}) for c in job["checkpoints"]]
    if job["kind"] == "read":
        try:
            return {"read": read_floor(_weight_files(ckpts), job["cold_cache"])}
        except Exception as e:  # noqa: BLE001  (reported in the table)
            traceback.print_exc()
            return {"read": {"status": "error", "note": f"{type(e).__name__}: {e}"}}
    fn = {"sinktrace": _run_sinktrace, "layered": _run_sinktrace, "eager": _run_eager, "sdpa": _run_sdpa}[job["kind"]]
    results = {}
    for t in job["seq_lens"]:
        meta = job["probes"][str(t)]
        tokens = np.load(meta["path"])
        peaks = Peaks(job["device"])
        peaks.reset()
        try:
            row = fn(job, ckpts, tokens, meta, peaks)
        except Exception as e:  # noqa: BLE001  (one failure must not hide the other rows)
            if is_oom(e):
                row = {"status": "oom", "note": f"out of memory: {_first_line(e)}"}
            else:
                traceback.print_exc()
                row = {"status": "error", "note": f"{type(e).__name__}: {_first_line(e)}"}
        row.setdefault("status", "ok")
        row["peak_rss_bytes"] = peaks.host()
        row["peak_rss_scope"] = peaks.host_scope
        row["peak_device_bytes"] = peaks.device()
        row["rows"] = int(tokens.shape[0])
        results[str(t)] = row
        if job["device"].startswith("cuda"):
            row["device_name"] = device_name(job["device"])
        _free(job["device"])
    return {"results": results}


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + " ..."


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()  # also load_model's CheckpointError around an allocation failure
    return "out of memory" in text or "can't allocate memory" in text


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(name)]


def _median_time(fn, repeats: int, device: str, warm: bool) -> tuple[float, float]:
    """Median wall-clock seconds of `repeats` calls, and median CPU seconds of this process over the same calls
    (all its threads: on a CPU shared with other work, CPU time drifts less with the load than wall time)."""
    if warm:
        fn()
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


class Peaks:
    """Peak host RSS (the kernel's VmHWM, reset through /proc/self/clear_refs; else getrusage's process-wide
    high-water) and peak device memory (torch.cuda.max_memory_allocated) since `reset()`."""

    def __init__(self, device: str):
        self.device_str = device
        self.host_scope = "process"

    def reset(self) -> None:
        import torch

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.host_scope = "since reset"
        except OSError:
            self.host_scope = "process"
        if self.device_str.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch.device(self.device_str))

    def host(self) -> int:
        if self.host_scope == "since reset":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    def device(self) -> int | None:
        import torch

        if not self.device_str.startswith("cuda"):
            return None
        return int(torch.cuda.max_memory_allocated(torch.device(self.device_str)))


# ----------------------------------------------------------------------------------------------- the contenders


def _weight_files(ckpts) -> list[str]:
    return [f for c in ckpts for f in c.weight_files]


@contextlib.contextmanager
def _timed_calls(module, name: str, bucket: list, device: str):
    """Wrap module.name so that each call's seconds land in `bucket` (for the replay's load/measure split)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync(device)
            bucket.append(time.perf_counter() - t0)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _copy_of(ckpt):
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


def _run_sinktrace(job, ckpts, tokens, meta, peaks) -> dict:
    import torch

    from . import load as load_mod
    from . import measure as measure_mod
    from .records import Probe
    from .replay import ReplaySettings, replay

    device = job["device"]
    layered = job["kind"] == "layered"  # a 1-byte budget: every checkpoint streams block by block
    settings = ReplaySettings(device=device, dtype=job["dtype"], batch_size=job["batch_size"],
                              key_positions=job["key_positions"], max_device_memory=1 if layered else None)
    probe = Probe(name=meta["name"], kind="random", tokens=tokens, seed=meta["seed"], first_token=meta["first_token"])
    if job["warmup"]:
        with _copy_of(ckpts[0]) as copy:
            for _ in range(job["warmup"]):
                replay(copy, probe, settings)
    _free(device)

    # end to end, from a cold page cache; each replay is told the next checkpoint, as the sinktrace driver does
    cache = drop_page_cache(_weight_files(ckpts), job["cold_cache"])
    loads, measures, sink, entropy = [], [], [], []
    io0 = read_io()
    with _timed_calls(load_mod, "load_model", loads, device), _timed_calls(measure_mod, "measure", measures, device):
        _sync(device)
        t0 = time.perf_counter()
        for c, nxt in zip(ckpts, [*ckpts[1:], None]):
            ds = replay(c, probe, settings, read_next=nxt)
            sink.append(ds["sink_mass"].values.tolist())
            entropy.append(ds["entropy"].values.tolist())
        _sync(device)
        e2e = (time.perf_counter() - t0) / len(ckpts)
    io1 = read_io()
    _free(device)

    # the statistics forward alone, weights already on the device (layer by layer, the forward is the replay)
    fwd = fwd_cpu = None
    if not layered:
        model = load_mod.load_model(ckpts[0], device=device, dtype=job["dtype"])
        ids = torch.from_numpy(tokens).to(device)
        # (no extra warm-up call: the end-to-end pass just ran this code)
        fwd, fwd_cpu = _median_time(
            lambda: measure_mod.measure(model, ids, batch_size=job["batch_size"], key_positions=job["key_positions"]),
            job["forward_repeats"], device, warm=False,
        )
        del model
    n = len(ckpts)
    return {
        "e2e_s": e2e,
        "forward_s": fwd,
        "forward_cpu_s": fwd_cpu,
        # None when replay stops calling pipeline.load.load_model / pipeline.measure.measure through their modules
        "breakdown": {"load_model_s": sum(loads) / n if loads else None,
                      "measure_s": sum(measures) / n if measures else None,
                      "other_s": e2e - (sum(loads) + sum(measures)) / n if loads and measures else None},
        "cache": cache,
        "io": _io_per_ckpt(io0, io1, n),
        "sink_mass": sink,
        "entropy": entropy,
    }


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
            out = model(input_ids=ids[start:start + batch_size], output_attentions=True, use_cache=False,
                        logits_to_keep=logits_to_keep)
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


def _hf_load(path: str, device: str, dtype: str, attn: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    direct = device != "cpu" and is_accelerate_available()
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn, dtype=_torch_dtype(dtype), local_files_only=True,
        **({"device_map": device} if direct else {}),
    )
    if device != "cpu" and not direct:
        model = model.to(device)
    return model.eval()


def _run_eager(job, ckpts, tokens, meta, peaks) -> dict:
    import torch

    device = job["device"]
    config = json.loads((Path(ckpts[0].path) / "config.json").read_text())
    itemsize = torch.empty((), dtype=_torch_dtype(job["dtype"])).element_size()
    need = eager_attention_bytes(config["num_hidden_layers"], config["num_attention_heads"], tokens.shape[1],
                                 min(job["batch_size"], tokens.shape[0]), itemsize)
    budget = job["eager_budget_bytes"]
    if budget is not None and need > budget:
        return {"status": "skipped", "note": f"skipped: would need {_gib(need):.1f} GiB for the T x T attention "
                                             f"matrices (eager_budget_gib={_gib(budget):.3g})",
                "estimated_bytes": need}
    ids = torch.from_numpy(tokens).to(device)
    bs, keep = job["batch_size"], job["logits_to_keep"]

    for _ in range(job["warmup"]):
        model = _hf_load(ckpts[0].path, device, job["dtype"], "eager")
        eager_stats(model, ids, bs, keep)
        del model
    _free(device)

    cache = drop_page_cache(_weight_files(ckpts), job["cold_cache"])
    loads, sink, entropy = [], [], []
    io0 = read_io()
    _sync(device)
    t0 = time.perf_counter()
    for c in ckpts:
        t1 = time.perf_counter()
        model = _hf_load(c.path, device, job["dtype"], "eager")
        _sync(device)
        loads.append(time.perf_counter() - t1)
        s, h = eager_stats(model, ids, bs, keep)
        sink.append(s.tolist())
        entropy.append(h.tolist())
        del model
    _sync(device)
    e2e = (time.perf_counter() - t0) / len(ckpts)
    io1 = read_io()
    _free(device)

    model = _hf_load(ckpts[0].path, device, job["dtype"], "eager")
    fwd, fwd_cpu = _median_time(lambda: eager_stats(model, ids, bs, keep), job["forward_repeats"], device,
                                warm=False)
    del model
    n = len(ckpts)
    return {
        "e2e_s": e2e,
        "forward_s": fwd,
        "forward_cpu_s": fwd_cpu,
        "breakdown": {"from_pretrained_s": sum(loads) / n, "forward_and_stats_s": e2e - sum(loads) / n},
        "cache": cache,
        "io": _io_per_ckpt(io0, io1, n),
        "estimated_bytes": need,
        "sink_mass": sink,
        "entropy": entropy,
    }


def _run_sdpa(job, ckpts, tokens, meta, peaks) -> dict:
    import torch

    device = job["device"]
    model = _hf_load(ckpts[0].path, device, job["dtype"], "sdpa")
    ids = torch.from_numpy(tokens).to(device)
    bs, keep = job["batch_size"], job["logits_to_keep"]
    peaks.reset()  # weights already on the device: the floor's peak is that of the forward (weights included)

    def forward():
        with torch.inference_mode():
            for start in range(0, ids.shape[0], bs):
                model(input_ids=ids[start:start + bs], use_cache=False, logits_to_keep=keep)

    fwd, fwd_cpu = _median_time(forward, job["forward_repeats"], device, warm=job["warmup"] > 0)
    return {"e2e_s": None, "forward_s": fwd, "forward_cpu_s": fwd_cpu}


# =============================================================================================== the read floor


def read_floor(files: list[str], how: str, chunk: int = 16 * 2**20) -> dict:
    """Read every file once from a cold page cache (then once more, warm), in bytes per second."""
    cache = drop_page_cache(files, how)
    buf = bytearray(chunk)
    view = memoryview(buf)

    def read_all() -> tuple[int, float]:
        total = 0
        t0 = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                with contextlib.suppress(OSError, AttributeError):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while n := f.readinto(view):
                    total += n
        return total, time.perf_counter() - t0

    io0 = read_io()
    total, seconds = read_all()
    io1 = read_io()
    _, warm_seconds = read_all()
    disk = None if io0 is None or io1 is None else io1["read_bytes"] - io0["read_bytes"]
    return {
        "status": "ok",
        "bytes": total,
        "files": len(files),
        "seconds": seconds,
        "bytes_per_s": total / seconds,
        "warm_bytes_per_s": total / warm_seconds,
        "storage_read_bytes": disk,  # what the block layer read during the cold pass (/proc/self/io read_bytes)
        "cache": cache,
    }


def read_io() -> dict | None:
    """This process's I/O counters: rchar (bytes passed by read calls) and read_bytes (fetched from storage)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return {"rchar": int(fields["rchar"]), "read_bytes": int(fields["read_bytes"])}
    except (OSError, KeyError, ValueError):
        return None


def _io_per_ckpt(io0, io1, n: int) -> dict | None:
    if io0 is None or io1 is None:
        return None
    return {k: (io1[k] - io0[k]) / n for k in io0}


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


def resident_fraction(paths: list[str]) -> float | None:
    """Share of the files' bytes in the page cache (mincore over a mapping of each file); None where unknown."""
    import numpy as np

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = _libc()
        page = os.sysconf("SC_PAGE_SIZE")
        resident = total = 0
        for path in paths:
            size = os.path.getsize(path)
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr is None or addr == ctypes.c_void_p(-1).value:
                    return None
                try:
                    pages = (size + page - 1) // page
                    vec = (ctypes.c_ubyte * pages)()
                    if libc.mincore(addr, size, vec) != 0:
                        return None
                    resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
            total += pages * page
        return resident / total if total else 0.0
    except (OSError, AttributeError):
        return None


def drop_page_cache(paths: list[str], how: str = "auto") -> dict:
    """Evict the files from the page cache: posix_fadvise(POSIX_FADV_DONTNEED) per file (no root needed, touches
    only these files), and with how=auto, `echo 1 > /proc/sys/vm/drop_caches` when pages stay resident (root).
    Returns the method, the resident share afterwards (mincore), whether that counts as cold, and notes."""
    gc.collect()  # mapped pages of dead tensors cannot be evicted
    notes, methods = [], []
    if how == "off":
        resident = resident_fraction(paths)
        return {"method": "off", "resident_after": resident, "cold": False, "note": "page cache not dropped (cold_cache=off)"}
    if how in ("auto", "fadvise"):
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # dirty pages cannot be dropped
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            methods.append("posix_fadvise(DONTNEED)")
        except (OSError, AttributeError) as e:
            notes.append(f"posix_fadvise failed ({e})")
    resident = resident_fraction(paths)
    if how == "drop_caches" or (how == "auto" and (not methods or (resident or 0.0) > COLD_RESIDENT_MAX)):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            methods.append("drop_caches")
        except OSError as e:
            notes.append(f"cannot write /proc/sys/vm/drop_caches ({e.strerror or e})")
        resident = resident_fraction(paths)
    if not methods:
        cold = False
    elif resident is None:
        cold = None
        notes.append("residency unknown (no mincore): cache dropped, not verified")
    else:
        cold = resident <= COLD_RESIDENT_MAX
        if not cold:
            notes.append(f"{resident:.0%} of the bytes stayed in the page cache")
    return {"method": " + ".join(methods) or "none", "resident_after": resident, "cold": cold, "note": "; ".join(notes)}


# =============================================================================================== the table


def assemble(cfg, preset, command, device, ckpts, bytes_per_ckpt, model_config, read, results, contenders,
             started, budget) -> dict:
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
            rows.append(_row(t, c, r, eager, sdpa, read_s))
        rows.append(_row(t, "read", {"status": read.get("status", "error"), "e2e_s": read_s,
                                     "note": read.get("note", "")}, eager, sdpa, read_s))
        e = got.get("eager", {})
        for c in ("sinktrace", "layered"):
            s = got.get(c, {})
            if s.get("status") == "ok" and e.get("status") == "ok":
                agreement[f"{c}@{t}"] = {
                    "max_abs_sink_mass": float(np.max(np.abs(np.subtract(s["sink_mass"], e["sink_mass"])))),
                    "max_abs_entropy": float(np.max(np.abs(np.subtract(s["entropy"], e["entropy"])))),
                }
    doc = {
        "command": command,
        "preset": preset,
        "created": started.isoformat(timespec="seconds"),
        "device": {"kind": "cuda" if device.startswith("cuda") else "cpu", "name": _device_words(device, results),
                   "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sinktrace": _version()},
        "model": {"parameters": _param_count(cfg.model), "dtype": str(cfg.dtype), "config": model_config},
        "checkpoints": {"root": str(Path(ckpts[0].path).parent), "count": len(ckpts),
                        "steps": [c.step for c in ckpts], "bytes_per_checkpoint": bytes_per_ckpt},
        "probe": {"seq_lens": [int(x) for x in cfg.probe.seq_lens], "batch_size": int(cfg.probe.batch_size),
                  "seed": int(cfg.probe.seed)},
        "settings": {"isolate": str(cfg.isolate), "warmup": int(cfg.warmup),
                     "forward_repeats": int(cfg.forward_repeats), "logits_to_keep": int(cfg.logits_to_keep),
                     "eager_budget_bytes": budget, "cold_cache": str(cfg.cold_cache)},
        "read_floor": read,
        "rows": rows,
        "agreement_with_eager": agreement,
        "details": {f"{c}@{t}": _details(r) for (c, t), r in results.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    doc["targets"] = targets(doc)
    return _finite(doc)


def _device_words(device: str, results: dict) -> str:
    if not device.startswith("cuda"):
        return device_name(device)
    names = [r["device_name"] for r in results.values() if r.get("device_name")]
    return names[0] if names else device


def _row(t, contender, r, eager, sdpa, read_s) -> dict:
    ok = r.get("status") == "ok"
    e2e, fwd = (r.get("e2e_s"), r.get("forward_s")) if ok else (None, None)

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
        "forward_vs_sdpa": ratio(fwd, sdpa, "forward_s"),
        "forward_cpu_s": r.get("forward_cpu_s") if ok else None,
        "forward_cpu_vs_sdpa": ratio(r.get("forward_cpu_s") if ok else None, sdpa, "forward_cpu_s"),
        "e2e_vs_read": e2e / read_s if e2e is not None and read_s else None,
        "peak_rss_bytes": r.get("peak_rss_bytes"),
        "peak_device_bytes": r.get("peak_device_bytes"),
        "cold_cache": (r.get("cache") or {}).get("cold"),
    }


def _details(r: dict) -> dict:
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
        add(f"statistics forward <= {limit}x the compute floor at T={t}", v, limit,
            None if v is None else v <= limit, "" if v is not None else "not measured")
    if EAGER_TARGET_LEN in lens:
        s, e = rows.get((EAGER_TARGET_LEN, "sinktrace")), rows.get((EAGER_TARGET_LEN, "eager"))
        if s and e and s["status"] == "ok":
            if e["status"] == "oom":
                add(f">= {EAGER_SPEEDUP}x faster than eager at T={EAGER_TARGET_LEN} (end to end)", None, EAGER_SPEEDUP,
                    True, "eager ran out of memory")
                add(f"<= {EAGER_MEMORY_SHARE} of eager's peak device memory at T={EAGER_TARGET_LEN}", None,
                    EAGER_MEMORY_SHARE, True, "eager ran out of memory")
            elif e["status"] == "ok":
                speed = e["e2e_s_per_ckpt"] / s["e2e_s_per_ckpt"]
                fwd_speed = e["forward_s"] / s["forward_s"] if s["forward_s"] else None
                add(f">= {EAGER_SPEEDUP}x faster than eager at T={EAGER_TARGET_LEN} (end to end)", speed,
                    EAGER_SPEEDUP, speed >= EAGER_SPEEDUP,
                    f"forward alone: {fwd_speed:.2f}x" if fwd_speed else "")
                sd, ed = s["peak_device_bytes"], e["peak_device_bytes"]
                share = sd / ed if sd and ed else None
                add(f"<= {EAGER_MEMORY_SHARE} of eager's peak device memory at T={EAGER_TARGET_LEN}", share,
                    EAGER_MEMORY_SHARE, None if share is None else share <= EAGER_MEMORY_SHARE,
                    "" if share is not None else "no device memory figures (CPU)")
    for t in lens:
        s, w = rows.get((t, "layered")), rows.get((t, "sinktrace"))
        if s and w and s["status"] == "ok" and w["status"] == "ok":
            limit = layered_memory_limit(doc, w, t)
            v = s["peak_device_bytes"]
            add(f"layer by layer at T={t}: peak device memory <= two blocks' weights + embeddings + activations "
                f"(GiB)", None if v is None else _gib(v), None if limit is None else _gib(limit),
                None if v is None or limit is None else v <= limit,
                "limit: the whole-model replay's peak, less the weights beyond the embeddings and two blocks, "
                "plus every probe row's hidden state" if v is not None else "no device memory figures (CPU)")
    n = doc["checkpoints"]["count"]
    read = doc["read_floor"]
    t = min(lens)
    s = rows.get((t, "sinktrace"))
    if s and s["status"] == "ok" and read.get("status") == "ok":
        share = doc["checkpoints"]["bytes_per_checkpoint"] / s["e2e_s_per_ckpt"] / read["bytes_per_s"]
        enough = n >= READ_TARGET_MIN_CKPTS
        add(f"replay throughput >= {READ_TARGET_SHARE:.0%} of the read floor over {READ_TARGET_MIN_CKPTS}+ "
            f"checkpoints (T={t})", share, READ_TARGET_SHARE, (share >= READ_TARGET_SHARE) if enough else None,
            "" if enough else f"only {n} checkpoints: not judged (checkpoints.count={READ_TARGET_MIN_CKPTS} or more)")
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
    itemsize = _torch_dtype(doc["model"]["dtype"]).itemsize
    block = itemsize * (2 * h * c["num_attention_heads"] * hd + 2 * h * kv * hd + 3 * h * c["intermediate_size"] + 2 * h)
    weights = doc["checkpoints"]["bytes_per_checkpoint"]
    hidden = itemsize * (whole.get("rows") or 0) * seq_len * h
    return int(whole["peak_device_bytes"] - weights + itemsize * c["vocab_size"] * h + 2 * block + hidden)


def _finite(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _version() -> str:
    from . import __version__

    return __version__


def _fmt_s(v) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 1e-3:
        return f"{v * 1e3:.1f}ms"
    return f"{v * 1e6:.0f}us"


def _fmt_x(v) -> str:
    return "-" if v is None else (f"{v:.2f}x" if v < 100 else f"{v:.0f}x")


def _fmt_gib(v) -> str:
    return "n/a" if v is None else f"{_gib(v):.2f}"


def _short(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('note', '')}"
    parts = []
    if row.get("e2e_s") is not None:
        parts.append(f"{_fmt_s(row['e2e_s'])} per checkpoint end to end")
    if row.get("forward_s") is not None:
        parts.append(f"forward {_fmt_s(row['forward_s'])}")
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
        f"{ck['count']} checkpoints of {_gib(ck['bytes_per_checkpoint']):.3f} GiB under {ck['root']}",
    ]
    if rf.get("status") == "ok":
        cache = rf["cache"]
        cold = {True: "cold (verified with mincore)", False: "NOT cold", None: "cold, unverified"}[cache["cold"]]
        disk = rf.get("storage_read_bytes")
        disk_words = f", {disk / rf['bytes']:.0%} of the bytes came from storage" if disk is not None else ""
        lines.append(
            f"read floor: {rf['bytes_per_s'] / 1e9:.3g} GB/s over {rf['files']} files, {cold} via {cache['method']}"
            f"{disk_words}; warm {rf['warm_bytes_per_s'] / 1e9:.3g} GB/s" + (f" ({cache['note']})" if cache["note"] else "")
        )
    else:
        lines.append(f"read floor: {rf.get('status')}: {rf.get('note')}")
    lines.append(
        "e2e: read + build + probe forward + statistics, per checkpoint (read floor: its files' read time); "
        "fwd: the probe forward with the weights already on the device; ratios are time / reference time"
        + ("" if on_gpu else "; cpu: the same ratio in CPU seconds of the process (steadier than wall time on a "
                             "shared machine)")
    )
    header = ["T", "rows", "contender", "e2e s", "fwd s", "e2e/eager", "fwd/eager", "fwd/sdpa",
              *([] if on_gpu else ["cpu"]), "e2e/read", "RSS GiB", "dev GiB", "note"]
    table = []
    for r in doc["rows"]:
        ok = r["status"] == "ok"
        measured = r["contender"] != "read" and r["status"] != "skipped"  # an out-of-memory row keeps its peaks
        note = r["note"] if not ok else ("" if r["cold_cache"] is not False or r["contender"] in ("sdpa", "read")
                                         else "page cache not cold")
        if not ok and r["status"] not in note:
            note = f"{r['status']}: {note}"
        table.append([
            str(r["seq_len"]), str(r["rows"] or "-"), r["label"], _fmt_s(r["e2e_s_per_ckpt"]), _fmt_s(r["forward_s"]),
            _fmt_x(r["e2e_vs_eager"]), _fmt_x(r["forward_vs_eager"]), _fmt_x(r["forward_vs_sdpa"]),
            *([] if on_gpu else [_fmt_x(r.get("forward_cpu_vs_sdpa"))]),
            _fmt_x(r["e2e_vs_read"]),
            _fmt_gib(r["peak_rss_bytes"]) if measured else "-",
            (_fmt_gib(r["peak_device_bytes"]) if on_gpu else "n/a") if measured else "-",
            note,
        ])
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
        + ("in its own subprocess" if doc["settings"]["isolate"] != "none" else
           "in this process, reset before each (includes the benchmark's own memory)")
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
            disk = f", {io['read_bytes'] / ck['bytes_per_checkpoint']:.2f}x the weight bytes read from storage, " \
                   f"{io['rchar'] / ck['bytes_per_checkpoint']:.2f}x through read calls" if io else ""
            lines.append(f"sinktrace replay at T={key.split('@')[1]}: load_model {_fmt_s(b['load_model_s'])} + measure "
                         f"{_fmt_s(b['measure_s'])} + rest {_fmt_s(b['other_s'])} per checkpoint{disk}"
                         + "; each replay read the next checkpoint ahead")
        if key.startswith("eager@") and r.get("status") == "ok":
            b = r["breakdown"]
            lines.append(f"eager at T={key.split('@')[1]}: from_pretrained {_fmt_s(b['from_pretrained_s'])} + forward "
                         f"and statistics {_fmt_s(b['forward_and_stats_s'])} per checkpoint")
    lines.append("")
    if on_gpu:
        lines.append("GPU targets:")
        for tg in doc["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[tg["pass"]]
            value = "-" if tg["value"] is None else f"{tg['value']:.3g}"
            lines.append(f"  {verdict:4}  {tg['target']}: {value}" + (f" ({tg['note']})" if tg["note"] else ""))
    else:
        lines.append("GPU targets: not judged on the CPU (they are in the JSON for reference).")
        faster = [(r["seq_len"], r["e2e_vs_eager"]) for r in doc["rows"]
                  if r["contender"] == "sinktrace" and r["e2e_vs_eager"] is not None]
        if faster:
            words = ", ".join(f"T={t}: {v:.2f}x eager's time" for t, v in faster)
            verdict = "yes" if all(v < 1 for _, v in faster) else "no"
            lines.append(f"CPU check, replay faster than eager end to end where eager ran: {verdict} ({words})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
