"""Joint merging of N aligned models: joint STE (one soft target per client) and N-model NP Merge.

Tiny synthetic data as in test_merge: four Gaussian classes of 1x8x8 "images". Specialist clients see
disjoint classes; the server holds a 10-per-class surrogate of the union.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align import apply_permutation, identity_perms, invert, random_perms, weight_matching
from fedmerge.data.images import LabeledImages
from fedmerge.merge import NPConfig, STEConfig, weighted_average
from fedmerge.merge import joint as joint_module
from fedmerge.merge.joint import JointResult, joint_np_merge, joint_ste_merge
from fedmerge.models import MLP, build_model
from fedmerge.train import TrainConfig, train
from tests.helpers import randomize_parameters

SHAPE = (1, 8, 8)
NUM_CLASSES = 4
STE_FAST = STEConfig(steps=15, lr=1e-2, batch_size=40)


def blobs(classes, per_class: int, seed: int) -> LabeledImages:
    """``per_class`` images of each class in ``classes``: class c ~ N(0.5 * mean_c, I), the means fixed."""
    means = torch.randn(NUM_CLASSES, *SHAPE, generator=torch.Generator().manual_seed(7)) * 0.5
    y = torch.tensor(list(classes)).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), *SHAPE, generator=torch.Generator().manual_seed(seed))
    return LabeledImages(x, y, NUM_CLASSES, "blobs")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(SHAPE, NUM_CLASSES, width=24, depth=2)


def trained(classes, seed: int) -> nn.Module:
    return train(mlp(seed), blobs(classes, 50, seed + 100), TrainConfig(epochs=5, lr=0.05, batch_size=25), seed=seed)


def copy_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def load(state: dict) -> nn.Module:
    model = mlp()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def surrogate_loss(state: dict, data: LabeledImages) -> float:
    return F.cross_entropy(load(state)(data.x), data.y).item()


def assert_close_states(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def assert_same_model(state: dict, model: nn.Module, data: LabeledImages) -> None:
    assert_close_states(state, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(load(state)(data.x), model.eval()(data.x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def surrogate() -> LabeledImages:
    return blobs(range(NUM_CLASSES), 10, seed=1)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """One trained model: every client below is a permuted copy of it, so the ideal merge is the model itself."""
    return trained(range(NUM_CLASSES), seed=0)


@pytest.fixture(scope="module")
def specialists() -> list[nn.Module]:
    """Three independent clients on disjoint classes (0-1, 2, 3)."""
    return [trained(classes, seed) for seed, classes in enumerate(([0, 1], [2], [3]), start=1)]


def scrambled_copies(model: nn.Module, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n`` randomly permuted copies of ``model`` and the permutations that undo the scrambling."""
    spec, state = model.permutation_spec(), model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    hidden = [random_perms(spec, state, gen) for _ in range(n)]
    return [apply_permutation(spec, p, state) for p in hidden], [invert(p) for p in hidden]


def assert_is_permutation_of_each_client(result: JointResult, spec, states) -> None:
    for perms, state in zip(result.perms, states, strict=True):
        sizes = spec.perm_sizes(state)
        assert perms.keys() == sizes.keys()
        for p, perm in perms.items():
            assert torch.equal(torch.sort(perm).values, torch.arange(sizes[p])), p


# ------------------------------------------------------------------------------------------ joint STE


@pytest.mark.parametrize("init", ["aligned", "mean"])
def test_joint_ste_on_permuted_copies_with_their_inverse_perms_returns_the_model(model, surrogate, init):
    spec = model.permutation_spec()
    states, undo = scrambled_copies(model, 4, seed=3)
    result = joint_ste_merge(mlp(), spec, states, [1.0, 2.0, 3.0, 4.0], surrogate, undo, STE_FAST, init=init)
    assert isinstance(result, JointResult)
    assert len(result.losses) == STE_FAST.steps and result.seconds > 0
    assert not result.kept_start
    for perms, expected in zip(result.perms, undo, strict=True):
        for p in spec.perm_names:
            assert torch.equal(perms[p], expected[p]), p
    assert_same_model(result.state, model, surrogate)
    # The permutations are the answer: each maps its client onto the model.
    for perms, state in zip(result.perms, states, strict=True):
        assert_close_states(apply_permutation(spec, perms, state), model.state_dict(), atol=0)


def test_joint_ste_on_aligned_copies_with_identity_perms_returns_the_model(model, surrogate):
    spec = model.permutation_spec()
    states = [copy_state(model) for _ in range(3)]
    identity = [identity_perms(spec, s) for s in states]
    result = joint_ste_merge(mlp(), spec, states, [1.0] * 3, surrogate, identity, STE_FAST)
    assert all(torch.equal(p, torch.arange(len(p))) for perms in result.perms for p in perms.values())
    assert_same_model(result.state, model, surrogate)
    assert result.losses[0] == pytest.approx(surrogate_loss(model.state_dict(), surrogate), abs=1e-5)


def test_joint_ste_projection_recovers_a_scrambled_client_from_identity_init(model, surrogate):
    """Identity init, but client 2 is scrambled: projecting it onto the (mean) soft target re-aligns it."""
    spec = model.permutation_spec()
    scrambled, undo = scrambled_copies(model, 1, seed=5)
    states = [copy_state(model), copy_state(model), scrambled[0]]
    identity = [identity_perms(spec, s) for s in states]
    assert surrogate_loss(weighted_average(states, [1.0] * 3), surrogate) > surrogate_loss(states[0], surrogate) + 0.1
    result = joint_ste_merge(mlp(), spec, states, [1.0] * 3, surrogate, identity, STE_FAST, init="mean")
    assert not result.kept_start
    for p in spec.perm_names:
        assert torch.equal(result.perms[2][p], undo[0][p]), p
    assert_same_model(result.state, model, surrogate)


def test_joint_ste_never_ends_worse_than_its_start(specialists, surrogate):
    spec = specialists[0].permutation_spec()
    states = [copy_state(m) for m in specialists]
    init = [identity_perms(spec, states[0])] + [weight_matching(spec, states[0], s) for s in states[1:]]
    weights = [2.0, 1.0, 1.0]
    start = weighted_average([apply_permutation(spec, p, s) for p, s in zip(init, states, strict=True)], weights)
    config = STEConfig(steps=40, lr=1e-2, batch_size=40)
    for init_mode in ("aligned", "mean"):
        result = joint_ste_merge(mlp(), spec, states, weights, surrogate, init, config, init=init_mode)
        assert_is_permutation_of_each_client(result, spec, states)
        assert surrogate_loss(result.state, surrogate) <= surrogate_loss(start, surrogate) + 1e-6
        aligned = [apply_permutation(spec, p, s) for p, s in zip(result.perms, states, strict=True)]
        assert_close_states(result.state, weighted_average(aligned, weights), atol=0)
        if not result.kept_start:  # STE moved the merge: lower loss than the start
            assert surrogate_loss(result.state, surrogate) < surrogate_loss(start, surrogate)


def test_joint_ste_keeps_its_start_when_the_end_is_worse(model, surrogate, monkeypatch, caplog):
    """The guard: a final matching that scrambles the clients is rejected, the start is returned."""
    spec = model.permutation_spec()
    states, undo = scrambled_copies(model, 3, seed=6)
    gen = torch.Generator().manual_seed(9)
    monkeypatch.setattr(
        joint_module, "weight_matching", lambda spec, target, source, **_: random_perms(spec, source, gen)
    )
    with caplog.at_level(logging.INFO, logger="fedmerge.merge.joint"):
        result = joint_ste_merge(mlp(), spec, states, [1.0] * 3, surrogate, undo, STEConfig(steps=2, batch_size=40))
    assert result.kept_start
    assert "keeping init_perms" in caplog.text
    for perms, expected in zip(result.perms, undo, strict=True):
        assert all(torch.equal(perms[p], expected[p]) for p in spec.perm_names)
    assert_same_model(result.state, model, surrogate)


def test_joint_ste_threads_give_identical_results(specialists, surrogate):
    spec = specialists[0].permutation_spec()
    states = [copy_state(m) for m in specialists]
    init = [identity_perms(spec, s) for s in states]
    config = STEConfig(steps=10, lr=1e-2, batch_size=20)
    one, two = (
        joint_ste_merge(mlp(), spec, states, [1.0] * 3, surrogate, init, config, seed=2, workers=k) for k in (1, 2)
    )
    assert one.losses == two.losses and one.kept_start == two.kept_start
    for a, b in zip(one.perms, two.perms, strict=True):
        assert all(torch.equal(a[p], b[p]) for p in spec.perm_names)
    assert_close_states(one.state, two.state, atol=0)


def test_joint_ste_on_permuted_batchnorm_copies_returns_their_buffers(surrogate):
    torch.manual_seed(0)
    net = build_model("resnet20", (1, 8, 8), num_classes=NUM_CLASSES, width=0.25, blocks_per_stage=1)
    randomize_parameters(net, running_stats=True)
    spec = net.permutation_spec()
    states, undo = scrambled_copies(net.eval(), 2, seed=4)
    result = joint_ste_merge(
        copy.deepcopy(net), spec, states, [1.0, 3.0], surrogate, undo, STEConfig(steps=2, batch_size=40)
    )
    expected = net.state_dict()
    for key in expected:
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(result.state[key], expected[key], atol=1e-5, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------ joint NP Merge


def test_joint_np_on_copies_returns_the_model(model, surrogate):
    states = [copy_state(model) for _ in range(4)]
    state, losses = joint_np_merge(mlp(), states, [1.0, 1.0, 2.0, 0.5], surrogate, NPConfig(steps=10, batch_size=40))
    assert len(losses) == 10
    assert_same_model(state, model, surrogate)


def test_joint_np_at_zero_steps_is_the_weighted_average(specialists, surrogate):
    states = [copy_state(m) for m in specialists]
    weights = [3.0, 0.0, 1.0]  # a zero-weight client is left out
    state, losses = joint_np_merge(mlp(), states, weights, surrogate, NPConfig(steps=0))
    assert losses == []
    assert_close_states(state, weighted_average(states, weights), atol=1e-6)


def test_joint_np_lowers_the_surrogate_loss_of_the_weighted_average(specialists, surrogate):
    states = [copy_state(m) for m in specialists]
    weights = [2.0, 1.0, 1.0]
    config = NPConfig(steps=40, lr=1e-2, batch_size=40)
    state, losses = joint_np_merge(mlp(), states, weights, surrogate, config)
    average = surrogate_loss(weighted_average(states, weights), surrogate)
    assert losses[0] == pytest.approx(average, abs=1e-5)
    assert surrogate_loss(state, surrogate) < average - 0.05
    # Every merged weight is a convex combination of the clients' weights.
    for key, value in state.items():
        stacked = torch.stack([s[key] for s in states])
        assert (value >= stacked.min(0).values - 1e-5).all() and (value <= stacked.max(0).values + 1e-5).all(), key


# ------------------------------------------------------------------------------------------ errors


def test_joint_merges_reject_bad_input(model, surrogate):
    spec = model.permutation_spec()
    states = [copy_state(model) for _ in range(2)]
    perms = [identity_perms(spec, s) for s in states]
    empty = surrogate.subset([])
    cases = [
        (dict(surrogate=empty), "non-empty surrogate"),
        (dict(weights=[1.0]), "one weight per state"),
        (dict(weights=[1.0, -1.0]), "non-negative"),
        (dict(weights=[0.0, 0.0]), "positive sum"),
        (dict(weights=[1.0, float("nan")]), "non-negative"),
        (dict(states=[], weights=[]), "at least one"),
    ]
    for overrides, message in cases:
        args = dict(states=states, weights=[1.0, 1.0], surrogate=surrogate) | overrides
        with pytest.raises(ValueError, match=message):
            joint_np_merge(mlp(), args["states"], args["weights"], args["surrogate"])
        with pytest.raises(ValueError, match=message):
            joint_ste_merge(
                mlp(), spec, args["states"], args["weights"], args["surrogate"], perms[: len(args["states"])]
            )
    with pytest.raises(ValueError, match="one init permutation per state"):
        joint_ste_merge(mlp(), spec, states, [1.0, 1.0], surrogate, perms[:1])
    with pytest.raises(ValueError, match="init must be"):
        joint_ste_merge(mlp(), spec, states, [1.0, 1.0], surrogate, perms, init="random")
    with pytest.raises(ValueError, match="workers"):
        joint_ste_merge(mlp(), spec, states, [1.0, 1.0], surrogate, perms, workers=0)
