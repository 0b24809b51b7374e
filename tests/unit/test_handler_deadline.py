"""How long the agent runtime lets a handler run (agents/runtime.py ``_time_allowed``)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from agents.runtime import AgentSettings, _time_allowed

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SETTINGS = AgentSettings("nats://unused", clock=lambda: NOW)


def test_a_handler_runs_well_past_its_deadline_before_it_is_cancelled() -> None:
    assert _time_allowed(NOW + timedelta(seconds=30), SETTINGS) == 46.0


def test_a_clock_a_little_ahead_of_the_coordinators_does_not_cut_a_handler_short() -> None:
    """This machine's clock 10 s ahead: the attempt seems to have 20 s left of its 30;
    the handler is still cancelled only after the coordinator's own timeout."""
    seems_left = NOW + timedelta(seconds=20)
    assert _time_allowed(seems_left, SETTINGS) > 30


def test_a_delivery_past_its_deadline_or_without_one_runs_without_a_limit() -> None:
    """Late, or the clocks disagree by more than the deadline: handled as before."""
    assert _time_allowed(NOW - timedelta(seconds=5), SETTINGS) == math.inf
    assert _time_allowed(None, SETTINGS) == math.inf
