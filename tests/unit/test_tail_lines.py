"""``ledgermesh tail``'s lines: what each event says, and which stand out."""

from __future__ import annotations

import io

import msgspec

from ledgermesh.live import _coloured, describe
from ledgermesh.style import Style
from schemas import LedgerRecord


def record(position: int, event: dict[str, object]) -> tuple[LedgerRecord, dict[str, object]]:
    raw = msgspec.json.encode(event)
    return LedgerRecord(position=position, aggregate_id="a", version=1, topic="t",
                        event=msgspec.Raw(raw)), event


def test_a_checkpoint_says_what_it_signed_and_by_whom() -> None:
    line = describe(*record(9, {"kind": "ledger.checkpointed", "key": "checkpoints",
                                "sender": "coordinator",
                                "data": {"position": 8, "key": "NC7JMX6BWLQV52NBUYQX"}}))
    assert line.startswith("#9 ")
    assert "ledger.checkpointed" in line
    assert line.endswith("signed up to #8 by NC7JMX6BWLQV…")


def test_refusals_are_red_and_retries_yellow_on_a_terminal_only() -> None:
    tty = Style(color=True, stream=io.StringIO())
    assert _coloured(tty, "message.rejected", "x") == tty.red("x") != "x"
    assert _coloured(tty, "tool.denied", "x") == tty.red("x")
    assert _coloured(tty, "attempt.timed_out", "x") == tty.yellow("x") != "x"
    assert _coloured(tty, "message.said", "x") == "x"
    plain = Style(color=False, stream=io.StringIO())
    assert _coloured(plain, "message.rejected", "x") == "x"


def test_a_suspension_without_a_reason_says_so() -> None:
    def line(kind: str, data: dict[str, object]) -> str:
        return describe(*record(3, {"kind": kind, "key": "writer", "sender": "operator",
                                    "data": data}))

    assert line("agent.suspended", {"reason": ""}).endswith("SUSPENDED (no reason given)")
    assert line("agent.resumed", {}).endswith("resumed (no reason given)")
    assert line("agent.suspended", {"reason": "leaking"}).endswith("SUSPENDED: leaking")


def test_an_authorized_tool_call_says_on_what_grounds() -> None:
    line = describe(*record(5, {"kind": "tool.authorized", "key": "t-1", "sender": "coordinator",
                                "data": {"tool": "kb.search", "grounds": "agents.researcher."
                                         "tools lists kb.search"}}))
    assert line.endswith("kb.search allowed: agents.researcher.tools lists kb.search")
