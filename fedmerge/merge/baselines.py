"""Reference points for merging: output ensembles, fine-tuning on the surrogate, training from scratch on it."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.models.registry import reinitialized_copy
from fedmerge.train import TrainConfig, train


class Ensemble(nn.Module):
    """Weighted average of the members' class probabilities; returns log-probabilities.

    ``weights`` is either one non-negative number per member (every class mixed alike, e.g. sample counts) or a
    members x classes table (class-wise weights, e.g. from :func:`class_weights` of the members' label counts): then
    class ``c``'s probability is ``sum_m W[m, c] p_m(c | x)``, renormalised over the classes, so each member speaks
    for the classes it has seen in proportion to how many of their examples it holds.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        given = [1.0] * len(members) if weights is None else weights
        w = torch.as_tensor(given, dtype=torch.float32).clone()
        if w.dim() not in (1, 2) or len(w) != len(members) or (w < 0).any() or not torch.isfinite(w).all():
            raise ValueError(
                f"ensemble weights must be one non-negative number (or one row per class) per member, got {weights}"
            )
        totals = w.sum(0)
        if (totals <= 0).any():
            raise ValueError(f"ensemble weights must not be all zero (for any class), got {weights}")
        self.weights: torch.Tensor
        self.register_buffer("weights", w / totals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members])
        if self.weights.dim() == 1:
            mixed = torch.einsum("m,mbc->bc", self.weights, probs)
        else:
            if self.weights.shape[1] != probs.shape[2]:
                raise ValueError(
                    f"class-wise ensemble weights cover {self.weights.shape[1]} classes, the members "
                    f"predict {probs.shape[2]}"
                )
            mixed = torch.einsum("mc,mbc->bc", self.weights, probs)
            mixed = mixed / mixed.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.log(mixed.clamp_min(1e-12))


def class_weights(label_counts: torch.Tensor, smoothing: float = 0.5) -> torch.Tensor:
    """Class-wise ensemble weights (members x classes) from the members' training label counts.

    Member ``m``'s weight for class ``c`` is its share of that class's examples, ``(n[m, c] + smoothing) /
    sum_k (n[k, c] + smoothing)``: a client that never saw class ``c`` hardly votes on it (the smoothing keeps
    every weight positive, so a class no client saw is judged by all alike).
    """
    counts = torch.as_tensor(label_counts, dtype=torch.float64)
    if counts.dim() != 2 or (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError(f"label counts must be a members x classes table of non-negative numbers, got {label_counts}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be positive, got {smoothing}")
    smoothed = counts + smoothing
    return (smoothed / smoothed.sum(0, keepdim=True)).float()


def fine_tune(
    model: nn.Module, surrogate: LabeledImages, config: TrainConfig, seed: int = 0, device: torch.device | str = "cpu"
) -> nn.Module:
    """A copy of ``model`` trained further on the surrogate data."""
    return train(copy.deepcopy(model), surrogate, config, seed=seed, device=device, description="fine-tune")


def train_from_scratch(
    model: nn.Module, surrogate: LabeledImages, config: TrainConfig, seed: int = 0, device: torch.device | str = "cpu"
) -> nn.Module:
    """A freshly initialised copy of ``model``'s architecture trained only on the surrogate ("Coreset AB")."""
    return train(
        reinitialized_copy(model, seed), surrogate, config, seed=seed, device=device, description="train on surrogate"
    )
