"""The registry of merge methods: each method is one object that names itself, says whether it needs surrogate
data, cites its paper and knows how to merge two models and, where the method has one, N models at once.

N-model merges (the ``universe`` schedule) first map every client into one shared frame
(:mod:`fedmerge.align.universe`), then ``wm`` averages the aligned clients, ``ste`` learns every client's
permutation jointly (:func:`fedmerge.merge.joint.joint_ste_merge`), ``np`` learns per-parameter weights over the
N aligned clients (:func:`fedmerge.merge.joint.joint_np_merge`) and ``ste+np`` does both.

Everything that offers a choice of method (the run config, the sweep, the command-line tools, the README table)
reads the list from :data:`MERGE_METHODS`; adding a method means registering one :class:`MergeMethod` here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from fedmerge.align.permute import Perms, State, apply_permutation, identity_perms
from fedmerge.align.universe import align_to_universe
from fedmerge.align.weight_matching import weight_matching
from fedmerge.data.images import LabeledImages
from fedmerge.merge.functional import load_state, split_state
from fedmerge.merge.interpolate import interpolate_states, weighted_average
from fedmerge.merge.joint import joint_np_merge, joint_ste_merge
from fedmerge.merge.np_merge import np_merge
from fedmerge.merge.ste import ste_merge
from fedmerge.models.spec import PermutationSpec

if TYPE_CHECKING:
    from fedmerge.merge.pairwise import MergeConfig

log = logging.getLogger(__name__)

MethodName = Literal["average", "wm", "am", "ste", "np", "ste+np", "ot", "ot-tuned", "zipit"]
"""The names of the registered merge methods (kept in step with :data:`MERGE_METHODS` by a test)."""


@dataclass(frozen=True)
class PairInputs:
    """What a pairwise merge works on: the architecture, its spec, both state dicts (on ``device``), the surrogate
    (``None`` for data-free methods), B's weight ``lam`` and the merge settings."""

    model: nn.Module
    spec: PermutationSpec
    state_a: State
    state_b: State
    surrogate: LabeledImages | None
    lam: float
    config: MergeConfig
    device: torch.device | str


@dataclass(frozen=True)
class PairOutput:
    """What a method returns: the permutation it applied to B, the merged state (before any post-merge
    correction) and the loss of every optimisation step it took.

    Methods that do not merely permute B (soft OT transport, ZipIt!) return in ``perms`` the permutation closest to
    what they did (for bookkeeping: merge steps, logs) and, when B was mapped otherwise than by ``perms``, the mapped
    B as ``aligned_b`` (what REPAIR compares the merge against; ``None``: ``perms`` applied to B)."""

    perms: Perms
    merged: State
    losses: list[float]
    aligned_b: State | None = None


PairFunction = Callable[[PairInputs], PairOutput]


@dataclass(frozen=True)
class ManyInputs:
    """What an N-model merge works on: the architecture, its spec, every client's state dict (on ``device``),
    their weights (sample counts), the union of their surrogates (``None`` for data-free methods) and the merge
    settings (``config.alignment`` says how to align them into one universe)."""

    model: nn.Module
    spec: PermutationSpec
    states: list[State]
    weights: list[float]
    surrogate: LabeledImages | None
    config: MergeConfig
    device: torch.device | str


@dataclass(frozen=True)
class ManyOutput:
    """What an N-model merge returns: each client's permutation into the merged model, the merged state (before
    any correction), the loss of every optimisation step, and the seconds the universe alignment took."""

    perms: list[Perms]
    merged: State
    losses: list[float]
    align_seconds: float = 0.0


ManyFunction = Callable[[ManyInputs], ManyOutput]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its name, whether it needs surrogate data, the paper it comes from, a one-line summary,
    the function that merges a pair, the one that merges N models at once (``None`` when it has none: the
    ``universe`` schedule refuses it, the pairwise schedules chain ``merge``) and whether it needs the model's
    activation points (its ``activation_points()``, or those derived with its spec)."""

    name: str
    needs_data: bool
    paper: str
    summary: str
    merge: PairFunction
    merge_many: ManyFunction | None = None
    needs_activation_points: bool = False


def _surrogate(inputs: PairInputs | ManyInputs) -> LabeledImages:
    if inputs.surrogate is None:
        raise ValueError("this merge method needs surrogate data")
    return inputs.surrogate


def _interpolated(inputs: PairInputs, perms: Perms, losses: list[float] | None = None) -> PairOutput:
    aligned_b = apply_permutation(inputs.spec, perms, inputs.state_b)
    return PairOutput(perms, interpolate_states(inputs.state_a, aligned_b, inputs.lam), losses or [])


def _weight_matching_perms(inputs: PairInputs) -> Perms:
    """Weight matching on parameters only (BatchNorm running statistics are not matched)."""
    params_a = split_state(inputs.model, inputs.state_a)[0]
    return weight_matching(inputs.spec, params_a, inputs.state_b, seed=inputs.config.seed)


def _with_np(inputs: PairInputs, first: PairOutput) -> PairOutput:
    """NP Merge of A and B aligned by ``first``'s permutation."""
    aligned_b = apply_permutation(inputs.spec, first.perms, inputs.state_b)
    config = inputs.config
    merged, losses = np_merge(
        inputs.model, inputs.state_a, aligned_b, _surrogate(inputs), inputs.lam, config.np, config.seed, inputs.device
    )
    return PairOutput(first.perms, merged, first.losses + losses)


def _average(inputs: PairInputs) -> PairOutput:
    return _interpolated(inputs, identity_perms(inputs.spec, inputs.state_b))


def _wm(inputs: PairInputs) -> PairOutput:
    return _interpolated(inputs, _weight_matching_perms(inputs))


def _am(inputs: PairInputs) -> PairOutput:
    from fedmerge.align.activation_matching import activation_matching

    model_a, model_b = (load_state(inputs.model, s) for s in (inputs.state_a, inputs.state_b))
    return _interpolated(inputs, activation_matching(model_a, model_b, _surrogate(inputs), device=inputs.device))


def _ste(inputs: PairInputs) -> PairOutput:
    config = inputs.config
    result = ste_merge(
        inputs.model,
        inputs.spec,
        inputs.state_a,
        inputs.state_b,
        _surrogate(inputs),
        inputs.lam,
        config.ste,
        config.seed,
        inputs.device,
    )
    return PairOutput(result.perms, result.state, result.losses)


def _np(inputs: PairInputs) -> PairOutput:
    return _with_np(inputs, _wm(inputs))


def _ste_np(inputs: PairInputs) -> PairOutput:
    return _with_np(inputs, _ste(inputs))


def _universe(inputs: ManyInputs) -> tuple[list[Perms], float]:
    """Every client's permutation into a shared universe (matched on parameters only) and the seconds it took."""
    start = time.perf_counter()
    params = [split_state(inputs.model, s)[0] for s in inputs.states]
    config = inputs.config
    alignment = align_to_universe(
        inputs.spec, params, config.alignment, inputs.weights, config.seed, config.alignment_iters
    )
    return alignment.perms, time.perf_counter() - start


def _averaged(inputs: ManyInputs, perms: list[Perms], losses: list[float], align_seconds: float) -> ManyOutput:
    aligned = [apply_permutation(inputs.spec, p, s) for p, s in zip(perms, inputs.states, strict=True)]
    return ManyOutput(perms, weighted_average(aligned, inputs.weights), losses, align_seconds)


def _many_average(inputs: ManyInputs) -> ManyOutput:
    return _averaged(inputs, [identity_perms(inputs.spec, s) for s in inputs.states], [], 0.0)


def _many_wm(inputs: ManyInputs) -> ManyOutput:
    perms, seconds = _universe(inputs)
    return _averaged(inputs, perms, [], seconds)


def _many_ste(inputs: ManyInputs) -> ManyOutput:
    perms, seconds = _universe(inputs)
    config = inputs.config
    result = joint_ste_merge(
        inputs.model,
        inputs.spec,
        inputs.states,
        inputs.weights,
        _surrogate(inputs),
        perms,
        config.ste,
        config.seed,
        inputs.device,
    )
    return ManyOutput(result.perms, result.state, result.losses, seconds)


def _many_np_after(inputs: ManyInputs, first: ManyOutput) -> ManyOutput:
    aligned = [apply_permutation(inputs.spec, p, s) for p, s in zip(first.perms, inputs.states, strict=True)]
    config = inputs.config
    merged, losses = joint_np_merge(
        inputs.model, aligned, inputs.weights, _surrogate(inputs), config.np, config.seed, inputs.device
    )
    return ManyOutput(first.perms, merged, first.losses + losses, first.align_seconds)


def _many_np(inputs: ManyInputs) -> ManyOutput:
    return _many_np_after(inputs, _many_wm(inputs))


def _many_ste_np(inputs: ManyInputs) -> ManyOutput:
    return _many_np_after(inputs, _many_ste(inputs))


def _ot(inputs: PairInputs) -> PairOutput:
    from fedmerge.merge.ot_fusion import ot_align

    params_a = split_state(inputs.model, inputs.state_a)[0]
    aligned = ot_align(inputs.spec, params_a, inputs.state_b, inputs.config.ot)
    merged = interpolate_states(inputs.state_a, aligned.aligned_b, inputs.lam)
    return PairOutput(aligned.perms, merged, [], None if aligned.is_permutation else aligned.aligned_b)


def _ot_tuned(inputs: PairInputs) -> PairOutput:
    from fedmerge.merge.ot_fusion import ot_align, tune_lambda

    params_a = split_state(inputs.model, inputs.state_a)[0]
    aligned = ot_align(inputs.spec, params_a, inputs.state_b, inputs.config.ot)
    _, merged, losses = tune_lambda(
        inputs.model, inputs.state_a, aligned.aligned_b, _surrogate(inputs), inputs.config.ot.grid, inputs.device
    )
    return PairOutput(aligned.perms, merged, losses, None if aligned.is_permutation else aligned.aligned_b)


def _many_ot(inputs: ManyInputs) -> ManyOutput:
    """Every client transported onto the first (the paper's anchor), then averaged by the weights."""
    from fedmerge.merge.ot_fusion import ot_align

    start = time.perf_counter()
    anchor = split_state(inputs.model, inputs.states[0])[0]
    alignments = [ot_align(inputs.spec, anchor, s, inputs.config.ot) for s in inputs.states[1:]]
    seconds = time.perf_counter() - start
    aligned = [inputs.states[0]] + [a.aligned_b for a in alignments]
    perms = [identity_perms(inputs.spec, inputs.states[0])] + [a.perms for a in alignments]
    return ManyOutput(perms, weighted_average(aligned, inputs.weights), [], seconds)


def _zipit(inputs: PairInputs) -> PairOutput:
    from fedmerge.merge.zipit import zipit

    model_a, model_b = (load_state(inputs.model, s) for s in (inputs.state_a, inputs.state_b))
    result = zipit(
        inputs.model, inputs.spec, model_a, model_b, _surrogate(inputs), inputs.lam, inputs.config.zipit, inputs.device
    )
    return PairOutput(result.perms, result.state, [])


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod(
            "average",
            False,
            "McMahan et al., AISTATS 2017 (FedAvg)",
            "plain interpolation of the weights, no alignment",
            _average,
            _many_average,
        ),
        MergeMethod(
            "wm",
            False,
            "Ainsworth et al., ICLR 2023 (Git Re-Basin)",
            "weight matching: permutations that bring B's weights closest to A's",
            _wm,
            _many_wm,
        ),
        MergeMethod(
            "am",
            True,
            "Ainsworth et al., ICLR 2023 (Git Re-Basin)",
            "activation matching: permutations that correlate the hidden units on the surrogate",
            _am,
            needs_activation_points=True,
        ),
        MergeMethod(
            "ste",
            True,
            "Yamada et al., ACML 2024; Ainsworth et al., ICLR 2023",
            "permutations learned with a straight-through estimator on the surrogate loss",
            _ste,
            _many_ste,
        ),
        MergeMethod(
            "np",
            True,
            "Orozco Camacho et al., 2024 (NP Merge)",
            "a learned interpolation coefficient per parameter, after weight matching",
            _np,
            _many_np,
        ),
        MergeMethod(
            "ste+np",
            True,
            "Yamada et al., ACML 2024 + Orozco Camacho et al., 2024",
            "NP Merge after STE alignment",
            _ste_np,
            _many_ste_np,
        ),
        MergeMethod(
            "ot",
            False,
            "Singh & Jaggi, NeurIPS 2020 (OT fusion)",
            "optimal transport of B's neurons onto A's, layer by layer, weight-based ground metric (exact: a "
            "permutation; Sinkhorn: soft); N models: all onto the first",
            _ot,
            _many_ot,
        ),
        MergeMethod(
            "ot-tuned",
            True,
            "Singh & Jaggi, NeurIPS 2020 (OT fusion)",
            "OT fusion with B's weight lambda picked on a 0..1 grid by surrogate accuracy (the paper tuned on test)",
            _ot_tuned,
        ),
        MergeMethod(
            "zipit",
            True,
            "Stoica et al., ICLR 2024 (ZipIt!)",
            "greedy merging of correlated features within and across the models (activations on the surrogate), "
            "merge/unmerge matrices per layer, optional partial zipping; needs activation points (declared, or "
            "derived with the spec); N models: pairwise schedules only",
            _zipit,
            needs_activation_points=True,
        ),
    )
}
"""Every merge method by name, in the order they are offered."""

METHODS: tuple[str, ...] = tuple(MERGE_METHODS)
"""The method names (for command-line and run-config choices)."""

DATA_METHODS: tuple[str, ...] = tuple(name for name, m in MERGE_METHODS.items() if m.needs_data)
"""The methods that need surrogate data (they fall back to ``wm`` without it)."""


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose from {', '.join(METHODS)}") from None


def runnable_method(name: str, has_data: bool) -> MergeMethod:
    """The method called ``name``, or data-free weight matching (with a log line) when it needs surrogate data and
    there is none."""
    method = get_method(name)
    if method.needs_data and not has_data:
        log.warning(
            "merge method %r needs surrogate data but none was given: falling back to data-free weight matching",
            method.name,
        )
        return get_method("wm")
    return method


def example_batch(surrogate: LabeledImages | None, example_input: torch.Tensor | None) -> torch.Tensor | None:
    """The inputs a model's spec is derived from: the surrogate's first two images, else ``example_input``."""
    return surrogate.x[:2] if surrogate is not None and len(surrogate) else example_input


def methods_table() -> str:
    """The registry as a Markdown table (the README's method table is this text)."""
    lines = ["| method | needs data | N models at once | what it does | paper |", "|---|---|---|---|---|"]
    lines += [
        f"| `{m.name}` | {'yes' if m.needs_data else 'no'} | {'yes' if m.merge_many else 'no'} | {m.summary} "
        f"| {m.paper} |"
        for m in MERGE_METHODS.values()
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(methods_table())
