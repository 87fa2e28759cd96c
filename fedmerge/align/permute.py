"""Applying permutations to state dicts."""

from __future__ import annotations

import torch

from fedmerge.models.spec import PermutationSpec, block_of, perm_of

Perms = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def identity_perms(spec: PermutationSpec, state: State) -> Perms:
    """The identity permutation for every permutation of ``spec``."""
    return {p: torch.arange(n) for p, n in spec.perm_sizes(state).items()}


def random_perms(spec: PermutationSpec, state: State, generator: torch.Generator | None = None) -> Perms:
    """A uniformly random permutation for every permutation of ``spec``."""
    return {p: torch.randperm(n, generator=generator) for p, n in spec.perm_sizes(state).items()}


def expand_blocks(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index of a permutation of units acting on an axis of blocks of ``block`` consecutive indices:
    ``[perm[0] * block, ..., perm[0] * block + block - 1, perm[1] * block, ...]`` (``perm`` itself for 1).
    Works on stacks of permutations too (along the last dimension)."""
    if block == 1:
        return perm
    offsets = torch.arange(block, device=perm.device, dtype=perm.dtype)
    return (perm[..., None] * block + offsets).flatten(-2)


def permute_tensor(
    spec: PermutationSpec, perms: Perms, key: str, tensor: torch.Tensor, skip_axis: int | None = None
) -> torch.Tensor:
    """Permute every axis of ``tensor`` (state entry ``key``) that the spec names, except ``skip_axis``;
    a :class:`~fedmerge.models.spec.Blocked` axis moves whole blocks."""
    for axis, entry in enumerate(spec.axes_to_perm.get(key, ())):
        perm = perm_of(entry)
        if perm is not None and axis != skip_axis:
            tensor = tensor.index_select(axis, expand_blocks(perms[perm].to(tensor.device), block_of(entry)))
    return tensor


def apply_permutation(spec: PermutationSpec, perms: Perms, state: State) -> State:
    """Return a new state dict with ``perms`` applied; unlisted entries are passed through unchanged.

    Convention: ``new[..., i, ...] = old[..., perms[p][i], ...]`` on every axis governed by ``p``; on an axis
    of blocks, block ``i`` of the new tensor is block ``perms[p][i]`` of the old one.
    """
    return {key: permute_tensor(spec, perms, key, tensor) for key, tensor in state.items()}


def invert(perms: Perms) -> Perms:
    """The inverse of every permutation."""
    return {p: torch.argsort(perm) for p, perm in perms.items()}
