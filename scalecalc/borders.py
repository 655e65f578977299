"""Border factors: how a padded window op's moments differ from their position averages.

A padded window gives border outputs fewer taps, so moments vary across positions, and the
next window op then sums more of the interior than the average. The rules count taps as if
every position carried the mean moment; here per-position profiles of the moments (mean 1)
are pushed through every window op exactly, and each op gets the ratio of the exact position
average to the rule's. A profile is a sum of separable terms c·h⊗w (per-axis vectors), which
a window op maps term by term, one axis at a time. Where several inputs or consumers meet
the profiles are averaged with equal weight (an approximation).

A batchnorm reading a conv keeps the offsets that vary over positions (``normalise``): with
the conv's sample-shared covariance α·N + β·D (N(p, q) the taps real for both outputs, D its
diagonal), position q of the output has E[y_q²]·σ² = m·τ(q) − (2/P)·(α·(N1)_q + β·D_q) +
1ᵀ(αN + βD)1/P² for an input uniform over positions, τ = D/mean(D) the conv's profile then:
BN removes x̄ = (1/P)·Σ_p x̄_p, which covaries most with the positions that read the most taps.
That change from τ is added to the conv's own profile (a first-order approximation where the
input is not uniform). Under a 3×3 conv it moves the E[x²] of the next conv by −1.7% on a 4×4
map and −0.6% on 32×32 (``offsets``, from the forward states).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from scalecalc.graph import Network, Node
from scalecalc.shapes import common_taps

WINDOWS = frozenset({"conv", "avgpool", "maxpool"})
Term = tuple[float, tuple[float, ...], tuple[float, ...]]
Profile = tuple[Term, ...]  # Σ c·h⊗w, relative moments of the positions, mean 1
RANK = 4  # separable terms a profile keeps


def border_factors(net: Network, offsets: Mapping[str, tuple[float, float, float]] | None = None,
                   ) -> dict[str, tuple[float, float, float]]:
    """Per window op: exact/position-averaged ratio of its forward moment, its backward
    moment and its weight-gradient moment. ``offsets`` gives, per batchnorm reading a conv,
    (m, α, β)/σ² of its input (``normalise.profile_weights``)."""
    offsets = offsets or {}
    fwd: dict[str, Profile] = {}
    seen_in: dict[str, Profile] = {}
    factors: dict[str, list[float]] = {}
    for node in net.nodes:
        if not node.shape.spatial:
            continue
        ins = [fwd[s] for s in node.inputs if s in fwd]
        if node.op in WINDOWS:
            seen_in[node.name] = ins[0] if ins else _flat(net.node(node.inputs[0]))
            fwd[node.name], factor = _through(node, seen_in[node.name], False)
            factors[node.name] = [factor, 1.0, 1.0]
        elif node.name in offsets and ins:
            fwd[node.name] = _kept_offsets(net.node(node.inputs[0]), ins[0], offsets[node.name])
        else:
            fwd[node.name] = _mix(ins) if ins else _flat(node)
    grads: dict[str, list[Profile]] = {}
    for node in reversed(net.nodes[1:]):
        if not node.shape.spatial:
            continue
        mine = grads.get(node.name)
        prof = _mix(mine) if mine else _flat(node)
        sent = prof
        if node.op in WINDOWS:
            sent, factors[node.name][1] = _through(node, prof, True)
            factors[node.name][2] = sum(
                cg * ci * math.prod(sum(g[d][o] * x[d][i] for o, i in _pairs(node, d)) / len(_pairs(node, d))
                                    for d in (0, 1))
                for cg, *g in prof for ci, *x in seen_in[node.name])
        for src in node.inputs:
            if net.node(src).shape.spatial:
                grads.setdefault(src, []).append(sent)
    return {name: (f, b, w) for name, (f, b, w) in factors.items()}


def _flat(node: Node) -> Profile:
    return ((1.0, (1.0,) * int(node.shape.h), (1.0,) * int(node.shape.w)),)


def _pairs(node: Node, d: int) -> list[tuple[int, int]]:
    """(output, input) index pairs along axis d that read real input."""
    a, x = node.attrs, node.in_shapes[0]
    k, s, p = int(a["kernel"][d]), int(a["stride"][d]), int(a["padding"][d])
    size, out = int((x.h, x.w)[d]), int((node.shape.h, node.shape.w)[d])
    return [(o, s * o - p + t) for o in range(out) for t in range(k) if 0 <= s * o - p + t < size]


def _through(node: Node, prof: Profile, backward: bool) -> tuple[Profile, float]:
    """Push a profile through a window op, forward or backward; return the new profile and
    the ratio of the exact position average to the rule's."""
    x = node.in_shapes[0]
    sizes = ((int(x.h), int(node.shape.h)), (int(x.w), int(node.shape.w)))
    pairs = [_pairs(node, d) for d in (0, 1)]
    terms, factor = [], 0.0
    for c, *axes in prof:
        pushed = []
        for d in (0, 1):
            result = [0.0] * sizes[d][0 if backward else 1]
            for o, i in pairs[d]:
                if backward:
                    result[i] += axes[d][o]
                else:
                    result[o] += axes[d][i]
            pushed.append(tuple(result))
        terms.append((c, pushed[0], pushed[1]))
        factor += c * math.prod(sum(pushed[d]) / len(pairs[d]) for d in (0, 1))
    return _normalised(terms), factor


def _normalised(terms: list[Term]) -> Profile:
    """Terms scaled to a mean of 1; more than ``RANK`` of them are replaced by the leading
    singular terms of their sum (a 2-D profile is an h×w matrix), so the count stays bounded."""
    if len(terms) > RANK:
        import numpy as np  # numbers only, like the spatial kernel

        # Σ c·h⊗w = H·Wᵀ: the SVD of the small core R_H·R_Wᵀ of their QR factors
        q_h, r_h = np.linalg.qr(np.array([h for _, h, _ in terms]).T)
        q_w, r_w = np.linalg.qr(np.array([[c * v for v in w] for c, _, w in terms]).T)
        u, sv, vt = np.linalg.svd(r_h @ r_w.T)
        keep = [i for i in range(min(RANK, len(sv))) if sv[i] > 1e-12 * sv[0]]
        terms = [(1.0, tuple((sv[i] * (q_h @ u[:, i])).tolist()), tuple((q_w @ vt[i]).tolist())) for i in keep]
    mean = sum(c * sum(h) / len(h) * sum(w) / len(w) for c, h, w in terms)
    if mean == 0:
        return tuple(terms)
    return tuple((c / mean, h, w) for c, h, w in terms)


def _mix(profiles: list[Profile]) -> Profile:
    if len(profiles) == 1:
        return profiles[0]
    return _normalised([(c / len(profiles), h, w) for prof in profiles for c, h, w in prof])


def _kept_offsets(conv: Node, prof: Profile, weights: tuple[float, float, float]) -> Profile:
    """The profile of a batchnorm's output: the conv's profile π plus the change the kept
    offsets make to it for an input uniform over positions, (m·τ − (2/P)·(α·N1 + β·D))/σ² + c − τ."""
    m, alpha, beta = weights
    a, x = conv.attrs, conv.in_shapes[0]
    (_, taps_h, n1_h), (_, taps_w, n1_w) = (
        common_taps(int((x.h, x.w)[d]), int(a["kernel"][d]), int(a["stride"][d]), int(a["padding"][d]),
                    int((conv.shape.h, conv.shape.w)[d])) for d in (0, 1))
    positions = len(taps_h) * len(taps_w)
    mean_taps = sum(taps_h) * sum(taps_w) / positions
    # the change from the profile without offsets, exact for an input uniform over positions:
    # there the conv's profile is its taps, D/mean(D); the change has mean 0
    change: list[Term] = [((m - 1) / mean_taps - 2 * beta / positions, tuple(map(float, taps_h)),
                           tuple(map(float, taps_w))),
                          (-2 * alpha / positions, tuple(map(float, n1_h)), tuple(map(float, n1_w)))]
    mean = sum(c * sum(h) / len(h) * sum(w) / len(w) for c, h, w in change)
    change.append((-mean, (1.0,) * len(taps_h), (1.0,) * len(taps_w)))
    return _normalised(list(prof) + change)
