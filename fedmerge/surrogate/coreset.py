"""Coresets: a few real images per class (random, herding, greedy k-center).

Every selector works class by class on the classes present in the data, takes
``min(per_class, available)`` images of each, and returns them as a ``LabeledImages`` whose rows
are copies of input rows, grouped by class (ascending), in pick order within a class.
Selection inside a class is vectorised over samples; only the ``k`` picks are a Python loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedmerge.data.images import LabeledImages

# (features of one class n x d, number to pick k <= n, generator) -> k local indices
Selector = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def random_coreset(data: LabeledImages, per_class: int, seed: int = 0) -> LabeledImages:
    """``per_class`` uniformly random images of every class present (all of a class with fewer)."""
    return _select_per_class(data, per_class, None, seed, _random_pick, "random")


def herding_coreset(
    data: LabeledImages, per_class: int, features: torch.Tensor | None = None, seed: int = 0
) -> LabeledImages:
    """Herding (Welling 2009, as in iCaRL): each pick keeps the running mean closest to the class mean.

    ``features`` (N x ...) is the feature space, e.g. a trained model's penultimate activations;
    flattened pixels when omitted. Herding is deterministic; ``seed`` is accepted for a uniform API.
    """
    return _select_per_class(data, per_class, features, seed, _herding_pick, "herding")


def kcenter_coreset(
    data: LabeledImages, per_class: int, features: torch.Tensor | None = None, seed: int = 0
) -> LabeledImages:
    """Greedy k-center (farthest-point) per class from a random first centre, in ``features`` or pixel space."""
    return _select_per_class(data, per_class, features, seed, _kcenter_pick, "kcenter")


def _random_pick(feats: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct random rows."""
    return torch.randperm(len(feats), generator=generator)[:k]


def _herding_pick(feats: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy herding: pick t minimises ``|mean - (sum of picks + x) / t|`` over unpicked ``x``."""
    feats = feats.double()
    target = feats.mean(0)
    running = torch.zeros_like(target)
    taken = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    picks = []
    for t in range(1, k + 1):
        error = (target - (running + feats) / t).norm(dim=1).masked_fill(taken, float("inf"))
        i = int(error.argmin())
        picks.append(i)
        taken[i] = True
        running += feats[i]
    return torch.tensor(picks, dtype=torch.long)


def _kcenter_pick(feats: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-center: start at a random row, then repeatedly add the row farthest from all centres."""
    feats = feats.double()
    first = int(torch.randint(len(feats), (1,), generator=generator))
    picks = [first]
    nearest = (feats - feats[first]).norm(dim=1)
    for _ in range(k - 1):
        i = int(nearest.argmax())
        picks.append(i)
        nearest = torch.minimum(nearest, (feats - feats[i]).norm(dim=1))
    return torch.tensor(picks, dtype=torch.long)


def _check_features(data: LabeledImages, features: torch.Tensor | None) -> torch.Tensor:
    """Features as an N x d float tensor (flattened pixels when ``None``)."""
    if features is None:
        return data.x.flatten(1)
    if len(features) != len(data):
        raise ValueError(f"features have {len(features)} rows but the data has {len(data)} images")
    return features.detach().flatten(1).float()


def _select_per_class(
    data: LabeledImages,
    per_class: int,
    features: torch.Tensor | None,
    seed: int,
    select: Selector,
    method: str,
) -> LabeledImages:
    """Run ``select`` on every class present and gather the chosen rows."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    feats = _check_features(data, features)
    generator = torch.Generator().manual_seed(seed)
    labels = data.y.cpu()
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        if len(members) <= per_class:
            chosen.append(members)
            continue
        local = select(feats[members.to(feats.device)], per_class, generator).cpu()
        chosen.append(members[local])
    indices = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)
    return data.subset(indices, name=f"{data.name}:{method}{per_class}" if data.name else f"{method}{per_class}")
