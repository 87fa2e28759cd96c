"""Weight matching and activation matching: recover known permutations, and align independent models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.align import activation_matching, apply_permutation, identity_perms, invert, random_perms, weight_matching
from fedmerge.align import universe as universe_module
from fedmerge.align.activation_matching import activation_similarities, record_activations
from fedmerge.align.permute import expand_blocks
from fedmerge.align.universe import align_to_universe, c2m3
from fedmerge.align.weight_matching import similarity_matrix
from fedmerge.data.images import LabeledImages
from fedmerge.models import Blocked, build_model, derive_permutation_spec
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


# ------------------------------------------------------------------ axes permuted in blocks (conv -> flatten -> linear)


class ConvFlatLinear(nn.Module):
    """conv-relu-pool-conv-relu, flatten (6 channels x 2x2), two Linear layers: fc1's input axis is blocked."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def blocked_copies(count: int, seed: int = 0):
    """A ConvFlatLinear with random weights, its derived (blocked) spec and ``count`` randomly permuted copies."""
    torch.manual_seed(seed)
    model = ConvFlatLinear().eval()
    spec = derive_permutation_spec(model, torch.randn(1, 3, 8, 8))
    assert spec.axes_to_perm["fc1.weight"][1] == Blocked("P_conv2", 4)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    return model, spec, [apply_permutation(spec, random_perms(spec, state, gen), state) for _ in range(count)]


def test_similarity_matrix_folds_blocks_into_the_unit_features():
    _, spec, (state_a, state_b) = blocked_copies(2)
    perms = identity_perms(spec, state_a)
    sim = similarity_matrix(spec, "P_conv2", state_a, state_b, perms)
    expected = torch.zeros(6, 6)
    for key in ("conv2.weight", "conv2.bias"):
        expected += state_a[key].reshape(6, -1) @ state_b[key].reshape(6, -1).T
    fc_a, fc_b = (s["fc1.weight"].reshape(16, 6, 4).transpose(0, 1).reshape(6, -1) for s in (state_a, state_b))
    torch.testing.assert_close(sim, expected + fc_a @ fc_b.T)


@pytest.mark.parametrize("method", ["merge-many", "c2m3"])
def test_universe_alignment_recovers_permuted_copies_through_blocked_axes(method):
    model, spec, copies = blocked_copies(3)
    alignment = align_to_universe(spec, copies, method)
    universe = alignment.to_universe(spec, copies)
    assert all(torch.equal(other[key], universe[0][key]) for other in universe[1:] for key in universe[0])
    # The Frank-Wolfe iterations themselves, from the identity, on the blocked axis too.
    from_identity = c2m3(spec, copies, init="identity")
    assert from_identity.iterations >= 1
    universe = from_identity.to_universe(spec, copies)
    assert all(torch.equal(other[key], universe[0][key]) for other in universe[1:] for key in universe[0])


def test_c2m3_soft_permutations_act_on_whole_blocks():
    """C2M3's tensor helpers agree with apply_permutation on a blocked axis: ``_mix`` with one-hot matrices,
    ``_take`` with indices; its gradient matches autograd."""
    _, spec, copies = blocked_copies(2)
    perms = [random_perms(spec, s, torch.Generator().manual_seed(i)) for i, s in enumerate(copies)]
    stack = torch.stack([s["fc1.weight"] for s in copies])
    index = torch.stack([p["P_conv2"] for p in perms])
    expected = torch.stack([apply_permutation(spec, p, s)["fc1.weight"] for p, s in zip(perms, copies, strict=True)])
    expected_in = torch.stack(
        [s["fc1.weight"][:, expand_blocks(p["P_conv2"], 4)] for p, s in zip(perms, copies, strict=True)]
    )
    torch.testing.assert_close(universe_module._take(stack, index, 1), expected_in)
    one_hot = universe_module._one_hot(index, stack.dtype)
    torch.testing.assert_close(universe_module._mix(stack, one_hot, 1), expected_in)
    assert not torch.equal(expected, expected_in)  # fc1's output axis is permuted as well

    # Gradient of the two-model objective <W_0, Q W_1> in Q (blocked axis 1 of fc1.weight only) vs autograd.
    q = torch.rand(2, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.ones(2, dtype=torch.float64)
    doubled = stack.double()
    mapped = torch.einsum("nkm,nomb->nokb", q, doubled.reshape(2, 16, 6, 4)).reshape(2, 16, 24)
    objective = (mapped[0] * mapped[1]).sum()
    objective.backward()
    images = universe_module._images(doubled, [(1, "P")], {"P": q.detach()})
    value, grads = universe_module._gradient([([(1, "P")], images)], w, {"P": q.detach()})
    assert value == pytest.approx(objective.item())
    torch.testing.assert_close(grads["P"][1], q.grad[1])
