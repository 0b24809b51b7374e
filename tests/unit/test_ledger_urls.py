"""PostgreSQL ledger URLs: what is read from them, and how they are shown."""

from __future__ import annotations

import pytest

from bus.urls import redact_url
from coordinator.ledger.store import LedgerError, ledger_env


def test_a_password_is_never_shown_wherever_it_is_in_the_url() -> None:
    assert (redact_url("postgresql://app:s3cret@db:5432/ledger?schema=lm")
            == "postgresql://app:***@db:5432/ledger?schema=lm")
    assert (redact_url("postgresql://app@db/ledger?schema=lm&password=s3cret&x=1")
            == "postgresql://app@db/ledger?schema=lm&password=***&x=1")
    assert redact_url("postgresql://app@db/ledger?PASSWORD=s3cret") == (
        "postgresql://app@db/ledger?PASSWORD=***")
    assert redact_url("ledgermesh-data/ledger.db") == "ledgermesh-data/ledger.db"


def test_the_url_gives_the_connection_and_the_schema() -> None:
    env = ledger_env("postgresql://app:p%40ss@db.internal:6432/ledger?schema=lm2")
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"], env["POSTGRES_DBNAME"],
            env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_SCHEMA"]) == (
        "db.internal", "6432", "ledger", "app", "p@ss", "lm2")


@pytest.mark.parametrize("query", ["sslmode=verify-full", "password=s3cret&sslmode=require"])
def test_a_parameter_the_ledger_would_ignore_is_refused(query: str) -> None:
    """Ignored, sslmode=verify-full connected in plain text, and a query-string password
    was sent nowhere but printed in logs."""
    with pytest.raises(LedgerError, match="not read here \\(only schema is\\): give libpq's "
                                          "settings in its environment instead") as refused:
        ledger_env(f"postgresql://app@db/ledger?{query}")
    assert "s3cret" not in str(refused.value)
