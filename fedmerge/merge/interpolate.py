"""Plain parameter interpolation of two aligned state dicts."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def interpolate_states(state_a: State, state_b: State, lam: float) -> State:
    """``(1 - lam) * A + lam * B`` for floating-point entries; integer buffers (BN step counters) come from A."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    if state_a.keys() != state_b.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(state_a.keys() ^ state_b.keys())}")
    merged: State = {}
    for key, a in state_a.items():
        b = state_b[key]
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        merged[key] = torch.lerp(a, b.to(a.device), lam) if a.is_floating_point() else a.clone()
    return merged


def weighted_average(states: list[State], weights: list[float]) -> State:
    """Weighted average of several state dicts (weights are normalised); integer buffers from the first."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state dict and at least one state dict")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    merged: State = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total_tensor = torch.zeros_like(first)
            for s, w in zip(states, weights, strict=True):
                total_tensor = total_tensor + w / total * s[key]
            merged[key] = total_tensor
        else:
            merged[key] = first.clone()
    return merged
