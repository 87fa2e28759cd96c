"""The N-client pipeline: the ``universe`` schedule, ``merge_models``, post-merge distillation in the strategy,
multi-round starts from the global model, the recipe baselines and the sweep variants."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch

from fedmerge.align.permute import apply_permutation, random_perms
from fedmerge.data.images import LabeledImages, concat
from fedmerge.merge import MergeConfig, NPConfig, STEConfig
from fedmerge.merge.distill import DistillConfig
from fedmerge.merge.functional import load_state
from fedmerge.merge.many import merge_models
from fedmerge.merge.methods import MERGE_METHODS
from fedmerge.models import MLP
from simulations.config import settings_from_run_config
from simulations.sweep import PlannedRun, SweepGrid, plan
from strategies import PermutationMerge, SortedFedAvg
from strategies.messages import read_reply
from strategies.parallel import SequentialRunner
from strategies.schedule import run_schedule
from tests.test_strategies import NUM_CLASSES, nodes_of, reply, small_mlp

N_MODEL_METHODS = [name for name, m in MERGE_METHODS.items() if m.merge_many is not None]


def _fast(method: str, alignment: str = "merge-many") -> MergeConfig:
    return MergeConfig(
        method=method,  # type: ignore[arg-type]
        alignment=alignment,  # type: ignore[arg-type]
        ste=STEConfig(steps=3, batch_size=16),
        np=NPConfig(steps=3, batch_size=16),
    )


@pytest.mark.parametrize("alignment", ["merge-many", "c2m3"])
@pytest.mark.parametrize("method", [m for m in N_MODEL_METHODS if m != "average"])
def test_merging_permuted_copies_of_one_model_at_once_gives_that_model(method, alignment):
    model = MLP((1, 8, 8), width=16).eval()
    spec, base = model.permutation_spec(), model.state_dict()
    generator = torch.Generator().manual_seed(1)
    copies = [apply_permutation(spec, random_perms(spec, base, generator), base) for _ in range(4)]
    data = LabeledImages(torch.randn(24, 1, 8, 8), torch.randint(0, 10, (24,)))
    result = merge_models(model, copies, [1.0, 2.0, 3.0, 4.0], data, _fast(method, alignment))
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(load_state(model, result.state)(x), model(x), atol=1e-5, rtol=1e-5)
    assert result.method == method and len(result.perms) == 4


def test_merge_models_checks_its_inputs_and_falls_back_without_data(caplog):
    model = MLP((1, 8, 8), width=16)
    states = [small_mlp(k).state_dict() for k in range(3)]
    with pytest.raises(ValueError, match="no N-model form"):
        merge_models(model, states, [1, 1, 1], None, MergeConfig(method="am"))
    with pytest.raises(ValueError, match="one weight per model"):
        merge_models(model, states, [1, 1], None, MergeConfig(method="wm"))
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_models(model, [], [], None, MergeConfig(method="wm"))
    with caplog.at_level(logging.WARNING, logger="fedmerge"):
        result = merge_models(model, states, [1, 1, 1], None, MergeConfig(method="ste"))
    assert result.method == "wm" and any("falling back" in r.message for r in caplog.records)


@pytest.mark.parametrize("method", N_MODEL_METHODS)
def test_every_n_model_method_runs_the_universe_schedule_of_a_strategy(method):
    strategy = PermutationMerge(small_mlp(0), _fast(method), schedule="universe", runner=SequentialRunner("cpu"))
    arrays, metrics = strategy.aggregate_train(1, [reply(k, num_examples=20 + k) for k in range(3)])
    merged = arrays.to_torch_state_dict()
    assert merged.keys() == small_mlp(0).state_dict().keys()
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert [(s.method, s.members_a, s.members_b) for s in strategy.merge_steps] == [(method, (0,), (1, 2))]
    assert metrics["clients-merged"] == 3
    assert strategy.merge_only() is None  # nothing ran after the merge


def test_universe_schedule_without_a_surrogate_is_data_free_and_weighted_by_counts(caplog):
    replies = [reply(0, num_examples=10), reply(1, data=None, num_examples=30), reply(2, num_examples=60)]
    with caplog.at_level(logging.WARNING, logger="strategies"):
        merged, steps = run_schedule("universe", small_mlp(0), nodes_of(replies), _fast("ste"), SequentialRunner())
    assert steps[0].method == "wm" and merged.surrogate is None and merged.without_surrogate == (1,)
    assert merged.num_examples == 100 and steps[0].lam == pytest.approx(0.9)
    assert any("client(s) [1] sent no surrogate" in r.message for r in caplog.records)


def test_distillation_after_the_merge_moves_the_model_towards_the_ensemble():
    # Confident, disagreeing clients (weights scaled up), so that the ensemble is far from their weight average.
    states = [{k: 4 * v for k, v in small_mlp(seed).state_dict().items()} for seed in range(3)]
    replies = [reply(k, state=states[k], num_examples=30) for k in range(3)]
    recipe = DistillConfig(steps=150, lr=3e-3, batch_size=32, label_weight=0.0, mixup=0.0, shift=0)
    strategy = PermutationMerge(
        small_mlp(0), _fast("wm"), schedule="universe", runner=SequentialRunner("cpu"), distill=recipe
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    merge_only = strategy.merge_only()
    assert merge_only is not None
    distilled = load_state(small_mlp(0), arrays.to_torch_state_dict())
    plain = load_state(small_mlp(0), merge_only)
    from strategies.merge_strategy import client_ensemble

    teacher = client_ensemble(small_mlp(0), strategy.client_updates)
    data = concat([u.surrogate for u in strategy.client_updates if u.surrogate is not None])

    def kl_to_teacher(model: torch.nn.Module) -> float:
        with torch.no_grad():
            log_p, log_q = teacher(data.x), torch.log_softmax(model.eval()(data.x), dim=1)
            return float((log_p.exp() * (log_p - log_q)).sum(1).mean())

    assert kl_to_teacher(distilled) < 0.5 * kl_to_teacher(plain)


def test_clients_start_from_the_global_model_from_round_two_on():
    one_shot = PermutationMerge(small_mlp(0), _fast("wm"))
    assert [one_shot.starts_from_global(r) for r in (1, 2, 3)] == [False, True, True]
    same_init = PermutationMerge(small_mlp(0), _fast("wm"), clients_start_from_global=True)
    assert same_init.starts_from_global(1) and SortedFedAvg(NUM_CLASSES).starts_from_global(1)


def test_upload_bytes_are_recorded_for_every_round():
    strategy = PermutationMerge(small_mlp(0), _fast("average"), runner=SequentialRunner("cpu"))
    replies = [reply(k) for k in range(2)]
    for server_round in (1, 2):
        strategy.aggregate_train(server_round, replies)
    sizes = [read_reply(r, NUM_CLASSES) for r in replies]
    assert set(strategy.round_upload_bytes) == {1, 2}
    assert all(sent >= 0 for sent in strategy.round_upload_bytes.values())
    assert len(sizes) == 2


def test_run_config_keys_of_the_n_client_pipeline():
    settings = settings_from_run_config(
        {"schedule": "universe", "alignment": "c2m3", "distill-steps": 300, "distill-mixup": 0.0}, 4
    )
    assert settings.merge_config().alignment == "c2m3"
    recipe = settings.distill_config()
    assert recipe is not None and recipe.steps == 300 and recipe.mixup == 0.0
    assert settings_from_run_config({}, 4).distill_config() is None
    assert settings_from_run_config({}, 4).recipe().steps == 2000
    with pytest.raises(ValueError, match="alignment"):
        settings_from_run_config({"alignment": "zipit"}, 4)


def test_sweep_variants_name_the_schedule_and_the_distillation():
    grid = SweepGrid(
        datasets=("digits",),
        splits=("iid",),
        clients=(2,),
        methods=("wm",),
        schedules=("tree", "universe"),
        distill_steps=(0, 500),
        fedavg_rounds=0,
        merge_rounds=2,
    )
    runs, _ = plan(grid)
    assert [r.method for r in runs] == ["wm", "wm+kd500", "wm@universe", "wm@universe+kd500"]
    assert all(r.config["num-rounds"] == 2 for r in runs)
    assert len({r.key for r in runs}) == 4
    tree = PlannedRun.make(runs[0].config | {"num-rounds": 1}, 2, "flower")
    assert "schedule" not in dict(i for i in tree.items if i[0] == "x")  # keys stay the same for old rows
    with pytest.raises(ValueError, match="--set cannot change"):
        SweepGrid(overrides={"schedule": "universe"})


def test_recipe_baselines_are_scored_when_the_run_distils(tmp_path):
    from simulations.report import recipe_models
    from strategies.merge_strategy import client_ensemble

    replies = [reply(k, num_examples=30) for k in range(2)]
    updates = [read_reply(r, NUM_CLASSES) for r in replies]
    teacher = client_ensemble(small_mlp(0), updates)
    settings = settings_from_run_config({"distill-steps": 20}, 2)
    models = recipe_models(settings, small_mlp(0), updates, teacher)
    assert set(models) == {"pooled-recipe", "distilled-fresh"}
    assert recipe_models(settings_from_run_config({}, 2), small_mlp(0), updates, teacher) == {}
    data = concat([u.surrogate for u in updates if u.surrogate is not None])
    assert len(data) == 40


def test_recipe_baselines_are_taken_from_the_cache_when_their_inputs_match(tmp_path, monkeypatch):
    """A run stopped after its first reference distillation redoes only the rest: each is saved to the client cache
    and restored from it while its inputs are the same, and made again when one differs."""
    import simulations.report as report
    from strategies.merge_strategy import client_ensemble
    from tests.helpers import assert_states_equal

    updates = [read_reply(reply(k, num_examples=30), NUM_CLASSES) for k in range(2)]
    teacher = client_ensemble(small_mlp(0), updates)
    cached = settings_from_run_config({"distill-steps": 5, "client-cache": str(tmp_path)}, 2)
    restored: set[str] = set()
    first = report.recipe_models(cached, small_mlp(0), updates, teacher, restored=restored)
    assert restored == set() and len(list((tmp_path / "distilled").glob("*.pt"))) == 2

    def no_distill(*args, **kwargs):
        pytest.fail("distilled again although the cache holds the result")

    monkeypatch.setattr(report, "distill", no_distill)
    again = report.recipe_models(cached, small_mlp(0), updates, teacher, restored=restored)
    assert restored == {"pooled-recipe", "distilled-fresh"}
    for name, model in first.items():
        assert_states_equal(again[name].state_dict(), model.state_dict())
    monkeypatch.undo()

    other_teacher = client_ensemble(small_mlp(0), updates[:1])
    restored.clear()
    report.recipe_models(cached, small_mlp(0), updates, other_teacher, restored=restored)
    assert restored == {"pooled-recipe"}  # the fresh student's teacher changed; the pooled model has none
    restored.clear()
    longer = settings_from_run_config({"distill-steps": 6, "client-cache": str(tmp_path)}, 2)
    report.recipe_models(longer, small_mlp(0), updates, teacher, restored=restored)
    assert restored == set() and len(list((tmp_path / "distilled").glob("*.pt"))) == 5


def _distilled_row(n: int, merged: float, fresh: float, pooled: float, ensemble: float, fedavg: float) -> dict:
    return {
        "cfg_dataset": "mnist",
        "cfg_split": "dirichlet",
        "cfg_alpha": 0.5,
        "cfg_per-class": 1,
        "cfg_seed": 0,
        "cfg_model": "mlp",
        "cfg_epochs": 2,
        "cfg_distill-steps": 100,
        "sweep-method": "wm@universe+kd100",
        "num-clients": n,
        "acc_merged_global": merged,
        "acc_merge-only_global": 50.0,
        "acc_distilled-fresh_global": fresh,
        "acc_pooled-recipe_global": pooled,
        "acc_surrogate-trained_global": pooled - 5,
        "acc_ensemble_global": ensemble,
        "acc_fedavg1_global": fedavg,
        "acc_fedavgR_global": fedavg + 5,
        "merge-seconds": 10.0,
        "server-peak-rss-mb": 900.0,
    }


def test_n_client_report_judges_the_goals_and_writes_its_page(tmp_path):
    from simulations import n_client_report
    from simulations.results_io import save_rows

    rows = [
        _distilled_row(8, merged=93.0, fresh=92.0, pooled=70.0, ensemble=92.5, fedavg=70.0),  # all three met
        _distilled_row(16, merged=90.0, fresh=91.0, pooled=70.0, ensemble=92.0, fedavg=70.0),  # short of the ensemble
        _distilled_row(32, merged=96.0, fresh=95.0, pooled=95.5, ensemble=90.0, fedavg=60.0),  # needs pooled + 1
    ]
    save_rows(tmp_path / "runs.csv", rows + [{**rows[0], "cfg_distill-steps": 0}])  # the last one is not distilled
    runs = n_client_report.load_distilled_runs(tmp_path / "runs.csv")
    assert len(runs) == 3 and set(runs["setting"]) == {"mnist dirichlet(0.5), 1/class"}
    goals = n_client_report.goal_columns(runs.set_index("num-clients"))
    assert goals["goal met"].tolist() == ["yes", "no", "no"]
    assert goals.loc[8, "needed vs pooled"] == pytest.approx(70 + 0.75 * 22.5)
    assert goals.loc[16, "short by"] == pytest.approx(2.0)
    assert goals.loc[32, "needed vs pooled"] == pytest.approx(96.5) and goals.loc[32, "short by"] == pytest.approx(0.5)
    assert goals["merge helps (vs fresh)"].tolist() == [1.0, -1.0, 1.0]
    figure, page = n_client_report.write_report(tmp_path / "runs.csv")
    assert figure.exists() and "## mnist dirichlet(0.5), 1/class" in page.read_text()
    # a class-wise teacher run: its own pipeline, judged against the better of its two ensembles
    by_labels = {**rows[0], "cfg_ensemble-weights": "labels", "acc_ensemble-examples_global": 93.5}
    save_rows(tmp_path / "runs.csv", [by_labels])
    runs = n_client_report.load_distilled_runs(tmp_path / "runs.csv")
    assert runs["pipeline"].iloc[-1].endswith("2 epochs, teacher by labels)")
    assert "rotate" not in runs["pipeline"].iloc[-1] and "loss" not in runs["pipeline"].iloc[-1]
    save_rows(tmp_path / "runs.csv", [{**by_labels, "cfg_distill-loss": "mse"}])  # a run off the default loss
    assert ", mse loss, " in n_client_report.load_distilled_runs(tmp_path / "runs.csv")["pipeline"].iloc[-1]
    page = n_client_report.write_report(tmp_path / "runs.csv")[1].read_text()
    assert "distill-loss ['mse', nan]" in page  # older rows have no loss column: NaN, listed last
    *numbers, missing = n_client_report._distinct_values(pd.Series([3.0, float("nan"), 1.0, 3.0, float("nan")]))
    assert numbers == [1.0, 3.0] and math.isnan(missing)  # NaN kept out of the sort, once
    goals = n_client_report.goal_columns(runs.iloc[[-1]].set_index("num-clients"))
    assert goals.loc[8, "needed vs ensemble"] == 93.5 and goals.loc[8, "goal met"] == "no"
    assert goals.loc[8, "goal met, sample-weighted ensemble"] == "no"  # 93.0 < 93.5 too
    stronger_teacher = {"acc_ensemble_global": 94.0, "acc_ensemble-examples_global": 92.0}
    goals = n_client_report.goal_columns(runs.iloc[[-1]].assign(**stronger_teacher))
    assert goals["goal met"].tolist() == ["no"] and goals["goal met, sample-weighted ensemble"].tolist() == ["yes"]
    # another architecture is another setting: its rows are never averaged with the MLP's
    save_rows(tmp_path / "runs.csv", [{**row, "cfg_model": "cnn", "acc_merged_global": 50.0} for row in rows])
    runs = n_client_report.load_distilled_runs(tmp_path / "runs.csv")
    assert set(runs["setting"]) == {"mnist dirichlet(0.5), 1/class", "mnist dirichlet(0.5), 1/class, cnn"}
    assert (runs.loc[runs["setting"].str.endswith("cnn"), "acc_merged_global"] == 50.0).all()
    page = n_client_report.write_report(tmp_path / "runs.csv")[1].read_text()
    assert "models cnn, mlp" in page and "## mnist dirichlet(0.5), 1/class, cnn" in page


def test_one_shot_report_puts_ours_beside_dense_and_says_where_it_is_short(tmp_path):
    from simulations import one_shot_report
    from simulations.results_io import save_rows

    def row(dataset: str, alpha: float, seed: int, merged: float) -> dict:
        base = _distilled_row(5, merged=merged, fresh=merged - 1, pooled=60.0, ensemble=90.0, fedavg=50.0)
        return {**base, "cfg_dataset": dataset, "cfg_alpha": alpha, "cfg_seed": seed, "cfg_surrogate": "random"}

    rows = [row("mnist", 0.1, s, m) for s, m in ((0, 70.0), (1, 60.0))]  # mean 65.0: short of DENSE's 66.6
    rows += [row("mnist", 0.5, 0, 96.0), row("fashion-mnist", 0.5, 0, 86.0)]  # beat 95.8 and 85.9
    save_rows(tmp_path / "runs.csv", rows)
    figure, page = one_shot_report.write_report(tmp_path / "runs.csv")
    text = page.read_text()
    assert figure.exists() and "## mnist" in text and "## fashion-mnist" in text
    short = "short of DENSE at alpha 0.1 by 1.6 (alpha 0.3 not run; seeds per alpha 2 / 1, short alone: seed 1 at "
    short += "alpha 0.1 by 6.6)"
    assert short in text  # seed 0 (70.0) beats DENSE alone, seed 1 (60.0) does not
    fashion = "2 epochs), random 1/class: matches or beats DENSE at every alpha run (alpha 0.1, 0.3 not run)"
    assert fashion in text
    runs = one_shot_report.load_one_shot_runs(tmp_path / "runs.csv")
    pipeline = runs["pipeline"].iloc[0]
    assert pipeline.startswith("wm@universe+kd100 (")  # the method and its recipe tell pipelines apart
    ours = one_shot_report.our_rows(runs)
    assert ours.loc[("mnist", pipeline, "random 1/class", "merge + distillation"), 0.1] == 65.0
    per_seed = one_shot_report.merged_per_seed(runs)
    assert (
        one_shot_report.seeds_label(one_shot_report.seeds_of(per_seed, "mnist", pipeline, "random 1/class")) == "2 / 1"
    )
    assert (
        one_shot_report.seeds_label(one_shot_report.seeds_of(per_seed, "fashion-mnist", pipeline, "random 1/class"))
        == "1"
    )
    condensed = {"cfg_surrogate": "condensed-noise", "cfg_per-class": 1}
    assert one_shot_report.surrogate_label(pd.Series(condensed)) == "condensed-noise 1/class"
    longer = pd.Series(condensed | {"cfg_condense-iterations": 300})
    assert one_shot_report.surrogate_label(longer) == "condensed-noise 1/class, 300 networks"


def test_flower_cli_stops_nothing_of_an_unused_flower_home(tmp_path, capsys):
    from simulations.flower_cli import main

    assert main(["stop", "--flwr-home", str(tmp_path)]) == 0
    assert "none" in capsys.readouterr().out


def test_rounds_report_puts_the_merge_pipeline_next_to_fedavg_round_by_round(tmp_path):
    from simulations import rounds_report
    from simulations.results_io import save_rows

    base = {"cfg_dataset": "mnist", "cfg_seed": 0, "num-clients": 4}
    save_rows(
        tmp_path / "runs.csv",
        [
            base
            | {
                "sweep-method": "fedavg",
                "acc_round1_global": 70.0,
                "acc_round2_global": 80.0,
                "bytes-uploaded_round1": 2**20,
                "bytes-uploaded_round2": 2**21,
            },
            base
            | {
                "sweep-method": "wm@universe+kd10",
                "acc_round1_global": 85.0,
                "acc_round2_global": 88.0,
                "bytes-uploaded_round1": 2**21,
                "bytes-uploaded_round2": 2**22,
            },
        ],
    )
    figure, page = rounds_report.write_report(tmp_path / "runs.csv")
    text = page.read_text()
    assert figure.exists() and "## Merge pipeline minus FedAvg (points)" in text
    margin = rounds_report.margin_over_fedavg(rounds_report.read_rows(tmp_path / "runs.csv"))
    assert margin is not None and margin.loc[("wm@universe+kd10", 4)].tolist() == [15.0, 8.0]
    assert rounds_report.main([str(tmp_path / "runs.csv"), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "summary.md").read_text() == text


def test_performance_report_has_a_universe_section_per_method():
    import pandas as pd

    from simulations.performance_report import universe_section

    rows = pd.DataFrame(
        [
            {
                "dataset": "mnist",
                "split": "dirichlet",
                "cfg": "",
                "num-clients": n,
                "method": m,
                "way": "universe",
                "merge-seconds": n * 1.0,
                "merge-peak-rss-mb": 500.0 + n,
                "acc_merged_global": 50.0,
            }
            for n in (2, 4)
            for m in ("wm", "np")
        ]
    )
    text = "\n".join(universe_section(rows))
    assert "### mnist dirichlet" in text and "np merge (s)" in text and "wm peak RSS (MiB)" in text


def test_rounds_report_says_whether_the_merge_matched_fedavg_every_round(tmp_path):
    from simulations import rounds_report
    from simulations.results_io import save_rows

    base = {"cfg_dataset": "mnist", "cfg_seed": 0, "num-clients": 4}
    rows = [
        base | {"sweep-method": "fedavg", "acc_round1_global": 70.0, "acc_round2_global": 90.0},
        base | {"sweep-method": "wm", "acc_round1_global": 85.0, "acc_round2_global": 88.5},
    ]
    save_rows(tmp_path / "runs.csv", rows)
    _, page = rounds_report.write_report(tmp_path / "runs.csv")
    assert "missed at 1 round(s), by up to 1.50 points" in page.read_text()


# ------------------------------------------------------------------------------- class-wise (label-count) teacher


def _with_label_counts(update, counts):
    update.metrics["label-counts"] = counts
    return update


def test_label_counts_are_read_and_checked():
    from strategies.messages import reported_label_counts

    update = read_reply(reply(0, num_examples=50), NUM_CLASSES)
    assert reported_label_counts(update, NUM_CLASSES) is None  # none sent
    good = [10, 0, 0, 0, 0, 0, 0, 0, 0, 90]
    counts = reported_label_counts(_with_label_counts(update, good), NUM_CLASSES)
    torch.testing.assert_close(counts, torch.tensor(good, dtype=torch.float64))
    for bad in ([1] * 9, [1.5] + [1] * 9, [-1] + [2] * 9, [0] * 10, [float("inf")] + [1] * 9, 7):
        assert reported_label_counts(_with_label_counts(update, bad), NUM_CLASSES) is None, bad


def test_label_weighted_ensemble_uses_each_clients_class_share_and_falls_back_evenly(caplog):
    from fedmerge.merge import class_weights
    from strategies.merge_strategy import client_ensemble

    updates = [read_reply(reply(k, num_examples=100), NUM_CLASSES) for k in range(3)]
    _with_label_counts(updates[0], [100] + [0] * 9)
    _with_label_counts(updates[1], [0] * 9 + [200])  # claims 200 of its 100 counted examples: scaled to 100
    with caplog.at_level(logging.WARNING):
        ensemble = client_ensemble(small_mlp(0), updates, "labels")
    assert "client 2" in caplog.text and "label-counts" in caplog.text
    single = [r.getMessage() for r in caplog.records if "one class only" in r.getMessage()]
    assert len(single) == 1 and "client 0 " in single[0] and "client 1 " in single[0] and "client 2" not in single[0]
    expected = class_weights(torch.tensor([[100.0] + [0.0] * 9, [0.0] * 9 + [100.0], [10.0] * 10]))
    torch.testing.assert_close(ensemble.weights, expected)
    assert client_ensemble(small_mlp(0), updates).weights.dim() == 1  # by examples: one weight per client
    with pytest.raises(ValueError, match="ensemble weighting"):
        client_ensemble(small_mlp(0), updates, "votes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ensemble weighting"):
        PermutationMerge(small_mlp(0), ensemble_weighting="votes")  # type: ignore[arg-type]


def test_ensemble_weights_run_config_reaches_the_strategy_and_the_report(tmp_path):
    from simulations.server_app import make_strategy

    settings = settings_from_run_config({"ensemble-weights": "labels", "distill-steps": 5}, 2)
    strategy = make_strategy(settings, small_mlp(0), 2)
    assert isinstance(strategy, PermutationMerge) and strategy.ensemble_weighting == "labels"
    with pytest.raises(ValueError, match="ensemble-weights"):
        settings_from_run_config({"ensemble-weights": "votes"}, 2)


def test_n_client_overview_picks_the_best_complete_pipeline_per_judged_setting(tmp_path):
    from simulations import n_client_report
    from simulations.results_io import save_rows

    def rows(steps: int, merged: float, clients: tuple[int, ...]) -> list[dict]:
        return [
            {
                **_distilled_row(n, merged, merged - 1, 70.0, 95.0, 70.0),
                "cfg_distill-steps": steps,
                "sweep-method": f"wm@universe+kd{steps}",
            }
            for n in clients
        ]

    weaker, stronger = rows(100, 90.0, (8, 16, 32)), rows(200, 94.0, (8, 16, 32))
    incomplete = rows(300, 99.0, (8, 16))  # best figures, but not run at 32 clients
    one_seed = rows(400, 98.0, (8, 16, 32))  # better, but over one seed where the others have two
    off_grid = [{**r, "cfg_alpha": 0.1} for r in rows(100, 80.0, (8, 16, 32))]  # not a judged split
    second_seed = [{**r, "cfg_seed": 1} for r in weaker + stronger]
    save_rows(tmp_path / "runs.csv", weaker + stronger + second_seed + incomplete + one_seed + off_grid)
    runs = n_client_report.load_distilled_runs(tmp_path / "runs.csv")
    judged = runs[runs["setting"] == "mnist dirichlet(0.5), 1/class"]
    assert n_client_report.best_pipeline(judged).startswith("wm@universe+kd200")
    overview = n_client_report.goal_overview(runs)
    assert overview.count("wm@universe+kd200") == 3 and "dirichlet(0.1)" not in overview
    assert "kd300" not in overview and "kd400" not in overview
    _, page = n_client_report.write_report(tmp_path / "runs.csv")
    assert "## The one-round goal: the best pipeline per setting" in page.read_text()


def test_n_client_overview_judges_against_the_best_pooled_recipe_on_the_same_clients(tmp_path):
    from simulations import n_client_report
    from simulations.results_io import save_rows

    distilled = {**_distilled_row(8, 96.0, 95.0, 90.0, 95.5, 60.0), "cfg_distill-steps": 100}
    tuned_for_pooled = {**distilled, "cfg_distill-steps": 200, "sweep-method": "wm@universe+kd200"}
    tuned_for_pooled |= {"acc_merged_global": 94.0, "acc_pooled-recipe_global": 95.5}  # worse merge, better pool
    other_clients = {**tuned_for_pooled, "cfg_epochs": 10, "acc_pooled-recipe_global": 99.0}  # not the same clients
    rows = [{**r, "num-clients": n} for n in (8, 16, 32) for r in (distilled, tuned_for_pooled, other_clients)]
    save_rows(tmp_path / "runs.csv", rows)
    overview = n_client_report.goal_overview(n_client_report.load_distilled_runs(tmp_path / "runs.csv"))
    line = next(x for x in overview.splitlines() if "|         8 |" in x)
    assert "wm@universe+kd100" in line  # the best merged pipeline is judged ...
    cells = [c.strip() for c in line.split("|")]
    assert "90" in cells and "95.5" in cells and "96.5" in cells  # ... against the best pooled (95.5) + 1 = 96.5
    assert "0.5" in cells and "no" in cells


def test_the_overview_shows_the_central_model_of_the_same_data_recipe_and_seeds(tmp_path):
    from simulations import n_client_report
    from simulations.central import CENTRAL_KEYS, RESULT_COLUMN
    from simulations.config import DEFAULT_RUN_CONFIG
    from simulations.results_io import save_rows

    sweep_csv = tmp_path / "sweep" / "runs.csv"
    seeds = [{**_distilled_row(n, 96.0, 95.0, 90.0, 95.5, 60.0), "cfg_seed": s} for n in (8, 16, 32) for s in (0, 1)]
    save_rows(sweep_csv, [*seeds, {**seeds[0], "cfg_seed": 2, "num-clients": 2}])  # seed 2: no central model
    recipe = {f"cfg_{key}": DEFAULT_RUN_CONFIG[key] for key in CENTRAL_KEYS} | {"cfg_dataset": "mnist", "cfg_epochs": 2}
    central = [
        {**recipe, "cfg_seed": 0, "cfg_width": 0.0, RESULT_COLUMN: 98.0},  # width as a float: still the same model
        {**recipe, "cfg_seed": 1, RESULT_COLUMN: 97.0},
        {**recipe, "cfg_seed": 0, "cfg_epochs": 10, RESULT_COLUMN: 99.9},  # another recipe: never joined
    ]
    save_rows(n_client_report.central_csv_beside(sweep_csv), central)
    runs = n_client_report.load_distilled_runs(sweep_csv)
    joined = n_client_report.with_central(runs, n_client_report.central_csv_beside(sweep_csv))
    by_seed = joined.groupby("cfg_seed")[n_client_report.CENTRAL].agg(["min", "max"])
    assert by_seed.loc[0].tolist() == [98.0, 98.0] and by_seed.loc[1].tolist() == [97.0, 97.0]
    assert joined[joined["cfg_seed"] == 2][n_client_report.CENTRAL].isna().all()
    header, _, first = n_client_report.goal_overview(joined).splitlines()[:3]
    assert "central (all data)" in header and "97.5" in [c.strip() for c in first.split("|")]  # mean of seeds 0, 1
    assert "central (all data)" not in n_client_report.goal_overview(runs.assign(**{n_client_report.CENTRAL: None}))
    missing = n_client_report.with_central(runs, tmp_path / "none.csv")
    assert missing[n_client_report.CENTRAL].isna().all()


def test_recipes_that_differ_only_in_temperature_mixup_or_rate_are_separate_pipelines(tmp_path):
    from simulations import n_client_report
    from simulations.results_io import save_rows

    base = _distilled_row(8, 90.0, 89.0, 70.0, 95.0, 70.0)
    variants = [{}, {"cfg_distill-temperature": 4.0}, {"cfg_distill-mixup": 0.2}, {"cfg_distill-lr": 0.01}]
    save_rows(tmp_path / "runs.csv", [base | {"cfg_distill-temperature": 1.0} | v for v in variants])
    pipelines = n_client_report.load_distilled_runs(tmp_path / "runs.csv")["pipeline"].tolist()
    assert len(set(pipelines)) == 4
    assert pipelines[0] == "wm@universe+kd100 (shift 2, labels x1, bank 0, alignment passes 100, 2 epochs)"
    assert ", temperature 4," in pipelines[1] and ", mixup 0.2," in pipelines[2] and ", lr 0.01," in pipelines[3]
