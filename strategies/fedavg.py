"""FedAvg as the comparison baseline, reading replies the way the merging strategy does."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmerge.merge.interpolate import weighted_average
from strategies.messages import WANT_SURROGATE, ClientUpdate, mean_metrics
from strategies.validation import accept_replies

log = logging.getLogger(__name__)


class SortedFedAvg(FedAvg):
    """Federated averaging weighted by sample counts, deterministic and robust.

    Unlike Flower's ``FedAvg`` it sums the replies in partition-id order (so a seed gives the same weights on every
    run), leaves out failed, mis-shaped or non-finite replies with a logged reason instead of stopping, and accepts
    replies that also carry a surrogate. Clients are told not to send one.
    """

    def __init__(self, num_classes: int, fraction_train: float = 1.0, fraction_evaluate: float = 0.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2, min_available_nodes: int = 2) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes)
        self.num_classes = num_classes
        self.client_updates: list[ClientUpdate] = []
        self.left_out: list[tuple[str, str]] = []
        self._reference: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._reference = arrays.to_torch_state_dict()
        config[WANT_SURROGATE] = False
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Example-weighted average of the usable replies; ``(None, None)`` when none is usable."""
        updates, self.left_out = accept_replies(replies, self._reference, self.num_classes)
        self.client_updates = updates
        if not updates:
            log.error("round %d: no usable client update (%d left out): the global model stays as it was",
                      server_round, len(self.left_out))
            return None, None
        state = weighted_average([u.state for u in updates], [float(u.num_examples) for u in updates])
        log.info("round %d: averaged %d client(s) (%d left out)", server_round, len(updates), len(self.left_out))
        metrics = mean_metrics(updates)
        metrics["clients-merged"] = len(updates)
        metrics["clients-left-out"] = len(self.left_out)
        return ArrayRecord(state), metrics
