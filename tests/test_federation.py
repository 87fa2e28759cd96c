"""Federation data: client partitions (coverage, disjointness, determinism), domain splits, client-weighted accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmerge.data import LabeledImages, load_dataset
from fedmerge.federation import (
    FederationSpec,
    class_weighted_accuracy,
    client_accuracy,
    client_test_data,
    client_train_data,
    global_test_data,
    label_distribution,
)
from tests.helpers import needs_shared

pytestmark = pytest.mark.usefixtures("tmp_cache")  # conftest.py: a throw-away cache instead of ~/.cache


def all_clients(spec: FederationSpec) -> list[LabeledImages]:
    return [client_train_data(spec, k) for k in range(spec.num_clients)]


def as_rows(data: LabeledImages) -> set[tuple[float, ...]]:
    """Each image (flattened) with its label, as a hashable row, to compare sets of examples."""
    return {(*x.flatten().tolist(), float(y)) for x, y in zip(data.x, data.y, strict=True)}


@pytest.mark.parametrize("split", ["iid", "dirichlet", "disjoint"])
def test_partitions_are_disjoint_and_cover_the_train_split(split):
    spec = FederationSpec("digits", split, num_clients=3, alpha=0.5, seed=1)
    train = load_dataset("digits", train=True)
    parts = all_clients(spec)
    assert sum(len(p) for p in parts) == len(train)
    rows = [as_rows(p) for p in parts]
    assert set().union(*rows) == as_rows(train)
    assert sum(len(r) for r in rows) == len(as_rows(train))  # no example in two clients
    if split == "disjoint":
        held = [set(p.y.tolist()) for p in parts]
        assert all(not (a & b) for i, a in enumerate(held) for b in held[i + 1 :])


@pytest.mark.parametrize("split", ["iid", "dirichlet", "disjoint"])
def test_partitions_depend_on_the_seed_only(split):
    first = all_clients(FederationSpec("digits", split, num_clients=2, seed=3))
    again = all_clients(FederationSpec("digits", split, num_clients=2, seed=3))
    other = all_clients(FederationSpec("digits", split, num_clients=2, seed=4))
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(first, again, strict=True))
    assert any(len(a) != len(b) or not torch.equal(a.y, b.y) for a, b in zip(first, other, strict=True))


def test_returned_data_is_a_private_copy():
    spec = FederationSpec("digits", "iid", num_clients=2)
    data = client_train_data(spec, 0)
    data.x.zero_()
    test = client_test_data(spec, 0)
    test.x.zero_()
    assert client_train_data(spec, 0).x.abs().sum() > 0
    assert global_test_data(spec).x.abs().sum() > 0


def test_test_data_of_a_label_split_is_the_whole_test_split():
    spec = FederationSpec("digits", "disjoint", num_clients=2)
    test = load_dataset("digits", train=False)
    for data in (client_test_data(spec, 1), global_test_data(spec)):
        assert torch.equal(data.x, test.x) and torch.equal(data.y, test.y)


def test_bad_specs_and_partition_ids():
    with pytest.raises(ValueError, match="iid, dirichlet, disjoint, domain"):
        FederationSpec(split="shards")
    with pytest.raises(ValueError, match="num_clients"):
        FederationSpec(num_clients=0)
    with pytest.raises(ValueError, match="one dataset name per client"):
        FederationSpec("mnist,usps,kmnist", "domain", num_clients=2)
    with pytest.raises(ValueError, match="split 'domain'"):
        FederationSpec("mnist,usps", "iid", num_clients=2)
    with pytest.raises(ValueError, match="unknown dataset"):
        FederationSpec("nope")
    spec = FederationSpec(num_clients=2)
    with pytest.raises(IndexError, match="out of range for 2 clients"):
        client_train_data(spec, 2)
    with pytest.raises(IndexError):
        client_test_data(spec, -1)
    with pytest.raises(TypeError):
        client_train_data(spec, 1.0)  # type: ignore[arg-type]


@pytest.mark.slow
@needs_shared
def test_domain_split_gives_each_client_its_dataset():
    spec = FederationSpec("mnist, fashion-mnist", "domain", num_clients=2)
    assert spec.datasets == ("mnist", "fashion-mnist")
    fmnist_train = client_train_data(spec, 1)
    assert torch.equal(fmnist_train.x, load_dataset("fashion-mnist", train=True, copy=False).x)
    mnist_test, fmnist_test = client_test_data(spec, 0), client_test_data(spec, 1)
    assert torch.equal(mnist_test.y, load_dataset("mnist", train=False, copy=False).y)
    assert torch.equal(fmnist_test.x, load_dataset("fashion-mnist", train=False, copy=False).x)
    both = global_test_data(spec)
    assert torch.equal(both.x, torch.cat([mnist_test.x, fmnist_test.x]))
    assert torch.equal(both.y, torch.cat([mnist_test.y, fmnist_test.y]))


def test_label_distribution():
    data = LabeledImages(torch.zeros(4, 1, 2, 2), torch.tensor([0, 2, 2, 2]), num_classes=4)
    assert torch.allclose(label_distribution(data), torch.tensor([0.25, 0.0, 0.75, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        label_distribution(LabeledImages(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long)))


def logits_as_images(logits: torch.Tensor, labels: torch.Tensor) -> LabeledImages:
    """A test set whose images are the logits themselves (1 x 1 x C), to be read by ``nn.Flatten()``."""
    return LabeledImages(logits.view(len(logits), 1, 1, -1), labels, num_classes=logits.shape[1])


@pytest.fixture()
def scored():
    """A balanced 3-class test set (4 images per class) and a 'model' whose predictions are known:
    class 0: 4/4 right, class 1: 1/4 right, class 2: 2/4 right."""
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    predicted = torch.tensor([0, 0, 0, 0, 1, 0, 2, 2, 2, 2, 0, 1])
    test = logits_as_images(nn.functional.one_hot(predicted, 3).float(), labels)
    return nn.Flatten(), test


def test_client_accuracy_with_uniform_weights_is_plain_accuracy(scored):
    model, test = scored
    plain = 100.0 * 7 / 12
    assert client_accuracy(model, test, torch.full((3,), 1 / 3)) == pytest.approx(plain)
    assert client_accuracy(model, test, torch.ones(3)) == pytest.approx(plain)  # weights need not sum to 1


def test_client_accuracy_on_the_clients_classes(scored):
    model, test = scored
    assert client_accuracy(model, test, torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(25.0)
    assert client_accuracy(model, test, torch.tensor([0.5, 0.0, 0.5])) == pytest.approx(100.0 * 6 / 8)
    assert client_accuracy(model, test, torch.tensor([0.75, 0.25, 0.0])) == pytest.approx(0.75 * 100 + 0.25 * 25)


def test_classes_without_test_images_are_dropped():
    labels = torch.tensor([0, 0, 1, 1])
    logits = nn.functional.one_hot(torch.tensor([0, 1, 1, 1]), 3).float()
    # class 2 has weight but no test image: the weights of classes 0 and 1 are renormalised (0.2 : 0.2)
    assert class_weighted_accuracy(logits, labels, torch.tensor([0.2, 0.2, 0.6])) == pytest.approx(75.0)
    assert torch.isnan(torch.tensor(class_weighted_accuracy(logits, labels, torch.tensor([0.0, 0.0, 1.0]))))


def test_client_accuracy_rejects_bad_weights(scored):
    model, test = scored
    with pytest.raises(ValueError, match="3 classes"):
        client_accuracy(model, test, torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        client_accuracy(model, test, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="not all zero"):
        client_accuracy(model, test, torch.zeros(3))
