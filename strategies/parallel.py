"""Where the pairwise merges of a schedule level run: in this process, or as parallel Ray tasks (on a GPU when
one is visible)."""

from __future__ import annotations

import logging
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
    """Runs a level's independent merges as parallel Ray tasks, ``workers`` at a time.

    Joins the Ray instance of this process when there is one, else starts a local one with ``workers`` CPUs (and the
    visible GPUs, shared between the workers).
    """

    def __init__(self, workers: int = 2, threads_per_task: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"RayRunner needs at least one worker, got {workers}")
        self.workers = workers
        self.threads_per_task = threads_per_task

    def _gpu_share(self) -> float:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0.0)
        return min(1.0, gpus / self.workers) if gpus else 0.0

    def _ensure_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            gpus = torch.cuda.device_count()
            log.info("starting a local Ray instance for merging (%d CPU workers, %d GPU(s))", self.workers, gpus)
            ray.init(num_cpus=self.workers * self.threads_per_task, num_gpus=gpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=False)

    def run(self, model: nn.Module, jobs: Sequence[PairJob]) -> list[MergeResult]:
        import ray

        self._ensure_ray()
        task = ray.remote(_ray_merge).options(num_cpus=self.threads_per_task, num_gpus=self._gpu_share())
        model_ref = ray.put(model)
        return ray.get([task.remote(model_ref, job, self.threads_per_task) for job in jobs])


def make_runner(workers: int) -> SequentialRunner | RayRunner:
    """Ray tasks for ``workers`` >= 1, in-process merging for 0."""
    if workers < 0:
        raise ValueError(f"merge workers must be >= 0, got {workers}")
    return RayRunner(workers) if workers else SequentialRunner()
