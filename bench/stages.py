"""Where the coordinator's time goes, stage by stage: ``python -m bench.stages``.

Runs the same stack as the benchmark (embedded NATS, five chain agents as processes) with
a coordinator process whose pipeline stages are timed by wrappers installed before it
starts — the code that runs is the production ``ledgermesh coordinator run``:

* intake: ``LedgerWriter.record`` (decide + seal + ``Ledger.append``) and the per-batch
  ``Inbound.ack`` calls;
* ``ledger.commit``: every SQLite commit (intake batches, and the rare timer, checkpoint
  and tool-call writes): the WAL write and fsync, a synchronous call that blocks the loop;
* relay: ``Ledger.read`` (only when the commit feed cannot vouch for what follows) and
  ``Bus.publish_all`` (publish + wait for every ack);
* ``Ledger.history`` (aggregate reloads from the database).

Prints, for a window at 64 tasks in flight (``--in-flight``), each stage's share of wall
time, calls per second and mean duration, and the intake batch sizes. The wrappers cost a
few µs per call.
With ``--py-spy``, the coordinator is also sampled, only while it holds the GIL: where the
interpreter computes, not where it waits. With ``--nats-profile``, nats-server's own CPU
profile (Go's pprof, served on a ``prof_port``) is taken over the window and summarised.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

Entry = tuple[str, float, float, int]  # stage, start (monotonic), seconds, size


# -- inside the coordinator process -----------------------------------------------------------

def install_probes(entries: list[Entry]) -> None:
    from eventsourcing.sqlite import SQLiteConnection

    from bus.client import Bus, Inbound
    from coordinator.ledger.store import Ledger
    from coordinator.ledger.writer import LedgerWriter

    def sync(cls: type, name: str, stage: str, size: Callable[[Any, Any], int]) -> None:
        original = getattr(cls, name)

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            out = original(self, *args, **kwargs)
            entries.append((stage, t0, time.monotonic() - t0, size(args, out)))
            return out

        setattr(cls, name, timed)

    def asynchronous(cls: type, name: str, stage: str, size: Callable[[Any], int]) -> None:
        original = getattr(cls, name)

        async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            out = await original(self, *args, **kwargs)
            entries.append((stage, t0, time.monotonic() - t0, size(args)))
            return out

        setattr(cls, name, timed)

    sync(LedgerWriter, "record", "intake.record", lambda a, out: len(a[0]))
    sync(Ledger, "append", "intake.record.append", lambda a, out: len(a[0]))
    sync(Ledger, "history", "intake.record.history", lambda a, out: len(out))
    sync(Ledger, "read", "relay.read", lambda a, out: len(out))
    asynchronous(Inbound, "ack", "intake.ack", lambda a: 1)
    asynchronous(Bus, "flush", "intake.flush", lambda a: 0)
    asynchronous(Bus, "publish_all", "relay.publish_all", lambda a: len(a[0]))
    sync(SQLiteConnection, "commit", "ledger.commit", lambda a, out: 0)


def coordinator_main(out: str, argv: list[str]) -> None:
    entries: list[Entry] = []
    install_probes(entries)

    def dump() -> None:
        Path(out).write_text(json.dumps(entries), encoding="utf-8")

    atexit.register(dump)
    from ledgermesh.cli import main

    sys.exit(main(argv))


# -- the driver -------------------------------------------------------------------------------

def top_frames(raw: Path, limit: int = 25) -> list[str]:
    """Inclusive share of the busiest frames in a py-spy ``--format raw`` profile."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in {f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f
                      for f in stack.split(";")}:
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    plumbing = ("runpy", "threading.py", "asyncio/", "anyio/", "bench/stages.py",
                "ledgermesh/cli.py", "ledgermesh/serve.py", "ledgermesh/__main__.py",
                "contextlib.py", "queue.py")
    ranked = sorted(((f, n) for f, n in inclusive.items()
                     if not any(p in f for p in plumbing)), key=lambda kv: -kv[1])
    return [f"{n / max(total, 1) * 100:5.1f}%  {frame}" for frame, n in ranked[:limit]]


async def run(seconds: float, in_flight: int, workdir: Path, py_spy: Path | None = None,
              nats_profile: Path | None = None) -> None:
    from bench import chain
    from bench.pprof import fetch
    from bench.stack import PREFIX, Driver, Stack, read_proc_status
    from bus.client import BusSettings, open_bus
    from bus.embedded import free_port, open_embedded_nats
    from ledgermesh.processes import Child, spawn, stop_all, wait_ready
    from schemas import Subjects

    subjects = Subjects(PREFIX)
    policy = chain.write_policy(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    trace = workdir / "stages.json"
    config, prof_port = None, free_port()
    if nats_profile is not None:
        config = workdir / "nats-profile.conf"
        config.write_text(f"prof_port: {prof_port}\n", encoding="utf-8")

    async def profile_nats(path: Path) -> None:
        profile = await anyio.to_thread.run_sync(fetch, prof_port, max(1, int(seconds)))
        await anyio.Path(path).write_bytes(profile)

    async with open_embedded_nats(workdir / "nats", config_file=config) as server:
        common = ["--nats", server.url, "--prefix", PREFIX]
        log_file = logs / "coordinator.log"
        process = _start([sys.executable, "-m", "bench.stages", "--coordinator", str(trace),
                          "--", "coordinator", "run", *common, "--ledger",
                          str(workdir / "ledger.db"), "--config", str(policy)], log_file)
        extra = {"service": "coordinator"} if "service" in getattr(
            Child, "__dataclass_fields__", {}) else {}
        coordinator = Child("coordinator", process, log_file, **extra)
        children = [coordinator]
        try:
            children += [spawn(n, ["agent", "run", f"bench.chain:{n}", *common], logs)
                         for n in chain.NAMES]
            async with open_bus(BusSettings(url=server.url, name="bench_stages")) as bus:
                await wait_ready(bus, subjects, children, timeout=60)
                stack = Stack(bus, subjects, str(workdir / "ledger.db"), coordinator, children,
                              server.version, server.pid)
                driver = Driver(stack)
                async with driver.observing():
                    await driver.closed_loop("warm", 64, tasks=500, max_seconds=30)
                    profiler = None if py_spy is None else _start(
                        ["py-spy", "record", "--gil", "--rate", "200",
                         "--duration", str(int(seconds)),
                         "--format", "raw" if py_spy.suffix != ".svg" else "flamegraph",
                         "--output", str(py_spy), "--pid", str(coordinator.pid)],
                        logs / "py-spy.log")
                    async with anyio.create_task_group() as tg:
                        if nats_profile is not None:
                            tg.start_soon(profile_nats, nats_profile)
                        cpu0, t0 = stack.cpu(), time.monotonic()
                        thr = await driver.closed_loop("thr", in_flight, tasks=10**9,
                                                       max_seconds=seconds)
                        cpu1, t1 = stack.cpu(), time.monotonic()
                    if profiler is not None:
                        await anyio.to_thread.run_sync(profiler.wait)
                rss = read_proc_status(coordinator.pid)
        finally:
            await stop_all(children)
    summarize(trace, t0, t1, thr.completion_rate() * chain.HOPS, in_flight, rss, cpu0, cpu1,
              py_spy, nats_profile)


def _start(argv: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as sink:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT)


def summarize(trace: Path, t0: float, t1: float, handoffs_per_s: float, in_flight: int,
              rss: dict[str, int],
              cpu0: dict[str, float], cpu1: dict[str, float], py_spy: Path | None,
              nats_profile: Path | None = None) -> None:
    entries: list[Entry] = json.loads(trace.read_text())
    window = [e for e in entries if t0 <= e[1] <= t1]
    wall = t1 - t0
    print(f"{handoffs_per_s:,.0f} handoffs/s at {in_flight} in flight over "
          f"{wall:.1f} s; coordinator RSS {rss.get('VmRSS', 0) / 1024:.0f} MB")
    print("CPU: " + ", ".join(f"{k} {(cpu1[k] - cpu0[k]) / wall * 100:.0f}%" for k in cpu0))
    print(f"{'stage':<24}{'% of wall':>10}{'calls/s':>10}{'mean ms':>10}{'p99 ms':>10}"
          f"{'mean size':>11}")
    for stage in sorted({e[0] for e in window}):
        rows = [e for e in window if e[0] == stage]
        durations = sorted(e[2] for e in rows)
        total = sum(durations)
        p99 = durations[min(int(len(durations) * 0.99), len(durations) - 1)]
        print(f"{stage:<24}{total / wall * 100:>9.1f}%{len(rows) / wall:>10.0f}"
              f"{total / len(rows) * 1000:>10.3f}{p99 * 1000:>10.3f}"
              f"{sum(e[3] for e in rows) / len(rows):>11.1f}")
    records = sorted((e for e in window if e[0] == "intake.record"), key=lambda e: e[1])
    if len(records) > 1:
        gaps = [b[1] - (a[1] + a[2]) for a, b in itertools.pairwise(records)]
        mean_batch = sum(e[3] for e in records) / len(records)
        print(f"intake: {len(records) / wall:.0f} batches/s, mean {mean_batch:.1f} "
              f"messages/batch; between the end of one record and the start of the next: "
              f"mean {sum(gaps) / len(gaps) * 1000:.2f} ms")
    if py_spy is not None and py_spy.suffix != ".svg" and py_spy.exists():
        print(f"py-spy ({py_spy}), busiest frames of the coordinator (inclusive, samples "
              "holding the GIL):")
        for line in top_frames(py_spy):
            print(f"  {line}")
    if nats_profile is not None and nats_profile.exists():
        from bench.pprof import parse
        print(f"nats-server's CPU profile ({nats_profile}; shares of its CPU time):")
        for line in parse(nats_profile.read_bytes()).top():
            print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, default=64, metavar="N",
                        help="tasks in flight during the window (1: where a hop's latency "
                             "goes; default 64)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="OUT",
                        help="also profile the coordinator with py-spy (pip install py-spy) "
                             "during the window: OUT.svg for a flame graph, else raw "
                             "collapsed stacks plus a summary")
    parser.add_argument("--nats-profile", type=Path, default=None, metavar="OUT",
                        help="also take nats-server's CPU profile during the window (Go's "
                             "pprof, gzipped; `go tool pprof OUT` reads it) and print its "
                             "busiest functions")
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.coordinator is not None:
        coordinator_main(args.coordinator, args.rest)
        return
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, *filter(None,
                                                              [os.environ.get("PYTHONPATH")])])
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        anyio.run(run, args.seconds, args.in_flight, args.workdir, args.py_spy,
                  args.nats_profile)
        return
    with tempfile.TemporaryDirectory(prefix="ledgermesh-stages-") as workdir:
        anyio.run(run, args.seconds, args.in_flight, Path(workdir), args.py_spy,
                  args.nats_profile)


if __name__ == "__main__":
    main()
