"""Benchmark sweeps: the plan, the FedAvg baselines, an in-process sweep that resumes, the command line, plus the
``flwr run`` command the Flower backend uses and the results-row columns a sweep relies on."""

from __future__ import annotations

import argparse
import io
import math
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedmerge.data import LabeledImages
from fedmerge.federation import client_train_data
from fedmerge.train import evaluate
from simulations import sweep
from simulations.config import DEFAULT_RUN_CONFIG, settings_from_run_config
from simulations.flower_cli import (
    PROJECT,
    flwr_run_command,
    run_config_argument,
    toml_value,
)
from simulations.report import RunOutcome, results_row, surrogate_trained_model
from simulations.results_io import save_rows
from simulations.server_app import template_model
from simulations.sweep import (
    PlannedRun,
    SweepGrid,
    SweepOptions,
    fedavg_counterpart,
    finished_rows,
    main,
    parse_assignment,
    parse_surrogate,
    plan,
    run_sweep,
    with_fedavg_baselines,
)
from strategies.messages import ClientUpdate

TINY = {"epochs": 2, "ste-steps": 5, "merge-workers": 0}
FEDERATION_FIELDS = ("strategy", "method", "num-rounds", "surrogate", "per-class")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def federation_of(run: PlannedRun) -> tuple:
    """What identifies a run's federation: its config without the server's settings, and its client count."""
    return tuple((k, v) for k, v in run.items if k not in FEDERATION_FIELDS), run.num_clients


# --- plan -----------------------------------------------------------------------------------------------------------


def test_plan_runs_fedavg_first_once_per_federation():
    grid = SweepGrid(
        datasets=["digits"],
        splits=["disjoint", "dirichlet"],
        alphas=[0.5, 1.0],
        clients=[2, 12],
        methods=["wm", "average"],
        surrogates=[("random", 10), ("herding", 5)],
        fedavg_rounds=3,
        overrides={"epochs": 2},
        backend="in-process",
    )
    runs, skipped = plan(grid)
    assert skipped == [("digits disjoint N=12", "a disjoint split needs a class per client, digits has 10")]
    federations: dict[tuple, list[PlannedRun]] = {}
    for run in runs:
        federations.setdefault(federation_of(run), []).append(run)
    assert len(federations) == 1 + 2 * 2  # disjoint N=2 (one alpha only), dirichlet 2 alphas x 2 client counts
    for members in federations.values():
        assert members[0].is_fedavg and not any(run.is_fedavg for run in members[1:])
        assert sorted((run.method, run.config["surrogate"], run.config["per-class"]) for run in members[1:]) == [
            ("average", "herding", 5),
            ("average", "random", 10),
            ("wm", "herding", 5),
            ("wm", "random", 10),
        ]
        assert members[0].config["num-rounds"] == 3 and all(run.config["num-rounds"] == 1 for run in members[1:])
    assert len(runs) == 5 * 5 and len({run.key for run in runs}) == len(runs)
    assert all(run.config["epochs"] == 2 and run.backend == "in-process" for run in runs)
    assert not any(key in run.config for run in runs for key in sweep.LOCAL_KEYS)
    assert {run.config["alpha"] for run in runs if run.config["split"] == "disjoint"} == {0.5}
    assert runs[0].label == "digits disjoint N=2 fedavg seed 0"
    assert runs[1].label == "digits disjoint N=2 wm random:10 seed 0"
    assert any(run.label.startswith("digits dirichlet(1) N=12 average herding:5") for run in runs)


def test_plan_without_fedavg_and_over_seeds():
    runs, skipped = plan(
        SweepGrid(
            datasets=["digits"], splits=["iid"], clients=[2, 3], methods=["average"], seeds=[0, 1], fedavg_rounds=0
        )
    )
    assert skipped == [] and len(runs) == 4 and not any(run.is_fedavg for run in runs)
    assert [(run.config["seed"], run.num_clients) for run in runs] == [(0, 2), (0, 3), (1, 2), (1, 3)]


def test_run_keys_are_stable_and_depend_on_what_decides_the_run():
    grid = {"datasets": ["digits"], "splits": ["disjoint"], "clients": [2], "methods": ["wm"]}
    keys = [run.key for run in plan(SweepGrid(**grid))[0]]
    assert keys == [run.key for run in plan(SweepGrid(**grid))[0]]
    assert all(len(key) == 16 and int(key, 16) >= 0 for key in keys)
    in_process = [run.key for run in plan(SweepGrid(**grid, backend="in-process"))[0]]
    assert not set(keys) & set(in_process)
    config = dict(DEFAULT_RUN_CONFIG)
    run = PlannedRun.make(config, 2, "flower")
    assert run.key == PlannedRun.make(dict(reversed(list(config.items()))), 2, "flower").key  # order does not matter
    assert run.key != PlannedRun.make(config, 3, "flower").key
    assert run.key != PlannedRun.make(config | {"epochs": 3}, 2, "flower").key
    assert run.config == config and run.method == "ste" and PlannedRun.make(config, 2, "flower") == run


def test_condensation_settings_key_only_condensed_surrogates():
    grid = {"datasets": ["digits"], "splits": ["disjoint"], "clients": [2], "methods": ["wm"], "fedavg_rounds": 0}
    surrogates = [("random", 10), ("condensed-noise", 1)]
    plain = plan(SweepGrid(**grid, surrogates=surrogates))[0]
    longer = plan(SweepGrid(**grid, surrogates=surrogates, overrides={"condense-iterations": 300}))[0]
    assert longer[0] == plain[0]  # the random surrogate's run (and key) ignores the condensation's knob
    assert longer[1].key != plain[1].key and longer[1].config["condense-iterations"] == 300


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"overrides": {"method": "wm"}}, "cannot change"),
        ({"overrides": {"seed": 1}}, "cannot change"),
        ({"overrides": {"results-dir": "x"}}, "cannot change"),
        ({"overrides": {"no-such-key": 1}}, "unknown run config keys"),
        ({"overrides": {"epochs": -1}}, "'epochs' must be >= 0"),
        ({"overrides": {"epochs": "two"}}, "'epochs' must be an integer"),
        ({"methods": ["wm", "nope"]}, "unknown methods"),
        ({"surrogates": [("nope", 10)]}, "bad surrogate nope:10"),
        ({"surrogates": [("random", 0)]}, "bad surrogate random:0"),
        ({"backend": "ray"}, "unknown backend"),
        ({"clients": [1, 2]}, "client counts >= 2"),
        ({"fedavg_rounds": -1}, "fedavg-rounds"),
    ],
)
def test_sweep_grid_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SweepGrid(datasets=["digits"], **kwargs)


# --- FedAvg baselines -----------------------------------------------------------------------------------------------


def merge_run(**config) -> PlannedRun:
    return PlannedRun.make(
        DEFAULT_RUN_CONFIG | {"method": "wm", "surrogate": "herding", "per-class": 5} | config, 4, "in-process"
    )


def test_fedavg_counterpart_keeps_the_federation_and_drops_the_merge_settings():
    run = merge_run(epochs=3)
    fedavg = fedavg_counterpart(run, 5)
    assert fedavg.is_fedavg and fedavg.method == "fedavg" and fedavg.config["num-rounds"] == 5
    assert (fedavg.num_clients, fedavg.backend) == (4, "in-process") and federation_of(fedavg) == federation_of(run)
    assert all(fedavg.config[key] == DEFAULT_RUN_CONFIG[key] for key in ("method", "surrogate", "per-class"))
    assert fedavg == fedavg_counterpart(merge_run(epochs=3, method="average", surrogate="random"), 5)
    assert fedavg == fedavg_counterpart(merge_run(epochs=3, surrogate="condensed", **{"condense-iterations": 9}), 5)
    assert fedavg != fedavg_counterpart(run, 4) and fedavg != fedavg_counterpart(merge_run(epochs=4), 5)


def test_with_fedavg_baselines():
    run = merge_run()
    fedavg = fedavg_counterpart(run, 3)
    fedavg_row = {
        "run-key": fedavg.key,
        "acc_round1_global": 40.0,
        "acc_round2_global": 50.0,
        "acc_round3_global": 60.0,
    }
    own = with_fedavg_baselines(dict(fedavg_row), fedavg, pd.DataFrame(columns=["run-key"]), 3)
    assert (own["fedavg-rounds"], own["acc_fedavg1_global"], own["acc_fedavgR_global"]) == (3, 40.0, 60.0)

    older = fedavg_row | {"acc_round1_global": 1.0, "acc_round3_global": 2.0}
    other = {"run-key": "someone-else", "acc_round1_global": 99.0, "acc_round3_global": 99.0}
    finished = pd.DataFrame([older, other, fedavg_row])
    row = with_fedavg_baselines({"acc_merged_global": 70.0, "acc_round1_global": 70.0}, run, finished, 3)
    assert (row["acc_merged_global"], row["acc_fedavg1_global"], row["acc_fedavgR_global"]) == (70.0, 40.0, 60.0)

    for rows, rounds in ((finished[finished["run-key"] != fedavg.key], 3), (finished, 4), (finished, 0)):
        row = with_fedavg_baselines({"acc_merged_global": 70.0}, run, rows, rounds)
        assert row["fedavg-rounds"] == rounds
        assert math.isnan(row["acc_fedavg1_global"]) and math.isnan(row["acc_fedavgR_global"])


def test_a_run_key_of_digits_survives_the_csv(tmp_path):
    run = next(
        r
        for r in (PlannedRun.make(DEFAULT_RUN_CONFIG | {"seed": s}, 2, "in-process") for s in range(10**6))
        if r.key.isdigit() and r.key.startswith("0")
    )
    save_rows(tmp_path / "runs.csv", [{"run-key": run.key, "acc_round1_global": 50.0}])
    assert run.key in set(finished_rows(tmp_path / "runs.csv")["run-key"])


# --- run_sweep, in process --------------------------------------------------------------------------------------------


def tiny_runs() -> list[PlannedRun]:
    grid = SweepGrid(
        datasets=["digits"],
        splits=["disjoint"],
        clients=[2],
        methods=["wm", "average"],
        fedavg_rounds=2,
        overrides=TINY,
        backend="in-process",
    )
    return plan(grid)[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[SweepOptions, list[PlannedRun], list]:
    """A finished in-process sweep: FedAvg, wm and average over two digits clients."""
    options = SweepOptions(tmp_path_factory.mktemp("sweep"), fedavg_rounds=2)
    runs = tiny_runs()
    failures = run_sweep(runs, options, quiet())
    return options, runs, failures


@pytest.mark.slow
def test_run_sweep_writes_a_row_per_run_with_the_fedavg_baselines(swept):
    options, runs, failures = swept
    assert failures == []
    rows = finished_rows(options.csv_path)
    assert list(rows["run-key"]) == [run.key for run in runs]
    assert list(rows["sweep-method"]) == ["fedavg", "wm", "average"]
    assert set(rows["sweep-backend"]) == {"in-process"} and (rows["sweep-seconds"] > 0).all()
    fedavg = rows.iloc[0]
    assert fedavg["cfg_strategy"] == "fedavg" and fedavg["cfg_num-rounds"] == 2
    assert 0 <= fedavg["acc_round1_global"] <= 100 and fedavg["acc_round2_global"] == fedavg["acc_merged_global"]
    assert (rows["fedavg-rounds"] == 2).all()
    assert (rows["acc_fedavg1_global"] == fedavg["acc_round1_global"]).all()
    assert (rows["acc_fedavgR_global"] == fedavg["acc_round2_global"]).all()
    merges = rows.iloc[1:]
    assert (merges["acc_round1_global"] == merges["acc_merged_global"]).all() and merges[
        "acc_round2_global"
    ].isna().all()
    assert merges["acc_surrogate-trained_global"].between(0, 100).all() and math.isnan(
        fedavg["acc_surrogate-trained_global"]
    )
    # every merge method merges the same clients: the second one finds them in the cache
    assert list(rows["clients-cached"]) == [0, 0, 2]
    assert rows.iloc[1]["acc_client0_global"] == rows.iloc[2]["acc_client0_global"]
    assert (rows["cfg_client-cache"] == str(options.cache_dir)).all() and options.cache_dir.is_dir()
    for run, results_dir in zip(runs, rows["cfg_results-dir"], strict=True):
        assert Path(results_dir) == (options.out / "runs" / run.key).resolve()
        assert (Path(results_dir) / "runs.csv").exists()


@pytest.mark.slow
def test_a_second_sweep_runs_nothing(swept, monkeypatch):
    options, runs, _ = swept
    executed = []
    monkeypatch.setattr(sweep, "execute", lambda run, options: executed.append(run) or pytest.fail("ran again"))
    console = quiet()
    started = time.perf_counter()
    assert run_sweep(runs, options, console) == []
    assert executed == [] and time.perf_counter() - started < 5
    assert len(finished_rows(options.csv_path)) == len(runs)
    assert "3 already in" in console.file.getvalue()


@pytest.mark.slow
def test_a_failed_run_is_reported_and_retried_by_the_next_sweep(swept, tmp_path, monkeypatch):
    cache_dir = swept[0].cache_dir  # clients trained already: only the merges and scoring run here
    options = SweepOptions(tmp_path / "out", cache=cache_dir, fedavg_rounds=2)
    runs = tiny_runs()
    broken = runs[1]
    real_execute = sweep.execute
    executed, fails = [], [broken.key]

    def failing_execute(run, options):
        executed.append(run.key)
        if run.key in fails:
            raise RuntimeError("boom")
        return real_execute(run, options)

    monkeypatch.setattr(sweep, "execute", failing_execute)
    failures = run_sweep(runs, options, quiet())
    assert failures == [(broken, "boom")] and executed == [run.key for run in runs]
    rows = finished_rows(options.csv_path)
    assert list(rows["run-key"]) == [runs[0].key, runs[2].key]
    assert rows.iloc[1]["acc_fedavgR_global"] == rows.iloc[0]["acc_round2_global"]

    executed.clear()
    fails.clear()
    assert run_sweep(runs, options, quiet()) == []
    assert executed == [broken.key]
    rows = finished_rows(options.csv_path)
    assert list(rows["run-key"]) == [runs[0].key, runs[2].key, broken.key]
    assert rows.iloc[2]["acc_fedavg1_global"] == rows.iloc[0]["acc_round1_global"]
    assert rows.iloc[2]["clients-cached"] == 2


# --- command line ---------------------------------------------------------------------------------------------------


def test_dry_run_lists_the_runs_and_the_skipped(capsys, tmp_path):
    argv = [
        "--datasets",
        "digits",
        "--splits",
        "disjoint",
        "--clients",
        "2",
        "12",
        "--methods",
        "wm",
        "average",
        "--fedavg-rounds",
        "2",
        "--set",
        "epochs=2",
        "ste-steps=5",
        "--backend",
        "in-process",
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--dry-run"]) == 0
    err = capsys.readouterr().err
    grid = SweepGrid(
        ["digits"],
        ["disjoint"],
        [0.5],
        [2, 12],
        ["wm", "average"],
        [("random", 10)],
        [0],
        2,
        {"epochs": 2, "ste-steps": 5},
        "in-process",
    )
    runs = plan(grid)[0]
    assert len(runs) == 3 and all(run.key in err for run in runs)
    assert "skipped digits disjoint N=12" in err
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", 'method="wm"'],
        ["--set", "epochs=-1"],
        ["--set", "nope=1"],
        ["--methods", "nope"],
        ["--clients", "1"],
        ["--surrogates", "nope:3"],
    ],
)
def test_bad_option_values_return_2(bad, capsys):
    assert main(["--datasets", "digits", "--dry-run", *bad]) == 2
    assert "error:" in capsys.readouterr().err


def test_unparsable_options_exit_2(capsys):
    for bad in (["--backend", "ray"], ["--surrogates", "random:x"], ["--set", "epochs"], ["--clients", "two"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--dry-run", *bad])
        assert exit_info.value.code == 2


def fake_sweep(rows_written: int, failures: list):
    def run(runs, options, console=None):
        save_rows(options.csv_path, [{"run-key": run.key} for run in runs[:rows_written]])
        return failures

    return run


def test_main_returns_1_when_a_run_failed(monkeypatch, tmp_path):
    runs = tiny_runs()
    monkeypatch.setattr(sweep, "run_sweep", fake_sweep(2, [(runs[1], "boom\nmore")]))
    argv = ["--datasets", "digits", "--splits", "disjoint", "--clients", "2", "--out", str(tmp_path), "--no-report"]
    assert main(argv) == 1
    monkeypatch.setattr(sweep, "run_sweep", fake_sweep(2, []))
    assert main(argv) == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("epochs=2", ("epochs", 2)),
        ("lr=0.01", ("lr", 0.01)),
        ("same-init=true", ("same-init", True)),
        ('optimizer="adam"', ("optimizer", "adam")),
        ("optimizer=adam", ("optimizer", "adam")),  # a bare word is a string
        ("data-root=/data/x y", ("data-root", "/data/x y")),
        (" epochs = 3", ("epochs", 3)),
        ("results-dir=a=b", ("results-dir", "a=b")),
    ],
)
def test_assignment(text, expected):
    key, value = parse_assignment(text)
    assert (key, value) == expected and type(value) is type(expected[1])


def test_assignment_needs_an_equals_sign():
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        parse_assignment("epochs")


def test_surrogate():
    assert parse_surrogate("herding:5") == ("herding", 5)
    assert parse_surrogate("random") == ("random", DEFAULT_RUN_CONFIG["per-class"])
    for bad in ("random:x", "random:1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="KIND:PER_CLASS"):
            parse_surrogate(bad)


# --- the flwr run command -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (-2, "-2"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        ("wm", '"wm"'),
        ('a "b" \\c', '"a \\"b\\" \\\\c"'),
    ],
)
def test_toml_value(value, text):
    assert toml_value(value) == text
    parsed = tomllib.loads(f"v = {text}")["v"]
    assert parsed == value and type(parsed) is type(value)


def test_toml_value_rejects_other_types():
    for value in (None, [1], {"a": 1}):
        with pytest.raises(TypeError, match="bool, int, float or str"):
            toml_value(value)


def test_run_config_argument_is_what_flower_parses_back():
    from flwr.common.config import parse_config_args

    run_config = {
        "epochs": 2,
        "lr": 0.05,
        "same-init": False,
        "method": "wm",
        "results-dir": "/tmp/a b/c=d",
        "data-root": "C:\\data",
    }
    argument = run_config_argument(run_config)
    assert argument.startswith('epochs=2 lr=0.05 same-init=false method="wm" ')
    assert parse_config_args([argument]) == run_config
    assert run_config_argument({}) == ""


def test_flwr_run_command():
    command = flwr_run_command({"epochs": 2, "method": "wm"}, num_supernodes=3)
    assert Path(command[0]).name == "flwr" and command[1:4] == ["run", str(PROJECT), "--stream"]
    assert command[4:] == [
        "--run-config",
        'epochs=2 method="wm"',
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1",
    ]
    command = flwr_run_command({}, 8, client_cpus=2.0, client_gpus=0.25, project=Path("/elsewhere"))
    assert command[2] == "/elsewhere"
    assert command[-1] == "num-supernodes=8 client-resources-num-cpus=2 client-resources-num-gpus=0.25"


# --- results-row columns a sweep reads ---


def row_settings(**overrides):
    return settings_from_run_config({"width": 32, "per-class": 3, "seed": 5, **overrides}, num_clients=2)


def test_results_row_has_round_accuracies_cache_hits_and_peak_memory():
    settings = row_settings()
    model = template_model(settings)
    metrics = [
        {"train-seconds": 2.0, "cached": 1, "peak-rss-mb": 300.0},
        {"train-seconds": 4.0, "cached": 1, "peak-rss-mb": 500.0},
    ]
    updates = [ClientUpdate(k, k, model.state_dict(), 10, None, metrics[k]) for k in range(2)]
    outcome = RunOutcome(model, updates, [], 0.25, {2: 61.234, 1: 50.004})
    table = {"merged": {"global": 55.556}}
    row = results_row(DEFAULT_RUN_CONFIG, 0, 2, outcome, table, 3.0)
    assert (row["acc_round1_global"], row["acc_round2_global"], row["acc_merged_global"]) == (50.0, 61.23, 55.56)
    assert [k for k in row if k.startswith("acc_round")] == ["acc_round1_global", "acc_round2_global"]
    assert row["clients-cached"] == 2 and row["client-max_peak-rss-mb"] == 500.0
    assert row["client-mean_train-seconds"] == 3.0 and row["client-max_train-seconds"] == 4.0
    assert math.isnan(row["client-mean_surrogate-seconds"]) and math.isnan(row["client-max_surrogate-seconds"])
    assert row["server-peak-rss-mb"] > 0 and row["server-peak-gpu-mb"] >= 0

    bare = results_row(DEFAULT_RUN_CONFIG, 0, 2, RunOutcome(model, [], [], 0.0), table, 1.0)
    assert bare["clients-cached"] == 0 and math.isnan(bare["client-max_peak-rss-mb"])
    assert not any(k.startswith("acc_round") for k in bare)


def test_surrogate_trained_model():
    settings = row_settings()
    template = template_model(settings)
    before = {k: v.clone() for k, v in template.state_dict().items()}
    no_surrogates = [ClientUpdate(k, k, template.state_dict(), 10) for k in range(2)]
    assert surrogate_trained_model(settings, template, no_surrogates) is None

    parts = []
    for k in range(2):
        data = client_train_data(settings.federation, k)
        parts.append(LabeledImages(data.x[:12], data.y[:12], data.num_classes, f"client {k} surrogate"))
    updates = [ClientUpdate(k, k, template.state_dict(), 10, parts[k]) for k in range(2)] + no_surrogates[:1]
    model = surrogate_trained_model(settings, template, updates)
    again = surrogate_trained_model(settings, template, updates)
    assert model is not None and model is not template
    assert all(torch.equal(template.state_dict()[k], v) for k, v in before.items())  # the template is left alone
    assert all(torch.equal(model.state_dict()[k], again.state_dict()[k]) for k in before)  # seeded
    union = LabeledImages(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), 10, "union")
    assert evaluate(model, union) > 80  # 50 epochs fit two dozen images


# ---------------------------------------------------------------------------------------------- the Flower backend


def test_flower_backend_reads_the_row_the_server_app_wrote_and_passes_cpus_and_locations(tmp_path, monkeypatch):
    calls = []

    def fake_flwr_run(config, num_supernodes, flwr_home, log_path, timeout, cwd=None, client_cpus=1.0, client_gpus=0.0):
        calls.append((config, num_supernodes, flwr_home, client_cpus))
        save_rows(Path(config["results-dir"]) / "runs.csv", [{"acc_merged_global": 81.5, "merge-seconds": 1.0}])
        return True

    monkeypatch.setattr(sweep, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(sweep, "stop_superlinks", lambda home: None)
    run = PlannedRun.make(DEFAULT_RUN_CONFIG | {"method": "wm"}, 3, "flower", client_cpus=2.0)
    options = SweepOptions(tmp_path / "out", data_root="/data")
    row = sweep.execute(run, options)
    config, supernodes, flwr_home, cpus = calls[0]
    assert (supernodes, cpus, flwr_home) == (3, 2.0, (tmp_path / "out" / "flwr-home").resolve())
    assert (
        config["client-cache"] == str((tmp_path / "out" / "client-cache").resolve()) and config["data-root"] == "/data"
    )
    assert Path(config["results-dir"]) == (tmp_path / "out" / "runs" / run.key).resolve()
    assert row["acc_merged_global"] == 81.5 and row["run-key"] == run.key and row["sweep-client-cpus"] == 2.0


def test_flower_backend_failure_names_the_log_and_shows_its_tail(tmp_path, monkeypatch):
    def failing_flwr_run(config, num_supernodes, flwr_home, log_path, timeout, **kwargs):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("starting\nValueError: run config 'alpha' must be > 0\n")
        return True  # flwr run --stream exits 0 even when the run failed

    monkeypatch.setattr(sweep, "flwr_run", failing_flwr_run)
    run = PlannedRun.make(dict(DEFAULT_RUN_CONFIG), 2, "flower")
    with pytest.raises(RuntimeError, match=r"(?s)left no results row.*logs.*alpha' must be > 0"):
        sweep.execute(run, SweepOptions(tmp_path))
