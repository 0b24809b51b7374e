"""Figures → statistics (median and min–max over runs), the printed table, and JSON."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def stat(values: list[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "runs"}`` of the per-run values (empty list → zeros)."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return {"median": 0.0, "min": 0.0, "max": 0.0, "runs": []}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean),
            "runs": [round(v, 4) for v in clean]}


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (q in 0..1) of unsorted values; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)
    return ordered[index]


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt(s: dict[str, Any] | None) -> str:
    """``median (min–max)``, or ``—`` when not measured."""
    if not s or not s.get("runs"):
        return "—"
    if len(s["runs"]) == 1 or s["min"] == s["max"]:
        return _num(s["median"])
    return f"{_num(s['median'])} ({_num(s['min'])}–{_num(s['max'])})"


ROWS = [
    ("handoffs/s, 64 in flight", "handoffs_per_s"),
    ("handoff p50 ms, 1 in flight", "handoff_p50_ms_1"),
    ("handoff p99 ms, 1 in flight", "handoff_p99_ms_1"),
    ("handoff p50 ms, 50% of peak", "handoff_p50_ms_half"),
    ("handoff p99 ms, 50% of peak", "handoff_p99_ms_half"),
    ("ratio vs limit (a)", "ratio_vs_limit"),
    ("ratio vs best peer", "ratio_vs_best_peer"),
    ("ratio vs best durable peer", "ratio_vs_best_durable_peer"),
    ("ratio vs best distributed peer", "ratio_vs_best_distributed_peer"),
    ("coordinator peak RSS MB", "coordinator_peak_rss_mb"),
    ("replay --verify events/s", "replay_events_per_s"),
    ("raw log read+decode events/s (c)", "raw_read_decode_events_per_s"),
    ("replay --verify / raw (c)", "replay_vs_raw"),
    ("rows read+decode events/s (c′)", "rows_read_decode_events_per_s"),
    ("ledger bytes/event", "ledger_bytes_per_event"),
    ("coordinator CPU % (64 in flight)", "coordinator_cpu_percent"),
]


def table(result: dict[str, Any]) -> str:
    """The human-readable table of a result document."""
    meta = result["meta"]
    backends = result["backends"]
    limit = result["baselines"].get("limit", {})
    columns = [*backends, "limit (a)"]
    data = [*backends.values(), limit]
    width = max(len(label) for label, _ in ROWS) + 2
    col = 26
    lines = [
        f"ledgermesh bench — handoff chain, {result['workload']['hops']} hops, agents as OS "
        f"processes; mode {meta['mode']}, {meta['runs']} run(s); median (min–max)",
        f"{meta['date']} · {meta['machine']['cpus']} CPUs · {meta['machine']['memory']} · "
        f"Python {meta['machine']['python']} · nats-server {meta['machine']['nats_server']}"
        f" (JetStream sync: {meta.get('nats_sync', 'default')})",
        "",
        "".ljust(width) + "".join(c.ljust(col) for c in columns),
    ]
    for label, key in ROWS:
        cells = [fmt(d.get(key)) for d in data]
        if all(c == "—" for c in cells):
            continue
        lines.append(label.ljust(width) + "".join(c.ljust(col) for c in cells))
    lines.append("")
    js = result["baselines"].get("jetstream", {})
    if js:
        lines.append(f"(b) JetStream acked publish: pipelined {fmt(js.get('pipelined_per_s'))}/s,"
                     f" one at a time {fmt(js.get('one_at_a_time_per_s'))}/s")
    for name, backend in backends.items():
        rss = backend.get("rss_flatness")
        if rss:
            points = ", ".join(f"{_num(p['events'])} events: {p['rss_mb']:.1f} MB"
                               for p in rss["points"])
            lines.append(f"{name} coordinator RSS over {rss['ledger_events']:,} events "
                         f"({rss['built_by']}): {points}; peak {rss['peak_mb']:.1f} MB")
        ledger = backend.get("replay_ledger")
        if ledger:
            lines.append(f"{name} replay ledger: {ledger['events']:,} events "
                         f"({ledger['built_by']})")
        writer = backend.get("writer_only_events_per_s")
        if writer:
            lines.append(f"{name} LedgerWriter.record alone (no NATS): "
                         f"{_num(writer)} events/s")
    peers = result.get("peers", {})
    if peers:
        lines.append("")
        lines.append("peers (same chain, in one process):")
        for name, peer in peers.items():
            if peer.get("status") != "ok":
                lines.append(f"  {name:<16} {peer.get('reason', peer.get('status'))}")
                continue
            lines.append(f"  {name:<16} {fmt(peer['handoffs_per_s'])} handoffs/s · p50 "
                         f"{fmt(peer['handoff_p50_ms_1'])} ms · p99 "
                         f"{fmt(peer['handoff_p99_ms_1'])} ms @1 · {peer['durability']} "
                         f"(v{peer['version']})")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
