"""Where the pairwise merges of a schedule level run: in this process, or as parallel Ray tasks (on a GPU when
one is visible)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from fedmerge.device import default_device
from fedmerge.merge.pairwise import MergeResult, merge_pair
from strategies.schedule import PairJob

log = logging.getLogger(__name__)


def run_job(model: nn.Module, job: PairJob, device: torch.device | str) -> MergeResult:
    """Run one pairwise merge."""
    return merge_pair(model, job.a.state, job.b.state, job.surrogate, job.lam, job.config, device)


class SequentialRunner:
    """Runs a level's merges one after the other in this process."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device if device is not None else default_device()

    def run(self, model: nn.Module, jobs: Sequence[PairJob]) -> list[MergeResult]:
        return [run_job(model, job, self.device) for job in jobs]


def _ray_merge(model: nn.Module, job: PairJob, threads: int) -> MergeResult:
    """Body of one Ray task: a fixed torch thread count keeps results identical from run to run."""
    torch.set_num_threads(threads)
    return run_job(model, job, default_device())


class RayRunner:
    """Runs a level's independent merges as parallel Ray tasks, at most ``workers`` at a time.

    Joins the Ray instance of this process when there is one (in a Flower simulation, the one running the clients,
    on the cluster at ``$RAY_ADDRESS`` when that is set), else the cluster at ``$RAY_ADDRESS``, else starts a local
    one with ``workers`` CPUs and the visible GPUs. Tasks reserve a CPU (and a share of a GPU)
    when the instance has them free; when Flower's client actors hold every CPU, the tasks reserve none and this
    runner alone bounds how many run at once, so a merge never waits forever for resources.
    """

    def __init__(self, workers: int = 2, threads_per_task: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"RayRunner needs at least one worker, got {workers}")
        self.workers = workers
        self.threads_per_task = threads_per_task
        self._announced = False

    def start(self) -> None:
        """Join or start Ray now (so that its start-up does not count in the first merge's time)."""
        import ray

        address = os.environ.get("RAY_ADDRESS", "")
        if not ray.is_initialized() and address:
            log.info("joining the Ray cluster at %s for merging", address)
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
        elif not ray.is_initialized():
            gpus = torch.cuda.device_count()
            log.info("starting a local Ray instance for merging (%d CPU workers, %d GPU(s))", self.workers, gpus)
            ray.init(
                num_cpus=self.workers * self.threads_per_task,
                num_gpus=gpus,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )
        if not self._announced:
            self._announced = True
            log.info(
                "merge tasks run on the Ray cluster at %s (%d node(s), %g CPUs)",
                ray.get_runtime_context().gcs_address,
                len(ray.nodes()),
                ray.cluster_resources().get("CPU", 0.0),
            )

    def _resources(self) -> dict[str, float]:
        """What each task reserves: a CPU and a GPU share when that many are free, else nothing of that kind."""
        import ray

        free = ray.available_resources()
        cpus = float(self.threads_per_task) if free.get("CPU", 0.0) >= self.threads_per_task * self.workers else 0.0
        gpu_share = min(1.0, ray.cluster_resources().get("GPU", 0.0) / self.workers)
        gpus = gpu_share if gpu_share and free.get("GPU", 0.0) >= gpu_share * self.workers else 0.0
        if not cpus:
            log.info(
                "Ray has no %d free CPUs (client actors hold them): merge tasks reserve none, %d run at a time",
                self.threads_per_task * self.workers,
                self.workers,
            )
        if gpu_share and not gpus:
            log.warning("Ray's GPUs are all reserved (by client actors?): merging on CPU")
        return {"num_cpus": cpus, "num_gpus": gpus}

    def run(self, model: nn.Module, jobs: Sequence[PairJob]) -> list[MergeResult]:
        import ray

        self.start()
        task = ray.remote(_ray_merge).options(**self._resources())
        model_ref = ray.put(model)
        pending: list = []
        refs = []
        for job in jobs:  # keep at most ``workers`` tasks in flight
            if len(pending) >= self.workers:
                _, pending = ray.wait(pending, num_returns=1)
            ref = task.remote(model_ref, job, self.threads_per_task)
            pending.append(ref)
            refs.append(ref)
        return ray.get(refs)


def make_runner(workers: int) -> SequentialRunner | RayRunner:
    """Ray tasks for ``workers`` >= 1, in-process merging for 0."""
    if workers < 0:
        raise ValueError(f"merge workers must be >= 0, got {workers}")
    return RayRunner(workers) if workers else SequentialRunner()
