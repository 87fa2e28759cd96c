"""The ClientApp's train handler, called in-process with hand-built Flower messages and contexts."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedmerge.federation import FederationSpec, client_train_data
from fedmerge.models import build_model
from simulations.client_app import app, node_partition, tensor_bytes
from strategies.messages import ClientUpdate, read_reply, train_config
from tests.helpers import flower_message

RUN_CONFIG = {"dataset": "digits", "split": "disjoint", "width": 32, "epochs": 1, "per-class": 3, "seed": 5}
SPEC = FederationSpec("digits", "disjoint", num_clients=2, seed=5)


def sent_state(seed: int = 123) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 28, 28), 10, width=32).state_dict()


def message(config: ConfigRecord, state: dict[str, torch.Tensor] | None = None, node_id: int = 7) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state if state is not None else sent_state()), "config": config})
    return flower_message("train", dst_node_id=node_id, content=content)


def run_client(config: ConfigRecord, partition_id: int = 1, state=None, **run_config) -> ClientUpdate:
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )
    reply = app(message(config, state), context)
    return read_reply(reply, num_classes=10)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trains_its_partition_and_sends_a_surrogate():
    update = run_client(train_config(1, want_surrogate=True, init_from_global=False), partition_id=1)
    data = client_train_data(SPEC, 1)
    held = sorted(set(data.y.tolist()))
    assert update.partition_id == 1 and update.num_examples == len(data)
    assert update.surrogate is not None
    assert len(update.surrogate) == 3 * len(held)
    assert sorted(set(update.surrogate.y.tolist())) == held
    assert update.surrogate.image_shape == data.image_shape
    sent = sent_state()
    assert update.state.keys() == sent.keys() and not same_weights(update.state, sent)
    metrics = update.metrics
    assert 0 <= metrics["train-accuracy"] <= 100 and metrics["train-seconds"] > 0 and metrics["surrogate-seconds"] >= 0
    assert metrics["weights-bytes"] == tensor_bytes(sent.values())
    assert metrics["surrogate-bytes"] == tensor_bytes([update.surrogate.x, update.surrogate.y])
    assert metrics["label-counts"] == data.class_counts().tolist()  # for a class-wise weighted ensemble


def test_no_surrogate_unless_asked():
    update = run_client(train_config(1, want_surrogate=False, init_from_global=False))
    assert update.surrogate is None and update.metrics["surrogate-bytes"] == 0
    update = run_client(train_config(1, want_surrogate=True, init_from_global=False), surrogate="none")
    assert update.surrogate is None


def test_starts_from_the_received_weights_when_told():
    sent = sent_state(seed=9)
    update = run_client(train_config(1, want_surrogate=False, init_from_global=True), state=sent, epochs=0)
    assert same_weights(update.state, sent)


def test_plain_fedavg_config_means_start_from_the_received_weights():
    sent = sent_state(seed=9)
    update = run_client(ConfigRecord({"server-round": 1}), state=sent, epochs=0)
    assert same_weights(update.state, sent) and update.surrogate is None


def test_own_initialisation_is_seeded_per_client():
    config = train_config(1, want_surrogate=False, init_from_global=False)
    first, again = run_client(config, partition_id=0, epochs=0), run_client(config, partition_id=0, epochs=0)
    other = run_client(config, partition_id=1, epochs=0)
    assert same_weights(first.state, again.state)
    assert not same_weights(first.state, other.state) and not same_weights(first.state, sent_state())


def test_bad_node_config_and_weights():
    with pytest.raises(ValueError, match="partition-id"):
        node_partition({"num-partitions": 2})
    with pytest.raises(ValueError, match="partition-id < num-partitions"):
        node_partition({"partition-id": 2, "num-partitions": 2})
    wrong = build_model("mlp", (1, 28, 28), 10, width=16).state_dict()
    with pytest.raises(ValueError, match="do not fit model 'mlp'"):
        run_client(train_config(1, want_surrogate=False, init_from_global=True), state=wrong)


def test_a_client_whose_training_diverges_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        update = run_client(train_config(1, want_surrogate=False, init_from_global=False), lr=1e12)
    assert not all(torch.isfinite(t).all() for t in update.state.values())
    assert "training diverged" in caplog.text and "lr = 1e+12" in caplog.text
