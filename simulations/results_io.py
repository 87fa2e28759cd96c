"""Result files: CSV tables that only ever grow, written so that a crash never loses a finished row."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def save_rows(csv_path: Path, rows: list[dict]) -> None:
    """Add ``rows`` to the CSV, matching columns by name, via a temporary file and an atomic rename."""
    if not rows:
        return
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    # Old rows are read as text and written back unchanged (no type guessing: a key "0123" stays "0123").
    has_rows = csv_path.exists() and csv_path.stat().st_size > 0
    old = pd.read_csv(csv_path, dtype=str, keep_default_na=False) if has_rows else pd.DataFrame()
    tmp = csv_path.with_suffix(".csv.tmp")
    pd.concat([old, pd.DataFrame(rows)], ignore_index=True).to_csv(tmp, index=False)
    tmp.replace(csv_path)
