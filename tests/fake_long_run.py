"""A fake long ``flwr run`` for the process-tree tests: a process tree shaped like Flower's, which never ends.

``python fake_long_run.py root DIR`` (the stand-in for ``flwr run``) starts:

- a child that sleeps (a client), and a child that ignores SIGTERM and has a grandchild of its own (Ray's agents);
- through a launcher that exits at once, a detached daemon in a session of its own (the SuperLink): a copy of this
  script named ``DIR/flower-superlink``, with a path under ``DIR/flwr-home`` in its arguments. The daemon starts a
  worker in a process group of its own that ignores SIGTERM (a Ray actor) and writes a line to ``DIR/rows.csv``
  every 0.1 s (the ServerApp writing results).

Every process appends its pid to ``DIR/pids`` once it is set up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def register(folder: Path) -> None:
    with (folder / "pids").open("a") as file:
        file.write(f"{os.getpid()}\n")


def spawn(folder: Path, role: str, script: str = __file__, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, role, str(folder)], **popen)  # type: ignore[call-overload]


def main(role: str, folder: Path) -> None:
    if role in ("stubborn", "stubborn-worker"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if role == "stubborn-worker":
        os.setpgrp()
    if role == "root":
        spawn(folder, "sleeper")
        spawn(folder, "stubborn")
        spawn(folder, "launcher")
    elif role == "stubborn":
        spawn(folder, "sleeper")
    elif role == "launcher":
        daemon = folder / "flower-superlink"
        shutil.copy(__file__, daemon)
        home = folder / "flwr-home"
        subprocess.Popen(
            [sys.executable, str(daemon), "daemon", str(folder), "--database", str(home / "state.db")],
            start_new_session=True,
        )
        return  # the daemon is re-parented to init
    elif role == "daemon":
        spawn(folder, "stubborn-worker")
    register(folder)
    while True:
        if role == "daemon":
            with (folder / "rows.csv").open("a") as file:
                file.write(f"{time.time()}\n")
        time.sleep(0.1)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
