"""Public training suites: a Hub repository's step revisions replayed through `hf://`, with the real
`huggingface_hub` client against a Hub on the loopback address (tests/hub_server.py). No test leaves the machine."""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import xarray as xr

import pipeline
from pipeline.checkpoints import hub as hubmod
from pipeline.checkpoints.hub import BUILTIN_PATTERNS, parse_revision
from pipeline.cli import compose, run
from tests.ckpt_factory import save_checkpoint
from tests.hub_server import FakeHub

TOKENS_PATTERN = r"step(?P<step>\d+)-tokens(?P<tokens>\d+)"
GROUP = "random-T16-r4-s0-bos"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own."""
    from huggingface_hub import constants

    folder = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return folder


@pytest.fixture
def hub(cache, monkeypatch):
    server = FakeHub().start()
    server.patch_client(monkeypatch)
    monkeypatch.setattr(hubmod, "RETRY_WAIT", 0.01)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_revisions(tmp_path_factory):
    """Three tiny checkpoint folders of different weights: {step: folder}."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        step: save_checkpoint(root / f"step{step}", step=step, seed=step, trainer_state=False)[0]
        for step in (0, 10, 20)
    }


def publish(hub, repo, folders: dict, name="step{step}"):
    for step, folder in folders.items():
        files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
        hub.add(repo, name.format(step=step), files)


def hub_cfg(root, store, *extra):
    return compose(
        [
            f"checkpoints.root={root}",
            f"store.path={store}",
            "stages=[replay]",
            "probe.rows=4",
            "probe.seq_len=16",
            *extra,
        ]
    )


def folder_store(folders: dict, tmp_path):
    """The same checkpoints replayed from local step folders: what every Hub replay must equal."""
    root = tmp_path / "folders"
    root.mkdir(exist_ok=True)
    for step, folder in folders.items():
        if not (root / f"step{step}").exists():
            shutil.copytree(folder, root / f"step{step}")
    store = tmp_path / "folders.zarr"
    if not store.exists():
        assert run(hub_cfg(root, store, "checkpoints.quiet_seconds=0")) == 0
    return pipeline.open_sinks(str(store), GROUP).load()


def blobs(cache, repo):
    folder = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_revision_names_give_steps_and_tokens():
    assert parse_revision("step143000", BUILTIN_PATTERNS) == (143000, None)  # Pythia
    assert parse_revision("stage1-step1000-tokens5B", BUILTIN_PATTERNS) == (1000, 5 * 10**9)  # OLMo 2
    assert parse_revision("step1000-tokens4B", BUILTIN_PATTERNS) == (1000, 4 * 10**9)  # OLMo 1
    assert parse_revision("step20-tokens84M", BUILTIN_PATTERNS) == (20, 84 * 10**6)
    for other in ("main", "stage2-ingredient1-step1000-tokens5B", "step12a", "v1.0"):
        assert parse_revision(other, BUILTIN_PATTERNS) is None, other
    assert parse_revision("ckpt-7-seen-900", [r"ckpt-(?P<step>\d+)-seen-(?P<tokens>\d+)"]) == (7, 900)


def test_discovery_lists_step_revisions_and_says_why_others_are_skipped(tiny_revisions, hub, caplog):
    from pipeline.checkpoints.hub import HubRun

    files = {n: (tiny_revisions[0] / n).read_bytes() for n in ("config.json", "model.safetensors")}
    hub.add("org/suite", "stage1-step0-tokens0B", files)
    hub.add("org/suite", "stage1-step1000-tokens4B", files | {"model.safetensors": b"other"})
    hub.add("org/suite", "step1000", files)  # a second name for step 1000
    hub.add("org/suite", "stage1-step2000-tokens8B", {"config.json": files["config.json"]})
    hub.add("org/suite", "main", files)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints.hub"):
        found = HubRun("hf://org/suite", compose().checkpoints).discover()
    assert "skipped 1 revision(s) whose names match no revision pattern: main" in caplog.text
    assert [(c.step, c.tokens_seen, c.complete) for c in found] == [
        (0, 0, True),
        (1000, 4 * 10**9, False),
        (2000, 8 * 10**9, False),
    ]
    assert "stage1-step1000-tokens4B, step1000 all claim step 1000" in found[1].reason
    assert "no weights" in found[2].reason and "revision stage1-step2000-tokens8B" in found[2].reason
    assert found[0].path.endswith(hub.commits[("org/suite", "stage1-step0-tokens0B")])

    # replay.steps: only those revisions are looked into
    assert [c.step for c in HubRun("hf://org/suite", compose().checkpoints).discover([2000])] == [2000]

    # a pattern of one's own: only the stage 1 names, so step 1000 is no longer claimed twice
    custom = compose(["checkpoints.revision_pattern='stage1-step(?P<step>\\d+)-tokens(?P<tokens>\\d+B)'"])
    found = HubRun("hf://org/suite", custom.checkpoints).discover()
    assert [(c.step, c.tokens_seen, c.complete) for c in found] == [
        (0, 0, True),
        (1000, 4 * 10**9, True),
        (2000, 8 * 10**9, False),
    ]


@pytest.mark.slow
def test_demo_run_published_on_the_hub_replays_into_the_folder_replays_store(trained_run, hub, cache, tmp_path):
    """One revision per checkpoint of the demo run, named with its step and tokens; through hf:// the store holds
    what the folder replay stores, and the steps' revisions and commits."""
    for folder in sorted(trained_run.glob("checkpoint-*")):
        state = json.loads((folder / "trainer_state.json").read_text())
        hub.add_folder("demo/run", f"step{state['global_step']}-tokens{state['num_input_tokens_seen']}", folder)
    hub.add("demo/run", "main", {"README.md": b"the demo run"})

    reference = tmp_path / "folder.zarr"
    assert run(hub_cfg(trained_run, reference, "checkpoints.quiet_seconds=0")) == 0
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://demo/run", store, f"checkpoints.revision_pattern='{TOKENS_PATTERN}'")) == 0

    a = pipeline.open_sinks(str(reference), GROUP).load()
    b = pipeline.open_sinks(str(store), GROUP).load()
    # a Hub revision carries config and weights only, not the trainer's log: its training loss is unknown
    assert np.isnan(b["loss"].values).all()
    xr.testing.assert_identical(a.drop_attrs().drop_vars("loss"), b.drop_attrs().drop_vars("loss"))
    assert list(b.status.values) == ["done"] * 4 and np.isfinite(b.tokens_seen).all()
    provenance = b.attrs["checkpoint_provenance"]
    assert sorted(provenance, key=int) == ["0", "50", "100", "150"]
    for step, folder in ((0, "checkpoint-0"), (150, "checkpoint-150")):
        p = provenance[str(step)]
        assert p["repository"] == "demo/run" and p["revision"].startswith(f"step{step}-tokens")
        assert p["commit"] == hub.commits[("demo/run", p["revision"])]
        sha = hashlib.sha256((trained_run / folder / "model.safetensors").read_bytes()).hexdigest()
        assert p["weights_sha256"] == hashlib.sha256(f"model.safetensors:{sha}\n".encode()).hexdigest()
    # config and safetensors only (no optimizer state, no trainer state), each once, and none kept afterwards
    assert {name for _, name in hub.served} == {"config.json", "model.safetensors"}
    assert sum(name == "model.safetensors" for _, name in hub.served) == 4
    assert blobs(cache, "demo/run") == []
    # the refs stay: a later offline run knows which commit each revision is
    assert len(list((cache / "models--demo--run" / "refs").iterdir())) == 4

    # a rerun resumes: nothing left to fetch
    hub.served.clear()
    assert run(hub_cfg("hf://demo/run", store, f"checkpoints.revision_pattern='{TOKENS_PATTERN}'")) == 0
    assert [name for _, name in hub.served if name != "config.json"] == []


@pytest.mark.slow
def test_cache_limit_below_two_checkpoints_fetches_one_at_a_time(tiny_revisions, hub, cache, tmp_path):
    publish(hub, "org/tiny", tiny_revisions)
    one = sum((tiny_revisions[0] / n).stat().st_size for n in ("config.json", "model.safetensors"))
    held = []
    hub.on_get = lambda rev, name: held.append(
        sum(
            (cache / "models--org--tiny" / "blobs" / b).stat().st_size
            for b in blobs(cache, "org/tiny")
            if not b.endswith(".incomplete")
        )
    )
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://org/tiny", store, f"checkpoints.cache_limit={int(1.5 * one)}")) == 0
    # never more than one checkpoint on disk when the next one's download starts
    assert len(held) >= 3 and max(held) <= one, (held, one)
    xr.testing.assert_identical(
        pipeline.open_sinks(str(store), GROUP).load().drop_attrs(), folder_store(tiny_revisions, tmp_path).drop_attrs()
    )
    assert blobs(cache, "org/tiny") == []

    # keep_downloads: every revision stays in the cache
    assert run(hub_cfg("hf://org/tiny", store, "replay.overwrite=true", "checkpoints.keep_downloads=true")) == 0
    assert len([b for b in blobs(cache, "org/tiny") if len(b) == 64]) == 3  # the three weight files (sha256)


@pytest.mark.slow
def test_two_revisions_with_the_same_weights_are_flagged(tiny_revisions, hub, cache, tmp_path, caplog):
    publish(hub, "org/tiny", {0: tiny_revisions[0], 10: tiny_revisions[0]})
    # step 20 sharded: the index, then the shards it lists
    sharded, _ = save_checkpoint(tmp_path / "sharded", seed=20, sharded=True, trainer_state=False)
    hub.add_folder("org/tiny", "step20", sharded)
    store = tmp_path / "hub.zarr"
    # on a Dask cluster of two workers: each checkpoint is submitted once fetched
    dask = ["cluster=processes", "cluster.n_workers=2"]
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints.hub"):
        assert run(hub_cfg("hf://org/tiny", store, *dask)) == 0
    assert "steps 0, 10 (revisions step0, step10) serve the same weights" in caplog.text
    ds = pipeline.open_sinks(str(store), GROUP).load()
    provenance = ds.attrs["checkpoint_provenance"]
    assert provenance["0"]["same_weights_as"] == [10] and provenance["10"]["same_weights_as"] == [0]
    assert "same_weights_as" not in provenance["20"]
    assert provenance["0"]["weights_sha256"] == provenance["10"]["weights_sha256"]
    assert provenance["0"]["commit"] != provenance["10"]["commit"]
    # both replayed (the same numbers, as they must be), and the shared blob freed once neither needs it
    assert list(ds.status.values) == ["done"] * 3
    xr.testing.assert_equal(ds.sink_mass.sel(step=0, drop=True), ds.sink_mass.sel(step=10, drop=True))
    assert blobs(cache, "org/tiny") == []
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(n for r, n in hub.served if r == "step20" and n.startswith("model-")) == shards
    reference = folder_store(tiny_revisions, tmp_path)
    xr.testing.assert_identical(ds.sel(step=[0, 20]).drop_attrs(), reference.sel(step=[0, 20]).drop_attrs())


@pytest.mark.slow
def test_download_killed_mid_file_leaves_nothing_trusted_and_the_rerun_completes(tiny_revisions, hub, cache, tmp_path):
    publish(hub, "org/tiny", tiny_revisions)
    hub.stall_on = ("step10", "model.safetensors")
    store = tmp_path / "hub.zarr"
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "checkpoints.root=hf://org/tiny",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=4",
        "probe.seq_len=16",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(240), "the download never started"
        partial = [b for b in blobs(cache, "org/tiny") if b.endswith(".incomplete")]
        assert len(partial) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    hub.stall_on = None
    hub.release_stall.set()
    sha = hashlib.sha256((tiny_revisions[10] / "model.safetensors").read_bytes()).hexdigest()
    # the half file is not the blob: no later run can take it for the weights
    assert sha not in blobs(cache, "org/tiny")
    assert (cache / "models--org--tiny" / "blobs" / partial[0]).stat().st_size < (
        tiny_revisions[10] / "model.safetensors"
    ).stat().st_size
    old = time.time() - 3600
    os.utime(cache / "models--org--tiny" / "blobs" / partial[0], (old, old))

    assert run(hub_cfg("hf://org/tiny", store)) == 0  # the rerun, in this process
    xr.testing.assert_identical(
        pipeline.open_sinks(str(store), GROUP).load().drop_attrs(), folder_store(tiny_revisions, tmp_path).drop_attrs()
    )
    assert blobs(cache, "org/tiny") == []  # the leftover partial file included


def test_network_error_fails_only_that_step_and_a_rerun_retries_it(tiny_revisions, hub, cache, tmp_path, capsys):
    publish(hub, "org/tiny", tiny_revisions)
    hub.fail_on = ("step10", "model.safetensors")
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://org/tiny", store)) == 1
    err = capsys.readouterr().err
    assert "step 10" in err and "hf://org/tiny@step10/model.safetensors" in err and "download failed 3 times" in err
    ds = pipeline.open_sinks(str(store), GROUP)
    assert list(ds.status.values) == ["done", "failed", "done"]
    assert hub.served.count(("step10", "model.safetensors")) >= 3
    assert blobs(cache, "org/tiny") == []

    hub.fail_on = None
    assert run(hub_cfg("hf://org/tiny", store)) == 0
    xr.testing.assert_identical(
        pipeline.open_sinks(str(store), GROUP).load().drop_attrs(), folder_store(tiny_revisions, tmp_path).drop_attrs()
    )


def build_cache(cache, repo, revisions: dict):
    """The Hugging Face cache layout (huggingface_hub's file_download.py: `models--<org>--<name>/refs/<revision>`
    holds the commit, `snapshots/<commit>/<file>` links to `blobs/<etag>`), written without the client."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    for name, (commit, files) in revisions.items():
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / name).write_text(commit)
        snapshot = storage / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for file, data in files.items():
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            if not (snapshot / file).exists():  # two refs of one commit share its snapshot
                (snapshot / file).symlink_to(os.path.relpath(blob, snapshot))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_replays_the_cached_revisions_and_reports_the_missing(
    tiny_revisions, cache, tmp_path, capsys, monkeypatch, how
):
    from huggingface_hub import constants

    files = {
        s: {n: (f / n).read_bytes() for n in ("config.json", "model.safetensors")} for s, f in tiny_revisions.items()
    }
    build_cache(
        cache,
        "org/tiny",
        {
            "step0": ("a" * 40, files[0]),
            "step10": ("b" * 40, {"config.json": files[10]["config.json"]}),  # its weights were never fetched
            "step20": ("c" * 40, files[20]),
            "main": ("c" * 40, files[20]),
        },
    )
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:  # nothing listens there
        FakeHub.patch_client(type("Dead", (), {"endpoint": "http://127.0.0.1:9"})(), monkeypatch)
    before = blobs(cache, "org/tiny")
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://org/tiny", store)) == 0
    out = capsys.readouterr().out
    assert "3 checkpoint(s), 2 ready, 1 not yet" in out
    assert "skipped step 10" in out and "revision step10" in out and "not in the local Hugging Face cache" in out
    ds = pipeline.open_sinks(str(store), GROUP).load()
    reference = folder_store(tiny_revisions, tmp_path)
    xr.testing.assert_identical(ds.drop_attrs(), reference.sel(step=[0, 20]).drop_attrs())
    assert ds.attrs["checkpoint_provenance"]["20"]["commit"] == "c" * 40
    assert blobs(cache, "org/tiny") == before  # files the run did not fetch are never deleted


def test_pickled_revision_is_skipped_unless_allowed_then_read_with_weights_only(
    tiny_revisions, hub, cache, tmp_path, capsys
):
    from safetensors.torch import load_file

    state = load_file(tiny_revisions[10] / "model.safetensors")
    pickled = tmp_path / "pytorch_model.bin"
    torch.save(state, pickled)
    publish(hub, "org/tiny", {0: tiny_revisions[0]})
    hub.add(
        "org/tiny",
        "step10",
        {"config.json": (tiny_revisions[10] / "config.json").read_bytes(), "pytorch_model.bin": pickled.read_bytes()},
    )
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://org/tiny", store)) == 0
    out = capsys.readouterr().out
    assert "skipped step 10" in out and "pytorch_model.bin" in out and "checkpoints.allow_torch_pickle=true" in out
    assert ("step10", "pytorch_model.bin") not in hub.served

    assert run(hub_cfg("hf://org/tiny", store, "checkpoints.allow_torch_pickle=true")) == 0
    ds = pipeline.open_sinks(str(store), GROUP).load()
    reference = folder_store(tiny_revisions, tmp_path)
    xr.testing.assert_identical(ds.sel(step=10).drop_attrs(), reference.sel(step=10).drop_attrs())
    # the pickles and their safetensors copy are gone once the step is stored
    converted = tmp_path / "sinktrace-home" / "hub" / "models--org--tiny" / "converted"
    assert blobs(cache, "org/tiny") == [] and not any(converted.iterdir())


def test_a_repository_that_does_not_exist_or_has_no_step_revision_is_a_usage_error(hub, tmp_path, capsys):
    hub.add("org/other", "main", {"config.json": b"{}"})
    hub.add("org/other", "v1.0", {"config.json": b"{}"})
    for root, extra, words in (
        ("hf://org/nope", [], "no model repository org/nope"),
        ("hf://org/other", [], "none named like a step"),
        ("hf://org/other", ["checkpoints.revision_pattern='v(?P<major>\\d+)'"], "no named group (?P<step>"),
        ("hf://just-a-name", [], "hf://<org>/<name>"),
    ):
        assert run(hub_cfg(root, tmp_path / "s.zarr", *extra)) == 2, root
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("sinktrace: error:")]
        assert words in line and "Traceback" not in err, err


# A hostile or broken endpoint: nothing outside the caches is touched, and no wait is unbounded.

FAST = ["checkpoints.request_timeout=2", "checkpoints.download_timeout=8"]


@pytest.mark.parametrize("keep", [False, True])
def test_an_etag_naming_a_path_outside_the_cache_is_never_used(tiny_revisions, hub, cache, tmp_path, keep):
    publish(hub, "org/tiny", tiny_revisions)
    victim = tmp_path / "x" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("the user's file")
    # blobs/<etag> with this etag is tmp_path/x/victim.txt
    hub.etags[("step10", "model.safetensors")] = '"../../../x/victim.txt"'
    store = tmp_path / "hub.zarr"
    status = run(hub_cfg("hf://org/tiny", store, f"checkpoints.keep_downloads={str(keep).lower()}"))
    assert victim.read_text() == "the user's file"
    assert status == 0
    # the weights are stored under the sha256 the listing gave, and checked against it
    sha = hashlib.sha256((tiny_revisions[10] / "model.safetensors").read_bytes()).hexdigest()
    assert (sha in blobs(cache, "org/tiny")) == keep
    xr.testing.assert_identical(
        pipeline.open_sinks(str(store), GROUP).load().drop_attrs(), folder_store(tiny_revisions, tmp_path).drop_attrs()
    )


def test_a_commit_id_that_is_not_a_commit_is_refused(tiny_revisions, hub, cache, tmp_path, caplog):
    from safetensors.torch import load_file

    pickled = tmp_path / "pytorch_model.bin"
    torch.save(load_file(tiny_revisions[10] / "model.safetensors"), pickled)
    publish(hub, "org/tiny", {0: tiny_revisions[0]})
    config = (tiny_revisions[10] / "config.json").read_bytes()
    hub.add("org/tiny", "step10", {"config.json": config, "pytorch_model.bin": pickled.read_bytes()})
    # the converted copy's folder, converted/<commit>, would be tmp_path/victim
    hub.commits[("org/tiny", "step10")] = "../../../../victim"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("the user's notes")
    store = tmp_path / "hub.zarr"
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints.hub"):
        status = run(hub_cfg("hf://org/tiny", store, "checkpoints.allow_torch_pickle=true"))
    assert (victim / "notes.txt").read_text() == "the user's notes" and os.listdir(victim) == ["notes.txt"]
    assert status == 0
    assert "revision step10: the Hub gives its commit as '../../../../victim', not 40 hex digits" in caplog.text
    assert list(pipeline.open_sinks(str(store), GROUP).step.values) == [0]
    assert blobs(cache, "org/tiny") == []


def test_weights_that_differ_from_the_listed_sha256_fail_their_step(tiny_revisions, hub, cache, tmp_path, capsys):
    publish(hub, "org/tiny", tiny_revisions)
    # step 10's download is redirected to step 20's weights (the same size)
    hub.redirects[("step10", "model.safetensors")] = (tiny_revisions[20] / "model.safetensors").read_bytes()
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://org/tiny", store)) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("  step 10:")]
    sha = hashlib.sha256((tiny_revisions[10] / "model.safetensors").read_bytes()).hexdigest()
    assert "hf://org/tiny@step10/model.safetensors" in line and f"not the {sha} the listing gave" in line
    assert list(pipeline.open_sinks(str(store), GROUP).status.values) == ["done", "failed", "done"]
    assert hub.served.count(("step10", "model.safetensors")) == 1  # not retried: the same bytes would come again
    assert blobs(cache, "org/tiny") == []


def test_sizes_understated_by_the_listing_never_fill_the_disk_past_the_cache_limit(
    tiny_revisions, hub, cache, tmp_path, capsys
):
    publish(hub, "org/tiny", tiny_revisions)
    hub.listed_size = 1000  # each weights file is 100 KB
    on_disk = []

    def measure(rev, name):  # the bytes in the cache when each download starts, partial downloads included
        total = 0
        for path in (cache / "models--org--tiny" / "blobs").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a partial download removed meanwhile
                total += path.stat().st_size
        on_disk.append(total)

    hub.on_get = measure
    store = tmp_path / "hub.zarr"
    assert run(hub_cfg("hf://org/tiny", store, "checkpoints.cache_limit=10KB")) == 1
    # one config.json (the three revisions share it) and three weights files were requested
    assert max(on_disk) <= 10_000 and len(on_disk) == 4, on_disk
    err = capsys.readouterr().err
    for step in (0, 10, 20):
        (line,) = [line for line in err.splitlines() if line.startswith(f"  step {step}:")]
        assert "model.safetensors: the Hub sent more than the 1000 bytes its listing gave" in line
    assert blobs(cache, "org/tiny") == []


def test_a_revision_listing_that_hangs_fails_the_run_in_one_line(hub, tmp_path, capsys):
    hub.add("org/tiny", "step0", {"config.json": b"{}"})
    hub.hang = {"refs"}
    start = time.monotonic()
    assert run(hub_cfg("hf://org/tiny", tmp_path / "hub.zarr", *FAST)) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert (
        "sinktrace: error: checkpoints.root=hf://org/tiny: the Hub sent no list of revisions within "
        "checkpoints.request_timeout=2 s" in err
    )
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_ends_the_run_at_once_while_a_file_listing_hangs(tiny_revisions, hub, cache, tmp_path):
    publish(hub, "org/tiny", tiny_revisions)
    hub.hang = {"tree"}
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}
    args = [sys.executable, "-m", "pipeline", "checkpoints.root=hf://org/tiny", f"store.path={tmp_path / 'hub.zarr'}"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.hanging.wait(120), "the listing never started"
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 5
        assert "interrupted by SIGTERM" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.slow
def test_download_headers_that_hang_fail_the_step_within_the_request_timeout(tiny_revisions, hub, tmp_path, capsys):
    publish(hub, "org/tiny", tiny_revisions)
    hub.hang = {"resolve/step10"}
    start = time.monotonic()
    assert run(hub_cfg("hf://org/tiny", tmp_path / "hub.zarr", *FAST)) == 1
    assert time.monotonic() - start < 25
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("  step 10:")]
    assert "hf://org/tiny@step10/model.safetensors" in line and "download failed 3 times, last: ReadTimeout" in line
    assert list(pipeline.open_sinks(str(tmp_path / "hub.zarr"), GROUP).status.values) == ["done", "failed", "done"]


@pytest.mark.slow
def test_a_download_that_trickles_fails_at_the_download_deadline(tiny_revisions, hub, cache, tmp_path, capsys):
    publish(hub, "org/tiny", tiny_revisions)
    hub.trickle_on = ("step10", "model.safetensors")
    start = time.monotonic()
    assert run(hub_cfg("hf://org/tiny", tmp_path / "hub.zarr", *FAST)) == 1
    assert time.monotonic() - start < 25
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("  step 10:")]
    assert "hf://org/tiny@step10/model.safetensors: not downloaded within checkpoints.download_timeout=8 s" in line
    assert list(pipeline.open_sinks(str(tmp_path / "hub.zarr"), GROUP).status.values) == ["done", "failed", "done"]
    assert blobs(cache, "org/tiny") == []


def test_a_step_beyond_int64_is_skipped_with_a_warning(tiny_revisions, hub, tmp_path, caplog):
    publish(hub, "org/tiny", {0: tiny_revisions[0]})
    publish(hub, "org/tiny", {10: tiny_revisions[10]}, name="step99999999999999999999999")
    store = tmp_path / "hub.zarr"
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoints.hub"):
        assert run(hub_cfg("hf://org/tiny", store)) == 0
    assert "skipped revision step99999999999999999999999: its step does not fit in 64 bits" in caplog.text
    assert list(pipeline.open_sinks(str(store), GROUP).step.values) == [0]


def test_a_journal_entry_outside_the_caches_is_never_deleted(tiny_revisions, hub, tmp_path, sinktrace_home):
    """What a killed run fetched is deleted by the next one (fetched.json), but only inside the caches."""
    publish(hub, "org/tiny", {0: tiny_revisions[0]})
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    journal = sinktrace_home / "hub" / "models--org--tiny" / "fetched.json"
    journal.parent.mkdir(parents=True)
    journal.write_text(json.dumps([str(victim)]))
    assert run(hub_cfg("hf://org/tiny", tmp_path / "hub.zarr")) == 0
    assert victim.read_text() == "the user's file"
    assert not journal.exists()
