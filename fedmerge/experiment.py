"""Two-client experiments: train both clients, then compare merge methods and baselines on test sets.

Shared by the command-line demo and the benchmark scripts so they all measure the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import cast

import torch
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.merge.baselines import Ensemble, fine_tune, train_from_scratch
from fedmerge.merge.distill import DistillConfig, distill
from fedmerge.merge.functional import load_state
from fedmerge.merge.methods import MethodName
from fedmerge.merge.pairwise import Correction, MergeConfig, merge_pair
from fedmerge.models.registry import reinitialized_copy
from fedmerge.train import TrainConfig, evaluate, train

# Methods beyond ``fedmerge.merge.METHODS``: the clients themselves, their output ensemble, an STE
# merge fine-tuned on the surrogate, a fresh model trained on the surrogate alone with the fine-tuning settings
# ("scratch") or with the server's distillation recipe without a teacher ("pooled-recipe": the fair "Coreset AB"),
# the clients' ensemble distilled into a fresh model on the surrogate with that recipe ("distilled-fresh"), and a
# fresh model trained like the clients on the given data ("union": "Model AB" on the union of both datasets).
REFERENCE_METHODS = (
    "model-a",
    "model-b",
    "ensemble",
    "ste+finetune",
    "scratch",
    "pooled-recipe",
    "distilled-fresh",
    "union",
)


@dataclass(frozen=True)
class MethodRun:
    """One row of a comparison: a merge method (see ``fedmerge.merge.METHODS``) or a reference method,
    the surrogate it may use (a key of the surrogates mapping) and the post-merge correction."""

    label: str
    method: str
    surrogate: str | None = "coreset"
    correction: Correction = "auto"


@dataclass
class ClientModel:
    """A trained client: its model, training data size and training time."""

    name: str
    model: nn.Module
    num_samples: int
    seconds: float


def train_client(
    template: nn.Module, data: LabeledImages, config: TrainConfig, seed: int, device: torch.device | str, name: str
) -> ClientModel:
    """Train a fresh copy of ``template`` (re-initialised with ``seed``) on one client's data."""
    model = reinitialized_copy(template, seed)
    start = time.perf_counter()
    train(model, data, config, seed=seed, device=device, description=f"train {name}")
    return ClientModel(name, model.cpu(), len(data), time.perf_counter() - start)


def accuracies(
    model: nn.Module, tests: dict[str, LabeledImages], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Accuracy (%) of ``model`` on every named test set."""
    return {name: evaluate(model, data, device=device) for name, data in tests.items()}


@dataclass
class PairComparison:
    """Everything needed to compare methods on one pair of trained clients.

    ``train`` is how the clients were trained ("union" trains a fresh model so, on its data); ``recipe`` is the
    server's distillation recipe ("pooled-recipe" and "distilled-fresh")."""

    template: nn.Module
    client_a: ClientModel
    client_b: ClientModel
    surrogates: dict[str, LabeledImages | None]
    tests: dict[str, LabeledImages]
    merge: MergeConfig = field(default_factory=MergeConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, lr=0.01, batch_size=64))
    lam: float = 0.5
    device: torch.device | str = "cpu"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.05, batch_size=128))
    recipe: DistillConfig = field(default_factory=DistillConfig)

    def run(self, method: MethodRun) -> dict:
        """Run one method; return a row with its label, accuracies and wall time."""
        start = time.perf_counter()
        model = self._build(method)
        seconds = time.perf_counter() - start
        row = {
            "label": method.label,
            "method": method.method,
            "surrogate": method.surrogate or "",
            "seconds": round(seconds, 3),
        }
        row |= {f"acc_{name}": round(acc, 2) for name, acc in accuracies(model, self.tests, self.device).items()}
        return row

    def _surrogate(self, method: MethodRun) -> LabeledImages | None:
        if method.surrogate is None:
            return None
        if method.surrogate not in self.surrogates:
            raise KeyError(f"{method.label}: unknown surrogate {method.surrogate!r}; have {sorted(self.surrogates)}")
        return self.surrogates[method.surrogate]

    def _build(self, method: MethodRun) -> nn.Module:
        a, b = self.client_a.model, self.client_b.model
        data = self._surrogate(method)
        if method.method == "model-a":
            return a
        if method.method == "model-b":
            return b
        if method.method == "ensemble":
            return Ensemble([a, b], [1 - self.lam, self.lam])
        if method.method == "scratch":
            return train_from_scratch(
                self.template, _require(data, method), self.finetune, self.merge.seed, self.device
            )
        if method.method == "union":
            return train_from_scratch(self.template, _require(data, method), self.train, self.merge.seed, self.device)
        if method.method in ("pooled-recipe", "distilled-fresh"):
            teacher = Ensemble([a, b], [1 - self.lam, self.lam]) if method.method == "distilled-fresh" else None
            fresh = reinitialized_copy(self.template, self.merge.seed)
            return distill(fresh, _require(data, method), teacher, self.recipe, self.merge.seed, self.device).model
        finetuned = method.method == "ste+finetune"
        name = cast(MethodName, "ste" if finetuned else method.method)
        config = replace(self.merge, method=name, correction=method.correction)
        result = merge_pair(self.template, a.state_dict(), b.state_dict(), data, self.lam, config, self.device)
        merged = load_state(self.template, result.state)
        if finetuned:
            return fine_tune(merged, _require(data, method), self.finetune, self.merge.seed, self.device)
        return merged


def _require(data: LabeledImages | None, method: MethodRun) -> LabeledImages:
    if data is None or len(data) == 0:
        raise ValueError(f"{method.label} needs surrogate data ({method.surrogate!r} is empty)")
    return data
