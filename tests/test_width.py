"""Finite width: where a globally pooled gradient has passed narrow ReLU layers, the wide-limit
rules drift, and the calculus stops trusting its backward moments there.

The net is ``benchmarks/nets/chain_pooled.yaml``: nine conv-ReLU layers of width w on 8×8 maps
under a global average pool, where E[Δx²] at the stem comes out +35% at w = 32 and +8% at
w = 128 (``docs/accuracy.md``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scalecalc import assumptions
from scalecalc.graph import build
from scalecalc.propagate import propagate
from scalecalc.spec import load

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ROOT / "benchmarks" / "nets" / "chain_pooled.yaml"


def _flagged(overrides: dict[str, int]) -> list[str]:
    net = build(load(str(CHAIN)), overrides)
    return [n.name for n in propagate(net).nodes if any("finite width" in note for note in n.notes)]


@pytest.mark.parametrize(("overrides", "where"), [
    ({"w": 32}, ["body.7.conv"]),    # Σ1/n = 1/32 after the first ReLU below the pool
    ({"w": 128}, ["body.4.conv"]),   # 4/128 after the fourth; 3/128 = 0.023 is still trusted
    ({"w": 32, "pooled": 0}, []),    # a flatten shares no gradient between positions
])
def test_the_flag_falls_where_sum_of_inverse_widths_passes_the_tolerance(overrides: dict[str, int],
                                                                       where: list[str]) -> None:
    assert _flagged(overrides) == where


def test_drifting_backward_moments_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """At w = 32 the drift is real (the untrusted backward moments are off by more than 15%), so
    verify passes only because it does not trust them; trusting the wide-limit rules there
    (the negative control) fails."""
    pytest.importorskip("torch")
    from scalecalc.codegen import emit_torch
    from scalecalc.verify import verify

    spec = load(str(CHAIN))
    net = build(spec, {})
    source = emit_torch(spec, net, digest="0")
    found = verify(net, propagate(net), source, draws=200, batch=8, seed=1, device="cpu")
    assert found.passed
    untrusted = [c for c in found.checks if c.quantity == "backward_m2" and not c.trusted]
    assert max(abs(c.error) for c in untrusted) > 0.15
    monkeypatch.setattr(assumptions, "WIDTH_TOLERANCE", float("inf"))
    trusting = verify(net, propagate(net), source, draws=200, batch=8, seed=1, device="cpu")
    assert not trusting.passed
    assert any(c.quantity == "backward_m2" for c in trusting.failures)
