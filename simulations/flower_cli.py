"""Running this project's Flower app with the ``flwr`` command line, and stopping the local SuperLink it starts.

``flwr run <project> --stream`` starts a detached local SuperLink (under ``FLWR_HOME``) on first use and reuses
it afterwards; it exits 0 even when the run fails, so callers check the files a run leaves behind. Flower's local
SuperLink listens on fixed ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, default 39091, serves the Control,
Fleet and Runtime APIs; ``FLWR_LOCAL_CONTROL_API_PORT``, default 39093, the legacy gRPC Control API), and ``flwr``
talks to whatever answers there. :func:`flower_environment` gives each Flower home ports of its own: those of its
running SuperLink, else free ones, so a run never reaches another user's or project's SuperLink.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from simulations.process_tree import ProcessTree, run_tree

PROJECT = Path(__file__).resolve().parents[1]
"""The Flower app's project folder (where ``pyproject.toml`` declares it)."""


def flwr_executable() -> Path:
    """The ``flwr`` CLI installed next to this Python; FileNotFoundError when absent."""
    path = Path(sys.executable).with_name("flwr")
    if not path.exists():
        raise FileNotFoundError(
            f"the flwr command is not installed next to {sys.executable} (pip install 'flwr[simulation]')"
        )
    return path


def toml_value(value: object) -> str:
    """``value`` written as a TOML value for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"run config values must be bool, int, float or str, got {value!r}")


def run_config_argument(run_config: Mapping[str, object]) -> str:
    """The ``--run-config`` argument setting every key of ``run_config``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())


HTTP_PORT_VARIABLE = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
"""Port of the local SuperLink's HTTP API (Control, Fleet and Runtime APIs), read by ``flwr`` when it starts."""
CONTROL_PORT_VARIABLE = "FLWR_LOCAL_CONTROL_API_PORT"
"""Port of the local SuperLink's (deprecated) gRPC Control API, read by ``flwr`` when it starts."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` now: the operating system's picks for binds to port 0,
    every socket held open until all are picked (one at a time, a port just released can be picked again)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def superlink_ports(command: Sequence[str]) -> tuple[int, int] | None:
    """(HTTP API port, control API port) from a ``flower-superlink`` command line; None when it names no
    ``--port``."""
    http = control = None
    for flag, value in zip(command, command[1:], strict=False):
        if flag == "--port":
            http = int(value)
        elif flag == "--control-api-address":
            control = int(value.rpartition(":")[2])
    if http is None:
        return None
    return http, control if control is not None else http


def _command_lines() -> dict[int, list[str]]:
    """Command line (argv) of every process that can be read, by process id."""
    lines = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        lines[int(entry.name)] = raw.decode(errors="replace").split("\0")[:-1]
    return lines


def _superlinks(flwr_home: Path) -> dict[int, list[str]]:
    """Command lines of the SuperLinks with a path under ``flwr_home`` in their arguments (the local SuperLink's
    database and log live there), by process id."""
    prefix = str(flwr_home).rstrip(os.sep) + os.sep
    return {
        pid: argv
        for pid, argv in _command_lines().items()
        if any(part.endswith("flower-superlink") for part in argv[:2]) and any(prefix in part for part in argv)
    }


def local_superlink_ports(flwr_home: Path) -> tuple[int, int]:
    """(HTTP API port, control API port) for the local SuperLink of ``flwr_home``: those of the one running, read
    from its command line, else two ports free now."""
    for argv in _superlinks(flwr_home).values():
        ports = superlink_ports(argv)
        if ports is not None:
            return ports
    http, control = free_ports(2)
    return http, control


def flower_environment(flwr_home: Path, threads: int = 1) -> dict[str, str]:
    """Environment for ``flwr run``: its own Flower home with local SuperLink ports of its own
    (:func:`local_superlink_ports`), no runtime dependency installs, the CLI on PATH and ``threads`` torch threads
    per process (long loops report progress as log lines there, :func:`fedmerge.progress.heartbeat`)."""
    http_port, control_port = local_superlink_ports(flwr_home)
    return os.environ | {
        "FLWR_HOME": str(flwr_home),
        HTTP_PORT_VARIABLE: str(http_port),
        CONTROL_PORT_VARIABLE: str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{flwr_executable().parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": str(threads),
    }


def flwr_run_command(
    run_config: Mapping[str, object],
    num_supernodes: int,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
    project: Path = PROJECT,
) -> list[str]:
    """The ``flwr run`` command that simulates ``num_supernodes`` clients with ``run_config``."""
    federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus:g}"
    if client_gpus > 0:
        federation += f" client-resources-num-gpus={client_gpus:g}"
    return [
        str(flwr_executable()),
        "run",
        str(project),
        "--stream",
        "--run-config",
        run_config_argument(run_config),
        "--federation-config",
        federation,
    ]


def default_client_gpus() -> float:
    """GPU share per simulated client: a quarter of the GPU when there is one, else none."""
    return 0.25 if torch.cuda.is_available() else 0.0


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the SuperLinks whose command line names ``flwr_home`` (their database lives there)."""
    return sorted(_superlinks(flwr_home))


def stop_superlinks(flwr_home: Path, timeout: float = 10.0) -> None:
    """Stop the SuperLinks using ``flwr_home`` with every process they started (the simulation, Ray's processes and
    client actors, whatever their process group): SIGTERM, then SIGKILL to what is left after ``timeout`` seconds
    (:class:`simulations.process_tree.ProcessTree`)."""
    tree = ProcessTree()
    tree.add(superlink_pids(flwr_home))
    tree.stop(grace=timeout)


def flwr_run(
    run_config: Mapping[str, object],
    num_supernodes: int,
    flwr_home: Path,
    log_path: Path,
    timeout: float,
    cwd: Path | None = None,
    client_cpus: float = 1.0,
    client_gpus: float = 0.0,
) -> bool:
    """Run the app once with ``flwr run --stream`` from ``cwd`` (default: this process's working directory, which
    becomes the SuperLink's when it starts it: relative paths such as the default data folders resolve there), its
    output going to ``log_path``. False when the command failed or ran past ``timeout`` seconds. On a timeout, and
    when waiting is interrupted (Ctrl-C, or SIGTERM under :func:`simulations.process_tree.sigterm_raises`), the
    command and every process it started, the SuperLink of ``flwr_home`` with its simulation and Ray workers
    included, are stopped before this returns or re-raises, so no orphan writes a result afterwards. A True does not
    mean the run succeeded: check its results files."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = flwr_run_command(run_config, num_supernodes, client_cpus, client_gpus)
    with log_path.open("w") as log_file:
        returncode = run_tree(
            command,
            timeout,
            extra_roots=lambda: superlink_pids(flwr_home),
            cwd=cwd or Path.cwd(),
            env=flower_environment(flwr_home),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        if returncode is None:
            log_file.write(f"\n[fedmerge] flwr run ran past {timeout:.0f} s: stopped it with its SuperLink\n")
    return returncode == 0


def default_flwr_home() -> Path:
    """The Flower home ``flwr`` uses: ``$FLWR_HOME``, else ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")).expanduser()


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.flower_cli stop|list|env [--flwr-home DIR]``: stop (or list) the local SuperLinks of
    one Flower home by process id (with their simulations and Ray workers), and no other user's or project's; or
    print the ``export`` lines that give that home's local SuperLink ports of its own (``eval`` them before
    ``flwr run``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulations.flower_cli", description=main.__doc__)
    parser.add_argument("command", choices=["stop", "list", "env"])
    parser.add_argument("--flwr-home", type=Path, default=default_flwr_home(), help="default: $FLWR_HOME or ~/.flwr")
    args = parser.parse_args(argv)
    if args.command == "env":
        home = args.flwr_home.expanduser().resolve()
        http_port, control_port = local_superlink_ports(home)
        ports = f"{HTTP_PORT_VARIABLE}={http_port} {CONTROL_PORT_VARIABLE}={control_port}"
        print(f"export FLWR_HOME={shlex.quote(str(home))} {ports}")
        return 0
    pids = superlink_pids(args.flwr_home)
    if args.command == "list" or not pids:
        print(f"SuperLinks of {args.flwr_home}: {pids or 'none'}")
        return 0
    stop_superlinks(args.flwr_home)
    print(f"stopped SuperLink process(es) {pids} of {args.flwr_home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
