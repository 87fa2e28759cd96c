"""Progress on long loops: a rich bar on a terminal, a log line now and then elsewhere (Flower's logs, files).

``FEDMERGE_PROGRESS=0`` silences both; ``FEDMERGE_PROGRESS_INTERVAL`` sets the seconds between log lines (60).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")

log = logging.getLogger(__name__)

INTERVAL_VARIABLE = "FEDMERGE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_SECONDS = 60.0


def progress_wanted() -> bool:
    """Whether progress is reported at all (``FEDMERGE_PROGRESS`` is not ``0``)."""
    return os.environ.get("FEDMERGE_PROGRESS", "1") != "0"


def progress_enabled() -> bool:
    """Whether progress bars are shown: on a terminal, unless ``FEDMERGE_PROGRESS=0`` (Flower's client actors and
    Ray tasks write to logs, where a bar is noise; they get :func:`heartbeat` lines instead)."""
    return progress_wanted() and Console().is_terminal


def heartbeat_interval() -> float:
    """Seconds between :func:`heartbeat` lines, from ``FEDMERGE_PROGRESS_INTERVAL`` (default 60)."""
    text = os.environ.get(INTERVAL_VARIABLE, "")
    if not text.strip():
        return DEFAULT_INTERVAL_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{INTERVAL_VARIABLE} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:  # also refuses NaN
        raise ValueError(f"{INTERVAL_VARIABLE} must be a positive number of seconds, got {text!r}")
    return seconds


def heartbeat(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    interval: float = DEFAULT_INTERVAL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """Iterate over ``items``, logging how far the loop has got once ``interval`` seconds have passed since the
    start or the last line (a loop shorter than ``interval`` logs nothing), with the time left when ``total`` is
    known."""
    start = clock()
    next_line = start + interval
    for done, item in enumerate(items, start=1):
        yield item
        now = clock()
        if now < next_line:
            continue
        elapsed = now - start
        if total:
            left = elapsed * (total - done) / done
            log.info(
                "%s: %d/%d (%.0f%%), %.0f s so far, about %.0f s left",
                description,
                done,
                total,
                100 * done / total,
                elapsed,
                left,
            )
        else:
            log.info("%s: %d done, %.0f s so far", description, done, elapsed)
        next_line = now + interval


def progress(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with a transient progress bar on a terminal, or :func:`heartbeat` log lines
    elsewhere; nothing when ``enabled`` is false or ``FEDMERGE_PROGRESS=0``."""
    if not (enabled and progress_wanted()):
        yield from items
    elif progress_enabled():
        yield from track(items, description=description, total=total, transient=True)
    else:
        yield from heartbeat(items, description, total, heartbeat_interval())
