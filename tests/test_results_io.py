"""Results CSVs: broken lines (a write cut short, a row without its key) are detected, logged and set aside."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from simulations.results_io import bad_rows_path, finished_keys, read_rows, save_rows

HEADER = "run-key,method,acc\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_clean_file_reads_like_pandas_and_is_left_alone(tmp_path: Path):
    text = HEADER + 'k1,"wm, tree",81.5\nk2,"multi\nline",\n\nk3,ste,70\n'
    csv = write(tmp_path / "runs.csv", text)
    assert read_rows(csv).equals(pd.read_csv(csv))
    assert csv.read_text() == text and not bad_rows_path(csv).exists()


def test_missing_and_empty_files_give_no_rows(tmp_path: Path):
    assert read_rows(tmp_path / "none.csv").empty
    assert read_rows(write(tmp_path / "empty.csv", "")).empty
    assert read_rows(write(tmp_path / "blank.csv", "\n\n")).empty


def test_a_cut_last_line_is_warned_about_and_set_aside(tmp_path: Path, caplog):
    csv = write(tmp_path / "runs.csv", HEADER + "k1,wm,81.5\nk2,ste,70.0\nk3,s")
    with caplog.at_level(logging.WARNING, logger="simulations"):
        rows = read_rows(csv)
    assert rows["run-key"].tolist() == ["k1", "k2"]
    assert csv.read_text() == HEADER + "k1,wm,81.5\nk2,ste,70.0\n"
    assert bad_rows_path(csv) == tmp_path / "runs.csv.bad" and bad_rows_path(csv).read_text() == "k3,s\n"
    (record,) = caplog.records
    assert f"{csv}, line 4" in record.message and "2 fields, the header has 3" in record.message
    assert read_rows(csv)["run-key"].tolist() == ["k1", "k2"] and len(caplog.records) == 1  # fixed for good


def test_a_last_line_cut_inside_its_last_field_is_caught_by_its_missing_line_end(tmp_path: Path, caplog):
    csv = write(tmp_path / "runs.csv", HEADER + "k1,wm,81.5\nk2,ste,7")
    with caplog.at_level(logging.WARNING, logger="simulations"):
        assert read_rows(csv)["run-key"].tolist() == ["k1"]
    assert "line 3" in caplog.text and "no line end" in caplog.text
    assert bad_rows_path(csv).read_text() == "k2,ste,7\n"


def test_rows_with_an_empty_key_or_extra_fields_are_set_aside(tmp_path: Path, caplog):
    csv = write(tmp_path / "runs.csv", HEADER + "k1,wm,81.5\n,ste,70\nk3,np,1,2\nk4,am,60\n")
    with caplog.at_level(logging.WARNING, logger="simulations"):
        rows = read_rows(csv, dtype={"run-key": str})
    assert rows["run-key"].tolist() == ["k1", "k4"]
    assert "line 3" in caplog.text and "empty key column(s) ['run-key']" in caplog.text
    assert "line 4" in caplog.text and "4 fields, the header has 3" in caplog.text
    assert bad_rows_path(csv).read_text() == ",ste,70\nk3,np,1,2\n"


def test_required_columns_are_keys_too(tmp_path: Path, caplog):
    csv = write(tmp_path / "table.csv", "pair,seed,acc\nA,0,1.0\nB,,2.0\n")
    with caplog.at_level(logging.WARNING, logger="simulations"):
        assert read_rows(csv, required=("pair", "seed"))["pair"].tolist() == ["A"]
    assert "empty key column(s) ['seed']" in caplog.text


def test_an_unclosed_quote_sets_the_rest_aside(tmp_path: Path):
    csv = write(tmp_path / "runs.csv", HEADER + 'k1,wm,81.5\nk2,"ste')
    assert read_rows(csv)["run-key"].tolist() == ["k1"]
    assert bad_rows_path(csv).read_text() == 'k2,"ste\n'


def test_save_rows_does_not_carry_a_cut_line_forward(tmp_path: Path):
    csv = write(tmp_path / "runs.csv", HEADER + "k1,wm,81.5\nk2,st")
    save_rows(csv, [{"run-key": "k3", "method": "np", "acc": 75.0}])
    assert pd.read_csv(csv)["run-key"].tolist() == ["k1", "k3"]
    assert bad_rows_path(csv).read_text() == "k2,st\n"


def _save_one_by_one(csv: Path, writer: str, count: int, start: Any) -> None:
    start.wait(timeout=60)
    for i in range(count):
        save_rows(csv, [{"run-key": f"{writer}-{i}", "method": "wm", "acc": float(i)}])


def test_two_writers_at_once_lose_no_row(tmp_path: Path):
    """Two sweeps appending to one CSV side by side (e.g. one per seed): every row of both ends up in the file."""
    csv = tmp_path / "runs.csv"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    writers = [context.Process(target=_save_one_by_one, args=(csv, name, 100, start)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    keys = set(pd.read_csv(csv)["run-key"])
    assert keys == {f"{name}-{i}" for name in ("a", "b") for i in range(100)}


def test_setting_broken_lines_aside_waits_for_a_writer_and_keeps_its_row(tmp_path: Path):
    csv = write(tmp_path / "runs.csv", HEADER + "k1,wm,81.5\nk2,st")
    with open(tmp_path / "runs.csv.lock", "a") as lock:  # a writer in another process holds the file
        fcntl.flock(lock, fcntl.LOCK_EX)
        read: dict[str, list[str]] = {}
        reader = threading.Thread(target=lambda: read.update(keys=read_rows(csv)["run-key"].tolist()))
        reader.start()
        time.sleep(0.5)
        assert "k2,st" in csv.read_text()  # the reader does not rewrite the file under the writer
        write(csv, HEADER + "k1,wm,81.5\nk3,np,80.0\nk2,st")  # the writer's new row (the cut line still last)
        fcntl.flock(lock, fcntl.LOCK_UN)
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert read["keys"] == ["k1", "k3"]
    assert csv.read_text() == HEADER + "k1,wm,81.5\nk3,np,80.0\n"


def test_when_the_bad_rows_cannot_be_set_aside_they_are_still_skipped(tmp_path: Path, caplog):
    text = HEADER + "k1,wm,81.5\nk2,st"
    csv = write(tmp_path / "runs.csv", text)
    bad_rows_path(csv).mkdir()  # the .bad file cannot be written
    with caplog.at_level(logging.WARNING, logger="simulations"):
        assert read_rows(csv)["run-key"].tolist() == ["k1"]
    assert csv.read_text() == text
    assert "cannot set its broken rows aside" in caplog.text


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_line_numbers_count_multi_line_records(tmp_path: Path, caplog, ending: str):
    text = HEADER + f'k1,"two{ending}lines",1{ending}k2,x{ending}'
    csv = tmp_path / "runs.csv"
    csv.write_bytes(text.replace("\n", ending).replace("\r\r", "\r").encode())
    with caplog.at_level(logging.WARNING, logger="simulations"):
        assert read_rows(csv)["run-key"].tolist() == ["k1"]
    assert "line 4" in caplog.text


def test_line_ends_are_kept_when_the_file_is_rewritten(tmp_path: Path):
    csv = tmp_path / "runs.csv"
    csv.write_bytes(b"run-key,acc\r\nk1,1\r\nk2")
    assert read_rows(csv)["run-key"].tolist() == ["k1"]
    assert csv.read_bytes() == b"run-key,acc\r\nk1,1\r\n"


def test_unusual_unicode_line_breaks_inside_a_value_are_not_row_ends(tmp_path: Path):
    csv = write(tmp_path / "runs.csv", "run-key,note\nk1,a\u2028b\nk2,c\n")
    assert read_rows(csv)["run-key"].tolist() == ["k1", "k2"] and not bad_rows_path(csv).exists()


def test_finished_keys_are_read_as_text(tmp_path: Path):
    csv_path = tmp_path / "runs.csv"
    assert finished_keys(csv_path) == set()  # no file yet
    save_rows(csv_path, [{"run-key": "0123456789012345", "acc": 1.0}, {"run-key": "00ab", "acc": 2.0}])
    assert finished_keys(csv_path) == {"0123456789012345", "00ab"}  # all digits: the leading zero is kept
