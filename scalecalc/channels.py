"""How much the channels of a layer covary at finite width, for the spread of a batchnorm.

The wide-limit calculus takes a layer's channels as independent. At width n they are not: a
conv or linear layer of ν inputs and n output channels has channel covariance Σ = W·A·Wᵀ (A the
covariance of its input patches), and for Gaussian W

    ρ' = n·tr(Σ²)/tr(Σ)² = 1 + (n + 1)·ρ/ν,    ρ = ν·tr(A²)/tr(A)²,

ρ = 1 for independent channels. Stored is e = ρ − 1 (``State.cross``). A batchnorm's channel
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


def cross(node: Node, xs: Sequence[State], out: State) -> float | None:
    """e = ρ − 1 of ``node``'s output channels (None where nothing is known)."""
    if not xs:
        return None
    e = [0.0 if x.cross is None else float(x.cross) for x in xs]
    if node.weighted and node.op in ("conv", "linear"):
        nu = out.dof
        return None if nu is None else (node.attrs["n_out"] + 1) * (1 + e[0]) / float(nu)
    if node.op in ("relu", "leaky_relu"):
        return _gain(node, xs[0], out) ** 2 * e[0]
    if node.op == "add":
        v = [a**2 * _variance(x) for a, x in zip(add_weights(node), xs)]
        total = sum(v)
        return sum(vi**2 * ei for vi, ei in zip(v, e)) / total**2 if total > 0 else None
    if node.op == "concat":
        n = [s.channels for s in node.in_shapes]
        v = [_variance(x) for x in xs]
        total = sum(ni * vi for ni, vi in zip(n, v))
        if total <= 0:
            return None
        return sum(n) * sum((1 + ei) * ni * vi**2 for ei, ni, vi in zip(e, n, v)) / total**2 - 1
    return e[0]


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

