"""Build any model of the library by name, or a freshly initialised copy of a given one."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmerge.models.cnn import SmallCNN
from fedmerge.models.mlp import MLP
from fedmerge.models.resnet import ResNet20
from fedmerge.models.vgg import VGG11

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "vgg11", "resnet20")
MLP_DEFAULT_WIDTH = 512


def build_model(
    name: str,
    in_shape: tuple[int, int, int],
    num_classes: int = 10,
    width: float | None = None,
    **kwargs,
) -> nn.Module:
    """The model called ``name`` (one of ``MODEL_NAMES``) for images of shape ``in_shape``.

    ``width`` is the number of hidden units for ``"mlp"`` (default 512) and a channel
    multiplier for the others (default 1.0; fractions allowed, every layer keeps >= 1 channel).
    Extra keyword arguments go to the model's constructor (e.g. ``depth``, ``batch_norm``,
    ``blocks_per_stage``).
    """
    key = name.strip().lower()
    in_shape = tuple(int(d) for d in in_shape)  # type: ignore[assignment]
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape}")
    if width is not None and width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if key == "mlp":
        units = MLP_DEFAULT_WIDTH if width is None else width
        if units != int(units):
            raise ValueError(f"MLP width is a number of hidden units and must be an integer, got {width}")
        return MLP(in_shape, num_classes, width=int(units), **kwargs)
    multiplier = 1.0 if width is None else float(width)
    if key == "cnn":
        return SmallCNN(in_shape, num_classes, width=multiplier, **kwargs)
    if key == "vgg11":
        return VGG11(in_shape, num_classes, width=multiplier, **kwargs)
    if key == "resnet20":
        return ResNet20(in_shape, num_classes, width=multiplier, **kwargs)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def reinitialized_copy(model: nn.Module, seed: int | None = None) -> nn.Module:
    """A copy of ``model`` with every submodule that has ``reset_parameters`` (Linear, Conv, BatchNorm, ...)
    re-initialised, under ``seed`` when given; parameters registered without one keep ``model``'s values."""
    fresh = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh
