"""The Source interface (pipeline/checkpoints/sources.py) as the driver and the dispatcher use it, with a source
written here whose files arrive one checkpoint at a time and one of whose checkpoints cannot be had. The three real
sources run end to end elsewhere: a local folder in test_cli and test_live, an object-store prefix in
test_object_storage, a Hub repository in test_hub."""

from pipeline.checkpoints import sources
from pipeline.checkpoints.discover import discover
from pipeline.cli import compose, run
from pipeline.errors import CheckpointError
from pipeline.store.cube import open_sinks
from tests.ckpt_factory import make_run

STEPS = [0, 10, 20]
UNAVAILABLE = 10
GROUP = "random-T16-r4-s0-bos"  # the store group of the probe below


class Trickle:
    """A run's folder whose checkpoints' files come one at a time, each only when asked to wait for it, as a slow
    fetch would hand them over; step UNAVAILABLE never comes. It records what it was asked."""

    def __init__(self, root):
        self.root = str(root)
        self.calls: list = []
        self._queue: list = []

    def discover(self, steps=None):
        self.calls.append(("discover", steps))
        return discover(self.root, quiet_seconds=0)

    def with_config(self, ckpt):
        self.calls.append(("with_config", ckpt.step))
        return ckpt

    def start(self, todo):
        self.calls.append(("start", [c.step for c in todo]))
        self._queue = list(todo)

    def arrived(self, wait):
        if not wait or not self._queue:
            return []
        ckpt = self._queue.pop(0)
        error = CheckpointError(ckpt.path, "its files could not be fetched") if ckpt.step == UNAVAILABLE else None
        return [(ckpt, error)]

    def release(self, ckpt):
        self.calls.append(("release", ckpt.step))

    def gone(self, ckpt):
        self.calls.append(("gone", ckpt.step))
        return False

    def close(self):
        self.calls.append(("close",))


def test_open_source_gives_a_folder_for_paths_and_urls_and_a_hub_run_for_hf(tmp_path):
    from pipeline.checkpoints.hub import HubRun

    settings = compose().checkpoints
    for root in (str(tmp_path), "s3://bucket/run", "memory://run"):
        assert type(sources.open_source(root, settings, 0.0)) is sources.Folder
    assert type(sources.open_source("hf://org/suite", settings, 0.0)) is HubRun


def test_a_folder_source_has_every_file_at_once_and_tells_a_deleted_checkpoint(tmp_path):
    folders = make_run(tmp_path / "run", STEPS)
    source = sources.Folder(tmp_path / "run", compose().checkpoints, 0.0)
    found = source.discover()
    assert [(c.step, c.complete) for c in found] == [(s, True) for s in STEPS]
    assert source.with_config(found[0]) is found[0]
    source.start(found)
    assert source.arrived(wait=False) == [(c, None) for c in found]
    assert source.arrived(wait=False) == []
    assert not source.gone(found[1])
    for f in folders[STEPS[1]].iterdir():
        f.unlink()
    folders[STEPS[1]].rmdir()
    assert source.gone(found[1])


def test_the_driver_replays_what_a_source_hands_over_and_releases_each_step(tmp_path, monkeypatch):
    """In this process; test_hub runs a source whose files arrive over time on a Dask cluster."""
    make_run(tmp_path / "run", STEPS)
    trickle = Trickle(tmp_path / "run")
    monkeypatch.setattr(sources, "open_source", lambda root, settings, quiet: trickle)
    store = tmp_path / "s.zarr"
    args = [
        f"checkpoints.root={tmp_path / 'run'}",
        f"store.path={store}",
        "stages=[replay]",
        "probe.rows=4",
        "probe.seq_len=16",
    ]
    assert run(compose(args)) == 1  # one step failed

    ds = open_sinks(store, GROUP)
    assert list(ds.step.values) == STEPS
    assert list(ds.status.values) == ["done", "failed", "done"]
    assert "its files could not be fetched" in str(ds.error.sel(step=UNAVAILABLE).values)
    assert float(ds.sink_mass.sel(step=20).isnull().sum()) == 0
    assert trickle.calls == [
        ("discover", None),
        ("with_config", 0),
        ("start", STEPS),
        ("release", 0),
        ("gone", UNAVAILABLE),  # asked of a failure only
        ("release", UNAVAILABLE),
        ("release", 20),
        ("discover", None),  # the next round finds nothing new
        ("close",),
    ]
