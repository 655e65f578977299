"""The spatial kernel against a direct computation with whole P×P matrices.

``scalecalc.kernel`` applies each window op one spatial axis at a time on [h, w, h, w]
arrays; here every op is written out as its P_out × P_in matrix over flattened positions
(M_a for tap a of a conv, the window average for a pool) and the moments are formed by
plain matrix products, from the definitions: X' = n·E[W²]·Σ_a M_a X M_aᵀ, G = n'·E[W²]·Σ_a
M_aᵀ G' M_a, E[ΔW²] = Σ_a ΣΣ G'·(M_a X M_aᵀ)/k². Sampled networks are compared in
``test_rules_mc.py`` (the padded chain under a global pool, with its negative control).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scalecalc import finite, kernel
from scalecalc.graph import build
from scalecalc.propagate import propagate, states
from scalecalc.spec import parse

SPEC = """
name: kernel-check
input: {channels: 3, size: 7}
layers:
  - {name: c0, op: conv, out: 16, kernel: 3, stride: 2, padding: 1}
  - {name: r0, op: leaky_relu, slope: 0.2}
  - {name: p0, op: avgpool, kernel: 2, stride: 1}
  - {name: c1, op: conv, out: 24, kernel: 3, padding: 1, bias: false}
  - {name: c2, op: conv, out: 24, kernel: 1, from: p0}
  - {name: s2, op: scale, value: 0.7}
  - {name: sum, op: add, from: [c1, s2], weights: [0.8, 0.6]}
  - {name: r1, op: relu}
  - {name: gap, op: global_avgpool}
  - {name: fc, op: linear, out: 10}
"""


def _matrices(n_in: int, k: int, s: int, pad: int) -> list[np.ndarray]:
    """One P_out × P_in matrix per 2-D tap: output (i, j) reads input (s·i + a − pad, s·j + b − pad)."""
    n_out = (n_in + 2 * pad - k) // s + 1
    out = []
    for a in range(k):
        for b in range(k):
            m = np.zeros((n_out * n_out, n_in * n_in))
            for i in range(n_out):
                for j in range(n_out):
                    u, v = s * i + a - pad, s * j + b - pad
                    if 0 <= u < n_in and 0 <= v < n_in:
                        m[i * n_out + j, u * n_in + v] = 1
            out.append(m)
    return out


def _relu(x: np.ndarray, slope: float) -> tuple[np.ndarray, np.ndarray]:
    """Output covariance and E[f'(u_p) f'(u_q)] of a leaky ReLU of a centred Gaussian field."""
    sd = np.sqrt(np.diag(x))
    outer = np.outer(sd, sd)
    theta = np.arccos(np.clip(x / outer, -1, 1))
    arc = outer * (np.sin(theta) + (math.pi - theta) * np.cos(theta)) / (2 * math.pi)
    # f = a·u + (1−a)·relu(u): E[u·relu(v)] = E[uv]/2 by symmetry
    cov = slope**2 * x + slope * (1 - slope) * x + (1 - slope) ** 2 * arc
    gate = slope**2 + slope * (1 - slope) + (1 - slope) ** 2 * (math.pi - theta) / (2 * math.pi)
    return cov, gate


def _direct(net) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:  # type: ignore[no-untyped-def]
    """E[ΔW²] per weighted layer, E[Δb²] per bias, and gk/g at two outputs, from P×P products."""
    ew2 = {n.name: float(n.init.m2) for n in net.nodes if n.weighted}
    taps0, pool, taps1 = _matrices(7, 3, 2, 1), sum(_matrices(4, 2, 1, 0)) / 4, _matrices(3, 3, 1, 1)
    x_in = np.eye(49)
    y0 = 3 * ew2["c0"] * sum(m @ x_in @ m.T for m in taps0)
    x0, gate0 = _relu(y0, 0.2)
    xp = pool @ x0 @ pool.T
    y1 = 16 * ew2["c1"] * sum(m @ xp @ m.T for m in taps1)
    y2 = 16 * ew2["c2"] * xp
    ysum = 0.64 * y1 + 0.36 * 0.49 * y2
    _, gate1 = _relu(ysum, 0.0)
    g_gap = 10 * ew2["fc"] * 1.0
    g_r1 = np.full((9, 9), g_gap / 81)
    g_sum = g_r1 * gate1
    g_c1, g_c2 = 0.64 * g_sum, 0.36 * 0.49 * g_sum
    g_p = 24 * ew2["c1"] * sum(m.T @ g_c1 @ m for m in taps1) + 24 * ew2["c2"] * g_c2
    g_c0 = (pool.T @ g_p @ pool) * gate0
    weight = {
        "c0": sum(np.sum(g_c0 * (m @ x_in @ m.T)) for m in taps0) / 9,
        "c1": sum(np.sum(g_c1 * (m @ xp @ m.T)) for m in taps1) / 9,
        "c2": float(np.sum(g_c2 * xp)),
        "fc": 1.0 * float(np.sum(_relu(ysum, 0.0)[0])) / 81,  # E[Δy²] = 1 at the output
    }
    bias = {"c0": float(np.sum(g_c0)), "c2": float(np.sum(g_c2)), "fc": 1.0}
    off = lambda g: (g.sum() - np.trace(g)) / (len(g) - 1) / np.trace(g)  # noqa: E731
    return weight, bias, {"c1": off(g_c1), "c0": off(g_c0)}  # nodes with one reader


def test_kernel_matches_whole_matrices() -> None:
    net = build(parse(SPEC, "kernel.yaml"))
    fwd, bwd = states(net)
    found = kernel.kernel(net, fwd)
    assert found is not None
    weight, bias, pairs = _direct(net)
    for name, expected in weight.items():
        assert found.weight_grad[name] == pytest.approx(expected, rel=1e-9), name
    for name, expected in bias.items():
        assert found.bias_grad[name] == pytest.approx(expected, rel=1e-9), name
    for name, expected in pairs.items():  # the calculus carries the kernel's gk/g on
        assert float(bwd[name].k / bwd[name].m) == pytest.approx(expected, rel=1e-8), name
    analysis = propagate(net)  # γ of a layer no ReLU reads is the kernel's E[ΔW²] alone
    assert float(analysis["c1"].gamma) * float(net.node("c1").init.m2) == pytest.approx(weight["c1"], rel=1e-9)


finite_applies, kernel_cap = finite.applies, kernel.CAP

BOUNDARY = """
name: kernel-boundary
input: {channels: 8, size: 8}
layers:
  - {name: c0, op: conv, out: 32, kernel: 1}
  - {name: r0, op: relu}
  - {name: c1, op: conv, out: 32, kernel: 3, stride: 2, padding: 1}
  - {name: r1, op: relu}
  - {name: c2, op: conv, out: 32, kernel: 3, padding: 1}
  - {name: r2, op: relu}
  - {name: gap, op: global_avgpool}
  - {name: fc, op: linear, out: 10}
"""


def test_map_too_large_to_hold_enters_and_leaves_averaged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below a map of more than CAP positions the calculus takes over with the averaged state.
    Where that state is exact (a 1×1 conv of iid input and its ReLU: m on the diagonal, the
    ReLU mean squared off it) every γ and the gradient's pair ratio sent across are unchanged.
    The finite-width part B·y (``finite``) enters as an averaged state, which then passes the
    stride-2 conv as the kernel's exact taps on one side and border factors on the other: with
    it, they agree to 0.1%."""
    net = build(parse(BOUNDARY, "boundary.yaml"))
    for wide, rel in ((True, 1e-8), (False, 1e-3)):
        monkeypatch.setattr(finite, "applies", (lambda _: False) if wide else finite_applies)
        monkeypatch.setattr(kernel, "CAP", kernel_cap)
        whole, (_, bwd_whole) = propagate(net), states(net)
        monkeypatch.setattr(kernel, "CAP", 16)  # the 8×8 maps are no longer held, the 4×4 ones are
        cut, (_, bwd_cut) = propagate(net), states(net)
        for node in ("c0", "c1", "c2", "fc"):
            assert float(cut[node].gamma) == pytest.approx(float(whole[node].gamma), rel=rel), node
        for node in ("r0", "c1", "r1"):
            assert float(bwd_cut[node].k) == pytest.approx(float(bwd_whole[node].k), rel=rel), node
        monkeypatch.setattr(kernel, "CAP", 0)  # nothing held: the averaged rules, which differ here
        assert float(propagate(net)["c2"].gamma) != pytest.approx(float(whole["c2"].gamma), rel=1e-2)


def test_budget_drops_the_largest_maps_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held arrays cost P² entries each; over the budget the largest maps are let go first,
    which here is the same as a cap of 16 positions (the 8×8 maps enter averaged)."""
    net = build(parse(BOUNDARY, "boundary.yaml"))
    fwd, _ = states(net)
    monkeypatch.setattr(kernel, "CAP", 16)
    capped = kernel.kernel(net, fwd)
    monkeypatch.setattr(kernel, "CAP", 1024)
    monkeypatch.setattr(kernel, "BUDGET", 2000)  # the 8×8 maps alone are 2·64² entries
    budgeted = kernel.kernel(net, fwd)
    assert capped is not None and budgeted is not None
    assert "c0" not in budgeted.weight_grad
    assert budgeted == capped
    monkeypatch.setattr(kernel, "BUDGET", 100)  # not even the 4×4 maps: vectors alone, nothing to add
    assert kernel.kernel(net, fwd) is None


@pytest.mark.parametrize(("spec", "why"), [
    ("{name: m, op: maxpool, kernel: 3, stride: 2}", "overlapping max-pool windows"),
    ("{name: p, op: avgpool, kernel: 2}\n  - {name: r2, op: relu}", "a ReLU reading a pooled ReLU has a mean"),
])
def test_kernel_stays_out_where_it_does_not_hold(spec: str, why: str) -> None:
    text = f"""
name: outside
input: {{channels: 4, size: 8}}
layers:
  - {{name: c0, op: conv, out: 16, kernel: 3, padding: 1}}
  - {{name: r0, op: relu}}
  - {spec}
  - {{name: flat, op: flatten}}
  - {{name: fc, op: linear, out: 10}}
"""
    net = build(parse(text, "outside.yaml"))
    fwd, _ = states(net)
    assert kernel.kernel(net, fwd) is None, why


@pytest.mark.parametrize(("slope", "held"), [(0.5, True), (-0.5, False)])
def test_max_pool_needs_an_increasing_activation(slope: float, held: bool) -> None:
    """max f(zᵢ) = f(max zᵢ) only for increasing f: a leaky ReLU of negative slope under a max
    pool is left to the averaged rules."""
    text = f"""
name: pooled
input: {{channels: 4, size: 8}}
layers:
  - {{name: c0, op: conv, out: 16, kernel: 3, padding: 1}}
  - {{name: a0, op: leaky_relu, slope: {slope}}}
  - {{name: m, op: maxpool, kernel: 2}}
  - {{name: flat, op: flatten}}
  - {{name: fc, op: linear, out: 10}}
"""
    net = build(parse(text, "pooled.yaml"))
    fwd, _ = states(net)
    assert (kernel.kernel(net, fwd) is not None) == held
