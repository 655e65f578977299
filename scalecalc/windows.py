"""The window ops of the spatial kernel as maps on covariance arrays [h, w, h, w].

A conv or an average pool acts on each spatial axis apart (the taps of a k×k window are a
product set): per axis, output o reads input s·o + d for each tap offset d, and the array
moves through one strided slice per tap and side. Kronecker terms (c, A, B), c·A⊗B over
the two axes, stand for the maps the kernel does not hold whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scalecalc.graph import Node


def identity(shape: Any) -> list[tuple[float, np.ndarray, np.ndarray]]:
    return [(1.0, np.eye(shape.h), np.eye(shape.w))]


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


def tap_shifts(size_in: int, size_out: int, k: int, s: int, pad: int) -> list[Shift]:
    out = []
    for a in range(k):
        d = a - pad
        lo = -(d // s) if d < 0 else 0  # the first output whose input s·o + d ≥ 0 (ceil of −d/s)
        hi = min(size_out, (size_in - 1 - d) // s + 1)
        out.append(Shift(lo, max(lo, hi), d, s))
    return out


def axis_maps(node: Node) -> tuple[Axis, Axis] | None:
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
        shifts = tap_shifts(int(size_in), int(size_out), int(k), int(s), int(p))
        taps = ([Tap(1.0, t, t) for t in shifts] if node.op == "conv"
                else [Tap(1.0 / int(k) ** 2, t, u) for t in shifts for u in shifts])
        result.append(Axis(int(size_in), int(size_out), tuple(taps)))
    return result[0], result[1]


def mapped(x: np.ndarray, axis: Axis, dims: tuple[int, int], back: bool = False) -> np.ndarray:
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


def matrix(shift: Shift, axis: Axis) -> np.ndarray:
    m = np.zeros((axis.size_out, axis.size_in))
    o = np.arange(shift.lo, shift.hi)
    m[o, shift.s * o + shift.d] = 1.0
    return m


def spatial_map(x: Any, axes: tuple[Axis, Axis] | None) -> Any:
    if axes is None:
        return x
    rows, cols = axes
    if isinstance(x, list):  # Kronecker terms: each axis alone, then the outer product
        return sum(c * np.einsum("ac,bd->abcd", one_axis(a, rows), one_axis(b, cols)) for c, a, b in x)
    return mapped(mapped(x, rows, (0, 2)), cols, (1, 3))


def one_axis(b: np.ndarray, axis: Axis) -> np.ndarray:
    return sum(t.weight * matrix(t.left, axis) @ b @ matrix(t.right, axis).T for t in axis.taps)


def diagonal(x: np.ndarray) -> np.ndarray:
    return np.einsum("ijij->ij", x)


def whole(x: Any) -> Any:
    if isinstance(x, list):
        return sum(c * np.einsum("ac,bd->abcd", a, b) for c, a, b in x)
    return x


def pool_windows(node: Node) -> np.ndarray:
    """[W, K]: the input positions (row-major) of each window of a non-overlapping pool."""
    (kh, kw), src, out = node.attrs["kernel"], node.in_shapes[0], node.shape
    i, j, a, b = np.meshgrid(np.arange(int(out.h)), np.arange(int(out.w)), np.arange(int(kh)), np.arange(int(kw)),
                             indexing="ij")
    return ((i * kh + a) * int(src.w) + j * kw + b).reshape(int(out.h) * int(out.w), int(kh) * int(kw))
