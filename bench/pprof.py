"""nats-server's CPU profile, read without Go's tools.

nats-server serves Go's pprof on ``prof_port`` (a config setting): ``/debug/pprof/profile``
returns a gzipped protocol buffer of stack samples. This reads just enough of that format
(``profile.proto``: samples, locations, functions, the string table) to rank functions by
their own samples (flat) and by the samples of stacks they are in (cumulative).
"""

from __future__ import annotations

import gzip
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

# Field numbers in profile.proto.
_SAMPLE, _LOCATION, _FUNCTION, _STRING = 2, 4, 5, 6
_SAMPLE_LOCATIONS, _SAMPLE_VALUES = 1, 2
_LOCATION_ID, _LOCATION_LINE = 1, 4
_LINE_FUNCTION = 1
_FUNCTION_ID, _FUNCTION_NAME = 1, 2


@dataclass(frozen=True)
class Profile:
    total: int  # the last sample value summed (CPU nanoseconds for a CPU profile)
    flat: Counter[str]
    cumulative: Counter[str]

    def top(self, limit: int = 15) -> list[str]:
        """The busiest functions, flat and cumulative, as lines of text."""
        def share(n: int) -> str:
            return f"{n / max(self.total, 1) * 100:5.1f}%"
        lines = ["own samples:"]
        lines += [f"  {share(n)}  {_short(name)}" for name, n in self.flat.most_common(limit)]
        lines.append("in the stack (cumulative):")
        lines += [f"  {share(n)}  {_short(name)}"
                  for name, n in self.cumulative.most_common(limit)]
        return lines


def _short(function: str) -> str:
    return function.replace("github.com/nats-io/nats-server/v2/", "")


def fetch(port: int, seconds: int, host: str = "127.0.0.1") -> bytes:
    """A CPU profile of ``seconds`` from a server with ``prof_port: port`` (blocks meanwhile)."""
    url = f"http://{host}:{port}/debug/pprof/profile?seconds={seconds}"
    with urllib.request.urlopen(url, timeout=seconds + 30) as response:
        data: bytes = response.read()
        return data


def parse(data: bytes) -> Profile:
    """A pprof profile (gzipped or not) ranked by function."""
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    strings: list[str] = []
    samples: list[tuple[list[int], list[int]]] = []
    locations: dict[int, list[int]] = {}  # location id -> function ids, innermost first
    functions: dict[int, int] = {}  # function id -> index of its name in strings
    for number, value in _fields(raw):
        if number == _STRING:
            strings.append(_bytes(value).decode("utf-8", "replace"))
        elif number == _SAMPLE:
            ids: list[int] = []
            values: list[int] = []
            for n, v in _fields(_bytes(value)):
                if n == _SAMPLE_LOCATIONS:
                    ids += _ints(v)
                elif n == _SAMPLE_VALUES:
                    values += _ints(v)
            samples.append((ids, values))
        elif number == _LOCATION:
            location, lines = 0, []
            for n, v in _fields(_bytes(value)):
                if n == _LOCATION_ID:
                    location = _int(v)
                elif n == _LOCATION_LINE:
                    lines += [_int(f) for m, f in _fields(_bytes(v)) if m == _LINE_FUNCTION]
            locations[location] = lines
        elif number == _FUNCTION:
            fields = dict(_fields(_bytes(value)))
            functions[_int(fields.get(_FUNCTION_ID, 0))] = _int(fields.get(_FUNCTION_NAME, 0))
    flat: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for ids, values in samples:
        weight = values[-1] if values else 0
        total += weight
        names = [strings[functions[f]] for i in ids for f in locations.get(i, [])
                 if f in functions]
        if names:
            flat[names[0]] += weight
        for name in set(names):
            cumulative[name] += weight
    return Profile(total, flat, cumulative)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[at]
        at += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, at


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: an int, or bytes for a length-
    delimited field (a nested message, a string or a packed list)."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = _varint(data, at)
            yield number, value
        elif kind == 2:
            size, at = _varint(data, at)
            yield number, data[at:at + size]
            at += size
        elif kind == 1:
            yield number, data[at:at + 8]
            at += 8
        elif kind == 5:
            yield number, data[at:at + 4]
            at += 4
        else:
            raise ValueError(f"not a pprof profile: wire type {kind} at byte {at}")


def _int(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise ValueError("not a pprof profile: a number expected")
    return value


def _bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("not a pprof profile: a message expected")
    return value


def _ints(value: int | bytes) -> list[int]:
    """A repeated integer field: one value, or a packed run of varints."""
    if isinstance(value, int):
        return [value]
    out, at = [], 0
    while at < len(value):
        number, at = _varint(value, at)
        out.append(number)
    return out
