"""Run config -> RunSettings: defaults, overrides, the pyproject section, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmerge.federation import FederationSpec
from fedmerge.merge import MergeConfig, NPConfig, STEConfig
from fedmerge.surrogate import SurrogateConfig
from fedmerge.train import TrainConfig
from simulations.config import DEFAULT_RUN_CONFIG, RunSettings, settings_from_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_the_defaults():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert config == DEFAULT_RUN_CONFIG


def test_defaults():
    settings = settings_from_run_config({}, num_clients=2)
    assert settings == RunSettings()  # the dataclass defaults and the run-config defaults agree
    assert settings == settings_from_run_config(DEFAULT_RUN_CONFIG, num_clients=2)
    assert settings.federation == FederationSpec("digits", "disjoint", num_clients=2, alpha=0.5, min_size=10, seed=0)
    assert settings.width is None
    assert settings.train == TrainConfig(epochs=20, lr=0.05, batch_size=64, optimizer="sgd")
    assert settings.surrogate == SurrogateConfig("random", per_class=10)
    assert (settings.strategy, settings.method, settings.schedule, settings.correction) == (
        "merge",
        "ste",
        "tree",
        "auto",
    )
    assert (settings.num_rounds, settings.merge_workers, settings.clients_start_from_global) == (1, 2, False)


def test_overrides():
    settings = settings_from_run_config(
        {
            "dataset": "mnist,usps",
            "split": "domain",
            "data-root": "/data",
            "seed": 7,
            "alpha": 1,
            "model": "cnn",
            "width": 0.5,
            "epochs": 3,
            "lr": 0.1,
            "batch-size": 32,
            "optimizer": "adam",
            "surrogate": "herding",
            "per-class": 5,
            "strategy": "fedavg",
            "method": "np",
            "schedule": "all-to-one",
            "correction": "repair",
            "ste-steps": 10,
            "np-steps": 20,
            "num-rounds": 4,
            "merge-workers": 0,
            "same-init": True,
            "results-dir": "out",
        },
        num_clients=2,
    )
    assert settings.federation == FederationSpec("mnist,usps", "domain", 2, alpha=1.0, seed=7, data_root="/data")
    assert (settings.model, settings.width) == ("cnn", 0.5)
    assert settings.train == TrainConfig(epochs=3, lr=0.1, batch_size=32, optimizer="adam")
    assert settings.surrogate == SurrogateConfig("herding", per_class=5)
    assert (settings.strategy, settings.schedule, settings.num_rounds, settings.merge_workers) == (
        "fedavg",
        "all-to-one",
        4,
        0,
    )
    assert settings.clients_start_from_global and settings.results_dir == "out"
    assert settings.merge_config() == MergeConfig("np", "repair", STEConfig(steps=10), NPConfig(steps=20), seed=7)


def test_condense_iterations_reach_the_surrogate_and_zero_keeps_the_library_default():
    from fedmerge.surrogate import CondenseConfig

    settings = settings_from_run_config({"surrogate": "condensed-noise", "condense-iterations": 300}, 2)
    assert settings.surrogate.condense == CondenseConfig(iterations=300)
    assert settings.surrogate.condense.schedule(settings.surrogate.per_class)[0] == 300
    assert settings_from_run_config({}, 2).surrogate == SurrogateConfig()  # cache keys of older clients unchanged
    random = settings_from_run_config({"surrogate": "random", "condense-iterations": 300}, 2)
    assert random.surrogate == SurrogateConfig()  # no condensation runs, so the surrogate's cache key stays
    with pytest.raises(ValueError, match="'condense-iterations' must be >= 0"):
        settings_from_run_config({"condense-iterations": -1}, 2)


def test_num_clients_comes_from_the_caller():
    assert settings_from_run_config({"split": "iid"}, num_clients=5).federation.num_clients == 5


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", 1.5, "'epochs' must be an integer"),
        ("epochs", True, "'epochs' must be an integer"),
        ("epochs", -1, "'epochs' must be >= 0"),
        ("lr", "0.1", "'lr' must be a number"),
        ("lr", 0, "'lr' must be > 0"),
        ("alpha", 0.0, "'alpha' must be > 0"),
        ("same-init", 1, "'same-init' must be true or false"),
        ("split", "shards", "'split' must be one of iid, dirichlet, disjoint, domain"),
        ("model", "vit", "'model' must be one of"),
        ("surrogate", "all", "'surrogate' must be one of"),
        ("strategy", "fedprox", "'strategy' must be one of merge, fedavg"),
        ("method", "git-rebasin", "'method' must be one of"),
        ("schedule", "chain", "'schedule' must be one of tree, all-to-one"),
        ("correction", "bn", "'correction' must be one of"),
        ("num-rounds", 0, "'num-rounds' must be >= 1"),
        ("merge-workers", -1, "'merge-workers' must be >= 0"),
        ("batch-size", 0, "'batch-size' must be >= 1"),
        ("width", 2.5, "'width'"),
        ("dataset", "imagenet", "'dataset'.*unknown dataset"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        settings_from_run_config({key: value}, num_clients=2)


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown run config keys \['learning-rate'\]; valid keys: dataset, split"):
        settings_from_run_config({"learning-rate": 0.1}, num_clients=2)


def test_domain_split_needs_one_dataset_per_client():
    with pytest.raises(ValueError, match="'dataset'.*one dataset name per client"):
        settings_from_run_config({"dataset": "mnist,usps", "split": "domain"}, num_clients=3)


def test_federation_setting_keys_ignore_file_locations_and_new_keys_at_their_default():
    from simulations.federation_options import ADDED_LATER, setting_key

    config = dict(DEFAULT_RUN_CONFIG)
    key = setting_key(config, 8, 1)
    assert len(key) == 16 and key == setting_key(config | {"data-root": "/elsewhere", "client-cache": "c"}, 8, 1)
    assert key != setting_key(config, 8, 2) and key != setting_key(config | {"epochs": 3}, 8, 1)
    before = {k: v for k, v in config.items() if k not in ADDED_LATER}  # a row keyed before those keys existed
    assert setting_key(before, 8, 1) == key
    assert setting_key(config | {"ensemble-weights": "labels"}, 8, 1) != key
    without = ("surrogate",)
    assert setting_key(config | {"surrogate": "herding"}, 8, ignore=without) == setting_key(config, 8, ignore=without)
