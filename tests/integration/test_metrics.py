"""The coordinator's Prometheus endpoint: the same figures as its health report, scraped
over real HTTP while it records."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats, free_port
from coordinator.ledger.events import Kind
from coordinator.service import CoordinatorSettings, run_coordinator
from ledgermesh.serve import host_port
from schemas import Subjects, SubmitTask
from tests import live
from tests.live import envelope, say, until


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        try:
            while True:
                data += await stream.receive()
        except anyio.EndOfStream:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def samples(body: bytes) -> dict[str, float]:
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines() if not line.startswith("#")}


async def test_a_scrape_reports_what_the_coordinator_recorded_and_relayed(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    port = free_port()
    settings = CoordinatorSettings(nats_server.url, ledger, live.team_policy(),
                                   Subjects(prefix), metrics=("127.0.0.1", port))
    async with anyio.create_task_group() as tg:
        await tg.start(run_coordinator, settings)
        async with open_bus(BusSettings(url=nats_server.url, name="test-client")) as bus:
            await say(bus, prefix, envelope("client", "t-m", SubmitTask(to="triage",
                                                                        title="m")))
            await bus.publish(Subjects(prefix).intake("client"), b"not json", msg_id="junk")
            await until(ledger, lambda e: any(x["kind"] == Kind.REJECTED for x in e))
        with anyio.fail_after(10):
            while True:  # the relay publishes right after the commit
                code, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert code == 200
                got = samples(body)
                if got["ledgermesh_relay_lag_events"] == 0:
                    break
                await anyio.sleep(0.05)
        assert f'ledgermesh_ledger_position{{prefix="{prefix}"}} 3' in body.decode()
        assert got["ledgermesh_relayed_position"] == 3
        assert got["ledgermesh_events_recorded_total"] == 3  # submitted, assigned, rejected
        assert got["ledgermesh_intake_position"] == 2
        # Counted by the principal whose subject the refused bytes came on.
        assert (f'ledgermesh_rejected_total{{prefix="{prefix}",principal="client"}} 1'
                in body.decode())
        assert "# TYPE ledgermesh_throttled_total counter" in body.decode()
        assert got["ledgermesh_coordinator_healthy"] == 1
        assert got["ledgermesh_nats_connected"] == 1
        assert "# TYPE ledgermesh_events_recorded_total counter" in body.decode()
        assert (await http(port, b"GET / HTTP/1.0\r\n\r\n"))[0] == 404
        assert (await http(port, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == 405
        head_code, head_body = await http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert (head_code, head_body) == (200, b"")
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(("text", "address"), [("127.0.0.1:9464", ("127.0.0.1", 9464)),
                                               (":9464", ("0.0.0.0", 9464)),
                                               ("[::1]:9464", ("::1", 9464))])
def test_a_metrics_address_is_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert host_port(text) == address


@pytest.mark.parametrize("text", ["9464", "host:", "host:port", "h:70000"])
def test_a_bad_metrics_address_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--metrics takes HOST:PORT"):
        host_port(text)
