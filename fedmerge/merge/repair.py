"""Post-merge corrections on surrogate data: BatchNorm reset and REPAIR (Jordan et al., ICLR 2023).

Interpolating two networks shrinks the variance of hidden activations ("variance collapse").
BatchNorm reset recomputes running statistics on data. REPAIR goes further: every corrected unit
gets the mean and standard deviation that interpolating the endpoints' unit statistics gives, by
rescaling the affine parameters that produce it (the rows of a Linear/Conv weight and its bias, or
a BatchNorm's weight and bias).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.train import batches

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains BatchNorm layers."""
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module, data: LabeledImages, batch_size: int = 256, device: torch.device | str = "cpu"
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``data`` (cumulative average); returns ``model``."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return model
    if len(data) == 0:
        raise ValueError("BatchNorm reset needs a non-empty dataset")
    saved_momentum = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.to(device).train()
    try:
        for x, _ in batches(data, batch_size, shuffle=False):
            model(x.to(device))
    finally:
        for m, momentum in zip(bns, saved_momentum, strict=True):
            m.momentum = momentum
    return model.eval()


def repair_points(model: nn.Module) -> list[str]:
    """Modules whose outputs REPAIR corrects: the BatchNorms if any, else every Linear/Conv but the last."""
    bns = [name for name, m in model.named_modules() if isinstance(m, _BN)]
    if bns:
        return bns
    affine = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None]
    return affine[:-1]


@torch.no_grad()
def unit_statistics(
    model: nn.Module, names: list[str], data: LabeledImages, device: torch.device | str = "cpu"
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit (mean, std) of the outputs of the named modules on ``data``.

    Leaves ``model`` in eval mode on ``device``.
    """
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}  # per module: rows (sum, sum of squares, count) x units

    def hook(name: str):
        def record(_module, _inputs, output):
            flat = output.transpose(0, 1).reshape(output.shape[1], -1).double()
            moments = torch.stack([flat.sum(1), (flat**2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])])
            sums[name] = sums[name] + moments if name in sums else moments

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        model.to(device).eval()
        for x, _ in batches(data, 512, shuffle=False):
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    stats = {}
    for name, (total, total_sq, count) in sums.items():
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(0).sqrt()
        stats[name] = (mean.float(), std.float())
    return stats


@torch.no_grad()
def repair(
    merged: nn.Module,
    model_a: nn.Module,
    model_b: nn.Module,
    data: LabeledImages,
    lam: float = 0.5,
    device: torch.device | str = "cpu",
    eps: float = 1e-5,
) -> nn.Module:
    """Return a copy of ``merged`` whose corrected units match the interpolated endpoint statistics.

    ``model_b`` must already be aligned to ``model_a``. Layers are corrected in forward order, each
    after re-measuring the merged network, so upstream corrections are taken into account.
    """
    if len(data) == 0:
        raise ValueError("REPAIR needs a non-empty dataset")
    merged, model_a, model_b = (copy.deepcopy(m) for m in (merged, model_a, model_b))
    if has_batchnorm(merged):
        reset_batchnorm(merged, data, device=device)
    names = repair_points(merged)
    stats_a = unit_statistics(model_a, names, data, device)
    stats_b = unit_statistics(model_b, names, data, device)
    modules = dict(merged.named_modules())
    for name in names:
        mean_m, std_m = unit_statistics(merged, [name], data, device)[name]
        target_mean = torch.lerp(stats_a[name][0], stats_b[name][0], lam)
        target_std = torch.lerp(stats_a[name][1], stats_b[name][1], lam)
        # Units (nearly) constant on the data cannot be rescaled meaningfully: only shift them.
        live = std_m > eps * std_m.mean().clamp_min(1.0)
        scale = torch.where(live, target_std / std_m.clamp_min(eps), torch.ones_like(std_m))
        module = modules[name]
        shape = (-1,) + (1,) * (module.weight.ndim - 1)
        module.weight.mul_(scale.view(shape).to(module.weight.dtype))
        module.bias.copy_((module.bias - mean_m) * scale + target_mean)
    return merged.eval()
