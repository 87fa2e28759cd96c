"""Aligning N models into one universe (MergeMany, C2M3): cycle consistency, exact recovery, errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from fedmerge.align import apply_permutation, invert, random_perms
from fedmerge.align import universe as universe_module
from fedmerge.align.universe import (
    UNIVERSE_METHODS,
    align_to_universe,
    c2m3,
    check_states,
    compose,
    merge_many,
    universe_objective,
)
from tests.helpers import randomized_model

over_methods = pytest.mark.parametrize("method", UNIVERSE_METHODS)
MLP = ("mlp", (1, 8, 8), 24, {})


def independent_states(count: int, case=MLP) -> tuple:
    """The spec and state dicts of ``count`` independently initialised models."""
    models = [randomized_model(*case, seed=seed) for seed in range(count)]
    return models[0].permutation_spec(), [m.state_dict() for m in models]


def assert_perms_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for p in expected:
        assert torch.equal(actual[p], expected[p]), p


def test_compose_follows_apply_permutation_order():
    spec, (state,) = independent_states(1)
    gen = torch.Generator().manual_seed(0)
    first, then = random_perms(spec, state, gen), random_perms(spec, state, gen)
    expected = apply_permutation(spec, then, apply_permutation(spec, first, state))
    actual = apply_permutation(spec, compose(first, then), state)
    assert all(torch.equal(actual[k], expected[k]) for k in state)
    with pytest.raises(ValueError, match="compose"):
        compose(first, {"P_0": then["P_0"]})


@over_methods
def test_pairwise_maps_are_cycle_consistent(method):
    spec, states = independent_states(4)
    alignment = align_to_universe(spec, states, method)
    universe = alignment.to_universe(spec, states)
    for i, j, k in itertools.product(range(4), repeat=3):
        assert_perms_equal(compose(alignment.between(j, k), alignment.between(i, j)), alignment.between(i, k))
    for i, j in itertools.product(range(4), repeat=2):
        # between(i, j) takes model j to where model i's frame sees the universe copy of model j.
        in_i = apply_permutation(spec, alignment.between(i, j), states[j])
        expected = apply_permutation(spec, invert(alignment.perms[i]), universe[j])
        assert all(torch.equal(in_i[key], expected[key]) for key in expected)
    assert all(torch.equal(v, torch.arange(len(v))) for v in alignment.between(2, 2).values())


PERMUTED_CASES = [MLP, ("resnet20", (3, 8, 8), 0.25, {})]


@over_methods
@pytest.mark.parametrize("case", PERMUTED_CASES, ids=lambda c: c[0])
def test_permuted_copies_are_recovered_exactly(method, case):
    """N randomly permuted copies of one model land on one and the same model in the universe, even when only
    the parameters are matched (BatchNorm running statistics left out) and the full state dicts are mapped."""
    model = randomized_model(*case, seed=3, spread_stats=True)
    spec, state = model.permutation_spec(), model.state_dict()
    gen = torch.Generator().manual_seed(4)
    copies = [apply_permutation(spec, random_perms(spec, state, gen), state) for _ in range(4)]
    params = [{k: s[k] for k, _ in model.named_parameters()} for s in copies]
    alignment = align_to_universe(spec, params, method)
    universe = alignment.to_universe(spec, copies)
    for other in universe[1:]:
        assert all(torch.equal(other[key], universe[0][key]) for key in state)
    for j in range(4):
        moved = apply_permutation(spec, alignment.between(0, j), copies[j])
        assert all(torch.equal(moved[key], copies[0][key]) for key in state)
    data = torch.randn(6, *case[1], generator=gen)
    with torch.no_grad():
        expected = model(data)
        for mapped in universe:
            clone = copy.deepcopy(model)
            clone.load_state_dict(mapped)
            torch.testing.assert_close(clone(data), expected, atol=1e-5, rtol=1e-5)


@over_methods
def test_a_single_model_gets_the_identity(method):
    spec, states = independent_states(1)
    alignment = align_to_universe(spec, states, method)
    assert len(alignment.perms) == 1 and alignment.iterations == 0
    assert all(torch.equal(v, torch.arange(len(v))) for v in alignment.perms[0].values())


def test_unknown_method_names_the_choices():
    spec, states = independent_states(2)
    with pytest.raises(ValueError, match="merge-many, c2m3"):
        align_to_universe(spec, states, "sinkhorn")  # type: ignore[arg-type]


def test_states_that_do_not_fit_are_rejected():
    spec, states = independent_states(2)
    with pytest.raises(ValueError, match="at least one state"):
        align_to_universe(spec, [])
    extra = dict(states[1], stray=torch.zeros(3))
    with pytest.raises(ValueError, match="keys"):
        check_states(spec, [states[0], extra])
    with pytest.raises(ValueError, match="not in the permutation spec"):
        check_states(spec, [extra, extra])
    _, wider = independent_states(1, ("mlp", (1, 8, 8), 20, {}))
    with pytest.raises(ValueError, match="shape"):
        align_to_universe(spec, [states[0], wider[0]], "c2m3")
    with pytest.raises(ValueError, match="axes"):
        check_states(spec, [dict(states[0], **{"head.bias": torch.zeros(10, 1)})])
    without_p2 = {k: v for k, v in states[0].items() if not k.startswith(("hidden.2", "head.weight"))}
    with pytest.raises(ValueError, match="P_2"):
        check_states(spec, [without_p2])
    # Scalar extras such as BatchNorm's num_batches_tracked may stay in.
    assert check_states(spec, [dict(s, count=torch.tensor(3)) for s in states]) == {"P_0": 24, "P_1": 24, "P_2": 24}


def test_bad_weights_and_init_are_rejected():
    spec, states = independent_states(2)
    for weights in ([1.0], [1.0, -1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="weight"):
            merge_many(spec, states, weights=weights)
    with pytest.raises(ValueError, match="init"):
        c2m3(spec, states, init=[merge_many(spec, states).perms[0]])
    with pytest.raises(ValueError, match="not a permutation"):
        c2m3(spec, states, init=[{p: torch.zeros(24, dtype=torch.long) for p in spec.perm_names}] * 2)
    with pytest.raises(ValueError, match="unknown init"):
        merge_many(spec, states, init="random")  # type: ignore[arg-type]


def test_merge_many_with_weights_converges():
    spec, states = independent_states(4)
    weights = [1.0, 2.0, 3.0, 4.0]
    alignment = merge_many(spec, states, weights=weights, max_iters=50, seed=1)
    assert 1 <= alignment.iterations < 50
    assert len(alignment.objective) == alignment.iterations + 1
    assert alignment.objective[-1] > alignment.objective[0]
    assert alignment.objective[-1] == pytest.approx(universe_objective(spec, states, alignment.perms, weights))
    for perms in alignment.perms:
        assert all(torch.equal(torch.sort(v).values, torch.arange(len(v))) for v in perms.values())


@pytest.mark.parametrize("init", [None, "identity"])
def test_c2m3_objective_does_not_decrease(init):
    spec, states = independent_states(4)
    alignment = c2m3(spec, states, weights=[2.0, 1.0, 1.0, 1.0], init=init)
    objective = alignment.objective
    assert len(objective) == alignment.iterations + 1 and alignment.iterations >= 1
    assert all(b >= a - 1e-6 * abs(a) for a, b in itertools.pairwise(objective))
    assert objective[-1] > objective[0]
    hard = universe_objective(spec, states, alignment.perms, [2.0, 1.0, 1.0, 1.0])
    assert hard > objective[0]
    assert all(torch.equal(v, torch.arange(len(v))) for v in alignment.perms[0].values())  # model 0 fixes the gauge


def test_c2m3_refines_merge_many():
    spec, states = independent_states(4)
    start = merge_many(spec, states)
    refined = c2m3(spec, states, init=start.perms)
    assert refined.objective[0] == pytest.approx(start.objective[-1])
    assert universe_objective(spec, states, refined.perms) >= start.objective[-1] - 1e-6


def test_c2m3_from_the_identity_recovers_permuted_copies():
    """The Frank-Wolfe iterations themselves (not the weight-matching start) find the hidden permutations."""
    model = randomized_model(*MLP, seed=5)
    spec, state = model.permutation_spec(), model.state_dict()
    gen = torch.Generator().manual_seed(6)
    copies = [apply_permutation(spec, random_perms(spec, state, gen), state) for _ in range(3)]
    alignment = c2m3(spec, copies, init="identity")
    assert alignment.iterations >= 2
    universe = alignment.to_universe(spec, copies)
    assert all(torch.equal(other[key], universe[0][key]) for other in universe[1:] for key in state)


def test_c2m3_gradient_and_line_search_match_a_direct_computation():
    """Objective, gradient (against autograd), exact line search and the indexed image update, on soft
    (doubly-stochastic) matrices of a ResNet with conv, BatchNorm and residual permutations."""
    model = randomized_model("resnet20", (3, 8, 8), 0.25, {}, seed=7)
    spec = model.permutation_spec()
    states = [
        {k: v for k, v in randomized_model("resnet20", (3, 8, 8), 0.25, {}, seed=s).named_parameters()}
        for s in range(3)
    ]
    sizes = check_states(spec, states)
    w = torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)

    def mixture(n: int) -> torch.Tensor:  # a random point of the Birkhoff polytope
        weights = torch.rand(3, generator=gen, dtype=torch.float64)
        return sum(
            c * torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)] for c in weights / weights.sum()
        )

    soft = {p: torch.stack([mixture(n) for _ in range(3)]).requires_grad_() for p, n in sizes.items()}

    def objective(soft: dict) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for key in states[0]:
            axes = [(a, p) for a, p in enumerate(spec.axes_to_perm[key]) if p is not None]
            if not axes:
                continue
            mapped = []
            for i, state in enumerate(states):
                x = state[key].detach().double()
                for axis, p in axes:
                    x = torch.tensordot(soft[p][i], x, dims=([1], [axis])).movedim(0, axis)
                mapped.append(x)
            for i, j in itertools.combinations(range(3), 2):
                total = total + w[i] * w[j] * (mapped[i] * mapped[j]).sum()
        return total

    value = objective(soft)
    value.backward()
    fixed = {p: q.detach() for p, q in soft.items()}
    tensors = []
    for key in states[0]:
        axes = [(a, p) for a, p in enumerate(spec.axes_to_perm[key]) if p is not None]
        if axes:
            stack = torch.stack([s[key].detach().double() for s in states])
            tensors.append((axes, universe_module._images(stack, axes, fixed)))
    ours, grads = universe_module._gradient(tensors, w, fixed)
    assert ours == pytest.approx(value.item(), rel=1e-10)
    for p, q in soft.items():
        assert torch.allclose(grads[p][1:], q.grad[1:], rtol=1e-8, atol=1e-8), p
        assert not grads[p][0].any()  # model 0 fixes the gauge

    vertex = {p: torch.stack([torch.randperm(n, generator=gen) for _ in range(3)]) for p, n in sizes.items()}
    terms = [universe_module._segment_terms(axes, images, vertex) for axes, images in tensors]
    step, best = universe_module._line_search([axes for axes, _ in tensors], terms, w)
    one_hot = {p: torch.eye(sizes[p], dtype=torch.float64)[v] for p, v in vertex.items()}

    def at(t: float) -> dict:
        return {p: (1 - t) * fixed[p] + t * one_hot[p] for p in fixed}

    with torch.no_grad():
        assert best == pytest.approx(float(objective(at(step))), rel=1e-9)
        assert all(best >= float(objective(at(t))) - 1e-9 * abs(best) for t in torch.linspace(0, 1, 21).tolist())
    stepped = [universe_module._step_images(t, step) for t in terms]
    for (axes, _), images in zip(tensors, stepped, strict=True):
        fresh = universe_module._images(images[frozenset()], axes, at(step))
        for subset, image in images.items():
            assert torch.allclose(image, fresh[subset], rtol=1e-10, atol=1e-10)
