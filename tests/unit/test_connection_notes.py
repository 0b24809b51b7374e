"""A connection's notes are said once, then counted: a server down for an hour is not
7,200 identical log lines per process."""

from __future__ import annotations

from bus.client import _Repeats


def test_the_same_note_is_said_once_then_counted_every_window() -> None:
    now = [0.0]
    repeats = _Repeats(every_s=30.0, clock=lambda: now[0])
    said = []
    for _ in range(120):  # every half second for a minute
        said.append(repeats.first_or_count("error: [Errno 111] Connect call failed"))
        now[0] += 0.5
    lines = [line for line in said if line is not None]
    assert lines == ["error: [Errno 111] Connect call failed",
                     "error: [Errno 111] Connect call failed (and 59 more time(s) in the last "
                     "30 s)"]


def test_different_notes_are_each_said() -> None:
    repeats = _Repeats(clock=lambda: 0.0)
    assert repeats.first_or_count("disconnected") == "disconnected"
    assert repeats.first_or_count("reconnected") == "reconnected"
    assert repeats.first_or_count("disconnected") is None
