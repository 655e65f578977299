"""Finite width: the part of a layer's input gradient that is proportional to the input itself.

The wide-limit rules take a gradient as independent of the weights it passed through. At
width n it is not: the gates above a conv or linear layer W open with the offsets W·x̄ of its
outputs. For Gaussian weights Stein's lemma, E[W·f(W)] = E[W²]·E[f′(W)], gives

    Δy = Wᵀ·Δz = (a part independent of W) + B·y,    B(p, q) = E[W²]·(T/P)·Σ_e ∂²f/∂z_{e,p}∂z_{e,q},

per input position p (T/P the taps that reach it; f the loss). B is a random number of each
draw and sample, O(1/√n); b_d = B(p, p) and b_o = Σ_{q≠p} B(p, q). B·y adds (b_d + b_o)²·k to
the shared part gk (y's channels keep their offsets, so B·y is shared by the positions), and to
E[Δy²] b_d²·m + ((b_d + b_o)² − b_d²)·k, or nothing where the network above acts position by
position (``power``). Under a global pool the wide-limit
shared part decays through every ReLU; B does not: through a ReLU and the layer below, the
Hessian's trace h is multiplied by E[W²]·fan-in·Φ̄ = 1 for He-initialised layers. Per position,
with h = (h_d, h_o) the Hessian's diagonal and off-diagonal sums over the channels:

- ReLU y = relu(x): ∂²f/∂x² = δ(x)·Δy + 1[x>0]·∂²f/∂y², so h_d(x) = S + Φ̄·h_d(y) and h_o(x) =
  E[1_p·1_q]·h_o(y). S = Σ_d ψ_d·Δȳ_d (ψ_d the density of x_d at 0, Δȳ the gradient the positions
  share) is a new source, independent of what is above. Its variance is set by Stein's lemma
  applied twice, E[W²·F] − E[W²]·E[F] = E[W²]²·E[F″] for F = Φ(μ/s)², the pair rate of the
  gates as a function of a channel's offset μ: 2·n·E[ψ² + Φ·∂_μψ]·gk·(1 − 1/P) (``psi2``), twice
  what the first-order amplitude Σ ψ·Δȳ alone carries, and small where the offsets dominate
  (k/m → 1: the gates barely move). The gate passes B·y's diagonal whole (1[x>0]·relu(x) =
  relu(x)) where the wide-limit rule gates it: the difference is added.
- conv/linear: h_d and h_o times E[W²]·(T/P)·n_x; scale s: s²; add: wᵢ² to each summand; a
  window or global average pool of K positions spreads ∂²f/∂y² over the pairs of its window
  (h_o gains (K − 1)/K² of h_d); flatten keeps h_d/P.
h is a sum of the sources with coefficients, and E[b²] sums their squares times the sources'
variances. The wide-limit gradients set the sources (a correction to them is of higher order).
B·y itself moves down as h does through scales, adds and pools (B·A·x for y = A·x becomes
Aᵀ·B·A·x) and below a gate follows x where it is open (Φ̄ of b_d, Φ̄² of b_o). Where such
parts reach one node by different readers (a downsampling block's pooled shortcut and its
strided conv, both read by one ReLU above), they are driven by the same sources and add as
amplitudes: the rules have added their powers, so the cross terms are added there (``forks``).
Only where every op is one of those (no normalisation, max pooling or smooth activation), on
maps, and with numbers. Measured (``tests/test_finite_width.py``, ``docs/accuracy.md``): the
power B·y puts along the channels' means is within 20% of the samples on plain 1×1 chains, on
stacks of bottlenecks at 8×8 and across a miniature downsampling block (1.11 ± 0.11, where the
parts' powers alone are 7× short), up to 30% short at the bottom of eight bottlenecks at 4×4;
on ResNet-50's stage 1, below three downsampling blocks, it is about 4× short.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from scalecalc.gaussian import cdf, density, hermite, leaky_moments, leaky_pair
from scalecalc.graph import Network
from scalecalc.state import State, add_weights

SUPPORTED = {"input", "conv", "linear", "relu", "scale", "bias", "identity", "flatten", "add", "avgpool",
             "global_avgpool"}

Sum = dict[str, float]  # coefficients of independent sources


@dataclass(frozen=True)
class Coherent:
    """Where a gradient carries B·y: per node the coefficients (b_d, b_o) of its diagonal and
    off-diagonal parts (B(p, p) and Σ_{q≠p} B(p, q)) over independent sources of these variances.
    ``inputs``, by the conv or linear layer that reads a node (the last such reader), B of
    that node (Stein's part, added to the gradient the layer sends it),
    ``relus`` are ReLU outputs (whose gate passes B's diagonal whole), ``forks`` the nodes
    that B·x parts reach by more than one reader, with the part each brings."""

    inputs: Mapping[str, tuple[Sum, Sum, bool]]  # and whether the network above acts position by position
    relus: Mapping[str, tuple[Sum, Sum, bool, float]]  # likewise, and Φ̄
    variance: Mapping[str, float]
    forks: Mapping[str, tuple[tuple[Sum, Sum], ...]]
    local: Mapping[str, bool]

    def at_input(self, name: str) -> tuple[float, float, bool]:
        """E[b_d²], E[(b_d + b_o)²] at the input of the conv or linear layer ``name``, and
        whether the network above it acts position by position."""
        d, o, local = self.inputs[name]
        return self._var(d), self._var(_plus(d, o)), local

    def at_relu(self, name: str) -> tuple[float, float, float, bool]:
        """E[b_d²], E[(b_d + b_o)²] at a ReLU's output, E[(b_d + Φ̄·b_o)²] at its input, and
        whether the network above acts position by position:
        1[x>0]·relu(x) = relu(x), so the gate passes B's diagonal whole, and the off-diagonal
        part, which reads the neighbours, at the rate Φ̄ it is open."""
        d, o, local, opened = self.relus[name]
        return self._var(d), self._var(_plus(d, o)), self._var(_plus(d, _scaled(o, opened))), local

    def at_fork(self, name: str) -> tuple[float, float, bool] | None:
        """The cross terms of the B·x parts that reach a node by different readers, as
        (E[b_d²], E[(b_d + b_o)²]) of their sum less those of each part (None where only one
        reader brings any): the readers' gradients add, so their parts add as amplitudes, and
        the rules have added only their powers."""
        if name not in self.forks:
            return None
        parts = self.forks[name]
        d: Sum = {}
        t: Sum = {}
        for pd, po in parts:
            d, t = _plus(d, pd), _plus(t, _plus(pd, po))
        return (self._var(d) - sum(self._var(pd) for pd, _ in parts),
                self._var(t) - sum(self._var(_plus(pd, po)) for pd, po in parts), self.local[name])

    def _var(self, s: Sum) -> float:
        return sum(c * c * self.variance[i] for i, c in s.items())


def power(diagonal: float, total: float, y: State, local: bool) -> tuple[float, float]:
    """(E[Δy²], gk) that B·y adds: (b_d + b_o)²·k to the shared part, the off-diagonal part
    reading the offsets that neighbours share, and b_d²·m + ((b_d + b_o)² − b_d²)·k to E[Δy²].
    Where the network above acts position by position (1×1 layers up to the global pool,
    ``local``), E[Δy²] gains nothing: there each position's gradient is that of a plain ReLU
    network, whose E[Δx²] is exact at any width, and B·y only moves power from the positions'
    own gradients to their shared part (Stein's lemma applied twice: E[W²]²·E[∂²_μ Φ] = 0 for
    one gate, where a pair of positions has E[W²]²·E[∂²_μ Φ²] > 0)."""
    m, k = float(y.m), float(y.k)
    return (0.0 if local else diagonal * m) + (total - diagonal) * k, total * k


def applies(net: Network) -> bool:
    return not net.symbols and all(n.op in SUPPORTED for n in net.nodes) and any(
        n.shape.spatial for n in net.nodes)


def coherent(net: Network, fwd: Mapping[str, State], bwd: Mapping[str, State],
             without: frozenset[str] = frozenset()) -> Coherent:
    """B where a gradient carries B·y, from the wide-limit gradients ``bwd``. The Hessian
    sums h = (h_d, h_o) are per position: Σ_e ∂²f/∂z_{e,p}² and Σ_e Σ_{q≠p} ∂²f/∂z_{e,p}∂z_{e,q}.
    The layers ``without`` are taken as if their input gradients went through independent
    weights: no Stein part of their own, and no Hessian passed on below them (their transpose
    meets the Hessian above with weights it does not share: Σ_i E[W′·W] = 0)."""
    h: dict[str, tuple[Sum, Sum]] = {}
    parts: dict[str, dict[str, tuple[Sum, Sum]]] = {}  # B·(a node's own output), by the reader that brings it
    forks: dict[str, tuple[tuple[Sum, Sum], ...]] = {}
    relus: dict[str, tuple[Sum, Sum, bool, float]] = {}
    inputs: dict[str, tuple[Sum, Sum]] = {}
    reader: dict[str, str] = {}
    local = _local(net)
    variance: dict[str, float] = {}
    none: tuple[Sum, Sum] = ({}, {})

    def send(to: str, by: str, part: tuple[Sum, Sum]) -> None:
        if part[0] or part[1]:
            brought = parts.setdefault(to, {})
            brought[by] = _sum2(brought.get(by, none), part)

    for node in reversed(net.nodes[1:]):
        hd, ho = h.pop(node.name, none)
        brought = parts.pop(node.name, {})  # every reader has sent its part
        by = none
        for part in brought.values():
            by = _sum2(by, part)
        if len(brought) > 1:
            forks[node.name] = tuple(brought.values())
        x = node.inputs[0]
        op, a = node.op, node.attrs
        if op in ("conv", "linear"):  # Stein: b = E[W²]·(taps reaching a position)·h; h_x = n_x·b
            assert node.init is not None
            share = 0.0 if node.name in without else \
                float(node.init.m2) * float(a["taps"]) / float(node.in_shapes[0].positions)
            part = (_scaled(hd, share), _scaled(ho, share))
            inputs[x] = _sum2(inputs.get(x, none), part)
            reader.setdefault(x, node.name)
            send(x, "", part)  # the layers reading x: one part, their coefficients already summed
            _into(h, x, (_scaled(part[0], float(a["n_in"])), _scaled(part[1], float(a["n_in"]))))
        elif op == "relu":  # h_x = (S + Φ̄·h_d, E[1_p·1_q]·h_o), S a new source
            opened, pair = gates(fwd[x])
            source = 2 * float(node.shape.channels) * psi2(fwd[x]) * float(bwd[node.name].k) * \
                (1 - 1 / float(node.shape.positions))
            own = {}
            if source > 0:
                variance[node.name] = source
                own = {node.name: 1.0}
            _into(h, x, (_plus(_scaled(hd, opened), own), _scaled(ho, pair)))
            if by != none:
                relus[node.name] = (*by, local[node.name], opened)
            # below the gate B·relu(x) follows x where it is open: Φ̄ of the diagonal, Φ̄² of the rest
            send(x, node.name, (_scaled(by[0], opened), _scaled(by[1], opened * opened)))
        elif op in ("scale", "bias", "identity", "flatten"):
            f = float(a["value"]) ** 2 if op == "scale" else 1.0
            if op == "flatten":  # each feature its own weights: no pairs of positions
                _into(h, x, (_scaled(hd, 1 / float(node.in_shapes[0].positions)), {}))
            else:
                _into(h, x, (_scaled(hd, f), _scaled(ho, f)))
            send(x, node.name, (_scaled(by[0], f), _scaled(by[1], f)))
        elif op == "add":
            for src, w in zip(node.inputs, add_weights(node)):
                _into(h, src, (_scaled(hd, float(w) ** 2), _scaled(ho, float(w) ** 2)))
                send(src, node.name, (_scaled(by[0], float(w) ** 2), _scaled(by[1], float(w) ** 2)))
        elif op in ("avgpool", "global_avgpool"):  # y = window mean: the window's pairs share ∂²f/∂y²
            if op == "avgpool":
                (kh, kw), (sh, sw) = a["kernel"], a["stride"]
                size, uses = float(kh * kw), float(kh * kw) / float(sh * sw)
            else:
                size = uses = float(node.in_shapes[0].positions)
            _into(h, x, _spread(hd, ho, size, uses))
            send(x, node.name, _spread(*by, size, uses))  # B·y becomes Aᵀ·B·A·x, as h does
    return Coherent({reader[x]: (d, o, local[x]) for x, (d, o) in inputs.items()}, relus, variance, forks, local)


def _local(net: Network) -> dict[str, bool]:
    """Per node: whether everything above it acts position by position up to a global pool
    (1×1 convs of stride 1 and what keeps positions apart), so that each position's gradient
    is that of a plain ReLU network of its own input."""
    local = {net.output: True}
    for node in reversed(net.nodes[1:]):
        own = local.get(node.name, True) and (
            node.op in ("relu", "scale", "bias", "identity", "add", "linear", "global_avgpool")
            or (node.op == "conv" and node.attrs["k2"] == 1 and tuple(node.attrs["stride"]) == (1, 1)))
        for src in node.inputs:
            local[src] = local.get(src, True) and own
    return local


def gates(x: State) -> tuple[float, float]:
    """Φ̄ and E[1[x_p>0]·1[x_q>0]] of a ReLU reading x: the rates its exact rule opens at
    (``gaussian.leaky_moments``, ``gaussian.leaky_pair`` for the offsets' Gaussian)."""
    mean, m, k = float(x.mean), float(x.m), float(x.k)
    return leaky_moments(mean, m - mean**2, 0.0)[2], leaky_pair(mean, m - mean**2, k - mean**2, 0.0)[1]


def psi2(x: State) -> float:
    """E[ψ² + Φ·∂_μψ] over the channel offsets μ ~ N(x̄, k − x̄²) of a ReLU's input, ψ(μ) =
    φ(μ/s)/s the density at 0 of a channel of noise variance s² = m − k."""
    m, k, mean = float(x.m), float(x.k), float(x.mean)
    s2 = m - k
    if s2 <= 0:
        return 0.0
    s, spread = math.sqrt(s2), math.sqrt(max(k - mean**2, 0.0))
    nodes, weights = hermite()
    total = 0.0
    for z, w in zip(nodes, weights):
        mu = mean + spread * z
        psi = density(mu / s) / s
        total += w * psi * (psi - cdf(mu / s) * mu / s2)
    return total


def _spread(d: Sum, o: Sum, size: float, uses: float) -> tuple[Sum, Sum]:
    """A pool's window of ``size`` positions, each in ``uses`` windows: ∂²f/∂y² over the pairs of its window."""
    return _scaled(d, uses / size**2), _plus(_scaled(d, uses * (size - 1) / size**2), _scaled(o, uses / size))


def _scaled(s: Sum, f: float) -> Sum:
    return {i: c * f for i, c in s.items()}


def _plus(a: Sum, b: Sum) -> Sum:
    out = dict(a)
    for i, c in b.items():
        out[i] = out.get(i, 0.0) + c
    return out


def _sum2(a: tuple[Sum, Sum], b: tuple[Sum, Sum]) -> tuple[Sum, Sum]:
    return _plus(a[0], b[0]), _plus(a[1], b[1])


def _into(table: dict[str, tuple[Sum, Sum]], name: str, s: tuple[Sum, Sum]) -> None:
    if s[0] or s[1]:
        table[name] = _sum2(table.get(name, ({}, {})), s)
