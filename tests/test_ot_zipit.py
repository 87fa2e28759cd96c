"""OT fusion (``fedmerge.merge.ot_fusion``) and ZipIt! (``fedmerge.merge.zipit``): permuted copies, self-merges,
partial zipping, lambda tuning on the surrogate, and both methods in ``merge_pair``, the schedules and a three-client
``PermutationMerge`` round."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmerge.align import activation_matching, apply_permutation, invert, random_perms
from fedmerge.data.images import LabeledImages
from fedmerge.merge import MergeConfig, interpolate_states, merge_pair
from fedmerge.merge.many import merge_models
from fedmerge.merge.ot_fusion import OTConfig, ot_align, surrogate_score, tune_lambda
from fedmerge.merge.zipit import ZipItConfig, zip_groups
from fedmerge.train import evaluate
from strategies import PermutationMerge
from strategies.parallel import SequentialRunner
from strategies.schedule import run_schedule
from tests.helpers import NUM_CLASSES, assert_valid_perms, blobs, load, mlp, randomized_model, trained_mlp
from tests.test_strategies import nodes_of, reply, small_mlp

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

MODELS = [
    ("mlp", (1, 8, 8), 16, {"depth": 3}),
    ("cnn", (3, 8, 8), 0.25, {}),
    ("vgg11", (3, 8, 8), 0.125, {}),
    ("resnet20", (3, 8, 8), 0.25, {"blocks_per_stage": 1}),
]


def _permuted_copy(name, in_shape, width, kwargs):
    model = randomized_model(name, in_shape, width, kwargs, seed=1)
    spec = model.permutation_spec()
    hidden = random_perms(spec, model.state_dict(), torch.Generator().manual_seed(2))
    data = LabeledImages(torch.randn(32, *in_shape), torch.randint(0, 10, (32,)), 10)
    return model, apply_permutation(spec, hidden, model.state_dict()), hidden, data


def _outputs_match(template: nn.Module, state: dict, model: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    with torch.no_grad():
        torch.testing.assert_close(load(template, state)(x), model(x), atol=atol, rtol=atol)


@pytest.mark.parametrize(("name", "in_shape", "width", "kwargs"), MODELS)
def test_exact_ot_between_a_model_and_a_permuted_copy_recovers_the_permutation(name, in_shape, width, kwargs):
    model, state_b, hidden, data = _permuted_copy(name, in_shape, width, kwargs)
    spec = model.permutation_spec()
    result = merge_pair(copy.deepcopy(model), model.state_dict(), state_b, None, config=MergeConfig(method="ot"))
    assert result.method == "ot"
    assert_valid_perms(result.perms, spec, state_b)
    for p in spec.perm_names:
        assert torch.equal(result.perms[p], invert(hidden)[p]), p
    _outputs_match(model, result.state, model, data.x)


def test_sinkhorn_ot_transports_b_softly_and_records_the_closest_permutation():
    model, state_b, hidden, data = _permuted_copy(*MODELS[0])
    spec = model.permutation_spec()
    params_a = {k: v for k, v in model.state_dict().items()}
    sharp = ot_align(spec, params_a, state_b, OTConfig(transport="sinkhorn", reg=1e-3))
    assert all(torch.equal(sharp.perms[p], invert(hidden)[p]) for p in spec.perm_names)
    soft = ot_align(spec, params_a, state_b, OTConfig(transport="sinkhorn", reg=1.0))
    assert not soft.is_permutation
    for plan in soft.maps.values():
        torch.testing.assert_close(plan.sum(1), torch.ones(len(plan), dtype=plan.dtype))
    assert not torch.allclose(
        soft.aligned_b["hidden.0.weight"], apply_permutation(spec, soft.perms, state_b)["hidden.0.weight"]
    )
    assert_valid_perms(soft.perms, spec, state_b)
    # merge_pair accepts the soft merge (REPAIR compares it with the transported B)
    config = MergeConfig(method="ot", ot=OTConfig(transport="sinkhorn", reg=1.0), correction="repair")
    result = merge_pair(copy.deepcopy(model), model.state_dict(), state_b, data, config=config)
    assert all(torch.isfinite(v).all() for v in result.state.values())


def test_ot_tuned_picks_lambda_on_the_surrogate_not_at_half():
    data = blobs(range(NUM_CLASSES), 30, seed=5)
    good = trained_mlp(data, seed=6, width=16)
    untrained = mlp(width=16, seed=7)
    chosen, merged, losses = tune_lambda(mlp(width=16), good.state_dict(), untrained.state_dict(), data)
    assert chosen <= 0.3 and len(losses) == 11
    assert surrogate_score(mlp(width=16), merged, data)[0] >= evaluate(good, data) - 1e-6
    tuned = merge_pair(
        mlp(width=16), good.state_dict(), untrained.state_dict(), data, config=MergeConfig(method="ot-tuned")
    )
    plain = merge_pair(mlp(width=16), good.state_dict(), untrained.state_dict(), data, config=MergeConfig(method="ot"))
    assert evaluate(load(mlp(width=16), tuned.state), data) >= evaluate(load(mlp(width=16), plain.state), data)
    assert len(tuned.losses) == 11


@pytest.mark.parametrize(("name", "in_shape", "width", "kwargs"), MODELS)
def test_zipit_of_a_model_with_itself_gives_the_same_outputs(name, in_shape, width, kwargs):
    model, state_b, _, data = _permuted_copy(name, in_shape, width, kwargs)
    config = MergeConfig(method="zipit", correction="none")
    for other in (model.state_dict(), state_b):  # itself, and a permuted copy of itself
        result = merge_pair(copy.deepcopy(model), model.state_dict(), other, data, config=config)
        assert result.method == "zipit"
        _outputs_match(model, result.state, model, data.x, atol=1e-4)


def test_partial_zipping_keeps_the_unzipped_layers_as_permuted_interpolations():
    data = blobs(range(NUM_CLASSES), 20, seed=8)
    a, b = trained_mlp(data, seed=9, width=16, depth=3), trained_mlp(data, seed=10, width=16, depth=3)
    spec = a.permutation_spec()
    config = MergeConfig(method="zipit", correction="none", zipit=ZipItConfig(zip_layers=1, beta=0.5))
    result = merge_pair(mlp(16, 3), a.state_dict(), b.state_dict(), data, config=config)
    # the later feature spaces are matched one-to-one, as activation matching matches them
    am = activation_matching(a, b, data)
    assert all(torch.equal(result.perms[p], am[p]) for p in ("P_1", "P_2"))
    expected = interpolate_states(a.state_dict(), apply_permutation(spec, result.perms, b.state_dict()), 0.5)
    for key in ("hidden.2.weight", "hidden.2.bias", "head.weight", "head.bias", "hidden.1.bias"):
        torch.testing.assert_close(result.state[key], expected[key], msg=key)
    # the zipped layer is what full zipping gives, and not a permuted interpolation
    full_config = MergeConfig(method="zipit", correction="none", zipit=ZipItConfig(beta=0.5))
    full = merge_pair(mlp(16, 3), a.state_dict(), b.state_dict(), data, config=full_config)
    assert torch.equal(full.state["hidden.0.weight"], result.state["hidden.0.weight"])
    assert not torch.allclose(result.state["hidden.0.weight"], expected["hidden.0.weight"])


def test_zip_groups_follow_the_within_model_budget_and_alpha():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 12, generator=g)
    features[:, 6:] += 0.3 * torch.randn(200, 6, generator=g)  # B's features resemble A's
    corr = torch.corrcoef(features.T)
    cross_only = zip_groups(corr, 6, alpha=0.0, beta=0.0)
    assert len(cross_only) == 6 and all(len(grp) == 2 and grp[0] < 6 <= grp[1] for grp in cross_only)
    mixed = zip_groups(corr, 6, alpha=0.5, beta=1.0)
    assert len(mixed) == 6 and sorted(i for grp in mixed for i in grp) == list(range(12))
    # two nearly identical features of A: with a budget they are merged together
    twin = features.clone()
    twin[:, 1] = twin[:, 0] + 1e-3 * torch.randn(200, generator=g)
    twin_groups = zip_groups(torch.corrcoef(twin.T), 6, alpha=0.3, beta=1.0)
    assert any({0, 1} <= set(grp) for grp in twin_groups)


class _NoPoints(nn.Module):
    """A traceable model without permutation_spec() / activation_points() (both are derived)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_zipit_and_ot_merge_models_with_derived_activation_points_and_zipit_refuses_one_without():
    from tests.test_derive_spec import SequenceNet  # its per-token Linear's units are on the last axis only

    data = blobs(range(NUM_CLASSES), 4, seed=11)
    states = [_NoPoints().state_dict() for _ in range(2)]
    for method in ("zipit", "ot"):
        assert merge_pair(_NoPoints(), *states, data, config=MergeConfig(method=method)).method == method
    sequence = LabeledImages(torch.randn(8, 3, 8, 8), torch.arange(8) % 10, 10, "noise")
    with pytest.raises(TypeError, match=r"ZipIt! needs activation points.*P_token"):
        merge_pair(
            SequenceNet(),
            SequenceNet().state_dict(),
            SequenceNet().state_dict(),
            sequence,
            config=MergeConfig(method="zipit"),
        )
    with pytest.raises(ValueError, match=r"'zipit' needs activation points.*P_token"):
        PermutationMerge(SequenceNet(), MergeConfig(method="zipit"), image_shape=(3, 8, 8))


@pytest.mark.parametrize("method", ["ot", "ot-tuned", "zipit"])
def test_ot_and_zipit_run_a_three_client_permutation_merge_round(method):
    strategy = PermutationMerge(small_mlp(0), MergeConfig(method=method), runner=SequentialRunner("cpu"))
    arrays, metrics = strategy.aggregate_train(1, [reply(k, num_examples=20 + k) for k in range(3)])
    merged = arrays.to_torch_state_dict()
    assert merged.keys() == small_mlp(0).state_dict().keys()
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert [s.method for s in strategy.merge_steps] == [method, method]
    assert metrics["clients-merged"] == 3


@pytest.mark.parametrize("method", ["ot", "ot-tuned", "zipit"])
def test_schedules_of_n_clients(method):
    """Pairwise schedules chain the pair merge; only OT has an N-model form (all clients onto the first)."""
    replies = [reply(k, num_examples=20 + k) for k in range(3)]
    merged, steps = run_schedule(
        "all-to-one", small_mlp(0), nodes_of(replies), MergeConfig(method=method), SequentialRunner()
    )
    assert [s.method for s in steps] == [method, method] and merged.members == (0, 1, 2)
    if method == "ot":
        merged, steps = run_schedule(
            "universe", small_mlp(0), nodes_of(replies), MergeConfig(method=method), SequentialRunner()
        )
        assert steps[0].method == "ot" and all(torch.isfinite(v).all() for v in merged.state.values())
    else:
        with pytest.raises(ValueError, match="no N-model form"):
            merge_models(
                small_mlp(0), [small_mlp(k).state_dict() for k in range(3)], [1, 1, 1], None, MergeConfig(method=method)
            )
