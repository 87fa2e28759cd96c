"""FedAvg as the comparison baseline, the reply handling every strategy here shares, and the routing of the
library's logs into Flower's log output."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedmerge.device import default_device
from fedmerge.merge.interpolate import weighted_average
from strategies.defences import DefenceReport, Defences, apply_defences, describe_defences
from strategies.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    INIT_FROM_GLOBAL,
    METRICS_KEY,
    NUM_EXAMPLES,
    WANT_SURROGATE,
    ClientUpdate,
    mean_metrics,
)
from strategies.validation import accept_replies

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]
"""Flower's signature of a metrics aggregation: (one RecordDict per reply, the weight's metric key) -> MetricRecord."""

LIBRARY_LOGGERS = ("fedmerge", "strategies", "simulations")
"""The loggers :func:`send_logs_to_flower` routes into Flower's log output."""


class _ToFlower(logging.Handler):
    """Hands every record to the handlers of the ``flwr`` logger (those the root logger lacks: the root logger gets
    the record anyway, by propagation)."""

    def emit(self, record: logging.LogRecord) -> None:
        flower = logging.getLogger("flwr")
        if flower.disabled:
            return
        root_handlers = logging.getLogger().handlers
        for handler in flower.handlers:
            if handler not in root_handlers and record.levelno >= handler.level:
                handler.handle(record)


def send_logs_to_flower(level: int = logging.INFO) -> None:
    """Show the library's logs (``fedmerge``, ``strategies``, ``simulations``) wherever Flower shows its own.

    Runs when :mod:`strategies` is imported, so a ServerApp or ClientApp using it needs no call; calling it
    again does nothing more. Each library logger gets a handler that passes its records to the handlers the
    ``flwr`` logger has at that moment (the console, what ``flwr run --stream`` shows, log files), which format
    them as Flower's own (``INFO : ...``, ``WARNING : ...``), so no warning prints as a bare line. The records
    still propagate to the root logger as before (a handler both loggers share gets each record once).

    Parameters
    ----------
    level : int (default: logging.INFO)
        The level set on a library logger that has none yet (a level set before is kept).
    """
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        if not any(isinstance(handler, _ToFlower) for handler in logger.handlers):
            logger.addHandler(_ToFlower())


class SortedFedAvg(FedAvg):
    """Federated averaging weighted by sample counts, deterministic and robust.

    Unlike Flower's ``FedAvg`` it sums the replies in partition-id order (so a seed gives the same weights on every
    run), leaves out failed, mis-shaped or non-finite replies with a logged reason instead of stopping, and accepts
    replies that also carry a surrogate. Clients are told to train from the global weights and not to send a
    surrogate. Subclasses change how the usable updates are combined (:meth:`combine`). A round in which no
    reply is usable (or combining fails) keeps the global weights: :meth:`aggregate_train` returns them, so
    Flower's ``Result.arrays`` holds the last global model.

    Before combining, ``defences`` (:mod:`strategies.defences`: outlying weight norms, models and surrogates the
    other clients disagree with, a cap on one client's merge weight) leave out or adjust hostile or broken clients.

    After a round, ``client_updates``, ``left_out`` (client, reason), ``defence_report`` (what the defences decided)
    and ``merge_seconds`` (time spent combining) describe what happened.

    Parameters
    ----------
    num_classes : int
        The number of classes (a surrogate's labels must lie below it).
    fraction_train : float (default: 1.0)
        Fraction of nodes used during training. In case `min_train_nodes` is larger than
        `fraction_train * total_connected_nodes`, `min_train_nodes` will still be sampled.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes used during validation (federated evaluation, Flower's default). Set it to 0.0 when the
        ClientApp has no ``evaluate`` function (evaluate the global model on the server with ``evaluate_fn``).
    min_train_nodes : int (default: 2)
        Minimum number of nodes used during training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes used during validation.
    min_available_nodes : int (default: 2)
        Minimum number of total nodes in the system.
    image_shape : tuple[int, int, int] | None (default: None)
        The model's input (C, H, W): surrogates of another shape are refused.
    num_partitions : int | None (default: None)
        The federation's size: partition ids outside ``0..num_partitions-1`` are refused.
    weighted_by_key : str (default: "num-examples")
        The key within each reply's MetricRecord whose value is the client's sample count (its weight).
    arrayrecord_key : str (default: "arrays")
        The key of the weights' ArrayRecord in sent messages and in replies (a reply with a single weights
        ArrayRecord is read whatever its key).
    configrecord_key : str (default: "config")
        Key used to store the ConfigRecord when constructing Messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord, used to aggregate the metrics of the
        training replies. It gets one RecordDict per merged client (in partition-id order) holding one
        MetricRecord: the client's finite metrics (without ``partition-id``) and its sample count under
        ``weighted_by_key``. If `None`, defaults to Flower's `aggregate_metricrecords`, a weighted average.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord, used to aggregate the MetricRecords of
        evaluation replies. If `None`, defaults to Flower's `aggregate_metricrecords`.
    defences : Defences | None (default: None)
        The defences against hostile clients (:class:`strategies.defences.Defences`); None: the defaults (on),
        ``Defences.off()``: none. Without a model (FedAvg) the checks against surrogates do not run.
    """

    want_surrogate = False
    clients_start_from_global = True

    def __init__(
        self,
        num_classes: int,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        image_shape: tuple[int, int, int] | None = None,
        num_partitions: int | None = None,
        weighted_by_key: str = NUM_EXAMPLES,
        arrayrecord_key: str = ARRAYS_KEY,
        configrecord_key: str = CONFIG_KEY,
        train_metrics_aggr_fn: MetricsAggregation | None = None,
        evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
        defences: Defences | None = None,
    ) -> None:
        send_logs_to_flower()
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.num_partitions = num_partitions
        self.defences = defences if defences is not None else Defences()
        self.defence_report = DefenceReport([])
        self.client_updates: list[ClientUpdate] = []
        self.left_out: list[tuple[str, str]] = []
        self.merge_seconds = 0.0
        self.round_upload_bytes: dict[int, int] = {}
        self._reference: State = {}
        self._global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        super().summary()
        log.info("defences: %s", describe_defences(self.defences))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global weights, saying whether to train from them and whether to send a surrogate.

        Parameters
        ----------
        server_round : int
            The round being configured.
        arrays : ArrayRecord
            The global weights (also what a round without usable replies keeps).
        config : ConfigRecord
            The train config; ``want-surrogate`` and ``init-from-global`` are added to it.
        grid : Grid
            The Grid the nodes are sampled from.

        Returns
        -------
        Iterable[Message]
            One ``train`` message per sampled node.
        """
        self._reference = arrays.to_torch_state_dict()
        self._global_arrays = arrays
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
        """Combine the usable replies into the new global weights.

        When no reply is usable, or combining fails, the global weights stay as they were: the ones sent by the
        last :meth:`configure_train` are returned (with ``clients-merged`` = 0), so that Flower's
        ``Result.arrays`` holds the last global model. Only before any ``configure_train`` (and, for
        :class:`SortedFedAvg`, without a model to fall back on) is ``(None, metrics)`` returned.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            The clients' replies (failed ones included).

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global weights, and the round's metrics: those of ``train_metrics_aggr_fn`` plus the total
            sample count (``weighted_by_key``), ``merge-seconds``, ``clients-merged`` and ``clients-left-out``.
        """
        updates, self.left_out = accept_replies(
            replies,
            self._reference,
            self.num_classes,
            self.image_shape,
            num_partitions=self.num_partitions,
            arrays_key=self.arrayrecord_key,
            num_examples_key=self.weighted_by_key,
        )
        self.round_upload_bytes[server_round] = upload_bytes(updates)
        updates = self.defend(updates)
        self.client_updates = updates
        if not updates:
            log.error(
                "round %d: no usable client update (%d left out): the global model stays as it was",
                server_round,
                len(self.left_out),
            )
            return self._unchanged()
        start = time.perf_counter()
        try:
            state = self.combine(updates)
        except Exception:  # a merge that breaks keeps the global model; the run goes on
            log.exception(
                "round %d: combining %d client(s) failed: the global model stays as it was", server_round, len(updates)
            )
            return self._unchanged()
        self.merge_seconds = time.perf_counter() - start
        log.info(
            "round %d: combined %d client(s) %s in %.1f s (%d left out)",
            server_round,
            len(updates),
            [u.partition_id for u in updates],
            self.merge_seconds,
            len(self.left_out),
        )
        metrics = self.aggregate_train_metrics(updates)
        metrics["merge-seconds"] = self.merge_seconds
        metrics["clients-merged"] = len(updates)
        metrics["clients-left-out"] = len(self.left_out)
        metrics["clients-clipped"] = len(self.defence_report.clipped)
        metrics["surrogates-dropped"] = len(self.defence_report.surrogates_dropped)
        return ArrayRecord(state), metrics

    def defend(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """Apply ``defences`` to the accepted updates: return those to combine (counts clipped, surrogates dropped
        where the defences say so), add the clients they leave out to ``left_out`` and record ``defence_report``.

        Parameters
        ----------
        updates : list[ClientUpdate]
            The accepted updates, sorted by partition id.

        Returns
        -------
        list[ClientUpdate]
            The updates to combine, in the same order.
        """
        self.defence_report = apply_defences(updates, self.defences, self.defence_template(), default_device())
        self.left_out = self.left_out + self.defence_report.left_out
        return self.defence_report.updates

    def defence_template(self) -> nn.Module | None:
        """The architecture the defences load client weights into to check them against the surrogates (None:
        those checks do not run)."""
        return None

    def aggregate_train_metrics(self, updates: list[ClientUpdate]) -> MetricRecord:
        """The merged clients' metrics aggregated by ``train_metrics_aggr_fn``, with their total sample count.

        Should the function raise, the error is logged and the clients' example-weighted means are reported.

        Parameters
        ----------
        updates : list[ClientUpdate]
            The merged clients, in partition-id order.

        Returns
        -------
        MetricRecord
            The aggregated metrics; ``weighted_by_key`` holds the total sample count unless the function set it.
        """
        contents = [
            RecordDict({METRICS_KEY: MetricRecord({**u.metrics, self.weighted_by_key: u.num_examples})})
            for u in updates
        ]
        try:
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception:  # a metrics function that breaks must not cost the round its model
            log.exception("train_metrics_aggr_fn failed: reporting the clients' example-weighted means instead")
            metrics = mean_metrics(updates, self.weighted_by_key)
        if self.weighted_by_key not in metrics:
            metrics[self.weighted_by_key] = sum(u.num_examples for u in updates)
        return metrics

    def _unchanged(self) -> tuple[ArrayRecord | None, MetricRecord]:
        """What a round without a new model returns: the global weights last sent (or, before any were sent, the
        reference model's, when there is one) and the counts."""
        metrics = MetricRecord({"clients-merged": 0, "clients-left-out": len(self.left_out)})
        if self._global_arrays is not None:
            return self._global_arrays, metrics
        return (ArrayRecord(self._reference) if self._reference else None), metrics


def upload_bytes(updates: list[ClientUpdate]) -> int:
    """Bytes the usable clients uploaded in one round: their weights and surrogates (as they report them)."""
    total = 0.0
    for update in updates:
        for key in ("weights-bytes", "surrogate-bytes"):
            value = update.metrics.get(key)
            total += value if isinstance(value, (int, float)) else 0.0
    return int(total)
