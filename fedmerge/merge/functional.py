"""Running a model with parameters that are not its own (``torch.func.functional_call``)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

State = dict[str, torch.Tensor]


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``state_dict`` naming."""
    return [name for name, _ in model.named_parameters()]


def forward_with(model: nn.Module, params: State, buffers: State, x: torch.Tensor) -> torch.Tensor:
    """Forward pass of ``model`` with the given parameters and (copied) buffers.

    In train mode BatchNorm uses batch statistics, which is what a freshly merged model needs;
    the buffer copies absorb its running-statistics updates.
    """
    return functional_call(model, {**{k: v.clone() for k, v in buffers.items()}, **params}, (x,))


def split_state(model: nn.Module, state: State) -> tuple[State, State]:
    """Split a state dict into (parameters, buffers) following ``model``'s parameter names."""
    names = set(parameter_names(model))
    params = {k: v for k, v in state.items() if k in names}
    buffers = {k: v for k, v in state.items() if k not in names}
    return params, buffers


def load_state(model: nn.Module, state: State) -> nn.Module:
    """A copy of ``model`` carrying ``state``."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone
