"""STE merging (``fedmerge.merge.ste``): permutations learned with a straight-through estimator on the surrogate.

Runs on the tiny synthetic blobs of ``tests.helpers`` (two specialists on disjoint classes, the SPLIT setting).
"""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.align import apply_permutation, random_perms
from fedmerge.merge import MergeConfig, STEConfig, interpolate_states, merge_pair, ste_merge
from fedmerge.merge import ste as ste_module
from tests.helpers import SPLIT_SEEDS, STE_FAST, assert_states_equal, assert_valid_perms, data_loss, load

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def test_ste_beats_weight_matching_on_split_clients(split_pairs):
    wm_loss, wm_acc, ste_loss, ste_acc = [], [], [], []
    for pair in split_pairs.values():
        wm = pair.merge("wm")
        ste = pair.merge("ste", ste=STE_FAST)
        assert ste.method == "ste"
        assert_valid_perms(ste.perms, pair.spec, pair.model_b.state_dict())
        # The returned state is exactly A interpolated with B under the returned permutations.
        aligned = apply_permutation(pair.spec, ste.perms, pair.model_b.state_dict())
        assert_states_equal(ste.state, interpolate_states(pair.model_a.state_dict(), aligned, 0.5))
        assert len(ste.losses) == STE_FAST.steps
        assert all(math.isfinite(x) for x in ste.losses)
        assert sum(ste.losses[-10:]) / 10 < sum(ste.losses[:10]) / 10 - 0.01
        for losses, accs, state in ((wm_loss, wm_acc, wm.state), (ste_loss, ste_acc, ste.state)):
            loss, acc = pair.quality(state)
            losses.append(loss)
            accs.append(acc)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(ste_loss) < mean(wm_loss) - 0.02, (ste_loss, wm_loss)
    assert mean(ste_acc) > mean(wm_acc) + 3.0, (ste_acc, wm_acc)


@pytest.mark.parametrize("lam", [0.25, 0.75])
def test_ste_respects_lambda(split_pairs, lam):
    pair = split_pairs[SPLIT_SEEDS[0]]
    result = merge_pair(
        pair.template,
        pair.model_a.state_dict(),
        pair.model_b.state_dict(),
        pair.surrogate,
        lam=lam,
        config=MergeConfig(method="ste", ste=STEConfig(steps=10, lr=1e-2, batch_size=40)),
    )
    aligned = apply_permutation(pair.spec, result.perms, pair.model_b.state_dict())
    for key, value in interpolate_states(pair.model_a.state_dict(), aligned, lam).items():
        torch.testing.assert_close(result.state[key], value, msg=key)


@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_ste_first_step_loss_is_that_of_the_lambda_weighted_weight_matching_merge(split_pairs, lam):
    # The soft weights start at A, so the first straight-through forward pass is exactly the WM merge at lam.
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    config = STEConfig(steps=1, batch_size=len(pair.surrogate))
    result = ste_merge(pair.template, pair.spec, a, b, pair.surrogate, lam, config)
    wm = merge_pair(pair.template, a, b, lam=lam, config=MergeConfig(method="wm"))
    assert result.losses[0] == pytest.approx(data_loss(load(pair.template, wm.state), pair.surrogate), rel=1e-4)


def test_ste_with_default_settings_improves_on_weight_matching(split_pairs):
    changed, gains = [], []
    for pair in split_pairs.values():
        wm, ste = pair.merge("wm"), pair.merge("ste", ste=STEConfig())
        changed.append(any(not torch.equal(wm.perms[p], ste.perms[p]) for p in pair.spec.perm_names))
        gains.append(pair.quality(wm.state)[0] - pair.quality(ste.state)[0])
    assert all(changed), changed
    assert sum(gains) / len(gains) > 0.02, gains


def test_ste_warm_and_full_projection_reach_similar_quality(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    wm_loss, wm_acc = pair.quality(pair.merge("wm").state)
    results = {}
    for projection in ("warm", "full"):
        config = STEConfig(steps=STE_FAST.steps, lr=STE_FAST.lr, batch_size=STE_FAST.batch_size, projection=projection)
        result = pair.merge("ste", ste=config)
        assert_valid_perms(result.perms, pair.spec, pair.model_b.state_dict())
        assert sum(result.losses[-10:]) / 10 < sum(result.losses[:10]) / 10
        results[projection] = pair.quality(result.state)
    (warm_loss, warm_acc), (full_loss, full_acc) = results["warm"], results["full"]
    assert warm_loss < wm_loss and full_loss < wm_loss, (results, wm_loss)
    assert abs(warm_loss - full_loss) < 0.1, results
    assert abs(warm_acc - full_acc) < 10.0, results
    assert min(warm_acc, full_acc) >= wm_acc, (results, wm_acc)


def test_ste_config_validation():
    with pytest.raises(ValueError, match="projection"):
        STEConfig(projection="exact")
    with pytest.raises(ValueError, match="steps"):
        STEConfig(steps=-1)


def test_ste_keeps_its_weight_matching_start_when_it_ends_worse(split_pairs, monkeypatch):
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    wm = merge_pair(pair.template, a, b, config=MergeConfig(method="wm"))
    real_weight_matching = ste_module.weight_matching

    def scrambled_after_start(spec, target, source, init=None, **kwargs):
        # The start (no init) is real weight matching; every later projection lands on a random permutation.
        if init is None:
            return real_weight_matching(spec, target, source, **kwargs)
        return random_perms(spec, source, torch.Generator().manual_seed(7))

    monkeypatch.setattr(ste_module, "weight_matching", scrambled_after_start)
    result = ste_merge(pair.template, pair.spec, a, b, pair.surrogate, 0.5, STEConfig(steps=2, batch_size=40))
    assert result.kept_start
    assert all(torch.equal(result.perms[p], wm.perms[p]) for p in pair.spec.perm_names)
    torch.testing.assert_close(result.state, wm.state)
