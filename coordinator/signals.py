"""Small coordination primitives between the coordinator's tasks."""

from __future__ import annotations

import anyio


class Doorbell:
    """Wakes one waiter when there is new work; rings while nobody waits are kept."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Until rung (True) or ``timeout`` seconds pass without a ring (False)."""
        if not self._event.is_set():  # (a cancel scope only when there is a wait)
            with anyio.move_on_after(timeout):
                await self._event.wait()
        rung = self._event.is_set()
        self._event = anyio.Event()
        return rung
