"""The server side in-process: reading and checking replies, merge schedules, Ray parallel levels, the strategies."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, RecordDict

from fedmerge.data.images import LabeledImages, concat
from fedmerge.merge import MergeConfig, NPConfig, STEConfig, weighted_average
from fedmerge.merge.functional import load_state
from fedmerge.models import build_model
from fedmerge.train import TrainConfig, evaluate
from strategies import PermutationMerge, SortedFedAvg, client_reply, read_reply
from strategies.defences import Defences
from strategies.messages import ClientUpdate, train_config
from strategies.parallel import RayRunner, SequentialRunner
from strategies.schedule import MergeNode, run_schedule
from strategies.validation import accept_replies
from tests.helpers import flower_message

IN_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


def small_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", IN_SHAPE, NUM_CLASSES, width=16)


def surrogate(seed: int, n: int = 20) -> LabeledImages:
    g = torch.Generator().manual_seed(seed)
    return LabeledImages(
        torch.randn(n, *IN_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g), NUM_CLASSES
    )


def reply(
    partition_id: int,
    state=None,
    num_examples: int = 100,
    data: LabeledImages | None | str = "auto",
    node_id: int | None = None,
) -> Message:
    """A client's reply as the server receives it (node ids are unrelated to partition ids, as in Flower)."""
    node_id = node_id if node_id is not None else 1000 + 7 * partition_id
    state = state if state is not None else small_mlp(partition_id).state_dict()
    data = surrogate(partition_id) if data == "auto" else data
    return client_reply(
        flower_message("train", dst_node_id=node_id),
        state,
        num_examples,
        partition_id,
        data,
        {"train-accuracy": 50.0 + partition_id},
    )


def failed_reply(node_id: int) -> Message:
    return Message(
        Error(code=0, reason="client crashed: out of memory"), reply_to=flower_message("train", dst_node_id=node_id)
    )


def nodes_of(replies: list[Message]) -> list[MergeNode]:
    return [MergeNode.from_update(read_reply(r, NUM_CLASSES)) for r in replies]


def assert_states_equal(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if exact:
            assert torch.equal(value, b[key]), key
        else:
            torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- replies and checks


def test_reply_round_trip_keeps_weights_surrogate_counts_and_metrics():
    state = small_mlp(3).state_dict()
    data = surrogate(3, n=7)
    update = read_reply(reply(3, state, num_examples=321, data=data, node_id=99), NUM_CLASSES)
    assert (update.partition_id, update.node_id, update.num_examples) == (3, 99, 321)
    assert_states_equal(update.state, state)
    assert torch.equal(update.surrogate.x, data.x) and torch.equal(update.surrogate.y, data.y)
    assert update.metrics == {"train-accuracy": 53.0}


def test_plain_flower_reply_with_weights_only_is_read_with_the_node_id_as_partition():
    """What Flower's own PyTorch template clients send: one ArrayRecord and a MetricRecord with num-examples."""
    from flwr.app import MetricRecord

    state = small_mlp(1).state_dict()
    content = RecordDict(
        {"model": ArrayRecord(state), "train_metrics": MetricRecord({"num-examples": 64, "train_loss": 0.3})}
    )
    update = read_reply(Message(content, reply_to=flower_message("train", dst_node_id=42)), NUM_CLASSES)
    assert (update.partition_id, update.node_id, update.num_examples, update.surrogate) == (42, 42, 64, None)
    assert_states_equal(update.state, state)
    assert update.metrics == {"train_loss": pytest.approx(0.3)}


def test_train_config_carries_the_server_requests():
    config = train_config(2, want_surrogate=True, init_from_global=False, extra={"lr": 0.1})
    assert dict(config) == {"lr": 0.1, "server-round": 2, "want-surrogate": True, "init-from-global": False}


def test_accept_replies_sorts_by_partition_and_leaves_out_bad_replies_with_reasons(caplog):
    reference = small_mlp(0).state_dict()
    nan_state = {k: v.clone() for k, v in small_mlp(4).state_dict().items()}
    nan_state["layers.0.weight" if "layers.0.weight" in nan_state else next(iter(nan_state))][0, 0] = math.nan
    wrong_shape = small_mlp(5).state_dict() | {next(iter(reference)): torch.zeros(3, 3)}
    empty = LabeledImages(torch.zeros(0, *IN_SHAPE), torch.zeros(0, dtype=torch.long), NUM_CLASSES)
    bad_labels = LabeledImages(torch.zeros(2, *IN_SHAPE), torch.tensor([0, 12]), NUM_CLASSES)
    replies = [
        reply(2),
        failed_reply(77),
        reply(0),
        reply(4, state=nan_state),
        reply(5, state=wrong_shape),
        reply(6, data=empty),
        reply(7, data=bad_labels),
        reply(1, data=None),
        reply(2, node_id=5),
    ]
    with caplog.at_level(logging.WARNING, logger="strategies"):
        updates, rejected = accept_replies(replies, reference, NUM_CLASSES, IN_SHAPE)
    assert [u.partition_id for u in updates] == [0, 1]  # both claimants of partition 2 are left out
    assert updates[1].surrogate is None
    reasons = dict(rejected)
    assert "client crashed: out of memory" in reasons["node 77"]
    assert "NaN or Inf" in reasons["client 4 (node 1028)"]
    assert "expected (16, 64)" in reasons["client 5 (node 1035)"]
    assert "empty surrogate" in reasons["client 6 (node 1042)"]
    assert "labels outside 0..9" in reasons["client 7 (node 1049)"]
    for who in ("client 2 (node 1014)", "client 2 (node 5)"):
        assert "partition id 2 was claimed by 2 replies (nodes [5, 1014])" in reasons[who]
    assert len(rejected) == 7
    assert sum("leaving out" in r.message for r in caplog.records) == 7


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule", ["tree", "all-to-one"])
@pytest.mark.parametrize("n_clients", [2, 3, 5])
def test_plain_averaging_schedules_weight_every_client_by_its_sample_count(schedule, n_clients):
    """With method 'average' (no alignment) any schedule must give FedAvg's example-weighted average."""
    counts = [50, 120, 30, 200, 80][:n_clients]
    replies = [reply(k, num_examples=n) for k, n in enumerate(counts)]
    merged, steps = run_schedule(
        schedule,
        small_mlp(0),
        nodes_of(replies),
        MergeConfig(method="average", correction="none"),
        SequentialRunner("cpu"),
    )
    expected = weighted_average([small_mlp(k).state_dict() for k in range(n_clients)], [float(n) for n in counts])
    assert_states_equal(merged.state, expected, exact=False)
    assert merged.members == tuple(range(n_clients)) and merged.num_examples == sum(counts)
    assert len(steps) == n_clients - 1


def test_tree_levels_pair_neighbours_and_carry_the_odd_node():
    replies = [reply(k, num_examples=10 * (k + 1)) for k in range(5)]
    _, steps = run_schedule("tree", small_mlp(0), nodes_of(replies), MergeConfig(method="wm"), SequentialRunner("cpu"))
    assert [(s.level, s.members_a, s.members_b) for s in steps] == [
        (1, (0,), (1,)),
        (1, (2,), (3,)),
        (2, (0, 1), (2, 3)),
        (3, (0, 1, 2, 3), (4,)),
    ]
    assert steps[-1].lam == pytest.approx(50 / 150)
    assert all(s.method == "wm" for s in steps)


def test_all_to_one_folds_clients_in_partition_order():
    replies = [reply(k) for k in range(4)]
    _, steps = run_schedule(
        "all-to-one", small_mlp(0), nodes_of(replies), MergeConfig(method="wm"), SequentialRunner("cpu")
    )
    assert [(s.members_a, s.members_b) for s in steps] == [((0,), (1,)), ((0, 1), (2,)), ((0, 1, 2), (3,))]
    assert [s.lam for s in steps] == pytest.approx([1 / 2, 1 / 3, 1 / 4])


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown merge schedule"):
        run_schedule("star", small_mlp(0), nodes_of([reply(0)]), MergeConfig(), SequentialRunner("cpu"))


def test_client_without_surrogate_is_merged_by_weight_matching_with_a_log_line(caplog):
    replies = [reply(0), reply(1, data=None), reply(2), reply(3)]
    config = MergeConfig(method="ste", ste=STEConfig(steps=3, batch_size=16))
    with caplog.at_level(logging.WARNING, logger="strategies"):
        _, steps = run_schedule("tree", small_mlp(0), nodes_of(replies), config, SequentialRunner("cpu"))
    assert [s.method for s in steps] == ["wm", "ste", "wm"]
    assert any(
        "client(s) [1] sent no surrogate" in r.message and "data-free weight matching" in r.message
        for r in caplog.records
    )


# ---------------------------------------------------------------------------------------------- strategies


def merge_strategy(method: str = "ste", **kwargs) -> PermutationMerge:
    config = MergeConfig(method=method, ste=STEConfig(steps=5, batch_size=32), seed=3)
    return PermutationMerge(small_mlp(0), config, runner=SequentialRunner("cpu"), **kwargs)


def test_permutation_merge_is_deterministic_whatever_the_reply_order():
    replies = [reply(k, num_examples=40 + k) for k in range(4)]
    first = merge_strategy()
    arrays_a, metrics = first.aggregate_train(1, replies)
    shuffled = replies[:]
    random.Random(1).shuffle(shuffled)
    arrays_b, _ = merge_strategy().aggregate_train(1, shuffled)
    assert_states_equal(arrays_a.to_torch_state_dict(), arrays_b.to_torch_state_dict())
    assert metrics["clients-merged"] == 4 and metrics["num-examples"] == 40 + 41 + 42 + 43
    assert metrics["train-accuracy"] == pytest.approx(sum((50 + k) * (40 + k) for k in range(4)) / 166)
    assert [u.partition_id for u in first.client_updates] == [0, 1, 2, 3]
    assert [s.method for s in first.merge_steps] == ["ste"] * 3


@pytest.mark.parametrize("method", ["average", "wm", "am", "ste", "np", "ste+np"])
def test_every_merge_method_runs_a_three_client_tree(method):
    config = MergeConfig(
        method=method, ste=STEConfig(steps=3, batch_size=16), np=NPConfig(steps=3, batch_size=16), seed=0
    )
    strategy = PermutationMerge(small_mlp(0), config, runner=SequentialRunner("cpu"))
    arrays, metrics = strategy.aggregate_train(1, [reply(k, num_examples=20 + k) for k in range(3)])
    merged = arrays.to_torch_state_dict()
    assert merged.keys() == small_mlp(0).state_dict().keys()
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert [s.method for s in strategy.merge_steps] == [method, method]
    assert metrics["clients-merged"] == 3


def _surrogate_accuracy(state: dict, replies: list[Message]) -> float:
    data = concat([read_reply(r, NUM_CLASSES).surrogate for r in replies])
    return evaluate(load_state(small_mlp(0), state), data)


def test_fine_tuning_trains_the_merged_model_on_the_union_of_the_surrogates():
    replies = [reply(k, num_examples=30) for k in range(3)]
    plain, _ = merge_strategy("wm").aggregate_train(1, replies)
    tuned_strategy = merge_strategy("wm", finetune=TrainConfig(epochs=100, lr=0.1, batch_size=16))
    tuned, _ = tuned_strategy.aggregate_train(1, replies)
    again, _ = merge_strategy("wm", finetune=TrainConfig(epochs=100, lr=0.1, batch_size=16)).aggregate_train(1, replies)
    plain, tuned = plain.to_torch_state_dict(), tuned.to_torch_state_dict()
    assert _surrogate_accuracy(tuned, replies) > _surrogate_accuracy(plain, replies) + 20
    assert_states_equal(tuned, again.to_torch_state_dict())  # seeded


def test_fine_tuning_is_skipped_with_a_warning_when_a_client_sent_no_surrogate(caplog):
    replies = [reply(0), reply(1, data=None)]
    plain, _ = merge_strategy("wm").aggregate_train(1, replies)
    with caplog.at_level(logging.WARNING, logger="strategies"):
        tuned, _ = merge_strategy("wm", finetune=TrainConfig(epochs=5)).aggregate_train(1, replies)
    assert_states_equal(plain.to_torch_state_dict(), tuned.to_torch_state_dict())
    assert any("fine-tuning / distillation skipped: clients [1] sent no surrogate" in r.message for r in caplog.records)


def test_permutation_merge_leaves_out_broken_clients_and_reports_them(caplog):
    strategy = merge_strategy("wm")
    bad = small_mlp(2).state_dict() | {next(iter(small_mlp(0).state_dict())): torch.full((16, 64), math.inf)}
    with caplog.at_level(logging.WARNING, logger="strategies"):
        arrays, metrics = strategy.aggregate_train(
            1, [reply(0), failed_reply(9), reply(2, state=bad), reply(1, data=None)]
        )
    assert metrics["clients-merged"] == 2 and metrics["clients-left-out"] == 2
    assert [who for who, _ in strategy.left_out] == ["node 9", "client 2 (node 1014)"]
    assert any("client 1 (node 1007) sent no surrogate" in r.message for r in caplog.records)
    merged = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())


def test_permutation_merge_with_no_usable_reply_keeps_the_global_model(caplog):
    with caplog.at_level(logging.ERROR, logger="strategies"):
        arrays, metrics = merge_strategy().aggregate_train(1, [failed_reply(1), failed_reply(2)])
    assert any("no usable client update" in r.message for r in caplog.records)
    assert_states_equal(arrays.to_torch_state_dict(), small_mlp(0).state_dict())  # the global model, not None
    assert metrics["clients-merged"] == 0 and metrics["clients-left-out"] == 2


def test_permutation_merge_of_one_client_returns_its_weights():
    state = small_mlp(4).state_dict()
    arrays, _ = merge_strategy().aggregate_train(1, [reply(4, state=state)])
    assert_states_equal(arrays.to_torch_state_dict(), state)


def test_permutation_merge_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown merge schedule"):
        PermutationMerge(small_mlp(0), schedule="ring")


def test_sorted_fedavg_averages_by_sample_count_in_partition_order():
    states = [small_mlp(k).state_dict() for k in range(3)]
    counts = [10, 30, 60]
    replies = [reply(k, state=states[k], num_examples=n, data=None) for k, n in enumerate(counts)]
    strategy = SortedFedAvg(NUM_CLASSES, defences=Defences(max_share_ratio=0))  # 60 of 100: above 1.25 / 3
    arrays, metrics = strategy.aggregate_train(1, [replies[2], failed_reply(3), replies[0], replies[1]])
    expected = weighted_average(states, [10.0, 30.0, 60.0])
    assert_states_equal(arrays.to_torch_state_dict(), expected)
    assert metrics["clients-merged"] == 3 and metrics["clients-left-out"] == 1


# ---------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_runner():
    import ray

    runner = RayRunner(workers=2)
    yield runner
    ray.shutdown()


@pytest.mark.slow
def test_ray_levels_give_the_same_merge_as_in_process(ray_runner):
    replies = [reply(k, num_examples=30 + k) for k in range(4)]
    config = MergeConfig(method="ste", ste=STEConfig(steps=5, batch_size=32), seed=1)
    local, local_steps = run_schedule("tree", small_mlp(0), nodes_of(replies), config, SequentialRunner("cpu"))
    remote, remote_steps = run_schedule("tree", small_mlp(0), nodes_of(replies), config, ray_runner)
    assert_states_equal(local.state, remote.state)
    assert [(s.members_a, s.members_b, s.method) for s in local_steps] == [
        (s.members_a, s.members_b, s.method) for s in remote_steps
    ]


def test_ray_runner_checks_workers():
    with pytest.raises(ValueError, match="at least one worker"):
        RayRunner(workers=0)


def test_client_update_names_partition_and_node():
    assert ClientUpdate(3, 12, {}, 5).name == "client 3 (node 12)"
    assert isinstance(ArrayRecord(small_mlp(0).state_dict()), ArrayRecord) and RecordDict() is not None
