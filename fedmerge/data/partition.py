"""Splitting one dataset among clients (IID, Dirichlet label skew, disjoint labels) and domain splits.

Every partitioner returns one sorted int64 index tensor per client, deterministic for a seed, with each index used at
most once. :func:`make_partition` (what a federation uses) also logs a warning when a client gets fewer than
``min_size`` samples (fewer than one when ``min_size`` is 0): the Dirichlet split redraws until every client has
``min_size``, but ``min_size=0`` allows empty clients, and the IID and disjoint splits do not look at ``min_size``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmerge.data.datasets import load_dataset
from fedmerge.data.images import LabeledImages

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

PARTITION_KINDS: tuple[str, ...] = ("iid", "dirichlet", "disjoint")

LabelsLike = torch.Tensor | np.ndarray | Sequence[int]


def _as_labels(labels: LabelsLike) -> np.ndarray:
    """Labels as a 1-D int64 numpy array of non-negative class ids."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return arr.astype(np.int64, copy=False)


def _check_clients(n_clients: int, n_items: int, what: str, plural: str) -> None:
    if not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be a positive integer, got {n_clients!r}")
    if n_clients > n_items:
        raise ValueError(f"cannot give {n_clients} clients at least one {what} each: only {n_items} {plural}")


def _to_tensors(parts: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(np.asarray(p, dtype=np.int64))) for p in parts]


def iid_partition(labels: LabelsLike, n_clients: int, seed: int) -> list[torch.Tensor]:
    """Shuffle all indices and cut them into ``n_clients`` parts whose sizes differ by at most one."""
    y = _as_labels(labels)
    _check_clients(n_clients, len(y), "sample", "samples")
    perm = np.random.default_rng(seed).permutation(len(y))
    return _to_tensors(np.array_split(perm, n_clients))


def _dirichlet_once(y: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One draw of the per-class Dirichlet split (FedMA / NIID-Bench code, with its balancing step: a client already
    holding more than N / n_clients samples gets no share of the remaining classes)."""
    cap = len(y) / n_clients
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    sizes = np.zeros(n_clients, dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(n_clients, alpha))
        masked = p * (sizes < cap)
        p = masked / masked.sum() if masked.sum() > 0 else p / p.sum()
        cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
            sizes[k] += len(chunk)
    return [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]


def dirichlet_partition(
    labels: LabelsLike, n_clients: int, alpha: float, seed: int, min_size: int = 10, max_tries: int = 1000
) -> list[torch.Tensor]:
    """Label-skewed split (Hsu et al. 2019): each class is divided among clients by proportions ~ Dirichlet(alpha).

    Smaller ``alpha`` gives more skew. The draw is repeated until every client has at least ``min_size`` samples;
    ValueError after ``max_tries`` failed draws.
    """
    y = _as_labels(labels)
    _check_clients(n_clients, len(y), "sample", "samples")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if min_size * n_clients > len(y):
        raise ValueError(f"min_size={min_size} is impossible: {n_clients} clients x {min_size} > {len(y)} samples")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(max_tries):
        parts = _dirichlet_once(y, n_clients, alpha, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return _to_tensors(parts)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(y)} samples over {n_clients} clients gave every client "
        f">= {min_size} samples in {max_tries} tries (last smallest: {smallest}); raise alpha or max_tries, "
        f"or lower min_size or n_clients"
    )


def disjoint_label_partition(
    labels: LabelsLike, n_clients: int, seed: int, num_classes: int | None = None
) -> list[torch.Tensor]:
    """Each client owns its own classes (split as evenly as possible, shuffled by ``seed``) and all their samples.

    Classes are ``range(num_classes)`` when given, else the labels present. See :func:`disjoint_label_classes`.
    """
    y = _as_labels(labels)
    owned = disjoint_label_classes(y, n_clients, seed, num_classes)
    return _to_tensors([np.flatnonzero(np.isin(y, classes)) for classes in owned])


def disjoint_label_classes(
    labels: LabelsLike, n_clients: int, seed: int, num_classes: int | None = None
) -> list[list[int]]:
    """The sorted classes each client owns in :func:`disjoint_label_partition` with the same arguments."""
    y = _as_labels(labels)
    classes = np.arange(num_classes) if num_classes is not None else np.unique(y)
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(f"label {y.max()} is out of range for num_classes={num_classes}")
    _check_clients(n_clients, len(classes), "class", "classes")
    shuffled = np.random.default_rng(seed).permutation(classes)
    return [sorted(int(c) for c in chunk) for chunk in np.array_split(shuffled, n_clients)]


def make_partition(
    kind: str,
    labels: LabelsLike,
    n_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 10,
    num_classes: int | None = None,
) -> list[torch.Tensor]:
    """Dispatch on ``kind``: ``"iid"``, ``"dirichlet"`` (uses ``alpha``, ``min_size``) or ``"disjoint"``
    (uses ``num_classes``). Logs a warning naming the clients with fewer than ``max(min_size, 1)`` samples."""
    kind = kind.strip().lower()
    if kind == "iid":
        parts = iid_partition(labels, n_clients, seed)
    elif kind == "dirichlet":
        parts = dirichlet_partition(labels, n_clients, alpha, seed, min_size=min_size)
    elif kind == "disjoint":
        parts = disjoint_label_partition(labels, n_clients, seed, num_classes=num_classes)
    else:
        raise ValueError(f"unknown partition kind {kind!r}; valid kinds: {', '.join(PARTITION_KINDS)}")
    small = small_partitions(parts, max(min_size, 1))
    if small:
        log.warning(
            "the %s split of %d samples over %d clients leaves %d client(s) with fewer than %d samples "
            "(client: samples) %s: they train on almost nothing, and an empty client's updates are left out",
            kind,
            len(_as_labels(labels)),
            n_clients,
            len(small),
            max(min_size, 1),
            dict(small),
        )
    return parts


def small_partitions(parts: Sequence[torch.Tensor], min_size: int) -> list[tuple[int, int]]:
    """(client, number of samples) of each part of ``parts`` with fewer than ``min_size`` samples."""
    return [(k, len(part)) for k, part in enumerate(parts) if len(part) < min_size]


def domain_split(
    names: list[str], train: bool = True, root: str | Path | None = None, copy: bool = True
) -> list[LabeledImages]:
    """Client k gets the whole dataset ``names[k]`` (e.g. ``["mnist", "rmnist-90"]``); label ids are shared, so all
    datasets must have the same image shape and number of classes. ``copy=False`` hands out the loader's cached
    tensors (do not modify them)."""
    if not names:
        raise ValueError("domain_split needs at least one dataset name")
    datasets = [load_dataset(name, train=train, root=root, copy=copy) for name in names]
    shapes = {d.name: d.image_shape for d in datasets}
    if len(set(shapes.values())) != 1:
        detail = ", ".join(f"{n}: {s}" for n, s in shapes.items())
        raise ValueError(f"domain_split needs datasets with equal image shapes (C, H, W), got {detail}")
    counts = {d.name: d.num_classes for d in datasets}
    if len(set(counts.values())) != 1:
        raise ValueError(f"domain_split needs datasets with the same number of classes, got {counts}")
    return datasets


def partition_summary(labels: LabelsLike, parts: Sequence[torch.Tensor], num_classes: int) -> pd.DataFrame:
    """Client x class table of sample counts (index ``client`` 0..n-1, columns class ids 0..num_classes-1)."""
    import pandas as pd

    y = _as_labels(labels)
    if y.size and y.max() >= num_classes:
        raise ValueError(f"label {y.max()} is out of range for num_classes={num_classes}")
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        counts[k] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    table = pd.DataFrame(counts, columns=range(num_classes))
    table.index.name = "client"
    table.columns.name = "class"
    return table
