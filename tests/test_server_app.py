"""The ServerApp's pieces in-process: strategy choice, scoring, the results row and the saved files."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from simulations.config import DEFAULT_RUN_CONFIG, settings_from_run_config
from simulations.report import RunOutcome, results_row, save_outputs, score_models
from simulations.server_app import make_strategy, template_model
from strategies import PermutationMerge, RayRunner, SequentialRunner, SortedFedAvg
from strategies.messages import ClientUpdate


def settings(**overrides):
    return settings_from_run_config(overrides, num_clients=2)


def test_make_strategy_follows_the_run_config():
    merge = make_strategy(
        settings(method="wm", schedule="all-to-one", **{"merge-workers": 0}), template_model(settings()), 2
    )
    assert isinstance(merge, PermutationMerge) and isinstance(merge.runner, SequentialRunner)
    assert (merge.merge.method, merge.schedule, merge.min_available_nodes, merge.num_classes) == (
        "wm",
        "all-to-one",
        2,
        10,
    )
    assert isinstance(make_strategy(settings(), template_model(settings()), 2).runner, RayRunner)
    assert isinstance(make_strategy(settings(strategy="fedavg"), template_model(settings()), 2), SortedFedAvg)


def test_template_model_is_seeded_by_the_run_seed():
    a, b, c = template_model(settings(seed=1)), template_model(settings(seed=1)), template_model(settings(seed=2))
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)


@pytest.fixture
def outcome() -> RunOutcome:
    run = settings(width=32)
    clients = [template_model(settings(width=32, seed=s)) for s in (10, 11)]
    updates = [
        ClientUpdate(k, 100 + k, m.state_dict(), 50 * (k + 1), None, {"train-seconds": 2.0 * (k + 1)})
        for k, m in enumerate(clients)
    ]
    return RunOutcome(template_model(run), updates, [("node 9", "failed")], 1.5)


def test_scores_and_results_row_cover_every_model_and_client(outcome):
    table = score_models(settings(width=32), outcome)
    assert list(table) == ["merged", "client0", "client1", "ensemble"]
    assert list(table["merged"]) == ["global", "client0", "client1", "clients-mean"]
    assert all(0.0 <= acc <= 100.0 for accs in table.values() for acc in accs.values())
    row = results_row(DEFAULT_RUN_CONFIG | {"width": 32}, 7, 3, outcome, table, 12.0)
    assert (row["run-id"], row["num-clients"], row["clients-merged"], row["clients-left-out"]) == (7, 3, 2, 1)
    assert row["left-out"] == "node 9: failed" and row["cfg_width"] == 32 and row["cfg_method"] == "ste"
    assert row["acc_ensemble_clients-mean"] == round(table["ensemble"]["clients-mean"], 2)
    assert row["client-mean_train-seconds"] == 3.0 and row["merge-seconds"] == 1.5
    assert "version_torch" in row and "version_flwr" in row
    assert row["references-cached"] == 0
    assert results_row(DEFAULT_RUN_CONFIG, 7, 3, outcome, table, 12.0, references_cached=2)["references-cached"] == 2


def test_a_label_weighted_run_scores_its_teacher_and_the_sample_weighted_ensemble(outcome):
    for k, update in enumerate(outcome.updates):  # client k knows only its half of the classes
        update.metrics["label-counts"] = [10 if c // 5 == k else 0 for c in range(10)]
    table = score_models(settings(width=32, **{"ensemble-weights": "labels"}), outcome)
    assert list(table) == ["merged", "client0", "client1", "ensemble", "ensemble-examples"]
    assert table["ensemble-examples"] == score_models(settings(width=32), outcome)["ensemble"]


def test_save_outputs_appends_rows_and_saves_each_model(outcome, tmp_path):
    run = settings(width=32, **{"results-dir": str(tmp_path / "out")})
    table = score_models(run, outcome)
    for run_id in (1, 2):
        row = results_row(DEFAULT_RUN_CONFIG, run_id, 2, outcome, table, 1.0)
        csv_path, model_path = save_outputs(run, DEFAULT_RUN_CONFIG, row, outcome)
        assert model_path.exists() and model_path.parent == tmp_path / "out" / "models"
    rows = pd.read_csv(csv_path)
    assert list(rows["run-id"]) == [1, 2] and rows["model-file"].nunique() == 2
    saved = torch.load(rows["model-file"].iloc[0], weights_only=False)
    assert torch.equal(saved["state_dict"]["head.weight"], outcome.model.state_dict()["head.weight"])


def test_in_process_runs_report_the_clients_the_defences_leave_out(monkeypatch):
    """The in-process backend's outcome (and so its results row) names the clients the defences left out, round by
    round, as the Flower ServerApp's does."""
    from simulations import in_process
    from strategies import fedavg
    from strategies.defences import DefenceReport

    def two_updates(settings, num_clients, server_round, start, want_surrogate):
        state = template_model(settings).state_dict()
        return [ClientUpdate(k, k, {n: t.clone() for n, t in state.items()}, 10 + k) for k in range(2)]

    def leave_out_client_1(updates, *args, **kwargs):
        return DefenceReport([updates[0]], left_out=[("client 1 (node 1)", "its surrogate fails the check")])

    monkeypatch.setattr(in_process, "client_updates", two_updates)
    monkeypatch.setattr(fedavg, "apply_defences", leave_out_client_1)
    outcome = in_process.federate_in_process(
        settings(method="average", **{"merge-workers": 0, "num-rounds": 2}), num_clients=2
    )
    assert outcome.left_out == [("client 1 (node 1)", "its surrogate fails the check")]  # this round's, not summed
    assert [u.partition_id for u in outcome.updates] == [0]


def test_in_process_runs_leave_out_a_diverged_client_as_flower_does(monkeypatch, caplog):
    """A client whose training diverged (NaN weights) is left out by the same checks as a Flower reply, instead of
    ending the merge with an error; with no usable client at all the global model stays as it was."""
    from simulations import in_process

    def updates_with_nan(settings, num_clients, server_round, start, want_surrogate):
        state = template_model(settings).state_dict()
        updates = [ClientUpdate(k, k, {n: t.clone() for n, t in state.items()}, 10 + k) for k in range(3)]
        first = next(iter(state))
        updates[2].state[first] = torch.full_like(state[first], float("nan"))
        return updates

    monkeypatch.setattr(in_process, "client_updates", updates_with_nan)
    with caplog.at_level(logging.WARNING):
        outcome = in_process.federate_in_process(settings(method="average", **{"merge-workers": 0}), 3)
    assert [u.partition_id for u in outcome.updates] == [0, 1]
    assert len(outcome.left_out) == 1 and "NaN" in outcome.left_out[0][1] and "client 2" in caplog.text
    assert all(torch.isfinite(t).all() for t in outcome.model.state_dict().values())

    def only_nan(settings, num_clients, server_round, start, want_surrogate):
        return updates_with_nan(settings, num_clients, server_round, start, want_surrogate)[2:]

    monkeypatch.setattr(in_process, "client_updates", only_nan)
    with caplog.at_level(logging.WARNING):
        outcome = in_process.federate_in_process(settings(method="average", **{"merge-workers": 0}), 3)
    assert outcome.updates == [] and "no usable client update" in caplog.text
