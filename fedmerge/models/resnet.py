"""CIFAR-style ResNet20 (He et al., 2016) with a width multiplier and 1x1-conv shortcuts."""

from __future__ import annotations

import torch
from torch import nn

from fedmerge.models.cnn import scaled
from fedmerge.models.spec import AxesToPerm, PermutationSpec, batchnorm_axes, conv_axes, linear_axes


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut (identity, or 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu2 = nn.ReLU()

    @property
    def has_projection(self) -> bool:
        """Whether the shortcut is a 1x1 conv + BN rather than the identity."""
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))

    def axes(self, name: str, p_in: str, p_inner: str, p_out: str) -> AxesToPerm:
        """Spec entries of this block (module path ``name``)."""
        axes: AxesToPerm = {}
        axes |= conv_axes(f"{name}.conv1", p_inner, p_in)
        axes |= batchnorm_axes(f"{name}.bn1", p_inner)
        axes |= conv_axes(f"{name}.conv2", p_out, p_inner)
        axes |= batchnorm_axes(f"{name}.bn2", p_out)
        if self.has_projection:
            axes |= conv_axes(f"{name}.shortcut.0", p_out, p_in)
            axes |= batchnorm_axes(f"{name}.shortcut.1", p_out)
        elif p_in != p_out:
            raise ValueError(f"{name}: identity shortcut cannot change the permutation {p_in} -> {p_out}")
        return axes


class ResNet20(nn.Module):
    """Stem conv, three stages of ``blocks_per_stage`` BasicBlocks (16/32/64 x width channels), GAP, linear head.

    Works on any input size (e.g. 3x32x32 or 1x28x28) thanks to the global average pool.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        width: float = 1.0,
        blocks_per_stage: int = 3,
    ):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        stages = []
        for s, out in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(channels, out, stride))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def stages(self) -> list[tuple[str, nn.Sequential]]:
        """``(module name, stage)`` for the three stages."""
        return [("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))

    def permutation_spec(self) -> PermutationSpec:
        """Residual stream of stage ``s`` is ``P_res{s}`` (stem, block outputs, shortcuts).

        The inner channels of block ``b`` of stage ``s`` are ``P_layer{s}.{b}``.
        """
        axes: AxesToPerm = {}
        stream = "P_res1"
        axes |= conv_axes("conv1", stream, None)
        axes |= batchnorm_axes("bn1", stream)
        for s, (stage_name, stage) in enumerate(self.stages(), start=1):
            out_stream = f"P_res{s}"
            for b, block in enumerate(stage):
                assert isinstance(block, BasicBlock)
                axes |= block.axes(f"{stage_name}.{b}", stream, f"P_{stage_name}.{b}", out_stream)
                stream = out_stream
        axes |= linear_axes("fc", None, stream)
        return PermutationSpec(axes)

    def activation_points(self) -> dict[str, str]:
        """Inner channels: the block's first ReLU; residual streams: the output of the stage's last block."""
        points: dict[str, str] = {}
        for s, (stage_name, stage) in enumerate(self.stages(), start=1):
            for b in range(len(stage)):
                points[f"P_{stage_name}.{b}"] = f"{stage_name}.{b}.relu1"
            points[f"P_res{s}"] = f"{stage_name}.{len(stage) - 1}"
        return points
