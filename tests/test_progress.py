"""progress.py in a log (a stream that is not a terminal): which lines a loop prints, on a clock
that the test advances by hand (5 s per item), so the expected lines are counted here."""

from __future__ import annotations

import io

import pytest

from pelvicseg import progress as progress_module
from pelvicseg.progress import progress


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now["t"])
    return now


def run(clock, n_items, **options):
    stream = io.StringIO()
    for _ in progress(range(n_items), "train", stream=stream, **options):
        clock["t"] += 5.0  # each item takes 5 s: item i (from 1) starts at 5 (i - 1) s
    return stream.getvalue().splitlines()


def test_a_log_gets_the_first_item_then_a_line_every_interval_then_done(clock):
    # items start at 0, 5, ..., 45 s: lines at item 1 (0 s), item 5 (20 s), item 9 (40 s), then done
    assert run(clock, 10) == ["train: 1 of 10", "train: 5 of 10", "train: 9 of 10", "train: 10 of 10 done"]


def test_a_short_pass_with_quiet_time_prints_nothing(clock):
    assert run(clock, 10, quiet_for_s=60, interval_s=60) == []  # the last item starts at 45 s


def test_a_long_pass_with_quiet_time_reports_after_it(clock):
    # 30 items, starting at 0 .. 145 s: the first line at 60 s (item 13), the next at 120 s (item 25), then done
    assert run(clock, 30, quiet_for_s=60, interval_s=60) == ["train: 13 of 30", "train: 25 of 30",
                                                            "train: 30 of 30 done"]


def test_nothing_when_disabled(clock):
    assert run(clock, 30, enabled=False) == []
