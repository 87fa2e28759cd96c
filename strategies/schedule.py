"""N-client merge schedules built from pairwise merges.

- ``tree``: merge clients in pairs (0+1, 2+3, ...), then the pairs' results in pairs, and so on; an odd node out
  waits for the next level. The merges of one level are independent and may run in parallel.
- ``all-to-one``: fold every client in turn into one running model (N-1 merges, one after the other).
- ``universe``: no pairwise merges: every client is mapped into one shared frame at once (MergeMany or C2M3), so
  the maps between clients are cycle-consistent, and the method's N-model form merges them in one step
  (:func:`fedmerge.merge.many.merge_models`).

Each pairwise merge weights model B by ``lambda = n_B / (n_A + n_B)``, where n counts the training examples behind
each side, so a tree of merges weights every client by its sample count as FedAvg does. With ``max_share_ratio``
r > 0 (the defences' cap, :class:`strategies.defences.Defences`), lambda is moved (as little as possible) so that no
client holds more than r / m of the merged model, m being the clients inside it: a client that inflates its sample
count cannot dominate the first merges it takes part in, even when its count is within the round's cap. Each member's
share of a merged model (the product of the lambdas on its way up) is tracked in :attr:`MergeNode.shares`; equal
weighting is always allowed, so the cap can always be met when r >= 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal, Protocol

import torch
from torch import nn

from fedmerge.data.images import LabeledImages, concat
from fedmerge.device import default_device, derive_seed
from fedmerge.merge.many import merge_models
from fedmerge.merge.pairwise import DATA_METHODS, MergeConfig, MergeResult
from strategies.messages import ClientUpdate

log = logging.getLogger(__name__)

Schedule = Literal["tree", "all-to-one", "universe"]
SCHEDULES: tuple[Schedule, ...] = ("tree", "all-to-one", "universe")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MergeNode:
    """A client model or a merge of several: weights, the partition ids inside, their example count, and the
    union of their surrogates (``None`` unless every member sent one)."""

    state: State
    members: tuple[int, ...]
    num_examples: int
    surrogate: LabeledImages | None
    without_surrogate: tuple[int, ...] = ()
    shares: tuple[float, ...] = ()
    """Each member's share of ``state`` (summing to 1); empty: equal shares (one member: 1)."""

    @classmethod
    def from_update(cls, update: ClientUpdate) -> MergeNode:
        missing = () if update.surrogate is not None else (update.partition_id,)
        return cls(update.state, (update.partition_id,), update.num_examples, update.surrogate, missing)

    @property
    def member_shares(self) -> tuple[float, ...]:
        """:attr:`shares`, or equal shares when they were not given."""
        return self.shares or (1.0 / len(self.members),) * len(self.members)


@dataclass(frozen=True)
class PairJob:
    """One pairwise merge to run: B is aligned to A and weighted by ``lam``."""

    level: int
    index: int
    a: MergeNode
    b: MergeNode
    config: MergeConfig
    max_share_ratio: float = 0.0

    @property
    def count_lam(self) -> float:
        """B's weight from the sample counts alone."""
        return self.b.num_examples / (self.a.num_examples + self.b.num_examples)

    @property
    def lam_bounds(self) -> tuple[float, float]:
        """The lambdas that keep every member within ``max_share_ratio`` / m of the merge ((0, 1) without a cap)."""
        if not self.max_share_ratio:
            return 0.0, 1.0
        limit = self.max_share_ratio / (len(self.a.members) + len(self.b.members))
        low = max(0.0, 1.0 - limit / max(self.a.member_shares))
        high = min(1.0, limit / max(self.b.member_shares))
        return low, max(low, high)

    @property
    def lam(self) -> float:
        """B's weight in the merge: the count-based lambda moved into :attr:`lam_bounds`."""
        low, high = self.lam_bounds
        return min(max(self.count_lam, low), high)

    @cached_property
    def surrogate(self) -> LabeledImages | None:
        """Both sides' surrogate data, or ``None`` when some member of either side sent none."""
        if self.a.surrogate is None or self.b.surrogate is None:
            return None
        return concat([self.a.surrogate, self.b.surrogate], name="surrogate")


@dataclass(frozen=True)
class MergeStep:
    """What one pairwise merge did (for logs and result tables)."""

    level: int
    index: int
    members_a: tuple[int, ...]
    members_b: tuple[int, ...]
    lam: float
    method: str
    seconds: float


class MergeRunner(Protocol):
    """Runs the pairwise merges of one schedule level and returns their results in job order."""

    def run(self, model: nn.Module, jobs: Sequence[PairJob]) -> list[MergeResult]: ...


def pair_job(
    level: int, index: int, a: MergeNode, b: MergeNode, config: MergeConfig, max_share_ratio: float = 0.0
) -> PairJob:
    """The merge of ``a`` and ``b`` with a seed of its own, B weighted within the share cap (logged, naming the
    client it holds back, when it moves lambda).

    Falls back to data-free weight matching when a member sent no surrogate.
    """
    config = replace(config, seed=derive_seed(config.seed, "merge", level, index))
    missing = a.without_surrogate + b.without_surrogate
    if config.method in DATA_METHODS and missing:
        log.warning(
            "client(s) %s sent no surrogate: merging clients %s with %s by data-free weight matching instead of %s",
            list(missing),
            list(a.members),
            list(b.members),
            config.method,
        )
        config = replace(config, method="wm")
    job = PairJob(level, index, a, b, config, max_share_ratio)
    if abs(job.lam - job.count_lam) > 1e-12:
        capped, share = (b, job.count_lam) if job.lam < job.count_lam else (a, 1 - job.count_lam)
        shares = capped.member_shares
        client = capped.members[max(range(len(shares)), key=shares.__getitem__)]
        log.warning(
            "merge of clients %s with %s: client %d would hold %.1f %% of it by the sample counts, above the cap of "
            "%g x an equal share (%.1f %%): lambda %.3f instead of %.3f",
            list(a.members),
            list(b.members),
            client,
            100 * share * max(shares),
            max_share_ratio,
            100 * max_share_ratio / (len(a.members) + len(b.members)),
            job.lam,
            job.count_lam,
        )
    return job


def _merged_node(job: PairJob, result: MergeResult) -> MergeNode:
    lam = job.lam
    return MergeNode(
        result.state,
        job.a.members + job.b.members,
        job.a.num_examples + job.b.num_examples,
        job.surrogate,
        job.a.without_surrogate + job.b.without_surrogate,
        tuple((1 - lam) * x for x in job.a.member_shares) + tuple(lam * x for x in job.b.member_shares),
    )


def _run_level(
    model: nn.Module, jobs: list[PairJob], runner: MergeRunner, label: str
) -> tuple[list[MergeNode], list[MergeStep]]:
    start = time.perf_counter()
    log.info(
        "%s: %d merge(s): %s", label, len(jobs), ", ".join(f"{list(j.a.members)}+{list(j.b.members)}" for j in jobs)
    )
    results = runner.run(model, jobs)
    log.info("%s done in %.1f s", label, time.perf_counter() - start)
    nodes = [_merged_node(job, result) for job, result in zip(jobs, results, strict=True)]
    steps = [
        MergeStep(j.level, j.index, j.a.members, j.b.members, j.lam, r.method, r.seconds)
        for j, r in zip(jobs, results, strict=True)
    ]
    return nodes, steps


def tree_merge(
    model: nn.Module,
    nodes: Sequence[MergeNode],
    config: MergeConfig,
    runner: MergeRunner,
    max_share_ratio: float = 0.0,
) -> tuple[MergeNode, list[MergeStep]]:
    """Merge ``nodes`` pairwise, level by level, until one is left."""
    nodes, steps = list(nodes), []
    levels = max(1, (len(nodes) - 1).bit_length())
    level = 1
    while len(nodes) > 1:
        jobs = [
            pair_job(level, i, nodes[2 * i], nodes[2 * i + 1], config, max_share_ratio) for i in range(len(nodes) // 2)
        ]
        merged, level_steps = _run_level(model, jobs, runner, f"merge level {level}/{levels}")
        nodes = merged + ([nodes[-1]] if len(nodes) % 2 else [])
        steps += level_steps
        level += 1
    return nodes[0], steps


def all_to_one_merge(
    model: nn.Module,
    nodes: Sequence[MergeNode],
    config: MergeConfig,
    runner: MergeRunner,
    max_share_ratio: float = 0.0,
) -> tuple[MergeNode, list[MergeStep]]:
    """Fold every node in turn into one running model."""
    running, steps = nodes[0], []
    for k, node in enumerate(nodes[1:], start=1):
        merged, level_steps = _run_level(
            model, [pair_job(k, 0, running, node, config, max_share_ratio)], runner, f"merge {k}/{len(nodes) - 1}"
        )
        running = merged[0]
        steps += level_steps
    return running, steps


def universe_merge(
    model: nn.Module,
    nodes: Sequence[MergeNode],
    config: MergeConfig,
    runner: MergeRunner,
    max_share_ratio: float = 0.0,
) -> tuple[MergeNode, list[MergeStep]]:
    """Merge all ``nodes`` at once in a shared universe; data-free (``wm``) when some client sent no surrogate.
    One merge of every client: the share cap is the round's, which the defences' count cap already applies."""
    missing = tuple(m for node in nodes for m in node.without_surrogate)
    surrogates = [node.surrogate for node in nodes if node.surrogate is not None]
    union = concat(surrogates, name="surrogate") if surrogates and not missing else None
    if config.method in DATA_METHODS and missing:
        log.warning(
            "client(s) %s sent no surrogate: merging all %d clients by data-free weight matching instead of %s",
            list(missing),
            len(nodes),
            config.method,
        )
        config = replace(config, method="wm")
    members = tuple(m for node in nodes for m in node.members)
    start = time.perf_counter()
    log.info("universe merge of %d clients (%s, %s alignment)", len(nodes), config.method, config.alignment)
    result = merge_models(
        model, [n.state for n in nodes], [n.num_examples for n in nodes], union, config, runner_device(runner)
    )
    log.info("universe merge done in %.1f s (alignment %.1f s)", time.perf_counter() - start, result.align_seconds)
    merged = MergeNode(result.state, members, sum(n.num_examples for n in nodes), union, missing)
    weight = 1.0 - nodes[0].num_examples / merged.num_examples if merged.num_examples else 0.0
    step = MergeStep(1, 0, nodes[0].members, members[len(nodes[0].members) :], weight, result.method, result.seconds)
    return merged, [step]


def runner_device(runner: MergeRunner) -> torch.device | str:
    """Where ``runner`` merges (its ``device`` attribute), else this process's default device."""
    device = getattr(runner, "device", None)
    return device if device is not None else default_device()


def run_schedule(
    schedule: Schedule,
    model: nn.Module,
    nodes: Sequence[MergeNode],
    config: MergeConfig,
    runner: MergeRunner,
    max_share_ratio: float = 0.0,
) -> tuple[MergeNode, list[MergeStep]]:
    """Merge ``nodes`` (sorted by partition id) into one with the named schedule; with ``max_share_ratio`` r > 0 no
    client holds more than r / m of any pairwise merge of m clients (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown merge schedule {schedule!r}; choose from {SCHEDULES}")
    if not nodes:
        raise ValueError("nothing to merge: no client models")
    merge = {"tree": tree_merge, "all-to-one": all_to_one_merge, "universe": universe_merge}[schedule]
    if max_share_ratio and max_share_ratio < 1:
        raise ValueError(f"max_share_ratio must be 0 (no cap) or >= 1, got {max_share_ratio}")
    return merge(model, nodes, config, runner, max_share_ratio)
