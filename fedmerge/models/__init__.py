"""Models with permutation specs: MLP, SmallCNN, VGG11, ResNet20, built by name with ``build_model``."""

from fedmerge.models.cnn import SmallCNN
from fedmerge.models.mlp import MLP
from fedmerge.models.protocol import PermutableModel, model_spec
from fedmerge.models.registry import MODEL_NAMES, build_model, reinitialized_copy
from fedmerge.models.resnet import ResNet20
from fedmerge.models.spec import PermutationSpec
from fedmerge.models.vgg import VGG11

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "PermutableModel",
    "PermutationSpec",
    "ResNet20",
    "SmallCNN",
    "VGG11",
    "build_model",
    "model_spec",
    "reinitialized_copy",
]
