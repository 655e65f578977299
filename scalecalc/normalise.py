"""Normalisation in the exact calculus: train-mode batchnorm and layernorm.

A train-mode batchnorm divides each channel by its variance over the batch and the positions.
Two things make that variance differ from E[x²] − k, the mean square less the offset that
all positions share:

- **Offsets kept over positions.** The mean a ReLU leaves, passed through a conv with fixed
  weights, is an offset x̄_p of each position, shared by the samples (the state's ``shared``,
  E[x̄_p²]). A padded conv's border outputs read fewer taps, so on a small map x̄_p differs
  from one position to the next. BN subtracts only the channel's mean over positions and
  keeps Q_c = (1/P)·Σ_p (x̄_p − x̄)²: 11% of the variance on a 4×4 map under a 3×3 conv, 2% on
  32×32. The normalised output has those offsets (``shared`` = Q/σ²) and two of its positions
  covary by −Q/((P−1)·σ²).
- **The variance fluctuates across channels**, and E[1/σ_c²] > 1/E[σ_c²]. The position part is
  a sum of ν = n·k² weighted squares (χ²_ν/ν); Q_c is a quadratic form of a few Gaussians (the
  sums of a channel's weights over the taps a position reads), whose variance comes from the
  conv's geometry (``shapes.offset_traces``). A Gamma law with the same two moments gives
  E[1/σ_c²]·E[σ_c²] = 1/(1 − CV²), which is ν/(ν−2) without offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from scalecalc import expr
from scalecalc.graph import Node
from scalecalc.rules import plus_eps
from scalecalc.state import ExactRule, M, State, is_zero

NORMALISE: dict[str, ExactRule] = {}


def conv_offsets(node: Node, x: State, m: M, factor: M) -> tuple[float, float, float] | None:
    """(α, β, Var Q_c) at a conv's output (None where it cannot be told, or is 0).

    With the input's sample-shared covariance taken as k on every pair of positions and
    ``shared`` on the diagonal, the output's is α·N + β·D (N(p, q) the taps real for both
    outputs, D its diagonal, α = n·E[W²]·k, β = n·E[W²]·(shared − k)), and a Gaussian quadratic
    form o·Π·o/P has variance 2·tr((Π·C·Π)²)/P². ``factor`` is m'/m of the conv, n·E[W²]·T/P.
    """
    traces, shared = node.attrs.get("offsets"), x.shared
    if traces is None or expr.is_symbolic(m) or expr.is_symbolic(x.k) or (shared is None and is_zero(x.k)):
        return None
    nw = float(factor) * node.shape.positions / float(node.attrs["taps"])
    alpha = nw * float(x.k)
    beta = 0.0 if shared is None else nw * (float(shared) - float(x.k))
    nn, nd, dd = traces
    return alpha, beta, 2 * (alpha**2 * nn + 2 * alpha * beta * nd + beta**2 * dd)


def profile_weights(node: Node, x: State) -> tuple[float, float, float] | None:
    """(m, α, β)/σ² of the conv a batchnorm reads, for the profile of the offsets it keeps
    (``borders``); None without offsets."""
    if x.offsets is None or expr.is_symbolic(x.m):
        return None
    v = float(channel_variance(node, x)[0])
    return (float(x.m) / v, float(x.offsets[0]) / v, float(x.offsets[1]) / v) if v > 0 else None


def _offsets(x: State, positions: M) -> M:
    """E[x̄_p²] − k ≥ 0: how much more sample-shared offset one position carries than a pair shares."""
    if x.shared is None or positions == 1 or expr.is_symbolic(x.shared) or expr.is_symbolic(x.k):
        return 0
    return max(float(x.shared) - float(x.k), 0.0)


def channel_variance(node: Node, x: State) -> tuple[M, M]:
    """E[σ_c²] of the channels a batchnorm normalises, and E[Q_c], the part of it the offsets
    kept over positions make: the channel mean over positions removes (shared + (P−1)·k)/P."""
    p = node.shape.positions
    d = _offsets(x, p)
    return x.m - x.k - d / p, (p - 1) * d / p


def sampled_variance(values: M) -> M:
    """E[1/σ̂²]·σ² for a variance taken over ``values`` = M samples, times what the projection
    on ŷ leaves of the gradient relative to the mean's removal: M/(M−3)·(M−2)/(M−1)."""
    return values * (values - 2) / ((values - 3) * (values - 1))


def variance_spread(node: Node, x: State, own: bool = False) -> M:
    """E[1/σ̂_c²]·E[σ_c²] of a batchnorm reading x: 1/(1 − CV²) over the channels, CV² =
    (2/ν)·((σ² − Q)/σ²)² + Var(Q_c)/σ⁴ (ν/(ν−2) without offsets), and with its training batch
    given, ``sampled_variance`` of the B·P values of a channel. ``own``: the part of the
    layer's own weights alone, the first term (``State.spread``)."""
    nu, values = x.dof, node.attrs.get("batch")
    v, q = channel_variance(node, x)
    if nu is None or (not expr.is_symbolic(nu) and nu <= 2):
        return 1
    if x.offsets is None or expr.is_symbolic(v):
        nu_eff = nu if own else nu / x.rank
        spread: M = nu_eff / (nu_eff - 2) if expr.is_symbolic(nu_eff) or nu_eff > 2 else 1
    else:
        cv2 = 2 / nu * ((float(v) - q) / float(v)) ** 2
        if not own:  # the layer's inputs covary: σ_c² = W_c·A·W_cᵀ has CV² = 2ρ/ν (``channels``)
            cv2 = cv2 * x.rank + float(x.offsets[2]) / float(v) ** 2
        # CV ≥ 1: E[1/σ²] unbounded, left out as for ν ≤ 2
        spread = 1 / (1 - cv2) if expr.is_symbolic(cv2) or cv2 < 1 else 1
    if own:
        return spread
    if values is not None:
        values = values * node.shape.positions
        if not expr.is_symbolic(values) and values > 3:
            spread = spread * sampled_variance(values)
    return spread


def _batchnorm_forward(node: Node, xs: Sequence[State]) -> State:
    """Train-mode BN: m' = σ²/(σ²+ε) with σ² from ``channel_variance`` (m − k without offsets).

    Of the M = B·P normalised values of a channel, which sum to zero, two positions of one
    sample covary by k' and two samples at one position by s' (the offsets BN keeps, q = Q/(σ²+ε),
    less their share of the sum): Σ over the others of one value, B·(P−1)·k' + (B−1)·s' = −m'
    with s' = q − m'/(M−1) gives k' = −m'/(M−1) − (B−1)·q/(B·(P−1)). Without B (a large batch)
    k' = −q/(P−1), and without offsets k' = −m'/(M−1) (0 without B), as before.
    """
    x, p, b = xs[0], node.shape.positions, node.attrs.get("batch")
    v, offsets = channel_variance(node, x)
    m = v / plus_eps(v)
    if is_zero(offsets):
        return State(m, 0 if b is None else -m / (b * p - 1))
    q = offsets / plus_eps(v)
    if b is None:
        return State(m, -q / (p - 1), shared=q)
    return State(m, -m / (b * p - 1) - (b - 1) * q / (b * (p - 1)), shared=q - m / (b * p - 1))


def projection(dy: State, positions: M, batch: M | None) -> M:
    """What BN's projection on ŷ, c·ŷ with c = mean(Δy·ŷ) over the B·P values of a channel, takes
    from g beyond its diagonal 1/M: E[c²]·… = (P−1)/(B·P) of the covariance of two positions'
    products Δy·ŷ (``State.product``). A ReLU reading ŷ under a pool makes it large: there
    Δy·ŷ = Δr·r with Δr shared by a sample's positions, and this is 1/(π·B) of g."""
    if batch is None or dy.product is None:
        return 0
    return (positions - 1) * dy.product / (batch * positions)


def _batchnorm_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """g' = g/(σ²+ε)·spread, gk' likewise, and the gradient below sums to zero per channel.

    Train-mode BN's gradient is (Δy − mean(Δy) − ŷ·mean(Δy·ŷ))/σ, means over the batch and the
    positions of a channel. The first removes E[(ΣΔy)²]/(B·P)² = S/(B·P) from g and gk
    (S = g + (P−1)·gk + batch): under a pooling below that is the batch mean, 1/B, of the
    per-sample shared gradient gk, which otherwise is kept. With no ``batch`` given (the
    training batch B) that term is left out, and so is the projection term, ≈ g/(B·P).
    Dividing by σ_c, which varies across channels, gives E[1/σ_c²] > 1/E[σ_c²]
    (``variance_spread``); with B given, σ̂_c² is also a sample variance of M = B·P values,
    σ_c²·χ²_{M−1}/M, so E[1/σ̂²] = M/(M−3)·1/σ_c², and the projection on ŷ removes another 1/M
    of the gradient: × M/(M−3)·(M−2)/(M−1) (+0.8% at M = 256, +15% at M = 16), and more where
    the gradient covaries with ŷ over positions (``projection``).
    """
    x, p, b = xs[0], node.shape.positions, node.attrs.get("batch")
    v = plus_eps(channel_variance(node, x)[0]) / variance_spread(node, x)
    mean = 0 if b is None else (dy.m + (p - 1) * dy.k + dy.batch) / (b * p)  # E[M²], M the batch mean of Δy
    g, gk = (dy.m - mean - projection(dy, p, b)) / v, (dy.k - mean) / v
    own = variance_spread(node, x, own=True)
    covaried = 1 if x.rank == 1 else variance_spread(node, x) / variance_spread(node, replace(x, rank=1))
    return (State(g, gk, batch=-(g + (p - 1) * gk), spread=None if is_zero(own - 1) else own,
                  spread_in=None if is_zero(covaried - 1) else covaried),)


NORMALISE["batchnorm"] = ExactRule(
    _batchnorm_forward,
    _batchnorm_backward,
    "batchnorm: the offsets it keeps over positions, E[1/σ_c²] and a sample variance over the batch (approximate)",
)
NORMALISE["layernorm"] = ExactRule(
    lambda node, xs: State(xs[0].m / plus_eps(xs[0].m), xs[0].k / plus_eps(xs[0].m)),
    lambda node, xs, dy: (State(dy.m / plus_eps(xs[0].m), dy.k / plus_eps(xs[0].m)),),
    "layernorm: per-channel offsets average out over many channels (approximate)",
)
