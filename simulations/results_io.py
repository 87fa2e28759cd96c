"""Result files: CSV tables that only ever grow, written so that a crash never loses a finished row.

Every reader of a results CSV goes through :func:`read_rows`, which sets broken lines aside instead of reading them:
a line is broken when it has another number of fields than the header, when a key column (:data:`KEY_COLUMNS`
present in the header, or the ``required`` columns asked for) is empty in it, or when it is the file's last line and
has no line end (a write cut short: every writer here ends each line with one). Each broken line is logged
(WARNING, naming the file and the line number), appended to ``<file>.bad`` next to the file (e.g.
``runs.csv.bad``) and removed from the file, which is rewritten atomically with the good lines only; when the file
cannot be rewritten (read-only results), the broken lines are left in it but still not read.

Writers hold an exclusive lock on ``<file>.lock`` while they read, extend and replace the file, so two sweeps that
write into one CSV at once (e.g. two seeds run side by side) never lose each other's rows; a reader that sets broken
lines aside takes the same lock for its rewrite.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

KEY_COLUMNS: tuple[str, ...] = ("run-key", "run-id")
"""Columns that identify a row wherever they appear: a row with one of them empty is broken."""


def bad_rows_path(csv_path: Path) -> Path:
    """Where :func:`read_rows` puts the broken lines of ``csv_path``: ``<name>.bad`` next to it."""
    return csv_path.with_name(csv_path.name + ".bad")


def _records(text: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """(first line number, fields, raw text) of each CSV record of ``text`` (a quoted field may span lines).

    Fields are None for a record the csv module cannot parse (then the rest of the text is that one record).
    """
    lines = list(io.StringIO(text, newline=""))  # split at \n, \r\n or \r only, ends kept (as csv wants)
    consumed: list[str] = []
    position = 0

    def feed() -> Iterator[str]:
        nonlocal position
        while position < len(lines):
            position += 1
            consumed.append(lines[position - 1])
            yield lines[position - 1]

    reader = csv.reader(feed())
    line_number = 1
    while True:
        fields: list[str] | None
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:
            fields = None
            consumed.extend(lines[position:])
            position = len(lines)
        raw = "".join(consumed)
        consumed.clear()
        yield line_number, fields, raw
        line_number += raw.count("\n") or 1
        if fields is None:
            return


def _problem(fields: list[str] | None, header: list[str], required: Sequence[str], raw: str, last: bool) -> str:
    """Why a record is broken ("" when it is not)."""
    if fields is None:
        return "not valid CSV"
    if len(fields) != len(header):
        return f"{len(fields)} fields, the header has {len(header)}"
    empty = [name for name in required if name in header and not fields[header.index(name)].strip()]
    if empty:
        return f"empty key column(s) {empty}"
    if last and not raw.endswith(("\n", "\r")):
        return "no line end (a write cut short)"
    return ""


def _split(csv_path: Path, keys: Sequence[str]) -> tuple[bool, list[str], list[tuple[int, str, str]]]:
    """Read ``csv_path`` and split its records: (whether it has a header, the good records' text, and each broken
    record as (line number, why, text ending in a line end))."""
    text = csv_path.read_bytes().decode("utf-8", errors="replace")  # line ends as they are
    records = list(_records(text))
    header: list[str] | None = None
    good: list[str] = []
    bad: list[tuple[int, str, str]] = []
    for index, (line, fields, raw) in enumerate(records):
        if fields == [] or (header is None and fields is not None):  # a blank line (pandas skips it), the header
            header = fields or header
            good.append(raw)
            continue
        problem = _problem(fields, header or [], keys, raw, index == len(records) - 1)
        if problem:
            bad.append((line, problem, raw if raw.endswith(("\n", "\r")) else raw + "\n"))
        else:
            good.append(raw)
    return header is not None, good, bad


def read_rows(csv_path: Path, required: Sequence[str] = (), **read_csv: Any) -> pd.DataFrame:
    """The rows of the CSV at ``csv_path`` as ``pd.read_csv(..., **read_csv)`` reads them, without broken lines.

    Broken lines (see the module docstring; ``required`` adds key columns to :data:`KEY_COLUMNS`) are logged,
    moved to :func:`bad_rows_path` and removed from the file. That rewrite holds the file's lock and reads the file
    again under it, so a row a writer added meanwhile is kept. A missing or empty file gives an empty DataFrame.
    """
    if not csv_path.exists() or csv_path.stat().st_size == 0:
        return pd.DataFrame()
    keys = [*KEY_COLUMNS, *(name for name in required if name not in KEY_COLUMNS)]
    has_header, good, bad = _split(csv_path, keys)
    if bad:
        with contextlib.ExitStack() as lock:
            with contextlib.suppress(OSError):  # no lock file (read-only results): the rewrite fails too, and says so
                lock.enter_context(_locked(csv_path))
            has_header, good, bad = _split(csv_path, keys)  # again: a writer may have replaced the file since
            for line, problem, _ in bad:
                log.warning(
                    "%s, line %d: broken row set aside in %s (%s)", csv_path, line, bad_rows_path(csv_path), problem
                )
            if bad:
                _set_aside(csv_path, good, [raw for _, _, raw in bad])
    if not has_header:
        return pd.DataFrame()  # only blank lines: nothing to read
    return pd.read_csv(io.StringIO("".join(good)), **read_csv)


def finished_keys(csv_path: Path) -> set[str]:
    """The ``run-key`` of every row of the CSV at ``csv_path`` (read as text, through :func:`read_rows`): the rows a
    resumable script skips. Empty when the file is missing, empty or has no such column."""
    rows = read_rows(csv_path, required=("run-key",), dtype={"run-key": str})
    return set(rows["run-key"]) if "run-key" in rows else set()


def _set_aside(csv_path: Path, good: list[str], bad: list[str]) -> None:
    """Append ``bad`` to the ``.bad`` file, then replace the CSV by ``good`` (atomically)."""
    try:
        with open(bad_rows_path(csv_path), "a", encoding="utf-8", newline="") as f:
            f.writelines(bad)
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        tmp.write_text("".join(good), encoding="utf-8", newline="")
        tmp.replace(csv_path)
    except OSError as err:
        log.warning("%s: cannot set its broken rows aside (%s); they are skipped when read", csv_path, err)


_held = threading.local()
"""``_held.paths``: the lock files this thread holds (so that a nested :func:`_locked` does not wait on itself)."""


@contextlib.contextmanager
def _locked(csv_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<file>.lock``, blocking until any other process or thread holding it is done.

    Re-entrant within a thread: :func:`save_rows` holds the lock while :func:`read_rows` may take it again.
    """
    lock_path = csv_path.with_name(csv_path.name + ".lock").resolve()
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if lock_path in held:
        yield
        return
    with open(lock_path, "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held.add(lock_path)
        try:
            yield
        finally:
            held.discard(lock_path)
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_rows(csv_path: Path, rows: list[dict]) -> None:
    """Add ``rows`` to the CSV, matching columns by name, via a temporary file and an atomic rename.

    The old rows are read with :func:`read_rows` (broken lines are set aside, not carried forward). The whole
    read-extend-replace holds the file's lock, so concurrent writers add their rows one after the other.
    """
    if not rows:
        return
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(csv_path):
        # Old rows are read as text and written back unchanged (no type guessing: a key "0123" stays "0123").
        old = read_rows(csv_path, dtype=str, keep_default_na=False)
        tmp = csv_path.with_suffix(".csv.tmp")
        pd.concat([old, pd.DataFrame(rows)], ignore_index=True).to_csv(tmp, index=False)
        tmp.replace(csv_path)


def report_main(
    module: str,
    doc: str,
    default_csv: Path,
    write_report: Callable[[Path, Path | None], list[Path]],
    argv: Iterable[str] | None = None,
) -> int:
    """The command line of a report made from one ``runs.csv``: ``python -m <module> [CSV] [--out FOLDER]`` calls
    ``write_report(csv, out)`` and prints the paths it wrote. ``doc``'s first paragraph is the description."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("csv", type=Path, nargs="?", default=default_csv)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(None if argv is None else list(argv))
    for path in write_report(args.csv, args.out):
        print(path)
    return 0
