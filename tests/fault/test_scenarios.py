"""Fault scenarios: each injects one kind of failure into a running deployment (coordinator
and agents as OS processes over a real nats-server and a real SQLite ledger), lets the
faults heal and the system drain, then checks the invariants (``harness.check``).

Each scenario prints its checker summary and saves it as
``$TMPDIR/ledgermesh-fault/<scenario>.json`` (all of them in ``summary.json``), next to
its history (JSONL), ledger and process logs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from bus.embedded import EmbeddedNats, free_port, open_embedded_nats
from coordinator.ledger.events import Kind
from coordinator.ledger.store import open_ledger

from .harness import (
    CRASH_EXIT,
    DEDUP_WINDOW,
    TERMINAL,
    SilentPartition,
    Summary,
    TaskSpec,
    World,
    decode_raw,
    degraded,
    ledger_events,
    ledger_state,
    open_world,
    policy_text,
    short_ack_wait,
    short_dedup_window,
    until,
    workload,
)


async def all_terminal(w: World, task_ids: list[str], within: float = 30.0) -> None:
    def done() -> bool:
        statuses = ledger_state(w.dep.ledger)[0]
        return all(statuses.get(t) in TERMINAL for t in task_ids)

    await until(done, within, poll=0.1)


def of_task(events: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["aggregate"] == "task" and e["key"] == task_id]


async def relayed(w: World, position: int) -> bool:
    return await w.inspector.last_seq(w.dep.subjects.ledger_stream) == position


async def agents_acked(w: World, *agents: str) -> None:
    """Wait until every delivery to ``agents`` is acked, and the server has had time to
    write that down (its consumer store does ~10 ms after an ack). A kill -9 before then
    loses the acks: those deliveries come again and their handlers run again, as
    at-least-once delivery allows. Scenarios that count handler runs wait for this."""
    async def acked() -> bool:
        return not any([await w.inspector.agent_backlog(a) for a in agents])

    await until(acked, within=15)
    await anyio.sleep(0.25)


async def start(w: World, *agents: str, crash_at: str | None = None) -> None:
    coordinator = w.dep.coordinator(crash_at)
    children = [w.dep.agent(name) for name in agents]
    await w.dep.ready(w.bus, coordinator, *children)


# -- the coordinator dies at each step of its write path -------------------------------
# Intake pulled but unrecorded when the coordinator stops comes back only after the ack
# wait, behind newer messages; intake reads such gaps from the stream first
# (coordinator/intake.py _in_stream_order), so the tracking position never skips them.
CRASH_POINTS = {
    "after_receive": "coordinator.after_receive",  # (a) pulled, nothing recorded
    "after_commit": "coordinator.after_commit",  # (b) recorded, intake not acked
    "before_relay": "coordinator.before_relay",  # (c) acked, not relayed
}


async def restart_coordinator(w: World) -> None:
    await w.dep.ready(w.bus, w.dep.coordinator())
    await short_ack_wait(w.inspector)


@pytest.mark.parametrize("where", ["after_receive", "after_commit", "before_relay"])
async def test_coordinator_killed(where: str, nats_server: EmbeddedNats, prefix: str,
                                  tmp_path: Path) -> None:
    """The coordinator dies (``os._exit`` at a crash point: a kill -9 exactly there) while
    recording a task; tasks keep arriving while it is down; a fresh one takes over."""
    marker = f"crash-{prefix}"
    point = CRASH_POINTS[where]
    async with open_world(f"coordinator_killed_{where}", nats_server.url, prefix,
                          tmp_path / "world") as w:
        await start(w, "worker", "finisher", crash_at=f"{point}@{marker}")
        coordinator = w.dep.running("coordinator")[0]
        first = workload("one", 15, seed=1)
        await w.client.submit_all(first)
        await all_terminal(w, [s.task_id for s in first])
        # Idle now, so the marker is alone in its batch (the crash point matches the
        # batch's first message, or the relay page's last event).
        await w.client.submit(TaskSpec(marker, "worker", {"says": 1, "then": "finisher"}))
        assert await w.dep.exited(coordinator) == CRASH_EXIT, coordinator.log_tail()

        # What the crash left behind shows where it happened.
        statuses, position, tracking = ledger_state(w.dep.ledger)
        relayed = await w.inspector.last_seq(w.dep.subjects.ledger_stream)
        if where == "after_receive":
            assert marker not in statuses
            assert tracking < w.client.acked[marker]
        else:
            assert statuses.get(marker) == "assigned"
            assert tracking == w.client.acked[marker]
            assert relayed < position  # its events never reached LM_LEDGER
        spec = (w.dep.subjects.intake_stream, w.dep.subjects.coordinator_consumer)
        unacked = (await w.inspector.js.consumer_info(*spec)).num_ack_pending
        w.history.write("crashed", process="checker", where=where, position=position,
                        tracking=tracking, relayed=relayed, intake_unacked=unacked)
        if where != "before_relay":  # (c) is acked unless the ack was still buffered
            assert unacked == 1

        await w.client.submit_all(workload("down", 15, seed=2))  # stored by JetStream only
        await restart_coordinator(w)
        await w.client.submit_all(workload("after", 15, seed=3))
        summary = await w.verify(redelivered=True)
    assert summary.violations == []
    assert summary.counts["completed"] == 46
    assert [e["code"] for e in summary.counts["exits"]] == [CRASH_EXIT]


@pytest.mark.parametrize("how", [pytest.param(signal.SIGKILL, id="kill9"),
                                 pytest.param(signal.SIGTERM, id="sigterm")])
async def test_coordinator_stopped_during_a_burst(how: signal.Signals,
                                                  nats_server: EmbeddedNats,
                                                  prefix: str, scenario: str,
                                                  tmp_path: Path) -> None:
    """kill -9 (or a routine SIGTERM restart) at an arbitrary moment, twice, while tasks
    stream in and agents work."""
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        await start(w, "worker", "finisher")
        specs = workload("burst", 60, seed=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: w.client.submit_all(specs, concurrency=4, pace_s=0.03))
            for threshold in (15, 35):
                await until(lambda t=threshold: len(w.client.acked) >= t)
                w.dep.signal(w.dep.running("coordinator")[0], how)
                # The default 30 s ack wait, as deployed: not waited for (see drain).
                await w.dep.ready(w.bus, w.dep.coordinator())
        summary = await w.verify()
    assert summary.violations == []
    assert summary.counts["completed"] == 60


# -- agents die or stall -----------------------------------------------------------------
async def test_agent_kill9_mid_handler(nats_server: EmbeddedNats, prefix: str,
                                       scenario: str, tmp_path: Path) -> None:
    """An agent is SIGKILLed while a handler is half done (one output stored, no result);
    a new instance takes over the redelivered work."""
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        await start(w, "worker", "finisher")
        hang = w.dep.root / "hang-once"
        marker = TaskSpec("hang-000", "worker", {"hang_once": str(hang), "hang_s": 60,
                                                 "says": 1, "then": "finisher"})
        await w.client.submit(marker)
        await w.client.submit_all(workload("one", 15, seed=5))
        hanging = await until(lambda: [h for h in w.history.read()
                                       if h["op"] == "hanging"])
        worker = w.dep.running("worker")[0]
        assert hanging[0]["pid"] == worker.pid
        w.dep.kill9(worker)
        await w.client.submit_all(workload("two", 15, seed=6))
        await w.dep.ready(w.bus, w.dep.agent("worker"))
        summary = await w.verify()
        events = ledger_events(w.dep.ledger)
    assert summary.violations == []
    assert summary.counts["completed"] == 31
    # The output the killed run stored is recorded once; the task finished afterwards.
    said_before_kill = hanging[0]["outputs"][0]
    assert [e["kind"] for e in events if e["msg_id"] == said_before_kill] == [Kind.SAID]


async def test_agent_paused_past_its_deadline_is_fenced(nats_server: EmbeddedNats,
                                                        prefix: str, scenario: str,
                                                        tmp_path: Path) -> None:
    """SIGSTOP an agent mid-handler until its attempt timed out and was retried elsewhere;
    after SIGCONT its late result is refused (stale attempt), never a second result."""
    policy = policy_text(deadline_s=1.5, max_attempts=6)
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world",
                          policy=policy) as w:
        await start(w, "worker", "finisher")
        paused = w.dep.running("worker")[0]
        marker = TaskSpec("pause-000", "worker", {"sleep": 0.6})
        await w.client.submit(marker)
        await until(lambda: [h for h in w.history.read()
                             if h["op"] == "start" and h["task_id"] == marker.task_id])
        w.dep.pause(paused)

        def retried() -> bool:
            kinds = [e["kind"] for e in of_task(ledger_events(w.dep.ledger), marker.task_id)]
            return Kind.TIMED_OUT in kinds and kinds.count(Kind.ASSIGNED) >= 2

        await until(retried, within=10)
        await w.dep.ready(w.bus, w.dep.agent("worker"))  # the paused one cannot answer
        await w.client.submit_all(workload("one", 10, seed=7))
        await all_terminal(w, [marker.task_id], within=30)
        w.dep.resume(paused)
        await until(lambda: [h for h in w.history.read() if h["op"] == "end"
                             and h["pid"] == paused.pid], within=10)
        summary = await w.verify()
        events = of_task(ledger_events(w.dep.ledger), marker.task_id)
    assert summary.violations == []
    completed = [e for e in events if e["kind"] == Kind.COMPLETED]
    assert len(completed) == 1
    accepted = json.loads(decode_raw(completed[0]))["attempt"]
    assert accepted >= 2  # a retry finished it, not the paused attempt
    fenced = [json.loads(decode_raw(e)) for e in events if e["kind"] == Kind.REJECTED
              and e["data"]["code"] in ("stale_attempt", "task_closed")]
    # The paused run's result (attempt 1) came back and was refused, as was anything else
    # from an attempt the timer had moved past.
    assert 1 in [env["attempt"] for env in fenced]
    assert all(env["attempt"] < accepted for env in fenced)


async def test_handler_that_always_raises_is_dead_lettered(nats_server: EmbeddedNats,
                                                           prefix: str, scenario: str,
                                                           tmp_path: Path) -> None:
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        await start(w, "worker", "finisher", "flaky")
        specs = workload("mix", 30, seed=8, flaky=0.3)
        await w.client.submit_all(specs)
        summary = await w.verify()
        events = ledger_events(w.dep.ledger)
    assert summary.violations == []
    flaky = [s.task_id for s in specs if s.to == "flaky"]
    assert flaky
    assert summary.counts["dead_lettered"] == len(flaky)
    for task_id in flaky:
        assert [e["kind"] for e in of_task(events, task_id)] == [
            Kind.SUBMITTED, Kind.ASSIGNED,
            Kind.ATTEMPT_FAILED, Kind.ASSIGNED,
            Kind.ATTEMPT_FAILED, Kind.ASSIGNED,
            Kind.ATTEMPT_FAILED, Kind.DEAD_LETTERED, Kind.FAILED,
        ]


# -- NATS itself dies ------------------------------------------------------------------------
async def test_nats_server_kill9_during_a_burst(prefix: str, scenario: str,
                                                tmp_path: Path) -> None:
    """kill -9 the (dedicated) nats-server mid-burst, restart it on the same port and store
    directory; every service reconnects and nothing acknowledged is lost or doubled."""
    store = tmp_path / "nats"
    port = free_port()
    async with AsyncExitStack() as servers:
        server = await servers.enter_async_context(open_embedded_nats(store, port=port))
        async with open_world(scenario, server.url, prefix, tmp_path / "world") as w:
            await start(w, "worker", "finisher")
            specs = workload("burst", 60, seed=9)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: w.client.submit_all(specs, concurrency=4, pace_s=0.03))
                await until(lambda: len(w.client.acked) >= 25)
                w.dep.fault("kill -9 nats-server", pid=server.pid)
                os.kill(server.pid, signal.SIGKILL)
                await anyio.sleep(1.0)
                server = await servers.enter_async_context(
                    open_embedded_nats(store, port=port))
                w.dep.fault("nats-server restarted", pid=server.pid)
            summary = await w.verify(drain_within=60)
    assert summary.violations == []
    assert summary.counts["completed"] == 60


# -- the ledger cannot be written --------------------------------------------------------------
async def test_ledger_write_failure_then_recovery(nats_server: EmbeddedNats, prefix: str,
                                                  scenario: str, tmp_path: Path) -> None:
    """The coordinator's writes start failing (EFBIG through RLIMIT_FSIZE, like a full
    disk): nothing is recorded or acked meanwhile, it reports itself degraded, and once
    writes work again it records everything that waited, exactly once."""
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        await start(w, "worker", "finisher")
        coordinator = w.dep.running("coordinator")[0]
        first = workload("one", 15, seed=10)
        await w.client.submit_all(first)
        await all_terminal(w, [s.task_id for s in first])
        before = ledger_state(w.dep.ledger)[1]

        w.dep.limit_writes(coordinator, 512)
        await w.client.submit_all(workload("two", 15, seed=11))

        status = await degraded(w)
        await anyio.sleep(1.0)  # a few failed retries
        assert ledger_state(w.dep.ledger)[1] == before  # nothing committed meanwhile
        assert await w.inspector.intake_pending() == 15  # nothing acked either
        w.dep.history.write("coordinator_status", process="checker", status=status)
        w.dep.unlimit_writes(coordinator)

        await w.client.submit_all(workload("three", 15, seed=12))
        summary = await w.verify()
    assert summary.violations == []
    assert summary.counts["completed"] == 45
    assert summary.counts["exits"] == []  # the coordinator rode it out
    assert "disk I/O error" in str(status["last_error"]) or "full" in str(status["last_error"])


# -- a duplicate JetStream no longer remembers -------------------------------------------------
async def test_duplicates_outside_the_dedup_window_are_recorded_once(
        nats_server: EmbeddedNats, prefix: str, scenario: str, tmp_path: Path) -> None:
    """Every message the ledger recorded is published again, same id and bytes, after
    JetStream forgot the id: the ledger records none of them a second time."""
    async with open_world(scenario, nats_server.url, prefix, tmp_path / "world") as w:
        await short_dedup_window(w.inspector)
        await start(w, "worker", "finisher")
        specs = workload("one", 15, seed=13)
        await w.client.submit_all(specs)
        await all_terminal(w, [s.task_id for s in specs])
        recorded = ledger_events(w.dep.ledger)
        await anyio.sleep(DEDUP_WINDOW * 3)
        said = [e for e in recorded if e["sender"] != "coordinator"]
        duplicates = [await w.client.resend(e["sender"], decode_raw(e), e["msg_id"])
                      for e in said]
        assert not any(duplicates)  # JetStream stored every copy again
        summary = await w.verify()
        after = ledger_events(w.dep.ledger)
    assert summary.violations == []
    assert len(said) >= 45  # 15 submissions and every agent output
    # Every copy was consumed (drained) and none recorded; the only thing added since is the
    # final checkpoint a clean stop signs.
    assert [e for e in after if e["aggregate"] != "checkpoint"] == \
        [e for e in recorded if e["aggregate"] != "checkpoint"]


class NatsMachine:
    """A dedicated nats-server on a fixed port and store, killed with -9 and restarted at
    will; its disk can be copied at a "sync" and put back later: a power loss, since
    JetStream syncs only every 2 minutes by default."""

    def __init__(self, root: Path, servers: AsyncExitStack) -> None:
        self.store = root / "nats"
        self._synced = root / "nats-as-synced"
        self._port = free_port()
        self._servers = servers
        self.server: EmbeddedNats | None = None

    async def start(self) -> EmbeddedNats:
        self.server = await self._servers.enter_async_context(
            open_embedded_nats(self.store, port=self._port))
        return self.server

    async def restart(self, w: World, *, sync: bool = False,
                      lose_since_sync: bool = False) -> None:
        """kill -9, then (``sync``) copy what the disk holds, or (``lose_since_sync``) put
        that copy back, and start again on the same port and store."""
        assert self.server is not None
        w.dep.fault("kill -9 nats-server", pid=self.server.pid)
        os.kill(self.server.pid, signal.SIGKILL)
        await anyio.sleep(0.5)
        if sync:
            shutil.copytree(self.store / "jetstream", self._synced)
        if lose_since_sync:
            shutil.rmtree(self.store / "jetstream")
            shutil.copytree(self._synced, self.store / "jetstream")
            w.dep.fault("nats store rolled back to its last sync")
        server = await self.start()
        w.dep.fault("nats-server restarted", pid=server.pid)


async def test_nats_server_loses_what_it_had_not_synced(prefix: str, scenario: str,
                                                        tmp_path: Path) -> None:
    """Power loss on the NATS machine: JetStream acks before it syncs (every 2 minutes by
    default), so a machine crash rolls its store back to the last sync. Simulated exactly:
    the store as it was at a kill -9 is put back after a later one. Tasks recorded in the
    lost window stay recorded and relayed; tasks submitted after it, on reused stream
    sequences, are recorded too, not mistaken for redeliveries."""
    async with AsyncExitStack() as servers:
        nats = NatsMachine(tmp_path, servers)
        server = await nats.start()
        async with open_world(scenario, server.url, prefix, tmp_path / "world") as w:
            await start(w, "worker", "finisher")
            for tag, seed in (("one", 21), ("two", 22), ("three", 23)):
                specs = workload(tag, 15, seed=seed, flaky=0.0)
                await w.client.submit_all(specs)
                await all_terminal(w, [s.task_id for s in specs])
                await agents_acked(w, "worker", "finisher")
                if tag == "one":
                    await nats.restart(w, sync=True)
                elif tag == "two":
                    await nats.restart(w, lose_since_sync=True)
                    # The relay notices the ledger stream's loss on its own, before anything
                    # new is recorded, and publishes the lost copies again.
                    position = ledger_state(w.dep.ledger)[1]
                    await until(partial(relayed, w, position), within=15)
            summary = await w.verify(drain_within=60, redelivered=True)
    assert summary.violations == []
    assert summary.counts["completed"] == 45
    # The lost deliveries were of tasks closed since: none is relayed again, no handler
    # runs twice.
    assert summary.counts["handler_runs"] == summary.counts["assignments"]


async def test_outputs_acked_but_not_recorded_when_nats_loses_power_are_sent_again(
        prefix: str, scenario: str, tmp_path: Path) -> None:
    """The coordinator is stopped (SIGSTOP) while agents finish their handlers: the
    stream acks their outputs, then a power loss rolls it back to before them. Nothing
    recorded them, so no receipt comes; each agent publishes its outputs again and acks
    its delivery once they are recorded, long before the attempts' 30 s deadline. A
    `ledgermesh submit` of the same moment is lost too, and published again by the
    command, which waits for the ledger's verdict."""
    specs = [TaskSpec(f"slow-{i:03d}", "worker", {"says": 1, "sleep": 3}) for i in range(10)]
    ids = [s.task_id for s in specs]
    async with AsyncExitStack() as servers:
        nats = NatsMachine(tmp_path, servers)
        server = await nats.start()
        async with open_world(scenario, server.url, prefix, tmp_path / "world",
                              policy=policy_text(deadline_s=30.0)) as w:
            await start(w, "worker", "finisher")
            coordinator = w.dep.running("coordinator")[0]
            await w.client.submit_all(specs)

            def all_said() -> bool:  # every handler is in its sleep
                events = ledger_events(w.dep.ledger)
                return all(Kind.SAID in [e["kind"] for e in of_task(events, t)] for t in ids)

            await until(all_said, within=20)
            await nats.restart(w, sync=True)
            w.dep.pause(coordinator)

            def all_ended() -> bool:  # each handler published its completion (acked)
                ended = {e["task_id"] for e in w.history.read() if e.get("op") == "end"}
                return set(ids) <= ended

            await until(all_ended, within=20)
            # A user submits a task meanwhile: stored by the stream, recorded by nobody yet.
            submit = w.dep.submit_cli("by-hand", "worker")
            await anyio.sleep(1.0)
            await nats.restart(w, lose_since_sync=True)
            w.dep.resume(coordinator)
            await all_terminal(w, ids, within=20)  # well inside the 30 s deadline
            # The command published it again for want of a verdict, and got one.
            assert await w.dep.exited(submit) == 0, submit.log_file.read_text()
            await all_terminal(w, ["by-hand"])
            summary = await w.verify(drain_within=60, redelivered=True)
    assert summary.violations == []
    assert summary.counts["completed"] == 10
    assert summary.counts["timed_out"] == 0


def tailed_positions(child_log: Path) -> list[int]:
    """The ledger positions ``ledgermesh tail --json`` printed, in its order."""
    lines = child_log.read_text().splitlines()
    return [json.loads(line)["position"] for line in lines if line.startswith("{")]


def ledger_positions(path: Path) -> list[int]:
    ledger = open_ledger(str(path), create=False)
    try:
        return [n.id for n in ledger.read(0, 1_000_000)]
    finally:
        ledger.close()


@pytest.mark.parametrize("loss", [False, True], ids=["restart", "power_loss"])
async def test_tail_follows_the_ledger_across_a_nats_server_restart(
        loss: bool, prefix: str, scenario: str, tmp_path: Path) -> None:
    """A user's ``ledgermesh tail`` keeps following after nats-server is killed -9 and
    restarted, its store intact or (``loss``) rolled back to a sync before the last 10
    tasks: it prints every recorded event once, in ledger order. After the rollback the
    relay stores the lost copies again, on the stream sequences they had, so the tail's
    consumer, which resumes after the last sequence it printed, skips exactly those."""
    async with AsyncExitStack() as servers:
        nats = NatsMachine(tmp_path, servers)
        server = await nats.start()
        async with open_world(scenario, server.url, prefix, tmp_path / "world") as w:
            await start(w, "worker", "finisher")
            tail = w.dep.tail_cli()
            for tag, seed in (("one", 31), ("two", 32), ("three", 33)):
                specs = workload(tag, 10, seed=seed, flaky=0.0)
                await w.client.submit_all(specs)
                await all_terminal(w, [s.task_id for s in specs])
                position = ledger_state(w.dep.ledger)[1]
                await until(partial(relayed, w, position), within=15)
                # Within seconds: the tail's consumer died with the server, and nats-py
                # made it anew only ~18 s later at its default heartbeat.
                await until(lambda p=position: p in tailed_positions(tail.log_file), within=10)
                await agents_acked(w, "worker", "finisher")
                if tag == "one":
                    await nats.restart(w, sync=True)
                elif tag == "two":
                    await nats.restart(w, lose_since_sync=loss)
            assert w.dep.signal(tail, signal.SIGINT) == 130
            assert tailed_positions(tail.log_file) == ledger_positions(w.dep.ledger)
            assert tail.log_file.read_text().count("reconnected (nats://") == 2
            summary = await w.verify(drain_within=60, redelivered=loss)
    assert summary.violations == []
    assert summary.counts["completed"] == 30
    assert summary.counts["handler_runs"] == summary.counts["assignments"]


async def test_a_silent_partition_between_the_coordinator_and_nats(
        nats_server: EmbeddedNats, prefix: str, scenario: str, tmp_path: Path) -> None:
    """The coordinator's connection goes silent mid-run, no FIN, no RST (a dropped NAT
    entry): nothing tells it. Its pings go unanswered, so it gives the connection up
    within 12 s and reconnects, and the messages the server had delivered into the dead
    connection are read from the stream, not left to the consumer's 30 s ack wait: the
    tasks submitted meanwhile complete, nothing lost or doubled. (With nats-py's default
    pings, one every 2 minutes, it stayed deaf for 4 to 6 minutes.)"""
    summary = await _silent_partition(nats_server, prefix, scenario, tmp_path, "coordinator")
    assert summary.violations == []
    assert summary.counts["completed"] == 20


async def test_a_silent_partition_between_an_agent_and_nats(
        nats_server: EmbeddedNats, prefix: str, scenario: str, tmp_path: Path) -> None:
    """The same for an agent: its deliveries of those seconds went into the dead
    connection; the coordinator times those attempts out and retries them, and the agent,
    back within 12 s, takes the retries. Nothing lost, nothing done twice that counts."""
    summary = await _silent_partition(nats_server, prefix, scenario, tmp_path, "worker")
    assert summary.violations == []
    assert summary.counts["completed"] == 20
    assert summary.counts["dead_lettered"] == 0


async def _silent_partition(nats_server: EmbeddedNats, prefix: str, scenario: str,
                            tmp_path: Path, cut: str) -> Summary:
    """10 tasks, then ``cut``'s connection goes silent, then 10 more; the checker's
    summary once all have completed."""
    partition = SilentPartition(nats_server)
    async with anyio.create_task_group() as tg:
        await tg.start(partition.serve)
        # Attempts of 5 s: four of them outlast the agent's 8-12 s without a connection.
        async with open_world(scenario, nats_server.url, prefix, tmp_path / "world",
                              policy=policy_text(deadline_s=5.0)) as w:
            via = {cut: partition.url}
            await w.dep.ready(w.bus, w.dep.coordinator(nats_url=via.get("coordinator")),
                              w.dep.agent("worker", nats_url=via.get("worker")),
                              w.dep.agent("finisher"))
            before = workload("before", 10, seed=41, flaky=0.0)
            await w.client.submit_all(before)
            await all_terminal(w, [s.task_id for s in before])
            partition.cut()
            w.dep.fault(f"the {cut}'s connection to nats-server goes silent")
            after = workload("after", 10, seed=42, flaky=0.0)
            await w.client.submit_all(after)
            await all_terminal(w, [s.task_id for s in after], within=25)
            summary = await w.verify(drain_within=60)
        tg.cancel_scope.cancel()
    return summary
