"""How much the channels of a layer covary at finite width, for the spread of a batchnorm.

The wide-limit calculus takes a layer's channels as independent. At width n they are not: a
conv or linear layer of ν inputs and n output channels has channel covariance Σ = W·A·Wᵀ (A the
covariance of its input patches), and for Gaussian W

    ρ' = n·tr(Σ²)/tr(Σ)² = 1 + (n + 1)·ρ/ν,    ρ = ν·tr(A²)/tr(A)²,

ρ = 1 for independent channels. Stored is e = ρ − 1 (``State.cross``). A patch of k² taps has
ρ = (1/k²)·Σ_{t,t'} ρ(t' − t) over pairs of taps, ρ(0) = 1 + e and ρ(d) = e(d) the concentration
of the covariance of channels at positions d apart (``State.cross_near``): a conv's overlapping
windows make it, e'(d) = (n/ν)·(1/k²)·Σ_{t,t'} ρ(s·d + t' − t) (s the stride). A stem of 64
channels of 3·9 inputs has e = 2.4 and e(d) = 1.6 at its neighbours; through its ReLU the next
conv's patches have ρ = 6.7, not the 2.3 of one position's channels. A batchnorm's channel
variance σ_c² = W_c·A·W_cᵀ then has CV² = 2ρ/ν, not 2/ν (``normalise.variance_spread``), and
the 1 − 1/ν that BN's ΔW ⟂ W takes from γ becomes 1 − ρ/ν. On a ResNet's stem, 16 channels of
3·9 = 27 inputs, e = 0.63, and the identity shortcuts carry it through stage 1.

Through other ops (Price's theorem for the activations, at small correlation):
- (leaky) ReLU: each correlation is multiplied by λ = Var(x)·E[f′]²/Var(f(x)) (0.733 for a
  centred ReLU), so e' = λ²·e;
- add of independent summands of variances v_i (their weights included): e' = Σ v_i²·e_i/(Σ v_i)²;
- concat: ρ' = n·Σ ρ_i·n_i·v_i²/(Σ n_i·v_i)²;
- normalisation, pooling, scalars, flatten and the smooth activations keep e (approximate).
Numbers only: symbolic mode takes the channels as independent (``propagate`` does not call
this there), and says so at each batchnorm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scalecalc.graph import Node
from scalecalc.state import M, State, add_weights

Near = tuple[tuple[tuple[int, int], float], ...]
REACH = 2  # displacements kept per axis


def cross(node: Node, xs: Sequence[State], out: State) -> float | None:
    """e = ρ − 1 of ``node``'s output channels (None where nothing is known)."""
    if not xs:
        return None
    e = [0.0 if x.cross is None else float(x.cross) for x in xs]
    if node.weighted and node.op in ("conv", "linear"):  # ``out.rank``: ρ of its input patches
        return None if out.dof is None else (node.attrs["n_out"] + 1) * float(out.rank) / float(out.dof)
    if node.op in ("relu", "leaky_relu"):
        return _gain(node, xs[0], out) ** 2 * e[0]
    if node.op in ("add", "concat"):
        w = _mixing(node, xs)
        if w is None:
            return None
        # add: e' = Σ wᵢ²·eᵢ; concat: ρ' = Σ wᵢ²·ρᵢ, whose wᵢ² sum to more than 1
        return sum(wi**2 * (ei + (node.op == "concat")) for wi, ei in zip(w, e)) - (node.op == "concat")
    return e[0]


def near(node: Node, xs: Sequence[State], out: State) -> Near | None:
    """e(d) of ``node``'s output for 0 < |d| ≤ ``REACH`` (None where 0 or unknown)."""
    if not xs or not node.shape.spatial:
        return None
    x = xs[0]
    if node.op == "conv":
        if out.dof is None:
            return None
        taps, (sh, sw) = _taps(node), node.attrs["stride"]
        rho, scale = _rho(x), node.attrs["n_out"] / float(out.dof) / len(taps)
        found = []
        for d in _displacements():
            total = sum(rho.get((sh * d[0] + b[0] - a[0], sw * d[1] + b[1] - a[1]), 0.0) for a in taps for b in taps)
            if total * scale > 1e-9:
                found.append((d, total * scale))
        return tuple(found) or None
    if node.op in ("relu", "leaky_relu"):
        damp = _gain(node, x, out) ** 2
        return None if x.cross_near is None else tuple((d, damp * e) for d, e in x.cross_near)
    if node.op in ("add", "concat"):
        w = _mixing(node, xs)
        return None if w is None else _mixed([dict(x.cross_near or ()) for x in xs], w)
    if node.op in ("batchnorm", "layernorm", "scale", "bias", "identity", "dropout", "tanh", "sigmoid", "gelu"):
        return x.cross_near
    return None  # pools and flatten move or drop the positions


def patch(node: Node, x: State) -> M:
    """ρ of the patches a conv reads, (1/k²)·Σ over pairs of its taps of ρ(t' − t); a linear
    layer's (or a conv's on a state without ``cross_near``) is the channels' own ρ."""
    if node.op != "conv" or x.cross_near is None:
        return concentration(x)
    taps, rho = _taps(node), _rho(x)
    return sum(rho.get((b[0] - a[0], b[1] - a[1]), 0.0) for a in taps for b in taps) / len(taps)


def _taps(node: Node) -> list[tuple[int, int]]:
    kh, kw = node.attrs["kernel"]
    return [(i, j) for i in range(int(kh)) for j in range(int(kw))]


def _displacements() -> list[tuple[int, int]]:
    return [(i, j) for i in range(-REACH, REACH + 1) for j in range(-REACH, REACH + 1) if (i, j) != (0, 0)]


def _rho(x: State) -> dict[tuple[int, int], float]:
    """ρ(d) of a state: 1 + e at d = 0, e(d) elsewhere."""
    rho = dict(x.cross_near or ())
    rho[(0, 0)] = float(concentration(x))
    return rho


def _mixing(node: Node, xs: Sequence[State]) -> list[float] | None:
    """Weights wᵢ of an add's summands (vᵢ/Σv, vᵢ their variances with the add's weights) or
    of a concat's groups (√(n·nᵢ)·vᵢ/Σ nⱼvⱼ): the mixed ρ − 1 is Σ wᵢ²·eᵢ (None without variance)."""
    if node.op == "add":
        v = [a**2 * _variance(x) for a, x in zip(add_weights(node), xs)]
        return [vi / sum(v) for vi in v] if sum(v) > 0 else None
    n = [s.channels for s in node.in_shapes]
    v = [_variance(x) for x in xs]
    total = sum(ni * vi for ni, vi in zip(n, v))
    return [math.sqrt(sum(n) * ni) * vi / total for ni, vi in zip(n, v)] if total > 0 else None


def _mixed(parts: list[dict[tuple[int, int], float]], weights: list[float]) -> Near | None:
    """Σ wᵢ²·eᵢ(d) of summands (or groups) of relative weights wᵢ."""
    found = [(d, sum(w**2 * p.get(d, 0.0) for w, p in zip(weights, parts))) for d in _displacements()]
    return tuple((d, e) for d, e in found if e > 1e-9) or None


def concentration(x: State) -> M:
    """ρ = 1 + e of a state's channels (1 where unknown); a conv or linear output keeps its
    input's as ``State.rank``."""
    return 1 if x.cross is None else 1 + x.cross


def _variance(x: State) -> float:
    return float(x.m) - float(x.mean) ** 2


def _gain(node: Node, x: State, out: State) -> float:
    """λ = Var(x)·E[f′(x)]²/Var(f(x)) of a (leaky) ReLU, x taken as Gaussian of its mean and variance."""
    a = float(node.attrs.get("slope", 0))
    var, var_out = _variance(x), _variance(out)
    if var <= 0 or var_out <= 0:
        return 1.0
    p = 0.5 * (1 + math.erf(float(x.mean) / math.sqrt(2 * var)))  # P(x > 0)
    return var * (p + a * (1 - p)) ** 2 / var_out

