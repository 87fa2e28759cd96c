"""Partitioners: coverage, disjointness, determinism, skew, argument checks; domain splits on real data."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedmerge.data import (
    dirichlet_partition,
    disjoint_label_classes,
    disjoint_label_partition,
    domain_split,
    iid_partition,
    load_dataset,
    make_partition,
    partition_summary,
)
from tests.helpers import SHARED, needs_shared

pytestmark = pytest.mark.usefixtures("tmp_cache")  # conftest.py: a throw-away cache instead of ~/.cache


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    """Unbalanced labels over 10 classes (2,000 samples), shuffled."""
    counts = [300, 250, 220, 200, 200, 180, 180, 170, 150, 150]
    y = np.repeat(np.arange(10), counts)
    return torch.from_numpy(np.random.default_rng(0).permutation(y))


def assert_valid(parts: list[torch.Tensor], n: int, full_cover: bool = True) -> None:
    """Sorted int64 index tensors, each index used at most once (exactly once when ``full_cover``)."""
    for p in parts:
        assert p.dtype == torch.int64 and p.ndim == 1
        assert torch.equal(p, torch.sort(p).values)
    joined = torch.cat(parts)
    assert len(torch.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < n
    if full_cover:
        assert len(joined) == n


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def skew(y: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """Mean over clients of the share of the client's most frequent class."""
    table = partition_summary(y, parts, 10).to_numpy()
    return float((table.max(axis=1) / table.sum(axis=1)).mean())


# ------------------------------------------------------------------------------------------------------------ iid


def test_iid_covers_everything_evenly(labels: torch.Tensor):
    parts = iid_partition(labels, 7, seed=3)
    assert_valid(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same(parts, iid_partition(labels, 7, seed=3))
    assert not same(parts, iid_partition(labels, 7, seed=4))


def test_iid_argument_errors(labels: torch.Tensor):
    with pytest.raises(ValueError, match="n_clients"):
        iid_partition(labels, 0, seed=0)
    with pytest.raises(ValueError, match="only 3 samples"):
        iid_partition([0, 1, 2], 4, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        iid_partition(torch.zeros(3, 2, dtype=torch.long), 2, seed=0)


# ------------------------------------------------------------------------------------------------------ dirichlet


def test_dirichlet_valid_and_deterministic(labels: torch.Tensor):
    parts = dirichlet_partition(labels, 5, alpha=0.5, seed=1, min_size=50)
    assert_valid(parts, len(labels))
    assert min(len(p) for p in parts) >= 50
    assert same(parts, dirichlet_partition(labels, 5, alpha=0.5, seed=1, min_size=50))
    assert not same(parts, dirichlet_partition(labels, 5, alpha=0.5, seed=2, min_size=50))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels: torch.Tensor):
    mean_skew = {
        alpha: np.mean([skew(labels, dirichlet_partition(labels, 5, alpha, seed=s, min_size=10)) for s in range(5)])
        for alpha in (100.0, 1.0, 0.1)
    }
    assert mean_skew[100.0] < 0.2  # close to the balanced 0.15
    assert mean_skew[100.0] < mean_skew[1.0] < mean_skew[0.1]
    assert mean_skew[0.1] > 0.5


def test_dirichlet_min_size_and_errors(labels: torch.Tensor):
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(labels, 5, alpha=0, seed=0)
    with pytest.raises(ValueError, match="n_clients"):
        dirichlet_partition(labels, 0, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="min_size=500 is impossible"):
        dirichlet_partition(labels, 5, alpha=1.0, seed=0, min_size=500)
    with pytest.raises(ValueError, match="in 3 tries"):
        dirichlet_partition(labels, 10, alpha=0.01, seed=0, min_size=190, max_tries=3)


def test_make_partition_dispatches(labels: torch.Tensor):
    assert same(make_partition("iid", labels, 4, seed=0), iid_partition(labels, 4, seed=0))
    assert same(
        make_partition("Dirichlet", labels, 4, seed=0, alpha=0.3, min_size=20),
        dirichlet_partition(labels, 4, 0.3, seed=0, min_size=20),
    )
    assert same(make_partition("disjoint", labels, 2, seed=0), disjoint_label_partition(labels, 2, seed=0))
    with pytest.raises(ValueError, match="valid kinds: iid, dirichlet, disjoint"):
        make_partition("shards", labels, 4, seed=0)


def test_make_partition_warns_about_clients_below_min_size(caplog):
    y = np.repeat(np.arange(10), 10)
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        parts = make_partition("iid", y, 20, seed=0, min_size=10)
    assert [len(p) for p in parts] == [5] * 20
    (record,) = caplog.records
    assert "the iid split of 100 samples over 20 clients leaves 20 client(s) with fewer than 10 samples" in (
        record.message
    )
    assert "{0: 5, 1: 5," in record.message


def test_make_partition_warns_about_empty_dirichlet_clients_when_min_size_is_zero(caplog):
    y = np.repeat(np.arange(10), 10)
    seed = next(s for s in range(200) if min(len(p) for p in dirichlet_partition(y, 8, 0.05, s, min_size=0)) == 0)
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        parts = make_partition("dirichlet", y, 8, seed=seed, alpha=0.05, min_size=0)
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    (record,) = caplog.records
    assert "fewer than 1 samples" in record.message and all(f"{k}: 0" in record.message for k in empty)


def test_make_partition_is_quiet_when_every_client_has_min_size(labels: torch.Tensor, caplog):
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        make_partition("dirichlet", labels, 5, seed=0, alpha=0.5, min_size=10)
        make_partition("disjoint", labels, 5, seed=0)
    assert not caplog.records


# ------------------------------------------------------------------------------------------------------- disjoint


def test_disjoint_labels_give_each_client_its_own_classes(labels: torch.Tensor):
    parts = disjoint_label_partition(labels, 3, seed=5)
    assert_valid(parts, len(labels))
    owned = [set(labels[p].tolist()) for p in parts]
    assert sorted(len(s) for s in owned) == [3, 3, 4]
    assert set().union(*owned) == set(range(10))
    assert all(a.isdisjoint(b) for i, a in enumerate(owned) for b in owned[i + 1 :])
    assert [sorted(s) for s in owned] == disjoint_label_classes(labels, 3, seed=5)
    table = partition_summary(labels, parts, 10)
    assert ((table > 0).sum(axis=0) == 1).all()  # every class has exactly one owner, with all its samples
    assert same(parts, disjoint_label_partition(labels, 3, seed=5))
    assignments = {str(disjoint_label_classes(labels, 2, seed=s)) for s in range(5)}
    assert len(assignments) > 1  # the seed shuffles which classes go together


def test_disjoint_errors_and_num_classes(labels: torch.Tensor):
    with pytest.raises(ValueError, match="only 10 classes"):
        disjoint_label_partition(labels, 11, seed=0)
    few = torch.tensor([0, 0, 1, 1])
    parts = disjoint_label_partition(few, 4, seed=0, num_classes=4)  # classes 2 and 3 exist but have no samples
    assert_valid(parts, 4)
    assert sorted(len(p) for p in parts) == [0, 0, 2, 2]
    with pytest.raises(ValueError, match="out of range"):
        disjoint_label_partition(few, 2, seed=0, num_classes=1)


# -------------------------------------------------------------------------------------------------------- summary


def test_partition_summary_counts(labels: torch.Tensor):
    parts = iid_partition(labels, 4, seed=0)
    table = partition_summary(labels, parts, 10)
    assert table.shape == (4, 10) and table.index.name == "client"
    assert table.sum(axis=0).tolist() == torch.bincount(labels, minlength=10).tolist()
    assert table.sum(axis=1).tolist() == [len(p) for p in parts]
    assert partition_summary(labels, [], 10).shape == (0, 10)


# ---------------------------------------------------------------------------------------------------- domain split


def test_domain_split_digits_default():
    a, b = domain_split(["digits", "digits"], train=False)
    assert a.image_shape == b.image_shape == (1, 28, 28)


@pytest.mark.slow
@needs_shared
def test_domain_splits_on_real_data():
    mnist, rotated = domain_split(["mnist", "rmnist-90"], train=False, root=SHARED)
    assert (mnist.name, rotated.name) == ("mnist", "rmnist-90")
    assert torch.equal(mnist.y, rotated.y)
    usps, mnist2 = domain_split(["usps", "mnist"], train=False, root=SHARED)
    assert usps.image_shape == mnist2.image_shape == (1, 28, 28) and len(usps) == 2007
    fashion = domain_split(["mnist", "fmnist"], train=False, root=SHARED)[1]
    assert fashion.name == "fashion-mnist" and fashion.num_classes == mnist.num_classes == 10
    assert load_dataset("mnist", train=False, root=SHARED).x.shape == mnist.x.shape


@pytest.mark.slow
@needs_shared
def test_domain_split_rejects_different_shapes():
    with pytest.raises(ValueError, match=r"equal image shapes.*cifar10: \(3, 32, 32\).*mnist: \(1, 28, 28\)"):
        domain_split(["cifar10", "mnist"], train=False, root=SHARED)
    with pytest.raises(ValueError, match="at least one"):
        domain_split([])
