"""In-memory labelled image tensors: the one data container the library passes around."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


@dataclass
class LabeledImages(Dataset):
    """Images ``x`` (float32, N x C x H x W, normalised) with integer labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int = 10
    name: str = ""

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"{self.name or 'dataset'}: images must be N x C x H x W, got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.name or 'dataset'}: {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.x.shape[1:]
        return (c, h, w)

    def subset(self, indices: Sequence[int] | torch.Tensor, name: str | None = None) -> LabeledImages:
        """The images at ``indices`` (a copy)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return LabeledImages(self.x[idx], self.y[idx], self.num_classes, name or self.name)

    def class_counts(self) -> torch.Tensor:
        """Number of images of each class."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def to(self, device: torch.device | str) -> LabeledImages:
        """The same data on ``device``."""
        return LabeledImages(self.x.to(device), self.y.to(device), self.num_classes, self.name)


def concat(parts: Sequence[LabeledImages], name: str = "") -> LabeledImages:
    """Stack several datasets with the same image shape and label space into one."""
    if not parts:
        raise ValueError("concat needs at least one dataset")
    shapes = {p.image_shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"cannot concatenate datasets with different image shapes: {sorted(shapes)}")
    return LabeledImages(
        torch.cat([p.x for p in parts]),
        torch.cat([p.y for p in parts]),
        max(p.num_classes for p in parts),
        name or "+".join(p.name for p in parts),
    )
