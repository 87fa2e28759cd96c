"""The one training / evaluation loop every component uses (clients, fine-tuning, baselines)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.progress import progress


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of local training."""

    epochs: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" (cosine schedule) or "adam"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"invalid training config: {self}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


def adam_config(lr: float, batch_size: int) -> TrainConfig:
    """Adam without weight decay: how merge methods optimise their own variables (not network weights)."""
    return TrainConfig(lr=lr, batch_size=batch_size, optimizer="adam", weight_decay=0.0)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def batches(data: LabeledImages, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True):
    """Yield ``(x, y)`` mini-batches of in-memory data (shuffled with ``generator``)."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size].to(data.x.device)
        yield data.x[idx], data.y[idx]


def fit(
    params: Iterable[torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: LabeledImages,
    config: TrainConfig,
    seed: int = 0,
    steps: int | None = None,
    description: str = "training",
) -> list[float]:
    """Minimise ``loss_fn(x, y)`` over mini-batches of ``data`` by updating ``params``.

    Runs ``steps`` optimizer steps when given, else ``config.epochs`` epochs, with a cosine
    learning-rate schedule. Returns the loss of every step. ``data`` must already sit on
    the device the loss is computed on.
    """
    if len(data) == 0:
        raise ValueError(f"cannot train on an empty dataset ({data.name or 'unnamed'})")
    generator = torch.Generator().manual_seed(seed)
    params = list(params)
    optimizer = make_optimizer(params, config)
    steps_per_epoch = -(-len(data) // config.batch_size)
    total = steps if steps is not None else config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total))
    losses: list[float] = []
    stream = _endless_batches(data, config.batch_size, generator)
    for _ in progress(range(total), description, total=total):
        x, y = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def _endless_batches(data: LabeledImages, batch_size: int, generator: torch.Generator):
    while True:
        yield from batches(data, batch_size, generator)


def train(
    model: nn.Module,
    data: LabeledImages,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
    description: str = "training",
) -> nn.Module:
    """Train ``model`` in place on ``data`` with cross-entropy and return it (in eval mode)."""
    model.to(device).train()
    fit(
        model.parameters(),
        lambda x, y: F.cross_entropy(model(x), y),
        data.to(device),
        config,
        seed,
        description=description,
    )
    return model.eval()


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: LabeledImages, batch_size: int = 1024, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logits of ``model`` on every image of ``data`` (in order), on the CPU."""
    model.to(device).eval()
    out = [model(x.to(device)).cpu() for x, _ in batches(data, batch_size, shuffle=False)]
    return torch.cat(out) if out else torch.empty(0, data.num_classes)


def accuracy_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * (logits.argmax(1) == labels.cpu()).float().mean().item()


def evaluate(model: nn.Module, data: LabeledImages, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``data`` in percent."""
    return accuracy_of_logits(predict_logits(model, data, device=device), data.y)
