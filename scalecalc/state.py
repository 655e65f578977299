"""The state of a node in the exact calculus, and the arithmetic its rules share.

Forward, a node carries E[x²] = m, the covariance k of two positions of one channel (of two
samples, for a vector; the calculus takes both equal, since with iid inputs every shared
part comes from the weights), and where it matters the mean every element shares, the
neighbour covariance, a ReLU's Gaussian input, a shortcut sum's law, a concat's groups of
channels and the offsets one position's samples share on a small padded map. Backward the
same for the gradient, with the gates a ReLU below applies to parts of it, the coupling a
train-mode batchnorm puts between the samples of a batch and the spread of its channels'
variances that the layer below it divides out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from scalecalc import expr
from scalecalc.graph import Node

M = Any


@dataclass(frozen=True)
class State:
    m: M  # E[x²]
    k: M  # E[x_p·x_q], p ≠ q, same channel
    # forward: E[x_p·x_q] for neighbouring positions where it differs from k (small padded maps)
    near: M | None = None
    # forward, at a (leaky) ReLU's output: its slope and its Gaussian input, for max pooling
    rectified: tuple[M, State] | None = None
    # backward, into a (leaky) ReLU's output: parts (g, gk, E[f'²], E[f'_p·f'_q]) of the gradient
    # that reach positions where the ReLU is open more often than on average — the window
    # maxima a max pool routes to, or where an identity shortcut feeds an open ReLU
    gates: tuple[tuple[M, M, M, M], ...] = ()
    # backward, at an add's output read by a (leaky) ReLU: that ReLU's slope
    opened: M | None = None
    # backward, there: E[Δz² | z]/E[Δz²] on the grid of the sum's law (``gaussian.chain_weight``),
    # and into a ReLU output carried by a shortcut, the parts of ``gates`` that came through it:
    # (m, the sum's law, its ω), which make the ReLU's own ω
    weight: tuple[float, ...] | None = None
    chain: tuple[tuple[M, Any, tuple[float, ...]], ...] = ()
    # backward, at the input of a batchnorm reading a conv or linear layer: the part of
    # E[1/σ_c²]·E[σ_c²] that comes from the layer's own weights, ν/(ν−2). The layer divides it
    # out of what it sends on: a channel's large weights and its large variance go together,
    # so E[W²/σ_c²] = E[W²]·E[1/σ_c²]·(ν−2)/ν (exact for ν exchangeable terms)
    spread: M | None = None
    # backward, likewise: the part of that spread the covariance of the layer's input channels
    # makes (ρ, ``channels``); the layer sends it on, through activations, to the layer whose
    # weights made the channels covary, which divides it out as its own
    spread_in: M | None = None
    # forward, at an add's output: α·f(u) + w, a (leaky) ReLU output f(u) of slope a carried
    # by an identity shortcut plus Gaussian branches w: (α, a, u, E[w²], E[w_p·w_q], E[w̄_p²])
    law: tuple[M, M, State, M, M, M] | None = None
    # forward: E[x], the mean every element shares (a ReLU's output and what adds, scales or
    # pools it without random weights); m and k include its square
    mean: M = 0
    # backward: how a train-mode batchnorm below couples the samples of a batch, (B−1)·P times
    # the covariance of two samples' gradients (same channel); the batch sum has
    # E[(Σ_{b,p} Δ)²]/(B·P) = m + (P−1)·k + batch, which a batchnorm makes 0
    batch: M = 0
    # both passes, after a concat: (channels, state) of each group of channels that came in
    # separately; m, k and mean are then their channel-weighted averages
    parts: tuple[tuple[int, State], ...] | None = None
    # forward, at a conv/linear output (and multiples of it): ν = n·k² (n·T²/S with padding),
    # the weights feeding one unit. A channel's variance over the batch is then a sum of ν
    # weighted squares, which fluctuates across channels: E[1/σ_c²] = ν/(ν−2)·1/E[σ_c²] for iid inputs
    dof: M | None = None
    # forward, on a map: E[x̄_p²], x̄_p the mean over samples at position p, averaged over
    # positions, where it is not k: a padded conv's border outputs read fewer taps of the
    # offset its input's samples share, and a batchnorm keeps how that varies over positions
    shared: M | None = None
    # forward, at a conv output: (α, β, V), its sample-shared covariance α·N + β·D over
    # positions (N the taps real for both, D = diag N) and the variance V over channels of
    # Q_c = (1/P)·Σ_p (x̄_p − x̄)², the offsets a batchnorm reading it keeps (``normalise``)
    offsets: tuple[M, M, M] | None = None
    # backward, sent by a (leaky) ReLU of a centred input: E[(Δx·x)_p·(Δx·x)_q] for two
    # positions of one sample. Δx·x = Δy·y exactly, so it is gk·k of the ReLU's output, and a
    # gradient shared by the positions (a pool above) makes it large: a batchnorm below, which
    # takes the gradient's projection on ŷ out, then removes (P−1)/(B·P) of it
    product: M | None = None
    # forward: e = n·tr(Σ²)/tr(Σ)² − 1 of the channel covariance Σ, 0 for independent channels;
    # a conv or linear layer of ν inputs makes it about n/ν (``channels``)
    cross: M | None = None
    # forward, on a map: e(d) = n·‖Σ(d)‖²/tr(Σ)² of the covariance Σ(d) of the channels at p with
    # those at p + d, 0 < |d| ≤ 2 where it is not 0: the overlapping windows of a conv of few
    # inputs make it large (``channels.near``)
    cross_near: tuple[tuple[tuple[int, int], float], ...] | None = None
    # forward, at a conv or linear output (and multiples of it): ρ of its input patches, which
    # makes a batchnorm's σ_c² spread as a χ² of ν/ρ, not ν, terms
    rank: M = 1


ExactForward = Callable[[Node, Sequence[State]], State]
ExactBackward = Callable[[Node, Sequence[State], State], Sequence[State]]  # (g, gk) states


@dataclass(frozen=True)
class ExactRule:
    forward: ExactForward
    backward: ExactBackward
    note: str = ""


def despread(dy: State) -> tuple[State, M | None]:
    """A weighted layer's output gradient with the batchnorm's spread of its own weights
    divided out (``State.spread``), for the gradient it sends to its input; and the part of
    the spread its input's covarying channels made (``State.spread_in``), which it sends on to
    the layer that made them. A layer reached by that part alone divides it out."""
    s, passed = dy.spread, dy.spread_in
    if s is None:
        s, passed = passed, None
    if s is None:
        return dy, None
    return replace(dy, m=dy.m / s, k=dy.k / s, batch=dy.batch / s, spread=None, spread_in=None), passed


def ratio(a: M, b: M) -> M:
    return 0 if b == 0 else a / b


def scaled(x: State, factor: M, rectified: bool = True) -> State:
    """x with every second moment multiplied by ``factor``; a positive multiple of a
    (leaky) ReLU's output is that ReLU of the same multiple of its input."""
    near = None if x.near is None else factor * x.near
    pre = x.rectified if rectified and x.rectified is not None else None
    return State(factor * x.m, factor * x.k, near=near,
                 rectified=None if pre is None else (pre[0], scaled(pre[1], factor)),
                 mean=0 if is_zero(x.mean) else x.mean * root(factor), dof=x.dof, cross=x.cross, rank=x.rank,
                 cross_near=x.cross_near,
                 shared=None if x.shared is None else factor * x.shared,
                 offsets=_offsets_scaled(x.offsets, factor),
                 parts=None if x.parts is None else tuple((n, scaled(p, factor, rectified)) for n, p in x.parts))


def bordered(x: State, factor: M) -> State:
    """A window op's output with its border correction (``assumptions.border_factors``): the
    position average of m and k moves; the neighbour covariance, an interior quantity, does not."""
    parts = None if x.parts is None else tuple((n, bordered(p, factor)) for n, p in x.parts)
    gates = tuple((factor * m, factor * k, gm, gk) for m, k, gm, gk in x.gates)
    chain = tuple((factor * m, law, w) for m, law, w in x.chain)
    return replace(x, m=factor * x.m, k=factor * x.k, parts=parts, gates=gates, chain=chain,
                   shared=None if x.shared is None else factor * x.shared,
                   offsets=_offsets_scaled(x.offsets, factor))


def _offsets_scaled(offsets: tuple[M, M, M] | None, factor: M) -> tuple[M, M, M] | None:
    return None if offsets is None else (factor * offsets[0], factor * offsets[1], factor**2 * offsets[2])


def is_zero(value: M) -> bool:
    return not expr.is_symbolic(value) and value == 0


def root(value: M) -> M:
    return expr.sqrt(value) if is_sympy(value) else math.sqrt(max(value, 0.0))


def is_sympy(value: M) -> bool:
    return type(value).__module__.startswith("sympy")


def pi_of(value: M) -> M:
    if is_sympy(value):
        import sympy

        return sympy.pi
    return math.pi


def trig(theta: M) -> tuple[M, M, M]:  # sin, cos and π, exact when theta is sympy
    if is_sympy(theta):
        import sympy

        return sympy.sin(theta), sympy.cos(theta), sympy.pi
    return math.sin(theta), math.cos(theta), math.pi


def has_symbols(x: State) -> bool:
    return expr.is_symbolic(x.m) or expr.is_symbolic(x.k) or expr.is_symbolic(x.mean)


def joined(parts: Sequence[tuple[int, State]]) -> State:
    """One state for groups of channels: channel-weighted averages, the groups kept."""
    if len(parts) == 1:
        return parts[0][1]
    total = sum(n for n, _ in parts)
    return State(sum(n * x.m for n, x in parts) / total, sum(n * x.k for n, x in parts) / total,
                 mean=sum(n * x.mean for n, x in parts) / total, batch=sum(n * x.batch for n, x in parts) / total,
                 parts=tuple(parts))


def groups(x: State, channels: int) -> tuple[tuple[int, State], ...]:
    return x.parts if x.parts is not None else ((channels, x),)


def added(a: State, b: State) -> State:
    """The gradient a node gets from two readers: their sum, group by group."""
    if a.parts is None and b.parts is None:
        return State(a.m + b.m, a.k + b.k, batch=a.batch + b.batch, gates=a.gates + b.gates, chain=a.chain + b.chain)
    groups_a = a.parts or tuple((n, a) for n, _ in b.parts or ())
    groups_b = b.parts or tuple((n, b) for n, _ in groups_a)
    return joined([(n, added(x, y)) for (n, x), (_, y) in zip(groups_a, groups_b)])


def add_weights(node: Node) -> Sequence[M]:
    """The weights aᵢ of an ``add``'s summands."""
    return node.attrs.get("weights") or (1,) * len(node.inputs)
