"""Markdown tables for the benchmark reports (``python benchmarks/NAME.py`` puts this folder on
the import path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
