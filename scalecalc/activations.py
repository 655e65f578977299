"""The activations of the exact calculus: the ReLU family by the arc-cosine kernel and the
closed forms of a shifted Gaussian, a ReLU reading an identity shortcut's sum by its law, and
smooth activations by Gauss–Hermite quadrature in the Gaussian approximation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scalecalc import expr
from scalecalc.gaussian import (
    Law,
    SumMoments,
    cdf,
    chain_rate,
    chain_weight,
    gauss,
    leaky_moments,
    leaky_pair,
    pair,
    rectified_sum,
)
from scalecalc.graph import Node
from scalecalc.rules import RULES, _sigmoid
from scalecalc.state import ExactRule, M, State, add_weights, has_symbols, is_sympy, is_zero, pi_of, ratio, root, trig

ACTIVATIONS: dict[str, ExactRule] = {}


def _acos(x: M, exact: bool) -> M:
    """arccos of a correlation. With symbolic moments the uncorrelated case stays a closed
    form (θ = π/2: the ReLU mean m/2π); any other correlation that is a plain number is taken
    numerically, because nested arccos terms would grow without bound through a deep net."""
    if exact:
        import sympy

        value = sympy.sympify(x)
        if value == 0 or value.free_symbols:
            return sympy.acos(value)
        return math.acos(max(-1.0, min(1.0, float(value))))
    return math.acos(max(-1.0, min(1.0, float(x))))


def _arccos_kernel(m: M, k: M, a: M) -> M:
    theta = _acos(ratio(k, m), is_sympy(m))
    sin, cos, pi = trig(theta)
    j_same = m * (sin + (pi - theta) * cos) / (2 * pi)
    j_flip = m * (sin - theta * cos) / (2 * pi)  # J at correlation −k/m
    return (1 + a**2) * j_same - 2 * a * j_flip


def _leaky(slope_of: Callable[[Node], M]) -> ExactRule:
    def forward(node: Node, xs: Sequence[State]) -> State:
        """m' = (1+a²)m/2;  k' = (1+a²)·J(θ) − 2a·J(π−θ),  J(θ) = m(sin θ + (π−θ)cos θ)/2π, cos θ = k/m.

        J is E[relu(u)relu(v)] for a centred Gaussian pair of variance m and covariance k
        (the arc-cosine kernel of degree 1); leaky ReLU is relu(x) − a·relu(−x).
        """
        a, x = slope_of(node), xs[0]
        if x.law is not None:
            r = sum_moments(x.law, a)
            same = None if x.shared is None else sum_moments(x.law, a, same_position=True).pair
            return State(r.m2, r.pair, rectified=(a, x), mean=r.mean, shared=same)
        if _shifted(x):
            return _leaky_shifted(x, float(a))
        near = None if x.near is None else _arccos_kernel(x.m, x.near, a)
        shared = None if x.shared is None else _arccos_kernel(x.m, x.shared, a)  # two samples, one position
        mean = (1 - a) * root(x.m / (2 * pi_of(x.m)))  # E[relu(x)] = √(m/2π)
        return State((1 + a**2) * x.m / 2, _arccos_kernel(x.m, x.k, a), near=near, rectified=(a, x), mean=mean,
                     shared=shared)

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        """g' = (1+a²)g/2;  gk' = gk·((1+a²)(π−θ) + 2aθ)/2π: both units open with prob. (π−θ)/2π.

        Under a max pool the gradient reaches only window maxima, which are open more often:
        the pool sends the gate E[f'(x)²], E[f'(x_p)f'(x_q)] at those positions instead. An
        input with a mean μ opens more often than half the time: E[f'²] = Φ(h) + a²Φ(−h) and
        the pair gate by quadrature (``gaussian.leaky_pair``).
        """
        a, x = slope_of(node), xs[0]
        if x.law is not None:
            r = sum_moments(x.law, a)
            open2, both = r.open2, r.open_pair
        elif _shifted(x):
            mu, var = float(x.mean), float(x.m - x.mean**2)
            open2, both = leaky_moments(mu, var, float(a))[2], leaky_pair(mu, var, float(x.k - x.mean**2), float(a))[1]
        else:
            theta = _acos(ratio(x.k, x.m), is_sympy(x.m))
            pi = trig(theta)[2]
            open2, both = None, ((1 + a**2) * (pi - theta) + 2 * a * theta) / (2 * pi)
        rest = dy.m - sum(p[0] for p in dy.gates)
        g = (rest * (1 + a**2) / 2 if open2 is None else rest * open2) + sum(p[0] * p[2] for p in dy.gates)
        gk = (dy.k - sum(p[1] for p in dy.gates)) * both + sum(p[1] * p[3] for p in dy.gates)
        # Δx·x = Δy·y for a (leaky) ReLU, so two positions' products covary by gk·k' above it
        product = None if open2 is not None or dy.gates else dy.k * _arccos_kernel(x.m, x.k, a)
        weight = None
        if x.law is not None:  # how the gradient it sends depends on the sum it reads
            key = law_key(x.law)
            assert key is not None
            weight = chain_weight(key, float(a), float(dy.m - sum(m for m, _, _ in dy.chain)),
                                  tuple((float(m), law, w) for m, law, w in dy.chain))
        return (State(g, gk, batch=dy.batch * both, opened=a if x.law is not None else None, product=product,
                      spread_in=dy.spread_in, weight=weight),)

    return ExactRule(forward, backward)


def _shifted(x: State) -> bool:
    """A numeric input with a mean: the centred closed forms do not apply."""
    return not is_zero(x.mean) and not expr.is_symbolic(x.mean) and not expr.is_symbolic(x.m)


def _leaky_shifted(x: State, a: float) -> State:
    """f(x) = max(x, a·x) of x = μ + b + e (b the channel offset, variance k − μ²; e the
    position's own part, variance m − k): the closed forms of a shifted Gaussian for m' and μ',
    and E_b[E[f | b]²] for k' (``gaussian.leaky_moments`` and ``leaky_pair``)."""
    mu, var = float(x.mean), float(x.m - x.mean**2)
    mean, m2, _ = leaky_moments(mu, var, a)
    near = None if x.near is None else leaky_pair(mu, var, float(x.near - x.mean**2), a)[0]
    shared = None if x.shared is None else leaky_pair(mu, var, float(x.shared - x.mean**2), a)[0]
    return State(m2, leaky_pair(mu, var, float(x.k - x.mean**2), a)[0], near=near, rectified=(a, x), mean=mean,
                 shared=shared)


ACTIVATIONS["relu"] = _leaky(lambda node: 0)
ACTIVATIONS["leaky_relu"] = _leaky(lambda node: node.attrs["slope"])


def shortcut_law(node: Node, xs: Sequence[State]) -> tuple[int, tuple[M, M, State, M, M, M]] | None:
    """(index of the ReLU summand, law) where exactly one summand is a (leaky) ReLU output and
    the others are centred and not rectified, all with numbers. The law is (α, a, u, E[w²],
    E[w_p·w_q], E[w̄_p²]): the last is what two samples at one position share (``State.shared``)."""
    rect = [i for i, x in enumerate(xs) if x.rectified is not None]
    if len(rect) != 1 or any(has_symbols(x) for x in xs):
        return None
    i, weights = rect[0], add_weights(node)
    rest = [(a, x) for j, (a, x) in enumerate(zip(weights, xs)) if j != i]
    if any(not is_zero(x.mean) for _, x in rest):
        return None
    slope, u = xs[i].rectified  # type: ignore[misc]
    return i, (weights[i], slope, u, sum(a**2 * x.m for a, x in rest), sum(a**2 * x.k for a, x in rest),
               sum(a**2 * (x.k if x.shared is None else x.shared) for a, x in rest))


def sum_moments(law: tuple[M, M, State, M, M, M], c: M, same_position: bool = False) -> SumMoments:
    """``rectified_sum`` of a shortcut law; ``same_position``: its ``pair`` is then that of two
    samples at one position, which share the offsets E[x̄_p²] rather than k."""
    key = law_key(law)
    assert key is not None
    alpha, a, u, w, inner = key
    if same_position:
        state = law[2]
        u = (u[0], u[1], float(state.k if state.shared is None else state.shared))
        w = (w[0], float(law[5]))
    return rectified_sum(alpha, a, u, w, float(c), inner)


def shortcut_rate(law: tuple[M, M, State, M, M, M], r: SumMoments, c: M, weight: tuple[float, ...] | None) -> M:
    """E[f'(u)²·g'(z)²]/E[g'(z)²], the share of the sum's gradient its shortcut's ReLU f passes
    (g of slope c reads the sum), or where that gradient's size depends on z otherwise (ω,
    ``chain_weight``) E[f'²·ω]: the rate with the offsets, times the chain's change of it at none."""
    base = r.joint2 / r.open2
    key = law_key(law)
    if weight is None or key is None:
        return base
    return base * chain_rate(key, weight) / chain_rate(key, chain_weight(key, float(c), 1.0, ()))


def law_key(law: tuple[M, M, State, M, M, M] | None) -> Law | None:
    """A law as ``rectified_sum`` takes it (``inner``), with the law of its ReLU's input, if any."""
    if law is None:
        return None
    alpha, a, u, w_m, w_k, _ = law
    return (float(alpha), float(a), (float(u.mean), float(u.m), float(u.k)), (float(w_m), float(w_k)),
            law_key(u.law))


# --- smooth activations ------------------------------------------------------------------


def _smooth(op: str, f: Callable[[float], float], df: Callable[[float], float]) -> ExactRule:
    paper = RULES[op]

    def forward(node: Node, xs: Sequence[State]) -> State:
        """E[f(x)²], E[f(x_p)f(x_q)] and E[f(x)] for x = μ + b + e (b: channel offset)."""
        x = xs[0]
        if has_symbols(x):
            m = paper.forward(node, [x.m])
            return State(m, ratio(m, x.m) * x.k)
        mu, var, cov = _centred(x)
        g = (lambda z: f(z + mu)) if mu else f
        return State(gauss(g, var), pair(g, var, cov), mean=gauss(g, var, power=1))

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        x = xs[0]
        if has_symbols(x):
            g = paper.backward(node, [x.m], dy.m)[0]
            return (State(g, ratio(g, dy.m) * dy.k, batch=ratio(g, dy.m) * dy.batch),)
        mu, var, cov = _centred(x)
        dg = (lambda z: df(z + mu)) if mu else df
        both = pair(dg, var, cov)
        return (State(gauss(dg, var) * dy.m, both * dy.k, batch=both * dy.batch),)

    return ExactRule(forward, backward, f"{op}: Gaussian-input quadrature")


def _centred(x: State) -> tuple[float, float, float]:
    """Mean, variance and channel-offset covariance of the fluctuation around the mean."""
    mu = float(x.mean)
    return mu, float(x.m) - mu * mu, float(x.k) - mu * mu


ACTIVATIONS["tanh"] = _smooth("tanh", math.tanh, lambda x: 1 - math.tanh(x) ** 2)
ACTIVATIONS["sigmoid"] = _smooth("sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)))
ACTIVATIONS["gelu"] = _smooth("gelu", lambda x: x * cdf(x),
                        lambda x: cdf(x) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi))
