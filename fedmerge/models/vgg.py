"""VGG11 for small images, with a width multiplier and optional BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from fedmerge.models.cnn import scaled
from fedmerge.models.spec import AxesToPerm, PermutationSpec, batchnorm_axes, conv_axes, linear_axes

VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """Eight 3x3 convolutions (each + BN + ReLU), five max-pools, global average pool, linear head.

    Max-pools use ``ceil_mode`` so 28x28 inputs shrink 28-14-7-4-2-1 while 32x32 ones go
    32-16-8-4-2-1 as usual; the adaptive pool then makes the head independent of input size.
    Convolutions followed by BatchNorm have no bias.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: float = 1.0,
        batch_norm: bool = True,
    ):
        super().__init__()
        self.batch_norm = batch_norm
        layers: list[nn.Module] = []
        self._convs: list[tuple[int, int | None, int]] = []  # (conv index, bn index, relu index) in features
        channels = in_shape[0]
        for item in VGG11_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            out = scaled(int(item), width)
            conv_at = len(layers)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not batch_norm))
            bn_at = None
            if batch_norm:
                bn_at = len(layers)
                layers.append(nn.BatchNorm2d(out))
            self._convs.append((conv_at, bn_at, len(layers)))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        """Conv layer ``i`` (0..7) and its BatchNorm share permutation ``P_i``."""
        axes: AxesToPerm = {}
        previous = None
        for i, (conv_at, bn_at, _) in enumerate(self._convs):
            perm = f"P_{i}"
            axes |= conv_axes(f"features.{conv_at}", perm, previous, bias=bn_at is None)
            if bn_at is not None:
                axes |= batchnorm_axes(f"features.{bn_at}", perm)
            previous = perm
        axes |= linear_axes("classifier", None, previous)
        return PermutationSpec(axes)

    def activation_points(self) -> dict[str, str]:
        """The ReLU after conv layer ``i`` carries ``P_i``."""
        return {f"P_{i}": f"features.{relu_at}" for i, (_, _, relu_at) in enumerate(self._convs)}
