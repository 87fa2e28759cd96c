"""A Flower strategy that merges client models by permutation alignment (WM, STE, NP Merge) instead of averaging."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedmerge.merge.pairwise import MergeConfig
from fedmerge.surrogate.build import last_linear
from strategies.messages import (
    INIT_FROM_GLOBAL,
    WANT_SURROGATE,
    ClientUpdate,
    mean_metrics,
)
from strategies.parallel import RayRunner, SequentialRunner
from strategies.schedule import (
    SCHEDULES,
    MergeNode,
    MergeRunner,
    MergeStep,
    run_schedule,
)
from strategies.validation import accept_replies

log = logging.getLogger(__name__)


class PermutationMerge(FedAvg):
    """Collect weights (and surrogate data) from the clients, then merge them into one model.

    Replies are read with :func:`strategies.messages.read_reply`, checked, and sorted by partition id; a failed
    client, mismatched shapes, NaN/Inf weights or an unusable surrogate leave that client out (logged with the
    reason), and a client without surrogate is merged by data-free weight matching. The surviving models are merged
    by ``merge`` (a :class:`fedmerge.merge.MergeConfig`, STE by default) along ``schedule`` ("tree" or "all-to-one"), the
    pairwise merges of a tree level running on ``runner`` (default: in this process).

    ``model`` is an architecture template (any model with ``permutation_spec()``). ``clients_start_from_global``
    tells clients whether to train from the sent weights (usual FL) or from their own initialisation (one-shot
    merging of independently trained models). Federated evaluation is off by default (``fraction_evaluate=0``):
    evaluate the merged model on the server with ``evaluate_fn``.

    After a round, ``client_updates``, ``left_out`` (client, reason), ``merge_steps`` and ``merge_seconds``
    describe what happened.
    """

    def __init__(
        self,
        model: nn.Module,
        merge: MergeConfig | None = None,
        schedule: str = "tree",
        runner: MergeRunner | None = None,
        want_surrogate: bool = True,
        clients_start_from_global: bool = False,
        num_classes: int | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
    ) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=min_evaluate_nodes, min_available_nodes=min_available_nodes)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown merge schedule {schedule!r}; choose from {SCHEDULES}")
        if not hasattr(model, "permutation_spec"):
            raise TypeError(f"{type(model).__name__} declares no permutation_spec(); see fedmerge.models")
        head = last_linear(model)
        if num_classes is None and head is None:
            raise ValueError("cannot tell the number of classes from the model: pass num_classes")
        self.model = model
        self.merge = merge if merge is not None else MergeConfig()
        self.schedule = schedule
        self.runner: MergeRunner = runner if runner is not None else SequentialRunner()
        self.want_surrogate = want_surrogate
        self.clients_start_from_global = clients_start_from_global
        self.num_classes = num_classes if num_classes is not None else head.out_features
        self.client_updates: list[ClientUpdate] = []
        self.left_out: list[tuple[str, str]] = []
        self.merge_steps: list[MergeStep] = []
        self.merge_seconds = 0.0
        self._reference: dict[str, torch.Tensor] = {}

    def summary(self) -> None:
        super().summary()
        runner = f"Ray ({self.runner.workers} workers)" if isinstance(self.runner, RayRunner) else "in-process"
        log.info("merge: method %s, correction %s, schedule %s, pairwise merges %s", self.merge.method,
                 self.merge.correction, self.schedule, runner)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Ask every sampled client for its weights (and a surrogate when ``want_surrogate``)."""
        self._reference = arrays.to_torch_state_dict()
        config[WANT_SURROGATE] = self.want_surrogate
        config[INIT_FROM_GLOBAL] = self.clients_start_from_global
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the usable replies into one model; ``(None, None)`` (the global model stays) when none is usable."""
        reference = self._reference or self.model.state_dict()
        updates, self.left_out = accept_replies(replies, reference, self.num_classes)
        self.client_updates = updates
        if not updates:
            log.error("round %d: no usable client update (%d left out): the global model stays as it was",
                      server_round, len(self.left_out))
            return None, None
        for update in updates:
            if update.surrogate is None and self.want_surrogate:
                log.warning("%s sent no surrogate: it is merged by data-free weight matching", update.name)
        start = time.perf_counter()
        merged, self.merge_steps = run_schedule(self.schedule, self.model, [MergeNode.from_update(u) for u in updates],
                                                self.merge, self.runner)
        self.merge_seconds = time.perf_counter() - start
        log.info("round %d: merged %d client(s) %s in %.1f s (%d left out)", server_round, len(updates),
                 list(merged.members), self.merge_seconds, len(self.left_out))
        metrics = mean_metrics(updates)
        metrics["merge-seconds"] = self.merge_seconds
        metrics["clients-merged"] = len(updates)
        metrics["clients-left-out"] = len(self.left_out)
        return ArrayRecord(merged.state), metrics
