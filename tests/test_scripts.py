"""The command-line demo and the benchmark scripts, run end to end at toy sizes."""

from __future__ import annotations

import pandas as pd
import pytest

from fedmerge import demo
from simulations import ste_speed, table2
from simulations.results_io import save_rows
from tests.helpers import SHARED, needs_shared


def test_demo_runs_on_embedded_digits_and_prints_every_method(capsys):
    demo.main(["--epochs", "2", "--width", "32", "--ste-steps", "3", "--np-steps", "3", "--per-class", "2"])
    out = capsys.readouterr().out
    for label in (
        "client A",
        "client B",
        "ensemble",
        "average",
        "WM",
        "AM",
        "STE",
        "NP",
        "STE+NP",
        "STE + fine-tune",
        "train on surrogate",
    ):
        assert f"│ {label} " in out
    assert "classes of A" in out and "global" in out


def test_demo_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="nope"):
        demo.main(["--dataset", "nope"])


def test_ste_speed_measures_both_projections(tmp_path):
    ste_speed.main(
        [
            "--models",
            "mlp",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--epochs",
            "1",
            "--per-class",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    frame = pd.read_csv(tmp_path / "ste_speed.csv")
    assert set(frame["projection"]) == {"warm", "full"}
    assert (frame["steps_per_second"] > 0).all()
    assert "speed-up" in (tmp_path / "ste_speed.md").read_text()


def fake_table2_rows() -> pd.DataFrame:
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for pair in ("MNIST-RMNIST90", "USPS-MNIST"):
            for label, acc, surrogate in (
                ("Model A", 50.0, ""),
                ("WM", 70.0, ""),
                ("NP (coreset 10/class)", 80.0, "condensed"),
            ):
                rows.append(
                    {
                        "pair": pair,
                        "seed": seed,
                        "label": label,
                        "acc_mixed": acc + shift,
                        "seconds": acc / 10 + seed,
                        "train_seconds": 40.0 + seed,
                        "surrogate": surrogate,
                        "surrogate_seconds": 100.0 if surrogate else 0.0,
                    }
                )
    return pd.DataFrame(rows)


def test_table2_markdown_puts_our_mean_and_std_next_to_the_paper():
    text = table2.markdown_table(fake_table2_rows(), ["MNIST-RMNIST90", "USPS-MNIST"])
    lines = text.splitlines()
    assert lines[0].startswith("| method | MNIST-RMNIST90 (ours) | MNIST-RMNIST90 (paper)")
    wm = next(line for line in lines if line.startswith("| WM |"))
    assert wm == "| WM | 71.0 ± 1.4 | 70.9 | 71.0 ± 1.4 | 84.2 |"
    np_row = next(line for line in lines if line.startswith("| NP"))
    assert np_row.endswith("| 81.0 ± 1.4 | – |")  # not in the paper


def test_table2_wall_times_average_over_seeds_and_add_setup_rows():
    text = table2.wall_time_table(fake_table2_rows(), ["MNIST-RMNIST90", "USPS-MNIST"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in text.splitlines()[2:]}
    assert rows["WM"] == ["7.5", "7.5"]
    assert rows["(training both clients)"] == ["40.5", "40.5"]
    assert [float(v) for v in rows["(condensing both clients)"]] == [100.0, 100.0]


def test_table2_plot_is_written(tmp_path):
    path = tmp_path / "table2.png"
    table2.plot_table2(fake_table2_rows(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table2_rejects_unknown_method_labels():
    with pytest.raises(SystemExit):
        table2.parse_args(["--methods", "STE (coreset)"])


@pytest.mark.slow
@needs_shared
@pytest.mark.usefixtures("tmp_cache")
def test_table2_runs_on_real_data_and_resumes_without_redoing_rows(tmp_path, monkeypatch):
    common = ["--data-root", str(SHARED), "--pairs", "USPS-MNIST", "--epochs", "1", "--out", str(tmp_path)]
    args = [*common, "--ste-steps", "2", "--methods", "Model A", "WM", "STE (coreset 10/class)"]
    table2.main(args)
    frame = pd.read_csv(tmp_path / "table2.csv")
    assert list(frame["label"]) == ["Model A", "WM", "STE (coreset 10/class)"]
    assert frame["acc_mixed"].between(10, 100).all() and (frame["ste_steps"] == 2).all()
    assert "| WM |" in (tmp_path / "table2.md").read_text() and (tmp_path / "table2.png").exists()

    def fail(*_args, **_kwargs):
        raise AssertionError("finished rows were run again")

    monkeypatch.setattr(table2, "run_pair", fail)
    table2.main(args)  # same settings: nothing to do
    assert len(pd.read_csv(tmp_path / "table2.csv")) == 3
    monkeypatch.undo()
    table2.main([*common, "--ste-steps", "3", "--methods", "Model A"])  # new settings: a new row
    frame = pd.read_csv(tmp_path / "table2.csv")
    assert len(frame) == 4 and list(frame["ste_steps"]) == [2, 2, 2, 3]


def test_table2_rows_are_saved_by_column_name_whatever_their_order(tmp_path):
    path = tmp_path / "rows.csv"
    save_rows(path, [{"pair": "p", "seed": 0, "acc_mixed": 50.0}])
    save_rows(path, [{"acc_mixed": 60.0, "seed": 1, "pair": "p", "extra": "x"}])
    frame = pd.read_csv(path)
    assert list(frame["seed"]) == [0, 1] and list(frame["acc_mixed"]) == [50.0, 60.0]
    assert frame["extra"].isna().tolist() == [True, False]


def test_table2_keeps_old_rows_when_rows_with_new_settings_are_added(tmp_path):
    args = table2.parse_args(["--out", str(tmp_path)])
    old = {"pair": "USPS-MNIST", "seed": 0, "label": "WM", "acc_mixed": 80.0, **table2.run_config(args)}
    recipe = {**old, "label": "Coreset AB", "recipe_steps": 2000}
    stale = {**old, "label": "Coreset AB", "recipe_steps": 10}
    save_rows(tmp_path / "table2.csv", [old])
    save_rows(tmp_path / "table2.csv", [recipe, stale])
    configs = {m.label: table2.method_config(args, m) for m in table2.METHOD_RUNS}
    frame = table2.finished_rows(tmp_path / "table2.csv", configs)
    assert list(frame["label"]) == ["WM", "Coreset AB"] and list(frame["recipe_steps"].fillna(0)) == [0, 2000]
    assert "recipe_steps" not in table2.method_config(args, table2.METHOD_RUNS[0])


def test_table2_has_the_papers_figure_for_every_new_row_and_column():
    for label in ("Model AB", "Data Cond AB", "Coreset AB", "OT", "OT (tuned)", "ZipIt!"):
        assert label in {m.label for m in table2.METHOD_RUNS}
        assert all(table2.PAPER[label][pair] is not None for pair in table2.PAIRS)
    assert list(table2.PAIRS) == ["MNIST-RMNIST90", "USPS-MNIST", table2.SPLIT_CIFAR, "MNIST-FMNIST"]


@needs_shared
@pytest.mark.usefixtures("tmp_cache")
def test_split_cifar10_gives_each_client_five_classes_of_the_subset():
    train = table2.pair_data(table2.SPLIT_CIFAR, True, SHARED)
    test = table2.pair_data(table2.SPLIT_CIFAR, False, SHARED)
    assert [sorted(d.y.unique().tolist()) for d in train] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert sum(len(d) for d in train) == 4000 and sum(len(d) for d in test) == 1000
    assert train[0].image_shape == (3, 32, 32)


@needs_shared
@pytest.mark.usefixtures("tmp_cache")
def test_surrogate_size_runs_on_tiny_settings_and_resumes(tmp_path, monkeypatch):
    from simulations import surrogate_size

    args = ["--data-root", str(SHARED), "--pairs", table2.SPLIT_CIFAR, "--per-class", "1", "2", "--epochs", "1"]
    args += ["--ste-steps", "2", "--recipe-steps", "3", "--max-train", "100", "--out", str(tmp_path)]
    surrogate_size.main(args)
    frame = pd.read_csv(tmp_path / "surrogate_size.csv")
    assert len(frame) == 2 * len(surrogate_size.RUNS)
    assert set(frame["per_class"]) == {1, 2} and (frame["surrogate_images"] == 10 * frame["per_class"]).all()
    assert {"seconds", "seed", "torch", "recipe_steps", "ste_steps"} <= set(frame.columns)
    text = (tmp_path / "surrogate_size.md").read_text()
    assert "| STE (coreset) (paper, full CIFAR-10) | 61.1 | 75.1 |" not in text  # only the sizes that ran
    assert "| Coreset AB (paper, full CIFAR-10) | 19.3 | – |" in text
    assert (tmp_path / "surrogate_size.png").exists()

    def fail(*_args, **_kwargs):
        raise AssertionError("finished rows were run again")

    monkeypatch.setattr(surrogate_size, "run_pair", fail)
    surrogate_size.main(args)
    assert len(pd.read_csv(tmp_path / "surrogate_size.csv")) == 2 * len(surrogate_size.RUNS)
