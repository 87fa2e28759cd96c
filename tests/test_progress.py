"""Progress reporting: heartbeat log lines off a terminal, silence when asked, a clear error on a bad interval."""

import logging
from types import SimpleNamespace

import pytest

from fedmerge.progress import INTERVAL_VARIABLE, heartbeat, heartbeat_interval, progress


class FakeClock:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_heartbeat_logs_once_per_interval_with_time_left(caplog):
    caplog.set_level(logging.INFO, logger="fedmerge.progress")
    items = list(heartbeat(range(10), "distill", total=10, interval=3.0, clock=FakeClock(1.0)))
    assert items == list(range(10))
    lines = [record.getMessage() for record in caplog.records]
    # the clock reads 1 at the start and 1 + k after item k: lines after items 3, 6 and 9
    assert len(lines) == 3
    assert lines[0] == "distill: 3/10 (30%), 3 s so far, about 7 s left"
    assert lines[-1].startswith("distill: 9/10 (90%)")


def test_heartbeat_is_silent_for_a_short_loop_and_counts_without_a_total(caplog):
    caplog.set_level(logging.INFO, logger="fedmerge.progress")
    list(heartbeat(range(5), "short", total=5, interval=60.0, clock=FakeClock(1.0)))
    assert caplog.records == []
    list(heartbeat(iter(range(4)), "open-ended", interval=2.0, clock=FakeClock(1.0)))
    assert [record.getMessage() for record in caplog.records] == [
        "open-ended: 2 done, 2 s so far",
        "open-ended: 4 done, 4 s so far",
    ]


def test_progress_off_a_terminal_logs_heartbeats_unless_silenced(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fedmerge.progress")
    monkeypatch.setattr("fedmerge.progress.Console", lambda: SimpleNamespace(is_terminal=False))
    monkeypatch.setenv("FEDMERGE_PROGRESS", "1")
    monkeypatch.setenv(INTERVAL_VARIABLE, "1e-9")  # every item passes the interval
    assert list(progress(range(3), "loop", total=3)) == [0, 1, 2]
    assert len(caplog.records) == 3 and caplog.records[-1].getMessage().startswith("loop: 3/3 (100%)")
    caplog.clear()
    monkeypatch.setenv("FEDMERGE_PROGRESS", "0")
    assert list(progress(range(3), "loop", total=3)) == [0, 1, 2]
    monkeypatch.setenv("FEDMERGE_PROGRESS", "1")
    assert list(progress(range(3), "loop", total=3, enabled=False)) == [0, 1, 2]
    assert caplog.records == []


@pytest.mark.parametrize("text", ["soon", "0", "-5", "nan"])
def test_a_bad_interval_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv(INTERVAL_VARIABLE, text)
    with pytest.raises(ValueError, match=INTERVAL_VARIABLE):
        heartbeat_interval()


def test_the_interval_defaults_to_a_minute(monkeypatch):
    monkeypatch.delenv(INTERVAL_VARIABLE, raising=False)
    assert heartbeat_interval() == 60.0
    monkeypatch.setenv(INTERVAL_VARIABLE, "2.5")
    assert heartbeat_interval() == 2.5
