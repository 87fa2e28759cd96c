"""The sweep's process tree is gone after a timeout or an interrupt (a fake long run: see ``fake_long_run.py``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulations.flower_cli import superlink_pids
from simulations.process_tree import ProcessTree, read_process, run_tree

FAKE = Path(__file__).with_name("fake_long_run.py")
ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 6  # root, sleeper, stubborn, its sleeper, daemon, stubborn worker


def registered(folder: Path) -> list[int]:
    path = folder / "pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def running(pid: int) -> bool:
    info = read_process(pid)
    return info is not None and info.alive


@contextlib.contextmanager
def killed_afterwards(folder: Path) -> Iterator[None]:
    """Whatever the test's outcome, no process of the fake run survives it."""
    try:
        yield
    finally:
        for pid in registered(folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def assert_all_gone_and_quiet(folder: Path) -> None:
    pids = registered(folder)
    assert len(pids) == PROCESSES, pids
    assert not [pid for pid in pids if running(pid)]
    rows = (folder / "rows.csv").read_text()
    time.sleep(1.0)
    assert (folder / "rows.csv").read_text() == rows, "a row was written after the stop"


def test_run_tree_stops_every_process_on_timeout(tmp_path):
    with killed_afterwards(tmp_path):
        code = run_tree(
            [sys.executable, str(FAKE), "root", str(tmp_path)],
            timeout=8.0,
            extra_roots=lambda: superlink_pids(tmp_path / "flwr-home"),
            grace=1.0,
        )
        assert code is None
        assert_all_gone_and_quiet(tmp_path)


def test_process_tree_finds_a_detached_daemon_by_its_session(tmp_path):
    """The daemon is re-parented to init at once; a tree that saw it once still stops it and its worker."""
    with killed_afterwards(tmp_path):
        process = subprocess.Popen([sys.executable, str(FAKE), "root", str(tmp_path)], start_new_session=True)
        assert wait_for(lambda: len(registered(tmp_path)) == PROCESSES)
        tree = ProcessTree()
        tree.add([process.pid, *superlink_pids(tmp_path / "flwr-home")])
        assert len(tree.refresh()) == PROCESSES
        assert tree.stop(grace=1.0)  # the SIGTERM-ignoring processes needed SIGKILL
        process.wait(5)
        assert_all_gone_and_quiet(tmp_path)


DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may start with SIGINT ignored
import simulations.flower_cli as flower_cli
from simulations import sweep
fake, out = sys.argv[1], sys.argv[2]
flower_cli.flwr_run_command = lambda *args, **kwargs: [sys.executable, fake, "root", out]
sys.exit(sweep.main(["--datasets", "digits", "--clients", "2", "--methods", "wm", "--fedavg-rounds", "0",
                     "--out", out, "--no-report", "--timeout", "600"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_flower_sweep_leaves_no_process_and_no_row(tmp_path, sig):
    """A Flower-backed sweep (its ``flwr run`` replaced by the fake run) stopped by Ctrl-C or SIGTERM stops the whole
    tree it started, the detached 'SuperLink' and its SIGTERM-ignoring worker included, before it exits."""
    out = tmp_path / "sweep"
    out.mkdir()
    with killed_afterwards(out):
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(FAKE), str(out)],
            cwd=ROOT,
            env=os.environ | {"FEDMERGE_PROGRESS": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert wait_for(lambda: len(registered(out)) == PROCESSES, 120)
            time.sleep(1.0)  # let the sweep's watcher see the tree
            driver.send_signal(sig)
            output, _ = driver.communicate(timeout=60)
        finally:
            driver.kill()
        assert driver.returncode == 130, output
        assert "interrupted" in output
        assert_all_gone_and_quiet(out)
