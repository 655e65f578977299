"""Per group of layers: the part of a gradient's shared part gk that their weights make, sampled and predicted.

    python benchmarks/fresh_parts.py benchmarks/nets/bottleneck_stack.yaml --set nb=3 --set nb2=3 \\
        --set size=16 --fresh stage2.0.short_conv --fresh stage. --at conv0 --at stem --draws 700

At finite width a layer's input gradient leans on the weights it passed through (``scalecalc/
finite.py``). The control is the same draw with the backward pass of a group of layers sent
through independent weights of the same variance: the forward pass, every gate and every
wide-limit moment stay as they were, and what goes is the group's own Stein part B·y and the
Hessian that the group passes on to the layers below it. For each group (``--fresh``, layer
names or prefixes of names joined by ``+``) this prints, at each node ``--at``, the drop in gk
over pairs of runs on the same draws, with its standard error, against the calculus with the
same layers left out (``propagate.states(without=...)``); the ratio is 1 where the calculus has
that group's part right.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from statistics import fmean, stdev

from shared_parts import _moments

from scalecalc import expr
from scalecalc.codegen import emit_torch
from scalecalc.graph import build
from scalecalc.propagate import states
from scalecalc.spec import load
from scalecalc.verify import load_module


def _switchable(model, names, generator, torch):  # type: ignore[no-untyped-def]
    """Give each conv or linear layer in ``names`` independent backward weights of the same
    variance, used while its name is in the returned set."""
    fresh: set[str] = set()
    for name in names:
        layer = model.get_submodule(name)
        other = torch.randn(layer.weight.shape, generator=generator, dtype=layer.weight.dtype)
        other = other * layer.weight.detach().square().mean().sqrt()
        run = layer.forward

        def forward(x, name=name, layer=layer, other=other, run=run):  # type: ignore[no-untyped-def]
            y = run(x)
            if name not in fresh:
                return y
            if isinstance(layer, torch.nn.Conv2d):
                through = layer._conv_forward(x, other, None)
            else:
                through = torch.nn.functional.linear(x, other)
            return y.detach() + through - through.detach()

        layer.forward = forward
    return fresh


def _mean_se(values: list[float]) -> tuple[float, float]:
    return fmean(values), stdev(values) / math.sqrt(len(values))


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a spec parameter")
    p.add_argument("--fresh", action="append", required=True, metavar="NAMES",
                   help="a group of layers (names or prefixes, joined by +) sent through independent weights")
    p.add_argument("--at", action="append", required=True, metavar="NODE", help="a node whose gk is measured")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    overrides = {k: expr.evaluate(v, {}) for k, v in (item.split("=", 1) for item in args.set)}
    spec = load(args.spec)
    net = build(spec, overrides)
    weighted = [n.name for n in net.nodes if n.op in ("conv", "linear")]
    groups = {g: frozenset(w for w in weighted if any(w.startswith(q) for q in g.split("+"))) for g in args.fresh}
    for g, names in groups.items():
        if not names:
            sys.exit(f"--fresh {g}: no conv or linear layer is named so; layers: {', '.join(weighted)}")
    for node in args.at:
        if node not in net.order or not net.node(node).shape.spatial:
            sys.exit(f"--at {node}: not a node with a spatial output")
    _, bwd = states(net)
    _, wide = states(net, finite_width=False)
    dropped = {g: states(net, without=names)[1] for g, names in groups.items()}
    torch.manual_seed(args.seed)
    apart = torch.Generator().manual_seed(args.seed + 1)
    rows: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(emit_torch(spec, net, digest="0"), Path(tmp), "fresh_parts_model")
        for _ in range(args.draws):
            model, seen = module.Model().double(), {}
            fresh = _switchable(model, sorted(set().union(*groups.values())), apart, torch)
            for node in args.at:
                def keep(_, __, y, node=node, seen=seen):  # type: ignore[no-untyped-def]
                    y.register_hook(lambda grad: seen.__setitem__(node, float(_moments(grad, torch)[1])))
                model.get_submodule(node).register_forward_hook(keep)
            x = torch.randn(args.batch, *module.INPUT_SHAPE, dtype=torch.float64) * math.sqrt(float(net.input_m2))
            x.requires_grad_()
            loss, row = None, {}
            for g in ["", *groups]:  # the draw as it is, then each group through independent weights
                fresh.clear()
                fresh.update(groups.get(g, ()))
                y = model(x)
                if loss is None:
                    loss = torch.randn(y.shape, generator=apart, dtype=y.dtype) * math.sqrt(float(net.grad_m2))
                (y * loss).sum().backward()
                row[g] = dict(seen)
            rows.append(row)
    print(f"# fresh parts: {args.spec} {' '.join('--set ' + s for s in args.set)}, {args.draws} draws × batch "
          f"{args.batch}, seed {args.seed}\n")
    print("| node | fresh | gk measured / predicted / wide limit | drop in gk measured | predicted | ratio |")
    print("|:--|:--|--:|--:|--:|--:|")
    for node in args.at:
        gk, se_gk = _mean_se([r[""][node] for r in rows])
        for g in groups:
            drop, se = _mean_se([r[""][node] - r[g][node] for r in rows])
            predicted = float(bwd[node].k - dropped[g][node].k)
            ratio = f"{drop / predicted:.2f} ± {se / predicted:.2f}" if predicted else "—"
            print(f"| `{node}` | `{g}` | {gk:.3e} ± {se_gk:.1e} / {float(bwd[node].k):.3e} / {float(wide[node].k):.3e} "
                  f"| {drop:.3e} ± {se:.1e} | {predicted:.3e} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
