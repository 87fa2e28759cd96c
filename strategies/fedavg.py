"""FedAvg as the comparison baseline, and the reply handling every strategy here shares."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmerge.merge.interpolate import weighted_average
from strategies.messages import (
    INIT_FROM_GLOBAL,
    WANT_SURROGATE,
    ClientUpdate,
    mean_metrics,
)
from strategies.validation import accept_replies

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class SortedFedAvg(FedAvg):
    """Federated averaging weighted by sample counts, deterministic and robust.

    ``image_shape`` (the model's input) and ``num_partitions`` (the federation's size), when given, let the reply
    checks refuse surrogates of another shape and partition ids out of range.

    Unlike Flower's ``FedAvg`` it sums the replies in partition-id order (so a seed gives the same weights on every
    run), leaves out failed, mis-shaped or non-finite replies with a logged reason instead of stopping, and accepts
    replies that also carry a surrogate. Clients are told to train from the global weights and not to send a
    surrogate. Subclasses change how the usable updates are combined (:meth:`combine`).

    After a round, ``client_updates``, ``left_out`` (client, reason) and ``merge_seconds`` (time spent combining)
    describe what happened.
    """

    want_surrogate = False
    clients_start_from_global = True

    def __init__(
        self,
        num_classes: int,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        image_shape: tuple[int, int, int] | None = None,
        num_partitions: int | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.num_partitions = num_partitions
        self.client_updates: list[ClientUpdate] = []
        self.left_out: list[tuple[str, str]] = []
        self.merge_seconds = 0.0
        self.round_upload_bytes: dict[int, int] = {}
        self._reference: State = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global weights, saying whether to train from them and whether to send a surrogate."""
        self._reference = arrays.to_torch_state_dict()
        config[WANT_SURROGATE] = self.want_surrogate
        config[INIT_FROM_GLOBAL] = self.starts_from_global(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def starts_from_global(self, server_round: int) -> bool:
        """Whether clients train round ``server_round`` from the global weights: always when
        ``clients_start_from_global``, else from round 2 on (round 1 starts from each client's own initialisation)."""
        return self.clients_start_from_global or server_round > 1

    def combine(self, updates: list[ClientUpdate]) -> State:
        """The new global weights from the usable updates (sorted by partition id): their example-weighted mean."""
        return weighted_average([u.state for u in updates], [float(u.num_examples) for u in updates])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the usable replies; ``(None, None)`` (the global model stays) when none is usable."""
        updates, self.left_out = accept_replies(
            replies, self._reference, self.num_classes, self.image_shape, num_partitions=self.num_partitions
        )
        self.client_updates = updates
        self.round_upload_bytes[server_round] = upload_bytes(updates)
        if not updates:
            log.error(
                "round %d: no usable client update (%d left out): the global model stays as it was",
                server_round,
                len(self.left_out),
            )
            return None, None
        start = time.perf_counter()
        try:
            state = self.combine(updates)
        except Exception:  # a merge that breaks keeps the global model; the run goes on
            log.exception(
                "round %d: combining %d client(s) failed: the global model stays as it was", server_round, len(updates)
            )
            return None, None
        self.merge_seconds = time.perf_counter() - start
        log.info(
            "round %d: combined %d client(s) %s in %.1f s (%d left out)",
            server_round,
            len(updates),
            [u.partition_id for u in updates],
            self.merge_seconds,
            len(self.left_out),
        )
        metrics = mean_metrics(updates)
        metrics["merge-seconds"] = self.merge_seconds
        metrics["clients-merged"] = len(updates)
        metrics["clients-left-out"] = len(self.left_out)
        return ArrayRecord(state), metrics


def upload_bytes(updates: list[ClientUpdate]) -> int:
    """Bytes the usable clients uploaded in one round: their weights and surrogates (as they report them)."""
    total = 0.0
    for update in updates:
        for key in ("weights-bytes", "surrogate-bytes"):
            value = update.metrics.get(key)
            total += value if isinstance(value, (int, float)) else 0.0
    return int(total)
