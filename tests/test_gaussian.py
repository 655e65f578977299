"""The Gaussian integrals behind the exact calculus, against Monte Carlo samples.

Each closed form or quadrature is compared with the sample mean of the same function of
Gaussian samples, within 4 standard errors of that mean (computed from the samples), plus a
small floor for the quadrature itself. The negative control: the centred rule E[g(z)²] = E[z²]/2
for a ReLU misses the shortcut sum by far more than that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scalecalc.gaussian import leaky_moments, leaky_pair, rectified_sum

N = 400_000
N_SE = 4.0


def _agrees(predicted: float, samples: np.ndarray) -> bool:
    se = samples.std() / math.sqrt(samples.size)
    return abs(predicted - samples.mean()) <= N_SE * se + 1e-4 * abs(predicted)


def _leaky(x: np.ndarray, a: float) -> np.ndarray:
    return np.where(x > 0, x, a * x)


def _slope(x: np.ndarray, a: float) -> np.ndarray:
    return np.where(x > 0, 1.0, a)


@pytest.mark.parametrize(("mu", "var", "a"), [(0.0, 1.0, 0.0), (0.8, 0.5, 0.0), (-0.6, 2.0, 0.1)])
def test_leaky_moments_of_a_shifted_gaussian(mu: float, var: float, a: float) -> None:
    u = mu + math.sqrt(var) * np.random.default_rng(1).standard_normal(N)
    first, second, gate = leaky_moments(mu, var, a)
    assert _agrees(first, _leaky(u, a))
    assert _agrees(second, _leaky(u, a) ** 2)
    assert _agrees(gate, _slope(u, a) ** 2)


@pytest.mark.parametrize(("mu", "var", "cov", "a"), [(0.5, 1.0, 0.6, 0.0), (0.3, 1.5, 0.4, 0.2)])
def test_leaky_pair_with_a_shared_offset(mu: float, var: float, cov: float, a: float) -> None:
    rng = np.random.default_rng(2)
    b = math.sqrt(cov) * rng.standard_normal((N, 1))
    u = mu + b + math.sqrt(var - cov) * rng.standard_normal((N, 2))
    value, slope = leaky_pair(mu, var, cov, a)
    f, df = _leaky(u, a), _slope(u, a)
    assert _agrees(value, f[:, 0] * f[:, 1])
    assert _agrees(slope, df[:, 0] * df[:, 1])


@pytest.mark.parametrize("case", [
    (1.0, 0.0, (0.0, 1.0, 0.0), (1.0, 0.0), 0.0),  # a post-activation block: BN outputs, no offsets
    (0.7, 0.1, (0.3, 1.5, 0.6), (0.8, 0.3), 0.2),  # means, channel offsets and leaky slopes
])
def test_rectified_sum_against_samples(case: tuple) -> None:
    alpha, a, (mu, m_u, k_u), (m_w, k_w), c = case
    rng = np.random.default_rng(3)
    b_u = math.sqrt(k_u - mu * mu) * rng.standard_normal((N, 1))
    b_w = math.sqrt(k_w) * rng.standard_normal((N, 1))
    u = mu + b_u + math.sqrt(m_u - k_u) * rng.standard_normal((N, 2))
    z = alpha * _leaky(u, a) + b_w + math.sqrt(m_w - k_w) * rng.standard_normal((N, 2))
    g, dg, df = _leaky(z, c), _slope(z, c), _slope(u, a)
    r = rectified_sum(alpha, a, (mu, m_u, k_u), (m_w, k_w), c)
    assert _agrees(r.mean, g[:, 0])
    assert _agrees(r.m2, g[:, 0] ** 2)
    assert _agrees(r.pair, g[:, 0] * g[:, 1])
    assert _agrees(r.open2, dg[:, 0] ** 2)
    assert _agrees(r.open_pair, dg[:, 0] * dg[:, 1])
    assert _agrees(r.joint2, (df[:, 0] * dg[:, 0]) ** 2)
    assert _agrees(r.joint_pair, df[:, 0] * dg[:, 0] * df[:, 1] * dg[:, 1])
    # negative control: a ReLU that took z as centred would pass half of E[z²]
    assert not _agrees(0.5 * float((z[:, 0] ** 2).mean()), g[:, 0] ** 2)
