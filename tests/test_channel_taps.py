"""A batchnorm behind a conv of a one-channel stem's output, against torch.

The stem's overlapping 3×3 windows read shared pixels, so for fixed weights its channels at
neighbouring positions covary strongly (e(d) = n·‖Σ(d)‖²/tr(Σ)² of 4.7 at 64 channels of 9
inputs). The next conv's patches then have a concentration ρ far above that of one position's
channels, its channel variances σ_c² spread as a χ² of ν/ρ terms, and the batchnorm reading it
divides the gradient by a σ_c² that fluctuates that much more (``channels.patch``). Tested is
the step of E[Δx²] across each batchnorm, E[Δ(conv)²]/E[Δ(bn)²], which the layers above do not
enter.
"""

from __future__ import annotations

import math

import pytest

from scalecalc import channels
from scalecalc.graph import build
from scalecalc.propagate import states
from scalecalc.spec import parse

torch = pytest.importorskip("torch")
F = torch.nn.functional

SPEC = """
name: stem-taps
input: {channels: 1, size: 16}
layers:
  - {name: stem, op: conv, out: 64, kernel: 3, padding: 1, bias: false}
  - {name: bn0, op: batchnorm, batch: 16}
  - {name: r0, op: relu}
  - {name: c1, op: conv, out: 128, kernel: 3, padding: 1, bias: false}
  - {name: bn1, op: batchnorm, batch: 16}
  - {name: r1, op: relu}
  - {name: gap, op: global_avgpool}
  - {name: fc, op: linear, out: 64}
"""
BATCH, DRAWS, TOL = 16, 400, 0.02
STEPS = (("c1", "bn1"), ("stem", "bn0"))


def _draw(gen, m2):  # type: ignore[no-untyped-def]
    """One weight draw: E[Δ²] at each conv's output and at the batchnorm after it."""
    def weight(name, *shape):  # type: ignore[no-untyped-def]
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * math.sqrt(m2[name])).requires_grad_()

    def bn(h):  # type: ignore[no-untyped-def]
        return F.batch_norm(h, None, None, training=True, eps=1e-5)

    x = torch.randn(BATCH, 1, 16, 16, generator=gen, dtype=torch.float64)
    nodes = {"stem": F.conv2d(x, weight("stem", 64, 1, 3, 3), padding=1)}
    nodes["bn0"] = bn(nodes["stem"])
    nodes["c1"] = F.conv2d(F.relu(nodes["bn0"]), weight("c1", 128, 64, 3, 3), padding=1)
    nodes["bn1"] = bn(nodes["c1"])
    out = F.linear(F.relu(nodes["bn1"]).mean((2, 3)), weight("fc", 64, 128))
    grads = torch.autograd.grad(out, list(nodes.values()), torch.randn(out.shape, generator=gen, dtype=torch.float64))
    return {name: g.square().mean().item() for name, g in zip(nodes, grads)}


def _measured() -> dict[str, tuple[float, float]]:
    """Per step, the ratio of the mean squares over the draws and its standard error (delta method)."""
    net = build(parse(SPEC, "stem-taps.yaml"))
    m2 = {n.name: float(n.init.m2) for n in net.nodes if n.init is not None}
    gen = torch.Generator().manual_seed(11)
    draws = [_draw(gen, m2) for _ in range(DRAWS)]
    out = {}
    for below, above in STEPS:
        num, den = [d[below] for d in draws], [d[above] for d in draws]
        ratio = sum(num) / sum(den)
        mean_den = sum(den) / DRAWS
        resid = [(a - ratio * b) / mean_den for a, b in zip(num, den)]
        out[below] = ratio, math.sqrt(sum(r * r for r in resid) / (DRAWS - 1) / DRAWS)
    return out


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[float, float]]:
    return _measured()


def _predicted() -> dict[str, float]:
    bwd = states(build(parse(SPEC, "stem-taps.yaml")))[1]
    return {below: float(bwd[below].m) / float(bwd[above].m) for below, above in STEPS}


def test_batchnorm_steps_with_tap_covariance(measured: dict[str, tuple[float, float]]) -> None:
    for name, predicted in _predicted().items():
        ratio, se = measured[name]
        assert 4 * se < TOL * ratio, f"{name}: too few draws to test {TOL:.0%}"
        assert abs(predicted / ratio - 1) < TOL, (name, predicted, ratio)


def test_tap_covariance_matters(measured: dict[str, tuple[float, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the next conv's patches taken as one position's channels, the step
    across bn1 comes out 3.5% too small, outside the tolerance by more than 4 SE."""
    monkeypatch.setattr(channels, "near", lambda node, xs, out: None)
    predicted = _predicted()
    ratio, se = measured["c1"]
    assert abs(predicted["c1"] / ratio - 1) > TOL + 4 * se / ratio, (predicted["c1"], ratio)
