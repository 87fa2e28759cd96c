"""Applying permutations to state dicts."""

from __future__ import annotations

import torch

from fedmerge.models.spec import PermutationSpec

Perms = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def identity_perms(spec: PermutationSpec, state: State) -> Perms:
    """The identity permutation for every permutation of ``spec``."""
    return {p: torch.arange(n) for p, n in spec.perm_sizes(state).items()}


def random_perms(spec: PermutationSpec, state: State, generator: torch.Generator | None = None) -> Perms:
    """A uniformly random permutation for every permutation of ``spec``."""
    return {p: torch.randperm(n, generator=generator) for p, n in spec.perm_sizes(state).items()}


def permute_tensor(
    spec: PermutationSpec, perms: Perms, key: str, tensor: torch.Tensor, skip_axis: int | None = None
) -> torch.Tensor:
    """Permute every axis of ``tensor`` (state entry ``key``) that the spec names, except ``skip_axis``."""
    for axis, perm in enumerate(spec.axes_to_perm.get(key, ())):
        if perm is not None and axis != skip_axis:
            tensor = tensor.index_select(axis, perms[perm].to(tensor.device))
    return tensor


def apply_permutation(spec: PermutationSpec, perms: Perms, state: State) -> State:
    """Return a new state dict with ``perms`` applied; unlisted entries are passed through unchanged.

    Convention: ``new[..., i, ...] = old[..., perms[p][i], ...]`` on every axis governed by ``p``.
    """
    return {key: permute_tensor(spec, perms, key, tensor) for key, tensor in state.items()}


def invert(perms: Perms) -> Perms:
    """The inverse of every permutation."""
    return {p: torch.argsort(perm) for p, perm in perms.items()}
