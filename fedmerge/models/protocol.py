"""The contract a model must meet to be aligned and merged: :class:`PermutableModel`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from fedmerge.models.spec import PermutationSpec


@runtime_checkable
class PermutableModel(Protocol):
    """A model that says how its hidden units may be permuted.

    ``permutation_spec()`` maps every state-dict entry's axes to permutation names (see :class:`PermutationSpec`);
    ``activation_points()`` names, for each permutation, the module whose output carries those units (what
    activation matching records). ``MLP``, ``SmallCNN``, ``VGG11`` and ``ResNet20`` implement both.
    """

    def permutation_spec(self) -> PermutationSpec: ...

    def activation_points(self) -> dict[str, str]: ...


def model_spec(model: nn.Module) -> PermutationSpec:
    """``model``'s permutation spec; ``TypeError`` naming the class when it declares none."""
    if not isinstance(model, PermutableModel):
        raise TypeError(
            f"{type(model).__name__} is not a PermutableModel: it declares no permutation_spec() / "
            "activation_points(); see fedmerge.models.protocol"
        )
    return model.permutation_spec()


def activation_points(model: nn.Module) -> dict[str, str]:
    """``model``'s activation points; ``TypeError`` naming the class when it declares none."""
    if not isinstance(model, PermutableModel):
        raise TypeError(f"{type(model).__name__} is not a PermutableModel: it declares no activation_points()")
    return model.activation_points()
