"""Merging two aligned models: interpolation, STE, NP Merge, post-merge corrections and baselines."""

from fedmerge.merge.baselines import Ensemble, fine_tune, train_from_scratch
from fedmerge.merge.interpolate import interpolate_states, weighted_average
from fedmerge.merge.np_merge import NPConfig, np_merge
from fedmerge.merge.pairwise import CORRECTIONS, METHODS, MergeConfig, MergeResult, merge_pair
from fedmerge.merge.repair import repair, reset_batchnorm
from fedmerge.merge.ste import STEConfig, STEResult, ste_merge

__all__ = [
    "CORRECTIONS",
    "METHODS",
    "Ensemble",
    "MergeConfig",
    "MergeResult",
    "NPConfig",
    "STEConfig",
    "STEResult",
    "fine_tune",
    "interpolate_states",
    "merge_pair",
    "np_merge",
    "repair",
    "reset_batchnorm",
    "ste_merge",
    "train_from_scratch",
    "weighted_average",
]
