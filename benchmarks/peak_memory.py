"""Peak host memory of one replay, whole model against layer by layer, for a Hugging Face safetensors folder and a
DCP folder (the Hugging Face Trainer's FSDP layout) of the same model.

    python -m benchmarks.peak_memory [--layers 24] [--width 512] [--folder DIR]

writes the two checkpoints (a random Llama, float32) once into DIR, then replays each both ways on the CPU, every
replay in a fresh process, and prints that process's peak resident set size (`resource.getrusage(...).ru_maxrss`),
its resident size just before the replay (imports, the probe), the peaks of its anonymous memory and of its
file-backed pages (memory-mapped weight files) during the replay, sampled every 5 ms from /proc/self/status, and
the replay's wall time. The figures and the
machine's load go into docs/benchmarks.md ("Peak host memory, layer by layer").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROUTES = {"whole": None, "layered": "1KiB"}  # replay.max_device_memory: none, or below any block


def write_checkpoints(folder: Path, layers: int, width: int) -> dict[str, dict]:
    """The model as a safetensors folder and as a DCP folder; {format: its Checkpoint record's fields}."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=width * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        vocab_size=8192,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    hf, fsdp = folder / "hf", folder / "dcp"
    if not (hf / "config.json").exists() or not (fsdp / "config.json").exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(hf)
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(fsdp / "pytorch_model_fsdp_0"))
        config.save_pretrained(fsdp)
    return {
        "safetensors": {"path": str(hf), "weight_files": [str(p) for p in sorted(hf.glob("*.safetensors"))]},
        "dcp": {"path": str(fsdp), "weight_files": [str(fsdp / "pytorch_model_fsdp_0")], "format": "dcp"},
    }


def replay_once(record: dict, budget) -> dict:
    """One replay in this process: its peak RSS, the RSS before it, and its seconds."""
    import numpy as np

    from pipeline.records import Checkpoint, Probe
    from pipeline.replay import ReplaySettings, replay

    ckpt = Checkpoint(step=1, complete=True, **{**record, "weight_files": tuple(record["weight_files"])})
    tokens = np.random.default_rng(0).integers(0, 8192, (8, 128))
    probe = Probe(name="p", kind="random", tokens=tokens, seed=0, first_token="keep")
    settings = ReplaySettings(device="cpu", dtype="float32", batch_size=8, max_device_memory=budget, measure=[])
    before = _status()
    peaks = dict(before)
    done = threading.Event()

    def sample():  # the kernel keeps the peak of the whole resident set only; its anonymous part is sampled
        while not done.wait(0.005):
            for k, v in _status().items():
                peaks[k] = max(peaks[k], v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    ds = replay(ckpt, probe, settings)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {
        "peak_mib": _maxrss(),
        "before_mib": before["VmRSS"],
        "anon_before_mib": before["RssAnon"],
        "anon_peak_mib": peaks["RssAnon"],
        "file_peak_mib": peaks["RssFile"],
        "seconds": seconds,
        "route": str(ds.replay_route.values),
        "sink_mass_mean": float(ds.sink_mass.mean()),
    }


def _status() -> dict[str, float]:
    """This process's resident set now, in MiB: all of it, its anonymous memory and its file-backed pages."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def _maxrss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--folder", help="where the checkpoints are written (kept); a temporary folder by default")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="run the replays with glibc's MALLOC_MMAP_THRESHOLD_ set to this many bytes: blocks of memory at least "
        "that large are then always returned to the system when freed",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one replay, in a fresh process
    args = parser.parse_args(argv)
    if args.one:
        record, route = json.loads(args.one)
        print(json.dumps(replay_once(record, ROUTES[route])))
        return 0
    malloc = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        records = write_checkpoints(folder, args.layers, args.width)
        sizes = _sizes(records["safetensors"]["weight_files"], args.layers)
        print(f"model: {args.layers} layers, width {args.width}, float32: {sizes}; {malloc or 'default malloc'}")
        print(
            f"{'format':<12} {'route':<8} {'peak RSS':>10} {'RSS before':>10} {'anon peak':>10} {'anon before':>11} "
            f"{'file peak':>10} {'seconds':>8}  sink_mass mean"
        )
        for fmt, record in records.items():
            for route in ROUTES:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.peak_memory", "--one", json.dumps([record, route])],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=os.environ | {"TQDM_DISABLE": "1"} | malloc,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                assert r["route"] == route, r
                print(
                    f"{fmt:<12} {route:<8} {r['peak_mib']:>6.0f} MiB {r['before_mib']:>6.0f} MiB "
                    f"{r['anon_peak_mib']:>6.0f} MiB {r['anon_before_mib']:>7.0f} MiB {r['file_peak_mib']:>6.0f} MiB "
                    f"{r['seconds']:>8.2f}  {r['sink_mass_mean']:.6f}"
                )
    print("load:", os.getloadavg())
    return 0


def _sizes(files: list[str], layers: int) -> str:
    from safetensors import safe_open

    total, block = 0, 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 4
                for d in shape:
                    n *= d
                total += n
                block += n if name.startswith("model.layers.0.") else 0
    return f"weights {total / 2**20:.0f} MiB, one block {block / 2**20:.1f} MiB ({total / block:.0f}x)"


if __name__ == "__main__":
    sys.exit(main())
