"""The store's writer reads each metadata file once in its life, not once per re-open: on object storage every
read is a round trip."""

from __future__ import annotations

import collections

import pytest
import xarray as xr
from s3server import s3_fixture
from test_store import ATTRS, check_step, load, step_ds
from zarr.storage import FsspecStore, LocalStore

from pipeline.store.cube import SinkStore

s3 = s3_fixture("store-reads")
METADATA = ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")


@pytest.fixture
def reads(monkeypatch):
    """metadata key -> how many times a store read it, for LocalStore and FsspecStore alike."""
    counted = collections.Counter()
    for cls in (LocalStore, FsspecStore):
        original = cls.get

        async def get(self, key, *args, _original=original, **kwargs):
            if key.rpartition("/")[2] in METADATA:
                counted[key] += 1
            return await _original(self, key, *args, **kwargs)

        monkeypatch.setattr(cls, "get", get)
    return counted


def write_counting(path, reads) -> list[collections.Counter]:
    """Prepare four steps and write them; the metadata reads of the set-up, then of each step."""
    store = SinkStore(path, "random")
    store.prepare([1, 2, 3, 4], attrs=ATTRS)
    per_step = [collections.Counter(reads)]
    for step in (1, 2, 3, 4):
        reads.clear()
        store.write_step(step, step_ds(step))
        per_step.append(collections.Counter(reads))
    reads.clear()
    store.mark_failed(4, "a second thought")
    store.finalize()
    per_step.append(collections.Counter(reads))
    return per_step


def check_counts(per_step: list[collections.Counter]) -> None:
    setup, first, *later, end = per_step
    assert setup and max(setup.values()) == 1  # the set-up reads what it opens once
    assert not set(first) & set(setup)  # the first write reads only the arrays it creates
    assert later == [collections.Counter()] * 3  # a stored step reads no metadata at all
    assert end == collections.Counter()


def test_a_stored_step_reads_no_metadata_on_a_local_store(tmp_path, reads):
    path = tmp_path / "s.zarr"
    check_counts(write_counting(path, reads))
    ds = load(path)
    assert ds["status"].values.tolist() == ["done", "done", "done", "failed"]
    for step in (1, 2, 3, 4):
        check_step(ds, step)
    # a second writer reads the store afresh: what the first held was its own
    again = SinkStore(path, "random")
    reads.clear()
    assert again.status() == {1: "done", 2: "done", 3: "done", 4: "failed"}
    assert reads


@pytest.mark.slow
def test_a_stored_step_reads_no_metadata_on_s3(s3, reads, tmp_path):
    url = "s3://store-reads/s.zarr"
    check_counts(write_counting(url, reads))
    local = tmp_path / "s.zarr"
    check_counts(write_counting(local, reads))
    xr.testing.assert_identical(load(url), load(local))
