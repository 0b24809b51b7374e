"""Shared fixtures: one real nats-server per test session, unique subjects per test."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator

import pytest
from anyio.from_thread import start_blocking_portal

from bus.embedded import EmbeddedNats, open_embedded_nats

# Started as a background job (`pytest ... &` in a script), pytest inherits SIGINT ignored,
# and so would every command a test starts: a test that presses Ctrl-C on one would wait
# for it forever. A handler, unlike "ignored", is reset to the default in a child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A JetStream-enabled nats-server shared by the whole session.

    The server's lifecycle runs on its own event loop in a portal thread, so the
    fixture is synchronous and independent of pytest-asyncio's loop scopes.
    """
    store_dir = tmp_path_factory.mktemp("nats")
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(open_embedded_nats(store_dir)) as server,
    ):
        yield server


@pytest.fixture
def prefix() -> str:
    """Unique per-test subject prefix; a NATS token, upper-casable for stream names."""
    return "t" + uuid.uuid4().hex[:8]
