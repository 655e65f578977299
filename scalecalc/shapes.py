"""Shape inference and the exact tap count of sliding windows.

For a window op (conv, pooling) with kernel k, stride s and zero padding p over an input
of size H, the output has H' = ⌊(H + 2p − k)/s⌋ + 1 positions. Border windows overlap the
padding, so the number of (output position, kernel tap) pairs that touch real input is

    T = Σ_{a=0}^{k−1} #{ i ∈ [0, H') : 0 ≤ s·i − p + a < H },

which is k·H' only without padding. Every second-moment rule of a window op is exact with
T in place of the k²·ρ² the paper uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from scalecalc import expr
from scalecalc.errors import ScalecalcError


def taps_1d(size: Any, k: Any, s: Any, p: Any, out: Any) -> Any:
    """Number of (output position, tap) pairs along one axis that hit real input."""
    if p == 0:
        return k * out  # no padding: every tap of every window is inside
    return sum(_tap_counts(size, k, s, p, out))


def _tap_counts(size: Any, k: Any, s: Any, p: Any, out: Any) -> list[int]:
    """Per kernel tap a, the number of output positions whose tap a hits real input."""
    if any(expr.is_symbolic(v) for v in (size, k, s, p)):
        raise ScalecalcError("padding needs numeric size, kernel and stride to count border taps")
    counts = []
    for a in range(k):
        lo = max(0, -((a - p) // s))  # ceil((p − a)/s)
        hi = min(out - 1, (size - 1 + p - a) // s)
        counts.append(max(0, hi - lo + 1))
    return counts


def _tap_pairs(h: tuple[Any, ...], w: tuple[Any, ...], positions: Any, taps: Any) -> tuple[Any, Any]:
    """Taps that two outputs of a window have in common (real for both).

    Returns S = Σ over ordered pairs (p, q) of outputs, p = q included (where it is the taps
    of p, summing to T), of their common taps; and, relative to the mean taps T/P of one
    output, the common taps of neighbours (offsets (0,1), (1,0), (1,1)), 1 without padding.
    Per axis, with c_a the outputs whose tap a is real, Σ_{i,j} common = Σ_a c_a²; over
    neighbours (i, i+1) it is Σ_a #{i : tap a real at i and i+1}. Without padding every
    c_a = P and S = k²·P².
    """
    if h[3] == 0 and w[3] == 0:
        return h[1] * w[1] * positions**2, 1
    if positions == 1:
        return taps, 0
    (oh, sq_h, nb_h), (ow, sq_w, nb_w) = _axis_sums(*h), _axis_sums(*w)
    mean_taps = taps / positions
    per_axis = {(0, "h"): taps_1d(*h) / oh, (0, "w"): taps_1d(*w) / ow}  # offset 0: one output's taps
    if oh > 1:
        per_axis[1, "h"] = nb_h / (oh - 1)
    if ow > 1:
        per_axis[1, "w"] = nb_w / (ow - 1)
    near = [per_axis[dh, "h"] * per_axis[dw, "w"] / mean_taps for dh, dw in ((0, 1), (1, 0), (1, 1))
            if (dh, "h") in per_axis and (dw, "w") in per_axis]
    return sq_h * sq_w, sum(near) / len(near)


def _axis_sums(size: int, k: int, s: int, p: int, out: int) -> tuple[int, int, int]:
    """(out, Σ_a c_a², Σ_a #{i : tap a real at i and i+1}); c_a as in ``_tap_counts``."""
    size, k, s, p, out = (int(v) for v in (size, k, s, p, out))
    real = [[0 <= s * i - p + a < size for i in range(out)] for a in range(k)]
    return (out, sum(sum(r) ** 2 for r in real),
            sum(r[i] and r[i + 1] for r in real for i in range(out - 1)))


def offset_traces(h: tuple[Any, ...], w: tuple[Any, ...]) -> tuple[float, float, float] | None:
    """Traces of a conv's maps of sample-shared offsets, for the spread of what a batchnorm keeps.

    With N(p, q) the taps real for both outputs p and q, D = diag N and Π = I − 11ᵀ/P the
    centring over positions, returns tr(ΠNΠN), tr(ΠNΠD) and tr(ΠDΠD), each over P². Both
    maps are Kronecker products over the axes, so with tr(ΠXΠY) = tr XY − 2·1ᵀXY1/P +
    1ᵀX1·1ᵀY1/P² every term is a product of one-axis sums. None for symbolic sizes or P = 1.
    """
    if any(expr.is_symbolic(v) for v in (*h, *w)):
        return None
    axes = [_axis_traces(*(int(v) for v in a)) for a in (h, w)]
    positions = axes[0]["P"] * axes[1]["P"]
    if positions == 1:
        return None

    def term(x: str, y: str) -> float:
        t = [a[f"tr{x}{y}"] for a in axes]
        s = [a[f"s{x}{y}"] for a in axes]
        ones = [a[f"s{x}"] * b[f"s{y}"] for a, b in ((axes[0], axes[0]), (axes[1], axes[1]))]
        return (t[0] * t[1] - 2 * s[0] * s[1] / positions + ones[0] * ones[1] / positions**2) / positions**2

    return term("N", "N"), term("N", "D"), term("D", "D")


def common_taps(size: int, k: int, s: int, p: int, out: int) -> tuple[list[list[int]], list[int], list[int]]:
    """One axis of a window: the real-tap table V[o, a] (tap a of output o reads real input),
    the taps per output (the diagonal of N = V·Vᵀ, N(o, o') the taps real for both) and N·1."""
    real = [[1 if 0 <= s * o - p + a < size else 0 for a in range(k)] for o in range(out)]
    cols = [sum(r[a] for r in real) for a in range(k)]  # outputs whose tap a is real
    return real, [sum(r) for r in real], [sum(r[a] * cols[a] for a in range(k)) for r in real]


def _axis_traces(size: int, k: int, s: int, p: int, out: int) -> dict[str, float]:
    """One axis: tr XY and 1ᵀXY1 for X, Y ∈ {N, D}, and 1ᵀX1, from the real-tap table V[o, a]
    (N = V·Vᵀ, D = diag of the taps per output)."""
    real, taps, n1 = common_taps(size, k, s, p, out)
    cols = [sum(r[a] for r in real) for a in range(k)]
    gram = [[sum(r[a] * r[b] for r in real) for b in range(k)] for a in range(k)]
    return {"P": out, "trNN": sum(g * g for row in gram for g in row), "trND": sum(t * t for t in taps),
            "trDD": sum(t * t for t in taps), "sNN": sum(v * v for v in n1),
            "sND": sum(v * t for v, t in zip(n1, taps)), "sDD": sum(t * t for t in taps),
            "sN": sum(c * c for c in cols), "sD": sum(taps)}


def _window(name: str, attrs: Mapping[str, Any], shape: Any) -> tuple[Any, dict[str, Any]]:
    from scalecalc.graph import Shape

    if not shape.spatial:
        raise ScalecalcError(f"{name} needs a spatial input (channels×h×w), got a vector of {shape}")
    (kh, kw), (ph, pw) = attrs["kernel"], attrs["padding"]
    sh, sw = attrs["stride"] or attrs["kernel"]
    out = []
    for size, k, s, p, axis in ((shape.h, kh, sh, ph, "height"), (shape.w, kw, sw, pw, "width")):
        if not any(expr.is_symbolic(v) for v in (size, k, p)) and k > size + 2 * p:
            raise ScalecalcError(f"kernel {k} is larger than the padded input {axis} {size}+2·{p}")
        if not any(expr.is_symbolic(v) for v in (k, p)) and p > k // 2 and name != "conv":
            raise ScalecalcError(f"padding {p} is more than half the kernel {k}")
        out.append(expr.evaluate("(size + 2*p - k)//s + 1", {"size": size, "p": p, "k": k, "s": s}))
    taps = taps_1d(shape.h, kh, sh, ph, out[0]) * taps_1d(shape.w, kw, sw, pw, out[1])
    pairs, near = _tap_pairs((shape.h, kh, sh, ph, out[0]), (shape.w, kw, sw, pw, out[1]), out[0] * out[1], taps)
    extra = {"stride": (sh, sw), "k2": kh * kw, "k": expr.sqrt(kh * kw), "taps": taps, "pairs": pairs,
             "near": near}
    if name == "conv":
        extra["offsets"] = offset_traces((shape.h, kh, sh, ph, out[0]), (shape.w, kw, sw, pw, out[1]))
    return Shape(shape.channels, out[0], out[1]), extra


def infer(op: str, attrs: Mapping[str, Any], ins: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
    """Output shape of ``op`` and derived attributes (k, k2, taps, fan-in/out)."""
    from scalecalc.graph import Shape

    x = ins[0]
    if op == "conv":
        shape, extra = _window("conv", attrs, x)
        extra.update(n_in=x.channels, n_out=attrs["out"])
        return Shape(attrs["out"], shape.h, shape.w), extra
    if op == "linear":
        if x.spatial:
            raise ScalecalcError(f"linear needs a vector input, got {x}; add flatten or global_avgpool")
        return Shape(attrs["out"]), {"n_in": x.channels, "n_out": attrs["out"], "k": 1, "k2": 1, "taps": 1,
                                  "pairs": 1, "near": 0}
    if op in ("avgpool", "maxpool"):
        return _window(op, attrs, x)
    if op == "global_avgpool":
        if not x.spatial:
            raise ScalecalcError(f"global_avgpool needs a spatial input, got a vector of {x}")
        return Shape(x.channels), {}
    if op == "flatten":
        return Shape(x.size), {}
    if op == "add":
        for other in ins[1:]:
            if other != x:
                raise ScalecalcError(f"add inputs have different shapes: {', '.join(map(str, ins))}")
        weights = attrs["weights"]
        if weights is not None and len(weights) != len(ins):
            raise ScalecalcError(f"add has {len(ins)} inputs but {len(weights)} weights")
        return x, {}
    if op == "concat":
        if any(o.spatial != x.spatial or (o.h, o.w) != (x.h, x.w) for o in ins):
            raise ScalecalcError("concat inputs must share spatial size: " + ", ".join(map(str, ins)))
        return Shape(sum(o.channels for o in ins), x.h, x.w), {}
    return x, {}
