"""One entry point for merging two models: alignment, interpolation and post-merge correction."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fedmerge.align.permute import Perms, State, apply_permutation
from fedmerge.align.universe import UNIVERSE_METHODS, UniverseMethod
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import load_state
from fedmerge.merge.methods import (
    DATA_METHODS,
    METHODS,
    MethodName,
    PairInputs,
    example_batch,
    get_method,
    runnable_method,
)
from fedmerge.merge.np_merge import NPConfig
from fedmerge.merge.ot_fusion import OTConfig
from fedmerge.merge.repair import has_batchnorm, repair, reset_batchnorm
from fedmerge.merge.ste import STEConfig
from fedmerge.merge.zipit import ZipItConfig
from fedmerge.models.protocol import model_spec
from fedmerge.models.spec import PermutationSpec

log = logging.getLogger(__name__)

Correction = Literal["auto", "none", "bn-reset", "repair"]
CORRECTIONS: tuple[Correction, ...] = ("auto", "none", "bn-reset", "repair")

__all__ = ["CORRECTIONS", "DATA_METHODS", "METHODS", "Correction", "MergeConfig", "MergeResult", "merge_pair"]


@dataclass(frozen=True)
class MergeConfig:
    """Which merge to run and its settings.

    ``method``: a name from :data:`fedmerge.merge.methods.MERGE_METHODS` (average, wm, am, ste, np, ste+np, ot,
    ot-tuned, zipit); ``ot`` and ``zipit`` hold the settings of OT fusion and ZipIt!.
    ``correction``: auto (BatchNorm reset when the model has BatchNorm and data is available),
    none, bn-reset, repair. ``alignment``: how N-model merges (:func:`fedmerge.merge.many.merge_models`) map every
    client into one shared frame: ``merge-many`` (MergeMany weight matching) or ``c2m3`` (Frank-Wolfe, C2M3).
    """

    method: MethodName = "ste"
    correction: Correction = "auto"
    ste: STEConfig = field(default_factory=STEConfig)
    np: NPConfig = field(default_factory=NPConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    zipit: ZipItConfig = field(default_factory=ZipItConfig)
    seed: int = 0
    alignment: UniverseMethod = "merge-many"
    alignment_iters: int = 100

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.alignment_iters < 1:
            raise ValueError(f"alignment_iters must be >= 1, got {self.alignment_iters}")
        if self.alignment not in UNIVERSE_METHODS:
            raise ValueError(f"unknown alignment {self.alignment!r}; choose from {UNIVERSE_METHODS}")
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
    example_input: torch.Tensor | None = None,
) -> MergeResult:
    """Merge model B into model A (``lam`` is B's weight). ``model`` is an architecture template.

    Methods that need data fall back to data-free weight matching, with a log line, when the
    surrogate is missing or empty.

    Parameters
    ----------
    model : nn.Module
        The architecture: a :class:`fedmerge.models.PermutableModel`, or any ``torch.fx``-traceable model whose
        permutation spec is derived (once per model object) from an example batch (see
        :func:`fedmerge.models.protocol.model_spec`).
    state_a, state_b : dict[str, torch.Tensor]
        The two models' state dicts.
    surrogate : LabeledImages | None (default: None)
        Data for the methods and corrections that need it; its first two images also serve as the example
        batch a spec is derived from.
    lam : float (default: 0.5)
        B's weight in the interpolation.
    config : MergeConfig (default: MergeConfig())
        Which method and correction to run, with their settings.
    device : torch.device | str (default: "cpu")
        Where to merge.
    example_input : torch.Tensor | None (default: None)
        A batch of model inputs to derive the spec from when there is no surrogate (and the model has no
        ``permutation_spec()`` nor a spec derived before).

    Returns
    -------
    MergeResult
        The merged weights, the permutation applied to B, the method that ran and its wall time.
    """
    start = time.perf_counter()
    spec = model_spec(model, example_batch(surrogate, example_input))
    check_compatible(spec, state_a, state_b)
    state_a = {k: v.to(device) for k, v in state_a.items()}
    state_b = {k: v.to(device) for k, v in state_b.items()}
    data = surrogate if surrogate is not None and len(surrogate) > 0 else None
    method = runnable_method(config.method, data is not None)
    out = method.merge(PairInputs(model, spec, state_a, state_b, data, lam, config, device))
    aligned_b = out.aligned_b if out.aligned_b is not None else apply_permutation(spec, out.perms, state_b)
    merged = correct(model, out.merged, data, config.correction, device, repair_with=(state_a, aligned_b, lam))
    return MergeResult(
        {k: v.detach().cpu() for k, v in merged.items()},
        out.perms,
        method.name,
        time.perf_counter() - start,
        out.losses,
    )


def check_compatible(spec: PermutationSpec, state_a: State, state_b: State) -> None:
    """Raise ``ValueError`` unless both state dicts fit ``spec`` and have identical tensor shapes."""
    spec.check_covers(state_a)
    spec.check_covers(state_b)
    mismatched = [k for k in state_a if state_a[k].shape != state_b[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"models differ in shape at {len(mismatched)} tensors, e.g. {k}: "
            f"{tuple(state_a[k].shape)} vs {tuple(state_b[k].shape)}"
        )


def correct(
    model: nn.Module,
    merged: State,
    data: LabeledImages | None,
    correction: Correction,
    device: torch.device | str,
    repair_with: tuple[State, State, float] | None = None,
) -> State:
    """Apply the post-merge correction named by ``correction`` (``auto``: a BatchNorm reset when the model has
    BatchNorm) on ``data``; REPAIR needs ``repair_with`` = (A, aligned B, B's weight), the pair that was merged."""
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
        if repair_with is None:
            raise ValueError("REPAIR corrects the merge of a pair: pass the pair as repair_with")
        state_a, aligned_b, lam = repair_with
        net = repair(net, load_state(model, state_a), load_state(model, aligned_b), data, lam, device=device)
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}
