"""``python -m bench``: the handoff-chain benchmark of ledgermesh, with its baselines and
peers measured in the same run. Run it from the repository root.

Per run (repeated ``--runs`` times, interleaved so that noise hits everything alike):

1. for each backend: a fresh embedded nats-server, ``ledgermesh coordinator run`` and the
   five chain agents as OS processes; warm-up, then 1 task in flight (latency), 64 in
   flight (throughput), then an open-loop load at 50% of that run's peak (latency);
2. baseline (a), the physical limit: the same chain with plain nats-py request/reply and
   raw sqlite3 group commit (``bench/baseline_limit.py``);
3. baseline (b), JetStream acked publish, pipelined and one at a time;
4. the peers that are installed (``bench/peers.py``).

Then, in the full run, one long run drives the real system to ≥200k events while sampling
the coordinator's RSS, and ``replay --verify`` plus baseline (c) (raw notification-log
read + decode) run three times over that ledger.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg

from bench import baseline_js, baseline_limit, baseline_replay, chain, peers, pg, report
from bench.stack import (
    BenchError,
    Driver,
    Stack,
    hop_latencies_ms,
    ledger_bytes,
    open_stack,
    read_proc_status,
)
from bus.embedded import open_embedded_nats
from schemas import LedgermeshError

REPO = Path(__file__).resolve().parents[1]
IN_FLIGHT = 64


@dataclass(frozen=True)
class Profile:
    name: str
    runs: int
    warm_tasks: int
    latency_tasks: int  # at 1 in flight
    throughput_seconds: float  # at 64 in flight
    half_seconds: float  # open loop at 50% of the run's peak
    long_events: int  # 0: no long run; the last run's ledger is replayed
    long_max_seconds: float
    limit_latency_tasks: int
    limit_seconds: float
    js_pipelined: int
    js_one_at_a_time: int
    replays: int
    peer_latency_tasks: int
    peer_seconds: float


PROFILES = {
    "full": Profile("full", runs=3, warm_tasks=64, latency_tasks=150, throughput_seconds=12,
                    half_seconds=8, long_events=200_000, long_max_seconds=120,
                    limit_latency_tasks=200, limit_seconds=8, js_pipelined=100_000,
                    js_one_at_a_time=3_000, replays=3, peer_latency_tasks=100,
                    peer_seconds=4),
    "quick": Profile("quick", runs=1, warm_tasks=32, latency_tasks=40, throughput_seconds=4,
                     half_seconds=3, long_events=0, long_max_seconds=0,
                     limit_latency_tasks=40, limit_seconds=3, js_pipelined=20_000,
                     js_one_at_a_time=500, replays=3, peer_latency_tasks=30, peer_seconds=2),
    "smoke": Profile("smoke", runs=1, warm_tasks=16, latency_tasks=10, throughput_seconds=2,
                     half_seconds=1.5, long_events=0, long_max_seconds=0,
                     limit_latency_tasks=10, limit_seconds=1.5, js_pipelined=5_000,
                     js_one_at_a_time=200, replays=1, peer_latency_tasks=10, peer_seconds=1),
}


def parse_args(argv: list[str] | None, prog: str = "python -m bench") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the 5-hop handoff chain (agents as OS processes, every "
                    "message and handoff recorded before delivery) against the physical "
                    "limit of the design, JetStream, the raw ledger read, and peer "
                    "frameworks — all in one run.",
        epilog="Full run: under 10 minutes. --quick: under a minute (smoke check). "
               "Figures are medians with min–max over the runs.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short phases, 1 run (< 60 s)")
    mode.add_argument("--smoke", action="store_true", help="the smallest run that still "
                      "measures everything (used by the test suite)")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure "
                        "(default 3, or 1 with --quick/--smoke)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every figure (and per-run values) as JSON here")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="sqlite",
                        help="ledger backend(s) to measure (default sqlite)")
    parser.add_argument("--postgres", default=os.environ.get("LEDGERMESH_BENCH_POSTGRES")
                        or os.environ.get("LEDGERMESH_TEST_POSTGRES"), metavar="DSN",
                        help="PostgreSQL for --backend postgres|both, e.g. "
                             "postgresql://postgres@127.0.0.1:5432/test (default: "
                             "$LEDGERMESH_BENCH_POSTGRES or $LEDGERMESH_TEST_POSTGRES); each "
                             "run uses a fresh schema, dropped at the end")
    parser.add_argument("--nats-sync", choices=("default", "always"), default="default",
                        help="when JetStream fsyncs, for the system and the JetStream "
                             "baseline: default (every 2 minutes, as `ledgermesh demo` runs) "
                             "or always (before every ack, as the configs in deploy/ set)")
    parser.add_argument("--skip-peers", action="store_true", help="do not run peer frameworks")
    parser.add_argument("--peers-python", default=sys.executable, metavar="PYTHON",
                        help="interpreter with the peer frameworks installed (default: this "
                             "one), e.g. a separate venv with `pip install autogen-core "
                             "langgraph langgraph-checkpoint-sqlite agent-framework-core`")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where ledgers, NATS stores and logs go (default: a new "
                             "temporary directory, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.backend != "sqlite" and not args.postgres:
        parser.error("--backend postgres|both needs --postgres DSN")
    return args


# -- the machine --------------------------------------------------------------------------

def machine(nats_version: str) -> dict[str, Any]:
    memory = "?"
    cpu_model = platform.processor() or "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "memory": memory,
            "kernel": platform.release(), "python": platform.python_version(),
            "nats_server": nats_version, "nats_py": version("nats-py"),
            "eventsourcing": version("eventsourcing"), "msgspec": version("msgspec")}


# -- the real system ------------------------------------------------------------------------

class RssSampler:
    """The coordinator's VmRSS against the ledger's size, every ``interval`` seconds."""

    def __init__(self, stack: Stack, interval: float = 0.5) -> None:
        self.stack = stack
        self.interval = interval
        self.samples: list[tuple[int, int]] = []  # (events recorded, VmRSS kB)

    async def run(self) -> None:
        while True:
            events = await self.stack.events_recorded()
            rss = read_proc_status(self.stack.coordinator.pid).get("VmRSS", 0)
            if events >= 0 and rss:
                self.samples.append((events, rss))
            await anyio.sleep(self.interval)

    def points(self, checkpoints: list[int]) -> list[dict[str, float]]:
        out = []
        for mark in checkpoints:
            for events, rss in self.samples:
                if events >= mark:
                    out.append({"events": events, "rss_mb": rss / 1024})
                    break
        return out


async def system_run(location: str, workdir: Path, profile: Profile, say: Any,
                     label: str, nats_config: Path | None = None) -> dict[str, Any]:
    """One run of the real system: latency at 1, throughput at 64, latency at 50%."""
    async with open_stack(workdir, location, nats_config=nats_config) as stack:
        driver = Driver(stack)
        sampler = RssSampler(stack)
        async with driver.observing(), anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            await driver.closed_loop("warm", 8, tasks=profile.warm_tasks, max_seconds=60)
            lat = await driver.closed_loop("lat", 1, tasks=profile.latency_tasks,
                                           max_seconds=120)
            cpu0, t0 = stack.cpu(), time.perf_counter()
            thr = await driver.closed_loop("thr", IN_FLIGHT, tasks=10**9,
                                           max_seconds=profile.throughput_seconds)
            cpu1, t1 = stack.cpu(), time.perf_counter()
            tasks_per_s = thr.completion_rate()
            half = await driver.open_loop("half", max(tasks_per_s * 0.5, 1.0),
                                          seconds=profile.half_seconds)
            events = await stack.events_recorded()
            status = read_proc_status(stack.coordinator.pid)
            tg.cancel_scope.cancel()
        nats_version = stack.nats_version
    hops = await anyio.to_thread.run_sync(hop_latencies_ms, location, [lat, half])
    cpu = {name: (cpu1[name] - cpu0[name]) / (t1 - t0) * 100 for name in cpu0}
    figures = {
        "handoffs_per_s": tasks_per_s * chain.HOPS,
        "tasks_per_s": tasks_per_s,
        "handoff_p50_ms_1": report.quantile(hops["lat"], 0.5),
        "handoff_p99_ms_1": report.quantile(hops["lat"], 0.99),
        "handoff_p50_ms_half": report.quantile(hops["half"], 0.5),
        "handoff_p99_ms_half": report.quantile(hops["half"], 0.99),
        "half_load_handoffs_per_s": half.completion_rate(0.0, 1.0) * chain.HOPS,
        "task_p50_ms_1": report.quantile(lat.task_ms(), 0.5),
        "coordinator_peak_rss_mb": status.get("VmHWM", 0) / 1024,
        "coordinator_cpu_percent": cpu["coordinator"],
        "cpu_percent_64": {k: round(v, 1) for k, v in cpu.items()},
        "events": events,
        "hop_samples_1": len(hops["lat"]),
        "hop_samples_half": len(hops["half"]),
        "nats_version": nats_version,
    }
    say(f"  {label}: {figures['handoffs_per_s']:,.0f} handoffs/s @64 · p50 "
        f"{figures['handoff_p50_ms_1']:.2f} ms / p99 {figures['handoff_p99_ms_1']:.2f} ms @1 · "
        f"p50 {figures['handoff_p50_ms_half']:.2f} / p99 {figures['handoff_p99_ms_half']:.2f} "
        f"ms @50% · coordinator {cpu['coordinator']:.0f}% CPU, "
        f"{figures['coordinator_peak_rss_mb']:.0f} MB peak")
    return figures


async def long_run(location: str, workdir: Path, profile: Profile, say: Any,
                   nats_config: Path | None = None) -> dict[str, Any]:
    """Drive the real system at 64 in flight until the ledger holds ``long_events``."""
    target = profile.long_events
    async with open_stack(workdir, location, nats_config=nats_config) as stack:
        driver = Driver(stack)
        sampler = RssSampler(stack)
        async with driver.observing(), anyio.create_task_group() as tg:
            tg.start_soon(sampler.run)
            tasks = target // chain.EVENTS_PER_TASK + 1
            started = time.perf_counter()
            thr = await driver.closed_loop("long", IN_FLIGHT, tasks=tasks,
                                           max_seconds=profile.long_max_seconds)
            seconds = time.perf_counter() - started
            events = await stack.events_recorded()
            sampler.samples.append((events, read_proc_status(stack.coordinator.pid)
                                    .get("VmRSS", 0)))
            status = read_proc_status(stack.coordinator.pid)
            tg.cancel_scope.cancel()
    checkpoints = [50_000, 200_000] if events >= 200_000 else [max(events // 4, 1), events]
    built_by = "the real system (NATS + coordinator + 5 agent processes)"
    out: dict[str, Any] = {
        "ledger_events": events, "seconds": seconds, "built_by": built_by,
        "handoffs_per_s": thr.completion_rate() * chain.HOPS,
        "points": sampler.points(checkpoints),
        "peak_mb": status.get("VmHWM", 0) / 1024,
        "samples": [(e, round(r / 1024, 1)) for e, r in sampler.samples[:: max(
            len(sampler.samples) // 40, 1)]],
    }
    if events < target:
        from bench.ledger_fill import fill

        say(f"  the real system reached {events:,} events in {seconds:.0f} s; adding the "
            f"rest through LedgerWriter.record in-process (no NATS)")
        filled = await anyio.to_thread.run_sync(fill, location, target)
        out["built_by"] = (f"{events:,} events by the real system, then "
                           f"{filled['events_added']:,} through LedgerWriter.record "
                           "in-process (the real write path minus NATS)")
        out["replay_ledger_events"] = filled["ledger_events"]
    else:
        out["replay_ledger_events"] = events
    rss = ", ".join(f"{p['events']:,} events → {p['rss_mb']:.1f} MB" for p in out["points"])
    say(f"  long run: {events:,} events in {seconds:.0f} s "
        f"({out['handoffs_per_s']:,.0f} handoffs/s); coordinator RSS {rss}; "
        f"peak {out['peak_mb']:.1f} MB")
    return out


# -- everything -----------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        base = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
        self.profile = replace(base, runs=args.runs) if args.runs else base
        self.backends = (["sqlite", "postgres"] if args.backend == "both"
                         else [args.backend])
        self.notes: list[str] = []
        self.started = time.monotonic()
        self.schemas: list[str] = []  # PostgreSQL schemas made by this run, dropped at the end

    def say(self, text: str = "") -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}" if text else "", flush=True)

    def ledger_location(self, backend: str, workdir: Path, name: str) -> str:
        if backend == "postgres":
            location = pg.new_schema(self.args.postgres)
            self.schemas.append(location)
            return location
        return str(workdir / f"{name}.db")

    def cleanup(self) -> None:
        for location in self.schemas:
            try:
                pg.drop_schema(location)
            except Exception as exc:  # cleaning up must not hide the result or the error
                print(f"warning: cannot drop {location}: {exc}", file=sys.stderr)

    async def run(self, workdir: Path) -> dict[str, Any]:
        p = self.profile
        args = self.args
        nats_config = None
        if args.nats_sync == "always":
            nats_config = workdir / "nats-sync-always.conf"
            await anyio.Path(nats_config).write_text("jetstream {\n  sync_interval: always\n}\n")
        if "postgres" in self.backends:
            problem = pg.check(args.postgres)
            if problem is not None:
                raise BenchError(f"PostgreSQL at {args.postgres} is not usable: {problem}")
        peer_names: list[str] = []
        peer_results: dict[str, dict[str, Any]] = {}
        if args.skip_peers:
            peer_results = {name: {"status": "skipped", "reason": "skipped: --skip-peers"}
                            for name in peers.PEERS}
        else:
            for name in peers.PEERS:
                why = peers.available(args.peers_python, name)
                if why is None:
                    peer_names.append(name)
                    peer_results[name] = {"status": "ok", "runs": [],
                                          "version": peers.version(args.peers_python, name),
                                          "durability": peers.PEERS[name]["durability"]}
                else:
                    self.say(f"peer {name}: {why}")
                    peer_results[name] = {"status": "skipped", "reason": why}
        system: dict[str, list[dict[str, Any]]] = {b: [] for b in self.backends}
        limit_runs: list[dict[str, Any]] = []
        js_runs: list[dict[str, float]] = []
        kept: dict[str, str] = {}  # backend -> ledger to replay when there is no long run
        nats_version = "?"
        for run in range(1, p.runs + 1):
            self.say(f"run {run}/{p.runs}")
            for backend in self.backends:
                location = self.ledger_location(backend, workdir, f"{backend}-run{run}")
                figures = await system_run(location, workdir / f"{backend}-run{run}", p,
                                           self.say, f"{backend:<8}", nats_config)
                nats_version = figures["nats_version"]
                figures["ledger_bytes_per_event"] = (ledger_bytes(location)
                                                     / max(figures["events"], 1))
                system[backend].append(figures)
                previous = kept.get(backend)
                kept[backend] = location
                if previous is not None:
                    self._discard(backend, previous)
            async with open_embedded_nats(workdir / f"baseline-nats-{run}",
                                          config_file=nats_config) as server:
                limit = await baseline_limit.measure(
                    server.url, workdir / f"limit-run{run}",
                    latency_tasks=p.limit_latency_tasks, throughput_tasks=10**9,
                    max_seconds=p.limit_seconds)
                limit_runs.append(limit)
                self.say(f"  limit (a): {limit['handoffs_per_s']:,.0f} handoffs/s @64 · p50 "
                         f"{report.quantile(limit['hop_ms_1'], 0.5):.2f} ms / p99 "
                         f"{report.quantile(limit['hop_ms_1'], 0.99):.2f} ms @1")
                js = await baseline_js.measure(server.url, pipelined=p.js_pipelined,
                                               one_at_a_time=p.js_one_at_a_time)
                js_runs.append(js)
                self.say(f"  JetStream (b): {js['js_publish_pipelined_per_s']:,.0f}/s pipelined,"
                         f" {js['js_publish_one_at_a_time_per_s']:,.0f}/s one at a time")
            for name in peer_names:
                figures = await anyio.to_thread.run_sync(
                    peers.measure, args.peers_python, name, p.peer_latency_tasks,
                    p.peer_seconds, workdir)
                if "error" in figures:
                    self.say(f"  peer {name}: failed: {figures['error']}")
                    peer_results[name]["errors"] = [*peer_results[name].get("errors", []),
                                                    figures["error"]]
                    continue
                peer_results[name]["runs"].append(figures)
                self.say(f"  peer {name}: {figures['handoffs_per_s']:,.0f} handoffs/s @64 · "
                         f"p50 {figures['hop_p50_ms_1']:.3f} ms @1")

        longs: dict[str, dict[str, Any]] = {}
        if p.long_events:
            backend = self.backends[0]
            self.say(f"long run ({backend}): driving the system to {p.long_events:,} events")
            location = self.ledger_location(backend, workdir, f"{backend}-long")
            longs[backend] = await long_run(location, workdir / f"{backend}-long", p, self.say,
                                            nats_config)
            self._discard(backend, kept[backend])
            kept[backend] = location
        replays: dict[str, dict[str, Any]] = {}
        for backend, location in kept.items():
            runs_v, runs_raw, runs_rows = [], [], []
            for _ in range(p.replays):
                runs_v.append(await anyio.to_thread.run_sync(baseline_replay.replay_verify,
                                                             location))
                runs_raw.append(await anyio.to_thread.run_sync(baseline_replay.raw_read_decode,
                                                               location))
                runs_rows.append(await anyio.to_thread.run_sync(
                    baseline_replay.rows_read_decode, location))
            size = ledger_bytes(location)
            replays[backend] = {"verify": runs_v, "raw": runs_raw, "rows": runs_rows,
                                "events": runs_v[0]["events"],
                                "bytes_per_event": size / max(runs_v[0]["events"], 1)}
            self.say(f"replay --verify ({backend}, {runs_v[0]['events']:,} events): "
                     f"{report.fmt(report.stat([r['events_per_s'] for r in runs_v]))} events/s;"
                     f" raw read+decode (c) "
                     f"{report.fmt(report.stat([r['events_per_s'] for r in runs_raw]))} "
                     f"events/s; rows read+decode (c′) "
                     f"{report.fmt(report.stat([r['events_per_s'] for r in runs_rows]))} "
                     f"events/s; {size / max(runs_v[0]['events'], 1):,.0f} bytes/event")
            self._discard(backend, location)
        return self.assemble(system, limit_runs, js_runs, peer_results, longs, replays,
                             nats_version)

    def _discard(self, backend: str, location: str) -> None:
        if backend == "postgres":
            pg.drop_schema(location)

    def assemble(self, system: dict[str, list[dict[str, Any]]], limit_runs: list[dict[str, Any]],
                 js_runs: list[dict[str, float]], peer_results: dict[str, dict[str, Any]],
                 longs: dict[str, dict[str, Any]], replays: dict[str, dict[str, Any]],
                 nats_version: str) -> dict[str, Any]:
        stat = report.stat
        limit = {
            "handoffs_per_s": stat([r["handoffs_per_s"] for r in limit_runs]),
            "handoff_p50_ms_1": stat([report.quantile(r["hop_ms_1"], 0.5) for r in limit_runs]),
            "handoff_p99_ms_1": stat([report.quantile(r["hop_ms_1"], 0.99) for r in limit_runs]),
            "handoff_p50_ms_64": stat([report.quantile(r["hop_ms_64"], 0.5) for r in limit_runs]),
            "handoff_p99_ms_64": stat([report.quantile(r["hop_ms_64"], 0.99)
                                       for r in limit_runs]),
        }
        for name, peer in peer_results.items():
            if peer.get("status") != "ok":
                continue
            runs = peer.pop("runs")
            if not runs:
                peer_results[name] = {"status": "failed", "reason": "; ".join(
                    peer.get("errors", ["no run finished"]))}
                continue
            peer["handoffs_per_s"] = stat([r["handoffs_per_s"] for r in runs])
            peer["handoff_p50_ms_1"] = stat([r["hop_p50_ms_1"] for r in runs])
            peer["handoff_p99_ms_1"] = stat([r["hop_p99_ms_1"] for r in runs])
        measured = {n: p["handoffs_per_s"]["median"] for n, p in peer_results.items()
                    if p.get("status") == "ok"}
        best_peer = max(measured, key=lambda n: measured[n]) if measured else None
        durable = {n: v for n, v in measured.items() if peers.PEERS[n].get("durable")}
        best_durable = max(durable, key=lambda n: durable[n]) if durable else None
        distributed = {n: v for n, v in measured.items() if peers.PEERS[n].get("distributed")}
        best_distributed = (max(distributed, key=lambda n: distributed[n]) if distributed
                            else None)
        backends: dict[str, Any] = {}
        for backend, runs in system.items():
            row: dict[str, Any] = {key: stat([r[key] for r in runs]) for key in (
                "handoffs_per_s", "tasks_per_s", "handoff_p50_ms_1", "handoff_p99_ms_1",
                "handoff_p50_ms_half", "handoff_p99_ms_half", "half_load_handoffs_per_s",
                "task_p50_ms_1", "coordinator_peak_rss_mb", "coordinator_cpu_percent")}
            row["cpu_percent_64"] = [r["cpu_percent_64"] for r in runs]
            row["ratio_vs_limit"] = stat([r["handoffs_per_s"] / lim["handoffs_per_s"]
                                          for r, lim in zip(runs, limit_runs, strict=False)
                                          if lim["handoffs_per_s"] > 0])
            if best_peer is not None:
                row["ratio_vs_best_peer"] = stat([r["handoffs_per_s"] / measured[best_peer]
                                                  for r in runs])
                row["best_peer"] = best_peer
            if best_durable is not None:
                row["ratio_vs_best_durable_peer"] = stat([r["handoffs_per_s"]
                                                          / measured[best_durable]
                                                          for r in runs])
                row["best_durable_peer"] = best_durable
            if best_distributed is not None:
                row["ratio_vs_best_distributed_peer"] = stat(
                    [r["handoffs_per_s"] / measured[best_distributed] for r in runs])
                row["best_distributed_peer"] = best_distributed
            rep = replays.get(backend)
            if rep is not None:
                row["replay_events_per_s"] = stat([r["events_per_s"] for r in rep["verify"]])
                row["raw_read_decode_events_per_s"] = stat([r["events_per_s"]
                                                            for r in rep["raw"]])
                row["rows_read_decode_events_per_s"] = stat([r["events_per_s"]
                                                             for r in rep["rows"]])
                row["replay_vs_raw"] = stat([v["events_per_s"] / r["events_per_s"]
                                             for v, r in zip(rep["verify"], rep["raw"],
                                                             strict=True)])
                row["ledger_bytes_per_event"] = stat([rep["bytes_per_event"]])
                long = longs.get(backend)
                row["replay_ledger"] = {
                    "events": rep["events"],
                    "built_by": long["built_by"] if long else
                    "the real system: the last run's ledger (no long run on this backend)"}
            long = longs.get(backend)
            if long is not None:
                row["rss_flatness"] = {k: long[k] for k in ("ledger_events", "built_by",
                                                             "points", "peak_mb", "samples",
                                                             "seconds", "handoffs_per_s")}
                row["coordinator_peak_rss_mb_long"] = long["peak_mb"]
            backends[backend] = row
        raw = replays.get("sqlite") or next(iter(replays.values()), None)
        baselines: dict[str, Any] = {
            "limit": limit,
            "jetstream": {
                "pipelined_per_s": stat([r["js_publish_pipelined_per_s"] for r in js_runs]),
                "one_at_a_time_per_s": stat([r["js_publish_one_at_a_time_per_s"]
                                             for r in js_runs]),
            },
        }
        if raw is not None:
            baselines["raw_read_decode"] = {
                "events_per_s": stat([r["events_per_s"] for r in raw["raw"]]),
                "ledger_events": raw["events"]}
        p = self.profile
        notes = [
            "handoffs/s = 5 × tasks completed per second: each task makes 5 recorded, "
            "delivered hops (submission → hop1, then 4 handoffs); per task "
            f"{chain.EVENTS_PER_TASK} ledger events from 11 envelopes in "
            f"{chain.INTAKE_MESSAGES_PER_TASK} intake messages (a hop's say and handoff "
            "travel as one batch)",
            "handoff latency = time between the ledger's recorded_at of consecutive "
            "assignments of a task (last: assignment of hop5 → task.completed); baseline "
            "(a) the same between its rows; peers: task time / 5",
            "ratio_vs_limit pairs each run with the limit baseline measured in the same "
            "run; ratio_vs_best_peer uses the best peer's median (peers run in one process "
            "and most keep nothing: see each peer's durability); ratio_vs_best_durable_peer "
            "compares with the best peer that persists every step, "
            "ratio_vs_best_distributed_peer with the best whose agents are separate "
            "processes",
            *self.notes,
        ]
        if not p.long_events:
            notes.append(f"{p.name} mode: no ≥200k-event long run; replay figures are over "
                         "the last run's ledger")
        return {
            "meta": {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                     "mode": p.name, "runs": p.runs, "argv": sys.argv[1:],
                     "nats_sync": self.args.nats_sync,
                     "machine": machine(nats_version),
                     "seconds": round(time.monotonic() - self.started, 1),
                     "profile": vars(p)},
            "workload": {"name": "handoff chain", "hops": chain.HOPS,
                         "agents": list(chain.NAMES), "in_flight": [1, IN_FLIGHT],
                         "events_per_task": chain.EVENTS_PER_TASK,
                         "intake_messages_per_task": chain.INTAKE_MESSAGES_PER_TASK},
            "backends": backends,
            "baselines": baselines,
            "peers": peer_results,
            "notes": notes,
        }


def _first(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None, prog: str = "python -m bench") -> int:
    args = parse_args(argv, prog)
    # Agent processes import bench.chain: make the repository importable wherever we run.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ledgermesh-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    bench.say(f"ledgermesh bench, mode {bench.profile.name}, {bench.profile.runs} run(s), "
              f"backend(s) {', '.join(bench.backends)}; work directory {workdir}")
    try:
        try:
            result = anyio.run(bench.run, workdir)
        finally:
            bench.cleanup()
    except (BenchError, LedgermeshError, RuntimeError, OSError, subprocess.SubprocessError,
            psycopg.Error, ExceptionGroup) as exc:
        print(f"error: {_first(exc)}", file=sys.stderr)
        print(f"       logs and ledgers kept in {workdir}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print()
    print(report.table(result))
    if args.json is not None:
        report.write_json(result, args.json)
        print(f"\nwrote {args.json}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
