"""Weight matching and activation matching: recover known permutations, and align independent models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align import activation_matching, apply_permutation, identity_perms, invert, random_perms, weight_matching
from fedmerge.align.activation_matching import activation_similarities, record_activations
from fedmerge.data.images import LabeledImages
from fedmerge.models import build_model
from fedmerge.train import TrainConfig, train
from tests.helpers import CASE_FIELDS, randomized_model

CASES = [
    ("mlp", (1, 28, 28), 16, {}),
    ("cnn", (1, 28, 28), 0.25, {}),
    ("vgg11", (3, 32, 32), 0.125, {}),
    ("vgg11", (1, 28, 28), 0.125, {"batch_norm": False}),
    ("resnet20", (3, 32, 32), 1.0, {}),
    ("resnet20", (1, 28, 28), 1.0, {}),
]
IDS = [f"{n}-{'x'.join(map(str, s))}{'-nobn' if kw else ''}" for n, s, _, kw in CASES]
over_cases = pytest.mark.parametrize(CASE_FIELDS, CASES, ids=IDS)


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


def hidden_permutation(name, in_shape, width, kwargs, seed: int):
    """A randomized model, its spec and state dict, and a random permutation (drawn with ``seed``) to hide."""
    model = randomized_model(name, in_shape, width, kwargs)
    spec = model.permutation_spec()
    state = model.state_dict()
    return model, spec, state, random_perms(spec, state, torch.Generator().manual_seed(seed))


@over_cases
def test_weight_matching_recovers_a_known_permutation(name, in_shape, width, kwargs):
    _, spec, state_a, hidden = hidden_permutation(name, in_shape, width, kwargs, seed=1)
    state_b = apply_permutation(spec, hidden, state_a)
    perms = weight_matching(spec, state_a, state_b)
    assert_states_equal(apply_permutation(spec, perms, state_b), state_a)
    assert all(torch.equal(perms[p], invert(hidden)[p]) for p in spec.perm_names)


@over_cases
def test_activation_matching_recovers_a_known_permutation(name, in_shape, width, kwargs):
    model_a, spec, state_a, hidden = hidden_permutation(name, in_shape, width, kwargs, seed=2)
    model_b = copy.deepcopy(model_a)
    model_b.load_state_dict(apply_permutation(spec, hidden, state_a))
    data = torch.randn(96, *in_shape, generator=torch.Generator().manual_seed(3))
    perms = activation_matching(model_a, model_b, data, batch_size=40)  # several batches: tests accumulation

    # Units that never fire on the data (dead ReLUs) all look alike to activation matching,
    # so only live units are pinned down; a random model has few dead ones.
    with torch.no_grad(), record_activations(model_a, model_a.activation_points()) as acts:
        model_a(data)
    truth = invert(hidden)
    for p in spec.perm_names:
        live = acts[p].std(0) > 0
        assert live.float().mean() > 0.9, f"{p}: too many dead units for a meaningful test"
        assert torch.equal(perms[p][live], truth[p][live]), p
    if all(bool((acts[p].std(0) > 0).all()) for p in spec.perm_names):
        assert_states_equal(apply_permutation(spec, perms, model_b.state_dict()), state_a)
    model_b.load_state_dict(apply_permutation(spec, perms, model_b.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(model_b(data), model_a(data), atol=1e-4, rtol=1e-4)


def blobs(n: int = 400, seed: int = 0) -> LabeledImages:
    """Ten Gaussian classes of 1x8x8 'images' around random prototypes."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 10
    x = prototypes[y] + 0.8 * torch.randn(n, 1, 8, 8, generator=gen)
    return LabeledImages(x, y, 10, "blobs")


def trained_mlp(data: LabeledImages, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", data.image_shape, width=32, depth=2)
    return train(model, data, TrainConfig(epochs=5, lr=0.05, batch_size=50), seed=seed)


def test_activation_matching_aligns_independently_trained_mlps():
    data = blobs()
    model_a, model_b = trained_mlp(data, seed=10), trained_mlp(data, seed=11)
    spec = model_a.permutation_spec()
    perms = activation_matching(model_a, model_b, data)
    assert perms.keys() == set(spec.perm_names)
    assert all(torch.equal(torch.sort(p).values, torch.arange(len(p))) for p in perms.values())
    aligned_b = copy.deepcopy(model_b)
    aligned_b.load_state_dict(apply_permutation(spec, perms, model_b.state_dict()))

    before = activation_similarities(model_a, model_b, data)
    for metric in ("correlation", "inner"):
        identity = activation_similarities(model_a, model_b, data, metric=metric)
        aligned = activation_similarities(model_a, aligned_b, data, metric=metric)
        for p in spec.perm_names:
            assert aligned[p].diag().mean() > identity[p].diag().mean() + 0.05, (metric, p)
    # The permuted weights reproduce exactly the pairing the assignment chose (convention check).
    after = activation_similarities(model_a, aligned_b, data)
    for p in spec.perm_names:
        rows = torch.arange(len(perms[p]))
        torch.testing.assert_close(after[p].diag(), before[p][rows, perms[p]])

    # Interpolating after alignment loses less than naive interpolation.
    def midpoint_loss(state_b: dict) -> float:
        state_a = model_a.state_dict()
        merged = copy.deepcopy(model_a)
        merged.load_state_dict({k: (state_a[k] + state_b[k]) / 2 for k in state_a})
        with torch.no_grad():
            return F.cross_entropy(merged(data.x), data.y).item()

    assert midpoint_loss(aligned_b.state_dict()) < midpoint_loss(model_b.state_dict())


def test_activation_matching_accepts_labeled_images_and_restores_modes():
    model_a = randomized_model("cnn", (1, 28, 28), 0.25, {}).train()
    model_b = randomized_model("cnn", (1, 28, 28), 0.25, {}, seed=1).eval()
    data = LabeledImages(torch.randn(20, 1, 28, 28), torch.zeros(20, dtype=torch.long))
    perms = activation_matching(model_a, model_b, data, metric="inner")
    sizes = model_a.permutation_spec().perm_sizes(model_a.state_dict())
    assert {p: len(v) for p, v in perms.items()} == sizes
    assert model_a.training and not model_b.training
    same = activation_matching(model_a, copy.deepcopy(model_a), data)
    assert all(torch.equal(same[p], identity_perms(model_a.permutation_spec(), model_a.state_dict())[p]) for p in same)


def test_activation_matching_rejects_bad_inputs():
    mlp, cnn = build_model("mlp", (1, 28, 28), width=8), build_model("cnn", (1, 28, 28), width=0.25)
    with pytest.raises(ValueError, match="different activation points"):
        activation_matching(mlp, cnn, torch.randn(4, 1, 28, 28))
    with pytest.raises(ValueError, match="non-empty"):
        activation_matching(mlp, mlp, torch.empty(0, 1, 28, 28))
    with pytest.raises(ValueError, match="metric"):
        activation_matching(mlp, mlp, torch.randn(4, 1, 28, 28), metric="cosine")
