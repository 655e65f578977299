"""The exact calculus: second moments that stay right where the paper's assumptions fail.

After a ReLU every element has a mean. A conv with fixed weights turns that mean into a
per-channel offset shared by all positions of the channel — random across channels and
weight draws, so still symmetric, but correlated across positions — and average pooling
keeps it in full. So besides E[x²] = m each node carries k = E[x_p·x_q], the covariance of
two different positions of one channel; in the backward pass E[Δx²] = g and gk likewise.

The pair (m, k) moves through the ops as follows (derivations in each rule's docstring);
the m part is the paper rule wherever the shared part does not change it. Positions of a
conv output are otherwise uncorrelated, because each applies different weights to shared
inputs. ReLU of a correlated Gaussian pair uses the arc-cosine kernel; smooth activations
use Gauss–Hermite quadrature in the same Gaussian approximation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scalecalc import expr
from scalecalc.gaussian import cdf, gauss, max_m2, max_mean, pair, rectified_max
from scalecalc.graph import Node
from scalecalc.rules import BN_EPS, RULES, _sigmoid

M = Any


@dataclass(frozen=True)
class State:
    m: M  # E[x²]
    k: M  # E[x_p·x_q], p ≠ q, same channel
    # forward: E[x_p·x_q] for neighbouring positions where it differs from k (small padded maps)
    near: M | None = None
    # forward, at a (leaky) ReLU's output: its slope and its Gaussian input, for max pooling
    rectified: tuple[M, State] | None = None
    # backward, sent by max pooling to a (leaky) ReLU's output: E[f'(x)²] and E[f'(x_p)f'(x_q)]
    # at the positions the pool routes the gradient to (its window maxima), not ½
    gate: tuple[M, M] | None = None


ExactForward = Callable[[Node, Sequence[State]], State]
ExactBackward = Callable[[Node, Sequence[State], State], Sequence[State]]  # (g, gk) states


@dataclass(frozen=True)
class ExactRule:
    forward: ExactForward
    backward: ExactBackward
    note: str = ""


EXACT: dict[str, ExactRule] = {}


def _ratio(a: M, b: M) -> M:
    return 0 if b == 0 else a / b


def scaled(x: State, factor: M, rectified: bool = True) -> State:
    """x with every second moment multiplied by ``factor``; a positive multiple of a
    (leaky) ReLU's output is that ReLU of the same multiple of its input."""
    near = None if x.near is None else factor * x.near
    pre = x.rectified if rectified and x.rectified is not None else None
    return State(factor * x.m, factor * x.k, near=near,
                 rectified=None if pre is None else (pre[0], scaled(pre[1], factor)))


def bordered(x: State, factor: M) -> State:
    """A window op's output with its border correction (``assumptions.border_factors``): the
    position average of m and k moves; the neighbour covariance, an interior quantity, does not."""
    return State(factor * x.m, factor * x.k, near=x.near, rectified=x.rectified, gate=x.gate)


def _paper(op: str) -> ExactRule:
    """Ops that scale every position alike: m and k (g and gk) move by the same factor."""
    rule = RULES[op]

    def forward(node: Node, xs: Sequence[State]) -> State:
        m = rule.forward(node, [x.m for x in xs])
        positive = op != "scale" or expr.is_symbolic(node.attrs["value"]) or node.attrs["value"] > 0
        return scaled(xs[0], _ratio(m, xs[0].m), rectified=positive and op != "flatten")

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        gs = rule.backward(node, [x.m for x in xs], dy.m)
        return tuple(State(g, _ratio(g, dy.m) * dy.k) for g in gs)

    return ExactRule(forward, backward)


for _op in ("scale", "bias", "identity", "flatten"):
    EXACT[_op] = _paper(_op)


def _shared_taps(node: Node, positions: M) -> M:
    """Common taps of two different positions (outputs, or inputs for the backward pass),
    relative to the mean taps of one: (S − T)/((P − 1)·T) with S from ``shapes._tap_pairs``.

    Forward, y_p = Σ_{c,t} W_ct·x_{c,p+t} and only equal taps pair up, so outputs p ≠ q share
    the input covariance through the taps real for both; backward, an input pair shares the
    gradient covariance through the taps t for which both reach a real output. Each real
    (output, tap) pair is one (input, tap) pair, so both sides count the same S and T. On a
    large map S − T ≈ T²/P (every tap shared; 1/s² of input pairs with stride s); on a small
    padded map far fewer (2×2 under a padded 3×3: 1.7 of 4 taps); no pair on a 1×1 map.
    """
    if positions == 1:
        return 0
    taps = node.attrs["taps"]
    return (node.attrs["pairs"] - taps) / ((positions - 1) * taps)


def _conv_forward(node: Node, xs: Sequence[State]) -> State:
    """m' as Eq. 9 (exact taps);  k' = k·(m'/m)·shared,  near' = near·(m'/m)·shared_near.

    Neighbouring outputs read neighbouring inputs (stride 1) and, away from the border,
    share every tap (``shapes._tap_pairs``).
    """
    x = xs[0]
    m = RULES["conv"].forward(node, [x.m])
    source = _near(x) if node.attrs["stride"] == (1, 1) else x.k
    return State(m, _ratio(m, x.m) * x.k * _shared_taps(node, node.shape.positions),
                 near=_ratio(m, x.m) * source * node.attrs["near"])


def _conv_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """g as in Eq. 10 (exact taps);  gk' = gk·(g'/g)·shared (input pairs, ``_shared_taps``)."""
    g = RULES["conv"].backward(node, [xs[0].m], dy.m)[0]
    return (State(g, _ratio(g, dy.m) * dy.k * _shared_taps(node, node.in_shapes[0].positions)),)


def _near(x: State) -> M:
    return x.k if x.near is None else x.near


EXACT["conv"] = ExactRule(_conv_forward, _conv_backward)


def _vector_out(op: str) -> ExactRule:
    """Linear layers: different output features use independent weights, so k = 0 after."""
    rule = RULES[op]

    def forward(node: Node, xs: Sequence[State]) -> State:
        return State(rule.forward(node, [xs[0].m]), 0)

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        return (State(rule.backward(node, [xs[0].m], dy.m)[0], 0),)

    return ExactRule(forward, backward)


EXACT["linear"] = _vector_out("linear")


def _dropout_forward(node: Node, xs: Sequence[State]) -> State:
    """Masks are independent across positions: m/(1−p), but k is unchanged."""
    p = node.attrs["p"]
    return State(xs[0].m / (1 - p), xs[0].k)


EXACT["dropout"] = ExactRule(_dropout_forward,
                             lambda node, xs, dy: (State(dy.m / (1 - node.attrs["p"]), dy.k),))


def _weights(node: Node) -> Sequence[M]:
    return node.attrs.get("weights") or (1,) * len(node.inputs)


EXACT["add"] = ExactRule(
    lambda node, xs: State(sum(a**2 * x.m for a, x in zip(_weights(node), xs)),
                           sum(a**2 * x.k for a, x in zip(_weights(node), xs))),
    lambda node, xs, dy: tuple(State(a**2 * dy.m, a**2 * dy.k) for a in _weights(node)),
)


def _concat_forward(node: Node, xs: Sequence[State]) -> State:
    sizes = [s.channels for s in node.in_shapes]
    total = sum(sizes)
    return State(sum(n * x.m for n, x in zip(sizes, xs)) / total, sum(n * x.k for n, x in zip(sizes, xs)) / total)


EXACT["concat"] = ExactRule(_concat_forward, lambda node, xs, dy: (dy,) * len(node.inputs))


# --- ReLU family: the arc-cosine kernel --------------------------------------------------

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


def _sympy(value: M) -> bool:
    return type(value).__module__.startswith("sympy")


def _trig(theta: M) -> tuple[M, M, M]:  # sin, cos and π, exact when theta is sympy
    if _sympy(theta):
        import sympy

        return sympy.sin(theta), sympy.cos(theta), sympy.pi
    return math.sin(theta), math.cos(theta), math.pi


def _arccos_kernel(m: M, k: M, a: M) -> M:
    theta = _acos(_ratio(k, m), _sympy(m))
    sin, cos, pi = _trig(theta)
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
        near = None if x.near is None else _arccos_kernel(x.m, x.near, a)
        return State((1 + a**2) * x.m / 2, _arccos_kernel(x.m, x.k, a), near=near, rectified=(a, x))

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        """g' = (1+a²)g/2;  gk' = gk·((1+a²)(π−θ) + 2aθ)/2π: both units open with prob. (π−θ)/2π.

        Under a max pool the gradient reaches only window maxima, which are open more often:
        the pool sends the gate E[f'(x)²], E[f'(x_p)f'(x_q)] at those positions instead.
        """
        a, x = slope_of(node), xs[0]
        if dy.gate is not None:
            return (State(dy.m * dy.gate[0], dy.k * dy.gate[1]),)
        theta = _acos(_ratio(x.k, x.m), _sympy(x.m))
        pi = _trig(theta)[2]
        return (State((1 + a**2) * dy.m / 2, dy.k * ((1 + a**2) * (pi - theta) + 2 * a * theta) / (2 * pi)),)

    return ExactRule(forward, backward)


EXACT["relu"] = _leaky(lambda node: 0)
EXACT["leaky_relu"] = _leaky(lambda node: node.attrs["slope"])


# --- pooling -----------------------------------------------------------------------------

def _avgpool_forward(node: Node, xs: Sequence[State]) -> State:
    """m' = (τ·m + τ(τ−1)·k)/K²,  k' = τ²·k/K²   (τ = T/ρ'² mean real taps, K = window size).

    Each output averages τ real inputs (torch divides by K), τ terms of m and τ(τ−1)
    shared pairs; two outputs share the channel offset through all τ² pairs.
    """
    a, x, p = node.attrs, xs[0], node.shape.positions
    t, big_k = a["taps"], a["k2"]
    return State(x.m * t / (p * big_k**2) + x.k * t * (t - p) / (p * big_k) ** 2, x.k * t**2 / (p * big_k) ** 2)


def _avgpool_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """g' = (c·g + c(c−1)·gk)/K²,  gk' = (c²·gk + f·c·(g − gk))/K²   (c = T/ρ² mean coverage).

    An input gets the gradients of the c windows covering it, divided by K; two inputs of
    one window (a fraction f = (K−1)/(ρ²−1) of pairs) share that window's whole gradient.
    """
    a, p = node.attrs, node.in_shapes[0].positions
    t, big_k = a["taps"], a["k2"]
    g = dy.m * t / (p * big_k**2) + dy.k * t * (t - p) / (p * big_k) ** 2
    shared = dy.k * t**2 / (p * big_k) ** 2
    if p > 1:  # the fraction (K−1)/(ρ²−1) of pairs that sit in one window
        shared = shared + (dy.m - dy.k) * (big_k - 1) * t / ((p - 1) * p * big_k**2)
    return (State(g, shared),)


EXACT["avgpool"] = ExactRule(_avgpool_forward, _avgpool_backward)


def _global_forward(node: Node, xs: Sequence[State]) -> State:
    """m' = (m + (P−1)·k)/P over the P = ρ² positions; channels of the result are independent."""
    p, x = node.in_shapes[0].positions, xs[0]
    return State((x.m + (p - 1) * x.k) / p, 0)


EXACT["global_avgpool"] = ExactRule(
    _global_forward,
    lambda node, xs, dy: (State(dy.m / node.in_shapes[0].positions ** 2, dy.m / node.in_shapes[0].positions ** 2),),
)


def _window(node: Node) -> int:
    return round(float(node.attrs["taps"] / node.shape.positions))


def _maxpool_forward(node: Node, xs: Sequence[State]) -> State:
    """max = b + max(z): m' = k + (m−k)·μ₂(K),  k' = k + (m−k)·μ₁(K)²   (μ: moments of a max of K normals).

    After a (leaky) ReLU f, which is increasing, max f(xᵢ) = f(max xᵢ) = f(b + max z): the
    moments come from the ReLU's Gaussian input (``rectified_max``), not from its output.
    """
    x = xs[0]
    if x.rectified is not None and not _symbolic_ratio(x.rectified[1]):
        a, pre = x.rectified
        f2, _, _, _ = rectified_max(_window(node), float(_ratio(_near(pre), pre.m)), float(a))
        f_pair = rectified_max(_window(node), float(_ratio(pre.k, pre.m)), float(a))[1]
        return State(pre.m * f2, pre.m * f_pair)
    mu1 = max_mean(_window(node))
    return State(x.k + (x.m - x.k) * max_m2(_window(node)), x.k + (x.m - x.k) * mu1**2)


def _maxpool_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """Each window routes its gradient to its arg-max: g' = g·ρ'²/ρ², pairs across windows ×1/K²;
    after a (leaky) ReLU, with the gate that ReLU applies at window maxima."""
    window, x = _window(node), xs[0]
    share = node.shape.positions / node.in_shapes[0].positions
    gate = None
    if x.rectified is not None and not _symbolic_ratio(x.rectified[1]):
        a, pre = x.rectified
        gate = rectified_max(window, float(_ratio(_near(pre), pre.m)), float(a))[2:]
    return (State(dy.m * share, dy.k * share / window, gate=gate),)


def _symbolic_ratio(x: State) -> bool:
    return expr.is_symbolic(_ratio(x.k, x.m)) or expr.is_symbolic(_ratio(_near(x), x.m))


EXACT["maxpool"] = ExactRule(_maxpool_forward, _maxpool_backward, "maxpool: Gaussian order statistics (approximate)")


# --- normalisation -----------------------------------------------------------------------

def _batchnorm_forward(node: Node, xs: Sequence[State]) -> State:
    """Train-mode BN removes each channel's mean over batch and positions — the shared offset
    with it: m' = (m−k)/(m−k+ε), k' = 0."""
    v = xs[0].m - xs[0].k
    return State(v / (v + BN_EPS), 0)


EXACT["batchnorm"] = ExactRule(
    _batchnorm_forward,
    lambda node, xs, dy: (State(dy.m / (xs[0].m - xs[0].k + BN_EPS), 0),),
    "batchnorm: the gradient's projection terms are neglected",
)
EXACT["layernorm"] = ExactRule(
    lambda node, xs: State(xs[0].m / (xs[0].m + BN_EPS), xs[0].k / (xs[0].m + BN_EPS)),
    lambda node, xs, dy: (State(dy.m / (xs[0].m + BN_EPS), dy.k / (xs[0].m + BN_EPS)),),
    "layernorm: per-channel offsets average out over many channels (approximate)",
)


# --- smooth activations ------------------------------------------------------------------

def _smooth(op: str, f: Callable[[float], float], df: Callable[[float], float]) -> ExactRule:
    paper = RULES[op]

    def forward(node: Node, xs: Sequence[State]) -> State:
        x = xs[0]
        if expr.is_symbolic(x.m) or expr.is_symbolic(x.k):
            m = paper.forward(node, [x.m])
            return State(m, _ratio(m, x.m) * x.k)
        return State(gauss(f, float(x.m)), pair(f, float(x.m), float(x.k)))

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        x = xs[0]
        if expr.is_symbolic(x.m) or expr.is_symbolic(x.k):
            g = paper.backward(node, [x.m], dy.m)[0]
            return (State(g, _ratio(g, dy.m) * dy.k),)
        return (State(gauss(df, float(x.m)) * dy.m, pair(df, float(x.m), float(x.k)) * dy.k),)

    return ExactRule(forward, backward, f"{op}: Gaussian-input quadrature")


EXACT["tanh"] = _smooth("tanh", math.tanh, lambda x: 1 - math.tanh(x) ** 2)
EXACT["sigmoid"] = _smooth("sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)))
EXACT["gelu"] = _smooth("gelu", lambda x: x * cdf(x),
                        lambda x: cdf(x) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi))


def bias_grad_m2(node: Node, dy: State) -> M:
    """Per-sample E[Δb²] of a per-channel bias: Σ over the P output positions of one channel's
    gradient, P·g + P(P−1)·gk — the pair terms matter under a pooling layer (Eq. 7 extended)."""
    p = node.shape.positions
    return dy.m * p + dy.k * p * (p - 1)


def weight_grad_m2(node: Node, x: State, y: State, dy: State, mask: tuple[M, State] | None = None) -> M:
    """Per-sample E[ΔW²] of a conv/linear layer, per weight (τ = T/k² uses of each tap,
    π = (S − T)/k² ordered pairs of positions using it, τ(τ−1) without padding):

        τ·m·g  +  π·k·gk  +  π·gk_h·E[W²]·m²·(1−a)²/(2π·E[y²]).

    The first term is Thm 1. The second pairs the shared parts of input and gradient. The
    third appears when the layer feeds a (leaky) ReLU whose output gradient h has a shared
    part gk_h (a pooling below): the unit's mask 1[y > 0] is correlated with each input,
    E[x·1[y>0]] = W·m·(1−a)/√(2π·E[y²]) for a Gaussian pre-activation, so the products of
    two positions no longer average out. ``mask`` is (a, gradient state at the ReLU output).
    """
    t, k2 = node.attrs["taps"], node.attrs["k2"]
    pairs = node.attrs["pairs"] - t  # Σ over taps of the ordered pairs of positions that use it
    total = x.m * dy.m * t / k2 + x.k * dy.k * pairs / k2
    if mask is not None and node.init is not None:
        a, h = mask
        pi = _trig(x.m)[2] if _sympy(x.m) else math.pi
        own = x.m - x.k  # the position-specific part; the shared part is in the second term
        total = total + h.k * node.init.m2 * own**2 * (1 - a) ** 2 * pairs / (2 * pi * y.m * k2)
    return total
