"""What two samples share at one position, through a post-activation shortcut, against torch.

A batchnorm after a padded conv on a small map keeps offsets that vary over positions: two
samples at one position share E[x̄_p²] (``State.shared``), more than two positions share (k).
An add passes the shares of its summands on, and the ReLU reading the sum of a shortcut's
ReLU output and that batchnorm (``rectified_sum`` at the same position) turns them into its
own. Measured per draw as E[x̄_p²] over the channels and positions, with x̄_p the mean over
the B samples, less its (m − E[x̄_p²])/B of sampling noise.
"""

from __future__ import annotations

import math

import pytest

from scalecalc.graph import build
from scalecalc.propagate import states
from scalecalc.spec import parse

torch = pytest.importorskip("torch")
F = torch.nn.functional

SPEC = """
name: shared-offsets
input: {channels: 64, size: 4}
layers:
  - {name: c0, op: conv, out: 128, kernel: 1, bias: false}
  - {name: bn0, op: batchnorm, batch: 16}
  - {name: r0, op: relu}
  - {name: c1, op: conv, out: 128, kernel: 3, padding: 1, bias: false}
  - {name: bn1, op: batchnorm, batch: 16}
  - {name: merge, op: add, from: [r0, bn1]}
  - {name: r1, op: relu}
"""
BATCH, DRAWS, TOL = 16, 100, 0.03


def _bn(h):  # type: ignore[no-untyped-def]
    return F.batch_norm(h, None, None, training=True, eps=1e-5)


def _draw(gen):  # type: ignore[no-untyped-def]
    """One weight draw: each node's E[x̄_p²]/E[x²]."""
    def weight(n_out, n_in, k):  # type: ignore[no-untyped-def]
        return torch.randn(n_out, n_in, k, k, generator=gen, dtype=torch.float64) / math.sqrt(n_in * k * k)

    x = torch.randn(BATCH, 64, 4, 4, generator=gen, dtype=torch.float64)
    r0 = F.relu(_bn(F.conv2d(x, weight(128, 64, 1))))
    merge = r0 + _bn(F.conv2d(r0, weight(128, 128, 3), padding=1))
    out = {"merge": merge, "r1": F.relu(merge)}
    return {n: ((t.mean(0).square().mean() * BATCH - t.square().mean()) / (BATCH - 1) / t.square().mean()).item()
            for n, t in out.items()}


def test_offsets_pass_through_post_activation_shortcut() -> None:
    gen = torch.Generator().manual_seed(7)
    draws = [_draw(gen) for _ in range(DRAWS)]
    fwd = states(build(parse(SPEC, "shared-offsets.yaml")))[0]
    for name in ("merge", "r1"):
        values = [d[name] for d in draws]
        mean = sum(values) / DRAWS
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (DRAWS - 1) / DRAWS)
        assert 4 * se < TOL / 2 * mean, f"{name}: too few draws to test {TOL:.0%}"
        state = fwd[name]
        assert state.shared is not None, f"{name}: the offsets did not pass"
        assert abs(state.shared / state.m / mean - 1) < TOL, (name, state.shared / state.m, mean)
        if name == "r1":  # negative control: taken as k, the share comes out 8% low
            assert abs(state.k / state.m / mean - 1) > 2 * TOL, (state.k / state.m, mean)
