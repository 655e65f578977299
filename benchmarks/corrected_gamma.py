"""Is a corrected network measured as preconditioned? Equal γ across weighted layers, sampled.

    python benchmarks/corrected_gamma.py specs/lenet_strided.yaml
    python benchmarks/corrected_gamma.py specs/resnet50_preact.yaml --set w=16 --set size=64 --draws 48
    python benchmarks/corrected_gamma.py specs/resnet50_preact.yaml --device cuda --draws 200 --batch 16

The spec is corrected (`correct`, exact calculus, output std 0.05) and emitted exactly as
`scalecalc emit --torch` writes it; `verify`'s sampler then measures, per draw, every weighted
layer's γ = E[ΔW²]/E[W²] (batch weight gradient over the batch size) and the output E[y²].

The γ the calculus predicts is an expectation over the weight draw, E[ΔW²]/E[W²], so the first
column is E[γ_l] (the mean over draws) over its geometric mean over the layers, with a standard
error from resampling the draws (a draw's layers together). The second is the mean over draws of
each draw's γ_l over that draw's geometric mean over the layers: one draw's γ fluctuates by tens of
percent in a deep network, mostly by a factor common to all layers, which this ratio removes; but
it is not the calculus' γ, and where a layer's γ fluctuates more than the others' it comes out
high by Jensen's inequality (the first conv of the corrected pooled LeNet: 1.24 against 1.015
for E[γ]). Prediction after correction: 1 for every layer. "spread" is the largest over the
smallest; the acceptance target for a corrected network is a spread of E[γ_l] ≤ 1.10 and output
std within 10% of the target. With the ResNet-50's 54 layers each known to 2%, a network whose
layers are exactly equal comes out at a spread of about 1.095 by noise alone (the mean max/min
of 54 such estimates); the means over the layers of each top-level block (a stage), printed
below the table, are steadier.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mdtable import md_table

from scalecalc import expr, kernel
from scalecalc.codegen import emit_torch
from scalecalc.corrections import correct
from scalecalc.graph import build
from scalecalc.propagate import propagate
from scalecalc.spec import load
from scalecalc.verify import load_module, resolve_device, sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a spec parameter")
    p.add_argument("--draws", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-std", type=float, default=0.05)
    p.add_argument("--calculus", default="exact", choices=["exact", "paper"],
                   help="the calculus the corrections solve with")
    p.add_argument("--kernel-cap", type=int, help="largest map (positions) the spatial kernel holds")
    args = p.parse_args()
    if args.kernel_cap is not None:
        kernel.CAP = args.kernel_cap
    overrides = {k: expr.evaluate(v, {}) for k, v in (item.split("=", 1) for item in args.set)}
    spec = load(args.spec)
    fixed = correct(build(spec, overrides), args.output_std, args.calculus)
    analysis = propagate(fixed.network)
    weighted = [n.name for n in fixed.network.nodes if n.weighted]
    source = emit_torch(spec, fixed.network, digest="0", inserted=fixed.inserted)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(source, Path(tmp), "corrected_model")
        start = time.perf_counter()
        stats = sample(module, [fixed.network.output], weighted, draws=args.draws, batch=args.batch,
                       input_m2=float(fixed.network.input_m2), device=device, dtype="float32")
        seconds = time.perf_counter() - start
    gammas = np.array([stats[n]["gamma"] for n in weighted])  # layers × draws
    relative = gammas / np.exp(np.log(gammas).mean(axis=0))
    mean, se = relative.mean(axis=1), relative.std(axis=1, ddof=1) / math.sqrt(args.draws)
    ratio, ratio_se = _ratio_of_means(gammas)
    predicted = np.array([float(analysis[n].gamma) for n in weighted])
    predicted = _over_geomean(predicted)
    out_std = math.sqrt(statistics.fmean(stats[fixed.network.output]["forward_m2"]))
    sets = " ".join(f"--set {s}" for s in args.set)
    print(f"# corrected γ, measured: {args.spec} {sets}\n")
    print(f"{args.draws} draws × batch {args.batch} on {device}, float32, {seconds:.0f} s. "
          "Relative to the geometric mean over the layers: E[γ_l], and each draw's γ_l averaged.\n")
    rows = [[f"`{n}`", f"{r:.3f}", f"{re:.3f}", f"{m:.3f}", f"{e:.3f}", f"{q:.3f}"]
            for n, r, re, m, e, q in zip(weighted, ratio, ratio_se, mean, se, predicted)]
    print(md_table(["layer", "E[γ_l] relative", "SE", "per-draw relative γ", "SE", "predicted"], rows))
    stages: dict[str, list[float]] = {}
    for n, r in zip(weighted, ratio):
        stages.setdefault(n.split(".")[0], []).append(float(r))
    print("\nE[γ_l] relative, mean over each top-level block: " +
          ", ".join(f"{k} {statistics.fmean(v):.3f}" for k, v in stages.items()))
    spread, per_draw = float(ratio.max() / ratio.min()), float(mean.max() / mean.min())
    print(f"\nspread of E[γ_l] {spread:.3f}, of the per-draw relative γ {per_draw:.3f} "
          f"(predicted {predicted.max() / predicted.min():.3f}); "
          f"output std {out_std:.4f} (target {args.output_std:g}); "
          f"target spread ≤ 1.10 and output std ±10%: "
          f"{'met' if spread <= 1.10 and abs(out_std / args.output_std - 1) <= 0.10 else 'not met'}")


def _over_geomean(values: np.ndarray) -> np.ndarray:
    return values / np.exp(np.log(values).mean())


def _ratio_of_means(gammas: np.ndarray, resamples: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """E[γ_l] (the mean over draws, the γ the calculus predicts) over its geometric mean over the
    layers, and its standard error from resampling the draws (paired: a draw's layers stay together)."""
    rng = np.random.default_rng(0)
    draws = gammas.shape[1]
    boot = np.array([_over_geomean(gammas[:, rng.integers(0, draws, draws)].mean(axis=1)) for _ in range(resamples)])
    return _over_geomean(gammas.mean(axis=1)), boot.std(axis=0, ddof=1)


if __name__ == "__main__":
    sys.exit(main())
