"""URLs as they may be shown: without NATS or a database client to import."""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """A URL (or a path) without its password, to show or log."""
    password = urlsplit(url).password if "://" in url else None
    return url.replace(f":{password}@", ":***@") if password else url
