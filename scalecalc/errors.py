"""The one exception family scalecalc raises for bad input."""

from __future__ import annotations

from dataclasses import dataclass


class ScalecalcError(Exception):
    """Base class: every user-facing failure (bad spec, bad option) derives from it."""


@dataclass(frozen=True)
class Where:
    """A place in a spec file, for error messages: ``file:line:col: label``."""

    file: str = "<spec>"
    line: int = 0
    col: int = 0
    label: str = ""

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        return f"{place}: {self.label}" if self.label else place

    def at(self, label: str) -> Where:
        return Where(self.file, self.line, self.col, label)


class SpecError(ScalecalcError):
    """A spec that cannot be parsed, validated or analysed, located in its file."""

    def __init__(self, where: Where | None, message: str, allowed: str | None = None) -> None:
        self.where = where
        self.message = message
        self.allowed = allowed
        text = f"{where}: {message}" if where else message
        if allowed:
            text += f"; {allowed}"
        super().__init__(text)
