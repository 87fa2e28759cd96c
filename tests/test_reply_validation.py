"""Malformed client replies: every one is left out with a reason naming its sender, and the round goes on."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedmerge.data.images import LabeledImages
from fedmerge.merge import MergeConfig
from fedmerge.merge.interpolate import weighted_average
from fedmerge.models import build_model
from strategies import PermutationMerge, SortedFedAvg, client_reply
from strategies.parallel import SequentialRunner
from strategies.validation import MAX_ABS_WEIGHT, accept_replies
from tests.helpers import flower_message

IN_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


def small_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", IN_SHAPE, NUM_CLASSES, width=16)


def images(seed: int, n: int = 20, shape: tuple[int, ...] = IN_SHAPE) -> LabeledImages:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    return LabeledImages(torch.randn(n, *shape, generator=g), labels, NUM_CLASSES)


def node_of(partition_id: int) -> int:
    return 1000 + 7 * partition_id


def reply(partition_id: int, state=None, data: LabeledImages | None | str = "auto", **metrics) -> Message:
    """A well-formed reply (through the clients' own encoder), with ``metrics`` added."""
    state = state if state is not None else small_mlp(partition_id).state_dict()
    data = images(partition_id) if data == "auto" else data
    return client_reply(
        flower_message("train", dst_node_id=node_of(partition_id)), state, 100, partition_id, data, metrics
    )


def raw_reply(node_id: int, metrics: dict, weights: dict | None = None, surrogate: dict | None = None) -> Message:
    """A reply built by hand: any metric values and any numpy arrays, as a broken or hostile client may send."""
    if weights is None:
        weights = {k: v.numpy() for k, v in small_mlp(0).state_dict().items()}
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}), "metrics": MetricRecord(metrics)}
    )
    if surrogate is not None:
        content["surrogate"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in surrogate.items()})
    return Message(content, reply_to=flower_message("train", dst_node_id=node_id))


def check(replies, image_shape=IN_SHAPE, **kwargs):
    """accept_replies against the server's model; (accepted partition ids, reasons by client, updates)."""
    updates, rejected = accept_replies(replies, small_mlp(0).state_dict(), NUM_CLASSES, image_shape, **kwargs)
    return [u.partition_id for u in updates], dict(rejected), updates


def surrogate_arrays(x, y) -> dict:
    return {"x": np.asarray(x), "y": np.asarray(y)}


GOOD_X = np.zeros((4, *IN_SHAPE), dtype=np.float32)
GOOD_Y = np.array([0, 1, 2, 3], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -5, 0, 2.5, [1, 2], 2.0**60])
def test_bad_num_examples_leaves_the_node_out(value):
    accepted, reasons, _ = check([reply(0), raw_reply(77, {"num-examples": value, "partition-id": 1})])
    assert accepted == [0]
    assert list(reasons) == ["node 77"]
    assert "training examples" in reasons["node 77"] or "'num-examples'" in reasons["node 77"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 1.5, [1]])
def test_bad_partition_id_leaves_the_node_out(value):
    accepted, reasons, _ = check([reply(0), raw_reply(77, {"num-examples": 10, "partition-id": value})])
    assert accepted == [0]
    assert list(reasons) == ["node 77"] and "'partition-id'" in reasons["node 77"]


def test_whole_float_counts_are_read_as_integers():
    accepted, reasons, updates = check([raw_reply(77, {"num-examples": 12.0, "partition-id": 3.0})])
    assert accepted == [3] and not reasons
    assert updates[0].num_examples == 12 and isinstance(updates[0].num_examples, int)


def test_non_finite_extra_metrics_are_dropped_and_the_round_goes_on(caplog):
    strategy = SortedFedAvg(NUM_CLASSES)
    replies = [reply(0), reply(1, **{"weights-bytes": math.nan, "train-accuracy": math.inf, "loss": [1.0, math.nan]})]
    with caplog.at_level(logging.WARNING, logger="strategies"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-merged"] == 2
    assert strategy.client_updates[1].metrics == {}
    assert any("client 1 (node 1007): dropping metric 'weights-bytes'" in r.message for r in caplog.records)


# ----------------------------------------------------------------------------------------------------- weights


def test_integer_weights_are_left_out_naming_the_client():
    weights = {k: v.numpy().astype(np.int64) for k, v in small_mlp(1).state_dict().items()}
    accepted, reasons, _ = check([reply(0), raw_reply(node_of(1), {"num-examples": 10, "partition-id": 1}, weights)])
    assert accepted == [0]
    assert "dtype torch.int64, expected floating point" in reasons["client 1 (node 1007)"]


@pytest.mark.parametrize("dtype", [bool, np.complex64])
def test_non_numeric_weights_are_left_out_naming_the_client(dtype):
    weights = {k: v.numpy().astype(dtype) for k, v in small_mlp(1).state_dict().items()}
    accepted, reasons, _ = check([reply(0), raw_reply(node_of(1), {"num-examples": 10, "partition-id": 1}, weights)])
    assert accepted == [0]
    assert "expected a floating-point or integer array" in reasons["client 1 (node 1007)"]


def test_float64_weights_are_cast_to_the_model_dtype_and_averaged():
    states = [small_mlp(k).state_dict() for k in range(2)]
    weights = {k: v.numpy().astype(np.float64) for k, v in states[1].items()}
    replies = [reply(0, states[0], data=None), raw_reply(node_of(1), {"num-examples": 100, "partition-id": 1}, weights)]
    strategy = SortedFedAvg(NUM_CLASSES)
    strategy._reference = small_mlp(5).state_dict()  # what configure_train records
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients-merged"] == 2 and not strategy.left_out
    merged = arrays.to_torch_state_dict()
    assert all(v.dtype == torch.float32 for v in merged.values())
    expected = weighted_average(states, [1.0, 1.0])
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value)


@pytest.mark.parametrize("method", ["average", "wm"])
def test_huge_weights_are_left_out_and_the_merge_goes_on(method):
    huge = {k: v * 1e30 for k, v in small_mlp(2).state_dict().items()}
    strategy = PermutationMerge(small_mlp(0), MergeConfig(method=method), runner=SequentialRunner("cpu"))
    arrays, metrics = strategy.aggregate_train(1, [reply(0), reply(1), reply(2, state=huge)])
    assert metrics["clients-merged"] == 2
    (who, why), *_ = strategy.left_out
    assert who == "client 2 (node 1014)" and f"(> {MAX_ABS_WEIGHT:g})" in why
    assert all(v.abs().max() < 100 for v in arrays.to_torch_state_dict().values())


def test_empty_weights_are_left_out():
    accepted, reasons, _ = check([reply(0), raw_reply(node_of(1), {"num-examples": 10, "partition-id": 1}, {})])
    assert accepted == [0] and "sent no weights" in reasons["client 1 (node 1007)"]


def test_without_a_reference_the_first_sound_reply_sets_it():
    nan_state = {k: torch.full_like(v, math.nan) for k, v in small_mlp(0).state_dict().items()}
    updates, rejected = accept_replies([reply(0, nan_state), reply(1), reply(2)], {}, NUM_CLASSES)
    assert [u.partition_id for u in updates] == [1, 2]
    assert [who for who, _ in rejected] == ["client 0 (node 1000)"]


# --------------------------------------------------------------------------------------------------- surrogate


@pytest.mark.parametrize(
    ("x", "y", "reason"),
    [
        (GOOD_X, GOOD_Y.reshape(2, 2), "1-D integer array"),
        (GOOD_X, np.zeros((4, 1), dtype=np.int64), "1-D integer array"),
        (GOOD_X, GOOD_Y.astype(np.float32), "1-D integer array"),
        (GOOD_X, GOOD_Y.astype(bool), "1-D integer array"),
        (GOOD_X.astype(np.uint8), GOOD_Y, "float N x C x H x W"),
        (GOOD_X[:, 0], GOOD_Y, "float N x C x H x W"),
        (GOOD_X, GOOD_Y[:3], "4 images but 3 labels"),
    ],
)
def test_malformed_surrogate_arrays_leave_the_client_out(x, y, reason):
    bad = raw_reply(node_of(1), {"num-examples": 10, "partition-id": 1}, surrogate=surrogate_arrays(x, y))
    accepted, reasons, _ = check([reply(0), bad])
    assert accepted == [0] and reason in reasons["client 1 (node 1007)"]


def test_surrogate_with_float64_images_is_read_as_float32():
    good = raw_reply(node_of(1), {"num-examples": 10, "partition-id": 1}, surrogate=surrogate_arrays(GOOD_X, GOOD_Y))
    _, _, updates = check([good])
    assert updates[0].surrogate.x.dtype == torch.float32 and updates[0].surrogate.y.dtype == torch.int64


def test_surrogate_with_huge_or_nan_pixels_leaves_the_client_out():
    huge, nan = GOOD_X + 1e30, GOOD_X + math.nan
    metrics = [{"num-examples": 10, "partition-id": k} for k in (1, 2)]
    replies = [
        reply(0),
        raw_reply(node_of(1), metrics[0], surrogate=surrogate_arrays(huge, GOOD_Y)),
        raw_reply(node_of(2), metrics[1], surrogate=surrogate_arrays(nan, GOOD_Y)),
    ]
    accepted, reasons, _ = check(replies)
    assert accepted == [0]
    assert "surrogate images hold values up to" in reasons["client 1 (node 1007)"]
    assert "NaN or Inf" in reasons["client 2 (node 1014)"]


def test_surrogate_image_shape_must_match_the_given_one():
    accepted, reasons, _ = check([reply(0), reply(1, data=images(1, shape=(3, 8, 8)))], image_shape=IN_SHAPE)
    assert accepted == [0]
    assert "shape (3, 8, 8), expected (1, 8, 8)" in reasons["client 1 (node 1007)"]


def test_without_an_image_shape_the_first_accepted_surrogate_sets_it():
    replies = [reply(2, data=images(2, shape=(3, 8, 8))), reply(0, data=None), reply(1), reply(3)]
    accepted, reasons, _ = check(replies, image_shape=None)
    assert accepted == [0, 1, 3]
    reason = reasons["client 2 (node 1014)"]
    assert "shape (3, 8, 8), expected (1, 8, 8)" in reason and "client 1 (node 1007)'s surrogate" in reason


# ------------------------------------------------------------------------------------------ last line of defence


def test_any_exception_while_reading_leaves_only_that_reply_out(monkeypatch):
    import strategies.validation as validation

    real = validation.read_reply

    def flaky(message, num_classes, **keys):
        if message.metadata.src_node_id == node_of(1):
            raise RuntimeError("decoder exploded")
        return real(message, num_classes, **keys)

    monkeypatch.setattr(validation, "read_reply", flaky)
    accepted, reasons, _ = check([reply(0), reply(1), None, reply(2)])
    assert accepted == [0, 2]
    assert reasons["node 1007"] == "unreadable reply (RuntimeError: decoder exploded)"
    assert "AttributeError" in reasons["reply #2 (no readable node id)"]


def test_any_exception_while_checking_leaves_only_that_client_out(monkeypatch):
    import strategies.validation as validation

    real = validation.surrogate_problems

    def flaky(update, *args):
        if update.partition_id == 1:
            raise MemoryError("no room")
        return real(update, *args)

    monkeypatch.setattr(validation, "surrogate_problems", flaky)
    accepted, reasons, _ = check([reply(0), reply(1), reply(2)])
    assert accepted == [0, 2] and reasons["client 1 (node 1007)"] == "cannot be checked (MemoryError: no room)"


def test_a_round_survives_every_malformed_reply_at_once(caplog):
    ints = {k: v.numpy().astype(np.int64) for k, v in small_mlp(5).state_dict().items()}
    replies = [
        reply(0),
        Message(Error(code=0, reason="crashed"), reply_to=flower_message("train", dst_node_id=9)),
        raw_reply(10, {"num-examples": math.nan, "partition-id": 1}),
        raw_reply(11, {"num-examples": 10, "partition-id": [2]}),
        reply(3, state={k: v * 1e30 for k, v in small_mlp(3).state_dict().items()}),
        raw_reply(node_of(5), {"num-examples": 10, "partition-id": 5}, ints),
        raw_reply(node_of(6), {"num-examples": 10, "partition-id": 6}, surrogate=surrogate_arrays(GOOD_X, GOOD_X)),
        reply(7, data=images(7, shape=(1, 4, 4))),
        reply(8),
        reply(8),
        reply(4),
    ]
    strategy = PermutationMerge(small_mlp(0), MergeConfig(method="wm"), runner=SequentialRunner("cpu"))
    with caplog.at_level(logging.WARNING, logger="strategies"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-merged"] == 2
    assert [u.partition_id for u in strategy.client_updates] == [0, 4]
    assert len(strategy.left_out) == len(replies) - 2
    assert sum("leaving out" in r.message for r in caplog.records) == len(replies) - 2


# ------------------------------------------------------------------------------------------ duplicate partitions


def test_every_reply_claiming_a_shared_partition_id_is_left_out(caplog):
    replies = [reply(0), reply(1), reply(1, state=small_mlp(9).state_dict()), reply(2)]
    replies[2] = client_reply(flower_message("train", dst_node_id=5), small_mlp(9).state_dict(), 100, 1, None)
    for order in range(3):
        shuffled = replies[:]
        random.Random(order).shuffle(shuffled)
        with caplog.at_level(logging.WARNING, logger="strategies"):
            accepted, reasons, _ = check(shuffled)
        assert accepted == [0, 2]
        assert set(reasons) == {"client 1 (node 1007)", "client 1 (node 5)"}
        assert all("claimed by 2 replies (nodes [5, 1007])" in why for why in reasons.values())
    assert any("nodes [5, 1007]" in r.message for r in caplog.records)


def test_a_malformed_claimant_still_voids_a_shared_partition_id():
    nan_state = {k: torch.full_like(v, math.nan) for k, v in small_mlp(1).state_dict().items()}
    hostile = client_reply(flower_message("train", dst_node_id=5), nan_state, 100, 1, None)
    accepted, reasons, _ = check([reply(0), reply(1), hostile])
    assert accepted == [0] and len(reasons) == 2


# ------------------------------------------------------------------------------------------------ surrogate caps


def test_a_surrogate_over_the_per_class_cap_is_dropped_and_the_weights_kept(caplog):
    with caplog.at_level(logging.WARNING, logger="strategies"):
        accepted, reasons, updates = check([reply(0), reply(1, data=images(1, n=60))], max_surrogate_per_class=5)
    assert accepted == [0, 1] and not reasons
    assert updates[0].surrogate is not None and updates[1].surrogate is None
    assert any(
        "dropping the surrogate of client 1 (node 1007)" in r.message and "6 images of class 0" in r.message
        for r in caplog.records
    )


def test_a_surrogate_over_the_total_cap_is_dropped_and_no_cap_keeps_it(caplog):
    data = images(1, n=60)
    with caplog.at_level(logging.WARNING, logger="strategies"):
        _, _, updates = check([reply(1, data=data)], max_surrogate_total=59)
    assert updates[0].surrogate is None
    assert any("60 images, more than the cap of 59" in r.message for r in caplog.records)
    _, _, updates = check([reply(1, data=data)], max_surrogate_total=None, max_surrogate_per_class=None)
    assert updates[0].surrogate is not None and len(updates[0].surrogate) == 60


def test_the_default_caps_fit_the_project_surrogates():
    accepted, reasons, updates = check([reply(0, data=images(0, n=100 * NUM_CLASSES))])
    assert accepted == [0] and not reasons and updates[0].surrogate is not None


def test_partition_ids_beyond_the_federation_are_left_out():
    replies = [reply(0), reply(1), raw_reply(42, {"num-examples": 10})]  # a plain Flower client: id = node id 42
    accepted, reasons, _ = check(replies, num_partitions=2)
    assert accepted == [0, 1] and "partition id 42 is not in 0..1" in reasons["client 42 (node 42)"]
    assert check(replies)[0] == [0, 1, 42]  # without num_partitions any id is fine
