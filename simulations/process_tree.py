"""Stopping every process a command started: its children, their children, and the detached daemons among them.

A ``flwr run`` starts a detached SuperLink (a new session), which starts ``flwr-simulation``, which starts Ray's
GCS, raylet, agents and client actors (some in process groups of their own, some ignoring SIGTERM). When a parent
dies its children are re-parented to init and can no longer be found from the command's pid. :class:`ProcessTree`
therefore remembers every process it has seen below its roots (polled while the command runs) and every session
they belong to, and :meth:`ProcessTree.stop` signals all of them: SIGTERM, a grace period, SIGKILL to the survivors,
and a wait until none is left. Processes are read from ``/proc`` (Linux); a pid is only signalled while its start
time is the one recorded, so a reused pid is never hit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    """One line of ``/proc/<pid>/stat``: what identifies a process and links it to others."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # start time in clock ticks after boot: (pid, start) names one process for good
    state: str

    @property
    def alive(self) -> bool:
        """Not a zombie (a zombie runs no code; its parent or init reaps it)."""
        return self.state not in ("Z", "X")


def read_process(pid: int) -> ProcessInfo | None:
    """The process ``pid`` as ``/proc`` shows it now, or None when there is none."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ", whatever comm holds
    return ProcessInfo(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0])


def all_processes() -> dict[int, ProcessInfo]:
    """Every process visible in ``/proc``, by pid."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            info = read_process(int(entry.name))
            if info is not None:
                table[info.pid] = info
    return table


class ProcessTree:
    """The processes started from some roots, and everything they start, remembered as they appear.

    ``add(pid)`` makes a process a root; :meth:`refresh` (called by :meth:`watch` in the background, and by
    :meth:`stop`) records every live descendant of a recorded process and every process in a recorded session
    (other than this process's own session), so that processes re-parented to init are not lost.
    """

    def __init__(self, sessions: bool = True) -> None:
        self._known: dict[int, int] = {}  # pid -> start time
        self._sessions: set[int] = set()
        self._follow_sessions = sessions
        self._lock = threading.Lock()

    def add(self, pids: int | Iterable[int]) -> None:
        """Record ``pids`` (running processes) as roots of the tree, with their sessions."""
        for pid in [pids] if isinstance(pids, int) else pids:
            info = read_process(pid)
            if info is not None:
                with self._lock:
                    self._record(info)

    def _record(self, info: ProcessInfo) -> None:
        self._known.setdefault(info.pid, info.start)
        if self._follow_sessions and info.sid not in (0, os.getsid(0)):
            self._sessions.add(info.sid)

    def refresh(self) -> list[int]:
        """Record the processes that appeared below the tree; return the live ones, sorted."""
        table = all_processes()
        with self._lock:
            changed = True
            while changed:  # descendants of descendants
                changed = False
                for info in table.values():
                    if info.pid in self._known or info.pid == os.getpid():
                        continue
                    parent = table.get(info.ppid)
                    parent_known = parent is not None and self._known.get(parent.pid) == parent.start
                    if parent_known or info.sid in self._sessions:
                        self._record(info)
                        changed = True
            return sorted(pid for pid, start in self._known.items() if _alive(table.get(pid), start))

    def alive(self) -> list[int]:
        """The recorded processes still running (a zombie counts as gone)."""
        with self._lock:
            known = dict(self._known)
        return sorted(pid for pid, start in known.items() if _alive(read_process(pid), start))

    def _signal_new(self, sig: int, sent: set[int]) -> bool:
        """Send ``sig`` to the live recorded processes not in ``sent`` (then added to it); True when none is left."""
        alive = [pid for pid in self.refresh() if pid != os.getpid()]
        for pid in alive:
            if pid not in sent:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
                sent.add(pid)
        return not alive

    def stop(self, grace: float = 5.0, kill_wait: float = 10.0) -> list[int]:
        """Stop the whole tree: SIGTERM, up to ``grace`` seconds for it to end (processes that appear meanwhile are
        signalled too), then SIGKILL to the survivors and up to ``kill_wait`` seconds until none is left. Returns
        the pids that needed SIGKILL (logged, as is any process still alive at the end)."""
        termed: set[int] = set()
        if _wait_until(lambda: self._signal_new(signal.SIGTERM, termed), grace):
            return []
        killed: set[int] = set()
        gone = _wait_until(lambda: self._signal_new(signal.SIGKILL, killed), kill_wait)
        log.warning("process(es) %s ignored SIGTERM for %.0f s: killed", sorted(killed), grace)
        if not gone:
            log.error("process(es) %s still alive after SIGKILL", self.alive())
        return sorted(killed)

    @contextlib.contextmanager
    def watch(self, interval: float = 0.5) -> Iterator[ProcessTree]:
        """Poll :meth:`refresh` every ``interval`` seconds in a background thread while the block runs."""
        done = threading.Event()

        def poll() -> None:
            while not done.wait(interval):
                self.refresh()

        thread = threading.Thread(target=poll, name="process-tree", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join()


def _alive(info: ProcessInfo | None, start: int) -> bool:
    return info is not None and info.start == start and info.alive


def _wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


def run_tree(
    command: Sequence[str],
    timeout: float,
    extra_roots: Callable[[], Iterable[int]] = tuple,
    grace: float = 5.0,
    **popen: Any,
) -> int | None:
    """Run ``command`` in a session of its own and wait for it; its return code, or None when it ran past
    ``timeout`` seconds. On a timeout, and on any exception while waiting (KeyboardInterrupt, or
    :class:`Terminated` from :func:`sigterm_raises`), the whole tree it started is stopped (:meth:`ProcessTree.stop`)
    before this returns or re-raises, so nothing it started runs afterwards. ``extra_roots`` names more processes
    that belong to the run (e.g. a detached daemon it started), asked at every poll."""
    tree = ProcessTree()
    process = subprocess.Popen(command, start_new_session=True, **popen)
    tree.add(process.pid)
    deadline = time.monotonic() + timeout
    try:
        with tree.watch():
            while True:
                tree.add(extra_roots())
                try:
                    return process.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        break
        tree.add(extra_roots())
        stop_and_reap(tree, process, grace)
        return None
    except BaseException:
        tree.add(extra_roots())
        stop_and_reap(tree, process, grace)
        raise


def stop_and_reap(tree: ProcessTree, process: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop ``tree`` and reap ``process`` (its root, a child of this process) so that no zombie is left."""
    tree.stop(grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5.0)


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM inside :func:`sigterm_raises`; like
    KeyboardInterrupt, not an Exception, so that ``except Exception`` (e.g. a sweep's per-run handler) lets it
    through."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into a :class:`Terminated` exception while the block runs (main thread only), so that
    ``finally`` blocks and :func:`run_tree` clean up as on Ctrl-C; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
