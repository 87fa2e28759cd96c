"""Surrogates: coresets (random, herding, k-center), gradient-matching condensation, build dispatch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedmerge.data.images import LabeledImages
from fedmerge.models.mlp import MLP
from fedmerge.surrogate import (
    CondenseConfig,
    SurrogateConfig,
    build_surrogate,
    condense_gradient_matching,
    fresh_model_factory,
    herding_coreset,
    kcenter_coreset,
    penultimate_features,
    random_coreset,
)
from fedmerge.surrogate.condense import class_matching_distance
from fedmerge.train import TrainConfig, evaluate, train

SHAPE = (1, 8, 8)
NUM_CLASSES = 4
CORESETS = {"random": random_coreset, "herding": herding_coreset, "kcenter": kcenter_coreset}


@pytest.fixture(autouse=True)
def _quiet_single_thread(monkeypatch):
    """No progress bars; one thread (tiny tensors run much faster without thread hand-offs on a busy box)."""
    monkeypatch.setenv("FEDMERGE_PROGRESS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(counts: list[int], seed: int = 0, spread: float = 0.35, means_seed: int = 123) -> LabeledImages:
    """Gaussian class blobs as 1x8x8 images: class c ~ N(mean_c, I), ``counts[c]`` images of class c."""
    means = torch.randn(len(counts), *SHAPE, generator=torch.Generator().manual_seed(means_seed)) * spread
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    x = means[y] + torch.randn(len(y), *SHAPE, generator=g)
    return LabeledImages(x, y, len(counts), "blobs")


def small_mlp() -> MLP:
    return MLP(SHAPE, NUM_CLASSES, width=32, depth=2)


def class_rows(data: LabeledImages, c: int) -> torch.Tensor:
    return data.x[data.y == c].flatten(1)


# ----------------------------------------------------------------------------------------- coresets


@pytest.mark.parametrize("method", sorted(CORESETS))
def test_coreset_counts_and_absent_classes(method):
    data = blobs([30, 5, 0, 20])
    core = CORESETS[method](data, 10, seed=1)
    assert core.class_counts().tolist() == [10, 5, 0, 10]
    assert core.num_classes == NUM_CLASSES
    assert core.y.tolist() == sorted(core.y.tolist())


@pytest.mark.parametrize("method", sorted(CORESETS))
def test_coreset_images_are_real_rows_with_their_labels(method):
    data = blobs([40, 40, 40, 40])
    core = CORESETS[method](data, 7, seed=3)
    same = (core.x.flatten(1)[:, None, :] == data.x.flatten(1)[None, :, :]).all(-1)
    assert torch.all(same.sum(1) == 1), "every coreset image is exactly one input row"
    source = same.int().argmax(1)
    assert torch.equal(data.y[source], core.y)
    assert len(set(source.tolist())) == len(core), "no image picked twice"


@pytest.mark.parametrize("method", sorted(CORESETS))
def test_coreset_is_deterministic_per_seed(method):
    data = blobs([50, 50, 50, 50])
    a, b = CORESETS[method](data, 5, seed=7), CORESETS[method](data, 5, seed=7)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    if method != "herding":  # herding is deterministic by design
        assert not torch.equal(a.x, CORESETS[method](data, 5, seed=8).x)


@pytest.mark.parametrize("method", sorted(CORESETS))
def test_coreset_rejects_bad_arguments(method):
    data = blobs([10, 10, 10, 10])
    with pytest.raises(ValueError, match="per_class"):
        CORESETS[method](data, 0, seed=0)
    if method != "random":
        with pytest.raises(ValueError, match="rows"):
            CORESETS[method](data, 2, features=torch.zeros(3, 4))


def mean_error(core: LabeledImages, data: LabeledImages) -> float:
    """Average over classes of |mean of the picks - class mean|."""
    return (
        sum((class_rows(core, c).mean(0) - class_rows(data, c).mean(0)).norm().item() for c in range(NUM_CLASSES))
        / NUM_CLASSES
    )


def coverage_radius(core: LabeledImages, data: LabeledImages) -> float:
    """Average over classes of the largest distance from an image to its nearest picked centre."""
    return (
        sum(
            torch.cdist(class_rows(data, c), class_rows(core, c)).min(1).values.max().item() for c in range(NUM_CLASSES)
        )
        / NUM_CLASSES
    )


def test_herding_tracks_the_class_mean_better_than_random():
    data = blobs([200, 200, 200, 200])
    herding = mean_error(herding_coreset(data, 5), data)
    random = sum(mean_error(random_coreset(data, 5, seed=s), data) for s in range(10)) / 10
    assert herding < 0.8 * random


def test_kcenter_covers_better_than_random():
    data = blobs([200, 200, 200, 200])
    # coverage is informative in a low-dimensional feature space (in 64-D all points are nearly equidistant)
    features = data.x.flatten(1)[:, :2]
    as_points = LabeledImages(features.reshape(-1, 1, 1, 2), data.y, NUM_CLASSES)
    kcenter = coverage_radius(kcenter_coreset(as_points, 10, features=features, seed=0), as_points)
    random = sum(coverage_radius(random_coreset(as_points, 10, seed=s), as_points) for s in range(10)) / 10
    assert kcenter < 0.8 * random


def test_coresets_use_given_features():
    data = blobs([60, 60, 60, 60])
    # a feature space in which only the first pixel matters: herding picks balance that pixel's mean
    first_pixel = data.x.flatten(1)[:, :1]
    core = herding_coreset(data, 4, features=first_pixel)
    for c in range(NUM_CLASSES):
        picked, everything = class_rows(core, c)[:, 0].mean(), class_rows(data, c)[:, 0].mean()
        assert abs(picked - everything) < 0.05
    assert not torch.equal(core.x, herding_coreset(data, 4).x)


# ------------------------------------------------------------------------------------- condensation

FAST = CondenseConfig(iterations=20, outer_loop=5, inner_loop=5, batch_real=64)


def mean_matching_distance(syn: LabeledImages, real: LabeledImages, nets: int = 6) -> float:
    """Matching distance summed over classes, averaged over fresh networks not used for condensing."""
    total = 0.0
    for s in range(nets):
        torch.manual_seed(10_000 + s)
        net = small_mlp()
        for c in range(NUM_CLASSES):
            xr, yr = real.x[real.y == c], real.y[real.y == c]
            xs, ys = syn.x[syn.y == c], syn.y[syn.y == c]
            total += class_matching_distance(net, xr, yr, xs, ys).item()
    return total / nets


@pytest.mark.parametrize(("init", "ratio"), [("noise", 0.75), ("real", 0.95)])
def test_gradient_matching_reduces_the_matching_distance(init, ratio):
    data = blobs([100, 100, 100, 100])
    initial = condense_gradient_matching(data, 5, small_mlp, CondenseConfig(iterations=0, init=init), seed=0)
    condensed = condense_gradient_matching(data, 5, small_mlp, replace(FAST, init=init), seed=0)
    assert initial.x.shape == condensed.x.shape
    # measured on fresh networks that condensation never saw, against the full real class
    assert mean_matching_distance(condensed, data) < ratio * mean_matching_distance(initial, data)


def test_condensed_noise_learns_the_classes():
    data, held_out = blobs([100, 100, 100, 100], seed=0), blobs([200, 200, 200, 200], seed=1)
    config = CondenseConfig(iterations=20, outer_loop=5, inner_loop=5, batch_real=64, init="noise")
    condensed = condense_gradient_matching(data, 10, small_mlp, config, seed=0)
    noise = condense_gradient_matching(data, 10, small_mlp, CondenseConfig(iterations=0, init="noise"), seed=0)

    def accuracy(train_set: LabeledImages) -> float:
        torch.manual_seed(0)
        model = train(small_mlp(), train_set, TrainConfig(epochs=100, lr=0.05, batch_size=64), seed=0)
        return evaluate(model, held_out)

    assert accuracy(condensed) > 60.0  # chance is 25 %
    assert accuracy(condensed) > accuracy(noise) + 20.0


def test_condensed_set_shape_labels_and_plain_tensors():
    data = blobs([50, 3, 0, 50])
    config = CondenseConfig(iterations=2, batch_real=32)
    one = condense_gradient_matching(data, 1, small_mlp, config, seed=0)
    assert one.class_counts().tolist() == [1, 1, 0, 1]
    assert one.y.tolist() == [0, 1, 3]
    ten = condense_gradient_matching(data, 10, small_mlp, CondenseConfig(iterations=1, inner_loop=2), seed=0)
    assert ten.class_counts().tolist() == [10, 3, 0, 10]  # never more images than the class has
    for out in (one, ten):
        assert not out.x.requires_grad and out.x.grad_fn is None and out.x.dtype == torch.float32
        assert out.y.dtype == torch.long and out.x.shape[1:] == SHAPE
        assert torch.isfinite(out.x).all()


def test_condensation_is_deterministic_per_seed_and_keeps_global_rng():
    data = blobs([40, 40, 40, 40])
    config = CondenseConfig(iterations=2, outer_loop=2, inner_loop=2, batch_real=16)
    torch.manual_seed(99)
    a = condense_gradient_matching(data, 2, small_mlp, config, seed=5)
    after = torch.rand(1)
    torch.manual_seed(99)
    b = condense_gradient_matching(data, 2, small_mlp, config, seed=5)
    assert torch.equal(a.x, b.x)
    assert torch.equal(after, torch.rand(1))
    assert not torch.equal(a.x, condense_gradient_matching(data, 2, small_mlp, config, seed=6).x)


def test_condense_config_validation():
    with pytest.raises(ValueError, match="init"):
        CondenseConfig(init="zeros")
    with pytest.raises(ValueError):
        CondenseConfig(outer_loop=0)
    with pytest.raises(ValueError, match="ipc"):
        condense_gradient_matching(blobs([5, 5, 5, 5]), 0, small_mlp)
    assert CondenseConfig().schedule(10) == (10, 10, 50)  # the paper's loops, ~100 image updates
    assert CondenseConfig().schedule(1) == (100, 1, 1)
    assert CondenseConfig(iterations=3, outer_loop=2, inner_loop=4).schedule(10) == (3, 2, 4)


# ------------------------------------------------------------------------------------------ building


def test_build_surrogate_dispatch():
    data = blobs([30, 30, 0, 30])
    torch.manual_seed(0)
    model = small_mlp()
    assert build_surrogate(data, SurrogateConfig(kind="none")) is None
    random = build_surrogate(data, SurrogateConfig(kind="random", per_class=4), seed=2)
    assert torch.equal(random.x, random_coreset(data, 4, seed=2).x)
    features = penultimate_features(model, data)
    herding = build_surrogate(data, SurrogateConfig(kind="herding", per_class=4), model=model)
    assert torch.equal(herding.x, herding_coreset(data, 4, features=features).x)
    kcenter = build_surrogate(data, SurrogateConfig(kind="kcenter", per_class=4), model=model, seed=1)
    assert torch.equal(kcenter.x, kcenter_coreset(data, 4, features=features, seed=1).x)
    assert torch.equal(
        build_surrogate(data, SurrogateConfig(kind="herding", per_class=4)).x, herding_coreset(data, 4).x
    )
    config = SurrogateConfig(kind="condensed", per_class=2, condense=CondenseConfig(iterations=1, batch_real=16))
    condensed = build_surrogate(data, config, model=model)
    assert condensed.class_counts().tolist() == [2, 2, 0, 2]


def test_build_surrogate_errors():
    with pytest.raises(ValueError, match="unknown surrogate kind"):
        SurrogateConfig(kind="coreset")
    with pytest.raises(ValueError, match="per_class"):
        SurrogateConfig(kind="random", per_class=0)
    with pytest.raises(ValueError, match="model"):
        build_surrogate(blobs([5, 5, 5, 5]), SurrogateConfig(kind="condensed", per_class=1))


def test_penultimate_features_are_the_head_inputs():
    data = blobs([10, 10, 10, 10])
    torch.manual_seed(0)
    model = small_mlp().train()
    features = penultimate_features(model, data)
    assert features.shape == (len(data), 32)
    assert torch.allclose(model.head(features), model(data.x), atol=1e-5)
    assert model.training, "training mode restored"


def test_fresh_model_factory_reinitialises_copies():
    torch.manual_seed(0)
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make = fresh_model_factory(model)
    a, b = make(), make()
    assert type(a) is MLP and a is not model
    assert not torch.equal(a.head.weight, model.head.weight)
    assert not torch.equal(a.head.weight, b.head.weight)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
