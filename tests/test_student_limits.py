"""Where the distilled student stops: the pipeline's fresh student beside a richer transfer set and a wider student."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from simulations import student_limits

RECIPE = ["epochs=3", "width=16", "batch-size=32", "per-class=2", "distill-steps=300", "distill-bank=512"]


def run(tmp_path: Path, *extra: str) -> pd.DataFrame:
    args = ["--dataset", "digits", "--clients", "2", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]
    assert student_limits.main([*args, "--real-images", "64", "--width-factor", "2", *extra, "--set", *RECIPE]) == 0
    return pd.read_csv(tmp_path / "runs.csv")


def test_three_students_of_one_teacher_each_with_its_transfer_set_and_width(tmp_path: Path):
    rows = run(tmp_path).set_index("variant")
    assert list(rows.index) == list(student_limits.VARIANTS)
    assert rows.loc["real-images", "transfer-images"] == 64
    surrogates = rows.loc["surrogates", "transfer-images"]
    assert surrogates == rows.loc["wide-student", "transfer-images"] and 0 < surrogates <= 2 * 2 * 10  # 2 per class
    base, wide = rows.loc["surrogates", "student-parameters"], rows.loc["wide-student", "student-parameters"]
    assert wide > 1.8 * base  # twice the hidden units: nearly twice the weights (the input layer dominates)
    assert rows["acc_teacher_global"].nunique() == 1  # one teacher for all three
    assert ((rows["acc_student_global"] > 30) & (rows["agreement_test"] > 30)).all()  # learnt from it (chance: 10)
    assert {"cfg_epochs", "cfg_distill-steps", "distill-seconds", "version_torch"} <= set(rows.columns)
    summary = (tmp_path / "summary.md").read_text()
    assert "| wide-student" in summary and "distillation steps" in summary  # each row says its budget


def test_a_rerun_keeps_finished_rows_and_trains_nothing_again(tmp_path: Path):
    first = run(tmp_path, "--variants", "surrogates")
    again = run(tmp_path, "--variants", "surrogates", "real-images")
    assert again.iloc[:1].equals(first) and again["variant"].tolist() == ["surrogates", "real-images"]


def test_bad_input_is_refused_with_its_name(tmp_path: Path):
    with pytest.raises(ValueError, match="distill-steps"):
        student_limits.main(["--dataset", "digits", "--clients", "2", "--out", str(tmp_path), "--set", "epochs=1"])
    with pytest.raises(ValueError, match="width-factor"):
        run(tmp_path, "--width-factor", "0.5")
    with pytest.raises(ValueError, match="real-images"):
        run(tmp_path, "--real-images", "0")


def test_the_summary_gives_each_model_its_own_table():
    row = {
        "cfg_dataset": "fashion-mnist",
        "cfg_split": "dirichlet",
        "cfg_alpha": 0.5,
        "num-clients": 8,
        "cfg_per-class": 1,
        "cfg_seed": 0,
        "variant": "surrogates",
        "cfg_distill-steps": 3000,
        "cfg_distill-bank": 49152,
        "transfer-images": 69,
        "student-parameters": 1000,
        "acc_student_global": 85.0,
        "acc_teacher_global": 86.0,
        "agreement_test": 95.0,
        "distill-seconds": 10.0,
    }
    runs = pd.DataFrame([row | {"cfg_model": "mlp"}, row | {"cfg_model": "cnn", "acc_teacher_global": 89.0}])
    page = student_limits.summary_markdown(runs)
    assert "1/class, mlp, seed 0" in page and "1/class, cnn, seed 0" in page
    assert page.count("| surrogates") == 2  # one row in each table, not two rows of one
