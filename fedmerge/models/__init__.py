"""Models with permutation specs: MLP, SmallCNN, VGG11, ResNet20, built by name with ``build_model``; the spec of
any traceable model with ``derive_permutation_spec``."""

from fedmerge.models.cnn import SmallCNN
from fedmerge.models.derive import derive_permutation_spec, derive_spec_and_activation_points, same_up_to_renaming
from fedmerge.models.mlp import MLP
from fedmerge.models.protocol import PermutableModel, model_spec
from fedmerge.models.registry import MODEL_NAMES, build_model, reinitialized_copy
from fedmerge.models.resnet import ResNet20
from fedmerge.models.spec import Blocked, PermutationSpec
from fedmerge.models.vgg import VGG11

__all__ = [
    "Blocked",
    "MLP",
    "MODEL_NAMES",
    "PermutableModel",
    "PermutationSpec",
    "ResNet20",
    "SmallCNN",
    "VGG11",
    "build_model",
    "derive_permutation_spec",
    "derive_spec_and_activation_points",
    "model_spec",
    "reinitialized_copy",
    "same_up_to_renaming",
]
