"""Tensors read from object storage with several requests in flight: on a bucket whose every request waits a round
trip (an S3-compatible server, moto's, behind benchmarks/latency_proxy.py on 127.0.0.1), many requests at once take a
fraction of the time of one after another, and give the same tensors."""

import time

import pytest
import torch
from safetensors.torch import save_file

from pipeline.checkpoints.byteranges import ReadPlan
from pipeline.checkpoints.safetensorsfile import SafetensorsFile

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "sinktrace-inflight"
LATENCY = 0.1  # seconds a request waits in the proxy: a distant bucket's time to first byte
TENSORS = 48


@pytest.fixture(scope="module")
def store():
    from benchmarks.latency_proxy import object_store

    with object_store(LATENCY, BUCKET) as (proxy, direct):
        yield proxy, direct


def each_its_own_request(concurrency: int) -> ReadPlan:
    """No two tensors merged: each is a request, as the large tensors of a real checkpoint are."""
    return ReadPlan(concurrency=concurrency, gap=0, max_request=0)


@pytest.mark.slow
def test_requests_in_flight_beat_one_at_a_time_and_read_the_same(store, tmp_path):
    proxy, direct = store
    tensors = {f"model.layers.{i}.weight": torch.randn(64, 16) for i in range(TENSORS)}
    save_file(tensors, tmp_path / "model.safetensors")
    direct.put(str(tmp_path / "model.safetensors"), f"{BUCKET}/c/model.safetensors")
    f = SafetensorsFile(f"s3://{BUCKET}/c/model.safetensors")
    f.read_many(list(tensors)[:2], each_its_own_request(16))  # the connection pool's first connections

    took, got, peak = {}, {}, {}
    for concurrency in (1, 16):
        proxy.reset()
        start = time.perf_counter()
        got[concurrency] = f.read_many(list(tensors), each_its_own_request(concurrency))
        took[concurrency] = time.perf_counter() - start
        assert proxy.requests == TENSORS
        peak[concurrency] = proxy.peak

    for name, t in tensors.items():
        assert torch.equal(got[1][name], t) and torch.equal(got[16][name], t), name
    # more than botocore's default pool of 10 connections: the pool is made as large as the plan asks
    assert peak == {1: 1, 16: 16}
    # one at a time waits TENSORS round trips (4.8 s and more); 16 at once, 3 of them plus the requests' CPU time
    assert took[1] >= TENSORS * LATENCY
    assert took[1] > 3 * took[16], took


def test_the_digest_of_a_bucket_file_equals_the_local_one(store, tmp_path):
    from pipeline.checkpoints.digest import start_digest, weights_digest

    _, direct = store
    tensors = {f"w{i}": torch.randn(8, 8) for i in range(5)} | {"empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "model.safetensors")
    direct.put(str(tmp_path / "model.safetensors"), f"{BUCKET}/d/model.safetensors")
    local = weights_digest([str(tmp_path / "model.safetensors")])
    assert weights_digest([f"s3://{BUCKET}/d/model.safetensors"]) == local  # every tensor read for it alone
    f = SafetensorsFile(f"s3://{BUCKET}/d/model.safetensors", ReadPlan(concurrency=4))
    pending = start_digest([f])
    f.read_many(["w1", "w3", "empty"])  # the others are read when the digest is asked for
    assert sorted(f.hashes) == ["empty", "w1", "w3"]
    assert pending.result() == local


def test_the_object_storage_benchmark_compares_every_way(tmp_path):
    from benchmarks.objectstore import bench, compose

    out = tmp_path / "objectstore.json"
    cfg = compose(["latency_ms=20", "tensors=12", "tensor_kib=4", "concurrency=[4]", "repeats=1", f"out={out}"])
    doc = bench(cfg)
    rows = {r["way"]: r for r in doc["rows"]}
    assert list(rows) == ["one at a time", "4 in flight", "sinktrace's plan (merged)", "whole file (get)"]
    assert [rows[w]["requests"] for w in rows] == [12, 12, 1, 1]
    assert rows["one at a time"]["latency_peak_in_flight"] == 1 and rows["4 in flight"]["latency_peak_in_flight"] == 4
    assert rows["one at a time"]["latency_s"] >= 12 * 0.02  # twelve round trips, one after another
    assert all(r["throughput_mb_s"] > 0 and r["ideal_mb_s"] > 0 for r in rows.values())
    assert out.exists() and doc["settings"]["file_bytes"] > 12 * 4096
