"""Finite width: where a globally pooled gradient has passed narrow ReLU layers, the wide-limit
rules drift, and the calculus stops trusting its backward moments there.

The net is ``benchmarks/nets/chain_pooled.yaml``: nine conv-ReLU layers of width w on 8×8 maps
under a global average pool, where the wide limit puts E[Δx²] at the stem 35% low at w = 32
and 8% low at w = 128, and with the finite-width term (``finite``) 11% and 6% low at w = 32
and 64 (``docs/accuracy.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scalecalc import assumptions, finite
from scalecalc.graph import build
from scalecalc.propagate import propagate
from scalecalc.spec import load

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ROOT / "benchmarks" / "nets" / "chain_pooled.yaml"


def _flagged(overrides: dict[str, int]) -> list[str]:
    net = build(load(str(CHAIN)), overrides)
    flag = "the globally pooled gradient has passed"
    return [n.name for n in propagate(net).nodes if any(flag in note for note in n.notes)]


@pytest.mark.parametrize(("overrides", "where"), [
    ({"w": 32}, ["body.5.conv"]),    # Σ1/n = 3/32 after the third ReLU below the pool; 2/32 is trusted
    ({"w": 16}, ["body.6.conv"]),    # 2/16 after the second; 1/16 = 0.0625 is still trusted
    ({"w": 128}, []),                # 9/128 = 0.070 at the stem: within the tolerance
    ({"w": 32, "pooled": 0}, []),    # a flatten shares no gradient between positions
])
def test_the_flag_falls_where_sum_of_inverse_widths_passes_the_tolerance(overrides: dict[str, int],
                                                                       where: list[str]) -> None:
    assert _flagged(overrides) == where


def test_the_wide_limit_alone_is_trusted_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the finite-width term the drift is 3× larger, and the flag falls 3× higher up."""
    monkeypatch.setattr(finite, "applies", lambda _: False)
    assert _flagged({"w": 32}) == ["body.7.conv"]  # Σ1/n = 1/32 > 0.025 after the first ReLU
    assert _flagged({"w": 128}) == ["body.4.conv"]  # 4/128; 3/128 = 0.023 is still trusted


def test_drifting_backward_moments_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """At w = 32 the wide limit's drift is real: its untrusted backward moments are off by more
    than 15%, verify passes only because it does not trust them, and trusting them (the
    negative control) fails. With the finite-width term verify passes with every moment trusted."""
    pytest.importorskip("torch")
    from scalecalc.codegen import emit_torch
    from scalecalc.verify import verify

    spec = load(str(CHAIN))
    net = build(spec, {})
    source = emit_torch(spec, net, digest="0")

    def run() -> Any:
        return verify(net, propagate(net), source, draws=200, batch=8, seed=1, device="cpu")

    monkeypatch.setattr(assumptions, "FINITE_TOLERANCE", float("inf"))
    assert run().passed
    monkeypatch.setattr(finite, "applies", lambda _: False)
    wide = run()
    assert wide.passed
    untrusted = [c for c in wide.checks if c.quantity == "backward_m2" and not c.trusted]
    assert max(abs(c.error) for c in untrusted) > 0.15
    monkeypatch.setattr(assumptions, "WIDTH_TOLERANCE", float("inf"))
    trusting = run()
    assert not trusting.passed
    assert any(c.quantity == "backward_m2" for c in trusting.failures)
