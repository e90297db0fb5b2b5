"""Peers: sinktrace against the libraries its users would otherwise use, each a whole program in its own process.

Every contender here is timed as a user would time it, from the process's start to its exit (imports, loading,
the probe, the statistics): `sinktrace` is the `sinktrace` command (`python -m pipeline`, replay stage only);
`transformers` a plain script (`from_pretrained` + `output_attentions=True`); `transformer_lens` and `nnsight`
the same through those libraries (benchmarks/peer_run.py). The parent takes each process's wall time, CPU
time (user + system, all threads) and peak resident memory from the kernel (`wait4`).

TransformerLens and nnsight are not dependencies of sinktrace. Each runs where it can be imported: this
interpreter, or the peers' environment (`peers.venv`, by default $SINKTRACE_HOME/bench/peers-venv), which
`python -m benchmarks.peers` makes: a virtual environment that sees this environment's packages (torch
included, never replaced) through a .pth file and installs the two libraries into its own folder. A peer found
in neither is skipped with a one-line reason.

`python -m benchmarks.peers` creates (or completes) that environment and exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pipeline
from pipeline.locations import sinktrace_home

from . import LOG_PREFIX
from .jobs import PACKAGE_ROOT, tail

PEERS = ("sinktrace", "transformers", "transformer_lens", "nnsight")
LABELS = {
    "sinktrace": "sinktrace (the command)",
    "transformers": "transformers script",
    "transformer_lens": "TransformerLens",
    "nnsight": "nnsight",
}
# what each peer imports, and what `python -m benchmarks.peers` installs for it
MODULES = {"transformer_lens": "transformer_lens", "nnsight": "nnsight"}
REQUIREMENTS = ("transformer_lens>=4.3", "nnsight>=0.8.1")
PEER_SCRIPT = str(Path(__file__).with_name("peer_run.py"))


def default_venv() -> Path:
    return sinktrace_home() / "bench" / "peers-venv"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def can_import(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def interpreter(peer: str, venv: Path) -> tuple[str | None, str]:
    """The Python that runs `peer`, or None and the one-line reason it is skipped."""
    module = MODULES.get(peer)
    if module is None or can_import(sys.executable, module):
        return sys.executable, ""
    python = venv_python(venv)
    if python.exists() and can_import(str(python), module):
        return str(python), ""
    return None, f"{module} is not installed (here or in {venv}): `python -m benchmarks.peers` installs it"


def make_venv(venv: Path) -> int:
    """A virtual environment that reuses this one's packages (torch, transformers) and adds the peers."""
    import torch

    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv_python(venv))
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # after the environment's own folder on sys.path: what it installs wins, the rest comes from here
    Path(site, "zz-sinktrace-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # never a second torch: pip keeps this one
    return subprocess.run([python, "-m", "pip", "install", *REQUIREMENTS, torch_pin]).returncode


def run_process(argv: list[str], log: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run one program to its end: exit status, wall seconds, CPU seconds and peak RSS bytes from `wait4`."""
    timed_out = False
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout_s:
                timed_out = True
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)  # (the polling adds at most this to the wall time)
        wall = time.perf_counter() - t0
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
    }


def sinktrace_argv(root: Path, store: Path, steps: list[int], probe: dict, job: dict) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        f"checkpoints.root={root}",
        "checkpoints.quiet_seconds=0",
        f"store.path={store}",
        "stages=[replay]",
        f"replay.steps=[{','.join(map(str, steps))}]",
        f"probe.seq_len={probe['seq_len']}",
        f"probe.rows={probe['rows']}",
        f"probe.seed={probe['seed']}",
        f"replay.batch_size={job['batch_size']}",
        f"replay.dtype={job['dtype']}",
        f"replay.device={job['device']}",
    ]


def run_peer(peer: str, ckpts, probe: dict, job: dict, work: Path, venv: Path, timeout_s: float) -> dict:
    """One peer over the checkpoints at one probe (dict: path, seq_len, rows, seed); its row's figures."""
    python, reason = interpreter(peer, venv)
    if python is None:
        return {"status": "skipped", "note": reason}
    stem = work / f"peer-{peer}-T{probe['seq_len']}-n{len(ckpts)}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if job.get("threads"):
        env["OMP_NUM_THREADS"] = str(job["threads"])
    if peer == "sinktrace":
        store = stem.with_suffix(".zarr")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        argv = sinktrace_argv(Path(ckpts[0].path).parent, store, [c.step for c in ckpts], probe, job)
    else:
        result_file = stem.with_suffix(".result.json")
        job_file = stem.with_suffix(".json")
        job_file.write_text(
            json.dumps(
                {
                    "checkpoints": [c.path for c in ckpts],
                    "probe": probe["path"],
                    "batch_size": job["batch_size"],
                    "dtype": job["dtype"],
                    "device": job["device"],
                    "threads": job.get("threads"),
                    "vocab_size": job["vocab_size"],
                    "tokenizer_dir": str(stem) + "-tokenizer",
                }
            )
        )
        # -P: the script's folder (this package's modules) stays off the peer's import path
        argv = [python, "-P", PEER_SCRIPT, peer, str(job_file), str(result_file)]
    got = run_process(argv, stem.with_suffix(".log"), timeout_s, env)
    row = {k: got[k] for k in ("wall_s", "cpu_s", "peak_rss_bytes")}
    if got["timed_out"]:
        return {**row, "status": "error", "note": f"timed out after {timeout_s:g} s"}
    if got["rc"] in (-9, 137):
        return {**row, "status": "oom", "note": "killed (SIGKILL): most likely out of memory"}
    if got["rc"] != 0:
        lines = tail(stem.with_suffix(".log")).splitlines()
        return {**row, "status": "error", "note": f"exit status {got['rc']}: {lines[-1] if lines else ''}"}
    if peer == "sinktrace":
        (ds,) = pipeline.open_sinks(str(store)).children.values()  # the run's one probe group
        sink, entropy = ds["sink_mass"].values.tolist(), ds["entropy"].values.tolist()
        versions = {"sinktrace": pipeline.__version__}
    else:
        result = json.loads(result_file.read_text())
        sink, entropy, versions = result["sink_mass"], result["entropy"], result["versions"]
    return {**row, "status": "ok", "sink_mass": sink, "entropy": entropy, "versions": versions}


def concurrent_runs(ckpts, probe: dict, job: dict, work: Path, timeout_s: float) -> dict:
    """sinktrace's command alone, then two of them at once over the same checkpoints (each with its own store), at
    the default thread count: two runs on one machine should take about twice one run, not many times that (torch
    threads of both oversubscribing the cores)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    root, steps = Path(ckpts[0].path).parent, [c.step for c in ckpts]

    def one(name: str) -> dict:
        argv = sinktrace_argv(root, work / f"{name}.zarr", steps, probe, {**job, "threads": None})
        return run_process(argv, work / f"{name}.log", timeout_s, env)

    print(f"{LOG_PREFIX} sinktrace alone, then two at once ({len(ckpts)} checkpoint(s), T={probe['seq_len']}) ...")
    alone = one("alone")
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(one, ["together-a", "together-b"]))
    if any(r["rc"] != 0 or r["timed_out"] for r in (alone, *together)):
        return {"status": "error", "note": "a run failed: see the logs in " + str(work)}
    ratio = max(r["wall_s"] for r in together) / alone["wall_s"]
    print(
        f"{LOG_PREFIX}   {alone['wall_s']:.2f} s alone, {together[0]['wall_s']:.2f} s and "
        f"{together[1]['wall_s']:.2f} s at once: {ratio:.2f}x"
    )
    return {
        "status": "ok",
        "alone_s": alone["wall_s"],
        "together_s": [r["wall_s"] for r in together],
        "ratio": ratio,
        "seq_len": int(probe["seq_len"]),
        "checkpoints": len(ckpts),
    }


def run_peers(cfg, ckpts, probes: dict, job: dict, work: Path, peers: list[str], repeats: int = 1) -> dict:
    """Every peer at every probe length of `probes` (make_probes' dict); {(peer, T): row}. With `repeats`, the
    peers take turns that many times (each run in a folder of its own) and each row holds the median run."""
    venv = Path(cfg.peers.venv).expanduser() if cfg.peers.venv else default_venv()
    out = {}
    for t, meta in probes.items():
        probe = {"path": meta["path"], "seq_len": int(t), "rows": meta["rows"], "seed": meta["seed"]}
        runs = {peer: [] for peer in peers}
        for turn in range(repeats):
            folder = work / f"turn-{turn}" if repeats > 1 else work
            folder.mkdir(exist_ok=True)
            for peer in peers:
                print(f"{LOG_PREFIX} {peer} ({len(ckpts)} checkpoints, T={t}, its own process) ...", flush=True)
                row = run_peer(peer, ckpts, probe, job, folder, venv, float(cfg.job_timeout_s))
                runs[peer].append(row)
                words = (
                    f"{row['wall_s']:.2f} s wall, {row['cpu_s']:.2f} s CPU"
                    if row["status"] == "ok"
                    else f"{row['status']}: {row['note']}"
                )
                print(f"{LOG_PREFIX}   {words}", flush=True)
        for peer, rows in runs.items():
            out[(peer, int(t))] = median_run(rows)
    return out


def median_run(rows: list[dict]) -> dict:
    """The run of median wall time (the first failure, if any run failed), with every run's wall seconds."""
    failed = [r for r in rows if r["status"] != "ok"]
    if failed or len(rows) == 1:
        return failed[0] if failed else rows[0]
    ordered = sorted(rows, key=lambda r: r["wall_s"])
    return {**ordered[(len(rows) - 1) // 2], "runs_wall_s": [r["wall_s"] for r in rows]}


def main() -> int:
    venv = default_venv()
    print(f"{LOG_PREFIX} making the peers' environment in {venv}")
    rc = make_venv(venv)
    if rc == 0:
        for peer, module in MODULES.items():
            print(f"{LOG_PREFIX} {peer}: {'ok' if can_import(str(venv_python(venv)), module) else 'NOT importable'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
