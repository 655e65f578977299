"""Gaussian integrals behind the approximate and order-statistics rules: Gauss–Hermite
quadrature for smooth activations, and the moments of a maximum of Gaussians for max pooling.
All take and return plain floats."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


def cdf(x: float) -> float:
    """Φ(x), the standard normal distribution function."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


@lru_cache(maxsize=1)
def hermite() -> tuple[tuple[float, ...], tuple[float, ...]]:
    import numpy as np

    nodes, weights = np.polynomial.hermite_e.hermegauss(96)
    return tuple(nodes.tolist()), tuple((weights / math.sqrt(2 * math.pi)).tolist())


def gauss(f: Callable[[float], float], var: float, power: int = 2) -> float:
    """E[f(z)²] (or E[f(z)] with ``power=1``) for z ~ N(0, var)."""
    nodes, weights = hermite()
    sd = math.sqrt(var)
    return sum(w * f(sd * z) ** power for z, w in zip(nodes, weights))


def density(x: float) -> float:
    """φ(x), the standard normal density."""
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def leaky_moments(mu: float, var: float, a: float) -> tuple[float, float, float]:
    """E[f(u)], E[f(u)²] and E[f'(u)²] for f(x) = max(x, a·x), u ~ N(μ, var), in closed form.

    With s = √var and h = μ/s: E[relu(u)] = μΦ(h) + sφ(h), E[relu(u)²] = (μ² + s²)Φ(h) + μsφ(h),
    and f(u) = relu(u) − a·relu(−u), whose two parts never overlap.
    """
    if var <= 0:
        return max(mu, a * mu), max(mu, a * mu) ** 2, 1.0 if mu > 0 else a * a
    s = math.sqrt(var)
    up, down, phi = cdf(mu / s), cdf(-mu / s), density(mu / s)
    first = (mu * up + s * phi) - a * (-mu * down + s * phi)
    second = (mu * mu + var) * up + mu * s * phi + a * a * ((mu * mu + var) * down - mu * s * phi)
    return first, second, up + a * a * down


def leaky_pair(mu: float, var: float, cov: float, a: float) -> tuple[float, float]:
    """E[f(u)f(v)] and E[f'(u)f'(v)] for f(x) = max(x, a·x) and a Gaussian pair of mean μ,
    variance var and covariance cov ≥ 0: u = μ + b + e₁, v = μ + b + e₂ with b ~ N(0, cov) and
    e ~ N(0, var − cov). Given b the two are independent: E[f | b] is ``leaky_moments``' first
    moment and E[f' | b] = (1−a)·Φ(x/s) + a (x = μ + b, s² = var − cov); b is integrated by
    Gauss–Hermite quadrature, which is accurate because both conditional means are smooth in b."""
    nodes, weights = hermite()
    shared, own = math.sqrt(max(cov, 0.0)), max(var - max(cov, 0.0), 0.0)
    value = slope = 0.0
    for z, w in zip(nodes, weights):
        x = mu + shared * z
        gate = (1 - a) * cdf(x / math.sqrt(own)) + a if own > 0 else (1.0 if x > 0 else a)
        value += w * leaky_moments(x, own, a)[0] ** 2
        slope += w * gate**2
    return value, slope


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
def rectified_max(window: int, rho: float, a: float, far: float | None = None,
                  ) -> tuple[float, float, float, float, float]:
    """Moments of f(b + u + M) for f(x) = max(x, a·x): a unit-variance input whose positions
    share a fraction ``far`` (b ~ N(0, far), shared by every window of a channel) and, within
    one window, a fraction ρ ≥ far (u ~ N(0, ρ − far), the window's own); M the max of
    ``window`` iid N(0, 1−ρ). ``far`` defaults to ρ (no window part):

        E[f²],  E_b[E[f | b]²],  E[f'²],  E_b[E[f' | b]²],  E[f].

    The first two are E[y²] and the covariance of two windows of one channel (they share b
    only); the last two gate the gradient routed to the window maxima. M has density
    K·φ(t)·Φ(t)^(K−1) (t standardised); it is integrated on a fine grid because f has a kink,
    u in closed form given b and M (a leaky ReLU of a Gaussian, ``leaky_moments``), and b by
    Gauss–Hermite quadrature.
    """
    import numpy as np

    t = np.linspace(-9.0, 9.0, 3601)
    below = np.array([cdf(v) for v in t.tolist()])
    pdf = window * np.exp(-t * t / 2) / math.sqrt(2 * math.pi) * below ** (window - 1)
    rho = min(max(rho, 0.0), 1.0)
    far = rho if far is None else min(max(far, 0.0), rho)
    nodes, weights = (np.array(v) for v in hermite())
    x = math.sqrt(far) * nodes[:, None] + math.sqrt(1 - rho) * t[None, :]  # (b nodes, grid)
    own = rho - far
    if own > 1e-12:  # E over u ~ N(0, own) given x: relu(x+u) = xΦ(x/s) + sφ(x/s), s = √own
        s = math.sqrt(own)
        up = _normal_cdf(x / s)
        phi = np.exp(-x * x / (2 * own)) / math.sqrt(2 * math.pi)
        relu1, relu2 = x * up + s * phi, (x * x + own) * up + x * s * phi
        f = a * x + (1 - a) * relu1  # E[f | b, M]
        f2 = a * a * (x * x + own) + (1 - a * a) * relu2  # f² = a²y² + (1 − a²)·relu(y)²
        df, df2 = a + (1 - a) * up, a * a + (1 - a * a) * up
    else:
        f = np.where(x > 0, x, a * x)
        f2, df = f * f, np.where(x > 0, 1.0, a)
        df2 = df * df
    mean = [np.trapezoid(v * pdf, t, axis=1) for v in (f2, f, df2, df)]
    return (float(weights @ mean[0]), float(weights @ mean[1] ** 2),
            float(weights @ mean[2]), float(weights @ mean[3] ** 2), float(weights @ mean[1]))


def max_mean(k: int) -> float:
    """E[max(z₁..z_k)] for iid standard normals."""
    nodes, weights = hermite()
    return sum(w * z * k * cdf(z) ** (k - 1) for z, w in zip(nodes, weights))


@dataclass(frozen=True)
class SumMoments:
    """Moments of g(z) for z = α·f(u) + w (``rectified_sum``); f, g (leaky) ReLUs."""

    mean: float  # E[g(z)]
    m2: float  # E[g(z)²]
    pair: float  # E[g(z_p)·g(z_q)], two positions (or samples) of one channel
    open2: float  # E[g'(z)²]
    open_pair: float  # E[g'(z_p)·g'(z_q)]
    joint2: float  # E[f'(u)²·g'(z)²]
    joint_pair: float  # E[f'(u_p)g'(z_p)·f'(u_q)g'(z_q)]


#: (α, a, (E[u], E[u²], E[u_p·u_q]), (E[w²], E[w_p·w_q]), law of u or None): z = α·f(u) + w
Law = tuple[float, float, tuple[float, float, float], tuple[float, float], Any]
GRID = 1801  # points of the grids of a sum's law (f has a kink)


def _own_part(u: tuple[float, float, float], inner: Law | None) -> tuple[Any, Any]:
    """Values and probabilities of u at zero offsets: a grid of the Gaussian, or, where u is
    itself a shortcut sum ``inner``, that sum's distribution with u's mean and own variance."""
    import numpy as np

    mu, m_u, k_u = u
    own = max(m_u - max(k_u, mu * mu), 1e-300)
    if inner is None:
        t = np.linspace(-9.0, 9.0, GRID)
        p = np.exp(-t * t / 2)
        return mu + math.sqrt(own) * t, p / p.sum()
    v, p = _sum_law(inner)
    centre = p @ v
    sd = math.sqrt(max(p @ (v - centre) ** 2, 1e-300))
    return mu + (v - centre) * math.sqrt(own) / sd, p


def _sum_law(law: Law) -> tuple[Any, Any]:
    """Distribution of z = α·f(u) + w at zero offsets on a grid: the rectified u, spread by w's
    own Gaussian part. A post-activation block's shortcut carries such a z to the next block,
    skewed where a Gaussian of its moments is not (E[x²] of the next ReLU 1.6% off, k/m 3%)."""
    z, q, _ = _gated_law(law)
    return z, q


@lru_cache(maxsize=256)
def _gated_law(law: Law) -> tuple[Any, Any, Any]:
    """``_sum_law``'s grid and probabilities of z, and those probabilities weighted by f'(u)²."""
    import numpy as np

    alpha, a, u, (m_w, k_w), inner = law
    x, p = _own_part(u, inner)
    f, gate2 = alpha * np.where(x > 0, x, a * x), np.where(x > 0, 1.0, a * a)
    sd = math.sqrt(max(m_w - max(k_w, 0.0), 0.0))
    z = np.linspace(f.min() - 9 * sd, f.max() + 9 * sd, GRID)
    if sd < 4 * (z[1] - z[0]):  # w no wider than the grid: z is f(u)
        return f, p, p * gate2
    spread = np.exp(-0.5 * ((z[:, None] - f[None, :]) / sd) ** 2)
    q = spread @ p
    return z, q / q.sum(), spread @ (p * gate2) / q.sum()


def chain_rate(law: Law, weight: tuple[float, ...]) -> float:
    """E[f'(u)²·ω(z)]/E[ω(z)] for z = α·f(u) + w and ω on ``_sum_law``'s grid: the share of a
    gradient at the sum that f passes when its size depends on z (ω, ``chain_weight``)."""
    import numpy as np

    _, q, q_open = _gated_law(law)
    w = np.asarray(weight)
    return float(w @ q_open / (w @ q))


def chain_weight(law: Law, c: float, rest: float, parts: tuple[tuple[float, Law, tuple[float, ...]], ...],
                 ) -> tuple[float, ...]:
    """ω(z) = E[Δz² | z]/E[Δz²] on ``_sum_law``'s grid, for the gradient a ReLU g of slope c
    sends to the sum z it reads: g'(z)² times what reaches g, ``rest`` regardless of z and each
    part (m, law', ω') through the shortcut of the next sum z' = α'·g(z) + w' by
    E[ω'(z') | z]. A post-activation stack's gates are a chain in the sums, not in the gates:
    given two open gates the sum between them is larger, and so is the next one's chance."""
    import numpy as np

    z, q, _ = _gated_law(law)
    g = np.where(z > 0, z, c * z)
    reach = np.full_like(z, rest)
    nodes, weights = np.polynomial.hermite_e.hermegauss(48)
    weights = weights / weights.sum()
    for m, above, omega in parts:
        grid = _gated_law(above)[0]
        alpha, _, _, (m_w, k_w), _ = above
        sd = math.sqrt(max(m_w - max(k_w, 0.0), 0.0))
        reach = reach + m * np.interp(alpha * g[:, None] + sd * nodes[None, :], grid, np.asarray(omega)) @ weights
    w = np.where(z > 0, 1.0, c * c) * reach
    total = w @ q
    if not total > 0:  # no gradient reaches the ReLU: its gate alone
        w, total = np.where(z > 0, 1.0, c * c), q @ np.where(z > 0, 1.0, c * c)
    return tuple((w / total).tolist())


@lru_cache(maxsize=1024)
def rectified_sum(alpha: float, a: float, u: tuple[float, float, float], w: tuple[float, float],
                  c: float, inner: Law | None = None) -> SumMoments:
    """z = α·f(u) + w with f(x) = max(x, a·x) and g(x) = max(x, c·x): the identity shortcut of
    a ReLU output added to a Gaussian branch, read by a ReLU.

    u = (mean, E[u²], E[u_p·u_q]) and w = (E[w²], E[w_p·w_q]) (w centred) are Gaussian; two
    positions share the offsets b_u ~ N(0, E[u_p·u_q] − μ²) and b_w ~ N(0, E[w_p·w_q]) and
    are independent given them. Given the offsets and u, g(z) has the closed forms of a
    shifted Gaussian in w (``leaky_moments``); u's own part is integrated on a fine grid
    (f has a kink), the offsets by Gauss–Hermite quadrature (a single node where they vanish).
    Where u is itself the sum of an earlier block (``inner``, the next block of a
    post-activation stack), its own part has that sum's distribution (``_sum_law``), shifted
    and scaled to u's mean and own variance, and only its offset is Gaussian.
    """
    import numpy as np

    mu, _, k_u = u
    m_w, k_w = w
    off_u, off_w = max(k_u - mu * mu, 0.0), max(k_w, 0.0)
    own_w = max(m_w - off_w, 1e-300)
    own, prob = _own_part(u, inner)
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)
    weights = weights / weights.sum()

    def outer(var: float) -> tuple[Any, Any]:
        return (nodes * math.sqrt(var), weights) if var > 0 else (np.zeros(1), np.ones(1))

    (bu, wu), (bw, ww) = outer(off_u), outer(off_w)
    x = bu[:, None, None] + own[None, None, :]  # (b_u, b_w, grid)
    slope = np.where(x > 0, 1.0, a)
    shift = alpha * x * slope + bw[None, :, None]  # α·f(u) + b_w
    sd = math.sqrt(own_w)
    up = _normal_cdf(shift / sd)
    phi = np.exp(-shift * shift / (2 * sd * sd)) / math.sqrt(2 * math.pi)
    down = 1 - up
    first = shift * up + sd * phi - c * (-shift * down + sd * phi)
    second = (shift**2 + own_w) * (up + c * c * down) + (1 - c * c) * shift * sd * phi
    gate, gate2 = up + c * down, up + c * c * down

    def given_offsets(v: Any) -> Any:  # E[v | b_u, b_w]: u's own part on the grid
        return v @ prob

    def mean_over(v: Any) -> float:  # E over the offsets
        return float(wu @ v @ ww)

    return SumMoments(mean_over(given_offsets(first)), mean_over(given_offsets(second)),
                      mean_over(given_offsets(first) ** 2), mean_over(given_offsets(gate2)),
                      mean_over(given_offsets(gate) ** 2), mean_over(given_offsets(slope**2 * gate2)),
                      mean_over(given_offsets(slope * gate) ** 2))


def _normal_cdf(x: Any) -> Any:
    """Φ(x) elementwise, from erfc by Abramowitz & Stegun 7.1.26 (absolute error < 1.5·10⁻⁷)."""
    import numpy as np

    y = np.abs(x) / math.sqrt(2)
    t = 1 / (1 + 0.3275911 * y)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    tail = 0.5 * poly * np.exp(-y * y)  # Φ(−|x|)
    return np.where(x >= 0, 1 - tail, tail)


@dataclass(frozen=True)
class WindowMax:
    """Moments of y_A = f(max_{p∈A} z_p) over the windows A of a centred Gaussian field z, and
    of the gradient each window routes to its arg-max (``window_max``); positions and windows
    in row-major order. r_p = 1 where p is the first arg-max of its window."""

    pairs: Any  # [W, W]: E[y_A·y_B]
    routed: Any  # [P]: E[r_p]
    opened: Any  # [P]: E[r_p·f'(z_p)²], what reaches the field itself
    at: Any  # [W, N]: the position each window routed to, per draw of the whole field
    slope_at: Any  # [W, N]: f' there

    def pair_routes(self, size: int) -> tuple[Any, Any]:
        """[P, P]: E[r_p·r_q] and E[r_p f'(z_p)·r_q f'(z_q)] (the diagonals from the windows
        drawn alone), for a gradient whose windows covary."""
        import numpy as np

        draws = self.at.shape[1]
        routed, opened = np.zeros((size, size)), np.zeros((size, size))
        for lo in range(0, draws, CHUNK):
            at, slope = self.at[:, lo:lo + CHUNK], self.slope_at[:, lo:lo + CHUNK]
            route, gated = np.zeros((size, at.shape[1])), np.zeros((size, at.shape[1]))
            route[at, np.arange(at.shape[1])[None, :]] = 1.0
            gated[at, np.arange(at.shape[1])[None, :]] = slope
            routed += route @ route.T
            opened += gated @ gated.T
        routed, opened = routed / draws, opened / draws
        np.fill_diagonal(routed, self.routed)
        np.fill_diagonal(opened, self.opened)
        return routed, opened


SAMPLES = 2**22  # field draws × positions per pool: 2¹⁴ draws of a 16×16 map, 2¹² of a 32×32 one
LOCAL = 2**24  # draws × positions of the windows drawn alone: 2¹⁶ draws up to 64 windows of 4
CHUNK = 2048


def _factor(cov: Any) -> Any:
    """L with L·Lᵀ = cov (a stack of them): Cholesky, with a jitter of 1e-12 of the mean
    variance where cov is singular (its draws then differ from cov's by that much)."""
    import numpy as np

    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        jitter = 1e-12 * float(np.mean(np.diagonal(cov, axis1=-2, axis2=-1))) + 1e-300
        return np.linalg.cholesky(cov + jitter * np.eye(cov.shape[-1]))


def window_max(cov: Any, f_cov: Any, windows: Any, slope: float | None, seed: int = 0) -> WindowMax:
    """Window maxima of a centred Gaussian field of covariance ``cov`` [P, P], with f a leaky
    ReLU of ``slope`` (or the identity, ``None``) and ``f_cov`` = E[f(z_p)·f(z_q)] in closed
    form (the arc-cosine kernel); ``windows`` [W, K] holds each window's positions.

    max f(zᵢ) = f(max zᵢ) for increasing f. A maximum of correlated Gaussians of unequal
    variances has no closed form, so the field is sampled (a fixed seed: the result is
    deterministic) as z = L·ξ, L the Cholesky factor of cov (unique, so that the draws move
    continuously with cov and scale with it exactly): the whole field for the pairs of
    windows, and each window alone (its K×K block, 2¹⁶ draws of up to 64 windows, 2¹⁴ of
    256) for its own moments and routing, which carry E[x²] and E[Δx²]. The window mean
    c_A = Σ_{p∈A} f(z_p)/K is highly correlated with y_A and E[c_A·c_B] is known exactly, so
    it serves as a control variate: E[y_A·y_B] ≈ mean(y_A·y_B) − β_AB·(mean(c_A·c_B) −
    E[c_A·c_B]), β_AB the regression coefficient of the two products over the draws.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    n_win, k = windows.shape
    size = cov.shape[0]
    a = 1.0 if slope is None else slope
    exact_cc = f_cov[windows[:, :, None, None], windows[None, None, :, :]].mean(axis=(1, 3))

    def moments(zw: Any) -> tuple[Any, Any, Any, Any]:
        """y, c, the first arg-max and f' there ([W, N] each) of windows zw [W, K, N]."""
        fz = zw if slope is None else np.where(zw > 0, zw, a * zw)
        # the arg-max of z is that of f(z) (ties have probability 0, except a ReLU's zeros:
        # torch routes those to a window's first position, where the ReLU kills them anyway)
        top = zw.argmax(axis=1)
        y = np.take_along_axis(fz, top[:, None, :], axis=1)[:, 0]  # f(max z) = max f(z)
        slope_at = np.where(np.take_along_axis(zw, top[:, None, :], axis=1)[:, 0] > 0, 1.0, a)
        return y, fz.mean(axis=1), top, slope_at

    root, total = _factor(cov), CHUNK * max(1, min(8, SAMPLES // (size * CHUNK)))  # larger maps: more windows
    sums = [np.zeros((n_win, n_win))] * 4
    routes, slopes = [], []
    for _ in range(total // CHUNK):
        y, c, top, slope_at = moments((root @ rng.standard_normal((size, CHUNK)))[windows])
        routes.append(windows[np.arange(n_win)[:, None], top])  # [W, N]: the position each window routes to
        slopes.append(slope_at)
        sums = [s + u @ u.T for s, u in zip(sums, (y, c, y * c, c * c))]
    yy, cc, ycyc, c2c2 = (v / total for v in sums)
    pairs = _controlled(yy, cc, ycyc, c2c2, exact_cc)

    block = _factor(cov[windows[:, :, None], windows[:, None, :]])  # [W, K, K]: each window alone
    own = [np.zeros(n_win)] * 4 + [np.zeros((n_win, k))] * 2
    local = CHUNK * max(1, min(32, LOCAL // (size * CHUNK)))
    for _ in range(local // CHUNK):
        y, c, top, slope_at = moments(block @ rng.standard_normal((n_win, k, CHUNK)))
        hits = [top == i for i in range(k)]
        own = [s + (u * u).sum(axis=-1) for s, u in zip(own[:4], (y, c, y * c, c * c))] + [
            own[4] + np.stack([h.sum(axis=-1) for h in hits], axis=1),
            own[5] + np.stack([(h * slope_at**2).sum(axis=-1) for h in hits], axis=1)]
    own = [v / local for v in own]
    ii = np.arange(n_win)
    pairs[ii, ii] = _controlled(own[0], own[1], own[2], own[3], np.diagonal(exact_cc))
    routed, opened = np.zeros(size), np.zeros(size)
    routed[windows.ravel()], opened[windows.ravel()] = own[4].ravel(), own[5].ravel()
    return WindowMax(pairs, routed, opened, np.concatenate(routes, axis=1), np.concatenate(slopes, axis=1))


def _controlled(yy: Any, cc: Any, ycyc: Any, c2c2: Any, exact_cc: Any) -> Any:
    """E[y_A·y_B] from sampled means, with c the control variate (exact mean ``exact_cc``)."""
    import numpy as np

    var = c2c2 - cc * cc
    beta = np.divide(ycyc - yy * cc, var, out=np.zeros_like(var), where=var > 1e-300)
    return yy - beta * (cc - exact_cc)
