"""Merging two aligned models: interpolation, STE, NP Merge, post-merge corrections and baselines."""

from fedmerge.merge.baselines import Ensemble, class_weights, fine_tune, train_from_scratch
from fedmerge.merge.interpolate import interpolate_states, weighted_average
from fedmerge.merge.methods import MERGE_METHODS, MergeMethod, get_method
from fedmerge.merge.np_merge import NPConfig, np_merge
from fedmerge.merge.pairwise import CORRECTIONS, METHODS, MergeConfig, MergeResult, merge_pair
from fedmerge.merge.repair import repair, reset_batchnorm
from fedmerge.merge.ste import STEConfig, STEResult, ste_merge

__all__ = [
    "CORRECTIONS",
    "MERGE_METHODS",
    "METHODS",
    "Ensemble",
    "class_weights",
    "MergeConfig",
    "MergeMethod",
    "MergeResult",
    "NPConfig",
    "STEConfig",
    "STEResult",
    "fine_tune",
    "get_method",
    "interpolate_states",
    "merge_pair",
    "np_merge",
    "repair",
    "reset_batchnorm",
    "ste_merge",
    "train_from_scratch",
    "weighted_average",
]
