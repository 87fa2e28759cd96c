"""Progress bars for long loops (rich), quiet when ``FEDMERGE_PROGRESS=0``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether progress bars are shown: on a terminal, unless ``FEDMERGE_PROGRESS=0`` (Flower's client actors and
    Ray tasks write to logs, where a bar is noise)."""
    return os.environ.get("FEDMERGE_PROGRESS", "1") != "0" and Console().is_terminal


def progress(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar when enabled, transient so logs stay clean."""
    if not (enabled and progress_enabled()):
        yield from items
        return
    yield from track(items, description=description, total=total, transient=True)
