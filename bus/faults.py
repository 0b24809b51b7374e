"""Crash points for fault-injection tests and demos: die exactly here, like ``kill -9``.

``LEDGERMESH_CRASH_AT=coordinator.after_commit`` makes the process call ``os._exit`` the
first time it reaches that point; ``agent.handler@warranty@"attempt":2`` only when
the context text (the delivery, the batch) contains every ``@``-separated part. Read
once at start-up by the CLI and passed down; an empty ``CrashPoints`` does nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("ledgermesh.faults")

ENV = "LEDGERMESH_CRASH_AT"
EXIT_CODE = 86
POINTS = frozenset({
    "coordinator.after_receive",  # a batch pulled from intake, nothing recorded yet
    "coordinator.after_commit",  # recorded in the ledger, intake not acked
    "coordinator.before_relay",  # acked, the relay has not published the batch
    "agent.handler",  # a delivery received, handler about to run
    "agent.before_ack",  # outputs stored in intake, delivery not acked
})


@dataclass(frozen=True)
class CrashPoints:
    points: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (point, substrings that must match)

    @classmethod
    def parse(cls, spec: str | None) -> CrashPoints:
        if not spec:
            return cls()
        points = []
        for item in spec.split(","):
            point, *match = item.strip().split("@")
            if point not in POINTS:
                raise ValueError(f"{ENV}: unknown crash point {point!r} "
                                 f"(known: {', '.join(sorted(POINTS))})")
            points.append((point, tuple(match)))
        return cls(tuple(points))

    @classmethod
    def from_environment(cls) -> CrashPoints:
        return cls.parse(os.environ.get(ENV))

    def reached(self, point: str, context: bytes | str = "") -> None:
        """Exit the process at once if ``point`` is armed (and its match is in context)."""
        for armed, match in self.points:
            if armed != point:
                continue
            text = context.decode("utf-8", "replace") if isinstance(context, bytes) else context
            if not all(part in text for part in match):
                continue
            log.critical("crash point %s reached: exiting with %d", point, EXIT_CODE)
            logging.shutdown()
            os._exit(EXIT_CODE)


NO_CRASH = CrashPoints()  # immutable: the default everywhere a crash point can be armed
