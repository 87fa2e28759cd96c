"""The reports made from benchmark results: a sweep's plots and summary (``simulations.sweep_report``), the
performance report (``simulations.performance_report``) and the merge-time scaling benchmark
(``simulations.merge_scaling``). The reports read synthetic CSVs with the columns a real sweep row has
(``report.results_row`` + ``sweep.execute`` + ``sweep.with_fedavg_baselines``), with values checkable by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from simulations import merge_scaling, performance_report, sweep_report
from simulations.performance_report import (
    backend_label,
    wall_time_parts,
    write_performance_report,
)
from simulations.results_io import save_rows
from simulations.sweep_report import accuracy_table, goal_table, load_runs, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def markdown_cells(table: str) -> dict[tuple[str, str], str]:
    """A markdown table (pandas ``to_markdown``) as {(first cell of the row, column name): cell text}."""
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = {}
    for line in lines[2:]:  # after the header and the |---| line
        values = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(values) == len(header), line
        cells |= {(values[0], column): value for column, value in zip(header, values, strict=True)}
    return cells


def markdown_rows(table: str) -> list[dict[str, str]]:
    """A markdown table without index as a list of {column name: cell text}."""
    lines = [line for line in table.strip().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


# --- synthetic sweep rows -------------------------------------------------------------------------------------------


def sweep_row(
    method: str,
    n: int,
    seed: int,
    merged: float,
    *,
    split: str = "dirichlet",
    alpha: float = 0.5,
    surrogate: str = "random",
    per_class: int = 10,
    backend: str = "flower",
    clients: list[float] | None = None,
    ensemble: float = 80.0,
    fedavg1: float = 50.0,
    trained: float = 60.0,
    rounds: int = 3,
    merge_seconds: float = 1.0,
) -> dict:
    """A sweep row with the columns the reports read, named as ``results_row`` + ``execute`` +
    ``with_fedavg_baselines`` name them."""
    fedavg = method == "fedavg"
    clients = clients if clients is not None else [40.0 + 5 * k for k in range(n)]
    row = {
        "finished": "2026-01-01T00:00:00+00:00",
        "run-id": 1,
        "cfg_dataset": "mnist",
        "cfg_split": split,
        "cfg_alpha": alpha,
        "cfg_model": "mlp",
        "cfg_epochs": 2,
        "cfg_surrogate": surrogate,
        "cfg_per-class": per_class,
        "cfg_strategy": "fedavg" if fedavg else "merge",
        "cfg_method": "ste" if fedavg else method,
        "cfg_schedule": "tree",
        "cfg_ste-steps": 30,
        "cfg_num-rounds": rounds if fedavg else 1,
        "cfg_seed": seed,
        "num-clients": n,
        "clients-merged": n,
        "clients-left-out": 0,
        "left-out": "",
        "acc_merged_global": merged,
        **{f"acc_client{k}_global": acc for k, acc in enumerate(clients)},
        "acc_ensemble_global": ensemble,
        "acc_round1_global": fedavg1 if fedavg else merged,
        "client-mean_train-seconds": 2.0,
        "client-mean_surrogate-seconds": 0.0 if fedavg else 0.5,
        "client-mean_weights-bytes": 2048.0,
        "client-mean_surrogate-bytes": 0.0 if fedavg else 1024.0,
        "client-max_peak-rss-mb": 700.0,
        "merge-seconds": 0.0 if fedavg else merge_seconds,
        "wall-seconds": 9.0,
        "server-peak-rss-mb": 900.0,
        "server-peak-gpu-mb": 0.0,
        "run-key": f"{method}{n}{seed}{split}{surrogate}{backend}",
        "sweep-backend": backend,
        "sweep-client-cpus": 1.0,
        "sweep-method": method,
        "sweep-seconds": 20.0,
        "fedavg-rounds": rounds,
        "acc_fedavg1_global": fedavg1,
        "acc_fedavgR_global": merged if fedavg else 55.0,
    }
    if not fedavg:  # FedAvg rows have no train-on-surrogates baseline (empty in the CSV)
        row["acc_surrogate-trained_global"] = trained
    return row


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Through ``save_rows``, the writer sweeps use: rows with other client counts leave other columns empty."""
    for row in rows:
        save_rows(path, [row])
    return path


def two_setting_sweep() -> list[dict]:
    """Two seeds of a dirichlet(0.5) and a disjoint federation at N=2 and N=8, one surrogate, plus an in-process row.

    At N=8 (means over seeds): dirichlet: FedAvg-1 50, ensemble 80 (thresholds 70 and 72): wm 75 meets the goal,
    ste 71 misses the ensemble share. Disjoint: FedAvg-1 60, ensemble 70 (thresholds 80 and 63): wm 78 misses
    FedAvg + 20, ste 80 (exactly FedAvg-1 + 20) meets it.
    """
    rows = []
    for seed in (0, 1):
        d = 1 if seed else -1  # seed 1 is `d` above the mean, seed 0 below
        rows += [
            sweep_row("fedavg", 2, seed, 70.0 + 5 * d, clients=[40.0, 60.0], ensemble=70.0 + 2 * d),
            sweep_row("wm", 2, seed, 85.0 + 5 * d, clients=[40.0, 60.0], ensemble=70.0 + 2 * d, trained=60.0 + d),
            sweep_row("ste", 2, seed, 65.0, clients=[40.0, 60.0], ensemble=70.0 + 2 * d, trained=60.0 + d),
            sweep_row("fedavg", 8, seed, 66.0, fedavg1=50.0),
            sweep_row("wm", 8, seed, 75.0 + d, fedavg1=50.0, ensemble=80.0, merge_seconds=4.0),
            sweep_row("ste", 8, seed, 71.0 + d, fedavg1=50.0, ensemble=80.0, merge_seconds=8.0),
            sweep_row("fedavg", 8, seed, 70.0, split="disjoint", fedavg1=60.0, ensemble=70.0),
            sweep_row("wm", 8, seed, 78.0 + d, split="disjoint", fedavg1=60.0, ensemble=70.0),
            sweep_row("ste", 8, seed, 80.0 + d, split="disjoint", fedavg1=60.0, ensemble=70.0),
        ]
    rows.append(sweep_row("wm", 2, 0, 11.0, backend="in-process", clients=[40.0, 60.0]))
    return rows


@pytest.fixture
def sweep_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "sweep" / "runs.csv", two_setting_sweep())


# --- sweep_report.load_runs -----------------------------------------------------------------------------------------


def test_load_runs_keeps_the_backend_and_adds_setting_method_and_client_mean(sweep_csv):
    runs = load_runs(sweep_csv)
    assert len(runs) == 18 and set(runs["sweep-backend"]) == {"flower"}
    assert set(runs["setting"]) == {"mnist dirichlet(0.5)", "mnist disjoint"}
    assert set(runs["method"]) == {"fedavg-3rounds", "wm", "ste"}  # one surrogate swept: no suffix
    assert (runs.loc[runs["sweep-method"] == "fedavg", "method"] == "fedavg-3rounds").all()
    two = runs[runs["num-clients"] == 2]
    assert (two["client-mean_global"] == 50.0).all()  # (40 + 60) / 2; the empty client2..7 columns are skipped
    eight = runs[runs["num-clients"] == 8]
    assert (eight["client-mean_global"] == 57.5).all()  # 40, 45, ..., 75

    in_process = load_runs(sweep_csv, backend="in-process")
    assert len(in_process) == 1 and in_process["acc_merged_global"].tolist() == [11.0]
    assert in_process["setting"].tolist() == ["mnist dirichlet(0.5)"] and in_process["method"].tolist() == ["wm"]


def test_load_runs_formats_alpha_and_counts_fedavg_rounds(tmp_path):
    csv = write_csv(
        tmp_path / "runs.csv",
        [sweep_row("fedavg", 2, 0, 70.0, alpha=1.0, rounds=5), sweep_row("average", 2, 0, 60.0, alpha=1.0, rounds=5)],
    )
    runs = load_runs(csv)
    assert runs["setting"].tolist() == ["mnist dirichlet(1)"] * 2
    assert runs["method"].tolist() == ["fedavg-5rounds", "average"]


def test_load_runs_without_a_backend_column_keeps_every_row(tmp_path):
    rows = [sweep_row("wm", 2, 0, 60.0, split="iid"), sweep_row("wm", 2, 1, 62.0, split="iid")]
    csv = tmp_path / "runs.csv"
    pd.DataFrame(rows).drop(columns="sweep-backend").to_csv(csv, index=False)
    runs = load_runs(csv)
    assert len(runs) == 2 and set(runs["setting"]) == {"mnist iid"}


def test_load_runs_names_the_surrogate_when_several_were_swept(tmp_path):
    rows = [sweep_row("fedavg", 2, 0, 70.0)]
    rows += [
        sweep_row(m, 2, 0, 60.0, surrogate=s, per_class=k)
        for m in ("wm", "ste")
        for s, k in (("random", 10), ("herding", 5))
    ]
    runs = load_runs(write_csv(tmp_path / "runs.csv", rows))
    assert runs["method"].tolist() == [
        "fedavg-3rounds",
        "wm random:10",
        "wm herding:5",
        "ste random:10",
        "ste herding:5",
    ]


def test_load_runs_without_rows_of_the_backend_raises(sweep_csv):
    with pytest.raises(ValueError, match="no rows run by backend 'simulated'"):
        load_runs(sweep_csv, backend="simulated")


# --- sweep_report tables --------------------------------------------------------------------------------------------


def test_accuracy_table_means_over_seeds_with_std(sweep_csv):
    runs = load_runs(sweep_csv)
    cells = markdown_cells(accuracy_table(runs, "mnist dirichlet(0.5)"))
    std5 = f"{math.sqrt(50):.1f}"  # sample std of (x - 5, x + 5) = 7.1
    assert cells["2", "wm"] == f"85.0 ± {std5}" and cells["2", "fedavg-3rounds"] == f"70.0 ± {std5}"
    assert cells["2", "ste"] == "65.0"  # no spread: no ±
    assert cells["8", "wm"] == f"75.0 ± {math.sqrt(2):.1f}" and cells["8", "ste"] == "71.0 ± 1.4"
    assert cells["8", "fedavg-3rounds"] == "66.0"
    # baselines: once per federation (client count and seed), from the merge rows
    assert cells["2", "ensemble"] == f"70.0 ± {math.sqrt(8):.1f}" and cells["8", "ensemble"] == "80.0"
    # a column without any "±" is all numbers, which tabulate re-formats ("50.0" shows as "50")
    assert float(cells["2", "FedAvg, 1 round"]) == 50.0 and float(cells["8", "FedAvg, 1 round"]) == 50.0
    assert cells["2", "trained on surrogates"] == "60.0 ± 1.4"
    assert float(cells["2", "clients (mean)"]) == 50.0 and cells["8", "clients (mean)"] == "57.5"
    assert {row for row, _ in cells} == {"2", "8"}

    disjoint = markdown_cells(accuracy_table(runs, "mnist disjoint"))
    assert {row for row, _ in disjoint} == {"8"}
    assert disjoint["8", "ste"] == "80.0 ± 1.4" and float(disjoint["8", "FedAvg, 1 round"]) == 60.0


def test_goal_table_needs_both_fedavg_plus_20_and_90_percent_of_the_ensemble(sweep_csv):
    rows = markdown_rows(goal_table(load_runs(sweep_csv)))
    got = {(r["setting"], r["method"]): r for r in rows}
    assert set(got) == {(s, m) for s in ("mnist dirichlet(0.5)", "mnist disjoint") for m in ("ste", "wm")}  # no FedAvg
    dirichlet_wm = got["mnist dirichlet(0.5)", "wm"]
    assert float(dirichlet_wm["merged"]) == 75.0 and float(dirichlet_wm["FedAvg 1 round"]) == 50.0
    assert float(dirichlet_wm["ensemble"]) == 80.0
    assert float(dirichlet_wm["FedAvg-1 + 20"]) == 70.0 and float(dirichlet_wm["90% of ensemble"]) == 72.0
    assert dirichlet_wm["goal met"] == "yes"
    assert got["mnist dirichlet(0.5)", "ste"]["goal met"] == "no"  # 71 >= 70 but < 72
    assert got["mnist disjoint", "wm"]["goal met"] == "no"  # 78 >= 63 but < 80
    assert float(got["mnist disjoint", "ste"]["merged"]) == 80.0
    assert got["mnist disjoint", "ste"]["goal met"] == "yes"  # exactly FedAvg-1 + 20 counts


def test_goal_table_without_runs_at_8_clients(sweep_csv):
    runs = load_runs(sweep_csv)
    assert goal_table(runs[runs["num-clients"] == 2]) == "No run with 8 clients."
    assert goal_table(runs, n=4) == "No run with 4 clients."
    # FedAvg rows at N=8 alone are no merge run
    only_fedavg = runs[(runs["sweep-method"] == "fedavg") | (runs["num-clients"] == 2)]
    assert goal_table(only_fedavg) == "No run with 8 clients."


# --- sweep_report.write_report and main -----------------------------------------------------------------------------


def test_write_report_writes_the_plots_and_the_summary(sweep_csv, tmp_path):
    out = tmp_path / "report"
    paths = write_report(sweep_csv, out)
    assert paths == [out / "accuracy_vs_clients.png", out / "merge_time_vs_clients.png", out / "summary.md"]
    for png in paths[:2]:
        assert_png(png)
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Sweep summary")
    assert "18 runs: datasets mnist; client counts 2, 8; seeds 0, 1; model mlp, 2 local epochs" in summary
    assert "![accuracy_vs_clients](accuracy_vs_clients.png)" in summary
    assert "![merge_time_vs_clients](merge_time_vs_clients.png)" in summary
    for setting in ("mnist dirichlet(0.5)", "mnist disjoint"):
        assert f"## {setting}\n" in summary
        assert accuracy_table(load_runs(sweep_csv), setting) in summary
    goal = summary.split("## Goal at N=8", 1)[1].split("## Costs", 1)[0]
    assert goal_table(load_runs(sweep_csv)) in goal
    assert [r["goal met"] for r in markdown_rows(goal.split("\n\n", 2)[2])] == [
        "no",
        "yes",
        "yes",
        "no",
    ]  # ste, wm per setting
    assert "## Costs (mean per run)" in summary
    assert not (sweep_csv.parent / "summary.md").exists()  # --out given: nothing next to the CSV


def test_write_report_defaults_to_the_csv_folder_and_skips_merge_time_without_merges(tmp_path):
    csv = write_csv(tmp_path / "runs.csv", [sweep_row("fedavg", 2, 0, 70.0), sweep_row("fedavg", 4, 0, 72.0)])
    paths = write_report(csv)
    assert paths == [tmp_path / "accuracy_vs_clients.png", tmp_path / "summary.md"]
    assert_png(paths[0])
    assert not (tmp_path / "merge_time_vs_clients.png").exists()
    assert "No run with 8 clients." in paths[1].read_text()


def test_main(sweep_csv, tmp_path, capsys):
    assert sweep_report.main([str(tmp_path / "missing.csv")]) == 2
    assert "error:" in capsys.readouterr().err
    assert sweep_report.main([str(sweep_csv), "--backend", "simulated"]) == 2
    assert "no rows run by backend" in capsys.readouterr().err
    assert sweep_report.main([str(sweep_csv), "--out", str(tmp_path / "o"), "--backend", "in-process"]) == 0
    assert f"wrote {tmp_path / 'o' / 'summary.md'}" in capsys.readouterr().out
    assert "1 runs:" in (tmp_path / "o" / "summary.md").read_text()


# --- performance_report ---------------------------------------------------------------------------------------------


def overhead_rows() -> list[dict]:
    """The same N=4 run in-process, through Flower with 2 clients at once (1 CPU each) and with 1 at once (2 CPUs):
    2 s training and 0.5 s surrogate per client, 3 s merging."""
    base = {
        "num-clients": 4,
        "client-mean_train-seconds": 2.0,
        "client-mean_surrogate-seconds": 0.5,
        "merge-seconds": 3.0,
        "sweep-method": "wm",
        "server-peak-rss-mb": 900.0,
        "client-max_peak-rss-mb": 700.0,
    }
    return [
        base | {"sweep-backend": "in-process", "sweep-client-cpus": 1.0, "sweep-seconds": 20.0},
        base | {"sweep-backend": "flower", "sweep-client-cpus": 1.0, "sweep-seconds": 30.0},
        base | {"sweep-backend": "flower", "sweep-client-cpus": 2.0, "sweep-seconds": 10.0},
        base | {"sweep-backend": "flower", "sweep-client-cpus": float("nan"), "sweep-seconds": 30.0},
    ]


def test_wall_time_parts():
    parts = wall_time_parts(pd.DataFrame(overhead_rows()))
    assert list(parts.columns) == ["train", "surrogate", "merge", "other"]
    assert parts["train"].tolist() == [8.0, 4.0, 8.0, 4.0]  # 2 s x 4 clients, halved when 2 ran at once
    assert parts["surrogate"].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert parts["merge"].tolist() == [3.0] * 4
    assert parts["other"].tolist() == [7.0, 22.0, 0.0, 22.0]  # 10 - 13 < 0 is clipped to 0


def test_backend_label():
    labels = backend_label(pd.DataFrame(overhead_rows())).tolist()
    assert labels == [
        "in-process",
        "Flower, 2 client(s) at once",
        "Flower, 1 client(s) at once",
        "Flower, 2 client(s) at once",
    ]
    half = pd.DataFrame({"sweep-backend": ["flower"], "sweep-client-cpus": [0.5]})
    assert backend_label(half).tolist() == ["Flower, 4 client(s) at once"]


def scaling_rows() -> list[dict]:
    rows = []
    for n, (parallel, sequential, to_one) in {2: (1.0, 2.0, 3.0), 4: (2.0, 5.0, 6.0)}.items():
        for way, seconds in (("tree, parallel", parallel), ("tree, sequential", sequential), ("all-to-one", to_one)):
            rows.append(
                {
                    "dataset": "digits",
                    "split": "dirichlet",
                    "num-clients": n,
                    "method": "wm",
                    "way": way,
                    "workers": 2 if way == "tree, parallel" else 1,
                    "merge-seconds": seconds,
                    "acc_merged_global": 30.0 + n,
                    "peak-rss-mb": 800.0,
                    "cfg": "epochs=1",
                }
            )
    return rows


def test_performance_report_with_only_the_merge_scaling(tmp_path):
    results = tmp_path / "results"
    write_csv(results / "merge_scaling.csv", scaling_rows())
    path = write_performance_report(results)
    assert path == results / "performance.md"
    text = path.read_text()
    assert text.startswith("# Performance") and "## Merge time against client count" in text
    assert "### wm, digits dirichlet epochs=1 (seconds; merged accuracy % in the second table)" in text
    assert "## Flower + Ray overhead" not in text and "## Peak memory" not in text
    assert not (results / "overhead.png").exists()
    seconds, accuracy = text.split("### wm", 1)[1].split("\n\n")[1:3]
    cells = markdown_cells(seconds)
    assert cells["2", "parallel speed-up"] == "2" and cells["4", "parallel speed-up"] == "2.5"
    assert cells["4", "all-to-one"] == "6" and cells["2", "tree, sequential"] == "2"
    assert markdown_cells(accuracy)["4", "tree, parallel"] == "34"


def test_performance_report_with_overhead_and_sweep_but_no_scaling(tmp_path):
    results = tmp_path / "results"
    write_csv(results / "overhead" / "runs.csv", overhead_rows()[:3])
    sweep = [
        sweep_row("wm", 2, 0, 60.0),
        sweep_row("wm", 2, 1, 60.0) | {"server-peak-rss-mb": 950.0},
        sweep_row("fedavg", 2, 0, 60.0),
    ]
    write_csv(results / "sweep" / "runs.csv", sweep)
    text = write_performance_report(results).read_text()
    assert "## Merge time against client count" not in text
    assert "## Flower + Ray overhead" in text and "![overhead](overhead.png)" in text
    assert_png(results / "overhead.png")
    overhead = {
        (r["num-clients"], r["backend"]): r
        for r in markdown_rows(text.split("## Flower + Ray overhead", 1)[1].split("\n\n")[2])
    }
    in_process, two_at_once = overhead["4", "in-process"], overhead["4", "Flower, 2 client(s) at once"]
    assert in_process["wall (s)"] == "20" and in_process["everything else"] == "7"
    assert two_at_once["client training"] == "4" and two_at_once["everything else"] == "22"
    assert overhead["4", "Flower, 1 client(s) at once"]["everything else"] == "0"
    memory = {
        (r["sweep-method"], r["num-clients"]): r
        for r in markdown_rows(text.split("## Peak memory", 1)[1].split("\n\n")[2])
    }
    assert memory["wm", "2"]["server peak RSS (MiB)"] == "950"  # the maximum over runs
    assert memory["fedavg", "2"]["client peak RSS (MiB)"] == "700"


def test_performance_report_without_inputs(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run the benchmarks first"):
        write_performance_report(tmp_path)
    assert not (tmp_path / "performance.md").exists()
    assert performance_report.main(["--results", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


# --- merge_scaling --------------------------------------------------------------------------------------------------


@pytest.fixture
def ray_cleanup():
    import ray

    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.usefixtures("tmp_cache", "ray_cleanup")
def test_merge_scaling_times_each_way_and_resumes(tmp_path, monkeypatch):
    args = [
        "--dataset",
        "digits",
        "--clients",
        "2",
        "--methods",
        "wm",
        "--set",
        "epochs=1",
        "--workers",
        "1",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert merge_scaling.main(args) == 0
    csv = tmp_path / "out" / "merge_scaling.csv"
    rows = pd.read_csv(csv)
    assert rows["way"].tolist() == ["tree, parallel", "tree, sequential", "all-to-one"]
    assert (rows["num-clients"] == 2).all() and (rows["method"] == "wm").all() and (rows["cfg"] == "epochs=1").all()
    assert (rows["dataset"] == "digits").all() and rows["workers"].tolist() == [1, 1, 1]
    assert (rows["merge-seconds"] >= 0).all() and (rows["peak-rss-mb"] > 0).all()
    by_way = rows.set_index("way")["acc_merged_global"]
    assert by_way["tree, parallel"] == by_way["tree, sequential"]  # the same tree, run by Ray or in this process
    assert by_way.min() >= 0 and by_way.max() <= 100
    assert_png(tmp_path / "out" / "merge_scaling.png")
    assert any((tmp_path / "cache").iterdir())  # the clients were trained into the cache

    def no_clients(*_):
        raise AssertionError("a resumed benchmark loaded clients again")

    monkeypatch.setattr(merge_scaling, "client_nodes", no_clients)
    assert merge_scaling.main(args) == 0
    assert pd.read_csv(csv).equals(rows)


class _NoRay:
    def __init__(self, workers: int) -> None:
        self.workers = workers

    def start(self) -> None:
        pass


def test_merge_scaling_resumes_without_overrides(tmp_path, monkeypatch):
    out = tmp_path / "out"
    done = [row | {"cfg": ""} for row in scaling_rows() if row["num-clients"] == 2]
    save_rows(out / "merge_scaling.csv", done)  # what a finished run without --set wrote
    monkeypatch.setattr(merge_scaling, "RayRunner", _NoRay)

    def no_clients(*_):
        raise AssertionError("a resumed benchmark loaded clients again")

    monkeypatch.setattr(merge_scaling, "client_nodes", no_clients)
    assert (
        merge_scaling.main(
            [
                "--dataset",
                "digits",
                "--clients",
                "2",
                "--methods",
                "wm",
                "--workers",
                "2",
                "--cache",
                str(tmp_path / "cache"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(pd.read_csv(out / "merge_scaling.csv")) == 3
