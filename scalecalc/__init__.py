"""scalecalc: a static scaling calculator for ReLU-family networks."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "analyze"]


def analyze(path: str, overrides: dict[str, float] | None = None, symbolic: tuple[str, ...] = (),
            init: str | None = None):  # type: ignore[no-untyped-def]
    """Load, build and propagate the spec at ``path``; returns an :class:`Analysis`."""
    from scalecalc.graph import build
    from scalecalc.propagate import propagate
    from scalecalc.spec import load

    return propagate(build(load(path), overrides, symbolic, init))
