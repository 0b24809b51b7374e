"""URLs as they may be shown: without NATS or a database client to import."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A URL (or a path) without its password (user:password@, or ?password=), to show
    or log."""
    if "://" not in url:
        return url
    password = urlsplit(url).password
    url = url.replace(f":{password}@", ":***@") if password else url
    return _QUERY_PASSWORD.sub(r"\1***", url)
