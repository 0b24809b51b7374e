"""Errors of ledgermesh. One root; every error a user can meet is one of these.

    LedgermeshError
    ├── MalformedMessageError      bytes on a subject that are not a valid message
    ├── PolicyError                ledgermesh.toml is invalid (coordinator.policy)
    ├── LedgerError                the ledger cannot be opened or read (coordinator.ledger)
    │   └── ChainBrokenError       a stored event does not match its hash chain
    ├── BusError                   NATS cannot be reached or refused a request (bus)
    │   └── NatsServerNotFoundError / EmbeddedNatsError (bus.embedded)
    └── AgentLoadError             ``module:attr`` does not name an Agent (agents)

Programmer mistakes raise ValueError / TypeError as usual.
"""

from __future__ import annotations


class LedgermeshError(Exception):
    """Root of every error ledgermesh raises on purpose."""


class MalformedMessageError(LedgermeshError):
    """Bytes that arrived on ``subject`` are not a valid message."""

    def __init__(self, subject: str, reason: str, what: str = "message") -> None:
        super().__init__(f"cannot decode {what} on {subject!r}: {reason}")
        self.subject = subject
        self.reason = reason
