"""Activation matching (Ainsworth et al., 2023; Entezari et al., 2022): align units by their activations.

Both models see the same inputs; for every permutation we record the activations of the
module named by ``model.activation_points()`` (every spatial position counts as a sample),
correlate A's units with B's, and solve one assignment problem per permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedmerge.align.permute import Perms
from fedmerge.align.weight_matching import solve_assignment
from fedmerge.data.images import LabeledImages
from fedmerge.models.protocol import activation_points, model_spec

METRICS = ("correlation", "inner")


def _as_units(output: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) activations -> (samples, C), treating every spatial position as a sample."""
    if output.ndim == 2:
        return output
    return output.movedim(1, -1).reshape(-1, output.shape[1])


class _CrossMoments:
    """Running sums for the cross-covariance of two sets of units, in float64."""

    def __init__(self) -> None:
        self.n = 0
        # sum of a, sum of b, sum of a^2, sum of b^2, a^T b
        self.sums: list[torch.Tensor] = []

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        parts = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b]
        self.sums = parts if not self.sums else [old + new for old, new in zip(self.sums, parts, strict=True)]
        self.n += len(a)

    def similarity(self, metric: str, eps: float = 1e-12) -> torch.Tensor:
        """``S[i, j]`` between unit ``i`` of A and unit ``j`` of B: Pearson correlation or mean inner product."""
        if not self.sums:
            raise ValueError("no activations were recorded")
        sum_a, sum_b, sq_a, sq_b, cross = self.sums
        if metric == "inner":
            return cross / self.n
        mean_a, mean_b = sum_a / self.n, sum_b / self.n
        cov = cross / self.n - torch.outer(mean_a, mean_b)
        std_a = (sq_a / self.n - mean_a**2).clamp_min(0).sqrt()
        std_b = (sq_b / self.n - mean_b**2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + eps)


@contextmanager
def record_activations(model: nn.Module, points: dict[str, str]):
    """Forward hooks storing, for each permutation name, the last output of its module (as (samples, C))."""
    modules = dict(model.named_modules())
    missing = sorted(m for m in points.values() if m not in modules)
    if missing:
        raise ValueError(f"activation points name unknown modules: {missing}")
    store: dict[str, torch.Tensor] = {}

    def hook(perm: str):
        def save(_module, _inputs, output):
            store[perm] = _as_units(output.detach())

        return save

    handles = [modules[module].register_forward_hook(hook(perm)) for perm, module in points.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _inputs(data: LabeledImages | torch.Tensor) -> torch.Tensor:
    x = data.x if isinstance(data, LabeledImages) else data
    if not isinstance(x, torch.Tensor) or len(x) == 0:
        raise ValueError("activation matching needs a non-empty tensor or LabeledImages of inputs")
    return x


def paired_activations(
    model_a: nn.Module,
    model_b: nn.Module,
    points: dict[str, str],
    data: LabeledImages | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Run both models on ``data`` batch by batch and yield, per batch, each model's recorded activations at
    ``points`` (name -> module, as :func:`record_activations` takes them). Both models run in eval mode on
    ``device``; their previous modes are restored when the iteration ends. Call it under ``torch.no_grad()``."""
    x = _inputs(data)
    modes = (model_a.training, model_b.training)
    model_a.to(device).eval()
    model_b.to(device).eval()
    try:
        with record_activations(model_a, points) as acts_a, record_activations(model_b, points) as acts_b:
            for start in range(0, len(x), batch_size):
                batch = x[start : start + batch_size].to(device)
                model_a(batch)
                model_b(batch)
                yield acts_a, acts_b
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])


@torch.no_grad()
def activation_similarities(
    model_a: nn.Module,
    model_b: nn.Module,
    data: LabeledImages | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    metric: str = "correlation",
) -> dict[str, torch.Tensor]:
    """For every permutation of the architecture, the (units of A) x (units of B) similarity matrix.

    Both models run in eval mode (their previous mode is restored) and are moved to ``device``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    points = activation_points(model_a)
    if points != activation_points(model_b):
        raise ValueError("models A and B have different activation points (different architectures?)")
    perm_names = set(model_spec(model_a).perm_names)
    if set(points) != perm_names:
        raise ValueError(
            f"activation points {sorted(points)} do not match the spec's permutations {sorted(perm_names)}"
        )
    moments = {p: _CrossMoments() for p in points}
    for acts_a, acts_b in paired_activations(model_a, model_b, points, data, batch_size, device):
        for p, m in moments.items():
            m.update(acts_a[p], acts_b[p])
    return {p: m.similarity(metric).cpu() for p, m in moments.items()}


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    data: LabeledImages | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    metric: str = "correlation",
) -> Perms:
    """Permutations ``P`` such that ``apply_permutation(spec, P, model_b.state_dict())`` aligns B to A.

    Same convention as ``weight_matching``: ``P[p][i]`` is the unit of B matched to unit ``i`` of A.
    ``metric`` is ``"correlation"`` (Pearson, the default) or ``"inner"`` (mean inner product).
    """
    sims = activation_similarities(model_a, model_b, data, batch_size, device, metric)
    return {p: solve_assignment(s) for p, s in sims.items()}
