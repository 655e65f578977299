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
    max pool  X'(A,B) = E[f(max_A z)·f(max_B z)]  G(p,q) = G'(A,B)·E[r_p·r_q]

S_a the shift of tap a (stride, padding), A = Σ_a S_a/K the window average, θ = arccos of
the correlation X(p,q)/√(X(p,p)·X(q,q)) of the ReLU's centred Gaussian input and κ the
arc-cosine kernel √(X(p,p)·X(q,q))·(sin θ + (π − θ)·cos θ)/2π. Every linear map acts on the
two axes apart (the taps of a k×k window are a product set), which the code uses. Then per
weighted layer, exactly in this limit, E[ΔW²] = Σ_{p,q} G'(p,q)·X'(p,q)/(n·E[W²]·k²) and the
bias gets E[Δb²] = Σ_{p,q} G'(p,q). A max pool of non-overlapping windows A, B reads a
centred Gaussian field z, or a (leaky) ReLU f of one (then f(max z) = max f(z)); r_p is 1
where p is the first arg-max of its window, times f'(z_p) below the ReLU, whose gate then
comes with the routing. Its moments are sampled (``gaussian.window_max``, a fixed seed).
The calculus takes E[x²], k and E[Δx²] of every held map from here. Where ``finite`` applies
the backward pass runs a second time (``backward``, on the same forward arrays) with the
gradient's O(1/n) part B·y added as an averaged state.

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

from scalecalc.finite import Coherent, power
from scalecalc.gaussian import window_max
from scalecalc.graph import Network, Node
from scalecalc.state import State, add_weights
from scalecalc.windows import axis_maps, diagonal, identity, mapped, pool_windows, spatial_map, whole

CAP = 1024  # positions of the largest map held whole: a 32×32 map, 8 MB per array
BUDGET = 2 * 10**8  # array entries over all held nodes (about 0.3 s per 10⁸ on one core)
LINEAR = {"scale", "bias", "identity", "conv", "linear", "avgpool", "global_avgpool", "flatten", "add"}
SUPPORTED = LINEAR | {"relu", "leaky_relu", "maxpool"}


@dataclass(frozen=True)
class Kernel:
    """What the spatial kernel changes in the calculus: per node E[x²] and, on a map, the
    covariance k of two positions; the E[Δx²] and gk/g of the gradient each input is sent
    (by input index); per weighted layer E[ΔW²] and E[Δb²]."""

    forward: Mapping[str, tuple[float, float | None]]
    sent: Mapping[str, tuple[tuple[float | None, float], ...]]
    weight_grad: Mapping[str, float]
    bias_grad: Mapping[str, float]


@dataclass(frozen=True)
class Held:
    """The spatial kernel's forward pass: the nodes it holds, the arrays its backward pass
    reads (weighted layers' outputs) and the ReLUs' gates."""

    nodes: frozenset[str]
    x: Mapping[str, Any]
    gates: Mapping[Any, Any]
    forward: Mapping[str, tuple[float, float | None]]


def kernel(net: Network, fwd: Mapping[str, State], cap: int | None = None) -> Kernel | None:
    """The spatial kernel of ``net`` (None where it does not apply: symbols, other ops, means)."""
    held = hold(net, fwd, cap)
    return None if held is None else backward(net, held, fwd)


def hold(net: Network, fwd: Mapping[str, State], cap: int | None = None) -> Held | None:
    """The forward pass over the maps the kernel holds."""
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
    if not any(net.node(n).shape.spatial for n in held):  # vectors alone: nothing to add
        return None
    x: dict[str, Any] = {}
    gates: dict[Any, Any] = {}
    forward: dict[str, tuple[float, float | None]] = {}
    last = {s: i for i, node in enumerate(net.nodes) for s in node.inputs}  # a map's last reader
    for i, node in enumerate(net.nodes[1:], 1):
        if node.name in held:
            ins = [x[s] if s in x else _averaged(fwd[s], _shape(net, s)) for s in node.inputs]
            x[node.name] = _maxpool(node, ins, gates) if node.op == "maxpool" else _forward(node, ins, gates)
            forward[node.name] = _moments(x[node.name])
            if node.op in ("relu", "leaky_relu") and _pooled(net, node.name):
                gates["pre", node.name] = (float(node.attrs.get("slope", 0)), whole(ins[0]))  # for the pool
        for s in node.inputs:  # keep what γ needs (weighted outputs); drop the rest once read
            if last[s] == i and s in x and not net.node(s).weighted:
                del x[s]
    return Held(frozenset(held), x, gates, forward)


def backward(net: Network, held: Held, fwd: Mapping[str, State], coherent: Coherent | None = None) -> Kernel:
    """The backward pass over the held maps; with ``coherent``, the part B·y of a gradient at
    finite width (``finite``) where a conv or linear layer reads y, and where a ReLU passes it
    whole what its gate took of it: B·y as its averaged state (``finite.power``), which leaves
    out how y varies over positions, a smaller effect than B."""
    x, gates = dict(held.x), dict(held.gates)
    out = net.node(net.output).shape  # iid output gradients: every position its own
    g: dict[str, Any] = {net.output: float(net.grad_m2) * whole(identity(out)) if out.spatial
                         else float(net.grad_m2)}
    sent: dict[str, tuple[tuple[float | None, float], ...]] = {}
    weight, bias = {}, {}
    for node in reversed(net.nodes[1:]):
        dy = g.pop(node.name, None)  # every reader has sent its part; nothing reads it again
        if node.name not in held.nodes or dy is None:
            continue
        fork = None if coherent is None else coherent.at_fork(node.name)
        if fork is not None:  # its readers' B·x parts add as amplitudes
            dy = _with(dy, *power(fork[0], fork[1], fwd[node.name], fork[2]))
        if node.weighted:
            weight[node.name] = _dot(dy, x.pop(node.name)) / (node.attrs["n_in"] * _w2(node) * node.attrs["k2"])
        if node.attrs.get("bias") is True or node.op == "bias":
            bias[node.name] = float(np.sum(dy))
        if all(s in held.nodes for s in node.inputs):
            ds = _backward(node, dy, gates)
            if coherent is not None and node.name in coherent.inputs:  # Stein's B·x
                src = node.inputs[0]
                vd, vt, local = coherent.at_input(node.name)
                ds = [_with(ds[0], *power(vd, vt, fwd[src], local))]
            if coherent is not None and node.name in coherent.relus and node.name in gates:
                vd, vy, vx, local = coherent.at_relu(node.name)  # the gate passes B·y whole, where the rule gated it
                (pm, pk), (gm, gk) = (power(vd, v, fwd[node.name], local) for v in (vx, vy))
                ds = [_with(ds[0] - _gated(gates[node.name], gm, gk), pm, pk)]
            gates.pop(node.name, None)
            for src, d in zip(node.inputs, ds):
                g[src] = d if src not in g else g[src] + d
            sent[node.name] = tuple(_sent(d) for d in ds)
        else:  # reads a map too large to hold (a window op or a global pool): only averages leave
            sent[node.name] = ((None, _boundary(node, dy)),)
    return Kernel(held.forward, sent, weight, bias)


def _with(g: Any, m: float, k: float) -> Any:
    """g plus an averaged state: m on the diagonal, k at every other pair of positions."""
    if not isinstance(g, np.ndarray) or g.ndim != 4:
        return g + m
    p = g.shape[0] * g.shape[1]
    out = g + k
    out.reshape(p, p)[np.diag_indices(p)] += m - k
    return out


def _gated(gate: Any, m: float, k: float) -> Any:
    """An averaged state (m on the diagonal, k off it) times a ReLU's gate over pairs."""
    if not isinstance(gate, np.ndarray) or gate.ndim != 4:
        return m * gate
    p = gate.shape[0] * gate.shape[1]
    out = k * gate
    out.reshape(p, p)[np.diag_indices(p)] = m * np.diagonal(gate.reshape(p, p))
    return out


def _held(net: Network, cap: int) -> set[str]:
    """Nodes on maps of at most ``cap`` positions all of whose readers are held too; a max pool
    also needs its input held (it samples that field)."""
    held = {n.name for n in net.nodes[1:]
            if n.shape.positions <= cap and (n.op != "maxpool" or n.in_shapes[0].positions <= cap)}
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
        if node.op == "maxpool" and not _pools_gaussian(net, node, centred):
            return False
        if node.op in ("relu", "leaky_relu", "add") and not all(s in centred for s in node.inputs):
            return False
        if node.op in ("conv", "linear") or (node.op in LINEAR and all(s in centred for s in node.inputs)):
            centred.add(node.name)
    return True


def _pools_gaussian(net: Network, node: Node, centred: set[str]) -> bool:
    """A max pool of non-overlapping windows that reads a centred signal, or an increasing
    (leaky) ReLU of one that nothing else reads (the pool then decides where that ReLU's
    gradient goes)."""
    a = node.attrs
    if a["stride"] != a["kernel"] or a["padding"] != (0, 0):
        return False
    src = node.inputs[0]
    if src != "input" and net.node(src).op in ("relu", "leaky_relu"):  # increasing: max f(z) = f(max z)
        return _pooled(net, src) and float(net.node(src).attrs.get("slope", 0)) >= 0
    return src in centred


def _pooled(net: Network, name: str) -> bool:
    return [net.node(r).op for r in net.graph.successors(name)] == ["maxpool"]


def _moments(x: Any) -> tuple[float, float | None]:
    """E[x²] (the mean diagonal) and, on a map, the mean covariance of two positions."""
    if not isinstance(x, np.ndarray):
        return float(x), None
    p = x.shape[0] * x.shape[1]
    trace = float(np.sum(diagonal(x)))
    return trace / p, (None if p == 1 else (float(np.sum(x)) - trace) / (p * (p - 1)))


def _maxpool(node: Node, xs: list[Any], gates: dict[Any, Any]) -> Any:
    """Sampled window maxima (``gaussian.window_max``) of the field the pool reads, or after a
    (leaky) ReLU of its Gaussian input; what the backward pass routes is kept in ``gates``."""
    src = node.in_shapes[0]
    pre = gates.pop(("pre", node.inputs[0]), None)
    p = int(src.positions)
    f_cov = whole(xs[0]).reshape(p, p)
    cov, slope = (f_cov, None) if pre is None else (pre[1].reshape(p, p), pre[0])
    windows = pool_windows(node)
    result = window_max(cov, f_cov, windows, slope)
    gates[node.name] = (result, windows, None if pre is None else node.inputs[0])
    h, w = int(node.shape.h), int(node.shape.w)
    return result.pairs.reshape(h, w, h, w)


def _shape(net: Network, name: str) -> Any:
    return net.input_shape if name == "input" else net.node(name).shape


def _averaged(state: State, shape: Any) -> Any:
    """A map not held whole: m on the diagonal, k off it, as Kronecker terms."""
    if not shape.spatial:
        return float(state.m)
    k = float(state.k)
    terms = [(k, np.ones((shape.h, shape.h)), np.ones((shape.w, shape.w)))] if k != 0 else []
    return terms + [(c * (float(state.m) - k), a, b) for c, a, b in identity(shape)]


# -- forward and backward -------------------------------------------------------------------------

def _forward(node: Node, xs: list[Any], gates: dict[Any, Any]) -> Any:
    op, a = node.op, node.attrs
    if op in ("conv", "avgpool"):
        scale = a["n_in"] * _w2(node) if op == "conv" else 1.0
        return scale * whole(spatial_map(xs[0], axis_maps(node)))
    if op == "linear":
        return a["n_in"] * _w2(node) * _mean_diagonal(xs[0])
    if op == "global_avgpool":
        return _total(xs[0]) / node.in_shapes[0].positions**2
    if op == "flatten":
        return _mean_diagonal(xs[0])
    x = whole(xs[0])
    if op == "scale":
        return float(a["value"]) ** 2 * x
    if op in ("bias", "identity"):
        return x
    if op == "add":
        return sum(float(w) ** 2 * whole(v) for w, v in zip(add_weights(node), xs))
    slope = float(a.get("slope", 0)) if op == "leaky_relu" else 0.0
    if not isinstance(x, np.ndarray):  # a vector: one variance, the paper's rule
        gates[node.name] = np.asarray((1 + slope**2) / 2)
        return (1 + slope**2) / 2 * x
    sd = np.sqrt(np.maximum(diagonal(x), 0.0))
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
    return float(np.mean(diagonal(x))) if isinstance(x, np.ndarray) else float(x)


def _dot(a: Any, b: Any) -> float:
    """Σ_{p,q} A(p,q)·B(p,q), without a temporary array."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return float(np.vdot(a.ravel(), b.ravel()))
    return float(np.sum(a * b))


def _total(x: Any) -> float:
    if isinstance(x, list):
        return sum(c * float(np.sum(a)) * float(np.sum(b)) for c, a, b in x)
    return float(np.sum(x))


def _backward(node: Node, dy: Any, gates: dict[Any, Any]) -> list[Any]:
    op, a = node.op, node.attrs
    src = node.in_shapes[0]
    if op == "maxpool":  # G(p, q) = G'(A, B)·E[r_p·r_q]; the ReLU below gets E[r_p f'_p r_q f'_q]
        result, windows, relu = gates[node.name]
        p = int(src.positions)
        window_of = np.full(p, -1)
        window_of[windows.ravel()] = np.repeat(np.arange(windows.shape[0]), windows.shape[1])
        flat = dy.reshape(windows.shape[0], windows.shape[0])
        spread = np.where((window_of[:, None] >= 0) & (window_of[None, :] >= 0), flat[window_of][:, window_of], 0.0)
        if np.count_nonzero(flat - np.diag(np.diag(flat))) == 0:  # windows' gradients uncorrelated
            routed, opened = np.diag(result.routed), np.diag(result.opened)
        else:
            routed, opened = result.pair_routes(p)
        if relu is not None:
            gates["grad", relu] = (spread * opened).reshape(src.h, src.w, src.h, src.w)
        return [(spread * routed).reshape(src.h, src.w, src.h, src.w)]
    if ("grad", node.name) in gates:  # a ReLU under a max pool: its gate came with the routing
        return [gates.pop(("grad", node.name))]
    if op in ("conv", "avgpool"):
        scale = a["n_out"] * _w2(node) if op == "conv" else 1.0
        axes = axis_maps(node)
        if axes is None:
            return [scale * dy]
        return [scale * mapped(mapped(dy, axes[0], (0, 2), back=True), axes[1], (1, 3), back=True)]
    if op == "linear":
        return [a["n_out"] * _w2(node) * dy]
    if op == "global_avgpool":
        p = src.positions
        return [np.full((src.h, src.w, src.h, src.w), dy / p**2)]
    if op == "flatten":
        if not src.spatial:
            return [dy]
        return [dy * whole(identity(src))]  # each feature its own weights
    if op == "scale":
        return [float(a["value"]) ** 2 * dy]
    if op in ("bias", "identity"):
        return [dy]
    if op == "add":
        return [float(w) ** 2 * dy for w in add_weights(node)]
    return [dy * gates[node.name]]  # relu, leaky_relu


def _sent(g: Any) -> tuple[float, float]:
    """E[Δx²] of a gradient and gk/g, the mean covariance of two different positions over it."""
    m, k = _moments(g)
    return m, 0.0 if k is None or m == 0 else k / m


def _boundary(node: Node, dy: Any) -> float:
    """gk/g of the gradient sent into a map too large to hold, from sums over the held map:
    Σ (S_aᵀ G S_a) = Σ G ⊙ (S_a 1)(S_a 1)ᵀ and tr(S_aᵀ G S_a) = Σ G ⊙ S_a S_aᵀ. A global
    pool hands every position the same gradient; a flatten gives each its own weights."""
    src = node.in_shapes[0]
    if node.op == "global_avgpool":
        return 1.0
    if node.op not in ("conv", "avgpool"):
        return 0.0
    axes = axis_maps(node)
    ones = whole(spatial_map([(1.0, np.ones((src.h, src.h)), np.ones((src.w, src.w)))], axes))
    eye = whole(spatial_map(identity(src), axes))
    total, trace = float(np.sum(dy * ones)), float(np.sum(dy * eye))
    p = src.positions
    return 0.0 if trace == 0 else (total - trace) / (p - 1) / trace
