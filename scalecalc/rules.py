"""Stage 3: the rule registry — how each op moves second moments forward and backward.

A rule maps the uncentred second moments of its inputs E[x²] to that of its output E[y²]
(forward), and the second moment of the gradient at its output E[Δy²] to the gradient it
sends to each input (backward). Moments are averages over the elements of one sample.
Rules are written once for plain numbers and sympy expressions alike.

Shared assumptions (paper §3): inputs iid, centred and symmetric; gradients iid and
uncorrelated with activations; weights iid, zero-mean; biases zero. ``exact`` marks rules
that are exact in expectation under them; the others are approximations and say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scalecalc import expr
from scalecalc.gaussian import cdf, gauss, max_m2
from scalecalc.graph import Node

M = Any  # a second moment: int | float | sympy.Expr
Forward = Callable[[Node, Sequence[M]], M]
Backward = Callable[[Node, Sequence[M], M], Sequence[M]]


@dataclass(frozen=True)
class Rule:
    op: str
    forward: Forward
    backward: Backward  # (node, input moments, E[Δy²]) → E[Δx_i²] sent to each input
    exact: bool
    keeps_scaling: str  # Table 1: whether and when ς is kept
    source: str
    note: str = ""  # stated on every node of this op when the rule is approximate
    doc: str = ""


RULES: dict[str, Rule] = {}


def rule(op: str, *, exact: bool, keeps: str, source: str, note: str = "") -> Callable[[type], type]:
    """Register the ``forward``/``backward`` pair of a class; its docstring is the formula."""

    def register(cls: type) -> type:
        RULES[op] = Rule(op, cls.forward, cls.backward, exact, keeps, source,  # type: ignore[attr-defined]
                         note, (cls.__doc__ or "").strip())
        return cls

    return register


def _one(fn: Callable[[Node, M], M]) -> Backward:
    return lambda node, xs, dy: (fn(node, dy),)


# --- weighted layers ---------------------------------------------------------------------

class _Dense:
    """E[y²] = n_in·E[W²]·E[x²]·T/ρ_out²,   E[Δx²] = n_out·E[W²]·E[Δy²]·T/ρ_in².

    T counts (output position, kernel tap) pairs that touch real input (see shapes.py);
    without padding T = k²·ρ_out² and these are the paper's Eqs. 9 and 10 (Appendix A).
    Linear layers are the case k = ρ = 1.
    """

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        a = node.attrs
        return a["n_in"] * node.init.m2 * xs[0] * a["taps"] / node.shape.positions  # type: ignore[union-attr]

    @staticmethod
    def backward(node: Node, xs: Sequence[M], dy: M) -> Sequence[M]:
        a = node.attrs
        return (a["n_out"] * node.init.m2 * dy * a["taps"] / node.in_shapes[0].positions,)  # type: ignore[union-attr]


_KEEPS = "keeps ς"
rule("conv", exact=True, keeps=_KEEPS, source="Eqs. 9–10 (App. A), exact border taps")(
    type("Conv", (_Dense,), {"__doc__": _Dense.__doc__}))
rule("linear", exact=True, keeps=_KEEPS, source="Eqs. 9–10 with k = ρ = 1")(
    type("Linear", (_Dense,), {"__doc__": _Dense.__doc__}))


# --- positively homogeneous activations --------------------------------------------------

def _leaky(slope_of: Callable[[Node], M], op: str, source: str) -> None:
    class LeakyReLU:
        """E[y²] = (1 + a²)/2·E[x²],   E[Δx²] = (1 + a²)/2·E[Δy²]   (a: negative slope).

        On a symmetric input half the entries keep their value and half are multiplied
        by a, in both passes (App. B, "ReLU"; relu is a = 0).
        """

        @staticmethod
        def forward(node: Node, xs: Sequence[M]) -> M:
            return (1 + slope_of(node) ** 2) * xs[0] / 2

        backward = staticmethod(_one(lambda node, dy: (1 + slope_of(node) ** 2) * dy / 2))

    rule(op, exact=True, keeps="keeps ς (positively homogeneous of degree 1)", source=source)(LeakyReLU)


_leaky(lambda node: 0, "relu", "App. B, ReLU")
_leaky(lambda node: node.attrs["slope"], "leaky_relu", "App. B, ReLU with negative slope a")


# --- pass-through and scalar ops ---------------------------------------------------------

class _Same:
    """E[y²] = E[x²],   E[Δx²] = E[Δy²]   (the values are only rearranged or unchanged)."""

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        return xs[0]

    backward = staticmethod(_one(lambda node, dy: dy))


for _op, _src in (("identity", "identity"), ("flatten", "reshape"),
                  ("bias", "§8: biases start at zero")):
    rule(_op, exact=True, keeps=_KEEPS, source=_src)(type(_op.title(), (_Same,), {"__doc__": _Same.__doc__}))


@rule("scale", exact=True, keeps="keeps ς", source="App. B, scalar multipliers; App. E")
class Scale:
    """E[y²] = u²·E[x²],   E[Δx²] = u²·E[Δy²]   (y = u·x, u fixed or a learnable scalar)."""

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        return node.attrs["value"] ** 2 * xs[0]

    backward = staticmethod(_one(lambda node, dy: node.attrs["value"] ** 2 * dy))


@rule("dropout", exact=True, keeps="keeps ς", source="App. B, Dropout (torch's 1/(1−p) rescale)")
class Dropout:
    """E[y²] = E[x²]/(1 − p),   E[Δx²] = E[Δy²]/(1 − p)   (train mode, kept units × 1/(1−p))."""

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        return xs[0] / (1 - node.attrs["p"])

    backward = staticmethod(_one(lambda node, dy: dy / (1 - node.attrs["p"])))


# --- multi-input ops ---------------------------------------------------------------------

def _weights(node: Node) -> Sequence[M]:
    return node.attrs.get("weights") or (1,) * len(node.inputs)


@rule("add", exact=True, keeps="keeps ς (App. B, residual blocks)", source="§11, App. B")
class Add:
    """E[y²] = Σ αᵢ²·E[xᵢ²],   E[Δxᵢ²] = αᵢ²·E[Δy²]   (y = Σ αᵢ·xᵢ, uncorrelated branches).

    Exact when the branches share no randomness, e.g. each passes through its own random
    conv/linear after the fork; a node whose branches are correlated gets a note.
    """

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        return sum(a**2 * x for a, x in zip(_weights(node), xs))

    @staticmethod
    def backward(node: Node, xs: Sequence[M], dy: M) -> Sequence[M]:
        return tuple(a**2 * dy for a in _weights(node))


@rule("concat", exact=True, keeps="keeps ς", source="derivation: channel-weighted mean")
class Concat:
    """E[y²] = Σ nᵢ·E[xᵢ²] / Σ nᵢ,   E[Δxᵢ²] = E[Δy²]   (nᵢ channels of input i).

    The output moment is the average over its channels; each input gets its slice of the
    gradient. Downstream rules see the channel average, which is what a conv sums over.
    """

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        sizes = [s.channels for s in node.in_shapes]
        return sum(n * x for n, x in zip(sizes, xs)) / sum(sizes)

    @staticmethod
    def backward(node: Node, xs: Sequence[M], dy: M) -> Sequence[M]:
        return (dy,) * len(node.inputs)


# --- pooling -----------------------------------------------------------------------------

@rule("avgpool", exact=True, keeps="keeps ς when stride = kernel", source="App. B, average pooling")
class AvgPool:
    """E[y²] = E[x²]·T/(ρ_out²·K²),   E[Δx²] = E[Δy²]·T/(ρ_in²·K²)   (K = kh·kw taps).

    Each output is the sum of its window's real inputs divided by K (torch counts padding
    in the divisor). Exact for centred inputs; after a ReLU the mean survives the average
    and this under-predicts.
    """

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        a = node.attrs
        return xs[0] * a["taps"] / (node.shape.positions * a["k2"] ** 2)

    backward = staticmethod(_one(lambda node, dy: dy * node.attrs["taps"]
                                 / (node.in_shapes[0].positions * node.attrs["k2"] ** 2)))


@rule("global_avgpool", exact=True, keeps="keeps ς", source="average pooling with k = ρ")
class GlobalAvgPool:
    """E[y²] = E[x²]/ρ²,   E[Δx²] = E[Δy²]/ρ⁴   (mean over the ρ² positions of a centred input)."""

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        return xs[0] / node.in_shapes[0].positions

    backward = staticmethod(_one(lambda node, dy: dy / node.in_shapes[0].positions ** 2))


@rule("maxpool", exact=False, keeps="does not keep ς (Table 1)", source="derivation: Gaussian order statistics",
      note="maxpool: E[max²] of K iid centred Gaussians (approximate)")
class MaxPool:
    """E[y²] = μ₂(K)·E[x²],   E[Δx²] = E[Δy²]·ρ_out²/ρ_in²,   μ₂(K) = E[max(z₁..z_K)²], z iid N(0,1).

    Backward is exact in expectation: each window routes its gradient to one input.
    """

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        window = round(float(node.attrs["taps"] / node.shape.positions))
        return max_m2(window) * xs[0]

    backward = staticmethod(_one(lambda node, dy: dy * node.shape.positions / node.in_shapes[0].positions))


# --- normalisation -----------------------------------------------------------------------

BN_EPS = 1e-5


def plus_eps(variance: M) -> M:
    """σ² + ε of a normalisation; a symbolic σ² is taken as ≫ ε, since σ²/(σ² + ε) would
    otherwise carry ε into every formula above it (relative effect ε/σ²)."""
    return variance if expr.is_symbolic(variance) else variance + BN_EPS


class _Norm:
    """E[y²] = E[x²]/(E[x²] + ε),   E[Δx²] = E[Δy²]/(E[x²] + ε)   (unit affine weight at init).

    Normalisation divides by the standard deviation; with a centred input the variance is
    E[x²]. The mean is not tracked, so after a ReLU the backward moment is under-predicted.
    """

    @staticmethod
    def forward(node: Node, xs: Sequence[M]) -> M:
        return xs[0] / plus_eps(xs[0])

    backward = staticmethod(lambda node, xs, dy: (dy / plus_eps(xs[0]),))


for _op in ("batchnorm", "layernorm"):
    rule(_op, exact=False, keeps="sets E[y²] = 1, so ς follows the gradient only",
         source="derivation: centred-input normalisation",
         note=f"{_op}: input mean not tracked (approximate after ReLU)")(
        type(_op.title(), (_Norm,), {"__doc__": _Norm.__doc__}))


# --- smooth activations (Gaussian approximation) -----------------------------------------

def _smooth(op: str, f: Callable[[float], float], df: Callable[[float], float], slope0: float,
            offset0: float) -> None:
    class Smooth:
        """E[y²] = E[f(z)²],   E[Δx²] = E[f'(z)²]·E[Δy²],   z ~ N(0, E[x²]).

        Numeric moments by Gauss–Hermite quadrature; with a symbolic input moment the
        linearisation f(x) ≈ f(0) + f'(0)·x is used instead (stated in the node's notes).
        """

        @staticmethod
        def forward(node: Node, xs: Sequence[M]) -> M:
            if expr.is_symbolic(xs[0]):
                return offset0**2 + slope0**2 * xs[0]
            return gauss(f, float(xs[0]))

        @staticmethod
        def backward(node: Node, xs: Sequence[M], dy: M) -> Sequence[M]:
            if expr.is_symbolic(xs[0]):
                return (slope0**2 * dy,)
            return (gauss(df, float(xs[0])) * dy,)

    rule(op, exact=False, keeps="does not keep ς (Table 1)", source="derivation: Gaussian input",
         note=f"{op}: Gaussian-input approximation")(Smooth)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x > -700 else 0.0


_smooth("tanh", math.tanh, lambda x: 1 - math.tanh(x) ** 2, 1, 0)
_smooth("sigmoid", _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)), 0.25, 0.5)
_smooth("gelu", lambda x: x * cdf(x),
        lambda x: cdf(x) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi), 0.5, 0)


