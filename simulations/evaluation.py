"""Scoring models of a simulated federation: on the global test set and on each client's own part of the task."""

from __future__ import annotations

import torch
from torch import nn

from fedmerge.federation import (
    FederationSpec,
    class_weighted_accuracy,
    client_test_data,
    global_test_data,
)
from fedmerge.train import accuracy_of_logits, predict_logits


def scores(model: nn.Module, spec: FederationSpec, label_distributions: dict[int, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy (%) of ``model``: ``global`` on the whole test set, ``client<k>`` on client k's domain reweighted to
    its label distribution (see :func:`fedmerge.federation.client_accuracy`), and ``clients-mean``."""
    test = global_test_data(spec)
    logits = predict_logits(model, test, device=device)
    result = {"global": accuracy_of_logits(logits, test.y)}
    for k, weights in sorted(label_distributions.items()):
        if spec.split == "domain":
            own = client_test_data(spec, k)
            result[f"client{k}"] = class_weighted_accuracy(predict_logits(model, own, device=device), own.y, weights)
        else:
            result[f"client{k}"] = class_weighted_accuracy(logits, test.y, weights)
    if label_distributions:
        result["clients-mean"] = sum(result[f"client{k}"] for k in label_distributions) / len(label_distributions)
    return result
