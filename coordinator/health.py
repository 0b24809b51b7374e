"""What the coordinator reports about itself (status endpoint, logs)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from coordinator.ledger.events import Kind, LedgerEvent

_REASON_CHARS = 200  # of a rejection's reason kept for the report
_COUNTED = frozenset({Kind.REJECTED, Kind.THROTTLED})
# Principals counted by name; beyond that many (an open server lets anybody pick a
# subject), the rest are counted together, so the report's memory stays bounded.
_MAX_PRINCIPALS = 1000
_OTHERS = "_others"


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    status: str  # "ok" | "degraded"
    connected: bool
    intake_position: int  # the intake stream's sequence recorded up to
    ledger_position: int  # the ledger's last event
    relayed_position: int  # the ledger event the relay published up to
    relay_lag: int  # ledger events not yet on the ledger stream (or delivered)
    events_recorded: int
    last_error: str | None
    # Per principal, since this coordinator started: outputs rejected (and the last
    # rejection, "code: reason"), and envelopes a rate limit dropped.
    rejected: dict[str, int] = {}
    last_rejection: dict[str, str] = {}
    throttled: dict[str, int] = {}


@dataclass
class Health:
    """Mutable counters owned by one coordinator instance (passed, never global)."""

    connected: bool = True
    intake_position: int = 0
    ledger_position: int = 0
    relayed_position: int = 0
    events_recorded: int = 0
    last_error: str | None = None
    ledger_failing: bool = False
    # What a part says is wrong now (the writer lock's check, the relay's reads), until
    # it says otherwise: the database can be down while nothing is recorded.
    problems: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    last_rejection: dict[str, str] = field(default_factory=dict)
    throttled: dict[str, int] = field(default_factory=dict)

    def recorded(self, events: int, position: int) -> None:
        self.events_recorded += events
        self.intake_position = position
        self.ledger_failing = False

    def count(self, events: Iterable[LedgerEvent]) -> None:
        """Count what a commit rejected or throttled, by the principal it came from."""
        for event in events:
            if event.kind not in _COUNTED:  # nearly every event: one set lookup
                continue
            if event.kind == Kind.REJECTED:
                principal = _bounded(self.rejected,
                                     event.data.get("subject_principal", event.sender))
                self.rejected[principal] = self.rejected.get(principal, 0) + 1
                self.last_rejection[principal] = (
                    f"{event.data['code']}: {event.data['reason']}"[:_REASON_CHARS])
            elif event.kind == Kind.THROTTLED:
                principal = _bounded(self.throttled, event.key)
                self.throttled[principal] = (self.throttled.get(principal, 0)
                                             + event.data["count"])

    def ledger_error(self, text: str) -> None:
        self.last_error = text
        self.ledger_failing = True

    def problem(self, part: str, text: str | None) -> None:
        """``part``'s problem now (None: none)."""
        if text is None:
            self.problems.pop(part, None)
        else:
            self.problems[part] = self.last_error = text

    def report(self) -> HealthReport:
        ok = self.connected and not self.ledger_failing and not self.problems
        return HealthReport(status="ok" if ok else "degraded", connected=self.connected,
                            intake_position=self.intake_position,
                            ledger_position=self.ledger_position,
                            relayed_position=self.relayed_position,
                            relay_lag=max(0, self.ledger_position - self.relayed_position),
                            events_recorded=self.events_recorded, last_error=self.last_error,
                            rejected=dict(self.rejected),
                            last_rejection=dict(self.last_rejection),
                            throttled=dict(self.throttled))


def _bounded(counts: dict[str, int], principal: str) -> str:
    """``principal``, or ``_others`` once ``counts`` holds as many names as it may."""
    if principal in counts or len(counts) < _MAX_PRINCIPALS:
        return principal
    return _OTHERS
