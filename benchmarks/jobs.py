"""Running one contender (a job: a JSON-able dict) in this process or in a fresh subprocess of its own, so that
its peak host memory is its own and one contender's caches never help another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pipeline
from pipeline.errors import describe
from pipeline.locations import write_json_atomic

from .timing import Peaks, device_name, free, is_oom, weight_files

# the folders `pipeline` (a clone or site-packages alike) and this benchmark are imported from, put first on a
# worker's path
PACKAGE_ROOT = str(Path(pipeline.__file__).resolve().parent.parent)
BENCH_ROOT = str(Path(__file__).resolve().parent.parent)
WORKER_CODE = "import sys; from benchmarks.jobs import worker_main; sys.exit(worker_main(sys.argv[1], sys.argv[2]))"


class JobRunner:
    """Runs a job dict in this process (isolate=none) or in a fresh `python -c` subprocess."""

    def __init__(self, isolate: str, work: Path, timeout_s: float):
        self.isolate, self.work, self.timeout_s, self.n = isolate, work, timeout_s, 0

    def run(self, job: dict, python: str | None = None) -> dict:
        """The job's result; `python`: the interpreter of another environment to run it in (always a subprocess)."""
        if self.isolate == "none" and python is None:
            return run_job(job)
        self.n += 1
        stem = self.work / f"job-{self.n:02d}-{job['kind']}"
        job_file, result_file, log_file = (stem.with_suffix(s) for s in (".json", ".result.json", ".log"))
        job_file.write_text(json.dumps(job))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in dict.fromkeys((PACKAGE_ROOT, BENCH_ROOT, env.get("PYTHONPATH"))) if p
        )
        with open(log_file, "wb") as logf:
            try:
                proc = subprocess.run(
                    [python or sys.executable, "-c", WORKER_CODE, str(job_file), str(result_file)],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=env,
                    timeout=self.timeout_s,
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        last = tail(log_file)
        if result_file.exists():
            return json.loads(result_file.read_text())
        if rc is None:
            return {"status": "error", "error": f"timed out after {self.timeout_s:g} s (job_timeout_s)"}
        if rc in (-9, 137):
            return {
                "status": "oom",
                "error": "the worker was killed (SIGKILL): most likely the kernel's out-of-memory killer",
            }
        print(last, file=sys.stderr)
        last_line = last.splitlines()[-1] if last else ""
        return {"status": "error", "error": f"the worker exited with status {rc}: {last_line}"}


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def worker_main(job_file: str, result_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    write_json_atomic(result_file, run_job(job))
    return 0


def run_job(job: dict) -> dict:
    """One contender (or the read floor) at the job's probe lengths; returns {"results": {T: row}} or {"read": ...}."""
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from pipeline.records import Checkpoint

    from .contenders import RUNS
    from .pagecache import read_floor

    hf_logging.disable_progress_bar()
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    ckpts = [Checkpoint(**{**c, "weight_files": tuple(c["weight_files"])}) for c in job["checkpoints"]]
    if job["kind"] == "read":
        try:
            return {"read": read_floor(weight_files(ckpts), job["cold_cache"])}
        except Exception as e:  # noqa: BLE001  (reported in the table)
            traceback.print_exc()
            return {"read": {"status": "error", "note": describe(e)}}
    fn = RUNS[job["kind"]]
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
                row = {"status": "oom", "note": f"out of memory: {describe(e, 300)}"}
            else:
                traceback.print_exc()
                row = {"status": "error", "note": describe(e, 300)}
        row.setdefault("status", "ok")
        row.setdefault("peak_rss_bytes", peaks.host())  # (unless the contender took its own)
        row.setdefault("peak_rss_scope", peaks.host_scope)
        row.setdefault("peak_device_bytes", peaks.device())
        row["rows"] = int(tokens.shape[0])
        results[str(t)] = row
        if job["device"].startswith("cuda"):
            row["device_name"] = device_name(job["device"])
        free(job["device"])
    return {"results": results}
