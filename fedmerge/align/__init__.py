"""Neuron alignment: applying permutations, weight matching and activation matching."""

from fedmerge.align.activation_matching import activation_matching
from fedmerge.align.permute import apply_permutation, identity_perms, invert, random_perms
from fedmerge.align.weight_matching import weight_matching

__all__ = ["activation_matching", "apply_permutation", "identity_perms", "invert", "random_perms", "weight_matching"]
