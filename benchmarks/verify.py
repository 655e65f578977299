"""Benchmark `scalecalc verify`: hook overhead and wall time on the ResNet-50 spec.

    python benchmarks/verify.py            # documented run (docs/performance.md)
    python benchmarks/verify.py --quick    # smoke run

1. Hook overhead: one draw of `verify`'s measurement (forward hooks that keep every node's
   output and retain its gradient, plus the weight statistics) against a plain forward and
   backward of the same module and batch. Target ≤ 1.5×.
2. Wall time of `verify` on specs/resnet50_preact.yaml at 224×224, batch 64, 10 draws, on
   the CPU and, when CUDA is available, on the GPU (target < 30 s on one H100). On a small
   CPU the draws are timed individually and the total extrapolated; the table says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from scalecalc.codegen import emit_torch
from scalecalc.corrections import correct
from scalecalc.graph import build
from scalecalc.propagate import propagate
from scalecalc.spec import load
from scalecalc.verify import load_module, sample, verify

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "resnet50_preact.yaml"


def build_resnet(size: int, w: int):  # type: ignore[no-untyped-def]
    spec = load(SPEC)
    fixed = correct(build(spec, {"size": size, "w": w}))
    return fixed.network, emit_torch(spec, fixed.network, digest="0", inserted=fixed.inserted)


def plain_step(module, batch: int, device: str) -> float:  # type: ignore[no-untyped-def]
    """Build the model (a draw of weights), forward, backward: what a draw costs without hooks."""
    start = time.perf_counter()
    model = module.Model().to(device=device, dtype=torch.float64)
    x = torch.randn(batch, *module.INPUT_SHAPE, device=device, dtype=torch.float64, requires_grad=True)
    y = model(x)
    (y * torch.randn_like(y)).sum().backward()
    _sync(device)
    return time.perf_counter() - start


def hooked_step(module, net, batch: int, device: str) -> float:  # type: ignore[no-untyped-def]
    weighted = [n.name for n in net.nodes if n.weighted]
    start = time.perf_counter()
    sample(module, list(net.order[1:]), weighted, draws=1, batch=batch, device=device)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def overhead(size: int, w: int, batch: int, repeats: int, device: str) -> tuple[float, float]:
    net, source = build_resnet(size, w)
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(source, Path(tmp), "bench_model")
        plain_step(module, batch, device)  # warm-up
        hooked_step(module, net, batch, device)
        plain = statistics.median(plain_step(module, batch, device) for _ in range(repeats))
        hooked = statistics.median(hooked_step(module, net, batch, device) for _ in range(repeats))
    return plain, hooked


def full_verify(size: int, w: int, batch: int, draws: int, device: str) -> float:
    net, source = build_resnet(size, w)
    start = time.perf_counter()
    verify(net, propagate(net), source, draws=draws, batch=batch, device=device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}\n")
    size, w, batch = (32, 8, 8) if args.quick else (64, 64, 16)
    print("## Hook overhead (ResNet-50 spec, one draw, float64)\n")
    print("| device | input | batch | plain fwd+bwd (s) | verify's draw (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for device in devices:
        plain, hooked = overhead(size, w, batch, 2 if args.quick else 5, device)
        print(f"| {device} | {size}×{size}, w={w} | {batch} | {plain:.3f} | {hooked:.3f} | {hooked / plain:.2f}× |")
    print("\n## verify wall time (ResNet-50 spec, 224×224, batch 64)\n")
    print("| device | draws run | seconds | per draw | 10 draws (s) |")
    print("|---|---|---|---|---|")
    for device in devices:
        draws = 2 if (args.quick or device == "cpu") else args.draws
        size, batch = (32, 4) if args.quick else (224, 64)
        seconds = full_verify(size, 64 if not args.quick else 8, batch, draws, device)
        note = "" if draws == 10 else " (extrapolated)"
        print(f"| {device} | {draws} | {seconds:.1f} | {seconds / draws:.1f} | {10 * seconds / draws:.0f}{note} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
