"""``merge_pair`` (``fedmerge.merge.pairwise``): every method undoes a permutation, activation matching, determinism,
the fallbacks without data, the post-merge corrections and input validation.

Runs on the tiny synthetic blobs of ``tests.helpers`` (two specialists on disjoint classes, the SPLIT setting).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fedmerge.align import activation_matching, apply_permutation, invert, random_perms
from fedmerge.data.images import LabeledImages
from fedmerge.merge import (
    CORRECTIONS,
    METHODS,
    MergeConfig,
    NPConfig,
    STEConfig,
    interpolate_states,
    merge_pair,
    reset_batchnorm,
)
from fedmerge.models import build_model
from fedmerge.train import evaluate
from tests.helpers import (
    NUM_CLASSES,
    SHAPE,
    SPLIT_SEEDS,
    assert_states_equal,
    assert_valid_perms,
    blobs,
    load,
    mlp,
    one_thread,
    randomized_bn_model,
    snapshot,
    trained_mlp,
)

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


@pytest.fixture(scope="module")
def permuted_copy():
    """A trained MLP and a randomly permuted copy of it (same function, scrambled units)."""
    with one_thread():
        data = blobs(range(NUM_CLASSES), 50, seed=20)
        model = trained_mlp(data, seed=21)
    spec = model.permutation_spec()
    hidden = random_perms(spec, model.state_dict(), torch.Generator().manual_seed(22))
    state_b = apply_permutation(spec, hidden, model.state_dict())
    return model, state_b, hidden, data


@pytest.mark.parametrize("method", ["wm", "am", "ste", "np", "ste+np"])
def test_merging_a_permuted_copy_recovers_the_model(permuted_copy, method):
    model, state_b, hidden, data = permuted_copy
    spec = model.permutation_spec()
    config = MergeConfig(method=method, ste=STEConfig(steps=20, batch_size=50), np=NPConfig(steps=20, batch_size=50))
    result = merge_pair(mlp(), model.state_dict(), state_b, data, config=config)
    assert result.method == method
    assert result.seconds >= 0
    assert_valid_perms(result.perms, spec, state_b)
    for p in spec.perm_names:  # the permutation that undoes the scrambling was found
        assert torch.equal(result.perms[p], invert(hidden)[p]), p
    merged = load(mlp(), result.state)
    with torch.no_grad():
        torch.testing.assert_close(merged(data.x), model(data.x), atol=1e-5, rtol=1e-5)
    if method in ("ste", "np", "ste+np"):
        expected_steps = {"ste": 20, "np": 20, "ste+np": 40}[method]
        assert len(result.losses) == expected_steps


def test_averaging_a_permuted_copy_without_alignment_changes_the_model(permuted_copy):
    model, state_b, _, data = permuted_copy
    result = merge_pair(mlp(), model.state_dict(), state_b, data, config=MergeConfig(method="average"))
    assert all(torch.equal(perm, torch.arange(len(perm))) for perm in result.perms.values())
    merged = load(mlp(), result.state)
    with torch.no_grad():
        gap = (merged(data.x) - model(data.x)).abs().max().item()
    assert gap > 0.1
    assert evaluate(merged, data) < evaluate(model, data)


def test_merging_a_permuted_batchnorm_resnet_recovers_it():
    """The BN path: STE and NP train with batch statistics, buffers are permuted/interpolated, not reset."""
    model = randomized_bn_model("resnet20", (3, 8, 8), 0.25, seed=3, blocks_per_stage=1)
    spec = model.permutation_spec()
    state_b = apply_permutation(
        spec, random_perms(spec, model.state_dict(), torch.Generator().manual_seed(4)), model.state_dict()
    )
    gen = torch.Generator().manual_seed(5)
    data = LabeledImages(
        torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (32,), generator=gen), NUM_CLASSES
    )
    template = copy.deepcopy(model)
    config = MergeConfig(
        method="ste+np", correction="none", ste=STEConfig(steps=5, batch_size=32), np=NPConfig(steps=5, batch_size=32)
    )
    result = merge_pair(template, model.state_dict(), state_b, data, config=config)
    merged = load(template, result.state)
    with torch.no_grad():
        torch.testing.assert_close(merged(data.x), model(data.x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.state["bn1.running_var"], model.state_dict()["bn1.running_var"])

    # correction="auto" on a BN model is a BatchNorm reset on the surrogate.
    auto = merge_pair(template, model.state_dict(), state_b, data, config=MergeConfig(method="wm"))
    plain = merge_pair(template, model.state_dict(), state_b, data, config=MergeConfig(method="wm", correction="none"))
    expected = reset_batchnorm(load(template, plain.state), data).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(auto.state[key], value, msg=key)
    assert not torch.allclose(auto.state["bn1.running_mean"], plain.state["bn1.running_mean"])


def test_specialists_are_specialists(split_pairs):
    for pair in split_pairs.values():
        for model in (pair.model_a, pair.model_b):
            assert 40 <= evaluate(model, pair.test) <= 55


def test_activation_matching_merge_aligns_on_the_surrogate(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    result = pair.merge("am")
    expected = activation_matching(pair.model_a, pair.model_b, pair.surrogate)
    assert result.method == "am" and result.losses == []
    for p in pair.spec.perm_names:
        assert torch.equal(result.perms[p], expected[p]), p
    aligned = apply_permutation(pair.spec, expected, pair.model_b.state_dict())
    assert_states_equal(result.state, interpolate_states(pair.model_a.state_dict(), aligned, 0.5))


def test_merges_are_deterministic(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[1]]
    config = MergeConfig(
        method="ste+np", seed=3, ste=STEConfig(steps=30, lr=1e-2, batch_size=16), np=NPConfig(steps=30, batch_size=16)
    )
    runs = [
        merge_pair(pair.template, pair.model_a.state_dict(), pair.model_b.state_dict(), pair.surrogate, config=config)
        for _ in range(2)
    ]
    assert_states_equal(runs[0].state, runs[1].state)
    assert runs[0].losses == runs[1].losses
    for p in pair.spec.perm_names:
        assert torch.equal(runs[0].perms[p], runs[1].perms[p])


@pytest.mark.parametrize("method", ["am", "ste", "np", "ste+np"])
@pytest.mark.parametrize("surrogate", ["none", "empty"])
def test_merge_pair_falls_back_to_weight_matching_without_data(split_pairs, caplog, method, surrogate):
    pair = split_pairs[SPLIT_SEEDS[0]]
    data = (
        None
        if surrogate == "none"
        else LabeledImages(torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long), NUM_CLASSES)
    )
    with caplog.at_level(logging.WARNING, logger="fedmerge.merge.pairwise"):
        result = merge_pair(
            pair.template, pair.model_a.state_dict(), pair.model_b.state_dict(), data, config=MergeConfig(method=method)
        )
    assert result.method == "wm"
    assert result.losses == []
    assert any(
        r.levelno == logging.WARNING and method in r.getMessage() and "weight matching" in r.getMessage()
        for r in caplog.records
    )
    assert_states_equal(result.state, pair.merge("wm").state)


def test_merge_pair_skips_a_correction_that_needs_missing_data(split_pairs, caplog):
    pair = split_pairs[SPLIT_SEEDS[0]]
    with caplog.at_level(logging.WARNING, logger="fedmerge.merge.pairwise"):
        result = merge_pair(
            pair.template,
            pair.model_a.state_dict(),
            pair.model_b.state_dict(),
            None,
            config=MergeConfig(method="wm", correction="repair"),
        )
    assert any("repair" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert_states_equal(result.state, pair.merge("wm").state)


def test_merge_config_rejects_unknown_method_or_correction():
    assert set(METHODS) >= {"average", "wm", "am", "ste", "np", "ste+np"}
    assert set(CORRECTIONS) >= {"auto", "none", "bn-reset", "repair"}
    with pytest.raises(ValueError, match="method"):
        MergeConfig(method="fedavg")
    with pytest.raises(ValueError, match="correction"):
        MergeConfig(correction="renorm")


def test_merge_pair_rejects_state_dicts_that_do_not_match_the_spec(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    deeper = mlp(depth=3).state_dict()
    config = MergeConfig(method="wm")
    with pytest.raises(ValueError, match="spec"):
        merge_pair(pair.template, a, deeper, config=config)
    with pytest.raises(ValueError, match="spec"):
        merge_pair(pair.template, {k: v for k, v in a.items() if k != "head.bias"}, b, config=config)
    with pytest.raises(ValueError, match="axes"):
        merge_pair(pair.template, a, {**b, "head.bias": b["head.bias"].unsqueeze(0)}, config=config)
    with pytest.raises(ValueError):  # a CNN's weights for an MLP template
        cnn = build_model("cnn", SHAPE, num_classes=NUM_CLASSES, width=0.25)
        merge_pair(pair.template, cnn.state_dict(), cnn.state_dict(), config=config)


@pytest.mark.parametrize("method", ["average", "wm", "ste"])
def test_merge_pair_rejects_models_of_different_widths(split_pairs, method):
    pair = split_pairs[SPLIT_SEEDS[0]]
    with pytest.raises(ValueError):
        merge_pair(
            pair.template, pair.model_a.state_dict(), mlp(width=16).state_dict(), config=MergeConfig(method=method)
        )


@pytest.mark.parametrize("method", ["ste", "np", "ste+np"])
def test_merging_leaves_the_callers_models_as_they_were(split_pairs, method):
    pair = split_pairs[SPLIT_SEEDS[0]]
    template, model_a = pair.template.train(), pair.model_a.train()
    before = snapshot(template), snapshot(model_a)
    config = MergeConfig(method=method, correction="repair", ste=STEConfig(steps=3), np=NPConfig(steps=3))
    merge_pair(template, model_a.state_dict(), pair.model_b.state_dict(), pair.surrogate, config=config)
    assert template.training and model_a.training
    for old, model in zip(before, (template, model_a), strict=True):
        assert all(torch.equal(old[k], v) for k, v in model.state_dict().items())
    template.eval(), model_a.eval()
