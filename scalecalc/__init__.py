"""scalecalc: a static scaling calculator for ReLU-family networks."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scalecalc.propagate import Analysis

__version__ = "0.1.0"

__all__ = ["__version__", "analyze"]


def analyze(path: str, overrides: dict[str, float] | None = None, symbolic: tuple[str, ...] = (),
            init: str | None = None, calculus: str = "exact") -> Analysis:
    """Load, build and propagate the spec at ``path``."""
    from scalecalc.graph import build
    from scalecalc.propagate import propagate
    from scalecalc.spec import load

    return propagate(build(load(path), overrides, symbolic, init), calculus)
