"""Multi-layer perceptron (3x512 hidden by default, as in Ainsworth et al. and Yamada et al.)."""

from __future__ import annotations

import torch
from torch import nn

from fedmerge.models.spec import AxesToPerm, PermutationSpec, linear_axes


class MLP(nn.Module):
    """Flatten -> ``depth`` x (Linear + ReLU) -> Linear classifier."""

    def __init__(
        self, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 512, depth: int = 3
    ):
        super().__init__()
        in_features = int(torch.tensor(in_shape).prod())
        sizes = [in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        """Hidden layer i has its own permutation ``P_i``; input pixels and logits are fixed."""
        axes: AxesToPerm = {}
        previous = None
        for i in range(len(self.hidden)):
            axes |= linear_axes(f"hidden.{i}", f"P_{i}", previous)
            previous = f"P_{i}"
        axes |= linear_axes("head", None, previous)
        return PermutationSpec(axes)

    def activation_points(self) -> dict[str, str]:
        """Module whose output carries each permutation (the hidden Linear layers; ReLU is applied functionally)."""
        return {f"P_{i}": f"hidden.{i}" for i in range(len(self.hidden))}
