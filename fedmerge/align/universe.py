"""Aligning N models into one shared reference frame (a "universe"), so that pairwise maps are cycle-consistent.

Every model ``i`` gets permutations ``perms[i]`` that map it into the universe; the map from model ``j``
to model ``i`` goes through the universe (``j -> universe -> i``), so composing ``j -> k`` and
``k -> i`` gives exactly ``j -> i``. Two ways to find the maps:

* ``merge_many``: MergeMany weight matching (Ainsworth et al., "Git Re-Basin: Merging Models modulo
  Permutation Symmetries", ICLR 2023): re-match each model in turn to the mean of the others.
* ``c2m3``: the data-free Frank-Wolfe matching of Crisostomi et al., "C2M3: Cycle-Consistent Multi-Model
  Merging", NeurIPS 2024: all models and all layers at once, on doubly-stochastic relaxations.

Both use only the tensors present in the given states (pass parameters only to leave BatchNorm running
statistics out of the matching); the permutations they return apply to the full state dicts. Both handle
axes permuted in blocks (:class:`~fedmerge.models.spec.Blocked`, e.g. a Linear after conv and flatten).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal, get_args

import numpy as np
import torch
from numpy.polynomial import Polynomial

from fedmerge.align.permute import Perms, State, apply_permutation, expand_blocks, invert
from fedmerge.align.weight_matching import solve_assignment, weight_matching
from fedmerge.models.spec import PermutationSpec, perm_of

UniverseMethod = Literal["merge-many", "c2m3"]
UNIVERSE_METHODS: tuple[str, ...] = get_args(UniverseMethod)
# Where an alignment starts: given permutations, "identity", or None (each model weight-matched to model 0).
Init = list[Perms] | Literal["identity"] | None


def compose(first: Perms, then: Perms) -> Perms:
    """The permutations that apply ``first`` and then ``then``: ``result[p][i] = first[p][then[p][i]]``.

    ``apply_permutation(spec, compose(a, b), s) == apply_permutation(spec, b, apply_permutation(spec, a, s))``.
    """
    if first.keys() != then.keys():
        raise ValueError(f"cannot compose permutations of {sorted(first)} and {sorted(then)}")
    return {p: first[p][then[p].to(first[p].device)] for p in first}


@dataclass(frozen=True)
class UniverseAlignment:
    """Permutations mapping each of N models into a shared universe.

    ``perms[i]`` maps client ``i`` into the universe (``apply_permutation(spec, perms[i], states[i])``);
    ``iterations`` counts the passes (MergeMany) or Frank-Wolfe steps (C2M3) made; ``objective`` logs
    the sum of pairwise similarities in the universe (``universe_objective``) at the start and after each
    iteration (for C2M3: of the relaxed, doubly-stochastic iterate).
    """

    perms: list[Perms]
    iterations: int
    objective: list[float] = field(default_factory=list)

    def to_universe(self, spec: PermutationSpec, states: list[State]) -> list[State]:
        """Every state mapped into the universe; full state dicts (BatchNorm buffers included) work too."""
        if len(states) != len(self.perms):
            raise ValueError(f"alignment is for {len(self.perms)} models, got {len(states)} states")
        return [apply_permutation(spec, perms, state) for perms, state in zip(self.perms, states, strict=True)]

    def between(self, i: int, j: int) -> Perms:
        """Permutations taking model ``j`` into model ``i``'s frame, through the universe.

        Cycle-consistent by construction: ``compose(between(j, k), between(i, j)) == between(i, k)``.
        """
        return compose(self.perms[j], invert(self.perms[i]))


def align_to_universe(
    spec: PermutationSpec,
    states: list[State],
    method: UniverseMethod = "merge-many",
    weights: list[float] | None = None,
    seed: int = 0,
    max_iters: int = 100,
) -> UniverseAlignment:
    """Align ``states`` into one universe with ``method`` (one of ``UNIVERSE_METHODS``), in at most ``max_iters``
    passes (MergeMany) or Frank-Wolfe steps (C2M3)."""
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if method == "merge-many":
        return merge_many(spec, states, weights=weights, seed=seed, max_iters=max_iters)
    if method == "c2m3":
        return c2m3(spec, states, weights=weights, seed=seed, max_iters=max_iters)
    raise ValueError(f"unknown universe alignment method {method!r}; choose one of {', '.join(UNIVERSE_METHODS)}")


def check_states(spec: PermutationSpec, states: list[State]) -> dict[str, int]:
    """Raise unless ``states`` is a non-empty list of state dicts (or parameter-only parts of them) that
    fit ``spec`` and share keys and shapes; return every permutation's size."""
    if len(states) < 1:
        raise ValueError("need at least one state to align")
    reference = states[0]
    for index, state in enumerate(states):
        if state.keys() != reference.keys():
            raise ValueError(f"state {index} has keys {sorted(state)}, state 0 has {sorted(reference)}")
        for key, tensor in state.items():
            if key not in spec.axes_to_perm:
                if tensor.ndim > 0:
                    raise ValueError(f"state {index}: {key!r} is not in the permutation spec")
                continue
            if len(spec.axes_to_perm[key]) != tensor.ndim:
                raise ValueError(f"spec for {key} has {len(spec.axes_to_perm[key])} axes, tensor has {tensor.ndim}")
            if tensor.shape != reference[key].shape:
                raise ValueError(
                    f"state {index}: {key} has shape {tuple(tensor.shape)}, state 0 has {tuple(reference[key].shape)}"
                )
    sizes: dict[str, int] = {}
    for perm, axes in spec.perm_to_axes.items():
        for key, axis in axes:
            if key in reference:
                n = spec.units(key, axis, reference[key].shape[axis])
                if sizes.setdefault(perm, n) != n:
                    raise ValueError(f"permutation {perm!r}: {key} axis {axis} has size {n}, expected {sizes[perm]}")
        if perm not in sizes:
            raise ValueError(f"no tensor of the states carries permutation {perm!r}")
    return sizes


def universe_objective(
    spec: PermutationSpec, states: list[State], perms: list[Perms], weights: list[float] | None = None
) -> float:
    """``sum_{i<j} w_i w_j <P_i W_i, P_j W_j>`` over the tensors that carry a permutation: how alike the
    models are once mapped into the universe (weights rescaled to average 1, so unweighted is a plain sum)."""
    check_states(spec, states)
    w = _check_weights(weights, len(states))
    mapped = [apply_permutation(spec, p, _permuted_part(spec, s)) for p, s in zip(perms, states, strict=True)]
    return _pairwise_similarity(mapped, w)


def merge_many(
    spec: PermutationSpec,
    states: list[State],
    weights: list[float] | None = None,
    max_iters: int = 100,
    seed: int = 0,
    init: Init = None,
) -> UniverseAlignment:
    """MergeMany (Ainsworth et al., "Git Re-Basin", ICLR 2023): in random order, re-match each model with
    ``weight_matching`` (warm-started) to the ``weights``-weighted mean of the others in the universe.

    Starts from ``init``: by default every model weight-matched to model 0, whose frame is then the initial
    universe; ``"identity"``; or given permutations. Stops after a pass that changes no permutation, or after
    ``max_iters`` passes.
    """
    sizes = check_states(spec, states)
    w = _check_weights(weights, len(states))
    parts = [_permuted_part(spec, s) for s in states]
    n = len(parts)
    perms = _initial_perms(spec, parts, sizes, init, seed)
    mapped = [apply_permutation(spec, p, s) for p, s in zip(perms, parts, strict=True)]
    objective = [_pairwise_similarity(mapped, w)]
    if n == 1:
        return UniverseAlignment(perms, 0, objective)
    rng = np.random.default_rng(seed)
    iterations = 0
    while iterations < max_iters:
        iterations += 1
        changed = False
        for i in rng.permutation(n):
            others = [j for j in range(n) if j != i]
            total = sum(float(w[j]) for j in others)
            mean = {
                key: torch.stack([mapped[j][key].float() * (float(w[j]) / total) for j in others]).sum(0)
                for key in parts[i]
            }
            new = weight_matching(spec, mean, parts[i], init=perms[i], seed=int(rng.integers(2**31)))
            if any(not torch.equal(new[p], perms[i][p]) for p in new):
                changed = True
                perms[i] = new
                mapped[i] = apply_permutation(spec, new, parts[i])
        objective.append(_pairwise_similarity(mapped, w))
        if not changed:
            break
    return UniverseAlignment(perms, iterations, objective)


def c2m3(
    spec: PermutationSpec,
    states: list[State],
    weights: list[float] | None = None,
    max_iters: int = 100,
    seed: int = 0,
    init: Init = None,
    tol: float = 1e-6,
) -> UniverseAlignment:
    """Cycle-consistent data-free matching (Crisostomi et al., "C2M3", NeurIPS 2024) by Frank-Wolfe.

    Maximises ``sum_{i<j} w_i w_j sum_W <P_i W_i, P_j W_j>`` (each permutation ``P_i^p`` acting on every
    axis of ``W_i`` it governs) jointly over all models and permutation groups, with every ``P_i^p`` relaxed
    to a doubly-stochastic matrix. Each step takes the gradient, solves one assignment problem per model and
    group (the linear minimisation oracle), and moves towards those permutations with an exact line search
    (the objective is a polynomial in the step size). Model 0 stays where it starts: this fixes the gauge
    (any common permutation of all models is an equally good universe), without which the models move
    towards each other's frames at once and the relaxation stalls between them. Stops once the Frank-Wolfe
    gap falls below ``tol`` times the objective, or after ``max_iters`` steps; then rounds each soft matrix
    to the nearest permutation (one more assignment problem).

    Starts from ``init``: by default every model weight-matched to model 0 (the "LAP" start of the authors'
    code; ``seed`` seeds it); ``"identity"`` (the paper's default, which from a symmetric start can stall in
    a poor stationary point of the relaxation); or given permutations, e.g. a ``merge_many`` result.
    """
    sizes = check_states(spec, states)
    w_list = _check_weights(weights, len(states))
    n = len(states)
    perms = _initial_perms(spec, [_permuted_part(spec, s) for s in states], sizes, init, seed)
    reference = states[0]
    device = next(iter(reference.values())).device
    dtype = torch.promote_types(next(iter(reference.values())).dtype, torch.float32)
    w = torch.tensor(w_list, dtype=dtype, device=device)
    soft = {p: _one_hot(torch.stack([perms[i][p] for i in range(n)]).to(device), dtype) for p in sizes}
    # Per tensor with a permuted axis: its (axis, permutation) pairs, and its (N, ...) stack over the models
    # with the soft permutations applied on every subset of those axes. Later steps update these images by
    # indexing alone, since each step mixes in a permutation.
    tensors = []
    for key in _permuted_part(spec, reference):
        axes = [(axis, p) for axis, p in enumerate(map(perm_of, spec.axes_to_perm[key])) if p is not None]
        stack = torch.stack([s[key].detach() for s in states]).to(device=device, dtype=dtype)
        tensors.append((axes, _images(stack, axes, soft)))
    objective: list[float] = []
    iterations = 0
    if n > 1:
        while iterations < max_iters:
            value, grads = _gradient(tensors, w, soft)
            if not objective:
                objective.append(value)
            # The linear minimisation oracle, for models 1..N-1; model 0 fixes the gauge and stays put.
            vertex = {
                p: torch.stack([perms[0][p]] + [solve_assignment(g) for g in grads[p][1:].cpu()]).to(device)
                for p in grads
            }
            gap = sum(
                float(grads[p].gather(2, vertex[p][:, :, None]).sum() - (grads[p] * soft[p]).sum()) for p in grads
            )
            if gap <= tol * max(1.0, abs(value)):
                break
            terms = [_segment_terms(axes, images, vertex) for axes, images in tensors]
            step, new_value = _line_search([axes for axes, _ in tensors], terms, w)
            if step <= 0.0:
                break
            for p in soft:
                soft[p] = (1 - step) * soft[p] + step * _one_hot(vertex[p], dtype)
            tensors = [(axes, _step_images(t, step)) for (axes, _), t in zip(tensors, terms, strict=True)]
            iterations += 1
            objective.append(new_value)
        perms = [{p: solve_assignment(soft[p][i]) for p in soft} for i in range(n)]
    if not objective:
        objective.append(
            _pairwise_similarity(
                [apply_permutation(spec, p, _permuted_part(spec, s)) for p, s in zip(perms, states, strict=True)],
                w_list,
            )
        )
    return UniverseAlignment(perms, iterations, objective)


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _check_weights(weights: list[float] | None, n: int) -> list[float]:
    """Positive finite weights, one per model, rescaled to average 1 (all ones when ``weights`` is None)."""
    if weights is None:
        return [1.0] * n
    values = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(values) != n:
        raise ValueError(f"need one weight per model: {n} models, {len(values)} weights")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(values)}")
    return list(values * n / values.sum())


def _permuted_part(spec: PermutationSpec, state: State) -> State:
    """The entries of ``state`` with at least one permuted axis: the only ones an alignment can change."""
    return {
        key: tensor.detach()
        for key, tensor in state.items()
        if any(p is not None for p in spec.axes_to_perm.get(key, ()))
    }


def _initial_perms(
    spec: PermutationSpec, parts: list[State], sizes: dict[str, int], init: Init, seed: int
) -> list[Perms]:
    """Where an alignment starts: identities (``"identity"``), every model weight-matched to model 0 (``None``),
    or copies of the given permutations after checking them against the permutation sizes."""
    n = len(parts)
    if init is None or (isinstance(init, str) and init == "identity"):
        perms = [{p: torch.arange(size) for p, size in sizes.items()} for _ in range(n)]
        if init is None:
            perms[1:] = [
                weight_matching(spec, parts[0], part, init=perms[i], seed=seed + i)
                for i, part in enumerate(parts[1:], start=1)
            ]
        return perms
    if isinstance(init, str):
        raise ValueError(f"unknown init {init!r}; pass permutations, 'identity' or None")
    if len(init) != n:
        raise ValueError(f"init has permutations for {len(init)} models, expected {n}")
    result = []
    for given in init:
        if given.keys() != sizes.keys():
            raise ValueError(f"init has permutations {sorted(given)}, expected {sorted(sizes)}")
        for p, size in sizes.items():
            if not torch.equal(torch.sort(given[p].cpu()).values, torch.arange(size)):
                raise ValueError(f"init permutation {p!r} is not a permutation of {size} units")
        result.append({p: given[p].detach().cpu().long().clone() for p in sizes})
    return result


def _pairwise_similarity(mapped: list[State], weights: list[float]) -> float:
    """``sum_{i<j} w_i w_j <U_i, U_j>`` over the given tensors, as ``(|sum w U|^2 - sum w^2 |U|^2) / 2``."""
    total = 0.0
    for key in mapped[0]:
        stack = torch.stack([m[key].double() for m in mapped])
        w = torch.tensor(weights, dtype=torch.float64, device=stack.device).reshape(-1, *[1] * (stack.ndim - 1))
        total += 0.5 * float((stack * w).sum(0).square().sum() - (stack * w).square().sum())
    return total


def _one_hot(indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, n) permutation indices to (N, n, n) matrices with ``Q[i, k, indices[i, k]] = 1``."""
    matrices = torch.zeros(*indices.shape, indices.shape[-1], dtype=dtype, device=indices.device)
    return matrices.scatter_(-1, indices[..., None], 1.0)


def _mix(x: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """Soft permutations ``q`` (N, n, n) applied to tensor axis ``axis`` of ``x`` (N, ...).

    ``new[k] = sum_m q[k, m] old[m]``; a one-hot ``q[k] = e_perm[k]`` is ``apply_permutation``'s convention.
    An axis of ``n * block`` entries is permuted in blocks of ``block`` (a ``Blocked`` axis of the spec)."""
    moved = x.movedim(axis + 1, 1)
    out = torch.bmm(q, moved.reshape(moved.shape[0], q.shape[-1], -1))
    return out.reshape(moved.shape).movedim(1, axis + 1)


def _take(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """Permutations ``index`` (N, n) applied to tensor axis ``axis`` of ``x`` (N, ...): ``new[k] = old[index[k]]``;
    on an axis of ``n * block`` entries, whole blocks move."""
    index = expand_blocks(index, x.shape[axis + 1] // index.shape[1])
    shape = [1] * x.ndim
    shape[0], shape[axis + 1] = index.shape
    return x.gather(axis + 1, index.reshape(shape).expand(x.shape))


def _rows(x: torch.Tensor, axis: int, units: int) -> torch.Tensor:
    """``x`` (N, ...) as (N, ``units``, everything else): with ``units`` less than the size of ``axis`` (a
    blocked axis), each unit's block joins the rest of its row."""
    moved = x.movedim(axis + 1, 1)
    return moved.reshape(moved.shape[0], units, -1)


# The (tensor axis, permutation name) pairs of one tensor's permuted axes.
Axes = list[tuple[int, str]]
# A tensor stacked over the models, with soft permutations applied on a subset of its permuted axes
# (positions in its ``Axes``), for every subset.
Images = dict[frozenset[int], torch.Tensor]
# Keys (target, moved): vertex permutations on ``moved``, soft ones on ``target - moved``, none elsewhere.
Terms = dict[tuple[frozenset[int], frozenset[int]], torch.Tensor]


def _images(stack: torch.Tensor, axes: Axes, soft: dict[str, torch.Tensor]) -> Images:
    """``stack`` (N, ...) with the soft permutations applied on every subset of its permuted axes."""
    images: Images = {frozenset(): stack}
    for size in range(1, len(axes) + 1):
        for subset in combinations(range(len(axes)), size):
            axis, p = axes[subset[-1]]
            images[frozenset(subset)] = _mix(images[frozenset(subset[:-1])], soft[p], axis)
    return images


def _gradient(
    tensors: list[tuple[Axes, Images]], w: torch.Tensor, soft: dict[str, torch.Tensor]
) -> tuple[float, dict[str, torch.Tensor]]:
    """The objective and its gradient with respect to the soft permutations of models 1..N-1 (zero for model 0).

    With ``U_i`` model ``i`` in the universe and ``C = sum_j w_j U_j``, the objective is
    ``(|C|^2 - sum_i w_i^2 |U_i|^2) / 2``, its gradient in ``U_i`` is ``G_i = w_i (C - w_i U_i)``, and that of
    the permutation on axis ``a`` contracts ``G_i`` with ``U_i`` less that permutation over every other axis.
    """
    grads = {p: torch.zeros_like(q) for p, q in soft.items()}
    value = 0.0
    for axes, images in tensors:
        full = frozenset(range(len(axes)))
        mapped = images[full]
        weighted = w.reshape(-1, *[1] * (mapped.ndim - 1)) * mapped
        total = weighted.sum(0)
        value += 0.5 * float(total.square().sum(dtype=torch.float64) - weighted.square().sum(dtype=torch.float64))
        outer = (w.reshape(-1, *[1] * (mapped.ndim - 1)) * (total - weighted))[1:]
        for a, (axis, p) in enumerate(axes):
            units = soft[p].shape[-1]
            grads[p][1:] += torch.bmm(
                _rows(outer, axis, units), _rows(images[full - {a}][1:], axis, units).transpose(1, 2)
            )
    return value, grads


def _segment_terms(axes: Axes, images: Images, vertex: dict[str, torch.Tensor]) -> Terms:
    """Every image of the tensor with the vertex permutations ``D`` (applied by indexing) in place of the soft
    ones ``Q`` on some of its axes: the pieces of the images anywhere on the segment from ``Q`` to ``D``."""
    terms: Terms = {}
    for target in sorted(images, key=len):  # each term is one indexing away from a term of a smaller target
        for size in range(len(target) + 1):
            for moved in combinations(sorted(target), size):
                if not moved:
                    terms[(target, frozenset())] = images[target]
                    continue
                axis, p = axes[moved[-1]]
                source = terms[(target - {moved[-1]}, frozenset(moved[:-1]))]
                terms[(target, frozenset(moved))] = _take(source, vertex[p], axis)
    return terms


def _step_images(terms: Terms, step: float) -> Images:
    """The images at ``(1 - step) Q + step D``: multilinear in the permutations, so a sum of the terms."""
    images: Images = {}
    for (target, moved), x in terms.items():
        coefficient = (1 - step) ** (len(target) - len(moved)) * step ** len(moved)
        if target in images:
            images[target].add_(x, alpha=coefficient)
        else:
            images[target] = x * coefficient
    return images


def _line_search(all_axes: list[Axes], all_terms: list[Terms], w: torch.Tensor) -> tuple[float, float]:
    """Best step ``t`` in [0, 1] from the soft matrices ``Q`` towards the permutations ``D``, and the objective
    there. Along the segment a tensor with ``k`` permuted axes maps to ``sum_S t^|S| (1 - t)^(k - |S|) D_S Q_rest W``
    (``S`` the axes where ``D`` acts), so the objective is a polynomial of degree ``2k`` in ``t``."""
    poly = Polynomial([0.0])
    t = Polynomial([0.0, 1.0])
    wd = w.double()
    for axes, terms in zip(all_axes, all_terms, strict=True):
        k = len(axes)
        full = frozenset(range(k))
        moved = [m for target, m in terms if target == full]
        first = terms[(full, moved[0])]
        rows = torch.empty(first.shape[0], len(moved), first[0].numel(), dtype=torch.float64, device=first.device)
        for index, m in enumerate(moved):
            rows[:, index].copy_(terms[(full, m)].flatten(1))
        # <B_a, B_b> summed over pairs of models i != j: <sum_i w_i B_ia, sum_j w_j B_jb> - sum_i w_i^2 <B_ia, B_ib>.
        total = torch.einsum("i,iax->ax", wd, rows)
        gram = total @ total.T - torch.einsum("i,iab->ab", wd.square(), torch.bmm(rows, rows.transpose(1, 2)))
        basis = [t ** len(m) * (1 - t) ** (k - len(m)) for m in moved]
        for a in range(len(moved)):
            for b in range(len(moved)):
                poly = poly + 0.5 * float(gram[a, b]) * basis[a] * basis[b]
    # Endpoints and critical points (real parts: every candidate is scored on the polynomial itself).
    roots = np.real(np.asarray(poly.deriv().roots(), dtype=complex))
    candidates = [0.0, 1.0] + [float(r) for r in roots if 0.0 < r < 1.0]
    values = [float(poly(c)) for c in candidates]
    best = int(np.argmax(values))
    if values[best] <= values[0]:
        return 0.0, values[0]
    return candidates[best], values[best]
