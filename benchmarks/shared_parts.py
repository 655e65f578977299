"""Per node: the exact calculus' shared parts against a sampled network — where a γ error starts.

    python benchmarks/shared_parts.py specs/resnet50_preact.yaml --set w=16 --set size=128 --corrected
    python benchmarks/shared_parts.py benchmarks/nets/resnet18_bn.yaml --set w=16 --draws 100 --batch 16

γ's pair terms multiply the input's shared part k (the covariance of two positions of a channel)
by the gradient's gk over the P − 1 pairs of a map, so on large maps a small error in k/m or gk/g
becomes a large one in γ. For every node with a spatial output this prints, next to the relative
error of E[x²], E[Δx²] and γ, the predicted and the measured k/m and gk/g, estimated from the
per-channel sums over positions: k = (E[(Σ_p x_p)²]/P − m)/(P − 1), unbiased. Where the
finite-width part B·y (``scalecalc/finite.py``) moves gk/g by 1% or more, the last columns give
the wide limit's gk/g and how much of B·y's predicted share of gk was measured:
(measured − wide limit)/(predicted − wide limit), 1 where B·y is right.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from scalecalc import expr
from scalecalc.codegen import emit_torch
from scalecalc.corrections import correct
from scalecalc.graph import build
from scalecalc.propagate import propagate, states
from scalecalc.spec import load
from scalecalc.verify import load_module


def _moments(t, torch):  # type: ignore[no-untyped-def]
    """E[t²] and the covariance of two different positions of one channel (0 without positions)."""
    t = t.detach().double()
    m = t.square().mean()
    if t.dim() != 4 or t.shape[2] * t.shape[3] == 1:
        return torch.stack([m, torch.zeros_like(m)])
    p = t.shape[2] * t.shape[3]
    return torch.stack([m, (t.sum((2, 3)).square().mean() / p - m) / (p - 1)])


def _keeper(name, out, grad, torch):  # type: ignore[no-untyped-def]
    """A forward hook that records a node's moments, and its gradient's in the backward pass."""
    def hook(module, inputs, result):  # type: ignore[no-untyped-def]
        out[name] = _moments(result, torch)
        result.register_hook(lambda g: grad.__setitem__(name, _moments(g, torch)))

    return hook


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a spec parameter")
    p.add_argument("--corrected", action="store_true", help="measure the network `emit` writes (corrected)")
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    overrides = {k: expr.evaluate(v, {}) for k, v in (item.split("=", 1) for item in args.set)}
    spec = load(args.spec)
    net, inserted = build(spec, overrides), None
    if args.corrected:
        fixed = correct(net)
        net, inserted = fixed.network, fixed.inserted
    analysis, (fwd, bwd), (_, wide) = propagate(net), states(net), states(net, finite_width=False)
    source = emit_torch(spec, net, digest="0", inserted=inserted) if inserted else emit_torch(spec, net, digest="0")
    nodes = list(net.order[1:])
    weighted = [n.name for n in net.nodes if n.weighted]
    measured = {n: [] for n in nodes}
    gammas = {n: [] for n in weighted}
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(source, Path(tmp), "shared_parts_model")
        for _ in range(args.draws):
            model, out, grad = module.Model(), {}, {}
            hooks = [model.get_submodule(n).register_forward_hook(_keeper(n, out, grad, torch)) for n in nodes]
            x = (torch.randn(args.batch, *module.INPUT_SHAPE) * math.sqrt(float(net.input_m2))).requires_grad_()
            y = model(x)
            (y * torch.randn_like(y) * math.sqrt(float(net.grad_m2))).sum().backward()
            for n in nodes:
                measured[n].append(torch.cat([out[n], grad[n]]).tolist())
            for n in weighted:
                w = model.get_submodule(n).weight
                gammas[n].append(w.grad.square().mean().item() / args.batch / w.detach().square().mean().item())
            for h in hooks:
                h.remove()
    print(f"# shared parts: {args.spec} {' '.join('--set ' + s for s in args.set)}"
          f"{' (corrected)' if args.corrected else ''}, {args.draws} draws × batch {args.batch}\n")
    print("| node | op | E[x²] error | k/m predicted / measured | E[Δx²] error | gk/g predicted / measured | γ error "
          "| gk/g wide limit | B·y measured / predicted |")
    print("|:--|:--|--:|--:|--:|--:|--:|--:|--:|")
    for n in nodes:
        m, k, g, gk = np.mean(measured[n], axis=0)
        f, b = fwd[n], bwd[n]
        gamma = f"{np.mean(gammas[n]) / float(analysis[n].gamma) - 1:+.1%}" if n in gammas else ""
        shared, limit = float(b.k / b.m), float(wide[n].k / wide[n].m)
        moved = shared and abs(shared - limit) >= 0.01 * abs(shared)
        part = f"{limit:.4g} | {(gk / g - limit) / (shared - limit):.2f}" if moved else " | "
        print(f"| `{n}` | {net.node(n).op} | {m / float(f.m) - 1:+.1%} | {float(f.k) / float(f.m):.4f} / {k / m:.4f} | "
              f"{g / float(b.m) - 1:+.1%} | {shared:.4g} / {gk / g:.4g} | {gamma} | {part} |")


if __name__ == "__main__":
    sys.exit(main())
