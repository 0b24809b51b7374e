"""``ledgermesh submit`` interrupted, or losing NATS, while it waits for the verdict: it
says whether the task was sent (so that nobody sends it twice), never a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import anyio
import pytest

from bus.client import BusSettings, open_bus
from bus.embedded import find_nats_server, free_port
from bus.topology import streams
from schemas import Subjects


@pytest.fixture
def nats_without_coordinator(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A nats-server of this test's own (it is killed), with the streams a coordinator
    made, and no coordinator: a submission waits for its verdict."""
    port = free_port()
    server = subprocess.Popen([str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port),
                               "-js", "-sd", str(tmp_path / "js")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"

    async def make_streams() -> None:
        async with open_bus(BusSettings(url=url, name="test")) as bus:
            await bus.ensure_streams(streams(Subjects("lm"), 1 << 20))

    try:
        anyio.run(make_streams)
        yield url, server
    finally:
        server.kill()
        server.wait()


def submit_then(url: str,
                act: Callable[[subprocess.Popen[bytes]], object]) -> tuple[int, str]:
    """Run ``submit`` until it waits for a verdict, then ``act()``; its exit code and
    everything it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "ledgermesh", "submit", "--nats", url,
                             "--to", "triage", "--title", "x", "--task-id", "t-wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2.5)  # (it waits 10 s for a verdict: this times out)
    assert proc.returncode is None, "submit ended before it was waiting"
    act(proc)
    out, err = proc.communicate(timeout=30)
    return proc.wait(), out.decode() + err.decode()


def test_an_interrupted_submit_says_the_task_was_sent(
        nats_without_coordinator: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = nats_without_coordinator
    code, said = submit_then(url, lambda proc: proc.send_signal(signal.SIGINT))
    assert code == 130
    assert said.strip() == ("interrupted: task t-wait was sent (the intake stream has it) and "
                            "is recorded once a coordinator reads it: no need to send it again")


def test_a_submit_that_loses_nats_says_the_task_was_sent_in_one_line(
        nats_without_coordinator: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, server = nats_without_coordinator
    code, said = submit_then(url, lambda _: server.kill())
    assert "Traceback" not in said
    assert "no need to send it again" in said
    if code == 2:  # the wait failed with the connection
        assert said.startswith("error: task t-wait was sent (the intake stream has it), then "
                               "the connection to NATS failed before a verdict ("), said
        assert len(said.strip().splitlines()) == 1, said
    else:  # or it ran out of time while reconnecting
        assert code == 1, said
        assert "not recorded yet" in said


def test_a_submit_to_a_prefix_no_coordinator_ran_with_says_so(
        nats_without_coordinator: tuple[str, subprocess.Popen[bytes]]) -> None:
    """A mistyped --prefix: no ledger stream to watch, so nothing is sent, and the error
    says where to look, not that the connection failed (it did not) or to send it again."""
    url, _ = nats_without_coordinator
    done = subprocess.run([sys.executable, "-m", "ledgermesh", "submit", "--nats", url,
                           "--prefix", "lmx", "--to", "triage", "--title", "x",
                           "--task-id", "t-typo"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: task t-typo was not sent: cannot follow lmx.ledger.task.t-typo.> in stream "
        "LMX_LEDGER (is the coordinator running with this --prefix?): stream not found")


def test_the_hint_to_watch_a_task_names_its_prefix(
        nats_without_coordinator: tuple[str, subprocess.Popen[bytes]]) -> None:
    """Pasted as printed, the hint must follow the prefix the task went to."""
    url, _ = nats_without_coordinator

    async def make_streams() -> None:
        async with open_bus(BusSettings(url=url, name="test")) as bus:
            await bus.ensure_streams(streams(Subjects("p2"), 1 << 20))

    anyio.run(make_streams)
    done = subprocess.run([sys.executable, "-m", "ledgermesh", "submit", "--nats", url,
                           "--prefix", "p2", "--to", "triage", "--title", "x",
                           "--task-id", "t-p2"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 1  # no coordinator: no verdict
    assert (f"watch for it:  ledgermesh tail --nats {url} --prefix p2 --task t-p2 "
            "--until-closed") in done.stdout
