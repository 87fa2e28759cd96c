"""Scoring models of a simulated federation: on the global test set and on each client's own part of the task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.federation import (
    FederationSpec,
    class_weighted_accuracy,
    client_test_data,
    global_test_data,
)
from fedmerge.train import accuracy_of_logits, predict_logits


@dataclass(frozen=True)
class ScoringData:
    """What models are scored on, loaded once for all of them: the global test set, and per client its label
    distribution and its own domain's test set (``None`` when that is the global one)."""

    global_test: LabeledImages
    label_distributions: dict[int, torch.Tensor]
    domain_tests: dict[int, LabeledImages | None]


def scoring_data(spec: FederationSpec, label_distributions: dict[int, torch.Tensor]) -> ScoringData:
    """The test data of the federation ``spec`` for the clients in ``label_distributions``."""
    domains = {k: client_test_data(spec, k) if spec.split == "domain" else None for k in label_distributions}
    return ScoringData(global_test_data(spec), dict(sorted(label_distributions.items())), domains)


def scores(model: nn.Module, tests: ScoringData, device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy (%) of ``model``: ``global`` on the whole test set, ``client<k>`` on client k's domain reweighted to
    its label distribution (see :func:`fedmerge.federation.client_accuracy`), and ``clients-mean``."""
    logits = predict_logits(model, tests.global_test, device=device)
    result = {"global": accuracy_of_logits(logits, tests.global_test.y)}
    for k, weights in tests.label_distributions.items():
        own = tests.domain_tests[k]
        if own is None:
            result[f"client{k}"] = class_weighted_accuracy(logits, tests.global_test.y, weights)
        else:
            result[f"client{k}"] = class_weighted_accuracy(predict_logits(model, own, device=device), own.y, weights)
    if tests.label_distributions:
        result["clients-mean"] = sum(result[f"client{k}"] for k in tests.label_distributions) / len(
            tests.label_distributions
        )
    return result
