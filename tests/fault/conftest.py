"""Fixtures of the fault suite. Scenarios run on the session nats-server
(tests/conftest.py) under their own prefix, except the one that kills nats-server: it
starts its own on a fixed port and store directory."""

from __future__ import annotations

import re

import pytest


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> str:
    """The scenario's name, from the test's: what its summary and history are saved as."""
    name = request.node.name.removeprefix("test_")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
