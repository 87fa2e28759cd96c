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


@pytest.mark.skipif(not FLWR.exists(), reason=f"the flwr CLI is not installed next to {sys.executable}")
def test_flwr_run_merges_two_clients_and_writes_results(tmp_path):
    flwr_home, results = tmp_path / "flwr-home", tmp_path / "runs"
    env = os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEDMERGE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }
    run_config = f'results-dir="{results}" epochs=5 ste-steps=30 merge-workers=2'
    command = [str(FLWR), "run", str(REPO), "--stream", "--run-config", run_config,
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    try:
        finished = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_superlinks(flwr_home)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    runs = results / "runs.csv"
    assert runs.exists(), f"the run did not finish: no {runs}\n{output[-4000:]}"
    row = pd.read_csv(runs).iloc[-1]
    assert (row["num-clients"], row["clients-merged"], row["clients-left-out"]) == (2, 2, 0)
    assert row["cfg_method"] == "ste" and row["cfg_epochs"] == 5
    # Disjoint halves of digits: each client knows only its own five classes, the merge must know more.
    assert row["acc_client0_global"] < 55 and row["acc_client1_global"] < 55
    assert row["acc_merged_global"] > max(row["acc_client0_global"], row["acc_client1_global"])
    saved = torch.load(row["model-file"], weights_only=False)
    assert saved["run_config"]["method"] == "ste" and "head.weight" in saved["state_dict"]
    assert "merged" in output and "results row appended" in output
    assert not superlink_pids(flwr_home)
