"""Accuracy of the two calculi against sampled networks.

For every spec in ``specs/`` and the three extra networks in ``benchmarks/nets/`` (a pooled
LeNet, a batch-normalised ResNet-18 and a DenseNet-style block), the network is emitted as
written (``emit_torch`` without corrections: the spec's own init), analysed with the paper
and the exact calculus, and sampled once with ``scalecalc.verify.verify``. Both calculi are
scored against the same measured means: per node and quantity (E[x²], E[Δx²] and, per
weighted layer, γ = E[ΔW²]/E[W²]) the relative error |measured/predicted − 1|. The output
is Markdown on stdout (progress goes to stderr): median and worst error per calculus, for
all checks and separately for the moments and for γ, the median relative standard error of
the measurements, and the three worst nodes of the exact calculus per network.

Networks are sampled at their written width or narrower (finite-width effects grow as the
width falls, so a narrower copy is the harder test), some on smaller inputs than written, to
bound the time. VGG-11 and the ResNet-50 are sampled at their written width and, as a second
row each, at a quarter of it (``-w16``): there the finite-width part of the gradient exceeds the
target, and those rows are left out of the pooled "all" row.

Each network is sampled in its own worker process with one torch thread (many small
kernels run far faster that way than with threads competing for two cores); ``--jobs``
workers run side by side. Measurements use float32 by default (``--dtype float64`` for
verify's default precision; the rounding error is orders of magnitude below the sampling
error). Nothing here asserts; this is not a test.

    python benchmarks/accuracy.py            # documented table, docs/accuracy.md (about 10 minutes on 2 cores)
    python benchmarks/accuracy.py --quick    # smoke run (about 10 s)
    python benchmarks/accuracy.py --only lenet-pooled --detail   # one network, every check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdtable import md_table

ROOT = Path(__file__).resolve().parent.parent
QUANTITIES = ("forward_m2", "backward_m2", "gamma")
LABELS = {"forward_m2": "E[x²]", "backward_m2": "E[Δx²]", "gamma": "γ"}
TARGET_MEDIAN, TARGET_WORST = 0.02, 0.05
SIGNIFICANT = 3.0  # standard errors beyond which a miss is not sampling noise


@dataclass(frozen=True)
class Case:
    """One network: its spec, the sizes it is sampled at, and how many draws."""

    label: str
    path: str  # relative to the repository root
    settings: dict[str, float] = field(default_factory=dict)
    draws: int = 400
    batch: int = 16
    quick_settings: dict[str, float] | None = None  # None: same as settings
    cost: float = 1.0  # rough seconds of the default run, to schedule the slowest first
    scored: bool = True  # False: a narrower copy of a network also sampled at its written width


CASES = (
    Case("libsvm-mlp", "specs/libsvm_mlp.yaml", draws=1500, cost=6),
    Case("lenet-strided", "specs/lenet_strided.yaml", draws=3000, cost=55),
    Case("alexnet-strided", "specs/alexnet_strided.yaml", {"w": 32, "fc": 256}, draws=1000, cost=40,
         quick_settings={"w": 16, "fc": 64}),
    Case("vgg11", "specs/vgg11.yaml", draws=600, cost=250, quick_settings={"w": 8}),
    Case("resnet50-preact", "specs/resnet50_preact.yaml", {"size": 32}, draws=1000, batch=8, cost=700,
         quick_settings={"w": 4, "size": 32}),
    # the same two at a quarter of their width, where the finite-width part exceeds the target
    Case("vgg11-w16", "specs/vgg11.yaml", {"w": 16}, draws=1500, cost=80, quick_settings={"w": 4},
         scored=False),
    Case("resnet50-w16", "specs/resnet50_preact.yaml", {"w": 16, "size": 32}, draws=1000, batch=8, cost=235,
         quick_settings={"w": 2, "size": 32}, scored=False),
    Case("lenet-pooled", "benchmarks/nets/lenet_pooled.yaml", draws=3000, cost=70),
    Case("resnet18-bn", "benchmarks/nets/resnet18_bn.yaml", {"w": 16, "size": 32}, draws=600, cost=115,
         quick_settings={"w": 4, "size": 16}),
    Case("densenet-block", "benchmarks/nets/densenet_block.yaml", {"size": 32}, draws=400, cost=130,
         quick_settings={"size": 16, "layers": 3}),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the worker

def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Build, emit (uncorrected), analyse with both calculi and sample one network.

    Runs in a worker process. Returns one row per check of E[x²], E[Δx²] and γ with the
    measured mean, its standard error, both predictions and whether the exact calculus
    trusts its prediction there.
    """
    import torch

    torch.set_num_threads(1)
    from scalecalc.codegen import emit_torch
    from scalecalc.graph import build
    from scalecalc.propagate import propagate
    from scalecalc.spec import load
    from scalecalc.verify import verify

    start = time.perf_counter()
    spec = load(ROOT / job["path"])
    # a spec whose batchnorms name their training batch is analysed at the batch it is sampled with
    settings = {**job["settings"], "batch": job["batch"]} if "batch" in spec.params else job["settings"]
    net = build(spec, settings)
    source = emit_torch(spec, net, digest="0")
    exact = propagate(net, "exact")
    paper = {r.name: r for r in propagate(net, "paper").nodes}
    result = verify(net, exact, source, draws=job["draws"], batch=job["batch"], seed=job["seed"],
                    device="cpu", dtype=job["dtype"])
    rows = []
    for c in result.checks:
        if c.quantity not in QUANTITIES:
            continue
        rows.append({"node": c.node, "op": c.op, "quantity": c.quantity, "measured": c.measured, "se": c.se,
                     "exact": c.predicted, "paper": float(getattr(paper[c.node], c.quantity)),
                     "trusted": c.trusted})
    return {"label": job["label"], "rows": rows, "nodes": len(net.order) - 1, "sample_s": result.seconds,
            "total_s": time.perf_counter() - start}


# --------------------------------------------------------------------------- statistics

def rel(measured: float, predicted: float) -> float:
    return abs(measured / predicted - 1)


def med_max(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.median(values), max(values)) if values else (math.nan, math.nan)


def pct(value: float) -> str:
    if math.isnan(value):
        return "–"
    value *= 100
    return f"{value:.0f}%" if value >= 100 else f"{value:.1f}%" if value >= 1 else f"{value:.2f}%"


def summarise(rows: list[dict[str, Any]], quantities: Sequence[str] = QUANTITIES) -> dict[str, float]:
    """Median and worst error of both calculi over the rows of the given quantities."""
    chosen = [r for r in rows if r["quantity"] in quantities]
    paper = [rel(r["measured"], r["paper"]) for r in chosen]
    exact = [rel(r["measured"], r["exact"]) for r in chosen]
    se = [r["se"] / abs(r["measured"]) for r in chosen]
    out: dict[str, float] = {"n": len(chosen)}
    out["paper_med"], out["paper_max"] = med_max(paper)
    out["exact_med"], out["exact_max"] = med_max(exact)
    out["se_med"] = statistics.median(se) if se else math.nan
    out["significant"] = sum(1 for r, e in zip(chosen, exact)
                             if e > TARGET_MEDIAN and abs(r["measured"] - r["exact"]) > SIGNIFICANT * r["se"])
    trusted = [e for r, e in zip(chosen, exact) if r["trusted"]]
    out["trusted"] = len(trusted)
    out["trusted_max"] = max(trusted) if trusted else math.nan
    return out


def settings_text(case: Case, quick: bool) -> str:
    settings = case.quick_settings if quick and case.quick_settings is not None else case.settings
    return " ".join(f"{k}={v:g}" for k, v in settings.items()) or "as written"


# --------------------------------------------------------------------------- report

def report(cases: Sequence[Case], results: dict[str, dict[str, Any]], args: argparse.Namespace,
           wall: float) -> str:
    out = [f"# scalecalc accuracy: paper vs exact calculus{' (--quick)' if args.quick else ''}\n"]
    from importlib.metadata import version

    out.append(f"scalecalc {_revision()}; Python {platform.python_version()}, torch {version('torch')}, "
               f"{os.cpu_count()} CPUs, {args.jobs} worker(s) × 1 thread, {args.dtype}, seed {args.seed}. "
               "Relative error |measured/predicted − 1| per node and quantity; SE: standard error of the measured mean "
               "over draws, relative to it.\n")
    rows, per_quantity, worst_rows = [], [], []
    pooled: list[dict[str, Any]] = []
    for case in cases:
        res = results.get(case.label)
        if res is None:
            continue
        if "error" in res:
            rows.append([case.label, "error: " + res["error"], *[""] * 10])
            continue
        r = res["rows"]
        if case.scored:
            pooled.extend(r)
        s = summarise(r)
        met = s["exact_med"] <= TARGET_MEDIAN and s["exact_max"] <= TARGET_WORST
        rows.append([case.label, settings_text(case, args.quick), f"{res['draws']}×{res['batch']}", s["n"],
                     pct(s["paper_med"]), pct(s["paper_max"]), pct(s["exact_med"]), pct(s["exact_max"]),
                     pct(s["se_med"]), f"{s['significant']}/{s['n']}", f"{s['trusted']}: {pct(s['trusted_max'])}",
                     ("yes" if met else "**no**") + ("" if case.scored else " (narrow copy, not in “all”)")])
        cells = [case.label]
        for qs in (("forward_m2",), ("backward_m2",), ("gamma",)):
            q = summarise(r, qs)
            cells += [f"{pct(q['paper_med'])} / {pct(q['paper_max'])}",
                      f"{pct(q['exact_med'])} / {pct(q['exact_max'])}", pct(q["se_med"])]
        per_quantity.append(cells)
        ranked = sorted(r, key=lambda x: rel(x["measured"], x["exact"]), reverse=True)[:3]
        for x in ranked:
            err = x["measured"] / x["exact"] - 1
            worst_rows.append([case.label, f"`{x['node']}`", x["op"], LABELS[x["quantity"]], f"{x['exact']:.4g}",
                               f"{x['measured']:.4g}", f"{err:+.1%}", pct(x["se"] / abs(x["measured"])),
                               f"{x['measured'] / x['paper'] - 1:+.1%}", "yes" if x["trusted"] else "no"])
    if pooled:
        s = summarise(pooled)
        met = s["exact_med"] <= TARGET_MEDIAN and s["exact_max"] <= TARGET_WORST
        rows.append(["**all**", "", "", s["n"], pct(s["paper_med"]), pct(s["paper_max"]), pct(s["exact_med"]),
                     pct(s["exact_max"]), pct(s["se_med"]), f"{s['significant']}/{s['n']}",
                     f"{s['trusted']}: {pct(s['trusted_max'])}", "yes" if met else "**no**"])
    out.append("## All checks (E[x²], E[Δx²] and γ)\n")
    out.append(f"Target for the exact calculus: median ≤ {pct(TARGET_MEDIAN)}, worst ≤ {pct(TARGET_WORST)}. "
               f"“Significant”: exact misses by more than {pct(TARGET_MEDIAN)} and by more than "
               f"{SIGNIFICANT:g} SE. “Trusted”: checks the exact calculus itself judges exact (what `verify` "
               "fails on), their number and worst error.\n")
    out.append(md_table(["network", "sizes", "draws×batch", "checks", "paper median", "paper worst", "exact median",
                         "exact worst", "median SE", "exact significant", "exact trusted: worst",
                         "exact target met"], rows, "ll" + "r" * 9 + "l"))
    out.append("\n## By quantity (median / worst)\n")
    out.append(md_table(["network", "E[x²] paper", "E[x²] exact", "E[x²] SE", "E[Δx²] paper", "E[Δx²] exact",
                         "E[Δx²] SE", "γ paper", "γ exact", "γ SE"], per_quantity))
    out.append("\n## Three worst nodes of the exact calculus per network\n")
    out.append("“trusted”: the exact calculus itself marks the prediction as resting only on exact rules whose "
               "assumptions hold (what `verify` judges).\n")
    out.append(md_table(["network", "node", "op", "quantity", "exact predicted", "measured", "exact error", "SE",
                         "paper error", "trusted"], worst_rows, "llllrrrrrl"))
    if args.detail:
        for case in cases:
            res = results.get(case.label)
            if not res or "rows" not in res:
                continue
            out.append(f"\n## Every check: {case.label}\n")
            detail = [[f"`{x['node']}`", x["op"], LABELS[x["quantity"]], f"{x['measured']:.4g}",
                       pct(x["se"] / abs(x["measured"])), f"{x['exact']:.4g}", f"{x['measured'] / x['exact'] - 1:+.1%}",
                       f"{x['paper']:.4g}", f"{x['measured'] / x['paper'] - 1:+.1%}", "yes" if x["trusted"] else "no"]
                      for x in res["rows"]]
            out.append(md_table(["node", "op", "quantity", "measured", "SE", "exact", "exact error", "paper",
                                 "paper error", "trusted"], detail, "lllrrrrrrl"))
    times = ", ".join(f"{c.label} {results[c.label]['total_s']:.0f} s" for c in cases
                      if c.label in results and "total_s" in results[c.label])
    out.append(f"\n_Wall time {wall:.0f} s; per network (in its worker): {times}; load average at the end "
               f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}._")
    return "\n".join(out)


def _revision() -> str:
    """The checked-out commit, marked when the working tree differs from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "scalecalc"],
                               capture_output=True, text=True, cwd=ROOT, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "(revision unknown)"
    return f"commit {head}" + (" with local changes to scalecalc/" if dirty else "")


# --------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few draws, small sizes")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: 2, or 1 on a single core)")
    parser.add_argument("--draws-scale", type=float, default=1.0, help="multiply every network's draws")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detail", action="store_true", help="also list every check of every network")
    parser.add_argument("--only", action="append", default=[], choices=[c.label for c in CASES],
                        help="measure only this network (repeatable)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or c.label in args.only]
    jobs = []
    for case in cases:
        settings = case.quick_settings if args.quick and case.quick_settings is not None else case.settings
        draws = 6 if args.quick else max(2, round(case.draws * args.draws_scale))
        batch = 4 if args.quick else case.batch
        jobs.append({"label": case.label, "path": case.path, "settings": settings, "draws": draws, "batch": batch,
                     "seed": args.seed, "dtype": args.dtype})
    # the most expensive first, so the workers finish together
    cost = {c.label: c.cost for c in cases}
    jobs.sort(key=lambda j: cost[j["label"]], reverse=True)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
        futures = {pool.submit(measure, job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                res = future.result()
            except Exception as err:  # report the network as failed and go on
                res = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
            res.update(draws=job["draws"], batch=job["batch"])
            results[job["label"]] = res
            log(f"{job['label']}: done after {time.perf_counter() - started:.0f} s")
    print(report(cases, results, args, time.perf_counter() - started))


if __name__ == "__main__":
    main()
