"""Where the replay tasks run, and the one writer that stores their results.

`cluster=local` (the default) replays in this process, one checkpoint after the other: no scheduler, no thread
pool, no socket, nothing to start, and Ctrl-C stops the replay at once. Every other `cluster` group is a Dask
cluster built by Hydra's `instantiate` (or an existing scheduler's address): workers replay checkpoints and
return a few kilobytes of statistics. Either way the driver alone writes them into the store, as they arrive,
and each worker keeps the last model it built (a ModelCache it owns), so consecutive checkpoints of one
architecture reuse it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

from .records import Checkpoint

PLUGIN_NAME = "sinktrace-models"
IN_PROCESS = "in-process"


@dataclass
class Outcome:
    """What the replays came to: steps stored, failed (with the reason) and gone (deleted while queued)."""

    done: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)


def results(cluster_cfg, todo: list[Checkpoint], probe, settings, source=None) -> Iterator[tuple[Checkpoint, object]]:
    """(checkpoint, its statistics or the exception it raised), in the order they finish.

    `source`: where the checkpoints' files come from when they are not on disk yet (pipeline/hub.py). It fetches
    them in the background, a few ahead of the replay (`start`); each is replayed once fetched (`take`, `poll`),
    and one whose fetch failed comes back with that exception.
    """
    if source is not None:
        source.start(todo)
    if cluster_cfg.get("kind") == IN_PROCESS:
        yield from _in_process(todo, probe, settings, source)
    else:
        yield from _on_dask(cluster_cfg, todo, probe, settings, source)


def run_replays(cluster_cfg, todo, probe, settings, store, fingerprint, *, previous: dict[int, str] | None = None,
                verbose: bool = False, bar=None, source=None) -> Outcome:
    """Replay `todo` where the cluster config says; the driver alone writes each result into the store.

    A failure is recorded as failed, except on a step that was done before (an overwrite): that step keeps its
    stored result and the failure is only reported. A checkpoint deleted while it waited is reported as gone.
    `source` (see `results`) is handed each checkpoint back once its step is written (`release`), and closed at
    the end (`close`).
    """
    try:
        return _write_results(cluster_cfg, todo, probe, settings, store, fingerprint, previous, verbose, bar, source)
    finally:
        if source is not None:
            source.close()


def _write_results(cluster_cfg, todo, probe, settings, store, fingerprint, previous, verbose, bar, source):
    from .signals import deferred

    previous = previous or {}
    outcome = Outcome()
    for ckpt, result in results(cluster_cfg, todo, probe, settings, source):
        if isinstance(result, BaseException) and source is None and _is_gone(ckpt):
            outcome.gone.append(ckpt.step)
            _say(bar, f"step {ckpt.step} gone: {ckpt.path} was deleted before it was replayed")
        else:
            with deferred():  # Ctrl-C or SIGTERM while the step is written waits until it is written
                try:
                    if isinstance(result, BaseException):
                        raise result
                    if result.attrs.get("config_fingerprint") != fingerprint:
                        raise ValueError(
                            f"{ckpt.path}/config.json describes another architecture than the run's first checkpoint"
                        )
                    store.write_step(ckpt.step, result)
                    outcome.done.append(ckpt.step)
                except Exception as e:  # one bad checkpoint must not stop the others
                    error = f"{type(e).__name__}: {e}"
                    if previous.get(ckpt.step) != "done":
                        store.mark_failed(ckpt.step, error)
                    outcome.failures.append((ckpt.step, error))
                    _say(bar, f"step {ckpt.step} failed: {error}")
                    if verbose:
                        _say(bar, "".join(traceback.format_exception(e)))
        if source is not None:
            source.release(ckpt)
        if bar is not None:
            bar.update()
    return outcome


def _say(bar, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line)


def _is_gone(ckpt: Checkpoint) -> bool:
    from .locations import exists

    try:
        return not exists(ckpt.path)
    except OSError:
        return False


def _in_process(todo, probe, settings, source):
    from .devices import use_threads
    from .load import ModelCache
    from .replay import replay

    use_threads(settings.threads)
    models = ModelCache()
    after = _next_of(todo)
    for ckpt in todo:
        fetch_error = None
        if source is not None:  # fetched in the order of todo
            ckpt, fetch_error = source.take()
        try:
            if fetch_error is not None:
                raise fetch_error
            result = replay(ckpt, probe, settings, after[ckpt.step], models=models)
        except Exception as e:
            result = e
        yield ckpt, result


def _next_of(todo: list[Checkpoint]) -> dict[int, Checkpoint | None]:
    """step -> the checkpoint replayed after it (its files are read from disk meanwhile)."""
    return dict(zip((c.step for c in todo), [*todo[1:], None]))


# --------------------------------------------------------------------------------------------- Dask


def replay_on_worker(ckpt, probe, settings, read_next):
    from distributed import get_worker

    from .devices import use_threads
    from .replay import replay

    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    use_threads(settings.threads, plugin.workers_here)
    return replay(ckpt, probe, settings, read_next, models=plugin.models)


def _on_dask(cluster_cfg, todo, probe, settings, source):
    from distributed import WorkerPlugin, as_completed

    class KeepModels(WorkerPlugin):
        """Gives every worker its own ModelCache, created on the worker when it joins."""

        name = PLUGIN_NAME

        def __init__(self, per_host: dict[str, int]):
            self.per_host = per_host

        def setup(self, worker) -> None:
            from .load import ModelCache

            self.models = ModelCache()
            # the worker processes on one machine share its cores
            self.workers_here = self.per_host.get(_host(worker.address), 1)

        def teardown(self, worker) -> None:
            self.models.clear()

    client, cluster = connect(cluster_cfg)
    try:
        hosts = [_host(a) for a in client.scheduler_info().get("workers", {})]
        client.register_plugin(KeepModels({h: hosts.count(h) for h in hosts}))
        if source is not None:
            yield from _as_fetched(client, todo, probe, settings, source)
            return
        futures = {
            client.submit(replay_on_worker, c, probe, settings, nxt, key=f"replay-{probe.name}-{c.step}", pure=False): c
            for c, nxt in zip(todo, [*todo[1:], None])
        }
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as e:
                result = e
            yield futures[future], result
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0] if "://" in address else address


def _as_fetched(client, todo, probe, settings, source):
    """Each checkpoint submitted once its files are fetched; results as they finish."""
    from distributed import wait

    after = _next_of(todo)
    futures, left = {}, len(todo)
    while left:
        # with replays in flight, look for fetched checkpoints now and then; with none, wait for the next one
        for ckpt, fetch_error in source.poll() if futures else [source.take()]:
            if fetch_error is not None:
                left -= 1
                yield ckpt, fetch_error
            else:
                future = client.submit(replay_on_worker, ckpt, probe, settings, after[ckpt.step],
                                       key=f"replay-{probe.name}-{ckpt.step}", pure=False)
                futures[future] = ckpt
        if not futures:
            continue
        try:
            done = wait(list(futures), timeout=0.5, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            continue
        for future in done:
            left -= 1
            try:
                result = future.result()
            except Exception as e:
                result = e
            yield futures.pop(future), result


def connect(cluster_cfg):
    from distributed import Client
    from hydra.utils import instantiate

    # The scheduler's bookkeeping, and a worker's "Compute Failed" block for a step that is reported in one
    # line anyway, would drown the progress bar
    logging.getLogger("distributed").setLevel(logging.ERROR)

    if "address" in cluster_cfg:
        return Client(cluster_cfg.address), None
    cluster = instantiate(cluster_cfg, _convert_="all")
    return Client(cluster), cluster
