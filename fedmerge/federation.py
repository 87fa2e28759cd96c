"""Which data each simulated client holds, and how a model is scored on a client's own part of the task.

A :class:`FederationSpec` names a dataset and a split; client ``k`` gets either partition ``k`` of the train split
(``iid``, ``dirichlet``, ``disjoint``) or, for ``domain``, the whole train split of the ``k``-th dataset of a
comma-separated list. Loaded sets and partitions are cached per process (a simulated client handles many messages);
every function hands out fresh copies, so callers may modify what they get.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from fedmerge.data import (
    PARTITION_KINDS,
    LabeledImages,
    canonical_name,
    concat,
    domain_split,
    load_dataset,
    make_partition,
)
from fedmerge.device import derive_seed
from fedmerge.train import predict_logits

SPLITS: tuple[str, ...] = (*PARTITION_KINDS, "domain")
"""How the train data is divided: partitions of one dataset, or one whole dataset per client ("domain")."""


@dataclass(frozen=True)
class FederationSpec:
    """The data of a simulated federation.

    ``dataset``: a dataset name, or for ``split="domain"`` a comma-separated list with one name per client.
    ``alpha`` and ``min_size`` are used by the Dirichlet split; ``seed`` is the run seed (the partition seed is
    derived from it); ``data_root`` is where the datasets live (``None``: the library's default search).
    """

    dataset: str = "digits"
    split: str = "disjoint"
    num_clients: int = 2
    alpha: float = 0.5
    min_size: int = 10
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"num_clients must be a positive integer, got {self.num_clients!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size!r}")
        names = self.datasets
        if self.split == "domain" and len(names) != self.num_clients:
            raise ValueError(
                f"split 'domain' needs one dataset name per client: got {len(names)} ({', '.join(names)}) "
                f"for {self.num_clients} clients"
            )
        if self.split != "domain" and len(names) != 1:
            raise ValueError(
                f"split {self.split!r} divides one dataset, got {self.dataset!r} (a list is for split 'domain')"
            )

    @property
    def datasets(self) -> tuple[str, ...]:
        """The canonical dataset names in ``dataset`` (one, or one per client for the domain split)."""
        return tuple(canonical_name(name) for name in self.dataset.split(","))


def _copy(data: LabeledImages, name: str | None = None) -> LabeledImages:
    return LabeledImages(data.x.clone(), data.y.clone(), data.num_classes, name or data.name)


@functools.lru_cache(maxsize=8)
def _datasets(names: tuple[str, ...], train: bool, root: str | None) -> tuple[LabeledImages, ...]:
    """The named datasets (one split), checked to share image shape and classes; cached, never handed out."""
    if len(names) == 1:
        return (load_dataset(names[0], train=train, root=root, copy=False),)
    return tuple(domain_split(list(names), train=train, root=root, copy=False))


@functools.lru_cache(maxsize=8)
def _partitions(spec: FederationSpec) -> tuple[torch.Tensor, ...]:
    """Index tensors into the train split, one per client (partitioned splits only)."""
    (train,) = _datasets(spec.datasets, True, spec.data_root)
    parts = make_partition(
        spec.split,
        train.y,
        spec.num_clients,
        derive_seed(spec.seed, "partition"),
        alpha=spec.alpha,
        min_size=spec.min_size,
        num_classes=train.num_classes,
    )
    return tuple(parts)


def _check_partition_id(spec: FederationSpec, partition_id: int) -> int:
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise TypeError(f"partition id must be an integer, got {partition_id!r}")
    if not 0 <= partition_id < spec.num_clients:
        raise IndexError(
            f"partition id {partition_id} is out of range for {spec.num_clients} clients (0..{spec.num_clients - 1})"
        )
    return partition_id


def client_train_data(spec: FederationSpec, partition_id: int) -> LabeledImages:
    """The training data of client ``partition_id``: its partition of the train split, or its domain's train split."""
    k = _check_partition_id(spec, partition_id)
    name = f"client {k}"
    if spec.split == "domain":
        return _copy(_datasets(spec.datasets, True, spec.data_root)[k], f"{name} ({spec.datasets[k]})")
    (train,) = _datasets(spec.datasets, True, spec.data_root)
    return train.subset(_partitions(spec)[k], name=name)


def client_test_data(spec: FederationSpec, partition_id: int) -> LabeledImages:
    """The test data client ``partition_id`` is scored on: its domain's test split, else the whole test split
    (reweight it to the client's classes with :func:`client_accuracy`)."""
    k = _check_partition_id(spec, partition_id)
    tests = _datasets(spec.datasets, False, spec.data_root)
    return _copy(tests[k] if spec.split == "domain" else tests[0])


def global_test_data(spec: FederationSpec) -> LabeledImages:
    """The test set of the whole federation: all domains' test splits together, else the test split."""
    tests = _datasets(spec.datasets, False, spec.data_root)
    return _copy(tests[0]) if len(tests) == 1 else concat(tests, name="+".join(spec.datasets))


def label_distribution(data: LabeledImages) -> torch.Tensor:
    """Class frequencies of ``data`` (float64, length ``num_classes``, summing to 1)."""
    if len(data) == 0:
        raise ValueError(f"cannot take the label distribution of an empty dataset ({data.name or 'unnamed'})")
    counts = data.class_counts().double()
    return counts / counts.sum()


def class_weighted_accuracy(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> float:
    """Accuracy (%) as the ``class_weights``-weighted mean of the per-class accuracies.

    Classes with weight but no labelled example are dropped and the remaining weights renormalised; NaN when no
    weighted class has an example (as for accuracy on an empty set).
    """
    weights = torch.as_tensor(class_weights, dtype=torch.float64).flatten()
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} logits but {len(labels)} labels")
    if logits.ndim != 2 or logits.shape[1] != len(weights):
        raise ValueError(f"class_weights has {len(weights)} entries but the logits have shape {tuple(logits.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"class_weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    labels = labels.cpu().long()
    correct = (logits.cpu().argmax(1) == labels).double()
    counts = torch.bincount(labels, minlength=len(weights)).double()
    hits = torch.bincount(labels, weights=correct, minlength=len(weights))
    present = counts > 0
    weights = torch.where(present, weights, torch.zeros_like(weights))
    if weights.sum() == 0:
        return float("nan")
    per_class = torch.where(present, hits / counts.clamp(min=1), torch.zeros_like(hits))
    return 100.0 * float((weights * per_class).sum() / weights.sum())


def client_accuracy(
    model: nn.Module, test: LabeledImages, class_weights: torch.Tensor, device: torch.device | str = "cpu"
) -> float:
    """Accuracy (%) of ``model`` on ``test`` reweighted to a client's label distribution ``class_weights``.

    With the client's :func:`label_distribution` this is its "own domain" accuracy: on its own classes for
    disjoint labels, on its own domain's test split (from :func:`client_test_data`) for domain splits.
    """
    if len(class_weights) != test.num_classes:
        raise ValueError(
            f"class_weights has {len(class_weights)} entries for {test.num_classes} classes ({test.name or 'test set'})"
        )
    return class_weighted_accuracy(predict_logits(model, test, device=device), test.y, class_weights)
