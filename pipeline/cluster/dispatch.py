"""Where the replay tasks run; each result comes back to the driver as it finishes.

`cluster=local` (the default) replays in this process, one checkpoint after the other: no scheduler, no thread
pool, no socket, nothing to start, and Ctrl-C stops the replay at once. Every other `cluster` group is a Dask
cluster (pipeline/cluster/factories.py builds it, or connects to an existing scheduler's address): workers replay
checkpoints and return a few kilobytes of statistics, which the driver alone writes into the store. Each worker
keeps the last model it built (a ModelCache its first replay makes), so consecutive checkpoints of one architecture
reuse it.
A checkpoint is submitted once its source has its files (at once for a folder, once fetched for a Hub
repository). On Dask the checkpoints available together are cut into consecutive stretches of steps, one per
worker, so that each worker also reads ahead the checkpoint it replays next; an idle worker takes work from a
busy one (Dask's work stealing), and a worker that dies hands its stretch to the others.

Failures on Dask, by kind:
- a checkpoint that cannot be replayed (CheckpointError) fails once, with its reason: retrying cannot help;
- any other error in a replay (a read from object storage that timed out, out of memory) is retried on a worker
  up to `cluster.retries` times;
- a worker process that dies mid-replay: the scheduler gives its step to another worker; after `cluster.retries`
  deaths while replaying that step, the step fails (KilledWorker), so that one poisonous checkpoint cannot take
  down the whole cluster one worker at a time;
- the scheduler lost: ClusterLost; what was stored stays stored, and the rerun resumes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator

from ..errors import CheckpointError, ClusterLost
from ..records import Checkpoint

IN_PROCESS = "in-process"
POLL = 0.5  # seconds between looks at the source while replays are in flight


def results(cluster_cfg, source, todo: list[Checkpoint], probe, settings) -> Iterator[tuple[Checkpoint, object]]:
    """(checkpoint, its statistics or the exception it raised) for each of `todo`, in the order they finish.

    `source` (pipeline/checkpoints/sources.py) makes the checkpoints' files available; each is replayed once they
    are, and one whose files could not be had comes back with that exception.
    """
    source.start(todo)
    if cluster_cfg.get("kind") == IN_PROCESS:
        yield from _in_process(source, todo, probe, settings)
    else:
        yield from _on_dask(cluster_cfg, source, todo, probe, settings)


def _in_process(source, todo, probe, settings):
    from ..devices import use_threads
    from ..replay.load import ModelCache
    from ..replay.step import replay

    use_threads(settings.threads)
    models = ModelCache()
    after = _next_of(todo)
    left = len(todo)
    while left:
        for ckpt, error in source.arrived(wait=True):
            left -= 1
            try:
                if error is not None:
                    raise error
                result = replay(ckpt, probe, settings, after[ckpt.step], models=models)
            except Exception as e:
                result = e
            yield ckpt, result


def _next_of(todo: list[Checkpoint]) -> dict[int, Checkpoint | None]:
    """step -> the checkpoint replayed after it (its files are read from disk meanwhile)."""
    return dict(zip((c.step for c in todo), [*todo[1:], None]))


# --------------------------------------------------------------------------------------------- Dask


# each worker's own ModelCache, made by its first replay: a worker that joins later makes its own, one that dies
# takes its cache along (nothing is registered with the scheduler, so nothing fails when a worker dies meanwhile)
_WORKER_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODELS_LOCK = threading.Lock()


def worker_models(worker):
    """The ModelCache of `worker` (a distributed Worker), created on its first call."""
    with _MODELS_LOCK:
        models = _WORKER_MODELS.get(worker)
        if models is None:
            from ..replay.load import ModelCache

            models = _WORKER_MODELS[worker] = ModelCache()
            # A heartbeat that meets a scheduler already closing logs a traceback from the worker's process; a lost
            # scheduler is reported by the client in one line (ClusterLost), so the traceback only repeats it
            logging.getLogger("distributed.worker").addFilter(_no_heartbeat_traceback)
        return models


def replay_on_worker(ckpt, probe, settings, read_next, per_host: dict[str, int] | None = None):
    """One replay task. A bad checkpoint comes back as its CheckpointError, not raised: Dask retries what is
    raised, and a corrupt file stays corrupt. `per_host`: the worker processes on each machine, which share its
    cores."""
    from distributed import get_worker

    from ..devices import use_threads
    from ..locations import bound_reads, bound_waits
    from ..replay.step import replay

    bound_waits(ckpt.request_timeout, ckpt.download_timeout)  # the driver's settings, in the worker's process
    bound_reads(ckpt.max_read_size)
    worker = get_worker()
    use_threads(settings.threads, (per_host or {}).get(_host(worker.address), 1))
    try:
        return replay(ckpt, probe, settings, read_next, models=worker_models(worker))
    except CheckpointError as e:
        return e


def _on_dask(cluster_cfg, source, todo, probe, settings):
    import dask
    import distributed  # noqa: F401  (its config defaults must exist before dask.config.set changes one of them)

    from .factories import close, connect

    retries = int(cluster_cfg.get("retries") or 0)
    # a scheduler started here gives up on a step after this many of its workers died running it
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        client, cluster = connect(cluster_cfg)
    try:
        client.wait_for_workers(1)
        futures: dict = {}
        submitted = came_back = 0
        while came_back < len(todo):
            # with replays in flight, look for newly available checkpoints now and then; with none, wait for one
            available = []
            for ckpt, error in source.arrived(wait=not futures):
                if error is not None:
                    came_back += 1
                    yield ckpt, error
                else:
                    available.append(ckpt)
            if available:
                futures.update(
                    submit(client, available, probe, settings, retries, cluster_cfg.get("resources"), submitted)
                )
                submitted += len(available)
            for future in _finished(futures):
                try:
                    result = result_of(future, client, retries)
                except ClusterLost as e:
                    # closing the client cancels its attempts to reconnect, which it logs with a traceback
                    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
                    raise ClusterLost(
                        f"{e} after {came_back} of {len(todo)} checkpoint(s) came back; every step stored is kept: "
                        "rerun the same command to replay the rest"
                    ) from None
                except Exception as e:
                    result = e
                came_back += 1
                yield futures.pop(future), result
    finally:
        close(client, cluster)


def _finished(futures: dict) -> list:
    """The futures among `futures` that finished (or were cancelled), waiting up to POLL seconds for one."""
    from concurrent.futures import CancelledError

    from distributed import wait

    if not futures:
        return []
    try:
        return list(wait(list(futures), timeout=POLL, return_when="FIRST_COMPLETED").done)
    except TimeoutError:
        return []
    except CancelledError:  # the scheduler is gone: result_of tells
        return [f for f in futures if f.done()]


def submit(client, available, probe, settings, retries: int, resources, submitted: int = 0) -> dict:
    """One task per checkpoint, in step order: each worker gets a stretch of consecutive steps (and reads ahead
    the next of its own), loosely, so that an idle or surviving worker may take them over. `submitted`: how many
    were submitted before these (earlier steps go first, and the stretches start at the next worker)."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    hosts = [_host(w) for w in workers]
    per_host = {h: hosts.count(h) for h in hosts}
    turn = submitted % len(workers) if workers else 0
    plan = stretches(available, workers[turn:] + workers[:turn])
    futures = {}
    for i, (ckpt, nxt, worker) in enumerate(plan):
        future = client.submit(
            replay_on_worker,
            ckpt,
            probe,
            settings,
            nxt,
            per_host,
            key=f"replay-{probe.name}-{ckpt.step}",
            pure=False,
            retries=retries,
            workers=[worker],
            allow_other_workers=True,
            priority=-(submitted + i),
            resources=dict(resources) if resources else None,
        )
        futures[future] = ckpt
    return futures


def stretches(todo: list, workers: list[str]) -> list[tuple]:
    """(checkpoint, the checkpoint the same worker replays next or None, worker) for each checkpoint: the steps
    cut into len(workers) consecutive stretches as even as can be."""
    n = max(1, min(len(workers), len(todo)))
    bounds = [round(k * len(todo) / n) for k in range(n + 1)]
    plan = []
    for k in range(n):
        part = todo[bounds[k] : bounds[k + 1]]
        plan += [(c, nxt, workers[k]) for c, nxt in zip(part, [*part[1:], None])]
    return plan


def result_of(future, client, retries: int):
    """The replay's Dataset or CheckpointError, or the reason it has neither raised as an exception."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker
    from distributed.comm import CommClosedError

    try:
        result = future.result()
    except KilledWorker as e:
        raise RuntimeError(
            f"{retries + 1} worker process(es) died while replaying it (the last: {e.last_worker.address}); "
            "not retried again"
        ) from None
    except (CancelledError, CommClosedError) as e:
        # results come through the scheduler: a closed connection there, or every future cancelled when the client
        # gives up reconnecting, means the scheduler is gone
        if isinstance(e, CommClosedError) or client.status != "running":
            raise ClusterLost(f"lost the Dask scheduler at {client.scheduler.address}") from None
        raise
    return result


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0] if "://" in address else address


def _no_heartbeat_traceback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")
