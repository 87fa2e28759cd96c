"""One entry point for merging two models: alignment, interpolation and post-merge correction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmerge.align.permute import Perms, State, apply_permutation, identity_perms
from fedmerge.align.weight_matching import weight_matching
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import load_state, split_state
from fedmerge.merge.interpolate import interpolate_states
from fedmerge.merge.np_merge import NPConfig, np_merge
from fedmerge.merge.repair import has_batchnorm, repair, reset_batchnorm
from fedmerge.merge.ste import STEConfig, ste_merge
from fedmerge.models.spec import PermutationSpec

log = logging.getLogger(__name__)

METHODS = ("average", "wm", "am", "ste", "np", "ste+np")
DATA_METHODS = ("am", "ste", "np", "ste+np")
CORRECTIONS = ("auto", "none", "bn-reset", "repair")


@dataclass(frozen=True)
class MergeConfig:
    """Which merge to run and its settings.

    ``method``: average (no alignment), wm (weight matching), am (activation matching on the
    surrogate), ste, np (NP Merge after weight matching), ste+np (NP Merge after STE alignment).
    ``correction``: auto (BatchNorm reset when the model has BatchNorm and data is available),
    none, bn-reset, repair.
    """

    method: str = "ste"
    correction: str = "auto"
    ste: STEConfig = field(default_factory=STEConfig)
    np: NPConfig = field(default_factory=NPConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; choose from {METHODS}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"unknown correction {self.correction!r}; choose from {CORRECTIONS}")


@dataclass
class MergeResult:
    """The merged weights, the permutation applied to B, what actually ran and how long it took."""

    state: State
    perms: Perms
    method: str
    seconds: float
    losses: list[float] = field(default_factory=list)


def merge_pair(
    model: nn.Module,
    state_a: State,
    state_b: State,
    surrogate: LabeledImages | None = None,
    lam: float = 0.5,
    config: MergeConfig = MergeConfig(),
    device: torch.device | str = "cpu",
) -> MergeResult:
    """Merge model B into model A (``lam`` is B's weight). ``model`` is an architecture template.

    Methods that need data fall back to data-free weight matching, with a log line, when the
    surrogate is missing or empty.
    """
    start = time.perf_counter()
    spec = model.permutation_spec()
    check_compatible(spec, state_a, state_b)
    state_a = {k: v.to(device) for k, v in state_a.items()}
    state_b = {k: v.to(device) for k, v in state_b.items()}
    method = config.method
    has_data = surrogate is not None and len(surrogate) > 0
    if method in DATA_METHODS and not has_data:
        log.warning("merge method %r needs surrogate data but none was given: falling back to data-free weight matching", method)
        method = "wm"
    losses: list[float] = []
    merged: State | None = None
    if method == "average":
        perms = identity_perms(spec, state_b)
    elif method == "am":
        from fedmerge.align.activation_matching import activation_matching

        perms = activation_matching(load_state(model, state_a), load_state(model, state_b), surrogate, device=device)
    elif method in ("ste", "ste+np"):
        result = ste_merge(model, spec, state_a, state_b, surrogate, lam, config.ste, config.seed, device)
        perms, losses, merged = result.perms, result.losses, result.state
    else:  # wm, np: match parameters only, not BatchNorm running statistics
        perms = weight_matching(spec, split_state(model, state_a)[0], state_b, seed=config.seed)
    aligned_b = apply_permutation(spec, perms, state_b)
    if method in ("np", "ste+np"):
        merged, np_losses = np_merge(model, state_a, aligned_b, surrogate, lam, config.np, config.seed, device)
        losses += np_losses
    elif merged is None:
        merged = interpolate_states(state_a, aligned_b, lam)
    merged = _correct(model, merged, state_a, aligned_b, surrogate if has_data else None, lam, config.correction, device)
    return MergeResult({k: v.detach().cpu() for k, v in merged.items()}, perms, method, time.perf_counter() - start, losses)


def check_compatible(spec: PermutationSpec, state_a: State, state_b: State) -> None:
    """Raise ``ValueError`` unless both state dicts fit ``spec`` and have identical tensor shapes."""
    spec.check_covers(state_a)
    spec.check_covers(state_b)
    mismatched = [k for k in state_a if state_a[k].shape != state_b[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"models differ in shape at {len(mismatched)} tensors, e.g. {k}: {tuple(state_a[k].shape)} vs {tuple(state_b[k].shape)}")


def _correct(model: nn.Module, merged: State, state_a: State, aligned_b: State, data: LabeledImages | None, lam: float, correction: str, device) -> State:
    """Apply the post-merge correction named by ``correction``."""
    if correction == "auto":
        correction = "bn-reset" if has_batchnorm(model) else "none"
    if correction == "none":
        return merged
    if data is None:
        log.warning("correction %r needs surrogate data but none was given: skipped", correction)
        return merged
    net = load_state(model, merged)
    if correction == "bn-reset":
        net = reset_batchnorm(net, data, device=device)
    else:
        net = repair(net, load_state(model, state_a), load_state(model, aligned_b), data, lam, device=device)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}
