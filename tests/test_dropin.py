"""Drop-in use in an existing Flower app, in-process: a quickstart LeNet (no ``permutation_spec()``) merged by
PermutationMerge from replies built by ``merge_reply``; Flower's FedAvg arguments; rounds in which every client
fails; the library's logs in Flower's output; the partition-id error message."""

from __future__ import annotations

import copy
import inspect
import logging
import pickle
from collections.abc import Iterable

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedmerge.data.images import LabeledImages
from fedmerge.merge import MergeConfig, STEConfig, merge_pair, weighted_average
from fedmerge.merge.many import merge_models
from fedmerge.models import model_spec
from strategies import PermutationMerge, SortedFedAvg, merge_reply, read_reply
from strategies.messages import train_config
from strategies.parallel import SequentialRunner
from tests.helpers import flower_message

NUM_CLASSES = 10


class LeNet(nn.Module):
    """The model of Flower's PyTorch quickstart: no permutation_spec(), no activation_points() (both derived)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def lenet(seed: int) -> LeNet:
    torch.manual_seed(seed)
    return LeNet()


def images(seed: int, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % NUM_CLASSES


class DictImages(Dataset):
    """Samples as the quickstart's Hugging Face dataset gives them: ``{"img": ..., "label": ...}``."""

    def __init__(self, seed: int, n: int = 40, image_key: str = "img", label_key: str = "label") -> None:
        self.x, self.y = images(seed, n)
        self.keys = (image_key, label_key)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {self.keys[0]: self.x[index], self.keys[1]: int(self.y[index])}


def dict_loader(seed: int, n: int = 40, **keys: str) -> DataLoader:
    return DataLoader(DictImages(seed, n, **keys), batch_size=16, shuffle=False)


def train_message(
    node_id: int, want_surrogate: bool = True, arrays_key: str = "arrays", config_key: str = "config"
) -> Message:
    """The server's train message (as PermutationMerge sends it) that a client answers."""
    content = RecordDict(
        {
            arrays_key: ArrayRecord(lenet(0).state_dict()),
            config_key: train_config(1, want_surrogate=want_surrogate, init_from_global=False),
        }
    )
    return flower_message("train", dst_node_id=node_id, content=content)


def lenet_replies(count: int = 2, **kwargs) -> list[Message]:
    """Replies of ``count`` quickstart clients (their own LeNet, dict batches), built by merge_reply."""
    return [
        merge_reply(train_message(1000 + 7 * k), lenet(k), dict_loader(k), per_class=2, partition_id=k, **kwargs)
        for k in range(count)
    ]


def fast(method: str = "ste") -> MergeConfig:
    return MergeConfig(method=method, ste=STEConfig(steps=4, batch_size=20), seed=0)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ specs for any model


def test_model_spec_derives_and_caches_the_spec_of_a_model_without_one():
    model = lenet(0)
    with pytest.raises(TypeError, match="LeNet.*example_input"):
        model_spec(model)
    spec = model_spec(model, torch.zeros(2, 3, 32, 32))
    assert spec.axes_to_perm["fc3.weight"] == (None, "P_fc2")
    assert model_spec(model) is spec  # cached on the object: no example input, no second trace
    assert model_spec(copy.deepcopy(model)) == spec  # copies and pickles (e.g. for Ray tasks) carry it
    assert model_spec(pickle.loads(pickle.dumps(model))) == spec
    with pytest.raises(TypeError, match="LeNet"):
        model_spec(lenet(0))  # another object: no spec yet


def test_merge_pair_and_merge_models_derive_the_spec_from_example_input_or_the_surrogate():
    a, b = lenet(1).state_dict(), lenet(2).state_dict()
    result = merge_pair(lenet(0), a, b, None, 0.5, fast("wm"), example_input=torch.zeros(2, 3, 32, 32))
    assert result.method == "wm" and result.state.keys() == a.keys()
    x, y = images(0, 20)
    result = merge_pair(lenet(0), a, b, LabeledImages(x, y), 0.5, fast("ste"))
    assert result.method == "ste"
    many = merge_models(lenet(0), [a, b], [1.0, 3.0], None, fast("wm"), example_input=torch.zeros(2, 3, 32, 32))
    assert many.method == "wm"
    with pytest.raises(TypeError, match="example_input"):
        merge_models(lenet(0), [a, b], [1.0, 1.0], None, fast("wm"))


def test_permutation_merge_merges_a_quickstart_lenet_with_ste(caplog):
    strategy = PermutationMerge(lenet(0), fast("ste"), runner=SequentialRunner("cpu"))
    replies = lenet_replies()
    with caplog.at_level(logging.INFO, logger="strategies"), caplog.at_level(logging.INFO, logger="fedmerge"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    merged = arrays.to_torch_state_dict()
    assert merged.keys() == lenet(0).state_dict().keys()
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert [s.method for s in strategy.merge_steps] == ["ste"]
    assert metrics["clients-merged"] == 2 and metrics["num-examples"] == 80
    assert "deriving the permutation spec of LeNet" in caplog.text
    assert "merged clients [0, 1] by ste" in caplog.text
    assert "weight matching" not in caplog.text  # no fallback


@pytest.mark.parametrize("method", ["am", "zipit"])
def test_activation_methods_and_repair_merge_a_model_without_a_spec(method):
    """Activation points are derived with the spec (REPAIR needs none), so these run on the quickstart LeNet."""
    config = MergeConfig(method=method, correction="repair", seed=0)
    strategy = PermutationMerge(lenet(0), config, image_shape=(3, 32, 32), runner=SequentialRunner("cpu"))
    arrays, metrics = strategy.aggregate_train(1, lenet_replies())
    assert arrays is not None and metrics is not None and metrics["clients-merged"] == 2
    assert [s.method for s in strategy.merge_steps] == [method]


def test_permutation_merge_refuses_activation_matching_where_a_permutation_has_no_activation_point():
    from tests.test_derive_spec import SequenceNet  # its per-token Linear's units are on the last axis only

    with pytest.raises(ValueError, match=r"'am' needs activation points.*P_token"):
        PermutationMerge(SequenceNet(), MergeConfig(method="am"), image_shape=(3, 8, 8))
    PermutationMerge(SequenceNet(), MergeConfig(method="wm"), image_shape=(3, 8, 8))


def test_without_surrogate_an_example_input_is_needed(caplog):
    replies = [
        merge_reply(train_message(1000 + k, want_surrogate=False), lenet(k), dict_loader(k), partition_id=k)
        for k in range(2)
    ]
    blind = PermutationMerge(lenet(0), fast("ste"), runner=SequentialRunner("cpu"))
    with caplog.at_level(logging.ERROR, logger="strategies"):
        arrays, metrics = blind.aggregate_train(1, replies)
    assert "Pass example_input" in caplog.text and metrics is not None and metrics["clients-merged"] == 0
    assert arrays is not None  # the global model stays
    assert_same(arrays.to_torch_state_dict(), lenet(0).state_dict())
    for kwargs in ({"example_input": torch.zeros(2, 3, 32, 32)}, {"image_shape": (3, 32, 32)}):
        strategy = PermutationMerge(lenet(0), fast("ste"), runner=SequentialRunner("cpu"), **kwargs)
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert metrics is not None and metrics["clients-merged"] == 2
        assert [s.method for s in strategy.merge_steps] == ["wm"]  # data-free: no surrogate


# ------------------------------------------------------------------------------------ Flower's FedAvg arguments


@pytest.mark.parametrize("strategy_class", [PermutationMerge, SortedFedAvg])
def test_the_strategies_take_fedavgs_arguments_with_its_defaults(strategy_class):
    ours = inspect.signature(strategy_class.__init__).parameters
    for name, parameter in inspect.signature(FedAvg.__init__).parameters.items():
        if name != "self":
            assert name in ours, name
            assert ours[name].default == parameter.default, name
    strategy = PermutationMerge(lenet(0)) if strategy_class is PermutationMerge else SortedFedAvg(NUM_CLASSES)
    assert strategy.fraction_evaluate == 1.0 and strategy.weighted_by_key == "num-examples"
    assert strategy.arrayrecord_key == "arrays" and strategy.configrecord_key == "config"


def test_custom_keys_and_metrics_aggregation_are_honoured():
    calls = []

    def aggregate(contents: list[RecordDict], key: str) -> MetricRecord:
        calls.append((contents, key))
        return MetricRecord({"spy": 1.0})

    strategy = PermutationMerge(
        lenet(0),
        fast("average"),
        runner=SequentialRunner("cpu"),
        weighted_by_key="n-samples",
        arrayrecord_key="weights",
        configrecord_key="settings",
        train_metrics_aggr_fn=aggregate,
    )
    states, counts = [lenet(k).state_dict() for k in range(2)], [10, 30]
    replies = []
    for k in range(2):
        message = train_message(1000 + k, arrays_key="weights", config_key="settings")
        reply = merge_reply(
            message,
            lenet(k),
            dict_loader(k),
            per_class=1,
            partition_id=k,
            num_examples=counts[k],
            weighted_by_key="n-samples",
            metrics={"num-examples": 1000 * (2 - k)},  # a mere metric here: the weight is n-samples
        )
        assert "weights" in reply.content.array_records and "surrogate" in reply.content.array_records
        reply.content["optimizer"] = ArrayRecord({"momentum": torch.ones(3)})  # not the weights
        replies.append(reply)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    expected = weighted_average(states, [10.0, 30.0])
    merged = arrays.to_torch_state_dict()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    ((contents, key),) = calls
    assert key == "n-samples" and [c["metrics"]["n-samples"] for c in contents] == [10, 30]
    assert metrics["spy"] == 1.0 and metrics["n-samples"] == 40 and metrics["clients-merged"] == 2


def test_the_default_metrics_aggregation_is_flowers_weighted_average():
    strategy = PermutationMerge(lenet(0), fast("wm"), runner=SequentialRunner("cpu"))
    replies = [
        merge_reply(
            train_message(1000 + k), lenet(k), dict_loader(k), per_class=1, partition_id=k, metrics={"loss": float(k)}
        )
        for k in range(2)
    ]
    replies[1].content["metrics"]["num-examples"] = 120
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["loss"] == pytest.approx(0.75) and metrics["num-examples"] == 160
    assert "partition-id" not in metrics


# ------------------------------------------------------------------------------------ rounds where all clients fail


class FakeGrid(Grid):
    """Two nodes that fail every message (a ClientApp that crashes)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [11, 12]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent += messages
        return [
            Message(
                Error(code=0, reason="ClientApp crashed"),
                reply_to=flower_message(m.metadata.message_type, dst_node_id=m.metadata.dst_node_id),
            )
            for m in messages
        ]


@pytest.mark.parametrize("strategy_class", [PermutationMerge, SortedFedAvg])
def test_rounds_in_which_every_client_fails_keep_the_previous_arrays(strategy_class, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what a running ServerApp sets
        monkeypatch.setattr(TaskIdentity, name, value)
    strategy = PermutationMerge(lenet(0), fast()) if strategy_class is PermutationMerge else SortedFedAvg(NUM_CLASSES)
    initial = ArrayRecord(lenet(5).state_dict())
    grid = FakeGrid()
    result = strategy.start(grid, initial, num_rounds=2)
    assert_same(result.arrays.to_torch_state_dict(), lenet(5).state_dict())
    assert result.train_metrics_clientapp[2]["clients-merged"] == 0
    assert {m.metadata.message_type for m in grid.sent} == {"train", "evaluate"}  # fraction_evaluate = 1.0


# ------------------------------------------------------------------------------------ logs


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_library_logs_reach_flowers_handlers_without_any_call():
    handler = Collect()
    flower = logging.getLogger("flwr")
    flower.addHandler(handler)
    try:
        strategy = PermutationMerge(lenet(0), fast("wm"), runner=SequentialRunner("cpu"))
        strategy.aggregate_train(1, lenet_replies())
        strategy.aggregate_train(2, [Message(Error(code=0, reason="x"), reply_to=flower_message("train", 9))])
    finally:
        flower.removeHandler(handler)
    ours = [r for r in handler.records if r.name.split(".")[0] in ("strategies", "fedmerge")]
    assert any(r.levelno == logging.INFO and "merged clients [0, 1] by wm" in r.getMessage() for r in ours)
    assert any(r.levelno == logging.WARNING and "leaving out node 9" in r.getMessage() for r in ours)
    assert any(r.levelno == logging.ERROR and "no usable client update" in r.getMessage() for r in ours)


def test_show_library_logs_still_works_and_prints_nothing_twice():
    from simulations.server_app import show_library_logs

    show_library_logs()
    show_library_logs()
    handler = Collect()
    flower = logging.getLogger("flwr")
    flower.addHandler(handler)
    try:
        logging.getLogger("strategies.test").info("one line")
    finally:
        flower.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == ["one line"]


# ------------------------------------------------------------------------------------ partition-id message


def test_a_missing_partition_id_says_what_to_set_in_both_modes():
    from simulations.client_app import node_partition

    with pytest.raises(ValueError) as error:
        node_partition({})
    text = str(error.value)
    assert "partition-id" in text and "num-partitions" in text
    assert "--federation-config" in text and "num-supernodes" in text  # simulation
    assert 'flower-supernode --node-config "partition-id=0 num-partitions=2"' in text  # deployment


# ------------------------------------------------------------------------------------ the client helper


def test_merge_reply_reads_tuple_batches():
    x, y = images(3)
    model = lenet(3)
    reply = merge_reply(train_message(1021), model, DataLoader(TensorDataset(x, y), batch_size=16), per_class=2)
    update = read_reply(reply, NUM_CLASSES)
    assert update.num_examples == 40 and update.node_id == 1021
    assert update.partition_id == 1021  # no partition id given: the server falls back to the node id
    assert "partition-id" not in reply.content["metrics"]
    assert_same(update.state, model.state_dict())
    assert update.surrogate is not None and len(update.surrogate) == 2 * NUM_CLASSES
    assert update.surrogate.class_counts().tolist() == [2] * NUM_CLASSES
    assert all(any(torch.equal(s, row) for row in x) for s in update.surrogate.x)
    assert update.metrics["surrogate-bytes"] == 20 * 3 * 32 * 32 * 4 + 20 * 8
    assert update.metrics["label-counts"] == torch.bincount(y, minlength=NUM_CLASSES).tolist()


def test_merge_reply_reads_dict_batches_with_any_keys_and_the_partition_id_from_the_context():
    context = Context(
        run_id=1, node_id=77, node_config={"partition-id": 4, "num-partitions": 5}, state=RecordDict(), run_config={}
    )
    loader = dict_loader(4, image_key="image", label_key="fine_label")
    reply = merge_reply(
        train_message(77), lenet(4), loader, context=context, image_key="image", label_key="fine_label", per_class=1
    )
    update = read_reply(reply, NUM_CLASSES)
    assert update.partition_id == 4 and update.num_examples == 40 and len(update.surrogate) == NUM_CLASSES
    with pytest.raises(ValueError, match="image_key"):
        merge_reply(train_message(77), lenet(4), loader, context=context)


def test_merge_reply_takes_tensors_and_labeled_images_and_every_surrogate_kind():
    x, y = images(5, 30)
    model = lenet(5)
    for data in ((x, y), LabeledImages(x, y, NUM_CLASSES)):
        update = read_reply(merge_reply(train_message(5), model, data, partition_id=0, per_class=1), NUM_CLASSES)
        assert update.num_examples == 30 and len(update.surrogate) == NUM_CLASSES
    for kind in ("herding", "kcenter"):
        reply = merge_reply(train_message(5), model, (x, y), surrogate=kind, per_class=2, partition_id=0)
        assert len(read_reply(reply, NUM_CLASSES).surrogate) == 2 * NUM_CLASSES
    reply = merge_reply(train_message(5), model, (x, y), surrogate="none", partition_id=0)
    assert "surrogate" not in reply.content.array_records


class Unreadable(Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int):
        raise AssertionError("the data was read although no surrogate was wanted")


def test_merge_reply_respects_want_surrogate_false_and_suits_flowers_fedavg():
    model = lenet(6)
    replies = [
        merge_reply(train_message(k, want_surrogate=False), model, DataLoader(Unreadable()), partition_id=k)
        for k in range(2)
    ]
    for reply in replies:
        assert list(reply.content.array_records) == ["arrays"]  # no surrogate record
        assert reply.content["metrics"]["num-examples"] == 50 and reply.content["metrics"]["surrogate-bytes"] == 0
    arrays, _ = FedAvg().aggregate_train(1, replies)  # Flower's own FedAvg reads the reply too
    assert arrays is not None
    assert_same(arrays.to_torch_state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------ end to end (Flower + Ray)

E2E: dict = {}
e2e_server = ServerApp()
e2e_client = ClientApp()


@e2e_client.train()
def _quickstart_train(msg: Message, context: Context) -> Message:
    """A quickstart ClientApp: train the received LeNet a little, answer with merge_reply."""
    model = LeNet()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition_id = int(context.node_config["partition-id"])
    loader = dict_loader(partition_id)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(batch["img"]), batch["label"])
        loss.backward()
        optimizer.step()
    return merge_reply(msg, model, loader, context=context, per_class=2, metrics={"train-loss": float(loss)})


@e2e_server.main()
def _quickstart_server(grid: Grid, context: Context) -> None:
    strategy = PermutationMerge(LeNet(), fast("ste"), runner=SequentialRunner("cpu"), fraction_evaluate=0.0)
    E2E["initial"] = lenet(0).state_dict()
    E2E["result"] = strategy.start(grid, ArrayRecord(E2E["initial"]), num_rounds=1)
    E2E["steps"] = [s.method for s in strategy.merge_steps]
    E2E["merged"] = [u.partition_id for u in strategy.client_updates]


@pytest.mark.slow  # starts Flower's simulation engine (Ray)
def test_end_to_end_a_quickstart_app_is_merged_by_flowers_simulation_engine():
    from flwr.simulation import run_simulation

    handler = Collect()
    logging.getLogger("flwr").addHandler(handler)
    try:
        run_simulation(
            e2e_server,
            e2e_client,
            num_supernodes=2,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "num_gpus": 0, "log_to_driver": False},
            },
        )
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert "result" in E2E, "the ServerApp did not finish"
    merged = E2E["result"].arrays.to_torch_state_dict()
    assert merged.keys() == E2E["initial"].keys() and not all(torch.equal(merged[k], E2E["initial"][k]) for k in merged)
    assert E2E["steps"] == ["ste"] and E2E["merged"] == [0, 1]
    assert E2E["result"].train_metrics_clientapp[1]["clients-merged"] == 2
    messages = [r.getMessage() for r in handler.records]
    assert any("deriving the permutation spec of LeNet" in m for m in messages)
    assert any("merged clients [0, 1] by ste" in m for m in messages)
