"""Post-merge corrections (``fedmerge.merge.repair``): BatchNorm reset and REPAIR."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmerge.align import apply_permutation, weight_matching
from fedmerge.data.images import LabeledImages, concat
from fedmerge.merge import MergeConfig, interpolate_states, merge_pair, repair, reset_batchnorm
from fedmerge.merge.repair import repair_points, unit_statistics
from fedmerge.train import evaluate
from tests.helpers import (
    NUM_CLASSES,
    SHAPE,
    SPLIT_SEEDS,
    assert_states_equal,
    blobs,
    data_loss,
    load,
    mlp,
    randomized_bn_model,
    snapshot,
    trained_mlp,
)

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


@torch.no_grad()
def per_batch_bn_input_stats(model: nn.Module, data: LabeledImages, batch_size: int) -> dict:
    """Average over batches of every BN input's per-channel batch mean and unbiased variance (train-mode forward)."""
    probe = copy.deepcopy(model).train()
    bns = {name: m for name, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list] = {name: [] for name in bns}
    handles = [
        m.register_forward_hook(lambda _m, inputs, _o, name=name: seen[name].append(inputs[0]))
        for name, m in bns.items()
    ]
    for start in range(0, len(data), batch_size):
        probe(data.x[start : start + batch_size])
    for h in handles:
        h.remove()
    stats = {}
    for name, inputs in seen.items():
        means = torch.stack([x.mean((0, 2, 3)) for x in inputs])
        variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs])
        stats[name] = (means.mean(0), variances.mean(0))
    return stats


@pytest.mark.parametrize(
    ("name", "in_shape", "width", "kwargs"),
    [("vgg11", (3, 32, 32), 0.125, {}), ("resnet20", (1, 28, 28), 0.25, {})],
    ids=["vgg11-3x32x32", "resnet20-1x28x28"],
)
def test_reset_batchnorm_sets_running_stats_to_the_data_statistics(name, in_shape, width, kwargs):
    model = randomized_bn_model(name, in_shape, width, seed=1, **kwargs)
    gen = torch.Generator().manual_seed(2)
    data = LabeledImages(
        torch.randn(48, *in_shape, generator=gen) * 1.5 + 0.3, torch.zeros(48, dtype=torch.long), NUM_CLASSES
    )
    expected = per_batch_bn_input_stats(model, data, batch_size=16)
    before = snapshot(model)
    returned = reset_batchnorm(model, data, batch_size=16)
    assert returned is model and not model.training
    modules = dict(model.named_modules())
    assert expected
    for bn_name, (mean, var) in expected.items():
        bn = modules[bn_name]
        assert bn.momentum == 0.1  # restored after the cumulative-average pass
        assert bn.num_batches_tracked.item() == 3
        torch.testing.assert_close(bn.running_mean, mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bn.running_var, var, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(bn.running_mean, before[f"{bn_name}.running_mean"], atol=1e-2)
    for key, value in before.items():  # learned parameters are untouched
        if not any(key.endswith(s) for s in ("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(model.state_dict()[key], value), key
    # One batch holding all the data: running stats are the dataset's statistics (and eval == train outputs, up to
    # the biased/unbiased variance difference).
    reset_batchnorm(model, data, batch_size=len(data))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(data.x), copy.deepcopy(model).train()(data.x), atol=0.05, rtol=0.05)


def test_reset_batchnorm_edge_cases():
    plain = mlp()
    before = snapshot(plain)
    empty = LabeledImages(torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long), NUM_CLASSES)
    assert reset_batchnorm(plain, empty) is plain  # nothing to reset: no data needed
    assert_states_equal(plain.state_dict(), before)
    bn_model = randomized_bn_model("resnet20", (3, 8, 8), 0.25, blocks_per_stage=1)
    with pytest.raises(ValueError, match="non-empty"):
        reset_batchnorm(bn_model, LabeledImages(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long), NUM_CLASSES))


def assert_repaired_stats(
    repaired: nn.Module, model_a: nn.Module, model_b: nn.Module, data: LabeledImages, lam: float, names: list[str]
):
    got = unit_statistics(repaired, names, data)
    stats_a, stats_b = unit_statistics(model_a, names, data), unit_statistics(model_b, names, data)
    for name in names:
        for i, what in enumerate(("mean", "std")):
            target = torch.lerp(stats_a[name][i], stats_b[name][i], lam)
            scale = target.abs().max().item()
            torch.testing.assert_close(got[name][i], target, atol=1e-3 * scale, rtol=1e-3, msg=f"{name} {what}")


def test_repair_matches_interpolated_unit_statistics_mlp(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    lam = 0.3
    data = concat([pair.surrogate, pair.test])
    perms = weight_matching(pair.spec, pair.model_a.state_dict(), pair.model_b.state_dict())
    aligned_b = load(pair.template, apply_permutation(pair.spec, perms, pair.model_b.state_dict()))
    merged = load(pair.template, interpolate_states(pair.model_a.state_dict(), aligned_b.state_dict(), lam))
    names = repair_points(merged)
    assert names == ["hidden.0", "hidden.1"]
    before = snapshot(merged)
    repaired = repair(merged, pair.model_a, aligned_b, data, lam=lam)
    assert repaired is not merged
    assert_states_equal(merged.state_dict(), before)
    assert_repaired_stats(repaired, pair.model_a, aligned_b, data, lam, names)
    # ... which the plain merge does not do (variance collapse): the check above can fail.
    with pytest.raises(AssertionError):
        assert_repaired_stats(merged, pair.model_a, aligned_b, data, lam, names)


def test_repair_matches_interpolated_unit_statistics_batchnorm():
    in_shape, lam = (3, 32, 32), 0.5
    model_a = randomized_bn_model("vgg11", in_shape, 0.125, seed=1)
    model_b = randomized_bn_model("vgg11", in_shape, 0.125, seed=2)
    data = LabeledImages(
        torch.randn(40, *in_shape, generator=torch.Generator().manual_seed(3)),
        torch.zeros(40, dtype=torch.long),
        NUM_CLASSES,
    )
    merged = load(model_a, interpolate_states(model_a.state_dict(), model_b.state_dict(), lam))
    names = repair_points(merged)
    assert names and all(isinstance(dict(merged.named_modules())[n], nn.BatchNorm2d) for n in names)
    repaired = repair(merged, model_a, model_b, data, lam=lam)
    assert not repaired.training
    assert_repaired_stats(repaired, model_a, model_b, data, lam, names)
    with pytest.raises(AssertionError):
        assert_repaired_stats(merged, model_a, model_b, data, lam, names)


def test_repair_undoes_variance_collapse():
    """Averaging two unaligned deep MLPs collapses hidden variance and accuracy; REPAIR restores most of it."""
    gains = []
    for seed in (0, 1):
        data = blobs(range(NUM_CLASSES), 150, seed * 10 + 1)
        test = blobs(range(NUM_CLASSES), 100, seed * 10 + 3)
        surrogate = blobs(range(NUM_CLASSES), 10, seed * 10 + 4)
        model_a = trained_mlp(data, seed * 10 + 5, width=64, depth=4)
        model_b = trained_mlp(data, seed * 10 + 6, width=64, depth=4)
        template = mlp(width=64, depth=4)
        args = (template, model_a.state_dict(), model_b.state_dict(), surrogate)
        plain = load(template, merge_pair(*args, config=MergeConfig(method="average", correction="none")).state)
        fixed = load(template, merge_pair(*args, config=MergeConfig(method="average", correction="repair")).state)
        assert data_loss(fixed, test) < data_loss(plain, test) - 0.2
        gains.append(evaluate(fixed, test) - evaluate(plain, test))
    assert min(gains) > 3.0 and sum(gains) / len(gains) > 10.0, gains
