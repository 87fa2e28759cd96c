"""Running this project's Flower app with the ``flwr`` command line, and stopping the local SuperLink it starts.

``flwr run <project> --stream`` starts a detached local SuperLink (under ``FLWR_HOME``) on first use and reuses
it afterwards; it exits 0 even when the run fails, so callers check the files a run leaves behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
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


def flower_environment(flwr_home: Path, threads: int = 1) -> dict[str, str]:
    """Environment for ``flwr run``: its own Flower home, no runtime dependency installs, the CLI on PATH, quiet
    progress bars (logs, not a terminal) and ``threads`` torch threads per process."""
    return os.environ | {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{flwr_executable().parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEDMERGE_PROGRESS": "0",
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
    """``python -m simulations.flower_cli stop [--flwr-home DIR]``: stop the local SuperLinks of one Flower home by
    process id (with their simulations and Ray workers), and no other user's or project's."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulations.flower_cli", description=main.__doc__)
    parser.add_argument("command", choices=["stop", "list"])
    parser.add_argument("--flwr-home", type=Path, default=default_flwr_home(), help="default: $FLWR_HOME or ~/.flwr")
    args = parser.parse_args(argv)
    pids = superlink_pids(args.flwr_home)
    if args.command == "list" or not pids:
        print(f"SuperLinks of {args.flwr_home}: {pids or 'none'}")
        return 0
    stop_superlinks(args.flwr_home)
    print(f"stopped SuperLink process(es) {pids} of {args.flwr_home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
