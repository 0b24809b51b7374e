"""PostgreSQL helpers: one fresh schema per run, its size, and dropping it afterwards."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psycopg


def _base(dsn: str) -> tuple[str, str | None]:
    url = urlsplit(dsn)
    schema = parse_qs(url.query).get("schema", [None])[0]
    return urlunsplit(url._replace(query="")), schema


def new_schema(dsn: str) -> str:
    """Create ``bench_<random>`` and return the ledger location that uses it."""
    base, _ = _base(dsn)
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?{urlencode({'schema': schema})}"


def drop_schema(location: str) -> None:
    base, schema = _base(location)
    if schema and schema.startswith("bench_"):
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def schema_bytes(location: str) -> int:
    """Total size of the ledger's tables (with indexes and TOAST) in its schema."""
    base, schema = _base(location)
    with psycopg.connect(base, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'", (schema or "public",)).fetchone()
    return int(row[0]) if row else 0


def check(dsn: str) -> str | None:
    """None if PostgreSQL at ``dsn`` answers; otherwise why not."""
    base, _ = _base(dsn)
    try:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None
