"""Where the replay tasks run: a Dask cluster built from the `cluster` config group, and the one writer.

Workers replay checkpoints and return a few kilobytes of statistics; the driver alone writes them into the
store, as they arrive. Each worker keeps the last model it built (a ModelCache it owns), so consecutive
checkpoints of one architecture reuse it.
"""

from __future__ import annotations

import logging

from distributed import WorkerPlugin

PLUGIN_NAME = "sinktrace-models"


class KeepModels(WorkerPlugin):
    """Gives every worker its own ModelCache, created on the worker when it joins."""

    name = PLUGIN_NAME

    def setup(self, worker) -> None:
        from .load import ModelCache

        self.models = ModelCache()

    def teardown(self, worker) -> None:
        self.models.clear()


def replay_on_worker(ckpt, probe, settings, read_next):
    from distributed import get_worker

    from .replay import replay

    return replay(ckpt, probe, settings, read_next, models=get_worker().plugins[PLUGIN_NAME].models)


def run_replays(cluster_cfg, todo, probe, settings, store, fingerprint) -> list[tuple[int, str]]:
    """Replay on Dask workers; the driver alone writes each result into the store as it arrives."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    failures = []
    if not todo:
        return failures
    client, cluster = connect(cluster_cfg)
    try:
        client.register_plugin(KeepModels())
        futures = {
            client.submit(replay_on_worker, c, probe, settings, nxt, key=f"replay-{probe.name}-{c.step}", pure=False): c
            for c, nxt in zip(todo, [*todo[1:], None])
        }
        with tqdm(total=len(futures), desc="replay", unit="ckpt") as bar:
            for future in as_completed(futures):
                ckpt = futures[future]
                try:
                    ds = future.result()
                    if ds.attrs.get("config_fingerprint") != fingerprint:
                        raise ValueError(
                            f"{ckpt.path}/config.json describes another architecture than the run's first checkpoint"
                        )
                    store.write_step(ckpt.step, ds)
                except Exception as e:  # one bad checkpoint must not stop the others
                    error = f"{type(e).__name__}: {e}"
                    store.mark_failed(ckpt.step, error)
                    failures.append((ckpt.step, error))
                    bar.write(f"step {ckpt.step} failed: {error}")
                bar.update()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return failures


def connect(cluster_cfg):
    from distributed import Client
    from hydra.utils import instantiate

    # Hydra's job logging sets the root logger to INFO; the scheduler's bookkeeping would drown the progress bar
    logging.getLogger("distributed").setLevel(logging.WARNING)

    if "address" in cluster_cfg:
        return Client(cluster_cfg.address), None
    cluster = instantiate(cluster_cfg, _convert_="all")
    return Client(cluster), cluster
