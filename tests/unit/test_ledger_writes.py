"""Ledger writes run one at a time, in the order asked: on one thread (a cancelled caller
still waits for its call to end: no commit left running unowned), or inline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

from coordinator.ledger.store import is_postgres
from coordinator.ledger_writes import LedgerWrites


async def _ask_twenty_at_once(writes: LedgerWrites,
                              call: Callable[[int], int]) -> dict[int, int]:
    """``call(i)`` for i in 0..19, each asked by its own task at once; then close."""
    results: dict[int, int] = {}

    async def ask(i: int) -> None:
        results[i] = await writes.run(call, i)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(ask, i)
    finally:
        writes.close()
    return results


async def test_calls_run_one_at_a_time_in_order_on_one_thread() -> None:
    writes = LedgerWrites(threaded=True)
    running, seen, threads = [0], [], set()

    def call(i: int) -> int:
        running[0] += 1
        assert running[0] == 1, "two calls at once"
        threads.add(threading.get_ident())
        time.sleep(0.002)
        seen.append(i)
        running[0] -= 1
        return i * i

    results = await _ask_twenty_at_once(writes, call)
    assert seen == list(range(20))  # queued in the order asked
    assert results == {i: i * i for i in range(20)}
    assert len(threads) == 1
    assert threading.get_ident() not in threads


async def test_a_cancelled_caller_waits_for_its_call_to_end() -> None:
    writes = LedgerWrites(threaded=True)
    finished = threading.Event()

    def commit() -> None:
        time.sleep(0.3)
        finished.set()

    try:
        with anyio.move_on_after(0.05) as scope:
            await writes.run(commit)  # the deadline passes meanwhile
            ended_first = finished.is_set()
            await anyio.sleep(5)  # where the pending cancellation lands
        assert scope.cancelled_caught
        assert ended_first
    finally:
        writes.close()


async def test_an_exception_in_the_call_reaches_the_caller() -> None:
    writes = LedgerWrites(threaded=True)

    def broken() -> None:
        raise ValueError("disk full")

    try:
        with pytest.raises(ValueError, match="disk full"):
            await writes.run(broken)
        assert await writes.run(lambda: 42) == 42  # the thread goes on
    finally:
        writes.close()


async def test_inline_writes_run_on_the_callers_thread_in_order() -> None:
    writes = LedgerWrites(threaded=False)
    seen: list[tuple[int, int]] = []

    def call(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * i

    results = await _ask_twenty_at_once(writes, call)
    assert not writes.threaded
    assert [i for i, _ in seen] == list(range(20))
    assert {thread for _, thread in seen} == {threading.get_ident()}
    assert results == {i: i * i for i in range(20)}


async def test_an_inline_exception_reaches_the_caller() -> None:
    writes = LedgerWrites(threaded=False)

    def broken() -> None:
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        await writes.run(broken)
    assert await writes.run(lambda: 42) == 42
    writes.close()


def test_postgres_locations_are_told_from_sqlite_paths() -> None:
    assert is_postgres("postgresql://postgres@127.0.0.1:5432/test")
    assert is_postgres("postgres://u:p@db/ledger")
    assert not is_postgres("ledgermesh-data/ledger.db")
    assert not is_postgres("/var/lib/postgresql/ledger.db")
