"""End to end: ``flwr run .`` with two simulated clients on the embedded digits data, in a throw-away Flower home.

``flwr run --stream`` exits 0 even when the run fails, so the test checks what a finished run leaves behind (the
results row and the merged model), and it stops the detached local SuperLink that ``flwr run`` started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).with_name("flwr")


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the SuperLinks whose command line names ``flwr_home`` (their database lives there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in command and str(flwr_home) in command:
            pids.append(int(entry.name))
    return pids


def stop_superlinks(flwr_home: Path) -> None:
    """Stop the SuperLinks using ``flwr_home`` with their whole process group (the simulation and its Ray workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in superlink_pids(flwr_home):
            try:
                os.killpg(os.getpgid(pid), sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while superlink_pids(flwr_home) and time.monotonic() < deadline:
            time.sleep(0.5)


def flwr_run(run_config: str, cwd: Path, env: dict) -> str:
    """Run ``flwr run`` on this project with two simulated clients; return its output (it exits 0 even on failure)."""
    command = [str(FLWR), "run", str(REPO), "--stream", "--run-config", run_config,
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    finished = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    return output


@pytest.mark.skipif(not FLWR.exists(), reason=f"the flwr CLI is not installed next to {sys.executable}")
def test_flwr_run_merges_two_clients_writes_results_and_repeats_exactly(tmp_path):
    flwr_home, results = tmp_path / "flwr-home", tmp_path / "runs"
    env = os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEDMERGE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }
    run_config = f'results-dir="{results}" epochs=5 ste-steps=30 merge-workers=2 seed=3'
    try:
        outputs = [flwr_run(run_config, tmp_path, env) for _ in range(2)]
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
