"""The contract a model must meet to be aligned and merged: :class:`PermutableModel`, or any ``torch.fx``-traceable
model whose spec :func:`model_spec` derives from an example input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fedmerge.models.derive import derive_spec_and_activation_points
from fedmerge.models.spec import PermutationSpec

DERIVED_SPEC_ATTRIBUTE = "_fedmerge_derived_spec"
"""Where :func:`model_spec` keeps a derived spec on the model object (so copies and pickles carry it)."""
DERIVED_POINTS_ATTRIBUTE = "_fedmerge_derived_activation_points"
"""Where :func:`model_spec` keeps the activation points derived with the spec."""


@runtime_checkable
class PermutableModel(Protocol):
    """A model that says how its hidden units may be permuted.

    ``permutation_spec()`` maps every state-dict entry's axes to permutation names (see :class:`PermutationSpec`);
    ``activation_points()`` names, for each permutation, the module whose output carries those units (what
    activation matching records). ``MLP``, ``SmallCNN``, ``VGG11`` and ``ResNet20`` implement both. Other models
    are merged with a spec and activation points derived by tracing (:func:`model_spec`).
    """

    def permutation_spec(self) -> PermutationSpec: ...

    def activation_points(self) -> dict[str, str]: ...


def model_spec(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor] | None = None) -> PermutationSpec:
    """``model``'s permutation spec: its own ``permutation_spec()`` when it is a :class:`PermutableModel`, else the
    spec :func:`fedmerge.models.derive.derive_permutation_spec` derives by tracing it on ``example_input``.

    A derived spec is computed once per model object: it is kept on the object (in its ``__dict__``), so later
    calls, deep copies and pickled copies (e.g. sent to Ray tasks) reuse it without ``example_input``. Change the
    architecture of a model object after its first merge, and its spec is stale: use a new object.

    Parameters
    ----------
    model : nn.Module
        The architecture (its weights do not matter).
    example_input : torch.Tensor | Sequence[torch.Tensor] | None (default: None)
        A batch of inputs the model accepts (two samples are enough, e.g. ``torch.zeros(2, 3, 32, 32)``; a
        sequence for a model with several inputs). Moved to the model's device. Needed only the first time the
        spec of a model without ``permutation_spec()`` is asked for.

    Returns
    -------
    PermutationSpec
        How every state-dict entry's axes are permuted.

    Raises
    ------
    TypeError
        When the model is not a PermutableModel, has no derived spec yet and no ``example_input`` is given.
    ValueError, NotImplementedError
        When the model cannot be traced, or uses an operation the derivation does not cover (see
        :mod:`fedmerge.models.derive`).
    """
    if isinstance(model, PermutableModel):
        return model.permutation_spec()
    cached = derived_spec(model)
    if cached is not None:
        return cached
    if example_input is None:
        raise TypeError(
            f"{type(model).__name__} is not a PermutableModel (it declares no permutation_spec()) and no example "
            "input was given to derive its permutation spec: pass example_input (a batch of model inputs, e.g. "
            "torch.zeros(2, 3, 32, 32)), or give the model permutation_spec() / activation_points() "
            "(see fedmerge.models.protocol)"
        )
    spec, points = derive_spec_and_activation_points(model, _on_model_device(model, example_input))
    model.__dict__[DERIVED_SPEC_ATTRIBUTE] = spec
    model.__dict__[DERIVED_POINTS_ATTRIBUTE] = points
    return spec


def derived_spec(model: nn.Module) -> PermutationSpec | None:
    """The spec :func:`model_spec` derived for ``model`` (or a copy of it) before; None when there is none."""
    spec = model.__dict__.get(DERIVED_SPEC_ATTRIBUTE)
    return spec if isinstance(spec, PermutationSpec) else None


def has_activation_points(model: nn.Module) -> bool:
    """Whether ``model`` has activation points for every permutation (activation matching and ZipIt! need them):
    its own ``activation_points()``, or ones derived with its spec by :func:`model_spec`."""
    return isinstance(model, PermutableModel) or _points_missing(model) == []


def _points_missing(model: nn.Module) -> list[str] | None:
    """The permutations of ``model``'s derived spec that got no derived activation point; None when no spec was
    derived for it."""
    spec = derived_spec(model)
    if spec is None:
        return None
    points = model.__dict__.get(DERIVED_POINTS_ATTRIBUTE) or {}
    return sorted(set(spec.perm_names) - set(points))


def _on_model_device(
    model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    device = next((p.device for p in model.parameters()), None)
    tensors = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    moved = tuple(t.to(device) if device is not None else t for t in tensors)
    return moved[0] if isinstance(example_input, torch.Tensor) else moved


def activation_points(model: nn.Module) -> dict[str, str]:
    """``model``'s activation points: its own ``activation_points()``, else those derived with its spec by
    :func:`model_spec`; ``TypeError`` naming the class (and the permutations without one) when there are none."""
    if isinstance(model, PermutableModel):
        return model.activation_points()
    missing = _points_missing(model)
    if missing is None:
        raise TypeError(
            f"{type(model).__name__} is not a PermutableModel and its permutation spec was not derived yet, so it "
            "has no activation points: call model_spec(model, example_input) first (merge_pair and "
            "PermutationMerge do it), or give the model permutation_spec() and activation_points()"
        )
    if missing:
        raise TypeError(
            f"{type(model).__name__}'s derived spec has permutations {missing} with no module whose output carries "
            "their units on axis 1 once per forward (a module called twice, or units only on the last axis of a "
            "3-d tensor), so activation matching cannot record them: use 'wm', 'ste' or 'np', or give the model "
            "permutation_spec() and activation_points()"
        )
    return dict(model.__dict__[DERIVED_POINTS_ATTRIBUTE])
