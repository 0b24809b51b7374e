"""Peers: the same 5-hop chain in other agent frameworks, measured in the same run.

Each peer is optional. It runs in a child process (``python -m bench.peers NAME ...``) with
the interpreter given by ``--peers-python`` (default: this one), so the frameworks can live
in a separate virtualenv and never touch ledgermesh's. A peer whose package does not
import is skipped with the ``pip install`` line that would enable it.

What each chain does per hop: record one message (the framework's own way) and hand the
task to the next hop; hop 5 completes it. All but one run **in one process**, so they pay
no network hop at all; what they persist differs and is stated in ``durability``:

* ``autogen-core`` — ``SingleThreadedAgentRuntime``, five ``RoutedAgent``s, each handoff a
  ``publish_message`` to the next agent's topic; messages kept in memory (not durable).
* ``langgraph`` — a ``StateGraph`` of five nodes, each appending a message to the state,
  compiled with ``SqliteSaver`` (a checkpoint written to SQLite after every step, WAL).
* ``agent-framework`` — Microsoft Agent Framework ``WorkflowBuilder`` with five
  ``Executor``s joined by edges, each ``ctx.send_message`` to the next; in memory.
* ``autogen-grpc`` — autogen-core's distributed runtime (``autogen-ext[grpc]``): a
  ``GrpcWorkerAgentRuntimeHost`` process routes every message between five worker
  processes, one ``RoutedAgent`` hop each, and the driver's own worker runtime, which
  submits tasks and hears the last hop. Agents in separate processes, as ledgermesh's
  are; nothing is kept.

Latency per hop is the task's end-to-end time / 5 (1 in flight); throughput runs 64
tasks at once for a fixed time.
"""


import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOPS = 5

PEERS: dict[str, dict[str, Any]] = {
    "autogen-core": {"module": "autogen_core", "install": "pip install autogen-core",
                     "durability": "in memory, one process"},
    "langgraph": {"module": "langgraph.checkpoint.sqlite",
                  "install": "pip install langgraph langgraph-checkpoint-sqlite",
                  "durability": "SqliteSaver checkpoint per step (WAL), one process",
                  "durable": True},
    "agent-framework": {"module": "agent_framework", "install": "pip install agent-framework-core",
                        "durability": "in memory, one process"},
    "autogen-grpc": {"module": "autogen_ext.runtimes.grpc",
                     "install": "pip install 'autogen-ext[grpc]'",
                     "durability": "in memory; gRPC host + 5 hop processes + driver",
                     "distributed": True},
}


# -- drivers (run inside the peer's process) -------------------------------------------------

IN_FLIGHT = 64


def _summary(one: list[float], many: int, seconds: float) -> dict[str, Any]:
    hop = sorted(ms / HOPS for ms in one)
    return {
        "handoffs_per_s": many * HOPS / seconds,
        "hop_p50_ms_1": statistics.median(hop),
        "hop_p99_ms_1": hop[min(int(len(hop) * 0.99), len(hop) - 1)],
        "tasks_1": len(one),
        "tasks_64": many,
    }


async def _drive_async(run_task: Callable[[str], Awaitable[None]], latency_tasks: int,
                       seconds: float) -> dict[str, Any]:
    for i in range(20):  # warm-up
        await run_task(f"warm-{i}")
    one = []
    for i in range(latency_tasks):
        t0 = time.perf_counter()
        await run_task(f"lat-{i}")
        one.append((time.perf_counter() - t0) * 1000)
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            await run_task(f"thr-{w}-{n}")
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
    return _summary(one, done, time.perf_counter() - t0)


@dataclass
class Work:
    """The autogen chains' one message type (its name is its wire name in every process)."""

    task: str
    text: str


def _autogen_hop_class(said: list[str], finished: dict[str, asyncio.Future[None]], *,
                       sink: bool) -> Any:
    """autogen-core's hop agent. Hop ``HOPS`` finishes the task itself, or with ``sink``
    (the gRPC chain, whose driver is another process) hands it to hop 0, the sink."""
    from autogen_core import MessageContext, RoutedAgent, TopicId, message_handler

    class Hop(RoutedAgent):
        def __init__(self, index: int) -> None:
            super().__init__(f"hop{index}")
            self.index = index

        @message_handler
        async def on_work(self, message: Work, ctx: MessageContext) -> None:
            if self.index == 0:  # the sink
                finished.pop(message.task).set_result(None)
                return
            said.append(f"hop{self.index} working on {message.task}")  # "say"
            if len(said) > 10_000:
                said.clear()
            if self.index == HOPS and not sink:
                finished.pop(message.task).set_result(None)
                return
            after = "sink" if self.index == HOPS else f"hop{self.index + 1}"
            await self.publish_message(Work(message.task, "next hop"), TopicId(after, "default"))

    return Hop


async def _autogen(latency_tasks: int, seconds: float) -> dict[str, Any]:
    from autogen_core import SingleThreadedAgentRuntime, TopicId, TypeSubscription

    finished: dict[str, asyncio.Future[None]] = {}
    hop = _autogen_hop_class([], finished, sink=False)
    runtime = SingleThreadedAgentRuntime()
    for i in range(1, HOPS + 1):
        await hop.register(runtime, f"hop{i}", lambda i=i: hop(i))
        await runtime.add_subscription(TypeSubscription(f"hop{i}", f"hop{i}"))
    runtime.start()

    async def run_task(task: str) -> None:
        future = asyncio.get_running_loop().create_future()
        finished[task] = future
        await runtime.publish_message(Work(task, "start"), TopicId("hop1", "default"))
        await future

    try:
        return await _drive_async(run_task, latency_tasks, seconds)
    finally:
        await runtime.stop()


async def _grpc_worker(address: str, index: int,
                       finished: dict[str, asyncio.Future[None]]) -> Any:
    """A worker runtime hosting hop ``index`` (0: the driver's sink), started."""
    from autogen_core import TypeSubscription, try_get_known_serializers_for_type
    from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime

    runtime = GrpcWorkerAgentRuntime(host_address=address)
    runtime.add_message_serializer(try_get_known_serializers_for_type(Work))
    await runtime.start()
    hop = _autogen_hop_class([], finished, sink=True)
    name = "sink" if index == 0 else f"hop{index}"
    await hop.register(runtime, name, lambda: hop(index))
    await runtime.add_subscription(TypeSubscription(name, name))
    return runtime


async def _grpc_serve(role: str, address: str) -> None:
    """A child process of the gRPC peer: the host, or one hop; says "ready", then serves
    until its stdin closes (the driver is done or gone)."""
    if role == "host":
        from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntimeHost
        host = GrpcWorkerAgentRuntimeHost(address=address)
        host.start()
        await asyncio.sleep(0.5)  # the server binds in the background
        stop: Callable[[], Awaitable[None]] = host.stop
    else:
        runtime = await _grpc_worker(address, int(role), {})
        stop = runtime.stop
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await stop()


async def _autogen_grpc(latency_tasks: int, seconds: float) -> dict[str, Any]:
    import socket

    from autogen_core import TopicId

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    children: list[subprocess.Popen[str]] = []

    def spawn(role: str) -> None:
        child = subprocess.Popen([sys.executable, "-m", "bench.peers", "--grpc-serve", role,
                                  address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        children.append(child)
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"gRPC {role} did not start (exit {child.wait()})")

    finished: dict[str, asyncio.Future[None]] = {}
    runtime = None
    try:
        spawn("host")
        for i in range(1, HOPS + 1):
            spawn(str(i))
        runtime = await _grpc_worker(address, 0, finished)

        async def run_task(task: str) -> None:
            future = asyncio.get_running_loop().create_future()
            finished[task] = future
            await runtime.publish_message(Work(task, "start"), TopicId("hop1", "default"))
            await future

        return await _drive_async(run_task, latency_tasks, seconds)
    finally:
        if runtime is not None:
            await runtime.stop()
        for child in reversed(children):
            assert child.stdin is not None
            child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


async def _agent_framework(latency_tasks: int, seconds: float) -> dict[str, Any]:
    from agent_framework import Executor, WorkflowBuilder, WorkflowContext, handler

    said: list[str] = []

    class Hop(Executor):
        def __init__(self, index: int) -> None:
            super().__init__(id=f"hop{index}")
            self.index = index

        @handler
        async def step(self, task: str, ctx: WorkflowContext[str, str]) -> None:
            said.append(f"hop{self.index} working on {task}")  # "say"
            if len(said) > 10_000:
                said.clear()
            if self.index == HOPS:
                await ctx.yield_output(task)
            else:
                await ctx.send_message(task)

    def build() -> Any:
        hops = [Hop(i) for i in range(1, HOPS + 1)]
        builder = WorkflowBuilder(start_executor=hops[0])
        for a, b in itertools.pairwise(hops):
            builder = builder.add_edge(a, b)
        return builder.build()

    # A workflow instance runs one task at a time: keep a pool, one per task in flight.
    pool: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(64):
        pool.put_nowait(build())

    async def run_task(task: str) -> None:
        workflow = await pool.get()
        try:
            result = await workflow.run(task)
            if result.get_outputs() != [task]:
                raise RuntimeError(f"unexpected outputs {result.get_outputs()!r}")
        finally:
            pool.put_nowait(workflow)

    return await _drive_async(run_task, latency_tasks, seconds)


def _langgraph(latency_tasks: int, seconds: float, workdir: Path) -> dict[str, Any]:
    import operator
    import sqlite3
    from typing import Annotated, TypedDict

    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict):
        task: str
        messages: Annotated[list[str], operator.add]

    def node(index: int) -> Callable[[State], dict[str, Any]]:
        def step(state: State) -> dict[str, Any]:
            return {"messages": [f"hop{index} working on {state['task']}"]}
        return step

    graph = StateGraph(State)
    for i in range(1, HOPS + 1):
        graph.add_node(f"hop{i}", node(i))
    graph.add_edge(START, "hop1")
    for i in range(1, HOPS):
        graph.add_edge(f"hop{i}", f"hop{i + 1}")
    graph.add_edge(f"hop{HOPS}", END)
    conn = sqlite3.connect(str(workdir / f"langgraph-{uuid.uuid4().hex[:6]}.db"),
                           check_same_thread=False)
    saver = SqliteSaver(conn)
    app = graph.compile(checkpointer=saver)

    def run_task(task: str) -> None:
        out = app.invoke({"task": task, "messages": []},
                         {"configurable": {"thread_id": task}})
        if len(out["messages"]) != HOPS:
            raise RuntimeError(f"unexpected state {out!r}")

    for i in range(20):
        run_task(f"warm-{i}")
    one = []
    for i in range(latency_tasks):
        t0 = time.perf_counter()
        run_task(f"lat-{i}")
        one.append((time.perf_counter() - t0) * 1000)
    deadline = time.perf_counter() + seconds

    def worker(w: int) -> int:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            run_task(f"thr-{w}-{n}")
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:  # 64 tasks in flight, one per thread
        done = sum(pool.map(worker, range(IN_FLIGHT)))
    result = _summary(one, done, time.perf_counter() - t0)
    conn.close()
    return result


def run_peer(name: str, latency_tasks: int, seconds: float, workdir: Path) -> dict[str, Any]:
    if name == "autogen-core":
        return asyncio.run(_autogen(latency_tasks, seconds))
    if name == "agent-framework":
        return asyncio.run(_agent_framework(latency_tasks, seconds))
    if name == "autogen-grpc":
        return asyncio.run(_autogen_grpc(latency_tasks, seconds))
    if name == "langgraph":
        return _langgraph(latency_tasks, seconds, workdir)
    raise SystemExit(f"unknown peer {name!r}")


# -- the harness side ---------------------------------------------------------------------

def available(python: str, name: str) -> str | None:
    """None if the peer's package imports under ``python``; otherwise why not."""
    module = PEERS[name]["module"]
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True,
                           timeout=120, check=False)
    if probe.returncode == 0:
        return None
    return f"skipped: {PEERS[name]['install']}"


def measure(python: str, name: str, latency_tasks: int, seconds: float,
            workdir: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Run one peer once in a child process; its figures, or {"error": ...}."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([python, "-m", "bench.peers", name, str(latency_tasks),
                               str(seconds), str(workdir)], capture_output=True,
                              text=True, timeout=timeout, check=False, env=env, cwd=repo)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def version(python: str, name: str) -> str:
    dist = {"autogen-core": "autogen-core", "langgraph": "langgraph",
            "agent-framework": "agent-framework-core", "autogen-grpc": "autogen-ext"}[name]
    probe = subprocess.run([python, "-c", "import importlib.metadata as m, sys; "
                            f"print(m.version({dist!r}))"], capture_output=True, text=True,
                           timeout=60, check=False)
    return probe.stdout.strip() or "?"


if __name__ == "__main__":
    if sys.argv[1] == "--grpc-serve":
        asyncio.run(_grpc_serve(sys.argv[2], sys.argv[3]))
        raise SystemExit(0)
    peer, lat, thr, where = sys.argv[1:5]
    with tempfile.TemporaryDirectory(dir=where) as scratch:
        figures = run_peer(peer, int(lat), float(thr), Path(scratch))
    print(json.dumps(figures))
