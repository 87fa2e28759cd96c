"""Build a client's data surrogate (coreset or condensed set) from a config."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.models.registry import reinitialized_copy
from fedmerge.surrogate.condense import CondenseConfig, condense_gradient_matching
from fedmerge.surrogate.coreset import herding_coreset, kcenter_coreset, random_coreset
from fedmerge.train import batches

SURROGATE_KINDS = ("none", "random", "herding", "kcenter", "condensed", "condensed-noise")
CONDENSED_INIT = {"condensed": "real", "condensed-noise": "noise"}
"""The condensed kinds and where their synthetic images start: from real training images, or from noise (then no
raw image is sent)."""
RAW_IMAGE_KINDS = ("random", "herding", "kcenter")
"""The kinds that send some of the client's training images unchanged (with their labels)."""


@dataclass(frozen=True)
class SurrogateConfig:
    """What a client sends besides its weights.

    ``kind``: "none", "random" (the paper's main coreset), "herding", "kcenter", "condensed" (gradient matching
    from real images) or "condensed-noise" (gradient matching from standard-normal noise: no raw image is sent).
    ``per_class``: images per class (the IPC for the condensed kinds). ``condense``: the condensation's knobs; the
    condensed kinds set its ``init``.
    """

    kind: str = "random"
    per_class: int = 10
    condense: CondenseConfig = field(default_factory=CondenseConfig)

    def __post_init__(self) -> None:
        if self.kind not in SURROGATE_KINDS:
            raise ValueError(f"unknown surrogate kind {self.kind!r}; choose one of {', '.join(SURROGATE_KINDS)}")
        if self.per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {self.per_class}")

    @property
    def ipc(self) -> int:
        """Images per class (alias of ``per_class``, the condensation literature's name)."""
        return self.per_class


def build_surrogate(
    data: LabeledImages,
    config: SurrogateConfig,
    model: nn.Module | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LabeledImages | None:
    """The surrogate of ``data`` described by ``config`` (``None`` for kind "none").

    Herding and k-center work in ``model``'s penultimate feature space when a model is given
    (pixels otherwise); condensation matches gradients on fresh copies of ``model``'s architecture
    and needs a model.
    """
    if config.kind not in SURROGATE_KINDS:
        raise ValueError(f"unknown surrogate kind {config.kind!r}; choose one of {', '.join(SURROGATE_KINDS)}")
    if config.per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {config.per_class}")
    if config.kind == "none":
        return None
    if config.kind == "random":
        return random_coreset(data, config.per_class, seed)
    if config.kind in CONDENSED_INIT:
        if model is None:
            raise ValueError("a condensed surrogate needs the client's model (its architecture) to match gradients on")
        condense = dataclasses.replace(config.condense, init=CONDENSED_INIT[config.kind])
        return condense_gradient_matching(data, config.ipc, fresh_model_factory(model), condense, seed, device)
    features = penultimate_features(model, data) if model is not None else None
    select = herding_coreset if config.kind == "herding" else kcenter_coreset
    return select(data, config.per_class, features, seed)


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` registered in ``model`` (its classifier head, for the usual models)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@torch.no_grad()
def penultimate_features(model: nn.Module, data: LabeledImages, batch_size: int = 1024) -> torch.Tensor:
    """Inputs of ``model``'s last ``nn.Linear`` on every image (N x d, CPU); flattened pixels without one.

    Runs in eval mode on the model's own device and leaves the model where and as it was.
    """
    head = last_linear(model)
    if head is None:
        warnings.warn(f"{type(model).__name__} has no nn.Linear layer: selecting in pixel space", stacklevel=2)
        return data.x.flatten(1).cpu()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].flatten(1).cpu()))
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    try:
        for x, _ in batches(data, batch_size, shuffle=False):
            model(x.to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)


def fresh_model_factory(model: nn.Module) -> Callable[[], nn.Module]:
    """A function returning a re-initialised copy of ``model``'s architecture on each call.

    Every submodule with ``reset_parameters`` is reset (Linear, Conv, BatchNorm, ...); parameters
    registered directly on a custom module without one keep the given model's values.
    """
    template = copy.deepcopy(model).cpu()

    def make() -> nn.Module:
        return reinitialized_copy(template).train()

    return make


def require_surrogate(surrogate: LabeledImages | None, what: str = "this comparison") -> LabeledImages:
    """``surrogate`` itself; ``ValueError`` when it is ``None`` (surrogate kind "none" where one is needed)."""
    if surrogate is None:
        raise ValueError(f"{what} needs a surrogate: kind 'none' builds none")
    return surrogate
