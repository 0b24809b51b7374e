"""The package import graph is a DAG with schemas at the bottom and the CLI at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("schemas", "bus", "coordinator", "agents", "ledgermesh")
ALLOWED = {
    "schemas": set(),
    "bus": {"schemas"},
    "coordinator": {"schemas", "bus"},
    "agents": {"schemas", "bus"},
    "ledgermesh": {"schemas", "bus", "coordinator", "agents"},
}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_imports_only_what_lies_below_it() -> None:
    wrong = []
    for package in OURS:
        for path in modules(package):
            for name in imports(path):
                top = name.split(".")[0]
                if top in OURS and top != package and top not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_only_the_bus_client_speaks_nats() -> None:
    users = sorted(
        str(path.relative_to(ROOT))
        for package in OURS
        for path in modules(package)
        if any(name == "nats" or name.startswith("nats.") for name in imports(path))
    )
    assert users == ["bus/client.py"]


def test_only_the_store_configures_eventsourcing_persistence() -> None:
    # (and the PostgreSQL recorder it names by topic, so that psycopg is imported only
    # for a PostgreSQL ledger)
    users = sorted(
        str(path.relative_to(ROOT))
        for package in OURS
        for path in modules(package)
        if any(name in ("eventsourcing.application", "eventsourcing.sqlite",
                        "eventsourcing.postgres") for name in imports(path))
    )
    assert users == ["coordinator/ledger/postgres.py", "coordinator/ledger/store.py"]


def test_the_graph_checker_sees_a_violation() -> None:
    # Guard against a checker that can never fail: it must see this file's own imports.
    assert "ast" in imports(Path(__file__))
