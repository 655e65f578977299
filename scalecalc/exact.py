"""The exact calculus: second moments that stay right where the paper's assumptions fail.

After a ReLU every element has a mean. A conv with fixed weights turns that mean into a
per-channel offset shared by all positions of the channel — random across channels and
weight draws, so still symmetric, but correlated across positions — and average pooling
keeps it in full. So besides E[x²] = m each node carries k = E[x_p·x_q], the covariance of
two different positions of one channel; in the backward pass E[Δx²] = g and gk likewise.

The pair (m, k) moves through the ops as follows (derivations in each rule's docstring);
the m part is the paper rule wherever the shared part does not change it. Positions of a
conv output are otherwise uncorrelated, because each applies different weights to shared
inputs. The activations are in ``activations``, the state and its arithmetic in ``state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from scalecalc import expr
from scalecalc.activations import ACTIVATIONS, law_key, shortcut_law, shortcut_rate, sum_moments
from scalecalc.gaussian import max_m2, max_mean, rectified_max
from scalecalc.graph import Node
from scalecalc.normalise import NORMALISE, conv_offsets
from scalecalc.rules import RULES
from scalecalc.state import (
    ExactRule,
    M,
    State,
    add_weights,
    despread,
    groups,
    is_zero,
    joined,
    pi_of,
    ratio,
    root,
    scaled,
)

EXACT: dict[str, ExactRule] = {}


def _paper(op: str) -> ExactRule:
    """Ops that scale every position alike: m and k (g and gk) move by the same factor."""
    rule = RULES[op]

    def forward(node: Node, xs: Sequence[State]) -> State:
        m = rule.forward(node, [x.m for x in xs])
        positive = op != "scale" or expr.is_symbolic(node.attrs["value"]) or node.attrs["value"] > 0
        out = scaled(xs[0], ratio(m, xs[0].m), rectified=positive and op != "flatten")
        return replace(out, mean=xs[0].mean * node.attrs["value"]) if op == "scale" else out  # the sign of a scale

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        gs = rule.backward(node, [x.m for x in xs], dy.m)
        return tuple(State(g, ratio(g, dy.m) * dy.k, batch=ratio(g, dy.m) * dy.batch if op != "flatten" else 0)
                     for g in gs)

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
    factor = ratio(m, x.m)
    k = factor * x.k * _shared_taps(node, node.shape.positions)
    shared = factor * (x.k if x.shared is None else x.shared)  # one position: every tap it reads
    offsets = None if node.shape.positions == 1 else conv_offsets(node, x, m, factor)
    return State(m, k, near=factor * source * node.attrs["near"], dof=_dof(node),
                 shared=None if offsets is None else shared, offsets=offsets)


def _dof(node: Node) -> M:
    """ν of a channel's variance over positions, Σ_t f_t·Σ_c W_ct²·E[x²], f_t the share of
    outputs whose tap t is real: a weighted χ² whose variance is that of χ²_ν/ν with
    ν = n·(Σf)²/Σf² = n·T²/S (T, S as in ``shapes._tap_pairs``); n·k² without padding.
    """
    return node.attrs["n_in"] * node.attrs["taps"] ** 2 / node.attrs["pairs"]


def _conv_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """g as in Eq. 10 (exact taps);  gk' = gk·(g'/g)·shared (input pairs, ``_shared_taps``)."""
    dy, passed = despread(dy)
    g = RULES["conv"].backward(node, [xs[0].m], dy.m)[0]
    gk = ratio(g, dy.m) * dy.k * _shared_taps(node, node.in_shapes[0].positions)
    return (_summed(node, State(g, gk, spread_in=passed), dy, ratio(g, dy.m)),)


def _summed(node: Node, dx: State, dy: State, factor: M) -> State:
    """dx with the batch coupling of dy carried through a linear map that scales the batch sum:
    E[(ΣΔx)²] = factor·E[(ΣΔy)²] (Σ over batch and positions of one channel).

    A conv gives Σ_p Δx_p = Σ_t Wₜᵀ·Σ_p Δy_p when every tap of every output reads a real input,
    so the batch sum scales like g (exact without padding); a pool hands each output's gradient
    to its window, so the sum is kept. The coupling is what is left of the sum's variance
    once the within-sample terms m + (P−1)·k are taken out.
    """
    if is_zero(dy.batch):
        return dx
    p_in, p_out = node.in_shapes[0].positions, node.shape.positions
    total = factor * (dy.m + (p_out - 1) * dy.k + dy.batch) * p_out / p_in
    return replace(dx, batch=total - dx.m - (p_in - 1) * dx.k)


def _near(x: State) -> M:
    return x.k if x.near is None else x.near


EXACT["conv"] = ExactRule(_conv_forward, _conv_backward)


def _vector_out(op: str) -> ExactRule:
    """Linear layers. A vector has no positions: its k is the covariance of two samples, which
    the shared weights pass on like E[x²] (the calculus takes it equal to the covariance of two
    positions in a map: both come from the weights)."""
    rule = RULES[op]

    def forward(node: Node, xs: Sequence[State]) -> State:
        m = rule.forward(node, [xs[0].m])
        return State(m, ratio(m, xs[0].m) * xs[0].k, dof=node.attrs["n_in"])

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        dy, passed = despread(dy)
        g = rule.backward(node, [xs[0].m], dy.m)[0]
        return (State(g, 0, batch=ratio(g, dy.m) * dy.batch, spread_in=passed),)

    return ExactRule(forward, backward)


EXACT["linear"] = _vector_out("linear")


def _dropout_forward(node: Node, xs: Sequence[State]) -> State:
    """Masks are independent across positions: m/(1−p), but k is unchanged."""
    p = node.attrs["p"]
    return State(xs[0].m / (1 - p), xs[0].k, mean=xs[0].mean)


EXACT["dropout"] = ExactRule(_dropout_forward,
                             lambda node, xs, dy: (State(dy.m / (1 - node.attrs["p"]), dy.k, batch=dy.batch),))


def _add_forward(node: Node, xs: Sequence[State]) -> State:
    """m' = Σ aᵢ²mᵢ + Σ_{i≠j} aᵢaⱼμᵢμⱼ (k' likewise), μ' = Σ aᵢμᵢ: the fluctuations of the
    branches are uncorrelated, their means are not random and add up. Where one summand is a
    ReLU output and the rest Gaussian, the sum's law is kept for the ReLU that may read it."""
    weights = add_weights(node)
    mean = sum(a * x.mean for a, x in zip(weights, xs))
    cross = mean**2 - sum((a * x.mean) ** 2 for a, x in zip(weights, xs))
    law = shortcut_law(node, xs)
    shared = None if all(x.shared is None for x in xs) else \
        sum(a**2 * (x.k if x.shared is None else x.shared) for a, x in zip(weights, xs)) + cross
    return State(sum(a**2 * x.m for a, x in zip(weights, xs)) + cross,
                 sum(a**2 * x.k for a, x in zip(weights, xs)) + cross, mean=mean,
                 law=None if law is None else law[1], shared=shared)


def _add_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """Each summand gets aᵢ²·g. Where a ReLU g reads the sum and one summand is a ReLU output
    f(u), the two gates are correlated (u > 0 makes z > 0 likelier): that summand's gradient
    reaches f at positions where f is open with E[f'²g'²]/E[g'²], not E[f'²]."""
    out = [State(a**2 * dy.m, a**2 * dy.k, batch=a**2 * dy.batch) for a in add_weights(node)]
    found = shortcut_law(node, xs)
    if found is not None and dy.opened is not None:
        i, law = found
        r = sum_moments(law, dy.opened)
        rate = shortcut_rate(law, r, dy.opened, dy.weight)
        chain = () if dy.weight is None else ((out[i].m, law_key(law), dy.weight),)
        out[i] = replace(out[i], gates=((out[i].m, out[i].k, rate, r.joint_pair / r.open_pair),), chain=chain)
    return tuple(out)


EXACT["add"] = ExactRule(_add_forward, _add_backward)


def _concat_forward(node: Node, xs: Sequence[State]) -> State:
    """Each input's channels stay a group of their own: what reads them channel by channel
    (a batchnorm, a ReLU) sees each group's moments, what mixes them (a conv) their average."""
    return joined([g for x, s in zip(xs, node.in_shapes) for g in groups(x, s.channels)])


def _concat_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """Each input gets its own groups' gradient (all the same where the gradient is uniform)."""
    if dy.parts is None:
        return (dy,) * len(node.inputs)
    out, start = [], 0
    for x, s in zip(xs, node.in_shapes):
        count = len(groups(x, s.channels))
        out.append(joined(dy.parts[start:start + count]))
        start += count
    return tuple(out)


EXACT["concat"] = ExactRule(_concat_forward, _concat_backward)


# --- pooling -----------------------------------------------------------------------------


def _avgpool_forward(node: Node, xs: Sequence[State]) -> State:
    """m' = (τ·m + τ(τ−1)·k)/K²,  k' = τ²·k/K²   (τ = T/ρ'² mean real taps, K = window size).

    Each output averages τ real inputs (torch divides by K), τ terms of m and τ(τ−1)
    shared pairs; two outputs share the channel offset through all τ² pairs. A mean every
    element shares (a ReLU's) stays: μ' = τ·μ/K. A channel's variance stays a quadratic form
    of the same weights, so a batchnorm reading the pool sees the conv's ν and ρ.
    """
    a, x, p = node.attrs, xs[0], node.shape.positions
    t, big_k = a["taps"], a["k2"]
    return State(x.m * t / (p * big_k**2) + x.k * t * (t - p) / (p * big_k) ** 2, x.k * t**2 / (p * big_k) ** 2,
                 mean=x.mean * t / (p * big_k),  # a mean is averaged with the padding's zeros
                 dof=x.dof, rank=x.rank)


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
    # each window hands its gradient on whole; a batchnorm's spread of the conv below goes with it
    return (_summed(node, State(g, shared, spread=dy.spread), dy, 1),)


EXACT["avgpool"] = ExactRule(_avgpool_forward, _avgpool_backward)


def _global_forward(node: Node, xs: Sequence[State]) -> State:
    """m' = (m + (P−1)·k)/P over the P = ρ² positions; k' = k, two samples' averages share the
    channel offset."""
    p, x = node.in_shapes[0].positions, xs[0]
    return State((x.m + (p - 1) * x.k) / p, x.k, mean=x.mean)


EXACT["global_avgpool"] = ExactRule(
    _global_forward,
    lambda node, xs, dy: (_summed(node, State(dy.m / node.in_shapes[0].positions ** 2,
                                              dy.m / node.in_shapes[0].positions ** 2), dy, 1),),
)


def _window(node: Node) -> int:
    return round(float(node.attrs["taps"] / node.shape.positions))


def _maxpool_forward(node: Node, xs: Sequence[State]) -> State:
    """max = b + max(z): m' = k + (m−k)·μ₂(K),  k' = k + (m−k)·μ₁(K)²   (μ: moments of a max of K normals).

    After a (leaky) ReLU f, which is increasing, max f(xᵢ) = f(max xᵢ) = f(b + max z): the
    moments come from the ReLU's Gaussian input (``rectified_max``), not from its output.
    """
    x = xs[0]
    if rectified := _rectified(x):
        a, pre = rectified
        f2, f_pair, _, _, mean = rectified_max(_window(node), float(ratio(_near(pre), pre.m)), float(a),
                                               float(ratio(pre.k, pre.m)))
        return State(pre.m * f2, pre.m * f_pair, mean=expr.sqrt(pre.m) * mean)
    # max(μ + b + zᵢ) = μ + b + max z: the mean adds 2μ·E[max z] to both moments
    mu1, spread = max_mean(_window(node)), root(x.m - x.k)
    lift = 2 * x.mean * spread * mu1
    return State(x.k + (x.m - x.k) * max_m2(_window(node)) + lift, x.k + (x.m - x.k) * mu1**2 + lift,
                 mean=x.mean + spread * mu1)


def _rectified(x: State) -> tuple[M, State] | None:
    """(slope, input) where max pooling reads a (leaky) ReLU of a centred Gaussian with numbers,
    increasing (slope ≥ 0), so that the maximum of its outputs is its output of the maximum."""
    if (x.rectified is not None and is_zero(x.rectified[1].mean) and not _symbolic_ratio(x.rectified[1])
            and not expr.is_symbolic(x.rectified[0]) and x.rectified[0] >= 0):
        return x.rectified
    return None


def _maxpool_backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
    """Each window routes its gradient to its arg-max: g' = g·ρ'²/ρ², pairs across windows ×1/K²;
    after a (leaky) ReLU, with the gate that ReLU applies at window maxima."""
    window, x = _window(node), xs[0]
    share = node.shape.positions / node.in_shapes[0].positions
    gates: tuple[tuple[M, M, M, M], ...] = ()
    if rectified := _rectified(x):
        a, pre = rectified
        gate = rectified_max(window, float(ratio(_near(pre), pre.m)), float(a), float(ratio(pre.k, pre.m)))[2:4]
        gates = ((dy.m * share, dy.k * share / window, *gate),)
    # each window's gradient goes to one input, so the sum over positions is kept
    return (_summed(node, State(dy.m * share, dy.k * share / window, gates=gates), dy, 1),)


def _symbolic_ratio(x: State) -> bool:
    return expr.is_symbolic(ratio(x.k, x.m)) or expr.is_symbolic(ratio(_near(x), x.m))


EXACT["maxpool"] = ExactRule(_maxpool_forward, _maxpool_backward, "maxpool: Gaussian order statistics (approximate)")


EXACT.update(NORMALISE)
EXACT.update(ACTIVATIONS)


def _per_group(rule: ExactRule) -> ExactRule:
    """A channel-wise op applied to each group of channels a concat brought together."""
    def forward(node: Node, xs: Sequence[State]) -> State:
        x = xs[0]
        if x.parts is None:
            return rule.forward(node, xs)
        return joined([(n, rule.forward(node, [p])) for n, p in x.parts])

    def backward(node: Node, xs: Sequence[State], dy: State) -> Sequence[State]:
        x = xs[0]
        if x.parts is None:
            return rule.backward(node, xs, dy)
        grads = dy.parts or tuple((n, dy) for n, _ in x.parts)
        return (joined([(n, rule.backward(node, [p], g)[0]) for (n, p), (_, g) in zip(x.parts, grads)]),)

    return ExactRule(forward, backward, rule.note)


for _op in ("relu", "leaky_relu", "batchnorm", "scale", "bias", "identity", "dropout", "tanh", "sigmoid", "gelu",
            "avgpool", "maxpool", "global_avgpool"):
    EXACT[_op] = _per_group(EXACT[_op])


def bias_grad_m2(node: Node, dy: State) -> M:
    """Per-sample E[Δb²] of a per-channel bias: Σ over the P output positions of one channel's
    gradient, P·g + P(P−1)·gk — the pair terms matter under a pooling layer (Eq. 7 extended) —
    plus the batch coupling: the batch gradient's mean square over the batch size."""
    p = node.shape.positions
    return dy.m * p + dy.k * p * (p - 1) + dy.batch * p  # 0 right above a batchnorm


def weight_grad_m2(node: Node, x: State, y: State, dy: State, mask: tuple[M, State] | None = None) -> M:
    """E[ΔW²] per weight of a conv/linear layer's batch gradient over the batch size (the
    per-sample E[ΔW²] where samples are independent). With τ = T/k² uses of each tap,
    π = (S − T)/k² ordered pairs of positions using it, and σ(h) = π·gk_h + S·batch_h/(k²P) the
    weight of the shared parts of a gradient h over pairs of positions and of samples:

        τ·m·g  +  k·σ(Δy)  +  (E[x̄_p²] − k)·τ·batch_Δy/P  +  σ(h)·E[W²]·m_own²·(1−a)²/(2π·E[y²]).

    The first term is Thm 1. The second pairs the shared parts of input and gradient: the
    input's k is shared by positions and (it comes from the weights) by samples alike; a
    batchnorm below makes σ(Δy) negative, so the shared input drops out of Σ_b,p x·Δy; two
    samples at one position share more than k where a batchnorm kept offsets (``same_position``).
    The last appears when the layer feeds a (leaky) ReLU whose output gradient h has a shared
    part: the unit's mask 1[y > 0] is correlated with each input,
    E[x·1[y>0]] = W·m·(1−a)/√(2π·E[y²]) for a Gaussian pre-activation, so the products of
    two positions no longer average out. ``mask`` is (a, gradient state at the ReLU output).
    """
    t, k2 = node.attrs["taps"], node.attrs["k2"]
    return x.m * dy.m * t / k2 + x.k * _pair_weight(node, dy) + same_position(node, x, dy) + \
        mask_grad_m2(node, x, y, mask)


def _pair_weight(node: Node, h: State) -> M:
    """σ(h): a tap used τ_t times has τ_t² pairs of uses; S = Σ_t τ_t²."""
    k2, p = node.attrs["k2"], node.shape.positions
    return h.k * (node.attrs["pairs"] - node.attrs["taps"]) / k2 + h.batch * node.attrs["pairs"] / (k2 * p)


def same_position(node: Node, x: State, dy: State) -> M:
    """Of the S·(B−1) pairs of uses of a tap by two samples, T/k² per weight sit at one
    position, where the samples share the input's E[x̄_p²] (``State.shared``: the offsets a
    batchnorm kept over positions), not k: (E[x̄_p²] − k)·T·batch/(k²·P). Under a gradient that
    a pool shares over positions the batch coupling is large (−(P−1)·gk), and so is this: 4.5%
    of E[ΔW²] for a conv between two batchnorms on 4×4 maps (``batchnorm_offsets_pooled``)."""
    if x.shared is None:
        return 0
    return (x.shared - x.k) * dy.batch * node.attrs["taps"] / (node.attrs["k2"] * node.shape.positions)


def mask_grad_m2(node: Node, x: State, y: State, mask: tuple[M, State] | None) -> M:
    """The last term of ``weight_grad_m2``: a (leaky) ReLU mask above the layer correlated with
    its inputs, E[x·1[y>0]] = W·m·(1−a)/√(2π·E[y²]), paired over positions by the shared part of
    the ReLU's output gradient h. It is of order 1/(n·k²), the fan-in, beside the pair term."""
    if mask is None or node.init is None:
        return 0
    a, h = mask
    own = x.m - x.k  # the position-specific part; the shared part is in the pair term
    return _pair_weight(node, h) * node.init.m2 * own**2 * (1 - a) ** 2 / (2 * pi_of(x.m) * y.m)
