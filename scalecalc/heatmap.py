"""Hessian block heat maps (Fig. 2): measure a spec's per-sample block matrix and draw it.

Shared by ``scalecalc paper fig2`` (one panel per init scheme) and ``scalecalc report
--hessian`` (the spec's own network). The quantity of a cell (l, m) is the mean squared
singular value of the per-sample Hessian block, ‖H_lm‖²_F / min(d_l, d_m) with d the number
of weights of a layer, measured by ``scalecalc.hessian.hessian_matrix``. On the diagonal it is
E[(G_l r)²], the quantity Theorem 2 predicts (``predicted_hessian``), in the same units.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scalecalc.errors import ScalecalcError
from scalecalc.graph import Network

QUANTITY = "mean squared singular value ‖H_lm‖²_F / min(d_l, d_m)"
ANNOTATE = 12  # most layers per side whose cells get their value written in


def undefined(net: Network) -> str | None:
    """Why the per-sample Hessian of ``net`` is not defined, or None when it is."""
    bn = [n.name for n in net.nodes if n.op == "batchnorm"]
    if not bn:
        return None
    names = ", ".join(bn[:3]) + (f" and {len(bn) - 3} more" if len(bn) > 3 else "")
    return (f"the network has batchnorm ({names}). In training mode its batch statistics couple the samples "
            "of a batch, so the Hessian of one sample's loss is not defined, and the Hessian of the batch loss "
            "divided by B is not the per-sample quantity Theorem 2 describes. No heat map is drawn.")


def measure(spec: Any, net: Network, *, draws: int, batch: int, seed: int = 0, device: str = "cpu",
            dtype: str = "float32", calculus: str = "paper") -> dict[str, Any]:
    """The block matrix of ``net`` (emitted from ``spec`` as written) and Theorem 2's diagonal.

    Keys: ``layers`` (weighted layers in depth order), ``matrix`` and ``se`` (row l, column m:
    the mean over draws of the batch-mean per-sample value and its standard error across draws),
    ``diagonal``, ``predicted`` (``predicted_hessian`` under ``calculus``), ``ratio``
    (predicted/measured per layer), ``spread`` and ``predicted_spread`` (max/min of the measured
    and predicted diagonal), ``seconds``.
    """
    from scalecalc.codegen import emit_torch
    from scalecalc.hessian import hessian_matrix, predicted_hessian
    from scalecalc.propagate import propagate
    from scalecalc.verify import load_module

    reason = undefined(net)
    if reason:
        raise ScalecalcError(f"no per-sample Hessian: {reason}")
    predicted = predicted_hessian(propagate(net, calculus), net)
    layers = list(predicted)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(emit_torch(spec, net, digest="0"), Path(tmp), "scalecalc_blocks")
        values = hessian_matrix(module, layers, draws=draws, batch=batch, seed=seed, device=device, dtype=dtype,
                                input_m2=float(net.input_m2))
    seconds = time.perf_counter() - start
    matrix = [[statistics.fmean(values[r][c]) for c in layers] for r in layers]
    se = [[statistics.stdev(values[r][c]) / math.sqrt(draws) if draws > 1 else math.nan for c in layers]
          for r in layers]
    diagonal = [matrix[i][i] for i in range(len(layers))]
    pred = [predicted[n] for n in layers]
    return {"layers": layers, "matrix": matrix, "se": se, "diagonal": diagonal, "predicted": pred,
            "ratio": [p / d if d > 0 else math.nan for p, d in zip(pred, diagonal)],
            "spread": _spread(diagonal), "predicted_spread": _spread(pred), "seconds": seconds,
            "draws": draws, "batch": batch}


def _spread(values: Sequence[float]) -> float:
    return max(values) / min(values) if values and min(values) > 0 else math.inf


def draw(figure: Any, panels: Sequence[tuple[str, dict[str, Any]]], cols: int, spec: Any = None) -> list[Any]:
    """One heat map per (title, ``measure`` result) on ``figure`` (or in its subplot ``spec``), rows ×
    ``cols``, sharing one logarithmic colour scale and one colourbar labelled with the quantity."""
    from matplotlib.colors import LogNorm

    values = [v for _, res in panels for row in res["matrix"] for v in row if v > 0]
    if not values:
        raise ScalecalcError("every Hessian block measured zero; nothing to draw")
    norm = LogNorm(min(values), max(values))
    grid = (spec.subgridspec if spec is not None else figure.add_gridspec)(math.ceil(len(panels) / cols), cols)
    axes = [figure.add_subplot(grid[i // cols, i % cols]) for i in range(len(panels))]
    image = None
    for ax, (title, res) in zip(axes, panels):
        image = _panel(ax, res, norm)
        ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label=QUANTITY, shrink=0.9)
    return axes


def _panel(ax: Any, res: dict[str, Any], norm: Any) -> Any:
    import numpy as np

    names, matrix = res["layers"], np.array(res["matrix"], dtype=float)
    shown = np.where(matrix > 0, matrix, np.nan)  # log scale: an all-zero block is left blank
    image = ax.imshow(shown, norm=norm, cmap="viridis")
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    size = 8 if len(names) <= ANNOTATE else max(4, 9 - len(names) // 10)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=size)
    ax.set_yticklabels(names, fontsize=size)
    ax.set_xlabel("column block m (direction r_m on W_m)", fontsize=8)
    ax.set_ylabel("row block l", fontsize=8)
    if len(names) <= ANNOTATE:
        cmap = image.get_cmap()
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j] > 0:
                    r, g, b, _ = cmap(norm(matrix[i, j]))
                    light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5  # perceived luminance of the cell
                    ax.text(j, i, f"{matrix[i, j]:.3g}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white", fontweight="bold" if i == j else "normal")
    return image


def draw_diagonal(ax: Any, res: dict[str, Any]) -> None:
    """Measured diagonal (± 2 standard errors) against Theorem 2's prediction, per layer."""
    names = res["layers"]
    pos = list(range(len(names)))
    errors = [min(2 * res["se"][i][i], 0.999 * res["diagonal"][i]) if math.isfinite(res["se"][i][i]) else 0.0
              for i in pos]
    ax.errorbar(pos, res["diagonal"], yerr=errors, fmt="o", ms=5, capsize=3, label="measured (± 2 se)")
    ax.plot(pos, res["predicted"], "D--", ms=5, color="tab:red", lw=1, label="Theorem 2 (predicted)")
    ax.set_yscale("log")
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8 if len(names) <= ANNOTATE else 5)
    ax.set_ylabel("diagonal block: E[(G_l r)²]")
    ax.set_title(f"diagonal: spread {res['spread']:.3g} measured, {res['predicted_spread']:.3g} predicted",
                 fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8)


def report_png(res: dict[str, Any], title: str) -> bytes:
    """The heat map of one ``measure`` result with its diagonal against Theorem 2 beside it, as PNG."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 2, width_ratios=(3, 2))
    draw(figure, [(title, res)], cols=1, spec=grid[0, 0])
    draw_diagonal(figure.add_subplot(grid[0, 1]), res)
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    return buf.getvalue()


def section(spec: Any, net: Network, calculus: str, draws: int,
            batch: int) -> tuple[str, list[list[str]], bytes | None]:
    """The report's Hessian section: (text, per-layer diagonal rows, PNG), or the reason there is none."""
    from scalecalc.report import fmt

    reason = undefined(net)
    if reason:
        return f"No Hessian heat map: {reason}", [], None
    res = measure(spec, net, draws=draws, batch=batch, calculus=calculus)
    text = (f"Per-sample Hessian blocks of the spec as written (its own init), loss yᵀRy, {draws} draws × batch "
            f"{batch} ({res['seconds']:.1f} s). Cell (l, m): {QUANTITY}; on the diagonal E[(G_l r)²], which "
            f"Theorem 2 predicts ({calculus} calculus). Diagonal spread {fmt(res['spread'])} measured, "
            f"{fmt(res['predicted_spread'])} predicted.")
    rows = [[n, f"{fmt(d)} ± {fmt(res['se'][i][i])}", fmt(p), fmt(r)]
            for i, (n, d, p, r) in enumerate(zip(res["layers"], res["diagonal"], res["predicted"], res["ratio"]))]
    return text, rows, report_png(res, f"{net.name}: per-sample Hessian blocks")
