"""Flower beyond one default local SuperLink: local SuperLink ports of each Flower home's own, deployment mode (a
SuperLink and two SuperNodes) and a simulation on an existing Ray cluster.

Every process a test starts gets a session of its own and is stopped with its whole process group, by id, in a
``finally`` block; every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd
import pytest

from simulations.flower_cli import (
    CONTROL_PORT_VARIABLE,
    HTTP_PORT_VARIABLE,
    PROJECT,
    flower_environment,
    flwr_run_command,
    free_ports,
    local_superlink_ports,
    run_config_argument,
    stop_superlinks,
    superlink_pids,
    superlink_ports,
)

BIN = Path(sys.executable).parent
needs_flwr = pytest.mark.skipif(not (BIN / "flwr").exists(), reason=f"the flwr CLI is not installed in {BIN}")
TINY_RUN = {"epochs": 1, "method": "average", "seed": 1}
"""Run config of a quick run: the embedded digits data, one epoch, plain averaging."""


# ------------------------------------------------------------------ processes


def start(command: list[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> subprocess.Popen:
    """Start ``command`` in a session (and process group) of its own, its output going to ``log_path``."""
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop ``process`` and every process of its group (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)
            if not group_alive(process.pid):
                return
    raise AssertionError(f"process group {process.pid} survived SIGKILL")


@contextlib.contextmanager
def stopped_at_exit(processes: list[subprocess.Popen]) -> Iterator[list[subprocess.Popen]]:
    """Yield ``processes`` (append to it), and stop every one's process group on the way out."""
    try:
        yield processes
    finally:
        for process in reversed(processes):
            stop_group(process)


def wait_for(condition, what: str, timeout: float, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Poll ``condition()`` until true; fail after ``timeout`` seconds or when one of ``processes`` has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        exited = [p.args for p in processes if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-2000:]}" for log in logs if log.exists())
            raise AssertionError(f"waiting for {what}: {'exited: ' + str(exited) if exited else 'timed out'}\n{tails}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def read_results(results: Path, output: str) -> pd.Series:
    """The one results row a finished run appended under ``results``."""
    runs = results / "runs.csv"
    assert runs.exists(), f"the run did not finish: no {runs}\n{output[-4000:]}"
    rows = pd.read_csv(runs)
    assert len(rows) == 1, output[-4000:]
    return rows.iloc[0]


# ------------------------------------------------------------------ local SuperLink ports


def test_superlink_ports_come_from_the_command_line():
    argv = ["python", "flower-superlink", "--insecure", "--control-api-address", "127.0.0.1:4321", "--port", "1234"]
    assert superlink_ports(argv) == (1234, 4321)
    assert superlink_ports(["flower-superlink", "--port", "1234"]) == (1234, 1234)
    assert superlink_ports(["flower-superlink", "--insecure"]) is None


def test_free_ports_are_distinct_and_free():
    ports = free_ports(64)  # all sockets open at once: the system cannot hand one port out twice
    assert len(set(ports)) == 64
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_each_flower_home_gets_free_ports_of_its_own(tmp_path):
    first, second = flower_environment(tmp_path / "a"), flower_environment(tmp_path / "b")
    ports = [int(env[key]) for env in (first, second) for key in (HTTP_PORT_VARIABLE, CONTROL_PORT_VARIABLE)]
    assert len(set(ports)) == 4
    for port in ports:  # free now (so not those of a SuperLink already listening, such as Flower's 39091 / 39093)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.slow  # starts two local SuperLinks (about 15 s)
@needs_flwr
def test_two_local_superlinks_run_side_by_side_on_their_own_ports(tmp_path):
    homes = [tmp_path / "a", tmp_path / "b"]
    envs = [flower_environment(home) for home in homes]
    try:
        listing = [
            subprocess.Popen(
                [str(BIN / "flwr"), "ls"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for env in envs
        ]  # at the same time
        outputs = [process.communicate(timeout=120)[0].decode(errors="replace") for process in listing]
        for home, env, output in zip(homes, envs, outputs, strict=True):
            http_port, control_port = int(env[HTTP_PORT_VARIABLE]), int(env[CONTROL_PORT_VARIABLE])
            assert f"Using SuperLink: local (127.0.0.1:{http_port})" in output, output
            assert len(superlink_pids(home)) == 1, output
            assert local_superlink_ports(home) == (http_port, control_port)  # read back from the running SuperLink
            assert port_open(http_port)
        # A second command in the same Flower home reuses its SuperLink, on the same ports.
        assert flower_environment(homes[0])[HTTP_PORT_VARIABLE] == envs[0][HTTP_PORT_VARIABLE]
        again = subprocess.run(
            [str(BIN / "flwr"), "ls"], cwd=tmp_path, env=flower_environment(homes[0]), capture_output=True, timeout=120
        )
        assert again.returncode == 0 and b"Starting local SuperLink" not in again.stdout, again.stdout
        assert len(superlink_pids(homes[0])) == 1
    finally:
        for home in homes:
            stop_superlinks(home)
    assert not any(superlink_pids(home) for home in homes)


# ------------------------------------------------------------------ deployment mode


def test_a_missing_partition_id_says_what_to_set_in_both_modes():
    from simulations.client_app import node_partition

    with pytest.raises(ValueError) as error:
        node_partition({})
    message = str(error.value)
    assert "--federation-config 'num-supernodes=2'" in message  # simulation
    assert 'flower-supernode --node-config "partition-id=0 num-partitions=2"' in message  # deployment


@pytest.mark.slow  # starts a SuperLink, two SuperNodes and a run (about 1 min)
@needs_flwr
def test_deployment_with_a_superlink_and_two_supernodes_writes_a_results_row(tmp_path):
    flwr_home, results = tmp_path / "flwr-home", tmp_path / "runs"
    env = flower_environment(flwr_home)
    link_port, *node_ports = free_ports(3)
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n"
    )
    link_log = tmp_path / "superlink.log"
    node_logs = [tmp_path / f"supernode{k}.log" for k in range(2)]
    with stopped_at_exit([]) as processes:
        processes.append(
            start(
                [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port)],
                link_log,
                env,
                tmp_path,
            )
        )
        wait_for(lambda: port_open(link_port), "the SuperLink", 60, processes, [link_log])
        for k, (port, log) in enumerate(zip(node_ports, node_logs, strict=True)):
            command = [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}"]
            command += ["--port", str(port), "--node-config", f"partition-id={k} num-partitions=2"]
            processes.append(start(command, log, env, tmp_path))
        wait_for(
            lambda: link_log.read_text(errors="replace").count("Activated node_id") >= 2,
            "two SuperNodes to connect",
            90,
            processes,
            [link_log, *node_logs],
        )
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(PROJECT), "deployment", "--stream"]
            + ["--run-config", run_config_argument(TINY_RUN | {"results-dir": str(results)})],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        assert "Starting local SuperLink" not in output  # it ran on our SuperLink
        row = read_results(results, output)
        assert (row["num-clients"], row["clients-merged"], row["clients-left-out"]) == (2, 2, 0)
        assert row["cfg_method"] == "average"
        node_output = "".join(log.read_text(errors="replace") for log in node_logs)
        assert "client 0, round 1" in node_output and "client 1, round 1" in node_output
    assert not superlink_pids(flwr_home)


# ------------------------------------------------------------------ an existing Ray cluster


@contextlib.contextmanager
def ray_head(log_path: Path, num_cpus: int = 2) -> Iterator[tuple[str, Path]]:
    """A Ray head (``ray start --head --block``) on free ports with its own temp dir: yields (address, temp dir) and
    stops the head's process group (every Ray process of this cluster) on the way out."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    flags = (  # Ray's fixed defaults (10001, 8265, 52365, ...) could be another user's
        "--ray-client-server-port",
        "--dashboard-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    )
    port, *ports = free_ports(1 + len(flags))  # distinct: Ray refuses two components on one port
    command = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), f"--num-cpus={num_cpus}"]
    command += ["--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    command += ["--object-store-memory=200000000"]
    for flag, flag_port in zip(flags, ports, strict=True):
        command += [flag, str(flag_port)]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        with stopped_at_exit([start(command, log_path, env, temp_dir)]) as processes:
            started = lambda: "Ray runtime started" in log_path.read_text(errors="replace")  # noqa: E731
            wait_for(started, "the Ray head", 120, processes, [log_path])
            yield f"127.0.0.1:{port}", temp_dir
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_log_markers(temp_dir: Path) -> str:
    """The task and actor names the cluster's workers logged (``:task_name:...`` lines)."""
    lines = []
    for path in (temp_dir / "session_latest" / "logs").glob("worker-*"):
        lines += [line for line in path.read_text(errors="replace").splitlines() if line.startswith(":")]
    return "\n".join(lines)


@pytest.mark.slow  # starts a Ray head, a local SuperLink and a run (about 1.5 min)
@needs_flwr
def test_simulation_and_its_merge_tasks_run_on_an_existing_ray_cluster(tmp_path):
    flwr_home, results = tmp_path / "flwr-home", tmp_path / "runs"
    with ray_head(tmp_path / "ray-head.log") as (address, temp_dir):
        env = flower_environment(flwr_home) | {"RAY_ADDRESS": address}
        command = flwr_run_command(TINY_RUN | {"results-dir": str(results), "merge-workers": 2}, num_supernodes=2)
        try:
            run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        finally:
            stop_superlinks(flwr_home)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        row = read_results(results, output)
        assert (row["num-clients"], row["clients-merged"]) == (2, 2)
        port = address.rpartition(":")[2]
        assert re.search(rf"merge tasks run on the Ray cluster at [\d.]+:{port} \(1 node", output), output[-4000:]
        markers = cluster_log_markers(temp_dir)
        assert ":task_name:_ray_merge" in markers and ":actor_name:ClientAppActor" in markers, markers
    assert not superlink_pids(flwr_home)
