"""The centralised reference: one model trained on every training image of a dataset with the clients' recipe."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedmerge.federation import FederationSpec, client_train_data
from simulations import central
from simulations.federation_options import setting_key

ARGS = ["--datasets", "digits", "--seeds", "0", "--set", "epochs=1", "width=16", "batch-size=32"]


def test_the_central_model_sees_every_training_image_and_learns(tmp_path: Path):
    assert central.main([*ARGS, "--out", str(tmp_path)]) == 0
    rows = pd.read_csv(tmp_path / "runs.csv")
    everything = len(client_train_data(FederationSpec(dataset="digits", split="disjoint", num_clients=1), 0))
    assert rows["train-images"].tolist() == [everything]
    assert rows[central.RESULT_COLUMN].iloc[0] > 50  # ten classes: chance is 10 %
    assert {"cfg_epochs", "cfg_width", "train-seconds", "version_torch"} <= set(rows.columns)
    assert "| digits" in (tmp_path / "summary.md").read_text()


def test_finished_rows_are_kept_and_another_recipe_adds_a_row(tmp_path: Path):
    central.main([*ARGS, "--out", str(tmp_path)])
    first = pd.read_csv(tmp_path / "runs.csv")
    central.main([*ARGS, "--out", str(tmp_path)])
    assert pd.read_csv(tmp_path / "runs.csv").equals(first)  # nothing retrained
    central.main([*ARGS, "epochs=2", "--out", str(tmp_path)])
    assert pd.read_csv(tmp_path / "runs.csv")["cfg_epochs"].tolist() == [1, 2]


def test_keys_that_do_not_shape_the_model_leave_its_key_alone_and_bad_ones_fail():
    plain = central.central_config({"epochs": 3}, "mnist", 0)
    assert setting_key(plain) == setting_key(central.central_config({"epochs": 3, "distill-steps": 9}, "mnist", 0))
    assert setting_key(plain) != setting_key(central.central_config({"epochs": 4}, "mnist", 0))
    with pytest.raises(ValueError, match="epochs"):
        central.central_config({"epochs": -1}, "mnist", 0)
