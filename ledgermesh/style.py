"""How text looks: glyphs and colour on a terminal, plain and stable text otherwise."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Style:
    color: bool
    stream: TextIO

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        tty = hasattr(stream, "isatty") and stream.isatty()
        return cls(color=tty and "NO_COLOR" not in os.environ, stream=stream)

    @property
    def live(self) -> bool:
        """Whether a line may be redrawn in place (progress bars)."""
        return self.color

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def out(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def stdout_style() -> Style:
    return Style.for_stream(sys.stdout)


def short(identifier: str, keep: int = 10) -> str:
    """A long id shortened for people (full ids stay in --json output)."""
    return identifier if len(identifier) <= keep + 1 else identifier[:keep] + "…"
