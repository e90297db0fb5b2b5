"""sinktrace: replay training checkpoints and trace how attention sinks form."""

from . import analysis  # noqa: F401  (registers the `ds.sinks` accessor)
from .version import __version__  # noqa: F401  (pipeline.__version__)


def open_sinks(path: str, group: str | None = None):
    """Open a sinktrace store: the probe group named as an xarray.Dataset; with no group, the whole store as an
    xarray.DataTree (one node per probe, however many there are)."""
    from .store import open_sinks as _open

    return _open(path, group)


def demo_store() -> str:
    """The demo run's store, building and replaying the demo run first if needed."""
    from .cli import checkpoint_root, compose, run, store_path

    cfg = compose(["stages=[replay]"])
    status = run(cfg)
    if status != 0:
        raise RuntimeError(f"replaying the demo run failed (exit status {status})")
    return store_path(cfg, checkpoint_root(cfg)[0])
