"""The coordinator's health as Prometheus metrics, on ``GET /metrics``.

A scrape reads the same counters ``ledgermesh status`` reports. The server is a few lines
of HTTP/1.0 on anyio (one request per connection, then close): enough for a scraper, and
no web framework to depend on.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus

from coordinator.health import Health, HealthReport
from schemas import LedgermeshError

log = logging.getLogger("ledgermesh.coordinator.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 8192  # bytes of request line and headers read; a scrape sends a few hundred

# name, type, help, the report's field (or healthy: its status as 1 or 0)
_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("ledgermesh_coordinator_healthy", "gauge",
     "1 if connected to NATS and writing the ledger, else 0", "healthy"),
    ("ledgermesh_nats_connected", "gauge", "1 while connected to NATS, else 0", "connected"),
    ("ledgermesh_events_recorded_total", "counter",
     "Events this coordinator recorded since it started", "events_recorded"),
    ("ledgermesh_ledger_position", "gauge", "Position of the ledger's last event",
     "ledger_position"),
    ("ledgermesh_relayed_position", "gauge",
     "Position of the last event published on the ledger stream", "relayed_position"),
    ("ledgermesh_relay_lag_events", "gauge",
     "Recorded events not yet published on the ledger stream (nor delivered)", "relay_lag"),
    ("ledgermesh_intake_position", "gauge",
     "Sequence of the intake stream recorded up to", "intake_position"),
)


# name, help, the report's field: counters by principal (names are subject tokens, so
# they need no escaping as label values)
_BY_PRINCIPAL: tuple[tuple[str, str, str], ...] = (
    ("ledgermesh_rejected_total",
     "Intake envelopes rejected since the coordinator started, by the principal they came "
     "from", "rejected"),
    ("ledgermesh_throttled_total",
     "Intake envelopes a rate limit dropped since the coordinator started, by principal",
     "throttled"),
)


def exposition(report: HealthReport, prefix: str) -> bytes:
    """The report in Prometheus' text format, every sample labelled with the prefix."""
    values = {**msgspec.structs.asdict(report), "healthy": int(report.status == "ok"),
              "connected": int(report.connected)}
    lines = []
    for name, kind, text, field in _METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
                  f'{name}{{prefix="{prefix}"}} {values[field]}']
    for name, text, field in _BY_PRINCIPAL:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{prefix="{prefix}",principal="{principal}"}} {count}'
                  for principal, count in sorted(values[field].items())]
    return ("\n".join(lines) + "\n").encode()


async def serve_metrics(health: Health, prefix: str, host: str, port: int, *,
                        task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
    """Answer scrapes on ``host:port`` until cancelled; started with the bound address."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise LedgermeshError(f"cannot serve metrics on {host}:{port}: "
                              f"{exc.strerror or exc}") from exc
    async with listener:
        bound_port = listener.extra(anyio.abc.SocketAttribute.local_port)  # port 0: chosen
        log.info("metrics on http://%s:%d/metrics", host, bound_port)
        task_status.started((host, bound_port))

        async def answer(stream: SocketStream) -> None:
            async with stream:
                try:
                    with anyio.fail_after(5):  # a client that never finishes its request
                        request = await _read_request(stream)
                        await stream.send(_response(request, health, prefix))
                except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError,
                        OSError):
                    return

        await listener.serve(answer)


async def _read_request(stream: SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < _MAX_REQUEST:
        data += await stream.receive()
    return data


def _response(request: bytes, health: Health, prefix: str) -> bytes:
    method, _, rest = request.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _http(405, "Method Not Allowed", b"only GET\n", "Allow: GET, HEAD\r\n")
    if path != b"/metrics":
        return _http(404, "Not Found", b"metrics are at /metrics\n")
    body = exposition(health.report(), prefix)
    return _http(200, "OK", body, content_type=CONTENT_TYPE, head=method == b"HEAD")


def _http(code: int, reason: str, body: bytes, extra: str = "", *,
          content_type: str = "text/plain; charset=utf-8", head: bool = False) -> bytes:
    header = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return header.encode() + (b"" if head else body)
