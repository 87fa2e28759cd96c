"""Baselines (``fedmerge.merge.baselines``): the output ensemble, fine-tuning and training from scratch."""

from __future__ import annotations

import pytest
import torch

from fedmerge.merge import Ensemble, class_weights, fine_tune, train_from_scratch
from fedmerge.train import TrainConfig, evaluate
from tests.helpers import SPLIT_SEEDS, assert_states_equal, data_loss, load, mlp, snapshot

pytestmark = pytest.mark.usefixtures("quiet_single_thread")


def test_ensemble_validates_weights():
    members = [mlp(seed=0), mlp(seed=1)]
    with pytest.raises(ValueError, match="member"):
        Ensemble([])
    for bad in ([1.0], [1.0, 2.0, 3.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            Ensemble(members, bad)
    torch.testing.assert_close(Ensemble(members).weights, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(Ensemble(members, [1.0, 3.0]).weights, torch.tensor([0.25, 0.75]))


def test_ensemble_output_is_log_of_weighted_mean_probabilities(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    ensemble = Ensemble([pair.model_a, pair.model_b], [1.0, 3.0]).eval()
    x = pair.test.x[:64]
    with torch.no_grad():
        expected = torch.log(0.25 * torch.softmax(pair.model_a(x), 1) + 0.75 * torch.softmax(pair.model_b(x), 1))
        out = ensemble(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(len(x)))
    one = Ensemble([pair.model_a]).eval()
    with torch.no_grad():
        torch.testing.assert_close(one(x), torch.log_softmax(pair.model_a(x), 1), atol=1e-5, rtol=1e-5)


def test_class_wise_ensemble_mixes_each_class_by_its_own_weights(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    table = torch.tensor([[3.0, 1.0, 0.0, 1.0], [1.0, 3.0, 1.0, 0.0]])
    ensemble = Ensemble([pair.model_a, pair.model_b], table).eval()
    torch.testing.assert_close(ensemble.weights.sum(0), torch.ones(4))
    x = pair.test.x[:64]
    with torch.no_grad():
        pa, pb = torch.softmax(pair.model_a(x), 1), torch.softmax(pair.model_b(x), 1)
        w = table / table.sum(0)
        mixed = w[0] * pa + w[1] * pb
        torch.testing.assert_close(ensemble(x), torch.log(mixed / mixed.sum(1, keepdim=True)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="all zero"):
        Ensemble([pair.model_a, pair.model_b], torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="cover 3 classes"):
        Ensemble([pair.model_a, pair.model_b], torch.ones(2, 3))(x)


def test_class_weights_follow_label_counts_and_keep_unseen_classes_judged():
    weights = class_weights(torch.tensor([[90.0, 0.0, 0.0], [10.0, 50.0, 0.0]]), smoothing=0.5)
    torch.testing.assert_close(weights.sum(0), torch.ones(3))
    assert weights[0, 0] > 0.85 and weights[1, 1] > 0.98  # each class is judged by who saw it
    torch.testing.assert_close(weights[:, 2], torch.tensor([0.5, 0.5]))  # nobody saw class 2: equal say
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([[-1.0, 2.0]]), torch.tensor([[float("nan"), 1.0]])):
        with pytest.raises(ValueError, match="label counts"):
            class_weights(bad)
    with pytest.raises(ValueError, match="smoothing"):
        class_weights(torch.ones(2, 2), smoothing=0)


def test_class_wise_ensemble_of_specialists_beats_the_sample_weighted_one(split_pairs):
    """Specialists on classes {0, 1} and {2, 3}, the second holding 20 times the examples: weighing each by the
    classes it saw keeps the small specialist's say on its own classes, a plain sample-weighted average drowns it."""
    for pair in split_pairs.values():
        counts = torch.stack([pair.data_a.class_counts(), 20 * pair.data_b.class_counts()]).float()
        by_labels = evaluate(Ensemble([pair.model_a, pair.model_b], class_weights(counts)), pair.test)
        by_examples = evaluate(Ensemble([pair.model_a, pair.model_b], counts.sum(1).tolist()), pair.test)
        assert by_labels > by_examples + 10.0


def test_ensemble_of_specialists_beats_each_specialist(split_pairs):
    for pair in split_pairs.values():
        ensemble = Ensemble([pair.model_a, pair.model_b])
        acc = evaluate(ensemble, pair.test)
        assert acc > max(evaluate(pair.model_a, pair.test), evaluate(pair.model_b, pair.test)) + 25.0


def test_fine_tune_returns_a_new_model_that_fits_the_surrogate(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    merged = load(pair.template, pair.merge("wm").state)
    before = snapshot(merged)
    config = TrainConfig(epochs=30, lr=0.05, batch_size=20)
    tuned = fine_tune(merged, pair.surrogate, config, seed=0)
    assert tuned is not merged
    assert_states_equal(merged.state_dict(), before)
    assert evaluate(tuned, pair.surrogate) == 100.0
    assert data_loss(tuned, pair.surrogate) < data_loss(merged, pair.surrogate) / 2
    assert_states_equal(fine_tune(merged, pair.surrogate, config, seed=0).state_dict(), tuned.state_dict())


def test_train_from_scratch_forgets_the_weights_and_fits_the_surrogate(split_pairs):
    pair = split_pairs[SPLIT_SEEDS[0]]
    before = snapshot(pair.model_a)
    fresh = train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=0), seed=4)
    assert fresh is not pair.model_a
    assert_states_equal(pair.model_a.state_dict(), before)
    for key, value in fresh.state_dict().items():
        assert not torch.allclose(value, before[key]), f"{key} kept the original weights"
    assert_states_equal(
        train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=0), seed=4).state_dict(), fresh.state_dict()
    )
    assert not torch.equal(
        train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=0), seed=5).state_dict()["head.weight"],
        fresh.state_dict()["head.weight"],
    )

    trained = train_from_scratch(pair.model_a, pair.surrogate, TrainConfig(epochs=30, lr=0.05, batch_size=20), seed=4)
    assert_states_equal(pair.model_a.state_dict(), before)
    assert evaluate(trained, pair.surrogate) == 100.0
    assert data_loss(trained, pair.surrogate) < data_loss(fresh, pair.surrogate) / 2
    assert evaluate(trained, pair.test) > 60.0  # it learned all four classes, not only A's two
