"""Is a corrected network measured as preconditioned? Equal γ across weighted layers, sampled.

    python benchmarks/corrected_gamma.py specs/lenet_strided.yaml
    python benchmarks/corrected_gamma.py specs/resnet50_preact.yaml --set w=16 --set size=64 --draws 48
    python benchmarks/corrected_gamma.py specs/resnet50_preact.yaml --device cuda --draws 200 --batch 16

The spec is corrected (`correct`, exact calculus, output std 0.05) and emitted exactly as
`scalecalc emit --torch` writes it; `verify`'s sampler then measures, per draw, every weighted
layer's γ = E[ΔW²]/E[W²] (batch weight gradient over the batch size) and the output E[y²].

One draw's γ fluctuates a lot in deep narrow networks (tens of percent), mostly by a factor
common to all layers (the draw's output gradient and signal scale). Equal γ is a statement about
ratios, so each draw's γ_l is divided by the geometric mean over the layers of that draw; the
table gives the mean of that relative γ over draws with its standard error, next to the
prediction (1 for every layer after correction). "spread" is the largest over the smallest
measured mean; the acceptance target for a corrected network is spread ≤ 1.10 and output std
within 10% of the target.
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
    p.add_argument("--kernel-cap", type=int, help="largest map (positions) the spatial kernel holds")
    args = p.parse_args()
    if args.kernel_cap is not None:
        kernel.CAP = args.kernel_cap
    overrides = {k: expr.evaluate(v, {}) for k, v in (item.split("=", 1) for item in args.set)}
    spec = load(args.spec)
    fixed = correct(build(spec, overrides), args.output_std)
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
    predicted = np.array([float(analysis[n].gamma) for n in weighted])
    predicted = predicted / np.exp(np.log(predicted).mean())
    out_std = math.sqrt(statistics.fmean(stats[fixed.network.output]["forward_m2"]))
    sets = " ".join(f"--set {s}" for s in args.set)
    print(f"# corrected γ, measured: {args.spec} {sets}\n")
    print(f"{args.draws} draws × batch {args.batch} on {device}, float32, {seconds:.0f} s. "
          f"Relative γ: each draw's γ_l over that draw's geometric mean over the layers.\n")
    rows = [[f"`{n}`", f"{m:.3f}", f"{e:.3f}", f"{q:.3f}"] for n, m, e, q in zip(weighted, mean, se, predicted)]
    print(md_table(["layer", "measured relative γ", "SE", "predicted"], rows))
    spread = float(mean.max() / mean.min())
    print(f"\nspread of measured means {spread:.3f} (predicted {predicted.max() / predicted.min():.3f}); "
          f"output std {out_std:.4f} (target {args.output_std:g}); "
          f"target spread ≤ 1.10 and output std ±10%: "
          f"{'met' if spread <= 1.10 and abs(out_std / args.output_std - 1) <= 0.10 else 'not met'}")


if __name__ == "__main__":
    sys.exit(main())
