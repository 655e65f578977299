"""The spatial kernel: the covariance of every pair of positions, where the maps are small.

The exact calculus keeps two numbers per node — E[x²] and the covariance k of two positions
averaged over all pairs — and likewise g and gk backward. That average is not enough on
small padded maps: a border position of a padded conv reads fewer taps, so it carries less
of a channel's shared offset forward and less of the shared gradient backward, and a conv's
backward pass, which pairs the gradients of two inputs through the taps valid for both,
loses fewer pairs than the all-pairs average of common taps says. Through a deep residual
stack the gradient's shared part gk then comes out too small, and with it the pair terms
of γ, which on a large map multiply it by the P − 1 pairs of positions.

Here each node carries the whole covariance X(p, q) of two positions of one channel
(forward, uncentred) and G(p, q) (backward), as arrays [h, w, h, w], in the mean-field
limit of wide layers:

    conv      X' = n·E[W²]·Σ_a S_a X S_aᵀ       G = n'·E[W²]·Σ_a S_aᵀ G' S_a
    avg pool  X' = A X Aᵀ                        G = Aᵀ G' A
    ReLU      X' = (1−a)²·κ(X) + a·X             G = G'·(a + (1−a)²·(π − θ)/2π)

S_a the shift of tap a (stride, padding), A = Σ_a S_a/K the window average, θ = arccos of
the correlation X(p,q)/√(X(p,p)·X(q,q)) of the ReLU's centred Gaussian input and κ the
arc-cosine kernel √(X(p,p)·X(q,q))·(sin θ + (π − θ)·cos θ)/2π. Every linear map acts on the
two axes apart (the taps of a k×k window are a product set), which the code uses. Then per
weighted layer, exactly in this limit, E[ΔW²] = Σ_{p,q} G'(p,q)·X'(p,q)/(n·E[W²]·k²) and the
bias gets E[Δb²] = Σ_{p,q} G'(p,q).

This holds where every ReLU and every sum reads centred inputs (conv outputs and what scales,
pools or adds them), so it is used only on networks of the ops below whose ReLUs and adds see
no mean; elsewhere the calculus keeps its averaged rules. Maps of more than ``CAP`` positions
are not held, nor the largest maps of a network whose arrays would pass ``BUDGET`` entries: they
enter as the averaged state (k off the diagonal, m on it), and the gradient they receive leaves
as its average again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalecalc.graph import Network, Node
from scalecalc.state import State, add_weights

CAP = 1024  # positions of the largest map held whole: a 32×32 map, 8 MB per array
BUDGET = 2 * 10**8  # array entries over all held nodes (about 0.3 s per 10⁸ on one core)
LINEAR = {"scale", "bias", "identity", "conv", "linear", "avgpool", "global_avgpool", "flatten", "add"}
SUPPORTED = LINEAR | {"relu", "leaky_relu"}


@dataclass(frozen=True)
class Kernel:
    """What the spatial kernel changes in the calculus: per node, the ratio gk/g of the gradient
    each input is sent (by input index), and per weighted layer E[ΔW²] and E[Δb²]."""

    sent: Mapping[str, tuple[float, ...]]
    weight_grad: Mapping[str, float]
    bias_grad: Mapping[str, float]


def kernel(net: Network, fwd: Mapping[str, State], cap: int | None = None) -> Kernel | None:
    """The spatial kernel of ``net`` (None where it does not apply: symbols, other ops, means)."""
    cap = CAP if cap is None else cap
    if net.symbols or not _applies(net):
        return None
    sizes = sorted({int(n.shape.positions) for n in net.nodes[1:] if n.shape.positions <= cap}, reverse=True)
    for size in sizes:  # the largest maps go first where the whole would take too long
        held = _held(net, size)
        if sum(int(net.node(n).shape.positions) ** 2 for n in held) <= BUDGET:
            break
    else:
        return None
    if not held:
        return None
    x: dict[str, Any] = {}
    gates: dict[str, np.ndarray] = {}
    last = {s: i for i, node in enumerate(net.nodes) for s in node.inputs}  # a map's last reader
    for i, node in enumerate(net.nodes[1:], 1):
        if node.name in held:
            ins = [x[s] if s in x else _averaged(fwd[s], _shape(net, s)) for s in node.inputs]
            x[node.name] = _forward(node, ins, gates)
        for s in node.inputs:  # keep what γ needs (weighted outputs); drop the rest once read
            if last[s] == i and s in x and not net.node(s).weighted:
                del x[s]
    out = net.node(net.output).shape  # iid output gradients: every position its own
    g: dict[str, Any] = {net.output: float(net.grad_m2) * _whole(_identity(out)) if out.spatial
                         else float(net.grad_m2)}
    sent: dict[str, tuple[float, ...]] = {}
    weight, bias = {}, {}
    for node in reversed(net.nodes[1:]):
        dy = g.pop(node.name, None)  # every reader has sent its part; nothing reads it again
        if node.name not in held or dy is None:
            continue
        if node.weighted:
            weight[node.name] = _dot(dy, x.pop(node.name)) / (node.attrs["n_in"] * _w2(node) * node.attrs["k2"])
        if node.attrs.get("bias") is True or node.op == "bias":
            bias[node.name] = float(np.sum(dy))
        if all(s in held for s in node.inputs):
            ds = _backward(node, dy, gates)
            gates.pop(node.name, None)
            for src, d in zip(node.inputs, ds):
                g[src] = d if src not in g else g[src] + d
            sent[node.name] = tuple(_ratio(d) for d in ds)
        else:  # reads a map too large to hold (a window op or a global pool): only averages leave
            sent[node.name] = (_boundary(node, dy),)
    return Kernel(sent, weight, bias)


def _held(net: Network, cap: int) -> set[str]:
    """Nodes on maps of at most ``cap`` positions all of whose readers are held too."""
    held = {n.name for n in net.nodes[1:] if n.shape.positions <= cap}
    for node in reversed(net.nodes[1:]):
        if any(r not in held for r in net.graph.successors(node.name)):
            held.discard(node.name)
    return held


def _applies(net: Network) -> bool:
    """Supported ops only, and every ReLU and every sum reading centred signals: the input, conv
    and linear outputs (zero-mean weights), and what scales, pools or adds them. The arc-cosine
    kernel needs a centred Gaussian input, and a sum's cross terms vanish only without means."""
    centred = {"input"}
    for node in net.nodes[1:]:
        if node.op not in SUPPORTED:
            return False
        if node.op in ("relu", "leaky_relu", "add") and not all(s in centred for s in node.inputs):
            return False
        if node.op in ("conv", "linear") or (node.op in LINEAR and all(s in centred for s in node.inputs)):
            centred.add(node.name)
    return True


def _shape(net: Network, name: str) -> Any:
    return net.input_shape if name == "input" else net.node(name).shape


def _averaged(state: State, shape: Any) -> Any:
    """A map not held whole: m on the diagonal, k off it, as Kronecker terms."""
    if not shape.spatial:
        return float(state.m)
    k = float(state.k)
    terms = [(k, np.ones((shape.h, shape.h)), np.ones((shape.w, shape.w)))] if k != 0 else []
    return terms + [(c * (float(state.m) - k), a, b) for c, a, b in _identity(shape)]


def _identity(shape: Any) -> list[tuple[float, np.ndarray, np.ndarray]]:
    return [(1.0, np.eye(shape.h), np.eye(shape.w))]


# -- the linear maps, one spatial axis at a time ------------------------------------------------

@dataclass(frozen=True)
class Shift:
    """Output o reads input s·o + d, for the outputs lo ≤ o < hi whose input is real."""

    lo: int
    hi: int
    d: int
    s: int

    def output(self) -> slice:
        return slice(self.lo, self.hi)

    def input(self) -> slice:
        return slice(self.s * self.lo + self.d, self.s * (self.hi - 1) + self.d + 1, self.s)


@dataclass(frozen=True)
class Tap:
    """One term w·S_l X S_rᵀ of an axis map (the same shift on both sides for a conv, whose
    taps have independent weights; every pair of window taps for a pool, whose taps share one)."""

    weight: float
    left: Shift
    right: Shift


@dataclass(frozen=True)
class Axis:
    size_in: int
    size_out: int
    taps: tuple[Tap, ...]


def _shifts(size_in: int, size_out: int, k: int, s: int, pad: int) -> list[Shift]:
    out = []
    for a in range(k):
        d = a - pad
        lo = -(d // s) if d < 0 else 0  # the first output whose input s·o + d ≥ 0 (ceil of −d/s)
        hi = min(size_out, (size_in - 1 - d) // s + 1)
        out.append(Shift(lo, max(lo, hi), d, s))
    return out


def _axes(node: Node) -> tuple[Axis, Axis] | None:
    """The per-axis maps of a conv (Σ over taps, each tap paired with itself: weights of
    different taps are independent) or an average pool (every pair of taps, each 1/K);
    None for a 1×1 conv of stride 1, which maps every position to itself."""
    a = node.attrs
    src = node.in_shapes[0]
    if a["kernel"] == (1, 1) and a["stride"] == (1, 1) and a["padding"] == (0, 0):
        return None
    result = []
    for size_in, size_out, k, s, p in ((src.h, node.shape.h, a["kernel"][0], a["stride"][0], a["padding"][0]),
                                       (src.w, node.shape.w, a["kernel"][1], a["stride"][1], a["padding"][1])):
        shifts = _shifts(int(size_in), int(size_out), int(k), int(s), int(p))
        taps = ([Tap(1.0, t, t) for t in shifts] if node.op == "conv"
                else [Tap(1.0 / int(k) ** 2, t, u) for t in shifts for u in shifts])
        result.append(Axis(int(size_in), int(size_out), tuple(taps)))
    return result[0], result[1]


def _map(x: np.ndarray, axis: Axis, dims: tuple[int, int], back: bool = False) -> np.ndarray:
    """Σ_t w_t·S_l X S_rᵀ on the two array dimensions of one spatial axis (Sᵀ · S backward):
    each term moves a strided slice of x onto a slice of the result."""
    shape = list(x.shape)
    shape[dims[0]] = shape[dims[1]] = axis.size_in if back else axis.size_out
    total = np.zeros(shape)
    for tap in axis.taps:
        into, frm = [slice(None)] * x.ndim, [slice(None)] * x.ndim
        for dim, shift in zip(dims, (tap.left, tap.right)):
            into[dim], frm[dim] = (shift.input(), shift.output()) if back else (shift.output(), shift.input())
        total[tuple(into)] += tap.weight * x[tuple(frm)]
    return total


def _matrix(shift: Shift, axis: Axis) -> np.ndarray:
    m = np.zeros((axis.size_out, axis.size_in))
    o = np.arange(shift.lo, shift.hi)
    m[o, shift.s * o + shift.d] = 1.0
    return m


def _spatial(x: Any, axes: tuple[Axis, Axis] | None) -> Any:
    if axes is None:
        return x
    rows, cols = axes
    if isinstance(x, list):  # Kronecker terms: each axis alone, then the outer product
        return sum(c * np.einsum("ac,bd->abcd", _one(a, rows), _one(b, cols)) for c, a, b in x)
    return _map(_map(x, rows, (0, 2)), cols, (1, 3))


def _one(b: np.ndarray, axis: Axis) -> np.ndarray:
    return sum(t.weight * _matrix(t.left, axis) @ b @ _matrix(t.right, axis).T for t in axis.taps)


def _diagonal(x: np.ndarray) -> np.ndarray:
    return np.einsum("ijij->ij", x)


def _whole(x: Any) -> Any:
    if isinstance(x, list):
        return sum(c * np.einsum("ac,bd->abcd", a, b) for c, a, b in x)
    return x


# -- forward and backward -------------------------------------------------------------------------

def _forward(node: Node, xs: list[Any], gates: dict[str, np.ndarray]) -> Any:
    op, a = node.op, node.attrs
    if op in ("conv", "avgpool"):
        scale = a["n_in"] * _w2(node) if op == "conv" else 1.0
        return scale * _whole(_spatial(xs[0], _axes(node)))
    if op == "linear":
        return a["n_in"] * _w2(node) * _mean_diagonal(xs[0])
    if op == "global_avgpool":
        return _total(xs[0]) / node.in_shapes[0].positions**2
    if op == "flatten":
        return _mean_diagonal(xs[0])
    x = _whole(xs[0])
    if op == "scale":
        return float(a["value"]) ** 2 * x
    if op in ("bias", "identity"):
        return x
    if op == "add":
        return sum(float(w) ** 2 * _whole(v) for w, v in zip(add_weights(node), xs))
    slope = float(a.get("slope", 0)) if op == "leaky_relu" else 0.0
    if not isinstance(x, np.ndarray):  # a vector: one variance, the paper's rule
        gates[node.name] = np.asarray((1 + slope**2) / 2)
        return (1 + slope**2) / 2 * x
    sd = np.sqrt(np.maximum(_diagonal(x), 0.0))
    scale = sd[:, :, None, None] * sd[None, None, :, :]
    rho = np.clip(np.divide(x, scale, out=np.ones_like(x), where=scale > 0), -1.0, 1.0)
    i, j = np.indices(sd.shape)
    rho[i, j, i, j] = 1.0  # a position with itself; arccos would turn rounding near 1 into ~1e-8
    open_both = (math.pi - np.arccos(rho)) / (2 * math.pi)  # (π − θ)/2π
    gates[node.name] = slope + (1 - slope) ** 2 * open_both
    # (sin θ + (π − θ)·cos θ)/2π with cos θ = ρ
    arc = scale * (np.sqrt(1.0 - rho * rho) / (2 * math.pi) + open_both * rho)
    return (1 - slope) ** 2 * arc + slope * x


def _w2(node: Node) -> float:
    """E[W²] of a weighted layer's init."""
    assert node.init is not None
    return float(node.init.m2)


def _mean_diagonal(x: Any) -> float:
    if isinstance(x, list):
        return sum(c * float(np.mean(np.diag(a))) * float(np.mean(np.diag(b))) for c, a, b in x)
    return float(np.mean(_diagonal(x))) if isinstance(x, np.ndarray) else float(x)


def _dot(a: Any, b: Any) -> float:
    """Σ_{p,q} A(p,q)·B(p,q), without a temporary array."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return float(np.vdot(a.ravel(), b.ravel()))
    return float(np.sum(a * b))


def _total(x: Any) -> float:
    if isinstance(x, list):
        return sum(c * float(np.sum(a)) * float(np.sum(b)) for c, a, b in x)
    return float(np.sum(x))


def _backward(node: Node, dy: Any, gates: Mapping[str, np.ndarray]) -> list[Any]:
    op, a = node.op, node.attrs
    src = node.in_shapes[0]
    if op in ("conv", "avgpool"):
        scale = a["n_out"] * _w2(node) if op == "conv" else 1.0
        axes = _axes(node)
        if axes is None:
            return [scale * dy]
        return [scale * _map(_map(dy, axes[0], (0, 2), back=True), axes[1], (1, 3), back=True)]
    if op == "linear":
        return [a["n_out"] * _w2(node) * dy]
    if op == "global_avgpool":
        p = src.positions
        return [np.full((src.h, src.w, src.h, src.w), dy / p**2)]
    if op == "flatten":
        if not src.spatial:
            return [dy]
        return [dy * _whole(_identity(src))]  # each feature its own weights
    if op == "scale":
        return [float(a["value"]) ** 2 * dy]
    if op in ("bias", "identity"):
        return [dy]
    if op == "add":
        return [float(w) ** 2 * dy for w in add_weights(node)]
    return [dy * gates[node.name]]  # relu, leaky_relu


def _ratio(g: Any) -> float:
    """gk/g of a gradient: the mean covariance of two different positions over the mean square."""
    if not isinstance(g, np.ndarray):
        return 0.0
    p = g.shape[0] * g.shape[1]
    trace = float(np.sum(_diagonal(g)))
    return 0.0 if p == 1 or trace == 0 else (float(np.sum(g)) - trace) / (p - 1) / trace


def _boundary(node: Node, dy: Any) -> float:
    """gk/g of the gradient sent into a map too large to hold, from sums over the held map:
    Σ (S_aᵀ G S_a) = Σ G ⊙ (S_a 1)(S_a 1)ᵀ and tr(S_aᵀ G S_a) = Σ G ⊙ S_a S_aᵀ. A global
    pool hands every position the same gradient; a flatten gives each its own weights."""
    src = node.in_shapes[0]
    if node.op == "global_avgpool":
        return 1.0
    if node.op not in ("conv", "avgpool"):
        return 0.0
    axes = _axes(node)
    ones = _whole(_spatial([(1.0, np.ones((src.h, src.h)), np.ones((src.w, src.w)))], axes))
    eye = _whole(_spatial(_identity(src), axes))
    total, trace = float(np.sum(dy * ones)), float(np.sum(dy * eye))
    p = src.positions
    return 0.0 if trace == 0 else (total - trace) / (p - 1) / trace
