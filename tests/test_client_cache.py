"""The client model cache: state digests, cache keys, saved entries, and client_work reusing what it trained before."""

from __future__ import annotations

import pytest
import torch

from fedmerge.data import LabeledImages
from fedmerge.models import build_model
from fedmerge.surrogate import SurrogateConfig
from simulations.client_app import client_work
from simulations.client_cache import (
    BuiltSurrogate,
    ClientCache,
    TrainedClient,
    model_key,
    state_digest,
    surrogate_key,
)
from simulations.config import settings_from_run_config

RUN_CONFIG = {"dataset": "digits", "split": "disjoint", "width": 32, "epochs": 2, "per-class": 3, "seed": 5}


def settings(**overrides):
    return settings_from_run_config({**RUN_CONFIG, **overrides}, num_clients=2)


def a_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 28, 28), 10, width=8).state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- state_digest ---------------------------------------------------------------------------------------------------


def test_state_digest_is_equal_for_equal_states():
    state = a_state()
    copy = {name: tensor.clone() for name, tensor in reversed(list(state.items()))}  # other order, other storage
    assert state_digest(state) == state_digest(copy) == state_digest(a_state())
    weight = torch.arange(12.0).reshape(3, 4)
    assert state_digest({"w": weight.t()}) == state_digest({"w": weight.t().contiguous()})  # layout does not matter


def test_state_digest_changes_with_a_value_a_name_a_dtype_or_a_shape():
    state = a_state()
    digest = state_digest(state)
    name = next(iter(state))
    changed = dict(state) | {name: state[name].clone()}
    changed[name].view(-1)[0] += 1e-3
    assert state_digest(changed) != digest
    assert state_digest({"renamed" if k == name else k: v for k, v in state.items()}) != digest
    assert state_digest({"w": torch.zeros(4)}) != state_digest({"w": torch.zeros(4, dtype=torch.float64)})
    assert state_digest({"w": torch.zeros(4)}) != state_digest({"w": torch.zeros(2, 2)})
    assert state_digest({"w": torch.zeros(0)}) != state_digest({"w": torch.zeros(0, 3)})


def test_state_digest_of_a_model_with_batchnorm():
    state = build_model("resnet20", (3, 32, 32), 10).state_dict()
    assert any(tensor.dim() == 0 for tensor in state.values())
    assert state_digest(state) == state_digest({k: v.clone() for k, v in state.items()})


# --- keys -----------------------------------------------------------------------------------------------------------


def test_model_key_is_stable_for_equal_settings():
    assert model_key(settings(), 0, 1, None) == model_key(settings(), 0, 1, None)
    assert model_key(settings(), 1, 2, a_state()) == model_key(settings(), 1, 2, a_state())


@pytest.mark.parametrize(
    "change",
    [
        {"partition": 1},
        {"round": 2},
        {"seed": 6},
        {"epochs": 3},
        {"lr": 0.1},
        {"width": 16},
        {"split": "iid"},
        {"start": "state"},
    ],
)
def test_model_key_changes_with_what_decides_the_trained_model(change):
    base = model_key(settings(), 0, 1, None)
    run_config = {k: v for k, v in change.items() if k not in ("partition", "round", "start")}
    start = a_state() if change.get("start") else None
    assert model_key(settings(**run_config), change.get("partition", 0), change.get("round", 1), start) != base


def test_model_key_depends_on_the_start_weights_values():
    assert model_key(settings(), 0, 1, a_state(0)) != model_key(settings(), 0, 1, a_state(1))


def test_model_key_ignores_what_does_not_change_the_client_model():
    base = model_key(settings(), 0, 1, None)
    for other in (
        {"method": "wm"},
        {"strategy": "fedavg"},
        {"surrogate": "herding", "per-class": 2},
        {"results-dir": "/elsewhere"},
        {"client-cache": "/a/cache"},
        {"ste-steps": 3},
    ):
        assert model_key(settings(**other), 0, 1, None) == base, other


def test_surrogate_key_changes_with_the_surrogate_and_the_model():
    key = model_key(settings(), 0, 1, None)
    random10 = surrogate_key(key, SurrogateConfig("random", 10))
    assert random10 == surrogate_key(key, SurrogateConfig("random", 10))
    assert random10 != surrogate_key(key, SurrogateConfig("herding", 10))
    assert random10 != surrogate_key(key, SurrogateConfig("random", 5))
    assert random10 != surrogate_key(model_key(settings(), 1, 1, None), SurrogateConfig("random", 10))
    assert random10 != key


# --- saved entries --------------------------------------------------------------------------------------------------


def test_models_round_trip(tmp_path):
    cache = ClientCache(tmp_path)
    state = a_state(3)
    cache.save_model("k1", TrainedClient(state, 1.25, 87.5))
    loaded = cache.load_model("k1")
    assert loaded is not None and same_weights(loaded.state, state)
    assert (loaded.train_seconds, loaded.train_accuracy) == (1.25, 87.5)
    assert cache.load_model("k2") is None and cache.load_surrogate("k1") is None  # models and surrogates apart
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["k1.pt"]  # no temporary file left


def test_surrogates_round_trip(tmp_path):
    cache = ClientCache(tmp_path)
    data = LabeledImages(torch.randn(6, 1, 28, 28), torch.tensor([0, 0, 3, 3, 7, 7]), 10, "client 0 surrogate")
    cache.save_surrogate("s1", BuiltSurrogate(data, 0.75))
    loaded = cache.load_surrogate("s1")
    assert loaded is not None and loaded.seconds == 0.75
    assert torch.equal(loaded.data.x, data.x) and torch.equal(loaded.data.y, data.y)
    assert (loaded.data.num_classes, loaded.data.name) == (10, "client 0 surrogate")
    assert cache.load_surrogate("s2") is None and cache.load_model("s1") is None


def test_saving_again_overwrites(tmp_path):
    cache = ClientCache(tmp_path)
    cache.save_model("k", TrainedClient(a_state(0), 1.0, 10.0))
    cache.save_model("k", TrainedClient(a_state(1), 2.0, 20.0))
    loaded = cache.load_model("k")
    assert same_weights(loaded.state, a_state(1)) and loaded.train_seconds == 2.0


def _truncated(path):
    raw = path.read_bytes()
    return raw[: len(raw) // 2]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda path: b"", id="empty"),
        pytest.param(_truncated, id="truncated"),
        pytest.param(lambda path: b"PK\x03\x04" + b"x" * 100, id="broken-zip"),
        pytest.param(lambda path: b"garbage" * 50, id="garbage"),
        pytest.param(lambda path: b"not a torch file\n", id="text"),
    ],
)
def test_an_unreadable_entry_reads_as_missing(tmp_path, bad):
    cache = ClientCache(tmp_path)
    cache.save_model("k", TrainedClient(a_state(), 1.0, 50.0))
    cache.save_surrogate("k", BuiltSurrogate(LabeledImages(torch.randn(4, 1, 28, 28), torch.arange(4), 10, "s"), 0.5))
    for kind in ("models", "surrogates"):
        path = tmp_path / kind / "k.pt"
        path.write_bytes(bad(path))
    assert cache.load_model("k") is None
    assert cache.load_surrogate("k") is None


# --- client_work with a cache ---------------------------------------------------------------------------------------


def test_client_work_reuses_the_cached_model_and_surrogate(tmp_path):
    cached_settings = settings(**{"client-cache": str(tmp_path / "cache")})
    first = client_work(cached_settings, 1, 1, None, want_surrogate=True)
    again = client_work(cached_settings, 1, 1, None, want_surrogate=True)
    assert first.metrics["cached"] == 0 and again.metrics["cached"] == 1
    assert same_weights(first.state, again.state)
    assert first.surrogate is not None and again.surrogate is not None
    assert torch.equal(first.surrogate.x, again.surrogate.x) and torch.equal(first.surrogate.y, again.surrogate.y)
    for name in ("train-seconds", "train-accuracy", "surrogate-seconds", "weights-bytes", "surrogate-bytes"):
        assert again.metrics[name] == first.metrics[name], name
    assert first.metrics["train-seconds"] > 0 and again.num_examples == first.num_examples
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 1
    assert len(list((tmp_path / "cache" / "surrogates").glob("*.pt"))) == 1

    uncached = client_work(settings(), 1, 1, None, want_surrogate=True)  # what training gives without a cache
    assert uncached.metrics["cached"] == 0 and same_weights(uncached.state, first.state)
    assert torch.equal(uncached.surrogate.x, first.surrogate.x)


def test_client_work_misses_the_cache_for_other_settings(tmp_path):
    cache = str(tmp_path / "cache")
    first = client_work(settings(**{"client-cache": cache}), 0, 1, None, want_surrogate=False)
    other_seed = client_work(settings(seed=6, **{"client-cache": cache}), 0, 1, None, want_surrogate=False)
    assert first.metrics["cached"] == 0 and other_seed.metrics["cached"] == 0
    assert not same_weights(first.state, other_seed.state)
    from_weights = client_work(settings(**{"client-cache": cache}), 0, 1, first.state, want_surrogate=False)
    assert from_weights.metrics["cached"] == 0
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 3
    assert client_work(settings(**{"client-cache": cache}), 0, 1, None, want_surrogate=False).metrics["cached"] == 1


def test_a_cached_model_without_its_surrogate_builds_the_surrogate(tmp_path):
    cached_settings = settings(surrogate="herding", **{"client-cache": str(tmp_path / "cache")})
    model_only = client_work(cached_settings, 0, 1, None, want_surrogate=False)
    assert model_only.surrogate is None and model_only.metrics["surrogate-bytes"] == 0
    with_surrogate = client_work(cached_settings, 0, 1, None, want_surrogate=True)
    assert with_surrogate.metrics["cached"] == 0  # the surrogate had to be built
    assert same_weights(with_surrogate.state, model_only.state)
    assert with_surrogate.metrics["train-seconds"] == model_only.metrics["train-seconds"]
    # herding picks images with the model's features: the loaded model gives what the freshly trained one gives
    fresh = client_work(settings(surrogate="herding"), 0, 1, None, want_surrogate=True)
    assert torch.equal(with_surrogate.surrogate.x, fresh.surrogate.x)
    assert client_work(cached_settings, 0, 1, None, want_surrogate=True).metrics["cached"] == 1


# --- distillation_key -----------------------------------------------------------------------------------------------


def test_distillation_key_follows_every_input_of_the_distillation():
    from fedmerge.merge import Ensemble
    from fedmerge.merge.distill import DistillConfig
    from simulations.client_cache import distillation_key

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model("mlp", (1, 28, 28), 10, width=8)

    data = LabeledImages(torch.rand(6, 1, 28, 28), torch.arange(6) % 3, 10, "pooled")
    teacher = Ensemble([model(1), model(2)], [1.0, 3.0])
    key = distillation_key(model(0), data, teacher, DistillConfig(steps=5), 7, "cpu")
    assert key == distillation_key(
        model(0), data, Ensemble([model(1), model(2)], [1.0, 3.0]), DistillConfig(steps=5), 7, "cpu"
    )
    other_data = LabeledImages(data.x, torch.arange(6) % 2, 10, "pooled")
    changed = [
        distillation_key(model(9), data, teacher, DistillConfig(steps=5), 7, "cpu"),  # student's start
        distillation_key(model(0), other_data, teacher, DistillConfig(steps=5), 7, "cpu"),  # labels
        distillation_key(model(0), data, Ensemble([model(1), model(2)], [3.0, 1.0]), DistillConfig(steps=5), 7, "cpu"),
        distillation_key(model(0), data, None, DistillConfig(steps=5), 7, "cpu"),
        distillation_key(model(0), data, teacher, DistillConfig(steps=6), 7, "cpu"),
        distillation_key(model(0), data, teacher, DistillConfig(steps=5), 8, "cpu"),
        distillation_key(model(0), data, teacher, DistillConfig(steps=5), 7, "meta"),
    ]
    assert len(set(changed) | {key}) == len(changed) + 1
    # without a teacher the teacher's settings are not read, so they do not split the key; with one they do
    alone = DistillConfig(steps=5)
    sharper = DistillConfig(steps=5, temperature=0.5, loss="mse", kd_weight=2.0, bank=64)
    assert distillation_key(model(0), data, None, alone, 7, "cpu") == distillation_key(
        model(0), data, None, sharper, 7, "cpu"
    )
    assert distillation_key(model(0), data, teacher, alone, 7, "cpu") != distillation_key(
        model(0), data, teacher, DistillConfig(steps=5, temperature=0.5), 7, "cpu"
    )


def test_distilled_entries_round_trip_and_a_broken_one_reads_as_missing(tmp_path):
    cache = ClientCache(tmp_path)
    assert cache.load_distilled("k") is None
    cache.save_distilled("k", a_state(3))
    assert same_weights(cache.load_distilled("k"), a_state(3))
    (tmp_path / "distilled" / "k.pt").write_bytes(b"not a torch file")
    assert cache.load_distilled("k") is None
