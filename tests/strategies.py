"""Shared Hypothesis strategies for the wire contracts (one module, as in attrs' tests).

Everything generated here survives a JSON round trip unchanged: timestamps are
timezone-aware UTC with microsecond precision, floats are finite, integers fit in 64 bits,
JSON arrays are lists and ``labels`` are tuples (what msgspec decodes them to).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from schemas.messages import (
    ApproveTool,
    Body,
    Complete,
    Delivery,
    Envelope,
    Fail,
    HandoffDecision,
    HandoffRequest,
    ResumeAgent,
    Say,
    SubmitTask,
    SuspendAgent,
    ToolCall,
)

__all__ = [
    "BODY_STRATEGIES",
    "bodies",
    "deliveries",
    "envelopes",
    "json_values",
    "payloads",
    "timestamps",
    "tokens",
]

TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
INT64 = 2**63


def tokens(max_size: int = 40) -> st.SearchStrategy[str]:
    """Valid NATS subject tokens: ``[A-Za-z0-9_-]{1,max_size}``."""
    return st.text(TOKEN_ALPHABET, min_size=1, max_size=max_size)


def tool_names() -> st.SearchStrategy[str]:
    """Dotted lowercase tool names, e.g. ``kb.search``."""
    word = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
    return st.lists(word, min_size=1, max_size=3).map(".".join)


def timestamps() -> st.SearchStrategy[datetime]:
    """Timezone-aware UTC datetimes (microsecond precision), as the sender stamps ``sent_at``."""
    return st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.just(UTC),
    )


def _scalars() -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        | st.integers(-INT64, INT64 - 1)
        | st.text(max_size=20)
        | st.floats(allow_nan=False, allow_infinity=False)
    )


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value: scalars, and small nested lists and objects of them."""
    return st.recursive(
        _scalars(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def payloads() -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects with str keys, as carried in ``payload`` / ``input``."""
    return st.dictionaries(st.text(max_size=10), json_values(), max_size=5)


def _text() -> st.SearchStrategy[str]:
    return st.text(max_size=30)


# One strategy per body Struct (a test checks that it covers schemas.messages.BODY_TYPES).
BODY_STRATEGIES: dict[type[Body], st.SearchStrategy[Body]] = {
    SubmitTask: st.builds(SubmitTask, to=tokens(), title=_text(), payload=payloads()),
    Say: st.builds(Say, text=_text()),
    HandoffRequest: st.builds(HandoffRequest, to=tokens(), reason=_text(), payload=payloads()),
    HandoffDecision: st.builds(HandoffDecision, accept=st.booleans(), reason=_text()),
    Complete: st.builds(Complete, result=_text(), payload=payloads()),
    Fail: st.builds(Fail, reason=_text(), retryable=st.booleans()),
    ToolCall: st.builds(ToolCall, tool=tool_names(), args=payloads()),
    ApproveTool: st.builds(ApproveTool, tool=tool_names(), reason=_text()),
    SuspendAgent: st.builds(SuspendAgent, agent=tokens(), reason=_text()),
    ResumeAgent: st.builds(ResumeAgent, agent=tokens(), reason=_text()),
}


def bodies() -> st.SearchStrategy[Body]:
    """Any body, every body Struct being drawn."""
    return st.one_of(*BODY_STRATEGIES.values())


def _ids() -> st.SearchStrategy[str]:
    return st.uuids().map(str)


def _labels() -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(tokens(20), max_size=3).map(tuple)


def envelopes(
    body: st.SearchStrategy[Body] | None = None,
) -> st.SearchStrategy[Envelope]:
    """Any envelope; optional fields are sometimes left at their defaults."""
    return st.builds(
        Envelope,
        id=_ids(),
        sender=tokens(),
        task_id=tokens(),
        sent_at=timestamps(),
        body=bodies() if body is None else body,
        causation_id=st.none() | _ids(),
        trace=st.none() | _text(),
        labels=_labels(),
        attempt=st.integers(0, 1000),
    )


def deliveries() -> st.SearchStrategy[Delivery]:
    """Any delivery, wrapping any envelope."""
    return st.builds(
        Delivery,
        id=_ids(),
        agent=tokens(),
        task_id=tokens(),
        attempt=st.integers(0, 1000),
        title=_text(),
        input=payloads(),
        envelope=envelopes(),
        labels=_labels(),
    )
