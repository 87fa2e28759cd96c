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
    """Weighted average of the members' class probabilities; returns log-probabilities."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(members), dtype=torch.float32)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"ensemble weights must be one non-negative number per member, got {weights}")
        self.weights: torch.Tensor
        self.register_buffer("weights", w / w.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members])
        mixed = torch.einsum("m,mbc->bc", self.weights, probs)
        return torch.log(mixed.clamp_min(1e-12))


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
