"""Reproductions of the paper's figures from scalecalc's own analysis and sampled models.

Figure 1 (§5.1): the ratio of the scaling factor γ (Eq. 2) to the measured average squared
singular value E[(G_l r)²] of each weighted layer's Hessian block, for a strided LeNet on
32×32 random inputs under the random quadratic loss yᵀRy (``scalecalc.hessian``).

Figure 2 (§6.1): heat maps of the per-sample Hessian's blocks, one block per pair of weighted
layers, for the same network under each init scheme (``scalecalc.heatmap``).
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
from scalecalc.init import SCHEMES

# specs/lenet_strided.yaml, kept here so the figure does not depend on the source checkout
# (tests check that the two stay identical).
LENET_STRIDED = """\
name: lenet-strided
input: {channels: 3, size: 32}
params: {w: 6}
init: {scheme: geometric}
layers:
  - {name: conv1, op: conv, out: w, kernel: 5, stride: 2, padding: 2}
  - {name: relu1, op: relu}
  - {name: conv2, op: conv, out: 16, kernel: 5, stride: 2, padding: 2}
  - {name: relu2, op: relu}
  - {name: flat, op: flatten}
  - {name: fc1, op: linear, out: 120}
  - {name: relu3, op: relu}
  - {name: fc2, op: linear, out: 84}
  - {name: relu4, op: relu}
  - {name: fc3, op: linear, out: 10}
"""
NEED_MATPLOTLIB = "matplotlib is needed for plots: pip install 'scalecalc[report]'"


def fig1(path_png: str, setups: int = 100, batch: int = 1024, seed: int = 0, device: str = "cpu",
         dtype: str = "float32", schemes: Sequence[str] = SCHEMES, calculus: str = "paper") -> dict[str, Any]:
    """Figure 1: histogram of γ_l / E[(G_l r)²] over ``setups`` sampled setups, saved to ``path_png``.

    A setup is one independent draw of: an init scheme (uniform over ``schemes``; the paper does
    not say which it used), the weights, a batch of iid N(0, 1) inputs, the loss matrix R and
    one direction r per layer. γ_l comes from the analysis of the spec as written under that
    scheme in ``calculus`` ("paper": Eq. 2 as published, the default; or scalecalc's "exact"),
    rescaled to the loss (``predicted_hessian``); E[(G_l r)²] is the per-sample mean square of
    H_b r over the batch (``hessian_blocks`` with one draw). Returns the setup parameters, the
    run time, each setup's scheme and ratios, and per layer, per scheme and overall the median,
    quartiles and count of the ratio and its pooled value (``_stats``). float32 by default: the
    paper's batch of 1024 then runs 100 setups in 1.5–2 minutes on 2 CPU cores (float64 takes
    twice the CPU time); its rounding is far below the setup-to-setup spread.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ScalecalcError(NEED_MATPLOTLIB) from None
    import numpy as np

    from scalecalc.codegen import emit_torch
    from scalecalc.graph import build
    from scalecalc.hessian import hessian_blocks, predicted_hessian
    from scalecalc.propagate import propagate
    from scalecalc.spec import parse
    from scalecalc.verify import load_module, resolve_device

    if setups < 1 or batch < 1:
        raise ScalecalcError(f"need setups ≥ 1 and batch ≥ 1, got {setups} and {batch}")
    unknown = sorted(set(schemes) - set(SCHEMES))
    if not schemes or unknown:
        raise ScalecalcError(f"schemes must be among {', '.join(SCHEMES)}; got {list(schemes)}")
    device = resolve_device(device)
    spec = parse(LENET_STRIDED, "lenet_strided.yaml")
    rng = np.random.default_rng(seed)
    picks = [str(s) for s in rng.choice(list(schemes), size=setups)]
    seeds = np.random.SeedSequence(seed).generate_state(setups)  # one independent torch seed per setup
    ratios: dict[str, list[float]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for scheme in sorted(set(picks)):
            net = build(spec, None, (), scheme)
            module = load_module(emit_torch(spec, net, digest="0"), Path(tmp), f"lenet_{scheme}")
            models[scheme] = (module, predicted_hessian(propagate(net, calculus), net), float(net.input_m2))
        for scheme, s in zip(picks, seeds):
            module, predicted, input_m2 = models[scheme]
            measured = hessian_blocks(module, list(predicted), draws=1, batch=batch, seed=int(s), device=device,
                                      dtype=dtype, input_m2=input_m2)
            for name, values in measured.items():
                ratios.setdefault(name, []).append(predicted[name] / values[0])
    seconds = time.perf_counter() - start
    everything = [v for values in ratios.values() for v in values]
    summary: dict[str, Any] = {"setups": setups, "batch": batch, "seed": seed, "device": device, "dtype": dtype,
               "calculus": calculus, "seconds": seconds, "schemes": picks, "ratios": ratios,
               "layers": {name: _stats(values) for name, values in ratios.items()},
               "overall": _stats(everything),
               "by_scheme": {s: _stats([ratios[n][i] for n in ratios for i, p in enumerate(picks) if p == s])
                             for s in sorted(set(picks))}}
    figure = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    lo, hi = min(everything), max(everything)
    log = hi / lo > 10  # the spread spans a decade or more
    bins = (np.geomspace(lo, hi, 41) if log else np.linspace(min(lo, 0.9), max(hi, 1.1), 41)).tolist()
    ax.hist(list(ratios.values()), bins=bins, stacked=True, label=list(ratios), edgecolor="white", linewidth=0.4)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="1 (exact)")
    if log:  # labelled major ticks at 1-2-5 steps, unlabelled minor ones
        from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

        ax.set_xscale("log")
        steps = [f * 10.0**e for e in range(-4, 5) for f in (1, 2, 5)]
        ax.xaxis.set_major_locator(FixedLocator([t for t in steps if lo / 1.2 <= t <= hi * 1.2]))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("γ / E[(G_l r)²]")
    ax.set_ylabel("count")
    overall = summary["overall"]
    ax.set_title(f"Strided LeNet, loss yᵀRy: {setups} setups, batch {batch}\n"
                 f"median {overall['median']:.3g}, ratio of expectations {overall['pooled']:.3g}", fontsize=10)
    ax.legend(title="layer", fontsize=8)
    figure.savefig(path_png, dpi=150)
    return summary


def fig2(path_png: str, draws: int = 400, batch: int = 32, seed: int = 0, device: str = "cpu",
         dtype: str = "float32", calculus: str = "paper") -> dict[str, Any]:
    """Figure 2: the Hessian block matrix of the strided LeNet under each init scheme, saved to ``path_png``.

    Cell (l, m) is the mean squared singular value ‖H_lm‖²_F / min(d_l, d_m) of the full
    per-sample Hessian block (``scalecalc.heatmap.QUANTITY``; on the diagonal E[(G_l r)²]), the
    mean over ``draws`` independent draws of weights, ``batch`` iid N(0, 1) inputs, R and the
    directions. Every scheme uses the same ``seed``: with zero biases the network is positively
    homogeneous in each W_l, so the schemes' draws differ only by a fixed factor per layer and
    the panels are compared on common random numbers. Returns the parameters, the run time and,
    per scheme, ``scalecalc.heatmap.measure``'s result (matrix, standard errors, diagonal,
    Theorem 2's diagonal from ``calculus``, predicted/measured, spreads, seconds).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ScalecalcError(NEED_MATPLOTLIB) from None
    from scalecalc import heatmap
    from scalecalc.graph import build
    from scalecalc.spec import parse
    from scalecalc.verify import resolve_device

    if draws < 2 or batch < 1:
        raise ScalecalcError(f"need draws ≥ 2 (for a standard error) and batch ≥ 1, got {draws} and {batch}")
    device = resolve_device(device)
    spec = parse(LENET_STRIDED, "lenet_strided.yaml")
    start = time.perf_counter()
    schemes = {s: heatmap.measure(spec, build(spec, None, (), s), draws=draws, batch=batch, seed=seed, device=device,
                                  dtype=dtype, calculus=calculus) for s in SCHEMES}
    summary: dict[str, Any] = {"draws": draws, "batch": batch, "seed": seed, "device": device, "dtype": dtype,
                               "calculus": calculus, "quantity": heatmap.QUANTITY,
                               "seconds": time.perf_counter() - start, "schemes": schemes}
    figure = Figure(figsize=(11, 9.6), layout="constrained")
    FigureCanvasAgg(figure)
    heatmap.draw(figure, [(f"{s}: diagonal spread {r['spread']:.3g} (Theorem 2: {r['predicted_spread']:.3g})", r)
                          for s, r in schemes.items()], cols=2)
    figure.suptitle(f"Strided LeNet, per-sample Hessian blocks under yᵀRy ({draws} draws × batch {batch}); "
                    "bold: diagonal", fontsize=11)
    figure.savefig(path_png, dpi=130)
    return summary


def _stats(values: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-setup ratios, and the ratio in expectation: γ over the
    mean of E[(G_l r)²]/γ across setups ("pooled", with its standard error by the delta method).
    A setup's measurement is skewed to the right (one R, one set of weights), so the median of
    γ/measured sits above the pooled value even when Theorem 2 holds exactly in expectation."""
    if not values:
        nan = float("nan")
        return {"median": nan, "q25": nan, "q75": nan, "n": 0, "pooled": nan, "pooled_se": nan}
    inverse = [1 / v for v in values]
    pooled = 1 / statistics.fmean(inverse)
    if len(values) < 2:
        return {"median": values[0], "q25": values[0], "q75": values[0], "n": 1, "pooled": pooled,
                "pooled_se": float("nan")}
    q25, q50, q75 = statistics.quantiles(values, n=4, method="inclusive")
    se = pooled * statistics.stdev(inverse) / statistics.fmean(inverse) / math.sqrt(len(values))
    return {"median": q50, "q25": q25, "q75": q75, "n": len(values), "pooled": pooled, "pooled_se": se}
