"""What the coordinator reports about itself (status endpoint, logs)."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    status: str  # "ok" | "degraded"
    connected: bool
    intake_position: int  # the intake stream's sequence recorded up to
    ledger_position: int  # the ledger's last event
    relayed_position: int  # the ledger event the relay published up to
    relay_lag: int  # ledger events not yet on the ledger stream (or delivered)
    events_recorded: int
    last_error: str | None


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

    def recorded(self, events: int, position: int) -> None:
        self.events_recorded += events
        self.intake_position = position
        self.ledger_failing = False

    def ledger_error(self, text: str) -> None:
        self.last_error = text
        self.ledger_failing = True

    def report(self) -> HealthReport:
        ok = self.connected and not self.ledger_failing
        return HealthReport(status="ok" if ok else "degraded", connected=self.connected,
                            intake_position=self.intake_position,
                            ledger_position=self.ledger_position,
                            relayed_position=self.relayed_position,
                            relay_lag=max(0, self.ledger_position - self.relayed_position),
                            events_recorded=self.events_recorded, last_error=self.last_error)
