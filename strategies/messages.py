"""What a client sends the merging server, and how the server reads it back.

A client's reply to a ``train`` message carries:

- ``"arrays"``: an ArrayRecord of the trained model's ``state_dict``;
- ``"surrogate"`` (optional): an ArrayRecord with ``"x"`` (images, N x C x H x W float) and ``"y"`` (int64 labels);
- ``"metrics"``: a MetricRecord with ``"num-examples"`` (the training set size), ``"partition-id"``, optionally
  ``"label-counts"`` (training examples per class, for a class-wise weighted ensemble) and anything else the client
  wants to report (training accuracy, wall times, ...).

Plain Flower clients that send only weights and ``num-examples`` are read too: they have no surrogate, and
their partition id falls back to the node id. The weights' record key and the sample count's metric key can be
changed (a strategy's ``arrayrecord_key`` and ``weighted_by_key``): pass them to :func:`read_reply` (or
:func:`strategies.validation.accept_replies`). A reply with a single weights ArrayRecord is read whatever its
key (as Flower's FedAvg does).

:func:`read_reply` checks what can be checked without the server's model, and raises :class:`InvalidReply` (naming
the client) for anything else than this: ``num-examples`` a whole number in 1..2**53 and ``partition-id`` a whole
number >= 0 (whole floats such as ``3.0`` are read as ints; NaN, infinities, fractions, lists and booleans are
refused); weights that are numeric arrays (floating point or integer; booleans, complex numbers and strings are
refused); surrogate images a floating-point N x C x H x W array (read as float32) and labels a 1-D integer array of
the same length. Extra metrics that are NaN or infinite are dropped with a warning (they would poison the round's
means). Checks against the server's model (names, shapes, dtypes, magnitudes, image shape) are in
:mod:`strategies.validation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmerge.data.images import LabeledImages

ARRAYS_KEY = "arrays"
SURROGATE_KEY = "surrogate"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
LABEL_COUNTS = "label-counts"  # optional metric: training label counts, one whole number per class
# Keys of the server's train ConfigRecord that clients read.
WANT_SURROGATE = "want-surrogate"  # bool: the server merges and would like a surrogate
INIT_FROM_GLOBAL = "init-from-global"  # bool: start local training from the received weights (FedAvg) or not
SERVER_ROUND = "server-round"

State = dict[str, torch.Tensor]
MetricValue = int | float | list[int] | list[float]

MAX_NUM_EXAMPLES = 2**53
"""Largest ``num-examples`` accepted: every count up to it is exact as a float (the weights of an average)."""

log = logging.getLogger(__name__)


class InvalidReply(ValueError):
    """A client reply the server cannot use (the message says why).

    ``who`` names the client ("client 3 (node 1021)") once its partition id is known; None before that.
    """

    def __init__(self, message: str, who: str | None = None) -> None:
        super().__init__(message)
        self.who = who


@dataclass
class ClientUpdate:
    """One client's contribution, read from its reply."""

    partition_id: int
    node_id: int
    state: State
    num_examples: int
    surrogate: LabeledImages | None = None
    metrics: dict[str, MetricValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """How logs name this client."""
        return f"client {self.partition_id} (node {self.node_id})"


def train_config(
    server_round: int,
    want_surrogate: bool,
    init_from_global: bool,
    extra: Mapping[str, int | float | str | bool] | None = None,
) -> ConfigRecord:
    """The ConfigRecord a merging server sends with its ``train`` messages."""
    config = ConfigRecord(dict(extra or {}))
    config[SERVER_ROUND] = server_round
    config[WANT_SURROGATE] = want_surrogate
    config[INIT_FROM_GLOBAL] = init_from_global
    return config


def reported_label_counts(update: ClientUpdate, num_classes: int) -> torch.Tensor | None:
    """The client's ``label-counts`` metric as a float64 tensor; None when it sent none, or not ``num_classes``
    non-negative whole numbers with a positive sum."""
    value = update.metrics.get(LABEL_COUNTS)
    if not isinstance(value, list) or len(value) != num_classes:
        return None
    counts = torch.tensor([float(v) for v in value], dtype=torch.float64)
    if not torch.isfinite(counts).all() or (counts < 0).any() or (counts != counts.round()).any() or counts.sum() <= 0:
        return None
    return counts


def surrogate_record(surrogate: LabeledImages) -> ArrayRecord:
    """Encode a surrogate set as an ArrayRecord (``x`` images, ``y`` labels)."""
    return ArrayRecord(
        {"x": surrogate.x.detach().cpu().float().contiguous(), "y": surrogate.y.detach().cpu().long().contiguous()}
    )


def read_surrogate(record: ArrayRecord, num_classes: int, name: str = "surrogate") -> LabeledImages:
    """Decode :func:`surrogate_record`'s ArrayRecord; raises InvalidReply when it is malformed.

    Images must be a floating-point N x C x H x W array (cast to float32), labels a 1-D integer array of length N.
    Values (finite pixels, labels in range, image shape) are checked by :func:`strategies.validation.accept_replies`.
    """
    missing = {"x", "y"} - set(record.keys())
    if missing:
        raise InvalidReply(f"surrogate record lacks {sorted(missing)}")
    x, y = _numpy(record, "x", "surrogate images"), _numpy(record, "y", "surrogate labels")
    if x.dtype.kind != "f" or x.ndim != 4:
        raise InvalidReply(f"surrogate images must be a float N x C x H x W array, got {x.dtype} {x.shape}")
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise InvalidReply(f"surrogate labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    try:
        return LabeledImages(
            torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), num_classes, name
        )
    except ValueError as err:
        raise InvalidReply(f"malformed surrogate: {err}") from err


def _numpy(record: ArrayRecord, key: str, what: str) -> np.ndarray:
    """The array ``record[key]`` as numpy; InvalidReply when it cannot be decoded."""
    try:
        array = record[key].numpy()
    except Exception as err:  # a malformed Array (bad bytes, shape, dtype) raises anything from numpy
        raise InvalidReply(f"{what} {key!r} cannot be decoded ({type(err).__name__}: {err})") from err
    return np.asarray(array)


def _weight_tensor(record: ArrayRecord, key: str) -> torch.Tensor:
    """One weight array as a tensor: floating point kept as sent (float16/32/64), any integer kind as int64."""
    array = _numpy(record, key, "weight")
    if array.dtype.kind == "f":
        return torch.from_numpy(array.copy())
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64))
    raise InvalidReply(f"weight {key!r} has dtype {array.dtype}, expected a floating-point or integer array")


def client_reply(
    message: Message,
    state: Mapping[str, torch.Tensor],
    num_examples: int,
    partition_id: int | None,
    surrogate: LabeledImages | None = None,
    metrics: Mapping[str, MetricValue] | None = None,
    *,
    arrays_key: str = ARRAYS_KEY,
    num_examples_key: str = NUM_EXAMPLES,
) -> Message:
    """The reply a client sends to a ``train`` message: weights, optional surrogate, counts and metrics.

    Parameters
    ----------
    message : Message
        The server's ``train`` message being answered.
    state : Mapping[str, torch.Tensor]
        The trained model's ``state_dict`` (copied to the CPU).
    num_examples : int
        The number of training examples (the client's weight in the merge).
    partition_id : int | None
        The client's partition id (the order of the merge); None leaves it out, and the server uses the node id.
    surrogate : LabeledImages | None (default: None)
        The client's surrogate data, sent as the ``"surrogate"`` ArrayRecord.
    metrics : Mapping[str, MetricValue] | None (default: None)
        Anything else to report (accuracy, wall times, ...).
    arrays_key : str (default: "arrays")
        The weights' ArrayRecord key (the strategy's ``arrayrecord_key``).
    num_examples_key : str (default: "num-examples")
        The MetricRecord key of ``num_examples`` (the strategy's ``weighted_by_key``).

    Returns
    -------
    Message
        The reply.
    """
    content = RecordDict({arrays_key: ArrayRecord({k: v.detach().cpu() for k, v in state.items()})})
    if surrogate is not None:
        content[SURROGATE_KEY] = surrogate_record(surrogate)
    metric_record = MetricRecord(dict(metrics or {}))
    metric_record[num_examples_key] = int(num_examples)
    if partition_id is not None:
        metric_record[PARTITION_ID] = int(partition_id)
    content[METRICS_KEY] = metric_record
    return Message(content=content, reply_to=message)


def _only_metric_record(content: RecordDict) -> MetricRecord:
    records = content.metric_records
    if METRICS_KEY in records:
        return records[METRICS_KEY]
    if len(records) == 1:
        return next(iter(records.values()))
    raise InvalidReply(f"expected a MetricRecord named {METRICS_KEY!r}, got {sorted(records.keys()) or 'none'}")


def _weights_record(content: RecordDict, arrays_key: str) -> ArrayRecord:
    records = {k: v for k, v in content.array_records.items() if k != SURROGATE_KEY}
    if arrays_key in records:
        return records[arrays_key]
    if len(records) == 1:
        return next(iter(records.values()))
    raise InvalidReply(f"expected one weights ArrayRecord named {arrays_key!r}, got {sorted(records) or 'none'}")


def server_config(message: Message, config_key: str = CONFIG_KEY) -> ConfigRecord:
    """The ConfigRecord of a server's message: the one under ``config_key``, else its only one, else an empty one."""
    if not message.has_content():
        return ConfigRecord()
    records = message.content.config_records
    if config_key in records:
        return records[config_key]
    if len(records) == 1:
        return next(iter(records.values()))
    return ConfigRecord()


def read_reply(
    message: Message,
    num_classes: int,
    *,
    arrays_key: str = ARRAYS_KEY,
    num_examples_key: str = NUM_EXAMPLES,
) -> ClientUpdate:
    """Read a client's ``train`` reply; raises InvalidReply (with the reason) for an error reply or bad content.

    See the module docstring for what is checked here.

    Parameters
    ----------
    message : Message
        The reply.
    num_classes : int
        The number of classes (surrogate labels must lie below it).
    arrays_key : str (default: "arrays")
        The weights' ArrayRecord key. A reply with a single weights ArrayRecord is read whatever its key.
    num_examples_key : str (default: "num-examples")
        The MetricRecord key of the sample count.

    Returns
    -------
    ClientUpdate
        The client's weights, sample count, partition id, surrogate and other (finite) metrics.
    """
    node_id = message.metadata.src_node_id
    if message.has_error():
        raise InvalidReply(f"node {node_id} failed: {message.error.reason}")
    if not message.has_content():
        raise InvalidReply(f"node {node_id} sent an empty reply")
    content = message.content
    metrics = _only_metric_record(content)
    if num_examples_key not in metrics:
        raise InvalidReply(f"node {node_id} did not report {num_examples_key!r}")
    num_examples = _whole_number(metrics[num_examples_key], num_examples_key, node_id)
    if not 0 < num_examples <= MAX_NUM_EXAMPLES:
        raise InvalidReply(f"node {node_id} reported {num_examples} training examples")
    partition_id = _whole_number(metrics.get(PARTITION_ID, node_id), PARTITION_ID, node_id)
    if partition_id < 0:
        raise InvalidReply(f"node {node_id} reported a negative {PARTITION_ID!r}: {partition_id}")
    who = f"client {partition_id} (node {node_id})"
    try:
        weights = _weights_record(content, arrays_key)
        state = {k: _weight_tensor(weights, k) for k in weights}
        surrogate = None
        if SURROGATE_KEY in content.array_records:
            surrogate = read_surrogate(
                content.array_records[SURROGATE_KEY], num_classes, f"surrogate of client {partition_id}"
            )
    except InvalidReply as err:
        raise InvalidReply(str(err), who) from err
    extra = {}
    for key, value in metrics.items():
        if key in (num_examples_key, PARTITION_ID):
            continue
        if _finite_metric(value):
            extra[key] = value
        else:
            log.warning("%s: dropping metric %r = %r (not finite)", who, key, value)
    return ClientUpdate(partition_id, node_id, state, num_examples, surrogate, extra)


def _finite_metric(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def mean_metrics(updates: list[ClientUpdate], num_examples_key: str = NUM_EXAMPLES) -> MetricRecord:
    """Example-weighted means of the clients' scalar metrics, plus their total sample count (``num_examples_key``).

    Each mean is over the clients that report the metric.
    """
    total = sum(u.num_examples for u in updates)
    record = MetricRecord({num_examples_key: total})
    names = sorted({k for u in updates for k, v in u.metrics.items() if isinstance(v, (int, float))})
    for name in names:
        values = [(u.num_examples, u.metrics.get(name)) for u in updates]
        weighted = [(n, float(v)) for n, v in values if isinstance(v, (int, float))]
        record[name] = sum(n * v for n, v in weighted) / sum(n for n, _ in weighted)
    return record


def _whole_number(value: object, key: str, node_id: int) -> int:
    """``value`` as an int when it is a whole, finite number; ``InvalidReply`` naming the node and key otherwise."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise InvalidReply(f"node {node_id} reported {key!r} = {value!r}, not a whole number")
    return int(value)
