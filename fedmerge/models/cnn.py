"""A small convolutional network: two conv blocks and a two-layer classifier."""

from __future__ import annotations

import torch
from torch import nn

from fedmerge.models.spec import AxesToPerm, PermutationSpec, conv_axes, linear_axes


def scaled(channels: int, width: float) -> int:
    """``channels`` times a width multiplier, rounded, and at least 1."""
    return max(1, round(channels * width))


class SmallCNN(nn.Module):
    """conv(32w)-relu-maxpool-conv(64w)-relu-maxpool-fc(128w)-relu-fc(classes), all with bias.

    The first fully connected layer is stored as a convolution whose kernel covers the
    whole final feature map (identical to flatten + ``nn.Linear``), so its weight has
    shape (out, channels, h, w) and the channel axis can carry ``P_conv2``.
    """

    def __init__(self, in_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, width: float = 1.0):
        super().__init__()
        channels, height, breadth = in_shape
        c1, c2, hidden = scaled(32, width), scaled(64, width), scaled(128, width)
        self.conv1 = nn.Conv2d(channels, c1, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        h, w = height // 4, breadth // 4
        if h < 1 or w < 1:
            raise ValueError(f"SmallCNN needs images of at least 4x4 pixels, got {in_shape}")
        self.fc1 = nn.Conv2d(c2, hidden, kernel_size=(h, w))
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(x))
        return self.fc2(x.flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        """``P_conv1``, ``P_conv2`` and ``P_fc1`` permute the three hidden layers' units."""
        axes: AxesToPerm = {}
        axes |= conv_axes("conv1", "P_conv1", None, bias=True)
        axes |= conv_axes("conv2", "P_conv2", "P_conv1", bias=True)
        axes |= conv_axes("fc1", "P_fc1", "P_conv2", bias=True)
        axes |= linear_axes("fc2", None, "P_fc1")
        return PermutationSpec(axes)

    def activation_points(self) -> dict[str, str]:
        """Post-ReLU module of every permutation."""
        return {"P_conv1": "relu1", "P_conv2": "relu2", "P_fc1": "relu3"}
