"""End to end: ``flwr run .`` with two simulated clients on the embedded digits data, in a throw-away Flower home.

``flwr run --stream`` exits 0 even when the run fails, so the test checks what a finished run leaves behind (the
results row and the merged model), and it stops the detached local SuperLink that ``flwr run`` started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from simulations.flower_cli import flower_environment, flwr_run_command, stop_superlinks, superlink_pids

pytestmark = pytest.mark.slow  # starts Flower (`flwr run`) in a subprocess

FLWR = Path(sys.executable).with_name("flwr")


def flwr_run(run_config: dict, cwd: Path, flwr_home: Path) -> str:
    """Run ``flwr run`` on this project with two simulated clients; return its output (it exits 0 even on failure)."""
    command = flwr_run_command(run_config, num_supernodes=2)
    finished = subprocess.run(
        command, check=False, cwd=cwd, env=flower_environment(flwr_home), capture_output=True, text=True, timeout=240
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    return output


@pytest.mark.skipif(not FLWR.exists(), reason=f"the flwr CLI is not installed next to {sys.executable}")
def test_flwr_run_merges_two_clients_writes_results_and_repeats_exactly(tmp_path):
    flwr_home, results = tmp_path / "flwr-home", tmp_path / "runs"
    run_config = {"results-dir": str(results), "epochs": 5, "ste-steps": 30, "merge-workers": 2, "seed": 3}
    try:
        outputs = [flwr_run(run_config, tmp_path, flwr_home) for _ in range(2)]
    finally:
        stop_superlinks(flwr_home)
    runs = results / "runs.csv"
    assert runs.exists(), f"the run did not finish: no {runs}\n{outputs[-1][-4000:]}"
    rows = pd.read_csv(runs)
    assert len(rows) == 2, f"a run did not finish:\n{outputs[-1][-4000:]}"
    row = rows.iloc[0]
    assert (row["num-clients"], row["clients-merged"], row["clients-left-out"]) == (2, 2, 0)
    assert row["cfg_method"] == "ste" and row["cfg_epochs"] == 5
    # Disjoint halves of digits: each client knows only its own five classes, the merge must know more.
    assert row["acc_client0_global"] < 55 and row["acc_client1_global"] < 55
    assert row["acc_merged_global"] > max(row["acc_client0_global"], row["acc_client1_global"])
    assert "merged" in outputs[0] and "results row appended" in outputs[0]
    # The same seed gives the same merged weights, although node ids (and reply order) change between runs.
    first, second = (torch.load(path, weights_only=False) for path in rows["model-file"])
    assert first["run_config"]["method"] == "ste" and "head.weight" in first["state_dict"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
    assert not superlink_pids(flwr_home)


@pytest.mark.skipif(not FLWR.exists(), reason=f"the flwr CLI is not installed next to {sys.executable}")
def test_flwr_run_of_two_rounds_of_universe_merging_with_distillation(tmp_path):
    flwr_home, results = tmp_path / "flwr-home", tmp_path / "runs"
    run_config = {
        "results-dir": str(results),
        "epochs": 3,
        "num-rounds": 2,
        "method": "wm",
        "schedule": "universe",
        "distill-steps": 40,
        "merge-workers": 0,
        "seed": 1,
    }
    try:
        output = flwr_run(run_config, tmp_path, flwr_home)
    finally:
        stop_superlinks(flwr_home)
    runs = results / "runs.csv"
    assert runs.exists(), f"the run did not finish: no {runs}\n{output[-4000:]}"
    row = pd.read_csv(runs).iloc[0]
    assert row["cfg_num-rounds"] == 2 and row["cfg_schedule"] == "universe"
    assert {"acc_round1_global", "acc_round2_global", "acc_merge-only_global", "acc_pooled-recipe_global"} <= set(
        row.index
    )
    assert 0 < row["bytes-uploaded_round1"] < row["bytes-uploaded_round2"] == 2 * row["bytes-uploaded_round1"]
    assert "universe merge of 2 clients" in output and "distilling the ensemble of 2 clients" in output
    assert not superlink_pids(flwr_home)
