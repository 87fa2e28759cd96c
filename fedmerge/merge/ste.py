"""STE merging (Ainsworth et al. 2023; used across datasets by Yamada et al., ACML 2024).

A soft copy ``theta_tilde`` of model B's aligned weights is learned. Each step projects it to
the nearest permutation of B (weight matching, ``theta_tilde`` as target), forms the merged
weights ``(1 - lam) * A + lam * P(B)`` with a straight-through estimator so gradients reach
``theta_tilde``, and takes a gradient step on the surrogate loss. The projection is the cost of
a step, so it is warm-started from the previous step's permutation and runs one coordinate
sweep (``projection="warm"``); ``projection="full"`` re-solves weight matching from scratch
every step (the plain implementation, kept for the speed benchmark).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align.permute import Perms, State, apply_permutation
from fedmerge.align.weight_matching import weight_matching
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import forward_with, split_state
from fedmerge.merge.interpolate import interpolate_states
from fedmerge.models.spec import PermutationSpec
from fedmerge.train import TrainConfig, adam_config, batches, fit

log = logging.getLogger(__name__)


Projection = Literal["warm", "full"]
"""How each STE step finds B's nearest permutation: a warm-started single sweep, or weight matching from scratch."""


@dataclass(frozen=True)
class STEConfig:
    """Hyper-parameters of STE merging."""

    steps: int = 300
    lr: float = 1e-2
    batch_size: int = 256
    projection: Projection = "warm"  # "warm": warm-started single sweep; "full": weight matching from scratch

    def __post_init__(self) -> None:
        if self.projection not in ("warm", "full"):
            raise ValueError(f"projection must be 'warm' or 'full', got {self.projection!r}")
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"STE needs steps >= 0, lr > 0 and batch_size >= 1, got {self}")

    def train_config(self) -> TrainConfig:
        """The optimiser settings (Adam, no weight decay) as a ``TrainConfig``."""
        return adam_config(self.lr, self.batch_size)


@dataclass
class STEResult:
    """Merged state, the permutation of B it used, the loss of every step and the time the steps took.

    ``kept_start`` is true when STE ended worse on the surrogate than its weight-matching start, which
    was then returned instead.
    """

    state: State
    perms: Perms
    losses: list[float] = field(default_factory=list)
    step_seconds: float = 0.0
    kept_start: bool = False


class _Projector:
    """Nearest permutation of B to the current soft target, warm-started from the last answer."""

    def __init__(self, spec: PermutationSpec, state_b: State, perms: Perms, mode: str, seed: int):
        self.spec, self.state_b, self.perms, self.mode, self.seed = spec, state_b, perms, mode, seed

    def __call__(self, target: State) -> State:
        if self.mode == "warm":
            self.perms = weight_matching(self.spec, target, self.state_b, init=self.perms, max_sweeps=1, seed=self.seed)
        else:
            self.perms = weight_matching(self.spec, target, self.state_b, seed=self.seed)
        return apply_permutation(self.spec, self.perms, self.state_b)


def ste_merge(
    model: nn.Module,
    spec: PermutationSpec,
    state_a: State,
    state_b: State,
    surrogate: LabeledImages,
    lam: float = 0.5,
    config: STEConfig = STEConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> STEResult:
    """Merge B into A with permutations learned by the straight-through estimator on ``surrogate``.

    Permutations are matched on parameters only (not BatchNorm running statistics), as in the
    projection of every step. ``model`` is only read: a copy runs the forward passes.
    """
    if len(surrogate) == 0:
        raise ValueError("STE needs a non-empty surrogate dataset")
    state_a = {k: v.to(device) for k, v in state_a.items()}
    state_b = {k: v.to(device) for k, v in state_b.items()}
    params_a, buffers_a = split_state(model, state_a)
    perms = weight_matching(spec, params_a, state_b, seed=seed)
    soft = {k: v.clone().requires_grad_(True) for k, v in params_a.items()}  # Ainsworth et al.: start at A
    project = _Projector(spec, state_b, perms, config.projection, seed)
    model = copy.deepcopy(model).to(device).train()
    data = surrogate.to(device)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        projected = project({k: v.detach() for k, v in soft.items()})
        merged = {k: (1 - lam) * params_a[k] + lam * (soft[k] + (projected[k] - soft[k]).detach()) for k in soft}
        return F.cross_entropy(forward_with(model, merged, buffers_a, x), y)

    start = time.perf_counter()
    losses = fit(soft.values(), loss_fn, data, config.train_config(), seed, steps=config.steps, description="STE")
    step_seconds = time.perf_counter() - start
    final = weight_matching(spec, {k: v.detach() for k, v in soft.items()}, state_b, init=project.perms, seed=seed)
    # Like the reference implementation, never return a merge worse on the surrogate than where STE started.
    aligned_start, aligned_final = (apply_permutation(spec, p, state_b) for p in (perms, final))
    start_loss, final_loss = (
        merge_loss(model, params_a, buffers_a, b, lam, data, config.batch_size) for b in (aligned_start, aligned_final)
    )
    kept_start = final_loss > start_loss
    if kept_start:
        log.info(
            "STE ended worse on the surrogate (%.4f) than weight matching (%.4f): keeping weight matching",
            final_loss,
            start_loss,
        )
        final, aligned_final = perms, aligned_start
    merged = interpolate_states(state_a, aligned_final, lam)
    return STEResult({k: v.detach().cpu() for k, v in merged.items()}, final, losses, step_seconds, kept_start)


@torch.no_grad()
def merge_loss(
    model: nn.Module,
    params_a: State,
    buffers_a: State,
    aligned_b: State,
    lam: float,
    data: LabeledImages,
    batch_size: int,
) -> float:
    """Mean cross-entropy on ``data`` of the ``lam``-interpolation of A's parameters and aligned B's.

    The forward pass runs as in training (BatchNorm on batch statistics).
    """
    merged = {k: torch.lerp(v, aligned_b[k], lam) for k, v in params_a.items()}
    total = sum(
        F.cross_entropy(forward_with(model, merged, buffers_a, x), y, reduction="sum").item()
        for x, y in batches(data, batch_size, shuffle=False)
    )
    return total / len(data)
