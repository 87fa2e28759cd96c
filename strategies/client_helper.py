"""One call for any Flower ClientApp to answer a merging server: :func:`merge_reply`.

A quickstart-style ClientApp trains its model as usual and returns ``merge_reply(msg, model, trainloader,
context=context)`` instead of building its reply by hand: the reply carries the trained weights, a small surrogate
of the client's training data (when the server asks for one) and the sample count, in the format
:class:`strategies.PermutationMerge` reads (:func:`strategies.messages.client_reply`). The same reply suits a
plain Flower ``FedAvg`` server, which asks for no surrogate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sized
from typing import Any

import torch
from flwr.app import Context, Message
from torch import nn

from fedmerge.data.images import LabeledImages
from fedmerge.device import derive_seed
from fedmerge.surrogate.build import SurrogateConfig, build_surrogate, last_linear
from strategies.messages import (
    ARRAYS_KEY,
    LABEL_COUNTS,
    NUM_EXAMPLES,
    PARTITION_ID,
    SERVER_ROUND,
    WANT_SURROGATE,
    MetricValue,
    client_reply,
    server_config,
)

log = logging.getLogger(__name__)

TrainData = LabeledImages | tuple[torch.Tensor, torch.Tensor] | Iterable[Any]
"""A client's training data: a LabeledImages, an ``(images, labels)`` pair of tensors, or a DataLoader (any
iterable) of ``(images, labels, ...)`` tuples or of dicts holding the images and the labels."""


def merge_reply(
    message: Message,
    model: nn.Module,
    train_data: TrainData,
    *,
    surrogate: str | SurrogateConfig = "random",
    per_class: int = 10,
    context: Context | None = None,
    partition_id: int | None = None,
    num_examples: int | None = None,
    image_key: str = "img",
    label_key: str = "label",
    num_classes: int | None = None,
    seed: int = 0,
    metrics: Mapping[str, MetricValue] | None = None,
    arrays_key: str | None = None,
    weighted_by_key: str = NUM_EXAMPLES,
    device: torch.device | str | None = None,
) -> Message:
    """The reply to a merging server's ``train`` message: the trained weights, a surrogate of the training data
    (when the server's config says ``want-surrogate``) and the sample count.

    Parameters
    ----------
    message : Message
        The server's ``train`` message. Its ConfigRecord's ``want-surrogate`` flag (absent: false, as from a
        plain Flower ``FedAvg`` server, which could not read a surrogate) decides whether a surrogate is sent.
    model : nn.Module
        The trained model; its ``state_dict()`` is sent.
    train_data : LabeledImages | tuple[torch.Tensor, torch.Tensor] | Iterable
        The client's training data: a :class:`fedmerge.data.LabeledImages`, an ``(images, labels)`` pair of
        tensors, or a DataLoader (any iterable) of batches, each a tuple / list ``(images, labels, ...)`` or a dict
        holding ``image_key`` and ``label_key``. Images are N x C x H x W, as the model takes them (sent as
        float32); labels are class indices. A DataLoader is read once, with its transforms, and only when a
        surrogate is built (or the sample count must be counted): every batch is held in memory meanwhile.
    surrogate : str | SurrogateConfig (default: "random")
        The kind of surrogate: "random" (random images per class), "herding", "kcenter" (coresets chosen in the
        model's penultimate feature space), "condensed" (gradient matching from real images; slow),
        "condensed-noise" (gradient matching from noise: no raw image is sent) or "none"; or a full
        :class:`fedmerge.surrogate.SurrogateConfig`.
    per_class : int (default: 10)
        Surrogate images per class (ignored when ``surrogate`` is a SurrogateConfig).
    context : Context | None (default: None)
        The ClientApp's context: the partition id is read from its ``node_config["partition-id"]``.
    partition_id : int | None (default: None)
        The client's partition id (it orders the server's merges). When None: ``context.node_config
        ["partition-id"]`` (set by Flower's simulation engine, or by ``flower-supernode --node-config
        "partition-id=0 num-partitions=2"``), else none is sent and the server uses the node id.
    num_examples : int | None (default: None)
        The client's sample count (its merge weight). When None: the number of images in ``train_data``
        (``len(loader.dataset)`` for a DataLoader).
    image_key, label_key : str (default: "img", "label")
        The keys of the images and labels in dict batches (the Flower quickstart's ``"img"`` / ``"label"``).
    num_classes : int | None (default: None)
        The number of classes; None: the output size of the model's last ``nn.Linear``, else the largest label + 1.
    seed : int (default: 0)
        The surrogate's seed; combined with the partition id (or node id) and the server round, so clients and
        rounds draw differently.
    metrics : Mapping[str, MetricValue] | None (default: None)
        More metrics to report (training loss, accuracy, ...). ``surrogate-seconds``, ``weights-bytes`` and
        ``surrogate-bytes`` are added, and ``label-counts`` (examples per class) when a surrogate is built.
    arrays_key : str | None (default: None)
        The key of the weights' ArrayRecord; None: the key the server sent its weights under (its
        ``arrayrecord_key``) when the message holds one ArrayRecord, else "arrays".
    weighted_by_key : str (default: "num-examples")
        The MetricRecord key of the sample count (the server's ``weighted_by_key``).
    device : torch.device | str | None (default: None)
        Where a condensed surrogate is optimised; None: the model's device.

    Returns
    -------
    Message
        The reply, read by :class:`strategies.PermutationMerge` (and by Flower's ``FedAvg`` when it holds no
        surrogate).
    """
    config = server_config(message)
    want = bool(config.get(WANT_SURROGATE, False))
    surrogate_config = surrogate if isinstance(surrogate, SurrogateConfig) else SurrogateConfig(surrogate, per_class)
    build = want and surrogate_config.kind != "none"
    pid = resolve_partition_id(partition_id, context)
    data: LabeledImages | None = None
    if build:
        data = labeled_images(train_data, model, image_key, label_key, num_classes)
    if num_examples is None:
        num_examples = count_examples(train_data, data, image_key, label_key)
    built: LabeledImages | None = None
    seconds = 0.0
    if data is not None:
        node_id = context.node_id if context is not None else message.metadata.dst_node_id
        server_round = config.get(SERVER_ROUND, 0)
        surrogate_seed = derive_seed(seed, "surrogate", pid if pid is not None else node_id, str(server_round))
        start = time.perf_counter()
        built = build_surrogate(data, surrogate_config, model, surrogate_seed, device or _model_device(model))
        seconds = time.perf_counter() - start
    state = model.state_dict()
    extra: dict[str, MetricValue] = dict(metrics or {})
    extra["surrogate-seconds"] = seconds
    if data is not None:  # read for the surrogate: its label counts let the server weigh the ensemble class-wise
        extra[LABEL_COUNTS] = [int(n) for n in data.class_counts().tolist()]
    extra["weights-bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    extra["surrogate-bytes"] = (
        built.x.numel() * 4 + built.y.numel() * 8 if built is not None else 0
    )  # as sent: float32 images, int64 labels
    log.info(
        "%s: replying with %d examples, surrogate %s",
        f"client {pid}" if pid is not None else f"node {message.metadata.dst_node_id}",
        num_examples,
        f"{len(built)} images ({surrogate_config.kind}, {seconds:.1f} s)"
        if built is not None
        else "none" + ("" if want else " (the server asked for none)"),
    )
    return client_reply(
        message,
        state,
        num_examples,
        pid,
        built,
        extra,
        arrays_key=arrays_key if arrays_key is not None else _sent_arrays_key(message),
        num_examples_key=weighted_by_key,
    )


def resolve_partition_id(partition_id: int | None, context: Context | None) -> int | None:
    """The partition id to send: ``partition_id``, else the context's ``node_config["partition-id"]``, else None
    (the server then uses the node id).

    Parameters
    ----------
    partition_id : int | None
        The id given by the caller.
    context : Context | None
        The ClientApp's context.

    Returns
    -------
    int | None
        A partition id >= 0, or None.
    """
    source = "partition_id"
    if partition_id is None and context is not None and PARTITION_ID in context.node_config:
        partition_id, source = context.node_config[PARTITION_ID], f"node_config[{PARTITION_ID!r}]"  # type: ignore[assignment]
    if partition_id is None:
        return None
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or partition_id < 0:
        raise ValueError(f"{source} must be a whole number >= 0, got {partition_id!r}")
    return partition_id


def labeled_images(
    train_data: TrainData,
    model: nn.Module | None = None,
    image_key: str = "img",
    label_key: str = "label",
    num_classes: int | None = None,
) -> LabeledImages:
    """``train_data`` (see :func:`merge_reply`) as one :class:`LabeledImages` on the CPU (float32 images, int64
    labels).

    Parameters
    ----------
    train_data : LabeledImages | tuple[torch.Tensor, torch.Tensor] | Iterable
        The data: LabeledImages, an ``(images, labels)`` pair of tensors, or an iterable of tuple or dict batches.
    model : nn.Module | None (default: None)
        The model, whose last ``nn.Linear`` tells the number of classes when ``num_classes`` is None.
    image_key, label_key : str (default: "img", "label")
        The keys of images and labels in dict batches.
    num_classes : int | None (default: None)
        The number of classes; None: from the model, else the largest label + 1.

    Returns
    -------
    LabeledImages
        The images and labels.
    """
    if isinstance(train_data, LabeledImages):
        return train_data
    if _is_tensor_pair(train_data):
        images, labels = train_data
    else:
        xs, ys = [], []
        for index, batch in enumerate(train_data):
            x, y = _split_batch(batch, image_key, label_key, index)
            xs.append(x)
            ys.append(y)
        if not xs:
            raise ValueError("the training data yielded no batch: cannot build a surrogate from it")
        images, labels = torch.cat(xs), torch.cat(ys)
    images = torch.as_tensor(images).detach().cpu().float()
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.ndim != 1 or (labels.is_floating_point() and not bool((labels == labels.round()).all())):
        raise ValueError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
    labels = labels.long()
    if num_classes is None:
        head = last_linear(model) if model is not None else None
        num_classes = head.out_features if head is not None else int(labels.max()) + 1 if len(labels) else 1
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return LabeledImages(images, labels, num_classes, "train")


def count_examples(
    train_data: TrainData, data: LabeledImages | None = None, image_key: str = "img", label_key: str = "label"
) -> int:
    """The number of training examples: ``len`` of the data (of a DataLoader's dataset), else counted by reading it.

    Parameters
    ----------
    train_data : LabeledImages | tuple[torch.Tensor, torch.Tensor] | Iterable
        The data as given to :func:`merge_reply`.
    data : LabeledImages | None (default: None)
        The same data already read (counted when ``train_data`` tells no size).
    image_key, label_key : str (default: "img", "label")
        The keys of images and labels in dict batches.

    Returns
    -------
    int
        The sample count.
    """
    if isinstance(train_data, LabeledImages):
        return len(train_data)
    if _is_tensor_pair(train_data):
        return len(train_data[0])  # type: ignore[index]
    dataset = getattr(train_data, "dataset", None)
    if isinstance(dataset, Sized):
        return len(dataset)
    if data is not None:
        return len(data)
    batches = enumerate(train_data)
    return sum(len(_split_batch(batch, image_key, label_key, index)[1]) for index, batch in batches)


def _is_tensor_pair(train_data: object) -> bool:
    return (
        isinstance(train_data, (tuple, list))
        and len(train_data) == 2
        and all(isinstance(t, torch.Tensor) for t in train_data)
    )


def _split_batch(batch: object, image_key: str, label_key: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's (images, labels)."""
    if isinstance(batch, Mapping):
        missing = [key for key in (image_key, label_key) if key not in batch]
        if missing:
            raise ValueError(
                f"batch {index} lacks {missing} (it has {sorted(map(str, batch))}): pass image_key= and label_key="
            )
        return torch.as_tensor(batch[image_key]), torch.as_tensor(batch[label_key])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
    raise ValueError(
        f"batch {index} is a {type(batch).__name__}: expected an (images, labels, ...) tuple or a dict with "
        "image_key and label_key"
    )


def _sent_arrays_key(message: Message) -> str:
    """The key the server sent its weights under, when its message holds exactly one ArrayRecord."""
    keys = list(message.content.array_records.keys()) if message.has_content() else []
    return keys[0] if len(keys) == 1 else ARRAYS_KEY


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
