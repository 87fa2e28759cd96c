"""NP Merge (``fedmerge.merge.np_merge``): a learned interpolation coefficient per parameter, alone and after STE.

Runs on the tiny synthetic blobs of ``tests.helpers`` (two specialists on disjoint classes, the SPLIT setting).
"""

from __future__ import annotations

import pytest
import torch

from fedmerge.align import apply_permutation
from fedmerge.data.images import LabeledImages
from fedmerge.merge import NPConfig, interpolate_states, np_merge
from tests.helpers import NP_FAST, NUM_CLASSES, SHAPE, SPLIT_SEEDS, STE_FAST

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def test_np_merge_beats_weight_matching_and_stays_between_the_endpoints(split_pairs):
    for pair in split_pairs.values():
        wm, npm = pair.merge("wm"), pair.merge("np", np=NP_FAST)
        assert npm.method == "np"
        assert len(npm.losses) == NP_FAST.steps
        assert sum(npm.losses[-10:]) / 10 < sum(npm.losses[:10]) / 10 - 0.1
        for p in pair.spec.perm_names:  # NP Merge aligns with weight matching
            assert torch.equal(npm.perms[p], wm.perms[p])
        (wm_loss, wm_acc), (np_loss, np_acc) = pair.quality(wm.state), pair.quality(npm.state)
        assert np_loss < wm_loss - 0.1
        assert np_acc >= wm_acc
        # Every merged weight is a convex combination of A's and aligned B's.
        a = pair.model_a.state_dict()
        b = apply_permutation(pair.spec, npm.perms, pair.model_b.state_dict())
        for key in a:
            low, high = torch.minimum(a[key], b[key]), torch.maximum(a[key], b[key])
            assert (npm.state[key] >= low - 1e-6).all() and (npm.state[key] <= high + 1e-6).all(), key
            assert not torch.allclose(npm.state[key], wm.state[key]), f"{key}: coefficients never moved"


def test_ste_then_np_beats_ste_alone(split_pairs):
    for pair in split_pairs.values():
        ste, both = pair.merge("ste", ste=STE_FAST), pair.merge("ste+np", ste=STE_FAST, np=NP_FAST)
        assert len(both.losses) == STE_FAST.steps + NP_FAST.steps
        assert both.losses[: STE_FAST.steps] == ste.losses
        for p in pair.spec.perm_names:
            assert torch.equal(both.perms[p], ste.perms[p])
        assert pair.quality(both.state)[0] < pair.quality(ste.state)[0] - 0.1


def test_np_merge_initialises_at_lambda_and_rejects_bad_input(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    # With no optimisation steps NP Merge is plain interpolation at lambda.
    state, losses = np_merge(pair.template, a, b, pair.surrogate, lam=0.3, config=NPConfig(steps=0))
    assert losses == []
    for key, value in interpolate_states(a, b, 0.3).items():
        torch.testing.assert_close(state[key], value, msg=key)
    for lam in (0.0, 1.0):
        with pytest.raises(ValueError, match="lambda"):
            np_merge(pair.template, a, b, pair.surrogate, lam=lam)
    empty = LabeledImages(torch.empty(0, *SHAPE), torch.empty(0, dtype=torch.long), NUM_CLASSES)
    with pytest.raises(ValueError, match="non-empty"):
        np_merge(pair.template, a, b, empty)
