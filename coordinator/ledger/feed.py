"""What the writer just committed, handed to the relay without reading it back.

The notification log stays the relay's source of truth. The feed only answers "what
follows position P?" when it can vouch for the answer: every position after P present and
in order. Otherwise (a gap from a commit whose outcome was unclear, an overflow, a restart)
it says so, and the relay reads the log as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from eventsourcing.persistence import Notification


class CommitFeed:
    """Filled by the writer's thread after each commit; drained by the relay's loop.

    ``deque`` appends and pops are atomic, so the two sides need no lock. Bounded: a relay
    that falls behind loses the oldest entries, sees the gap and reads the log instead.
    """

    def __init__(self, maxlen: int = 8192) -> None:
        self._items: deque[Notification] = deque(maxlen=maxlen)

    def add(self, stored: Sequence[Notification]) -> None:
        """What a commit stored, as the log holds it (``Ledger.append`` gives it)."""
        self._items.extend(stored)

    def after(self, position: int, limit: int) -> list[Notification] | None:
        """Up to ``limit`` notifications right after ``position``, exactly as the log holds
        them ([] if nothing new is known); None if the feed cannot vouch for what follows."""
        out: list[Notification] = []
        while len(out) < limit:
            try:
                notification = self._items.popleft()
            except IndexError:
                break
            if notification.id <= position:
                continue  # relayed already, from the log
            if notification.id != position + 1:
                return None  # a gap: only the log knows what is there
            out.append(notification)
            position = notification.id
        return out
