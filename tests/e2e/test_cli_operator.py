"""Operator commands against a running coordinator: status, approve, suspend, resume."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import agents.examples
from bus.client import BusSettings, open_bus
from bus.embedded import EmbeddedNats
from ledgermesh.processes import Child, spawn, stop_all, wait_ready
from schemas import Subjects

POLICY = Path(agents.examples.__file__).parent / "ledgermesh.toml"


@pytest.fixture
async def running(nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> AsyncIterator[Path]:
    ledger = tmp_path / "ledger.db"
    common = ["--nats", nats_server.url, "--prefix", prefix]
    children: list[Child] = [
        spawn("coordinator", ["coordinator", "run", *common, "--ledger", str(ledger),
                              "--config", str(POLICY)], tmp_path / "logs"),
        spawn("tools", ["tools", "run", "agents.examples.support:desk_tools", *common],
              tmp_path / "logs"),
    ]
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, Subjects(prefix), children)
        yield ledger
    finally:
        await stop_all(children)


async def cli(nats: EmbeddedNats, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ledgermesh", *args, "--nats", nats.url,
                               "--prefix", prefix], capture_output=True, text=True,
                              timeout=60, check=False)

    return await anyio.to_thread.run_sync(run)


async def test_operator_commands_are_recorded_or_refused_clearly(
        running: Path, nats_server: EmbeddedNats, prefix: str) -> None:
    status = await cli(nats_server, prefix, "status", "--config", str(POLICY), "--json")
    assert status.returncode == 3, status.stderr  # the coordinator is ok, its agents are not
    report = json.loads(status.stdout)
    assert report["coordinator"]["status"] == "ok"
    assert report["agents"]["triage"] is None  # no agent runs here: reported, not hidden

    done = await cli(nats_server, prefix, "submit", "--to", "triage", "--title", "Refund?",
                     "--task-id", "t-op")
    assert done.returncode == 0, done.stderr
    done = await cli(nats_server, prefix, "approve", "t-op", "--tool", "payments.refund",
                     "--reason", "customer verified by phone")
    assert done.returncode == 0, done.stderr
    assert "recorded: tool.approved (by operator)" in done.stdout

    done = await cli(nats_server, prefix, "approve", "t-nothing", "--tool", "payments.refund")
    assert done.returncode == 2
    assert done.stderr.startswith("error: refused (unknown_task)")
    # Approvals that would mean nothing: a tool the policy lacks, one that needs none.
    done = await cli(nats_server, prefix, "approve", "t-op", "--tool", "nosuch.tool")
    assert done.stderr.startswith("error: refused (unknown_tool)"), done.stderr
    done = await cli(nats_server, prefix, "approve", "t-op", "--tool", "kb.search")
    assert done.stderr.startswith("error: refused (not_privileged)"), done.stderr

    done = await cli(nats_server, prefix, "agent", "suspend", "writer", "--reason", "looping")
    assert done.returncode == 0, done.stderr
    assert "recorded: agent.suspended" in done.stdout
    done = await cli(nats_server, prefix, "agent", "suspend", "writer", "--as", "client")
    assert done.returncode == 2
    assert done.stderr.startswith("error: refused (not_operator)")
    done = await cli(nats_server, prefix, "agent", "resume", "writer")
    assert done.returncode == 0
    assert "recorded: agent.resumed" in done.stdout
    done = await cli(nats_server, prefix, "agent", "resume", "writer")
    assert done.returncode == 2
    assert done.stderr.startswith("error: refused (not_suspended): writer is not suspended")

    # The relay catches up with the ledger: the lag is counted in ledger events.
    with anyio.fail_after(20):
        while True:
            coordinator = json.loads((await cli(nats_server, prefix, "status", "--config",
                                                str(POLICY), "--json")).stdout)["coordinator"]
            if coordinator["relay_lag"] == 0:
                break
            await anyio.sleep(0.2)
    last = sqlite3.connect(running).execute("SELECT max(rowid) FROM stored_events").fetchone()
    assert coordinator["ledger_position"] == coordinator["relayed_position"] == last[0]
    assert last[0] >= 5  # submitted, assigned, approved, suspended, resumed
    human = await cli(nats_server, prefix, "status", "--config", str(POLICY))
    assert human.returncode == 3
    assert "coordinator: ok" in human.stdout
    assert f"ledger position {last[0]} · relay lag 0 events" in human.stdout
    assert "not answering" in human.stdout
    # The refusals above, counted by who asked, with the last reason.
    assert coordinator["rejected"] == {"operator": 4, "client": 1}
    assert coordinator["last_rejection"]["client"].startswith("not_operator: ")
    assert coordinator["throttled"] == {}
    assert "principal client\n  1 output(s) rejected · last: not_operator: " in human.stdout

    # The audit of an agent shows its own record beside its tasks; a client's, its refusal.
    def audit_of(agent: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "ledgermesh", "audit", "--ledger",
                               str(running), "--agent", agent, "--json"],
                              capture_output=True, text=True, timeout=60, check=True)
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    audit = await anyio.to_thread.run_sync(audit_of, "writer")
    assert [(r["kind"], r["summary"]) for r in audit["record"]] == [
        ("agent.suspended", "suspended by operator: looping"),
        ("agent.resumed", "resumed by operator")]
    audit = await anyio.to_thread.run_sync(audit_of, "client")
    [refused] = audit["record"]
    assert refused["summary"].startswith("refused: not_operator: ")


async def test_status_without_a_coordinator_says_so(nats_server: EmbeddedNats, prefix: str,
                                                    tmp_path: Path) -> None:
    done = await cli(nats_server, prefix, "status", "--config", str(POLICY))
    assert done.returncode == 1
    assert "coordinator: not answering" in done.stdout
    # Without a policy it cannot know the agents: it says so, rather than list none.
    done = await cli(nats_server, prefix, "status", "--config", str(tmp_path / "none.toml"))
    assert done.returncode == 1
    assert f"no policy at {tmp_path / 'none.toml'}: agents not asked" in done.stdout


async def test_status_counts_the_instances_of_each_agent(
        running: Path, nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    """Two researcher processes share one consumer: both are counted, and their figures
    summed (every instance answers a status request); the policy's ``instances`` is the
    bar."""
    common = ["--nats", nats_server.url, "--prefix", prefix]
    researchers = [spawn(f"researcher-{n}", ["agent", "run", "agents.examples.support:researcher",
                                              *common], tmp_path / "logs", service="researcher")
                   for n in (1, 2)]
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, Subjects(prefix), researchers)
        # Work for both: the researcher has no handler for a submission, so each is
        # handled as a recorded failure, on whichever instance pulls it.
        for n in range(6):
            done = await cli(nats_server, prefix, "submit", "--to", "researcher",
                             "--title", f"direct {n}", "--task-id", f"t-direct-{n}")
            assert done.returncode == 0, done.stderr
        with anyio.fail_after(30):
            while True:
                status = await cli(nats_server, prefix, "status", "--config", str(POLICY),
                                   "--json")
                assert status.returncode == 3, status.stderr  # writer & co. are not running
                report = json.loads(status.stdout)
                if report["agents"]["researcher"]["handled"] == 6:
                    break
                await anyio.sleep(0.3)
        assert report["agents"]["researcher"]["failed"] == 0  # (handlers did not raise)
        instances = report["instances"]
        assert instances["coordinator"] == 1
        assert instances["researcher"] == 2
        assert instances["writer"] == 0
        wants_three = tmp_path / "ledgermesh.toml"
        wants_three.write_text(POLICY.read_text().replace(
            "[agents.researcher]\n", "[agents.researcher]\ninstances = 3\n"))
        human = await cli(nats_server, prefix, "status", "--config", str(wants_three))
        assert human.returncode == 3, human.stderr
        line = next(x for x in human.stdout.splitlines() if x.startswith("agent researcher"))
        assert "up · 2 of 3 instances · handled 6 · failed 0" in line
        human = await cli(nats_server, prefix, "status", "--config", str(POLICY))
        assert "agent researcher   up · 2 instances · handled" in human.stdout
        # The exit status, for a health check: 0 once every agent of the policy runs as
        # many instances as it asks for, 3 while one runs fewer.
        for wanted, code in ((2, 0), (3, 3)):
            alone = tmp_path / f"researcher-{wanted}.toml"
            alone.write_text(f'[agents.researcher]\ndescription = "alone"\n'
                             f"instances = {wanted}\n")
            done = await cli(nats_server, prefix, "status", "--config", str(alone))
            assert done.returncode == code, done.stdout + done.stderr
    finally:
        await stop_all(researchers)


async def test_a_second_coordinator_on_a_running_ledger_is_refused(
        running: Path, nats_server: EmbeddedNats, prefix: str) -> None:
    """A second ``coordinator run`` on the same ledger (a typo, a rolling update that
    starts the new one first) stops at once and says who holds the ledger."""
    holder = running.with_name("ledger.db.lock").read_text()
    second = await cli(nats_server, prefix, "coordinator", "run", "--ledger", str(running),
                       "--config", str(POLICY))
    assert second.returncode == 2, second.stderr
    assert f"is being written by {holder.strip()}" in second.stderr
    assert "Traceback" not in second.stderr
    # Through a symlink: the same ledger, the same lock.
    link = running.with_name("link.db")
    link.symlink_to(running)
    second = await cli(nats_server, prefix, "coordinator", "run", "--ledger", str(link),
                       "--config", str(POLICY))
    assert second.returncode == 2, second.stderr
    assert f"is being written by {holder.strip()}" in second.stderr
    assert not link.with_name("link.db.signing.nk").exists()


async def test_a_ledger_behind_the_streams_it_is_started_on_is_refused(
        nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    """A new (or restored, older) ledger on streams that hold more of the log: its events
    at those positions would never be relayed, and its tasks would stall in silence."""
    first = tmp_path / "ledger.db"
    common = ["--nats", nats_server.url, "--prefix", prefix, "--config", str(POLICY)]
    coordinator = spawn("coordinator", ["coordinator", "run", *common, "--ledger", str(first)],
                        tmp_path / "logs")
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, Subjects(prefix), [coordinator])
        done = await cli(nats_server, prefix, "submit", "--to", "triage", "--title", "x")
        assert done.returncode == 0, done.stderr
    finally:
        await stop_all([coordinator])
    fresh = tmp_path / "fresh.db"
    done = await cli(nats_server, prefix, "coordinator", "run", "--ledger", str(fresh),
                     "--config", str(POLICY))
    assert done.returncode == 2, done.stderr
    assert (f"error: ledger {fresh} ends at position 0, but the NATS stream "
            f"{prefix.upper()}_LEDGER already holds its copies up to ") in done.stderr
    assert "Start it with a new --prefix (fresh streams)" in done.stderr
    # The ledger they were made from starts as before.
    coordinator = spawn("coordinator-2", ["coordinator", "run", *common, "--ledger", str(first)],
                        tmp_path / "logs", service="coordinator")
    try:
        async with open_bus(BusSettings(url=nats_server.url, name="test")) as bus:
            await wait_ready(bus, Subjects(prefix), [coordinator])
    finally:
        await stop_all([coordinator])


async def test_a_second_coordinator_on_another_ledger_but_the_same_nats_is_refused(
        running: Path, nats_server: EmbeddedNats, prefix: str) -> None:
    """Another ledger file (a wrong relative path, another working directory) on the same
    NATS and prefix would read the whole intake into a ledger of its own."""
    holder = running.with_name("ledger.db.lock").read_text().strip()
    elsewhere = running.with_name("elsewhere.db")
    second = await cli(nats_server, prefix, "coordinator", "run", "--ledger", str(elsewhere),
                       "--config", str(POLICY))
    assert second.returncode == 2, second.stderr
    assert (f"error: another coordinator already serves prefix {prefix!r} on this NATS "
            f"({holder}, ledger {running})") in second.stderr
    assert "Traceback" not in second.stderr
