"""Client data surrogates: coresets (random, herding, k-center) and gradient-matching condensation."""

from fedmerge.surrogate.build import (
    CONDENSED_INIT,
    RAW_IMAGE_KINDS,
    SURROGATE_KINDS,
    SurrogateConfig,
    build_surrogate,
    fresh_model_factory,
    penultimate_features,
)
from fedmerge.surrogate.condense import CondenseConfig, condense_gradient_matching, gradient_distance
from fedmerge.surrogate.coreset import herding_coreset, kcenter_coreset, random_coreset

__all__ = [
    "CONDENSED_INIT",
    "RAW_IMAGE_KINDS",
    "SURROGATE_KINDS",
    "CondenseConfig",
    "SurrogateConfig",
    "build_surrogate",
    "condense_gradient_matching",
    "fresh_model_factory",
    "gradient_distance",
    "herding_coreset",
    "kcenter_coreset",
    "penultimate_features",
    "random_coreset",
]
