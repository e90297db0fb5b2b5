"""The Dask clusters the `cluster` group names, and the client that talks to them.

A group's `build` node is what Hydra's `instantiate` builds: `distributed.LocalCluster`, or one of the factories
below (one worker per GPU of this machine; SLURM jobs through dask-jobqueue). `cluster=scheduler` builds nothing
and connects to `cluster.address`. The group's other keys are read by the dispatcher (pipeline/cluster/dispatch.py).
"""

from __future__ import annotations

import logging
import os
import re

from ..errors import UsageError

LOOPBACK = "127.0.0.1"


def connect(cluster_cfg):
    """(client, the cluster built here or None for an existing scheduler): the scheduler at `cluster.address`, or
    the cluster that `cluster.build` describes (Hydra's `instantiate`), scaled to `cluster.jobs` where given."""
    from distributed import Client
    from hydra.utils import instantiate

    # The scheduler's bookkeeping, and a worker's "Compute Failed" block for a step that is reported in one
    # line anyway, would drown the progress bar
    logging.getLogger("distributed").setLevel(logging.ERROR)
    dashboard = bool(cluster_cfg.get("dashboard"))
    if dashboard:
        try:
            import bokeh  # noqa: F401
        except ImportError:
            raise UsageError(
                "cluster.dashboard=true: Dask's dashboard needs bokeh (pip install 'sinktrace[dashboard]')"
            ) from None

    if "address" in cluster_cfg:
        address = cluster_cfg.address
        security = instantiate(cluster_cfg.security) if cluster_cfg.get("security") else None
        try:
            client = Client(address, security=security, timeout=cluster_cfg.get("timeout"))
        except (OSError, TimeoutError) as e:
            raise UsageError(f"cluster.address={address}: no Dask scheduler answers there ({e})") from None
        cluster = None
    else:
        cluster = instantiate(cluster_cfg.build, _convert_="all")
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
    """Run by every worker started with `--preload pipeline.cluster.factories`: several worker processes of one job
    share the job's GPUs; the i-th (named `<job>-<i>` by `dask worker --nworkers`) keeps only the i-th GPU, before
    anything in it touches CUDA. SLURM sets CUDA_VISIBLE_DEVICES to the job's GPUs."""
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    index = re.search(r"-(\d+)$", str(worker.name))
    if len(devices) > 1 and index:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(index.group(1)) % len(devices)]
