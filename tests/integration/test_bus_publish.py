"""Pipelined JetStream publishes (``Bus.publish_all`` / ``start_publish``) on a real server:
acks in order, duplicates reported, refusals and missing streams raised as BusError."""

from __future__ import annotations

import uuid

import anyio
import nats
import pytest
from nats.aio.msg import Msg

from bus.client import EXPECTED_LAST_MSG_ID, MSG_ID, BusError, BusSettings, open_bus
from bus.embedded import EmbeddedNats
from bus.topology import StreamSpec


def _stream(prefix: str) -> tuple[StreamSpec, str]:
    name = f"PUB_{prefix.upper()}"
    return StreamSpec(name=name, subjects=(f"{prefix}.pub.>",), retention="limits"), name


async def test_publish_all_acks_in_order_and_reports_duplicates(
        nats_server: EmbeddedNats, prefix: str) -> None:
    spec, name = _stream(prefix)
    async with open_bus(BusSettings(url=nats_server.url, name="pub-test")) as bus:
        await bus.ensure_streams([spec])
        items = [(f"{prefix}.pub.{i % 3}", f"m{i}".encode(), {MSG_ID: f"id-{i}"})
                 for i in range(300)]
        acks = await bus.publish_all(items)
        assert [a.seq for a in acks] == list(range(1, 301))
        assert {a.stream for a in acks} == {name}
        assert not any(a.duplicate for a in acks)
        again = await bus.publish_all(items[:5])
        assert [(a.seq, a.duplicate) for a in again] == [(s, True) for s in range(1, 6)]
        stored = await bus.stored(name, 300)
        assert stored is not None
        assert stored[1] == b"m299"


async def test_a_refused_publish_raises_and_stores_nothing(
        nats_server: EmbeddedNats, prefix: str) -> None:
    spec, name = _stream(prefix)
    async with open_bus(BusSettings(url=nats_server.url, name="pub-test")) as bus:
        await bus.ensure_streams([spec])
        await bus.publish_all([(f"{prefix}.pub.a", b"first", {MSG_ID: "first"})])
        wrong = {MSG_ID: "second", EXPECTED_LAST_MSG_ID: "not-the-last"}
        with pytest.raises(BusError, match=f"publish to {prefix}.pub.a refused: .*last"):
            await bus.publish_all([(f"{prefix}.pub.a", b"second", wrong)])
        assert await bus.last_msg_id(name) == "first"
        # The right expectation goes through.
        right = {MSG_ID: "second", EXPECTED_LAST_MSG_ID: "first"}
        (ack,) = await bus.publish_all([(f"{prefix}.pub.a", b"second", right)])
        assert ack.seq == 2


@pytest.mark.parametrize(("subject_suffix", "headers", "size", "why"), [
    pytest.param("a", {MSG_ID: "two\r\nlines"}, 5, "line break", id="header-line-break"),
    pytest.param("a b", {MSG_ID: "blank"}, 5, "blank", id="blank-in-subject"),
    pytest.param("a", {MSG_ID: "big"}, 2 * 1024 * 1024, "limit", id="over-max-payload"),
])
async def test_a_message_that_cannot_be_framed_is_refused_before_any_is_sent(
        nats_server: EmbeddedNats, prefix: str, subject_suffix: str, headers: dict[str, str],
        size: int, why: str) -> None:
    spec, name = _stream(prefix)
    async with open_bus(BusSettings(url=nats_server.url, name="pub-test")) as bus:
        await bus.ensure_streams([spec])
        fine = (f"{prefix}.pub.ok", b"fine", {MSG_ID: "fine"})
        with pytest.raises(BusError, match=why):
            await bus.publish_all([fine, (f"{prefix}.pub.{subject_suffix}", b"x" * size,
                                          headers)])
        await bus.flush()
        assert await bus.last_msg_id(name) is None  # not even the good one went out
        (ack,) = await bus.publish_all([fine])  # and the connection still works
        assert ack.seq == 1


async def test_a_publish_no_stream_takes_fails_instead_of_hanging(
        nats_server: EmbeddedNats, prefix: str) -> None:
    async with open_bus(BusSettings(url=nats_server.url, name="pub-test")) as bus:
        pending = await bus.start_publish(f"{prefix}.nowhere", b"lost",
                                          msg_id=str(uuid.uuid4()))
        with pytest.raises(BusError, match="no stream answered"):
            await pending.wait(timeout=5)
        with pytest.raises(BusError, match="no stream answered"):
            await bus.publish_all([(f"{prefix}.nowhere", b"lost", {MSG_ID: "x"})], timeout=5)


def _chain(prefix: str, ids: range, expect_before: str | None = None
           ) -> list[tuple[str, bytes, dict[str, str]]]:
    out = []
    previous = expect_before
    for i in ids:
        headers = {MSG_ID: f"c-{i}"}
        if previous is not None:
            headers[EXPECTED_LAST_MSG_ID] = previous
        out.append((f"{prefix}.pub.{i % 3}", f"c{i}".encode(), headers))
        previous = f"c-{i}"
    return out


async def test_a_chain_is_acked_once_and_its_last_ack_vouches_for_every_link(
        nats_server: EmbeddedNats, prefix: str) -> None:
    spec, name = _stream(prefix)
    async with open_bus(BusSettings(url=nats_server.url, name="pub-test")) as bus:
        await bus.ensure_streams([spec])
        head = [(f"{prefix}.pub.h", b"head", {MSG_ID: "head"})]
        acks = await bus.publish_all(head, chain=_chain(prefix, range(1, 301), "head"))
        assert [(a.seq, a.duplicate) for a in acks] == [(1, False), (301, False)]
        assert await bus.last_msg_id(name) == "c-300"
        stored = await bus.stored(name, 151)
        assert stored is not None
        assert stored[1] == b"c150"
        # Republished after a crash: every link a duplicate, nothing stored twice.
        (again,) = await bus.publish_all([], chain=_chain(prefix, range(1, 301), "head"))
        assert (again.seq, again.duplicate) == (301, True)

        # One link the stream refuses (it expects what is not the last) fails all after it,
        # and the one ack says so; the stream keeps exactly the links before it.
        links = _chain(prefix, range(301, 321), "c-300")
        links[4][2][EXPECTED_LAST_MSG_ID] = "not-the-last"
        with pytest.raises(BusError, match=r"refused: .*last"):
            await bus.publish_all([], chain=links)
        assert await bus.last_msg_id(name) == "c-304"


async def test_an_ack_that_never_comes_times_out_and_a_cancelled_wait_stops(
        nats_server: EmbeddedNats, prefix: str) -> None:
    # A plain subscriber takes the message and never answers: no stream, no 503 either.
    silent = await nats.connect(nats_server.url)
    try:
        await silent.subscribe(f"{prefix}.silent", cb=_ignore)
        await silent.flush()
        async with open_bus(BusSettings(url=nats_server.url, name="pub-test")) as bus:
            pending = await bus.start_publish(f"{prefix}.silent", b"x", msg_id="s1")
            started = anyio.current_time()
            with pytest.raises(BusError, match=r"no ack within 0\.3 s"):
                await pending.wait(timeout=0.3)
            assert 0.25 < anyio.current_time() - started < 5
            other = await bus.start_publish(f"{prefix}.silent", b"y", msg_id="s2")
            with anyio.move_on_after(0.2) as scope:
                await other.wait(timeout=30)
            assert scope.cancelled_caught  # the caller's deadline wins over the ack's
    finally:
        await silent.close()


async def _ignore(msg: Msg) -> None:
    return None
