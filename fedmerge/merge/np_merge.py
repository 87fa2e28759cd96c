"""NP Merge (Orozco Camacho et al., 2024): a learned interpolation coefficient per parameter.

After alignment, every scalar weight gets its own ``alpha = sigmoid(alpha_pre)`` (initialised to
the plain interpolation weight) and the merged weight is ``alpha * A + (1 - alpha) * B``; the
``alpha_pre`` are trained with Adam on the surrogate loss while A and B stay frozen.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align.permute import State
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import forward_with, split_state
from fedmerge.merge.interpolate import interpolate_states
from fedmerge.train import TrainConfig, adam_config, fit


@dataclass(frozen=True)
class NPConfig:
    """Hyper-parameters of NP Merge."""

    steps: int = 300
    lr: float = 1e-2
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"NP Merge needs steps >= 0, lr > 0 and batch_size >= 1, got {self}")

    def train_config(self) -> TrainConfig:
        """The optimiser settings (Adam, no weight decay) as a ``TrainConfig``."""
        return adam_config(self.lr, self.batch_size)


def np_merge(
    model: nn.Module,
    state_a: State,
    state_b_aligned: State,
    surrogate: LabeledImages,
    lam: float = 0.5,
    config: NPConfig = NPConfig(),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[State, list[float]]:
    """Learn per-parameter coefficients between A and aligned B; return (merged state, step losses)."""
    if len(surrogate) == 0:
        raise ValueError("NP Merge needs a non-empty surrogate dataset")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"NP Merge needs lambda strictly inside (0, 1), got {lam}")
    params_a, buffers_a = split_state(model, {k: v.to(device) for k, v in state_a.items()})
    params_b, buffers_b = split_state(model, {k: v.to(device) for k, v in state_b_aligned.items()})
    logit = math.log((1 - lam) / lam)  # sigmoid(logit) = 1 - lam = weight of A
    alpha_pre = {k: torch.full_like(v, logit, requires_grad=True) for k, v in params_a.items()}
    model = copy.deepcopy(model).to(device).train()  # the caller's template is left as it was

    def merged_params() -> State:
        return {k: torch.lerp(params_b[k], params_a[k], torch.sigmoid(alpha_pre[k])) for k in params_a}

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward_with(model, merged_params(), buffers_a, x), y)

    losses = fit(
        alpha_pre.values(),
        loss_fn,
        surrogate.to(device),
        config.train_config(),
        seed,
        steps=config.steps,
        description="NP Merge",
    )
    with torch.no_grad():
        # Buffers (BatchNorm running statistics) are interpolated linearly; a BN reset follows.
        merged = {**interpolate_states(buffers_a, buffers_b, lam), **merged_params()}
    return {k: merged[k].detach().cpu() for k in state_a}, losses
