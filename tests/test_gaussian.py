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

from scalecalc.gaussian import (
    SAMPLES,
    chain_rate,
    chain_weight,
    leaky_moments,
    leaky_pair,
    rectified_max,
    rectified_sum,
    window_max,
)

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


def _windowed_field(rho: float, far: float) -> tuple[np.ndarray, np.ndarray]:
    """A 4×4 map in 2×2 windows: unit variance, ``far`` shared by all positions and ``rho``
    within a window; returns the covariance [16, 16] and the windows [4, 4]."""
    windows = np.array([[(2 * i + a) * 4 + 2 * j + b for a in (0, 1) for b in (0, 1)] for i in (0, 1) for j in (0, 1)])
    window_of = np.empty(16, dtype=int)
    window_of[windows.ravel()] = np.repeat(np.arange(4), 4)
    same = window_of[:, None] == window_of[None, :]
    cov = np.where(same, rho, far) + (1 - rho) * np.eye(16)
    return cov, windows


@pytest.mark.parametrize(("rho", "far", "a"), [(0.6, 0.3, 0.0), (0.8, 0.8, 0.1), (0.0, 0.0, 0.0)])
def test_rectified_max_against_samples(rho: float, far: float, a: float) -> None:
    """The window-max moments, with a part shared by every window and a window's own part."""
    cov, windows = _windowed_field(rho, far)
    z = np.random.default_rng(7).multivariate_normal(np.zeros(16), cov, size=N // 4)[:, windows]  # [N, W, K]
    top = z.max(axis=2)
    y, opened = _leaky(top, a), np.where(top > 0, 1.0, a)
    f2, pair, g2, g_pair, mean = rectified_max(4, rho, a, far)
    assert _agrees(f2, y[:, 0] ** 2)
    assert _agrees(pair, y[:, 0] * y[:, 1])
    assert _agrees(g2, opened[:, 0] ** 2)
    assert _agrees(g_pair, opened[:, 0] * opened[:, 1])
    assert _agrees(mean, y[:, 0])
    assert pair <= f2  # two windows never covary more than one window with itself


def test_window_pair_needs_the_window_part() -> None:
    """Negative control: taking the windows as equicorrelated at the shared fraction (the
    rule before the window part) overstates their covariance far beyond the samples' error."""
    cov, windows = _windowed_field(0.6, 0.3)
    y = np.maximum(np.random.default_rng(7).multivariate_normal(np.zeros(16), cov, size=N // 4)[:, windows]
                   .max(axis=2), 0)
    assert _agrees(rectified_max(4, 0.6, 0.0, 0.3)[1], y[:, 0] * y[:, 1])
    assert not _agrees(rectified_max(4, 0.3, 0.0)[1], y[:, 0] * y[:, 1])


@pytest.mark.parametrize("slope", [0.0, 0.2, None])
def test_window_max_of_a_field(slope: float | None) -> None:
    """Sampled window maxima of a field with unequal variances and correlations (after a ReLU,
    a leaky ReLU, or none), against an independent sample 16× larger: within 4 standard errors
    of the field's own draws (relative SE of a mean of squares ≈ √(2/N)) for the window
    moments, and binomial errors for the routing. Deterministic: the same call gives the same
    arrays."""
    rng = np.random.default_rng(3)
    cov, windows = _windowed_field(0.5, 0.2)
    scale = np.diag(rng.uniform(0.5, 1.5, 16))
    cov = scale @ (0.8 * cov + 0.2 * np.corrcoef(rng.standard_normal((16, 40)))) @ scale
    sd = np.sqrt(np.diag(cov))
    rho = np.clip(cov / np.outer(sd, sd), -1, 1)
    theta = np.arccos(rho)
    a = 1.0 if slope is None else slope
    arc = np.outer(sd, sd) * (np.sqrt(1 - rho**2) + (math.pi - theta) * rho) / (2 * math.pi)
    f_cov = (1 - a) ** 2 * arc + a * cov  # the (leaky) ReLU's arc-cosine kernel; cov itself for a = 1
    result = window_max(cov, f_cov, windows, slope)
    assert np.array_equal(result.pairs, window_max(cov, f_cov, windows, slope).pairs)
    draws = min(8 * 2048, SAMPLES // 16)  # what window_max takes for 16 positions
    z = rng.multivariate_normal(np.zeros(16), cov, size=16 * draws)
    zw = z[:, windows]
    y = _leaky(zw.max(axis=2), a)
    pairs = y.T @ y / len(y)
    # for a Gaussian pair Var(y_A·y_B) ≤ 2·E[y_A²]·E[y_B²]
    se = np.sqrt(2 / draws) * np.sqrt(np.outer(np.diag(pairs), np.diag(pairs)))
    assert np.all(np.abs(result.pairs - pairs) <= N_SE * se)
    routed = np.zeros((len(z), 16))
    np.put_along_axis(routed, windows[np.arange(4)[None, :], zw.argmax(axis=2)], 1.0, axis=1)  # first maximum
    opened = routed * np.where(z > 0, 1.0, a)
    for diagonal, full, want in zip((result.routed, result.opened), result.pair_routes(16), (routed, opened)):
        truth = want.T @ want / len(z)  # E[r_p·r_q]: 0 for two positions of one window
        assert np.array_equal(np.diag(full), diagonal)
        assert np.all(np.abs(full - truth) <= N_SE * np.sqrt(truth * (1 - truth) / draws) + 1e-12)


def _stack(blocks: int) -> tuple[list[tuple], list[np.ndarray]]:
    """Laws of z_1..z_n for z_l = relu(z_{l−1}) + w_l, z_0 ~ N(0, 1), w_l ~ N(0, 1) (a stack of
    post-activation blocks, offsets 0), and samples of u = z_0, z_1, ..., z_n."""
    rng = np.random.default_rng(5)
    z = [rng.standard_normal(N)]
    laws: list[tuple] = []
    inner, u = None, (0.0, 1.0, 0.0)  # (E[z], E[z²], E[z_p·z_q]) of the sum the next ReLU reads
    for _ in range(blocks):
        law = (1.0, 0.0, u, (1.0, 0.0), inner)
        z.append(np.maximum(z[-1], 0) + rng.standard_normal(N))
        # z_l = relu(z_{l−1}) + w_l: relu(z_{l−1}) is the previous sum's ReLU (z_0's for l = 1)
        relu = None if inner is None else rectified_sum(*inner[:4], 0.0, inner[4])
        mean, m2 = (math.sqrt(1 / (2 * math.pi)), 0.5) if relu is None else (relu.mean, relu.m2)
        laws.append(law)
        inner, u = law, (mean, m2 + 1.0, mean**2)
    return laws, z


def test_nested_law_of_a_post_activation_stack() -> None:
    """From the second block on, the ReLU reads relu(z) + w with z itself such a sum: its
    moments and its gates' correlation with the ReLU below, by the sum's law on a grid."""
    laws, z = _stack(3)
    for law, below, above in zip(laws[1:], z[1:], z[2:]):
        r = rectified_sum(*law[:4], 0.0, law[4])
        assert _agrees(r.mean, np.maximum(above, 0))
        assert _agrees(r.m2, np.maximum(above, 0) ** 2)
        assert _agrees(r.open2, (above > 0) * 1.0)
        assert _agrees(r.joint2, ((below > 0) & (above > 0)) * 1.0)
    # negative control: taken as a Gaussian of its moments, the third sum's ReLU is 1.6% off
    gaussian = rectified_sum(*laws[2][:4], 0.0, None)
    assert not _agrees(gaussian.m2, np.maximum(z[3], 0) ** 2)


def test_gate_chain_of_a_post_activation_stack() -> None:
    """The share of the top gradient that reaches z_1 through every shortcut, E[Π_l 1[z_l > 0]]
    over the open gates above: the rates ``chain_rate`` gives level by level with the weights
    ``chain_weight`` carries down, against the product of the gates in the samples."""
    laws, z = _stack(3)
    top = chain_weight(laws[2], 0.0, 1.0, ())  # z_3 read by a ReLU whose gradient is iid
    middle = chain_weight(laws[1], 0.0, 0.0, ((1.0, laws[2], top),))  # all of it through z_3's shortcut
    open_ = [(v > 0) * 1.0 for v in z]
    assert _agrees(chain_rate(laws[2], top) * open_[3].mean(), open_[2] * open_[3])
    reached = chain_rate(laws[1], middle) * (open_[2] * open_[3]).mean()
    assert _agrees(reached, open_[1] * open_[2] * open_[3])
    # negative control: the gates paired only with their neighbour, 3.6% short
    pairwise = (open_[1] * open_[2]).mean() / open_[2].mean() * (open_[2] * open_[3]).mean()
    assert not _agrees(pairwise, open_[1] * open_[2] * open_[3])
