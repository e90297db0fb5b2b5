"""`python -m benchmarks.objectstore`: how fast a checkpoint's tensors come off object storage, one request at a time
against several in flight, on the loopback with a bucket's latency injected (benchmarks/latency_proxy.py).

One run writes a safetensors file of `tensors` tensors of `tensor_kib` KiB, puts it into an S3-compatible server
(moto's) on 127.0.0.1 and reads it through s3fs, as sinktrace does (`SafetensorsFile.read_many`), in these ways:

- one at a time: each tensor a request, the next one sent when the last has arrived;
- N in flight (config `concurrency`): each tensor a request, N of them at once;
- sinktrace's plan: neighbouring tensors merged into requests of up to 64 MiB, 16 (the default
  `checkpoints.read_concurrency`) in flight;
- whole file: a plain sequential download of the file (fsspec's `get`), for comparison.

Each is timed first without injected latency, which calibrates the loopback: `rate`, the bytes per second of one
tensor-sized request after another (its own overhead included), and `link`, the most bytes per second any way
reached. A request of `size` bytes then takes `size / rate = overhead + size / link` on the loopback (`overhead`
from one at a time). With `latency_ms` added to every request, each way is set against its ideal
`min(in_flight x size / (latency + size / rate), link)` (size: one request's bytes), where for tensor-sized requests
`link` is also capped at the most requests per second reached on the loopback (the server and the proxy share the
machine's CPUs with the reader: a cap of this test bed, not of a bucket), and against one at a time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline import hydra_app
from pipeline.checkpoints.byteranges import ONE_AT_A_TIME, ReadPlan, coalesce
from pipeline.locations import sinktrace_home, write_json_atomic

from . import LOG_PREFIX

CONF_MODULE = "benchmarks.conf"
BUCKET = "sinktrace-bench"
MB = 1e6
DEFAULT_CONCURRENCY = 16  # checkpoints.read_concurrency's default


def ways(cfg: DictConfig) -> list[tuple[str, ReadPlan | None]]:
    """(name, plan) of each way of reading; None: the whole file downloaded."""
    out: list[tuple[str, ReadPlan | None]] = [("one at a time", ONE_AT_A_TIME)]
    out += [(f"{c} in flight", ReadPlan(concurrency=int(c), gap=0, max_request=0)) for c in cfg.concurrency]
    out += [("sinktrace's plan (merged)", ReadPlan(concurrency=DEFAULT_CONCURRENCY)), ("whole file (get)", None)]
    return out


def bench(cfg: DictConfig) -> dict:
    """Run every way at no injected latency and at `latency_ms`; print the table; return the JSON document."""
    import logging

    import fsspec
    import torch
    from safetensors.torch import save_file

    from pipeline.checkpoints.safetensorsfile import SafetensorsFile

    from .latency_proxy import object_store

    for name in ("botocore", "aiobotocore", "s3fs"):  # "Found credentials in environment variables." and the like
        logging.getLogger(name).setLevel(logging.WARNING)
    started = dt.datetime.now(dt.UTC)
    n, size = int(cfg.tensors), int(cfg.tensor_kib) * 1024
    latency = float(cfg.latency_ms) / 1000
    with tempfile.TemporaryDirectory(prefix="sinktrace-objectstore-") as work:
        path = Path(work) / "model.safetensors"
        generator = torch.Generator().manual_seed(0)
        save_file({f"t{i:05d}": torch.randn(size // 4, generator=generator) for i in range(n)}, path)
        total = path.stat().st_size
        print(f"{LOG_PREFIX} {n} tensors of {size // 1024} KiB ({total / MB:.1f} MB), latency {cfg.latency_ms} ms")
        with object_store(0.0, BUCKET) as (proxy, direct):
            direct.put(str(path), f"{BUCKET}/model.safetensors")
            url = f"s3://{BUCKET}/model.safetensors"
            f = SafetensorsFile(url)
            fs, remote = fsspec.core.url_to_fs(url)
            want = _digest(f.read_many(f.keys(), ReadPlan(gap=0, max_request=0)))
            spans = [f.spans()[k] for k in f.keys()]

            def read(plan: ReadPlan | None):
                if plan is None:
                    fs.get(remote, str(Path(work) / "download"))
                    return None
                return f.read_many(f.keys(), plan)

            rows = []
            for name, plan in ways(cfg):
                requests = 1 if plan is None else len(coalesce(spans, plan))
                row = {"way": name, "requests": requests, "in_flight": 1 if plan is None else plan.concurrency}
                for key, wait in (("loopback", 0.0), ("latency", latency)):
                    proxy.latency = wait
                    times = []
                    for _ in range(int(cfg.repeats)):
                        proxy.reset()
                        start = time.perf_counter()
                        got = read(plan)
                        times.append(time.perf_counter() - start)
                        if got is not None and _digest(got) != want:
                            raise RuntimeError(f"{name}: the tensors read differ from the file's")
                    row[f"{key}_s"] = statistics.median(times)
                    row[f"{key}_peak_in_flight"] = proxy.peak
                print(f"{LOG_PREFIX}   {name}: {row['loopback_s']:.3f} s on the loopback, {row['latency_s']:.3f} s")
                rows.append(row)
    one = rows[0]
    link = max(total / r["loopback_s"] for r in rows)
    # a request of s bytes takes `overhead + s / link` on the loopback: `size / rate` in the ideal below
    overhead = max(0.0, one["loopback_s"] / n - size / link)
    # the server and the proxy share this machine's CPUs with the reader: the most tensor-sized requests per second
    # any way reached on the loopback caps them too (a bucket serves its requests on machines of its own)
    per_s = max(r["requests"] / r["loopback_s"] for r in rows if r["requests"] == n)
    for r in rows:
        each = total / r["requests"]
        in_flight = min(r["in_flight"], r["requests"])
        r["throughput_mb_s"] = total / r["latency_s"] / MB
        cap = min(link, per_s * each) if r["requests"] == n else link
        r["ideal_mb_s"] = min(in_flight * each / (latency + overhead + each / link), cap) / MB
        r["of_ideal"] = r["throughput_mb_s"] / r["ideal_mb_s"]
        r["speedup_vs_one_at_a_time"] = one["latency_s"] / r["latency_s"]
    doc = {
        "command": " ".join(["python -m benchmarks.objectstore", *sys.argv[1:]]),
        "started": started.isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "settings": {"latency_ms": float(cfg.latency_ms), "tensors": n, "tensor_bytes": size, "file_bytes": total},
        "loopback": {
            "rate_mb_s": size / (overhead + size / link) / MB,
            "overhead_ms": overhead * 1000,
            "link_mb_s": link / MB,
            "requests_per_s": per_s,
        },
        "rows": rows,
    }
    out = Path(cfg.out).expanduser() if cfg.out else default_out(started)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc["out"] = str(out)
    write_json_atomic(out, doc, indent=1, allow_nan=False)
    print()
    print(render(doc))
    print(f"\n{LOG_PREFIX} JSON: {out}")
    return doc


def render(doc: dict) -> str:
    s, lb = doc["settings"], doc["loopback"]
    lines = [
        f"{s['tensors']} tensors x {s['tensor_bytes'] // 1024} KiB from S3 (moto on 127.0.0.1) with "
        f"{s['latency_ms']:g} ms per request; loopback without it: rate {lb['rate_mb_s']:.1f} MB/s (one tensor "
        f"after another: {lb['overhead_ms']:.1f} ms per request + bytes at the link's rate), link "
        f"{lb['link_mb_s']:.1f} MB/s, at most {lb['requests_per_s']:.0f} tensor-sized requests/s; load average "
        f"{doc['load_average'][0]:.2f} on {doc['cpus']} CPUs",
        "",
        f"| {'way':<26} | requests | peak in flight | seconds | MB/s  | ideal MB/s | of ideal | vs one at a time |",
        f"|{'-' * 28}|---------:|---------------:|--------:|------:|-----------:|---------:|-----------------:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['way']:<26} | {r['requests']:>8} | {r['latency_peak_in_flight']:>14} | {r['latency_s']:>7.3f} | "
            f"{r['throughput_mb_s']:>5.1f} | {r['ideal_mb_s']:>10.1f} | {r['of_ideal']:>7.0%} | "
            f"{r['speedup_vs_one_at_a_time']:>15.1f}x |"
        )
    return "\n".join(lines)


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].numpy().tobytes())
    return h.hexdigest()


def default_out(started: dt.datetime) -> Path:
    return sinktrace_home() / "bench" / "results" / f"objectstore-{started.strftime('%Y%m%d-%H%M%S')}.json"


def run(cfg: DictConfig) -> int:
    bench(cfg)
    return 0


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the command line would build (for Python callers and tests)."""
    return hydra_app.compose(CONF_MODULE, "objectstore", overrides)


main = hydra_app.command(CONF_MODULE, "objectstore", run)

if __name__ == "__main__":
    main()
