"""The benchmark command: it runs, prints one table and writes the same table as JSON (timings never gate tests)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.command import compose, run_bench
from benchmarks.contenders import eager_attention_bytes
from benchmarks.fixtures import param_count
from benchmarks.pagecache import drop_page_cache, read_floor, resident_fraction
from benchmarks.peers import median_run
from benchmarks.timing import is_oom
from pipeline.devices import resolve_device

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ["sinktrace", "layered", "eager", "sdpa", "read"]


def numbers(row):
    keys = [
        "e2e_s_per_ckpt",
        "forward_s",
        "e2e_vs_eager",
        "forward_vs_eager",
        "forward_vs_sdpa",
        "e2e_vs_read",
        "peak_rss_bytes",
        "peak_device_bytes",
    ]
    return {k: row[k] for k in keys if row[k] is not None}


@pytest.mark.slow
def test_smoke_preset_prints_the_table_and_writes_the_json(tmp_path, sinktrace_home):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "preset=smoke", f"out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SINKTRACE_HOME": str(sinktrace_home)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout

    doc = json.loads(out.read_text())
    assert f"JSON: {out}" in text
    lens = doc["probe"]["seq_lens"]
    assert lens == [32, 64] and doc["preset"] == "smoke"
    assert {(r["seq_len"], r["contender"]) for r in doc["rows"]} == {(t, c) for t in lens for c in CONTENDERS}
    on_gpu = doc["device"]["kind"] == "cuda"  # device=auto: the smoke preset runs on a GPU where there is one
    for r in doc["rows"]:
        assert r["status"] == "ok", r
        values = numbers(r)
        assert all(math.isfinite(v) and v > 0 for v in values.values()), r
        if r["contender"] in ("sinktrace", "eager"):
            assert {"e2e_s_per_ckpt", "forward_s", "forward_vs_sdpa", "e2e_vs_read", "peak_rss_bytes"} <= set(values)
        if r["contender"] == "layered":  # the streamed forward is the replay: no separate forward figure
            assert {"e2e_s_per_ckpt", "e2e_vs_eager", "e2e_vs_read", "peak_rss_bytes"} <= set(values)
            assert r["forward_s"] is None
        if r["contender"] == "sdpa":
            assert {"forward_s", "forward_vs_eager", "peak_rss_bytes"} <= set(values)
        if r["contender"] != "read":
            assert (r["peak_device_bytes"] is not None) == on_gpu
    read = doc["read_floor"]
    assert (
        read["status"] == "ok"
        and read["bytes_per_s"] > 0
        and read["bytes"] == 2 * doc["checkpoints"]["bytes_per_checkpoint"]
    )
    assert read["cache"]["method"] and "cold" in read["cache"]
    # sinktrace (both ways) and eager measured the same checkpoints and probe, so their statistics agree
    assert set(doc["agreement_with_eager"]) == {f"{c}@{t}" for c in ("sinktrace", "layered") for t in lens}
    for v in doc["agreement_with_eager"].values():
        assert v["max_abs_sink_mass"] < 1e-4 and v["max_abs_entropy"] < 1e-3
    assert doc["targets"] and all(t["judged"] == on_gpu for t in doc["targets"])  # judged on a GPU only
    # the replay's own phase times split its end-to-end time
    for t, c in ((t, c) for t in lens for c in ("sinktrace", "layered")):
        row = next(r for r in doc["rows"] if (r["seq_len"], r["contender"]) == (t, c))
        b = doc["details"][f"{c}@{t}"]["breakdown"]
        assert b["load_s"] > 0 and b["measure_s"] > 0 and b["other_s"] >= 0
        assert b["load_s"] + b["measure_s"] + b["other_s"] == pytest.approx(row["e2e_s_per_ckpt"])

    # the printed table: one line per contender and length, in the JSON's order
    table = [line for line in text.splitlines() if re.match(r"^\s*\d+\s+(\d+|-)\s+\S", line)]
    assert len(table) == len(doc["rows"])
    for line, r in zip(table, doc["rows"]):
        assert line.split()[0] == str(r["seq_len"]) and r["label"] in line
    assert "RSS GiB" in text and "dev GiB" in text
    assert ("GPU targets:" in text) if on_gpu else ("n/a" in text and "GPU targets: not judged on the CPU" in text)

    # a second run reuses the checkpoints
    again = compose(["preset=smoke", f"out={tmp_path / 'again.json'}", "contenders=[sdpa]", "probe.seq_lens=[32]"])
    assert run_bench(again) == 0
    assert json.loads((tmp_path / "again.json").read_text())["checkpoints"]["root"] == doc["checkpoints"]["root"]


def test_eager_over_its_memory_budget_is_skipped_with_the_memory_it_would_need(tmp_path, capsys):
    cfg = compose(
        [
            "preset=smoke",
            "contenders=[eager]",
            "probe.seq_lens=[64]",
            "eager_budget_gib=0.0001",
            f"out={tmp_path / 'b.json'}",
        ]
    )
    assert run_bench(cfg) == 0
    (row,) = [r for r in json.loads((tmp_path / "b.json").read_text())["rows"] if r["contender"] == "eager"]
    assert row["status"] == "skipped"
    assert re.search(r"skipped: would need [\d.]+ GiB", row["note"])
    assert "skipped: would need" in capsys.readouterr().out


@pytest.mark.slow
def test_contenders_in_their_own_subprocesses(tmp_path):
    """isolate=length: each contender and length in a fresh worker process, peaks from that process."""
    cfg = compose(
        ["preset=smoke", "isolate=length", "contenders=[sdpa]", "probe.seq_lens=[32]", f"out={tmp_path / 'b.json'}"]
    )
    assert run_bench(cfg) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    (row,) = [r for r in doc["rows"] if r["contender"] == "sdpa"]
    assert row["status"] == "ok" and row["forward_s"] > 0 and row["peak_rss_bytes"] > 0
    assert doc["read_floor"]["status"] == "ok"


def test_usage_errors_are_one_line(capsys):
    assert run_bench(compose(["preset=smoke", "isolate=threads"])) == 2
    assert "isolate='threads'" in capsys.readouterr().err
    if not resolve_device("auto").startswith("cuda"):
        # the default preset is a 1B model for a GPU: on the CPU it says what to run instead
        assert run_bench(compose([])) == 2
        assert "bench_preset=cpu" in capsys.readouterr().err


def test_presets_compose():
    gpu, cpu, smoke = (compose(o) for o in ([], ["preset=cpu"], ["bench_preset=smoke"]))
    assert gpu.model.hidden_size == 2048 and gpu.dtype == "bfloat16" and gpu.checkpoints.count >= 8
    assert list(gpu.probe.seq_lens) == [512, 2048, 8192, 32768]
    assert 1e9 < param_count(gpu.model) < 1.5e9
    assert list(cpu.probe.seq_lens) == [128, 512, 2048] and cpu.allow_cpu
    assert smoke.isolate == "none"
    # a command-line override wins over the preset
    assert compose(["preset=cpu", "checkpoints.count=2"]).checkpoints.count == 2


def test_page_cache_drop_and_residency(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 20))
    before = resident_fraction([str(f)])
    if before is None:
        pytest.skip("no mincore here")
    assert before > 0.9  # just written
    info = drop_page_cache([str(f)], "fadvise")
    assert info["method"] == "posix_fadvise(DONTNEED)"
    assert info["resident_after"] < 0.05 and info["cold"] is True
    read = read_floor([str(f)], "fadvise")
    assert read["bytes"] == 1 << 20 and read["bytes_per_s"] > 0
    assert drop_page_cache([str(f)], "off")["cold"] is False


def test_eager_memory_estimate():
    one = eager_attention_bytes(4, 8, 2048, 2, 4)
    # 4 layers of (2, 8, 2048, 2048) float32 matrices kept for the output, and more in flight
    assert 4 * 2 * 8 * 2048**2 * 4 < one < 3 * 4 * 2 * 8 * 2048**2 * 4
    assert eager_attention_bytes(4, 8, 4096, 2, 4) > 3.9 * one


def test_oom_is_recognised():
    import torch

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_peers_in_their_own_processes_agree_with_eager(tmp_path, sinktrace_home):
    """sinktrace's command and the plain transformers script, each a whole process, over the same checkpoints
    and probe as the eager contender; TransformerLens, where not installed, is skipped with the reason."""
    cfg = compose(
        [
            "preset=smoke",
            "contenders=[eager]",
            "probe.seq_lens=[64]",
            "peers.contenders=[sinktrace,transformers,transformer_lens]",
            "peers.seq_lens=[64]",
            "peers.venv=" + str(tmp_path / "no-venv"),
            "small_run.enabled=true",
            "small_run.seq_len=32",
            "small_run.rows=2",
            f"out={tmp_path / 'b.json'}",
        ]
    )
    assert run_bench(cfg) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    peers = {r["contender"]: r for r in doc["peers"]}
    assert set(peers) == {"sinktrace", "transformers", "transformer_lens"}
    for name in ("sinktrace", "transformers"):
        r = peers[name]
        assert r["status"] == "ok" and r["checkpoints"] == 2, r
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_bytes"] > 50 * 2**20
        assert r["max_abs_sink_mass_vs_eager"] < 1e-4
    # the transformers script is the only other peer that ran: the fastest and the leanest
    assert peers["transformers"]["wall_vs_fastest_peer"] == 1.0 and peers["transformers"]["rss_vs_leanest_peer"] == 1.0
    assert peers["sinktrace"]["wall_vs_fastest_peer"] == pytest.approx(
        peers["sinktrace"]["wall_s"] / peers["transformers"]["wall_s"]
    )
    tl = peers["transformer_lens"]
    if tl["status"] == "skipped":
        assert "transformer_lens is not installed" in tl["note"] and "python -m benchmarks.peers" in tl["note"]
    else:
        assert tl["status"] == "ok" and tl["max_abs_sink_mass_vs_eager"] < 1e-4
    small = {r["contender"]: r for r in doc["small_run"]}
    assert set(small) == {"sinktrace", "transformers"} and all(r["status"] == "ok" for r in small.values())
    assert small["sinktrace"]["checkpoints"] == 1
    # the small run's sinktrace agrees with the transformers script on the same checkpoint
    assert small["sinktrace"]["max_abs_sink_mass_vs_eager"] < 1e-4
    (target,) = [t for t in doc["targets"] if t["target"].startswith("small run")]
    ratio = small["sinktrace"]["wall_s"] / small["transformers"]["wall_s"]
    assert target["judged"] and target["value"] == pytest.approx(ratio)
    # sinktrace alone, then two at once on one machine (each takes the lock of its own store)
    c = doc["concurrent_runs"]
    assert c["status"] == "ok" and c["alone_s"] > 0 and len(c["together_s"]) == 2
    assert c["ratio"] == pytest.approx(max(c["together_s"]) / c["alone_s"])
    (target,) = [t for t in doc["targets"] if t["target"].startswith("two sinktrace runs at once")]
    assert target["judged"] and target["value"] == pytest.approx(c["ratio"])


def test_median_run_of_repeated_processes():
    rows = [
        {"status": "ok", "wall_s": 9.0, "cpu_s": 8.0},
        {"status": "ok", "wall_s": 7.0, "cpu_s": 6.5},
        {"status": "ok", "wall_s": 8.0, "cpu_s": 7.5},
    ]
    assert median_run(rows) == {"status": "ok", "wall_s": 8.0, "cpu_s": 7.5, "runs_wall_s": [9.0, 7.0, 8.0]}
    failed = {"status": "error", "wall_s": 1.0, "cpu_s": 1.0, "note": "exit status 1"}
    assert median_run([rows[0], failed, rows[1]]) is failed
    assert median_run(rows[:1]) is rows[0]
