"""A scaled-down rehearsal of a large mixture-of-experts run's replay, to run before spending a cluster's hours.

    python -m benchmarks.rehearsal [--out DIR] [--ranks 4] [--layers 8] [--experts 16] [--hidden 256] [--latency-ms 0]

It writes a small run of the Qwen3-MoE family (the shape of the 30B-A3B model, scaled down: by default 8 layers,
16 experts, top-2 routing) as a multi-rank training job writes it: `torch.distributed.checkpoint.save` under a gloo
process group of `--ranks` processes on 127.0.0.1, every tensor sharded along its first dimension (a DTensor on a
CPU device mesh), so that each step folder holds one `.distcp` data file per rank, the optimizer's moments and the
training state beside the model, in torchtitan's folder layout (`checkpoint/step-<N>/`). The model's tensors are
stored under `model.` in transformers' names, with the model's config.json beside them, as the Hugging Face
Trainer's FSDP checkpoints hold them. Step 200 holds the same weights as step 100, as a public suite serving one
checkpoint under two step names would; the other steps' weights are the initialisation perturbed by a seeded amount
per step (a rehearsal of the reading, not of training).

The run is then put on an S3-compatible server (moto's server mode, on 127.0.0.1, from the `test` extra; with
`--latency-ms`, behind a proxy that delays each request by that much, as a remote bucket would) and
replayed three ways, each by the `sinktrace` command in a fresh process: whole from the local disk (the reference),
layer by layer from the local disk, and layer by layer straight from the bucket, with `replay.max_device_memory`
below the model's size. It prints, for each, the time and the process's peak resident memory, whether every
statistic equals the reference's (to 1e-6), whether the weights digests agree, and the steps the store flags as
holding identical weights. Exit status 0 when everything agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = (0, 100, 200, 300)
DUPLICATE = {200: 100}  # step -> the step whose weights it holds
BUCKET = "sinktrace-rehearsal"
# The replay runs in-process (the local cluster); its peak is read from the kernel's high-water mark of this
# process's own memory (VmHWM), which, unlike getrusage's, does not start from the parent's size at the fork.
CHILD = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("VmHWM", line.split()[1], file=sys.stderr)
atexit.register(peak)
sys.argv[0] = "sinktrace"
from pipeline.cli import main
main()
"""


def moe_config(layers: int, experts: int, hidden: int) -> dict:
    return {
        "model_type": "qwen3_moe",
        "vocab_size": 512,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": hidden // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
    }


def step_weights(config: dict, step: int) -> dict:
    """The model's state dict at `step`: the seeded initialisation, perturbed per step."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**config))
    source = DUPLICATE.get(step, step)
    g = torch.Generator().manual_seed(source)
    return {
        k: (v + 0.02 * source / 100 * torch.randn(v.shape, generator=g)).contiguous()
        for k, v in model.state_dict().items()
    }


def _save_rank(rank: int, world: int, port: int, run: str, config: dict) -> None:
    import warnings

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        for step in STEPS:
            full = step_weights(config, step)
            model = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}
            moments = {
                f"state.{k}.{m}": distribute_tensor(v.abs() * 1e-3, mesh, [Shard(0)])
                for k, v in full.items()
                for m in ("exp_avg", "exp_avg_sq")
            }
            state = {
                "model": model,
                "optimizer": moments,
                "lr_scheduler": {"lr_scheduler_0": {"step": step}},
                "dataloader": {f"dp_rank_{rank}": b"state"},
                "train_state": {"step": step},
            }
            folder = Path(run) / "checkpoint" / f"step-{step}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(state, checkpoint_id=str(folder))
            if rank == 0:
                (folder / "config.json").write_text(json.dumps(config, indent=1))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def write_run(run: Path, ranks: int, config: dict) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save_rank, args=(ranks, port, str(run), config), nprocs=ranks, join=True)
    # the trainer's files are old by the time a replay reads them: no quiet period to wait out
    old = time.time() - 3600
    for path in run.rglob("*"):
        os.utime(path, (old, old))


def replay(label: str, root: str, store: Path, env: dict, extra: list[str]) -> dict:
    """One `sinktrace` replay in a fresh process: its seconds and peak resident memory."""
    args = [
        sys.executable,
        "-c",
        CHILD,
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        "checkpoints.key_map=none",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=16",
        "probe.seq_len=64",
        "replay.dtype=float32",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    proc.wait()
    seconds = time.perf_counter() - t0
    peaks = [int(line.split()[1]) for line in out.splitlines() if line.startswith("VmHWM ")]
    if proc.returncode != 0 or not peaks:
        raise SystemExit(f"{label}: sinktrace exited {proc.returncode}\n{out[-4000:]}")
    return {"label": label, "store": store, "seconds": seconds, "peak_rss_mib": peaks[-1] / 1024}


def only_probe(store: Path):
    """The store's one probe group, as a Dataset."""
    from pipeline.store.cube import open_sinks

    (name,) = open_sinks(str(store)).children
    return open_sinks(str(store), name)


def compare(reference: Path, other: Path) -> tuple[float, bool]:
    """The largest absolute difference over every statistic, and whether the weights digests agree."""
    import numpy as np

    a, b = only_probe(reference), only_probe(other)
    worst = 0.0
    for name, var in a.data_vars.items():
        if np.issubdtype(var.dtype, np.floating):
            x, y = var.values, b[name].values
            if x.shape != y.shape or not np.array_equal(np.isnan(x), np.isnan(y)):
                return float("inf"), False
            if np.isfinite(x).any():
                worst = max(worst, float(np.nanmax(np.abs(x - y))))
    same_digest = a["weights_digest"].values.tolist() == b["weights_digest"].values.tolist()
    return worst, same_digest and all(a["weights_digest"].values.tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the run and the stores (default: a temporary folder, removed)")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to each request to the bucket")
    args = parser.parse_args(argv)

    from pipeline.analysis import same_weights

    from .latency_proxy import object_store

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sinktrace-rehearsal-"))
    out.mkdir(parents=True, exist_ok=True)
    config = moe_config(args.layers, args.experts, args.hidden)
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    write_run(run, args.ranks, config)
    step_bytes = sum(p.stat().st_size for p in (run / "checkpoint" / "step-0").glob("*.distcp"))
    n_params = sum(v.numel() for v in step_weights(config, 0).values())
    model_bytes = 4 * n_params
    print(
        f"wrote {len(STEPS)} steps x {args.ranks} ranks' .distcp files ({step_bytes / 2**20:.1f} MiB per step with "
        f"the optimizer's moments; model {n_params / 1e6:.1f}M parameters, {model_bytes / 2**20:.1f} MiB in float32) "
        f"in {time.perf_counter() - t0:.0f} s"
    )

    with object_store(args.latency_ms / 1000, BUCKET) as (_, direct):
        direct.put(str(run / "checkpoint"), f"{BUCKET}/run", recursive=True)
        env = dict(os.environ)  # AWS_* name the server (through the latency proxy)
        budget = [f"replay.max_device_memory={model_bytes // 4}B"]
        results = [
            replay("local, whole", str(run / "checkpoint"), out / "whole.zarr", env, ["replay.max_device_memory=null"]),
            replay("local, layer by layer", str(run / "checkpoint"), out / "layered.zarr", env, budget),
            replay("S3, layer by layer", f"s3://{BUCKET}/run", out / "s3-layered.zarr", env, budget),
        ]

    ok = True
    print("\n| replay | seconds | peak RSS (MiB) | largest difference to the whole local replay | digests agree |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        worst, digests = compare(results[0]["store"], r["store"])
        ok &= worst <= 1e-6 and digests
        agree = "yes" if digests else "NO"
        print(f"| {r['label']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {worst:.1e} | {agree} |")
    for r in results:
        groups = same_weights(only_probe(r["store"]))
        ok &= groups == [[100, 200]]
        print(f"{r['label']}: steps flagged as holding identical weights: {groups}")
    print(f"\nlayer-by-layer budget: {model_bytes // 4} bytes (a quarter of the model's float32 weights)")
    print("everything agrees" if ok else "MISMATCH: see above")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
