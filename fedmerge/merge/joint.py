"""Merging N aligned models at once, instead of a tree of pairwise merges (which compounds error).

``joint_ste_merge`` is the N-model form of STE merging (Ainsworth et al. 2023; Yamada et al., ACML 2024):
client i keeps a soft target ``theta_i``; every step each client is projected to its nearest permutation of
its target (warm-started single weight-matching sweep, as in ``ste.py``), the merged parameters are the
weighted mean of the projections with a straight-through estimator ``theta_i + (P_i(w_i) - theta_i).detach()``,
and Adam lowers the surrogate cross-entropy of the merged model. ``joint_np_merge`` is the N-model form of
NP Merge (Orozco Camacho et al., 2024): one softmax over the N clients per scalar parameter.

Both take clients already mapped into one shared frame (e.g. by a universe alignment): ``joint_ste_merge``
takes the permutations ``init_perms`` that do it, ``joint_np_merge`` the aligned state dicts.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align.permute import Perms, State, apply_permutation
from fedmerge.align.weight_matching import weight_matching
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import forward_with, split_state
from fedmerge.merge.interpolate import weighted_average
from fedmerge.merge.np_merge import NPConfig
from fedmerge.merge.ste import STEConfig, _Projector
from fedmerge.models.spec import PermutationSpec
from fedmerge.train import batches, fit

log = logging.getLogger(__name__)

INITS = ("aligned", "mean")
T = TypeVar("T")


@dataclass
class JointResult:
    """Merged state (weighted mean of the aligned clients), each client's permutation into it, step losses.

    ``kept_start`` is true when the permutations STE ended with gave a worse surrogate loss than ``init_perms``,
    which were then kept. ``seconds`` is the wall time of the whole merge.
    """

    state: State
    perms: list[Perms]
    losses: list[float] = field(default_factory=list)
    kept_start: bool = False
    seconds: float = 0.0


def normalized_weights(
    states: Sequence[State], weights: Sequence[float], surrogate: LabeledImages, what: str
) -> list[float]:
    """Check the common inputs of the joint merges; return the weights scaled to sum to one."""
    if len(surrogate) == 0:
        raise ValueError(f"{what} needs a non-empty surrogate dataset")
    if not states:
        raise ValueError(f"{what} needs at least one state dict")
    if len(weights) != len(states):
        raise ValueError(f"{what} needs one weight per state dict: {len(weights)} weights for {len(states)} states")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"{what} needs finite non-negative weights, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"{what} needs weights with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _mean_state(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted mean of the floating-point entries (weights already normalised); integer entries from the first."""
    mean: State = {}
    for k, first in states[0].items():
        if first.is_floating_point():
            mean[k] = weights[0] * first
            for s, w in zip(states[1:], weights[1:], strict=True):
                mean[k] = mean[k] + w * s[k]
        else:
            mean[k] = first.clone()
    return mean


def joint_ste_merge(
    model: nn.Module,
    spec: PermutationSpec,
    states: Sequence[State],
    weights: Sequence[float],
    surrogate: LabeledImages,
    init_perms: Sequence[Perms],
    config: STEConfig = STEConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
    init: str = "mean",
    workers: int = 1,
) -> JointResult:
    """Learn every client's permutation into one merged model with the straight-through estimator.

    ``apply_permutation(spec, init_perms[i], states[i])`` must put client i in the shared frame. ``surrogate``
    is the union of the clients' surrogates. ``init`` chooses where the soft targets start: ``"aligned"``
    (each at its own aligned client, so step 0 projects to ``init_perms``) or ``"mean"`` (all at the weighted
    mean of the aligned clients, so step 0 already re-matches every client to the mean). Permutations are
    matched on parameters only; BatchNorm buffers of the merge are the weighted mean of the aligned clients'.
    ``workers > 1`` runs the N projections of a step in threads (same result). ``model`` is only read.
    """
    start_time = time.perf_counter()
    w = normalized_weights(states, weights, surrogate, "joint STE")
    if len(init_perms) != len(states):
        raise ValueError(
            f"joint STE needs one init permutation per state dict: got {len(init_perms)} for {len(states)}"
        )
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    states = [{k: v.to(device) for k, v in s.items()} for s in states]
    start_perms = [{p: v.clone() for p, v in perms.items()} for perms in init_perms]
    aligned = [apply_permutation(spec, p, s) for p, s in zip(start_perms, states, strict=True)]
    names = list(split_state(model, aligned[0])[0])
    # One soft target per client, stacked per parameter: soft[k][i] is client i's target for k.
    if init == "aligned":
        soft = {k: torch.stack([a[k] for a in aligned]) for k in names}
    else:
        mean = _mean_state(aligned, w)
        soft = {k: mean[k].unsqueeze(0).repeat(len(states), *([1] * mean[k].ndim)) for k in names}
    soft = {k: v.detach().clone().requires_grad_(True) for k, v in soft.items()}
    w_col = {k: _column(w, v) for k, v in soft.items()}  # weights shaped to broadcast against soft[k]
    projectors = [_Projector(spec, s, p, config.projection, seed) for s, p in zip(states, start_perms, strict=True)]
    net = copy.deepcopy(model).to(device).train()
    data = surrogate.to(device)
    pool = ThreadPoolExecutor(workers) if workers > 1 and len(states) > 1 else None

    def target(i: int) -> State:
        return {k: v[i].detach() for k, v in soft.items()}

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        projected = _map(pool, lambda i: projectors[i](target(i)), range(len(states)))
        with torch.no_grad():
            value = _mean_state(projected, w)
        # Straight-through: the forward value is the weighted mean of the projections, the gradient reaches
        # every soft target as if the merge were their weighted mean.
        params = {}
        for k in names:
            surrogate_sum = (w_col[k] * soft[k]).sum(0)
            params[k] = surrogate_sum + (value[k] - surrogate_sum).detach()
        buffers = {k: v for k, v in value.items() if k not in soft}
        return F.cross_entropy(forward_with(net, params, buffers, x), y)

    try:
        losses = fit(
            soft.values(), loss_fn, data, config.train_config(), seed, steps=config.steps, description="joint STE"
        )
        # Like ste.py: a full weight matching to each final soft target, warm-started from the last projection.
        final = _map(
            pool,
            lambda i: weight_matching(spec, target(i), states[i], init=projectors[i].perms, seed=seed),
            range(len(states)),
        )
    finally:
        if pool is not None:
            pool.shutdown()
    final_aligned = [apply_permutation(spec, p, s) for p, s in zip(final, states, strict=True)]
    start_loss, final_loss = (
        _average_loss(net, names, a, w, data, config.batch_size) for a in (aligned, final_aligned)
    )
    kept_start = final_loss > start_loss
    if kept_start:
        log.info(
            "joint STE ended worse on the surrogate (%.4f) than its start (%.4f): keeping init_perms",
            final_loss,
            start_loss,
        )
        final, final_aligned = start_perms, aligned
    merged = weighted_average(final_aligned, w)
    state = {k: v.detach().cpu() for k, v in merged.items()}
    perms = [{p: v.cpu() for p, v in f.items()} for f in final]
    return JointResult(state, perms, losses, kept_start, time.perf_counter() - start_time)


def _map(pool: ThreadPoolExecutor | None, fn: Callable[[int], T], items: Iterable[int]) -> list[T]:
    """``[fn(i) for i in items]``, in ``pool``'s threads when there is one (same results, same order)."""
    return [fn(i) for i in items] if pool is None else list(pool.map(fn, items))


def _column(w: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The weights as a tensor of shape ``(N, 1, ..., 1)`` that broadcasts against ``like`` (N, *shape)."""
    return torch.tensor(w, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def _average_loss(
    net: nn.Module, names: list[str], aligned: Sequence[State], w: Sequence[float], data: LabeledImages, batch_size: int
) -> float:
    """Mean surrogate cross-entropy of the weighted mean of ``aligned`` (forward in train mode, as in the steps)."""
    mean = _mean_state(aligned, w)
    params = {k: mean[k] for k in names}
    buffers = {k: v for k, v in mean.items() if k not in params}
    total = sum(
        F.cross_entropy(forward_with(net, params, buffers, x), y, reduction="sum").item()
        for x, y in batches(data, batch_size, shuffle=False)
    )
    return total / len(data)


def joint_np_merge(
    model: nn.Module,
    aligned_states: Sequence[State],
    weights: Sequence[float],
    surrogate: LabeledImages,
    config: NPConfig = NPConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[State, list[float]]:
    """N-model NP Merge: ``merged = sum_i softmax_i(logits) * param_i`` per scalar, logits learned with Adam.

    The logits start at ``log(weights)``, so with ``config.steps == 0`` the result is the weighted average.
    Clients with zero weight are left out. Buffers are the weighted average. Returns (merged state, step losses).
    """
    w = normalized_weights(aligned_states, weights, surrogate, "joint NP Merge")
    kept = [i for i, wi in enumerate(w) if wi > 0]
    w = [w[i] for i in kept]
    states = [{k: v.to(device) for k, v in aligned_states[i].items()} for i in kept]
    names = list(split_state(model, states[0])[0])
    stacked = {k: torch.stack([s[k] for s in states]) for k in names}  # (N, *shape), built once
    log_w = [math.log(wi) for wi in w]  # softmax(log w) = w: step 0 is the weighted average
    logits = {k: _column(log_w, v).expand_as(v).clone().requires_grad_(True) for k, v in stacked.items()}
    buffers = _mean_state([{k: v for k, v in s.items() if k not in stacked} for s in states], w)
    net = copy.deepcopy(model).to(device).train()

    def merged_params() -> State:
        return {k: (torch.softmax(logits[k], 0) * stacked[k]).sum(0) for k in names}

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward_with(net, merged_params(), buffers, x), y)

    data = surrogate.to(device)
    losses = fit(
        logits.values(), loss_fn, data, config.train_config(), seed, steps=config.steps, description="joint NP Merge"
    )
    with torch.no_grad():
        merged = {**buffers, **merged_params()}
    return {k: merged[k].detach().cpu() for k in aligned_states[0]}, losses
