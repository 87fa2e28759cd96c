"""Defences against hostile clients (strategies.defences): each rule on a small fixed federation of independently
trained MLPs on Dirichlet parts of digits, the strategies applying them, and their run-config keys."""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd
import pytest
import torch

from fedmerge.data.images import LabeledImages
from fedmerge.federation import FederationSpec, client_train_data
from fedmerge.merge import MergeConfig, weighted_average
from fedmerge.models import build_model, reinitialized_copy
from fedmerge.surrogate.coreset import random_coreset
from fedmerge.train import TrainConfig, train
from simulations.config import DEFAULT_RUN_CONFIG, settings_from_run_config
from simulations.server_app import make_strategy, template_model
from strategies import PermutationMerge, SequentialRunner, SortedFedAvg, client_reply
from strategies.defences import (
    Defences,
    Predictions,
    apply_defences,
    cap_counts,
    model_outliers,
    norm_outliers,
    predictions,
    surrogate_outliers,
)
from strategies.messages import ClientUpdate
from tests.helpers import flower_message

NUM_CLIENTS, WIDTH, NUM_CLASSES = 5, 32, 10
HOSTILE = 2
NAME = f"client {HOSTILE} (node {100 + HOSTILE})"


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 28, 28), NUM_CLASSES, width=WIDTH)


def federation(split: str, seed: int = 1) -> list[ClientUpdate]:
    """Honest clients: MLPs initialised from their own seeds, trained on their own part of digits, each sending a
    random 5-per-class surrogate of its data."""
    spec = FederationSpec("digits", split, num_clients=NUM_CLIENTS, alpha=0.5, seed=seed)
    updates = []
    for k in range(NUM_CLIENTS):
        data = client_train_data(spec, k)
        model = train(mlp(10 + k), data, TrainConfig(epochs=15, lr=0.05, batch_size=32), seed=k)
        state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        updates.append(ClientUpdate(k, 100 + k, state, len(data), random_coreset(data, 5, seed=k)))
    return updates


@pytest.fixture(scope="module")
def honest() -> list[ClientUpdate]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return federation("dirichlet")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def template() -> torch.nn.Module:
    return mlp(0)


def with_hostile(updates: list[ClientUpdate], **changes) -> list[ClientUpdate]:
    """``updates`` with client HOSTILE's fields replaced (the others unchanged)."""
    return [dataclasses.replace(u, **changes) if u.partition_id == HOSTILE else u for u in updates]


def scaled(state: dict, factor: float) -> dict:
    return {k: v * factor for k, v in state.items()}


def shifted(data: LabeledImages) -> LabeledImages:
    return LabeledImages(data.x, (data.y + 1) % NUM_CLASSES, NUM_CLASSES)


def noise(data: LabeledImages) -> LabeledImages:
    return LabeledImages(torch.randn(data.x.shape, generator=torch.Generator().manual_seed(0)), data.y, NUM_CLASSES)


def left_out_names(report) -> list[str]:
    return [who for who, _ in report.left_out]


# ---------------------------------------------------------------------------------------------- honest clients


def test_honest_non_iid_clients_all_pass(honest, template, caplog):
    with caplog.at_level(logging.INFO, logger="strategies"):
        report = apply_defences(honest, Defences(max_share_ratio=0), template)
    assert not report.left_out and not report.clipped and not report.surrogates_dropped and not report.skipped
    assert report.updates == honest  # nothing copied or changed
    assert "defences: all 5 client(s) passed" in caplog.text
    # with the default share cap, the largest honest client (more than 1.25 x an equal share here) is clipped to
    # that share, not left out
    report = apply_defences(honest, Defences(), template)
    counts = [u.num_examples for u in report.updates]
    assert not report.left_out and len(report.updates) == len(honest)
    assert max(counts) / sum(counts) <= 1.25 / len(honest) + 1e-3


def test_honest_norms_stay_close_to_the_median(honest):
    kept, left_out = norm_outliers(honest, max_ratio=2.0)
    assert kept == honest and not left_out


# -------------------------------------------------------------------------------------------------- norm check


@pytest.mark.parametrize(
    ("hostile_state", "message"),
    [
        (lambda s: scaled(s, 100.0), "its tensors' L2 norms are typically"),
        (lambda s: s | {"head.weight": s["head.weight"] * 1000}, "the L2 norm of its head.weight is"),
    ],
    ids=["all-x100", "head-x1000"],
)
def test_norm_check_leaves_out_scaled_weights(honest, hostile_state, message, caplog):
    updates = with_hostile(honest, state=hostile_state(honest[HOSTILE].state))
    with caplog.at_level(logging.WARNING, logger="strategies"):
        kept, left_out = norm_outliers(updates)
    assert [who for who, _ in left_out] == [NAME] and message in left_out[0][1]
    assert [u.partition_id for u in kept] == [0, 1, 3, 4]
    assert f"leaving out {NAME}: {message}" in caplog.text


def test_gaussian_weights_are_left_out(honest, template):
    state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in honest[0].state.items()}
    report = apply_defences(with_hostile(honest, state=state), Defences(), template)
    assert left_out_names(report) == [NAME]


def test_norm_check_needs_three_clients(honest, caplog):
    two = with_hostile(honest, state=scaled(honest[HOSTILE].state, 100.0))[1:3]
    skipped: list[str] = []
    with caplog.at_level(logging.INFO, logger="strategies"):
        kept, left_out = norm_outliers(two, skipped=skipped)
    assert kept == two and not left_out
    assert skipped == ["norm check skipped: 2 client(s), it needs at least 3"]
    assert "norm check skipped: 2 client(s)" in caplog.text


# ------------------------------------------------------------------------------------------------- model check


def test_model_check_leaves_out_random_weights(honest, template, caplog):
    """A freshly initialised model: trained-looking norms (the norm check is off here), chance-level answers."""
    updates = with_hostile(honest, state=reinitialized_copy(template, 99).state_dict())
    with caplog.at_level(logging.WARNING, logger="strategies"):
        kept, left_out = model_outliers(updates, predictions(template, updates))
    assert [who for who, _ in left_out] == [NAME] and "its weights are suspect" in left_out[0][1]
    assert len(kept) == NUM_CLIENTS - 1
    report = apply_defences(updates, Defences(norm_outlier_ratio=0), template)
    assert left_out_names(report) == [NAME]
    assert NAME in caplog.text


def test_model_check_judges_a_specialist_only_on_the_classes_it_trained_on(honest, template):
    """An honest client that saw two classes answers the others' surrogates of other classes wrongly; judged on
    its own classes (from its label counts, else its surrogate's labels) it passes, random weights still fail."""
    spec = FederationSpec("digits", "dirichlet", num_clients=NUM_CLIENTS, alpha=0.5, seed=1)
    data = client_train_data(spec, HOSTILE)
    keep = torch.isin(data.y, torch.tensor([0, 1]))
    two = LabeledImages(data.x[keep], data.y[keep], NUM_CLASSES)
    model = train(mlp(7), two, TrainConfig(epochs=15, lr=0.05, batch_size=32), seed=7)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    counts = {"label-counts": two.class_counts().tolist()}
    for metrics in ({}, counts):  # classes from the surrogate's labels, then from the reported counts
        specialist = with_hostile(honest, state=state, surrogate=random_coreset(two, 5, seed=7), metrics=metrics)
        kept, left_out = model_outliers(specialist, predictions(template, specialist))
        assert not left_out and len(kept) == NUM_CLIENTS
    claims_two = with_hostile(honest, state=reinitialized_copy(template, 99).state_dict(), metrics=counts)
    _, left_out = model_outliers(claims_two, predictions(template, claims_two))
    assert [who for who, _ in left_out] == [NAME]


# --------------------------------------------------------------------------------------------- surrogate check


@pytest.mark.parametrize("bad", [shifted, noise], ids=["shifted-labels", "noise-images"])
def test_surrogate_check_flags_shifted_labels_and_noise_images(honest, template, bad, caplog):
    updates = with_hostile(honest, surrogate=bad(honest[HOSTILE].surrogate))
    with caplog.at_level(logging.WARNING, logger="strategies"):
        passed, flagged = surrogate_outliers(updates, predictions(template, updates))
    assert [who for who, _ in flagged] == [NAME] and len(passed) == NUM_CLIENTS - 1
    assert f"the surrogate of {NAME} fails the check" in caplog.text


def _one_hot_predictions(correct: dict[tuple[int, int], int], clients: int = 5, labels: int = 10) -> Predictions:
    """Predictions where model j gets the first ``correct[(j, k)]`` of surrogate k's labels right (default 9)."""
    y = {k: torch.arange(labels) % NUM_CLASSES for k in range(clients)}
    probs = {}
    for j in range(clients):
        for k in range(clients):
            right = correct.get((j, k), 9)
            guess = torch.where(torch.arange(labels) < right, y[k], (y[k] + 1) % NUM_CLASSES)
            probs[(j, k)] = torch.nn.functional.one_hot(guess, NUM_CLASSES).double()
    return Predictions(probs, y, NUM_CLASSES)


def test_surrogate_check_does_not_judge_a_small_shortfall_on_ten_labels():
    """1 image per class: an honest own-model score of 4/10 against a 50 % threshold is within the noise of 10
    labels (not flagged); 0/10 is not."""
    updates = [
        ClientUpdate(k, 100 + k, {}, 10, LabeledImages(torch.zeros(10, 1, 2, 2), torch.arange(10), 10))
        for k in range(5)
    ]
    _, flagged = surrogate_outliers(updates, _one_hot_predictions({(0, 0): 4}))
    assert not flagged
    _, flagged = surrogate_outliers(updates, _one_hot_predictions({(0, 0): 0}))
    assert [who for who, _ in flagged] == ["client 0 (node 100)"]


def test_a_flagged_surrogate_leaves_the_client_out_or_only_its_surrogate(honest, template):
    updates = with_hostile(honest, surrogate=shifted(honest[HOSTILE].surrogate))
    report = apply_defences(updates, Defences(), template)
    assert left_out_names(report) == [NAME] and "its surrogate fails the check" in report.left_out[0][1]
    assert [u.partition_id for u in report.updates] == [0, 1, 3, 4]
    dropped = apply_defences(updates, Defences(surrogate_check="drop-surrogate"), template)
    assert not dropped.left_out and [who for who, _ in dropped.surrogates_dropped] == [NAME]
    assert [u.surrogate is None for u in dropped.updates] == [k == HOSTILE for k in range(NUM_CLIENTS)]
    assert updates[HOSTILE].surrogate is not None  # the input is not changed


def test_on_disjoint_classes_only_each_clients_own_model_judges_its_surrogate(template):
    """The others cannot vouch for classes they never saw (that score is skipped), its own model still can."""
    updates = federation("disjoint", seed=2)
    report = apply_defences(updates, Defences(), template)
    assert not report.left_out and any("by the other clients' models skipped" in s for s in report.skipped)
    hostile = with_hostile(updates, surrogate=shifted(updates[HOSTILE].surrogate))
    report = apply_defences(hostile, Defences(), template)
    assert left_out_names(report) == [NAME] and "its own model agrees" in report.left_out[0][1]


# ---------------------------------------------------------------------------------------------------- count cap


def test_a_huge_claim_is_clipped_to_its_share(honest, caplog):
    updates = with_hostile(honest, num_examples=10**9)
    with caplog.at_level(logging.WARNING, logger="strategies"):
        capped, clipped = cap_counts(updates)
    others = sorted(u.num_examples for u in honest if u.partition_id != HOSTILE)
    median = (others[1] + others[2]) / 2
    assert capped[HOSTILE].num_examples == int(3 * median)
    assert [who for who, _ in clipped] == [NAME] and "reported 1000000000 examples" in clipped[0][1]
    assert [u.num_examples for u in capped if u.partition_id != HOSTILE] == others_in_order(honest)
    assert updates[HOSTILE].num_examples == 10**9  # a copy was clipped
    assert f"clipping the sample count of {NAME}" in caplog.text
    share = capped[HOSTILE].num_examples / sum(u.num_examples for u in capped)
    assert share < 0.45


def others_in_order(updates: list[ClientUpdate]) -> list[int]:
    return [u.num_examples for u in updates if u.partition_id != HOSTILE]


def test_the_weight_share_cap_fills_up_to_the_share():
    updates = [ClientUpdate(k, k, {}, n) for k, n in enumerate([100, 100, 100, 10**9])]
    capped, clipped = cap_counts(updates, max_count_ratio=0, max_weight_share=0.4)
    assert [u.num_examples for u in capped] == [100, 100, 100, 200]  # 200 / 500 = 0.4
    assert len(clipped) == 1
    honest = [ClientUpdate(k, k, {}, n) for k, n in enumerate([10, 30, 60])]
    assert cap_counts(honest)[0] == honest  # 60 is not above 3 x the others' median (20)


def test_two_clients_are_not_judged(honest, template, caplog):
    updates = [ClientUpdate(0, 0, {}, 10), ClientUpdate(1, 1, {}, 10**9)]
    assert cap_counts(updates)[0] == updates
    two = with_hostile(honest, state=scaled(honest[HOSTILE].state, 100.0), num_examples=10**9)[1:3]
    with caplog.at_level(logging.INFO, logger="strategies"):
        report = apply_defences(two, Defences(), template)
    assert report.updates == two and report.skipped == [
        "2 client(s), fewer than 3: no client can be judged against the others"
    ]
    assert "no client can be judged" in caplog.text


def test_the_cap_still_applies_when_the_checks_leave_two_of_three(honest):
    three = with_hostile(honest[:3], num_examples=10**9)
    three[0] = dataclasses.replace(three[0], state=scaled(three[0].state, 100.0))
    report = apply_defences(three, Defences(max_share_ratio=0), None)
    assert left_out_names(report) == ["client 0 (node 100)"] and [w for w, _ in report.clipped] == [NAME]
    assert report.updates[1].num_examples == 3 * honest[1].num_examples
    report = apply_defences(three, Defences(), None)  # the share cap: 1.25 / 2 of the two clients left
    assert [w for w, _ in report.clipped] == [NAME] and report.share_ratio == 1.25
    counts = [u.num_examples for u in report.updates]
    assert counts[1] / sum(counts) <= 0.625 + 1e-3


# ------------------------------------------------------------------------------------------ switches, strategies


def test_the_defences_can_be_switched_off(honest, template):
    updates = with_hostile(honest, state=scaled(honest[HOSTILE].state, 100.0), num_examples=10**9)
    report = apply_defences(updates, Defences.off(), template)
    assert report.updates == updates and not report.left_out and not report.clipped
    partial = apply_defences(
        updates, Defences(norm_outlier_ratio=0, max_count_ratio=0, model_ratio=0, max_share_ratio=0), template
    )
    assert not partial.left_out and not partial.clipped  # x100 weights still agree with the surrogates


def test_a_defence_that_fails_is_skipped_and_the_others_still_apply(honest, caplog):
    updates = with_hostile(honest, num_examples=10**9)
    wrong = build_model("mlp", (1, 8, 8), NUM_CLASSES, width=WIDTH)  # the states do not load into it
    with caplog.at_level(logging.ERROR, logger="strategies"):
        report = apply_defences(updates, Defences(), wrong)
    assert "model / surrogate checks failed" in caplog.text and [who for who, _ in report.clipped] == [NAME]


def reply(update: ClientUpdate, partition_id: int | None = None):
    return client_reply(
        flower_message("train", dst_node_id=update.node_id),
        update.state,
        update.num_examples,
        update.partition_id if partition_id is None else partition_id,
        update.surrogate,
    )


def test_sorted_fedavg_leaves_out_and_clips_before_averaging(honest, caplog):
    updates = with_hostile(honest, num_examples=10**9)
    updates[0] = dataclasses.replace(updates[0], state=scaled(updates[0].state, 100.0))
    strategy = SortedFedAvg(NUM_CLASSES)
    with caplog.at_level(logging.WARNING, logger="strategies"):
        arrays, metrics = strategy.aggregate_train(1, [reply(u) for u in updates])
    assert [who for who, _ in strategy.left_out] == ["client 0 (node 100)"]
    assert metrics["clients-merged"] == 4 and metrics["clients-left-out"] == 1 and metrics["clients-clipped"] == 1
    kept = strategy.client_updates
    assert [u.partition_id for u in kept] == [1, 2, 3, 4] and kept[1].num_examples < 10**9
    expected = weighted_average([u.state for u in kept], [float(u.num_examples) for u in kept])
    merged = arrays.to_torch_state_dict()
    assert all(torch.allclose(merged[k], expected[k]) for k in expected)
    off = SortedFedAvg(NUM_CLASSES, defences=Defences.off())
    _, metrics = off.aggregate_train(1, [reply(u) for u in updates])
    assert metrics["clients-merged"] == 5 and not off.left_out


def test_permutation_merge_leaves_out_a_hostile_surrogate_and_duplicate_ids(honest, template):
    updates = with_hostile(honest, surrogate=shifted(honest[HOSTILE].surrogate))
    replies = [reply(u) for u in updates] + [reply(dataclasses.replace(honest[1], node_id=555))]  # claims id 1
    strategy = PermutationMerge(template, MergeConfig(method="wm"), runner=SequentialRunner("cpu"))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["clients-merged"] == 3
    reasons = dict(strategy.left_out)
    assert set(reasons) == {"client 1 (node 101)", "client 1 (node 555)", NAME}
    assert "claimed by 2 replies" in reasons["client 1 (node 555)"]
    assert "its surrogate fails the check" in reasons[NAME]


# --------------------------------------------------------------------------------------------------- run config


def test_run_config_keys_parse_into_the_strategies():
    assert settings_from_run_config({}, 3).defences == Defences()
    keys = ("defences", "max-count-ratio", "max-weight-share", "max-share-ratio", "norm-outlier-ratio")
    for key in (*keys, "surrogate-check"):
        assert key in DEFAULT_RUN_CONFIG
    overrides = {
        "defences": False,
        "max-count-ratio": 5,
        "max-weight-share": 0.5,
        "norm-outlier-ratio": 20.0,
        "model-check-ratio": 0.0,
        "surrogate-check": "drop-surrogate",
        "surrogate-check-ratio": 0.3,
        "max-share-ratio": 2.0,
    }
    settings = settings_from_run_config(overrides, 3)
    assert settings.defences == Defences(False, 5.0, 0.5, 20.0, 0.0, "drop-surrogate", 0.3, max_share_ratio=2.0)
    for strategy in ("merge", "fedavg"):
        run = settings_from_run_config(overrides | {"strategy": strategy, "merge-workers": 0}, 3)
        assert make_strategy(run, template_model(run), 3).defences == settings.defences


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("defences", 1, "'defences' must be true or false"),
        ("max-weight-share", 1.5, "'max-weight-share' must be <= 1"),
        ("max-weight-share", 0, "'max-weight-share' must be > 0"),
        ("max-share-ratio", 0.5, "'max-share-ratio' must be 0 \\(no cap\\) or >= 1"),
        ("max-count-ratio", 0.5, "'max-count-ratio' must be 0 \\(no cap\\) or >= 1"),
        ("norm-outlier-ratio", 1.0, "'norm-outlier-ratio' must be 0 \\(no check\\) or > 1"),
        ("surrogate-check", "maybe", "'surrogate-check' must be one of leave-out, drop-surrogate, off"),
        ("surrogate-check-ratio", 1.0, "'surrogate-check-ratio' must be < 1"),
    ],
)
def test_bad_defence_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        settings_from_run_config({key: value}, 3)


# ---------------------------------------------------------------------------------------------------- benchmark


def test_the_robustness_benchmark_runs_and_resumes(tmp_path):
    from simulations import robustness

    argv = [
        "--dataset",
        "digits",
        "--clients",
        "3",
        "--attacks",
        "claims-1e9",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    argv += ["--set", "epochs=2", "width=32", "method=wm"]
    assert robustness.main(argv) == 0
    rows = pd.read_csv(tmp_path / "robustness.csv")
    assert list(zip(rows["attack"], rows["defences"], strict=True)) == [
        ("clean", "off"),
        ("clean", "on"),
        ("claims-1e9", "off"),
        ("claims-1e9", "on"),
    ]
    attacked = rows.iloc[3]
    assert attacked["clipped"] == "client 1 (node 1001)" and attacked["hostile-caught"] == 1
    assert rows.iloc[2]["clipped"] != rows.iloc[2]["clipped"]  # NaN: nothing clipped without defences
    assert "version_torch" in rows and (rows["acc_clean_off"] == rows.iloc[0]["acc_merged_global"]).all()
    report = (tmp_path / "robustness.md").read_text()
    assert "| claims-1e9 |" in report and "False positives on the clean run" in report
    assert robustness.main(argv) == 0  # resumed: nothing left to run
    assert len(pd.read_csv(tmp_path / "robustness.csv")) == 4


def test_the_relative_share_cap_holds_a_huge_claim_to_its_equal_share_times_the_ratio(caplog):
    """Among 8 clients of 600 examples, a claim of 10^9 counts at most 1.25 / 8 of the round's weight, named."""
    updates = [ClientUpdate(k, k, {}, 10**9 if k == 1 else 600) for k in range(8)]
    with caplog.at_level(logging.WARNING, logger="strategies"):
        capped, clipped = cap_counts(updates, max_share_ratio=1.25)
    counts = [u.num_examples for u in capped]
    assert counts[1] / sum(counts) <= 1.25 / 8 + 1e-3 and counts[1] >= 600
    assert counts[:1] + counts[2:] == [600] * 7
    assert [who for who, _ in clipped] == ["client 1 (node 1)"] and "1.25 x an equal share" in clipped[0][1]
    assert "client 1 (node 1)" in caplog.text
    honest = [ClientUpdate(k, k, {}, n) for k, n in enumerate([500, 600, 700, 600])]  # 700 / 2400 < 1.25 / 4
    assert cap_counts(honest, max_share_ratio=1.25) == (honest, [])
    with pytest.raises(ValueError, match="max_share_ratio"):
        Defences(max_share_ratio=0.5)


class _FakeRunner:
    """Merges nothing: records each job's lambda."""

    def __init__(self) -> None:
        self.lams: list[float] = []

    def run(self, model: torch.nn.Module, jobs: list) -> list:
        from fedmerge.merge.pairwise import MergeResult

        self.lams += [job.lam for job in jobs]
        return [MergeResult(job.a.state, {}, "average", 0.0) for job in jobs]


@pytest.mark.parametrize("schedule", ["tree", "all-to-one"])
def test_no_client_holds_more_than_its_share_of_any_merge(schedule, caplog):
    """A client whose count is within the round's cap (1.25 / 8 of it) but which sits next to a small client would
    hold 70 % of its first merge by the counts: lambda is moved so that it holds at most 1.25 / m of every merge of m
    clients, and the log names it; equal counts are merged as before."""
    from strategies.schedule import MergeNode, run_schedule

    counts = [400, 1000, 600, 600, 600, 600, 600, 600]
    nodes = [MergeNode({}, (k,), n, None) for k, n in enumerate(counts)]
    model, config = torch.nn.Linear(1, 1), MergeConfig("average")
    with caplog.at_level(logging.WARNING, logger="strategies"):
        merged, steps = run_schedule(schedule, model, nodes, config, _FakeRunner(), 1.25)
    shares = dict(zip(merged.members, merged.member_shares, strict=True))
    assert abs(sum(shares.values()) - 1) < 1e-9 and max(shares.values()) <= 1.25 / 8 + 1e-9
    if schedule == "tree":
        assert steps[0].lam == pytest.approx(0.625)  # not 1000 / 1400
        assert "client 1 would hold 71.4 %" in caplog.text
    uncapped, _ = run_schedule(schedule, model, nodes, config, _FakeRunner())
    assert max(uncapped.member_shares) == pytest.approx(1000 / sum(counts))
    caplog.clear()
    equal = [MergeNode({}, (k,), 600, None) for k in range(8)]
    with caplog.at_level(logging.WARNING, logger="strategies"):
        same, _ = run_schedule(schedule, model, equal, config, _FakeRunner(), 1.25)
    assert "would hold" not in caplog.text and same.member_shares == pytest.approx([1 / 8] * 8)
