"""The Flower ClientApp: train on this node's partition, reply with the weights and (when asked) a data surrogate.

Each ``train`` message is handled by :func:`train`: the node's partition comes from ``node_config``
(``partition-id``, ``num-partitions``) and the settings from the run config (:mod:`simulations.config`). The
server's ConfigRecord says whether to start from the received weights (``init-from-global``, default true as plain
Flower FedAvg sends no such key) or from the client's own seeded initialisation, and whether to send a surrogate
(``want-surrogate``, default false). The per-message steps are plain functions, usable without Flower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedmerge.data import LabeledImages
from fedmerge.device import default_device, derive_seed
from fedmerge.federation import client_train_data
from fedmerge.models import build_model, reinitialized_copy
from fedmerge.surrogate import build_surrogate
from fedmerge.train import evaluate
from fedmerge.train import train as train_model
from simulations.client_cache import (
    BuiltSurrogate,
    ClientCache,
    TrainedClient,
    model_key,
    surrogate_key,
)
from simulations.config import RunSettings, settings_from_run_config
from simulations.memory import peak_rss_mb
from strategies.messages import (
    ARRAYS_KEY,
    CONFIG_KEY,
    INIT_FROM_GLOBAL,
    LABEL_COUNTS,
    SERVER_ROUND,
    WANT_SURROGATE,
    MetricValue,
    client_reply,
)

log = logging.getLogger(__name__)

app = ClientApp()


def node_partition(node_config: Mapping[str, object]) -> tuple[int, int]:
    """``(partition id, number of partitions)`` from a node's config; ValueError when missing or inconsistent."""
    missing = [key for key in ("partition-id", "num-partitions") if key not in node_config]
    if missing:
        raise ValueError(
            f"node config lacks {missing}, got {dict(node_config)}. Every node needs both partition-id and "
            "num-partitions. In a simulation, Flower sets them from the number of supernodes: `flwr run . "
            "--federation-config 'num-supernodes=2'` (or `flwr federation simulation-config`). In a deployment, "
            "start each SuperNode with them, e.g. "
            '`flower-supernode --node-config "partition-id=0 num-partitions=2"` (partition-id 0, 1, ... '
            "on each node)"
        )
    partition_id, num_partitions = node_config["partition-id"], node_config["num-partitions"]
    if (
        not isinstance(partition_id, int)
        or not isinstance(num_partitions, int)
        or not 0 <= partition_id < num_partitions
    ):
        raise ValueError(
            f"node config: need 0 <= partition-id < num-partitions, got {partition_id!r} and {num_partitions!r}"
        )
    return partition_id, num_partitions


def initial_model(
    settings: RunSettings, data: LabeledImages, partition_id: int, received: Mapping[str, torch.Tensor] | None
) -> nn.Module:
    """The model local training starts from: the ``received`` weights, or when None the client's own
    initialisation (seeded by the run seed and partition id, so the same in every round)."""
    model = build_model(settings.model, data.image_shape, data.num_classes, settings.width)
    if received is None:
        return reinitialized_copy(model, derive_seed(settings.seed, "client-init", partition_id))
    try:
        model.load_state_dict(dict(received))
    except RuntimeError as err:
        raise ValueError(
            f"the received weights do not fit model {settings.model!r} (width {settings.width}): {err}"
        ) from err
    return model


def local_training(
    model: nn.Module,
    data: LabeledImages,
    settings: RunSettings,
    partition_id: int,
    server_round: int,
    device: torch.device | str = "cpu",
) -> float:
    """Train ``model`` in place on the client's ``data``; return the wall time in seconds."""
    start = time.perf_counter()
    train_model(
        model,
        data,
        settings.train,
        seed=derive_seed(settings.seed, "client-train", partition_id, server_round),
        device=device,
        description=f"client {partition_id}, round {server_round}",
    )
    return time.perf_counter() - start


def make_surrogate(
    model: nn.Module,
    data: LabeledImages,
    settings: RunSettings,
    partition_id: int,
    server_round: int,
    device: torch.device | str = "cpu",
) -> tuple[LabeledImages | None, float]:
    """The client's surrogate of ``data`` (None for kind "none") built with its trained ``model``.

    Returns the surrogate and the seconds taken.
    """
    start = time.perf_counter()
    surrogate = build_surrogate(
        data, settings.surrogate, model, derive_seed(settings.seed, "surrogate", partition_id, server_round), device
    )
    return surrogate, time.perf_counter() - start


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' elements (what their arrays take on the wire, without framing)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _server_config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def _received_state(msg: Message) -> dict[str, torch.Tensor]:
    if ARRAYS_KEY not in msg.content.array_records:
        raise ValueError(f"asked to start from the global model, but the message has no {ARRAYS_KEY!r} ArrayRecord")
    return msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()


@dataclass
class ClientWork:
    """What a client sends back: its trained weights, example count, surrogate (or None) and metrics."""

    state: dict[str, torch.Tensor]
    num_examples: int
    surrogate: LabeledImages | None
    metrics: dict[str, MetricValue]


def _trained_client(
    settings: RunSettings,
    data: LabeledImages,
    partition_id: int,
    server_round: int,
    received: Mapping[str, torch.Tensor] | None,
    device: torch.device | str,
) -> tuple[nn.Module, TrainedClient]:
    model = initial_model(settings, data, partition_id, received)
    seconds = local_training(model, data, settings, partition_id, server_round, device)
    return model, TrainedClient(model.state_dict(), seconds, evaluate(model, data, device=device))


def client_work(
    settings: RunSettings,
    partition_id: int,
    server_round: int,
    received: Mapping[str, torch.Tensor] | None,
    want_surrogate: bool,
    device: torch.device | str = "cpu",
) -> ClientWork:
    """One client's round without Flower: train from ``received`` (None: own initialisation), build the surrogate
    when wanted, and measure. With ``settings.client_cache`` set, a model or surrogate trained before with the same
    settings is loaded instead, and its metrics report the seconds it took when it was made (``cached`` = 1)."""
    data = client_train_data(settings.federation, partition_id)
    if settings.train.epochs <= 0:
        log.warning(
            "client %d, round %d: epochs = %d, so this client does NOT train: it sends %s unchanged",
            partition_id,
            server_round,
            settings.train.epochs,
            "the received global weights" if received is not None else "its random initialisation",
        )
    cache = ClientCache(settings.client_cache) if settings.client_cache else None
    key = model_key(settings, partition_id, server_round, received) if cache else ""
    trained = cache.load_model(key) if cache else None
    model, cached = None, trained is not None
    if trained is None:
        model, trained = _trained_client(settings, data, partition_id, server_round, received, device)
        if cache:
            cache.save_model(key, trained)
    surrogate: LabeledImages | None = None
    surrogate_seconds = 0.0
    if want_surrogate and settings.surrogate.kind != "none":
        surrogate_cache_key = surrogate_key(key, settings.surrogate) if cache else ""
        built = cache.load_surrogate(surrogate_cache_key) if cache else None
        cached = cached and built is not None
        if built is None:
            model = model or initial_model(settings, data, partition_id, trained.state)
            made, seconds = make_surrogate(model, data, settings, partition_id, server_round, device)
            built = BuiltSurrogate(made, seconds) if made is not None else None
            if cache and built is not None:
                cache.save_surrogate(surrogate_cache_key, built)
        if built is not None:
            surrogate, surrogate_seconds = built.data, built.seconds
    metrics: dict[str, MetricValue] = {
        "train-accuracy": trained.train_accuracy,
        "train-seconds": trained.train_seconds,
        "surrogate-seconds": surrogate_seconds,
        "weights-bytes": tensor_bytes(trained.state.values()),
        "surrogate-bytes": tensor_bytes([surrogate.x, surrogate.y]) if surrogate is not None else 0,
        "cached": int(cached),
        "peak-rss-mb": peak_rss_mb(),
        LABEL_COUNTS: [int(n) for n in data.class_counts().tolist()],
    }
    log.info(
        "client %d, round %d: %d examples, train accuracy %.1f%% in %.1f s%s, surrogate %s",
        partition_id,
        server_round,
        len(data),
        trained.train_accuracy,
        trained.train_seconds,
        " (cached)" if cached else "",
        f"{len(surrogate)} images" if surrogate is not None else "none",
    )
    if not all(bool(torch.isfinite(t).all()) for t in trained.state.values() if t.is_floating_point()):
        log.warning(
            "client %d, round %d: training diverged (its weights hold NaN or Inf; lr = %g): the server will leave "
            "it out; a lower lr avoids it",
            partition_id,
            server_round,
            settings.train.lr,
        )
    return ClientWork(trained.state, len(data), surrogate, metrics)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Handle a ``train`` message: local training, optional surrogate, reply with weights, counts and timings."""
    partition_id, num_partitions = node_partition(context.node_config)
    settings = settings_from_run_config(context.run_config, num_partitions)
    config = _server_config(msg)
    received = _received_state(msg) if bool(config.get(INIT_FROM_GLOBAL, True)) else None
    work = client_work(
        settings,
        partition_id,
        int(str(config.get(SERVER_ROUND, 1))),
        received,
        bool(config.get(WANT_SURROGATE, False)),
        default_device(),
    )
    return client_reply(msg, work.state, work.num_examples, partition_id, work.surrogate, work.metrics)
