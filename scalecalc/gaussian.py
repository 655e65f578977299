"""Gaussian integrals behind the approximate and order-statistics rules: Gauss–Hermite
quadrature for smooth activations, and the moments of a maximum of Gaussians for max pooling.
All take and return plain floats."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache


def cdf(x: float) -> float:
    """Φ(x), the standard normal distribution function."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


@lru_cache(maxsize=1)
def hermite() -> tuple[tuple[float, ...], tuple[float, ...]]:
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(96)
    return tuple(nodes.tolist()), tuple((weights / math.sqrt(2 * math.pi)).tolist())


def gauss(f: Callable[[float], float], var: float) -> float:
    """E[f(z)²] for z ~ N(0, var)."""
    nodes, weights = hermite()
    sd = math.sqrt(var)
    return sum(w * f(sd * z) ** 2 for z, w in zip(nodes, weights))


@lru_cache(maxsize=64)
def max_m2(k: int) -> float:
    """E[max(z₁..z_k)²] for iid standard normals: ∫ z²·k·φ(z)·Φ(z)^(k−1) dz."""
    nodes, weights = hermite()
    return sum(w * z * z * k * cdf(z) ** (k - 1) for z, w in zip(nodes, weights))


def pair(f: Callable[[float], float], m: float, k: float) -> float:
    """E[f(u)f(v)] for a centred Gaussian pair with variance m and covariance k ≥ 0."""
    nodes, weights = hermite()
    shared, own = math.sqrt(max(k, 0.0)), math.sqrt(max(m - k, 0.0))
    total = 0.0
    for z0, w0 in zip(nodes, weights):
        inner = sum(w * f(shared * z0 + own * z) for z, w in zip(nodes, weights))
        total += w0 * inner * inner
    return total


@lru_cache(maxsize=256)
def rectified_max(window: int, rho: float, a: float) -> tuple[float, float, float, float]:
    """Moments of f(b + M) for f(x) = max(x, a·x), b ~ N(0, ρ), M the max of ``window`` iid
    N(0, 1−ρ) (a unit-variance input whose positions share a fraction ρ):

        E[f²],  E_b[E[f | b]²],  E[f'²],  E_b[E[f' | b]²].

    The first two are E[y²] and the covariance of two windows of one channel (they share b
    only); the last two gate the gradient routed to the window maxima. M has density
    K·φ(t)·Φ(t)^(K−1) (t standardised); it is integrated on a fine grid because f has a kink,
    and b by Gauss–Hermite quadrature.
    """
    import numpy as np

    t = np.linspace(-9.0, 9.0, 3601)
    below = np.array([cdf(v) for v in t.tolist()])
    density = window * np.exp(-t * t / 2) / math.sqrt(2 * math.pi) * below ** (window - 1)
    rho = min(max(rho, 0.0), 1.0)
    nodes, weights = (np.array(v) for v in hermite())
    x = math.sqrt(rho) * nodes[:, None] + math.sqrt(1 - rho) * t[None, :]  # (b nodes, grid)
    f = np.where(x > 0, x, a * x)
    df = np.where(x > 0, 1.0, a)
    mean = [np.trapezoid(v * density, t, axis=1) for v in (f * f, f, df * df, df)]
    return (float(weights @ mean[0]), float(weights @ mean[1] ** 2),
            float(weights @ mean[2]), float(weights @ mean[3] ** 2))


def max_mean(k: int) -> float:
    """E[max(z₁..z_k)] for iid standard normals."""
    nodes, weights = hermite()
    return sum(w * z * k * cdf(z) ** (k - 1) for z, w in zip(nodes, weights))
