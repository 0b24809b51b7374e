"""What ``replay-agent`` concludes from its steps: it claims agreement only where there was
something to compare."""

from __future__ import annotations

import io
from typing import Any

from ledgermesh.replay_agent import ReplayedTask, Step, render
from ledgermesh.style import Style

PLAIN = Style(color=False, stream=io.StringIO())
HANDOFF: dict[str, Any] = {"type": "handoff.request", "to": "writer", "reason": "draft",
                           "payload": {}}


def step(recorded: list[dict[str, Any]], verdict: str) -> Step:
    return Step(delivery_id="d", attempt=2, cause="HandoffRequest", recorded=recorded,
                replayed=[HANDOFF], unrecorded_tool_calls=[], verdict=verdict)


def test_attempts_that_recorded_no_output_are_nothing_to_compare() -> None:
    lines = render(ReplayedTask(agent="researcher", task_id="t", steps=[
        step([], "stopped"), step([], "stopped")]), PLAIN)
    assert lines[-1] == ("nothing to compare: no attempt of researcher on this task recorded "
                         "an output")


def test_one_attempt_that_recorded_outputs_is_a_comparison() -> None:
    lines = render(ReplayedTask(agent="researcher", task_id="t", steps=[
        step([], "stopped"), step([HANDOFF], "same")]), PLAIN)
    assert lines[-1] == "the code does what the ledger recorded"
