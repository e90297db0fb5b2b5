"""Where the replay tasks run, and the one writer that stores their results.

`cluster=local` (the default) replays in this process, one checkpoint after the other: no scheduler, no thread
pool, no socket, nothing to start, and Ctrl-C stops the replay at once. Every other `cluster` group is a Dask
cluster built by Hydra's `instantiate` (or an existing scheduler's address): workers replay checkpoints and
return a few kilobytes of statistics. Either way the driver alone writes them into the store, as they arrive,
and each worker keeps the last model it built (a ModelCache it owns), so consecutive checkpoints of one
architecture reuse it. On Dask the run is cut into consecutive stretches of steps, one per worker, so that each
worker also reads ahead the checkpoint it replays next; an idle worker takes work from a busy one (Dask's work
stealing), and a worker that dies hands its stretch to the others.

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
import os
import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import CheckpointError, ClusterLost, UsageError
from ..records import Checkpoint

PLUGIN_NAME = "sinktrace-models"
IN_PROCESS = "in-process"
# keys of a Dask `cluster` group read here; the others build the cluster (Hydra's instantiate)
DISPATCH_KEYS = ("retries", "dashboard", "resources", "jobs")
LOOPBACK = "127.0.0.1"


@dataclass
class Outcome:
    """What the replays came to: steps stored, failed (with the reason) and gone (deleted while queued); and what
    the last look at the run found: how many checkpoints, and those holding nothing sinktrace can read."""

    done: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    found: int = 0
    unreadable: list[Checkpoint] = field(default_factory=list)


def results(cluster_cfg, todo: list[Checkpoint], probe, settings, source=None) -> Iterator[tuple[Checkpoint, object]]:
    """(checkpoint, its statistics or the exception it raised), in the order they finish.

    `source`: where the checkpoints' files come from when they are not on disk yet (`checkpoints.hub`). It fetches
    them in the background, a few ahead of the replay (`start`); each is replayed once fetched (`take`, `poll`),
    and one whose fetch failed comes back with that exception.
    """
    if source is not None:
        source.start(todo)
    if cluster_cfg.get("kind") == IN_PROCESS:
        yield from _in_process(todo, probe, settings, source)
    else:
        yield from _on_dask(cluster_cfg, todo, probe, settings, source)


def run_replays(
    cluster_cfg,
    todo,
    probe,
    settings,
    store,
    fingerprint,
    *,
    previous: dict[int, str] | None = None,
    verbose: bool = False,
    bar=None,
    source=None,
) -> Outcome:
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
    from ..signals import deferred

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
    from ..locations import exists

    try:
        return not exists(ckpt.path)
    except OSError:
        return False


def _in_process(todo, probe, settings, source):
    from ..devices import use_threads
    from ..replay.load import ModelCache
    from ..replay.step import replay

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
    """One replay task. A bad checkpoint comes back as its CheckpointError, not raised: Dask retries what is
    raised, and a corrupt file stays corrupt."""
    from distributed import get_worker

    from ..devices import use_threads
    from ..replay.step import replay

    worker = get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    use_threads(settings.threads, plugin.workers_here)
    try:
        return replay(ckpt, probe, settings, read_next, models=plugin.models)
    except CheckpointError as e:
        return e


def _on_dask(cluster_cfg, todo, probe, settings, source):
    import dask
    from distributed import WorkerPlugin, as_completed

    class KeepModels(WorkerPlugin):
        """Gives every worker its own ModelCache, created on the worker when it joins."""

        name = PLUGIN_NAME

        def __init__(self, per_host: dict[str, int]):
            self.per_host = per_host

        def setup(self, worker) -> None:
            from ..replay.load import ModelCache

            self.models = ModelCache()
            # the worker processes on one machine share its cores
            self.workers_here = self.per_host.get(_host(worker.address), 1)
            # A heartbeat that meets a scheduler already closing logs a traceback from the worker's process; a lost
            # scheduler is reported by the client in one line (ClusterLost), so the traceback only repeats it
            logging.getLogger("distributed.worker").addFilter(_no_heartbeat_traceback)

        def teardown(self, worker) -> None:
            self.models.clear()

    retries = int(cluster_cfg.get("retries") or 0)
    # a scheduler started here gives up on a step after this many of its workers died running it
    with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
        client, cluster = connect(cluster_cfg)
    stored = 0
    try:
        client.wait_for_workers(1)
        hosts = [_host(a) for a in client.scheduler_info(n_workers=-1).get("workers", {})]
        client.register_plugin(KeepModels({h: hosts.count(h) for h in hosts}))
        if source is not None:
            yield from _as_fetched(client, todo, probe, settings, source)
            return
        futures = submit(client, todo, probe, settings, retries, cluster_cfg.get("resources"))
        for future in as_completed(futures):
            try:
                result = result_of(future, client, retries)
            except ClusterLost as e:
                # closing the client cancels its attempts to reconnect, which it logs with a traceback
                logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
                raise ClusterLost(
                    f"{e} after {stored} of {len(futures)} checkpoint(s) came back; every step stored is kept: "
                    "rerun the same command to replay the rest"
                ) from None
            except Exception as e:
                result = e
            stored += 1
            yield futures[future], result
    finally:
        close(client, cluster)


def submit(client, todo, probe, settings, retries: int, resources) -> dict:
    """One task per checkpoint, in step order: each worker gets a stretch of consecutive steps (and reads ahead
    the next of its own), loosely, so that an idle or surviving worker may take them over."""
    client.wait_for_workers(1)
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    plan = stretches(todo, workers)
    futures = {}
    for i, (ckpt, nxt, worker) in enumerate(plan):
        future = client.submit(
            replay_on_worker,
            ckpt,
            probe,
            settings,
            nxt,
            key=f"replay-{probe.name}-{ckpt.step}",
            pure=False,
            retries=retries,
            workers=[worker],
            allow_other_workers=True,
            priority=len(plan) - i,
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


# --------------------------------------------------------------------------------------------- clusters


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
                future = client.submit(
                    replay_on_worker,
                    ckpt,
                    probe,
                    settings,
                    after[ckpt.step],
                    key=f"replay-{probe.name}-{ckpt.step}",
                    pure=False,
                )
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


def _no_heartbeat_traceback(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


def connect(cluster_cfg):
    """(client, the cluster built here or None for an existing scheduler)."""
    from distributed import Client
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # The scheduler's bookkeeping, and a worker's "Compute Failed" block for a step that is reported in one
    # line anyway, would drown the progress bar
    logging.getLogger("distributed").setLevel(logging.ERROR)
    options = {k: v for k, v in OmegaConf.to_container(cluster_cfg).items() if k not in DISPATCH_KEYS}
    dashboard = bool(cluster_cfg.get("dashboard"))
    if dashboard:
        try:
            import bokeh  # noqa: F401
        except ImportError:
            raise UsageError(
                "cluster.dashboard=true: Dask's dashboard needs bokeh (pip install 'sinktrace[dashboard]')"
            ) from None

    if "address" in options:
        security = instantiate(options["security"]) if options.get("security") else None
        try:
            client = Client(options["address"], security=security, timeout=options.get("timeout"))
        except (OSError, TimeoutError) as e:
            raise UsageError(f"cluster.address={options['address']}: no Dask scheduler answers there ({e})") from None
        cluster = None
    else:
        cluster = instantiate(options, _convert_="all")
        if cluster_cfg.get("jobs"):
            cluster.scale(jobs=int(cluster_cfg.jobs))
        client = Client(cluster)
        if not dashboard:
            close_http(client)
    if dashboard:
        print(f"sinktrace: Dask dashboard at {client.dashboard_link}")
    return client, cluster


def close_http(client) -> None:
    """Close the HTTP servers of the scheduler and workers started here. Dask starts one in each whether or not a
    dashboard is asked for (health checks, metrics: distributed/node.py, start_http_server), and one that talks
    inproc:// binds it to every interface; conf/cluster/ puts them on 127.0.0.1, and nothing here needs them."""

    def stop(dask_scheduler=None, dask_worker=None):
        (dask_scheduler or dask_worker).http_server.stop()

    client.run_on_scheduler(stop)
    client.run(stop)


def close(client, cluster) -> None:
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries where set, else every device torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_cluster(
    n_workers: int | None = None,
    devices: list | None = None,
    threads_per_worker: int = 1,
    dashboard_address: str | None = f"{LOOPBACK}:0",
):
    """One worker process per GPU on this machine, each started with CUDA_VISIBLE_DEVICES naming its own GPU
    only (so `cuda` in it means that GPU) and a resource GPU=1, so that one replay runs per GPU."""
    from distributed import Nanny, Scheduler, SpecCluster

    devices = [str(d) for d in devices] if devices else visible_gpus()
    if not devices:
        raise UsageError("cluster=gpus: no GPU is visible (CUDA_VISIBLE_DEVICES, torch.cuda.device_count())")
    n = int(n_workers or len(devices))
    workers = {
        i: {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "host": LOOPBACK,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]},
            },
        }
        for i in range(n)
    }
    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": dashboard_address}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="sinktrace-gpus")


def slurm_cluster(
    queue: str | None = None,
    account: str | None = None,
    cores: int = 8,
    memory: str = "64GB",
    gpus_per_job: int = 1,
    walltime: str = "04:00:00",
    dashboard_address: str | None = f"{LOOPBACK}:0",
    **options,
):
    """dask-jobqueue's SLURMCluster, one worker process per GPU of each job (each pinned to its GPU by
    `dask_setup` below, which every worker runs at start) and a resource GPU=1 per worker process."""
    from dask_jobqueue import SLURMCluster

    gpus = int(gpus_per_job)
    extra_directives = [*options.pop("job_extra_directives", []), *([f"--gpus={gpus}"] if gpus else [])]
    extra_args = [*options.pop("worker_extra_args", [])]
    if gpus:
        extra_args += ["--resources", "GPU=1", "--preload", __name__]
    return SLURMCluster(
        queue=queue,
        account=account,
        cores=cores,
        memory=memory,
        walltime=walltime,
        processes=max(1, gpus),
        job_extra_directives=extra_directives,
        worker_extra_args=extra_args,
        scheduler_options={**options.pop("scheduler_options", {}), "dashboard_address": dashboard_address},
        **options,
    )


def dask_setup(worker) -> None:
    """Run by every worker started with `--preload pipeline.cluster.dispatch`: several worker processes of one job share
    the job's GPUs; the i-th (named `<job>-<i>` by `dask worker --nworkers`) keeps only the i-th GPU, before
    anything in it touches CUDA. SLURM sets CUDA_VISIBLE_DEVICES to the job's GPUs."""
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    index = re.search(r"-(\d+)$", str(worker.name))
    if len(devices) > 1 and index:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(index.group(1)) % len(devices)]
