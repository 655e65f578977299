"""Per batchnorm: how much its channels' variances σ_c² spread, and where the spread comes from.

    python benchmarks/bn_spread.py benchmarks/nets/bn_chain.yaml --set w=128 --draws 60
    python benchmarks/bn_spread.py benchmarks/nets/resnet18_bn.yaml --set w=16 --set size=32 --draws 20

A batchnorm divides each channel by σ̂_c, so its gradient carries E[1/σ̂_c²], which exceeds
1/E[σ̂_c²] by about the squared coefficient of variation of σ̂_c² over channels (Jensen). For
every batchnorm of the spec as written this prints, at the training batch B (the spec's
``batch``, else ``--batch``), the measured E[1/σ̂_c²]·E[σ̂_c²] − 1 next to the calculus' factor,
and, from one large batch (``--large``) where the sample noise of σ̂² is negligible, the split
σ_c² = Q_c + N_c: Q_c the variance over positions of the channel's per-position mean (shared by
all samples, and not removed by the batchnorm, which subtracts only its average), N_c the
variance of the samples around it. Each draw's σ̂_c² are taken relative to their mean over
that draw's channels, so the common scale of a draw drops out.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from scalecalc import expr
from scalecalc.codegen import emit_torch
from scalecalc.graph import build
from scalecalc.normalise import variance_spread
from scalecalc.propagate import states
from scalecalc.spec import load
from scalecalc.verify import load_module


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a spec parameter")
    p.add_argument("--draws", type=int, default=40)
    p.add_argument("--batch", type=int, default=16, help="batch where the spec's batchnorms name none")
    p.add_argument("--large", type=int, default=1024, help="batch for the Q/N split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    overrides = {k: expr.evaluate(v, {}) for k, v in (item.split("=", 1) for item in args.set)}
    spec = load(args.spec)
    net = build(spec, overrides)
    fwd, _ = states(net)
    norms = [n for n in net.nodes if n.op == "batchnorm"]
    batch = next((int(n.attrs["batch"]) for n in norms if n.attrs.get("batch")), args.batch)
    seen: dict[str, list] = {n.name: [] for n in norms}
    split: dict[str, list] = {n.name: [] for n in norms}
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        module = load_module(emit_torch(spec, net, digest="0"), Path(tmp), "bn_spread_model")
        for _ in range(args.draws):
            model = module.Model().train()
            inputs: dict[str, torch.Tensor] = {}
            hooks = [model.get_submodule(n.name).register_forward_hook(
                lambda mod, ins, out, name=n.name, into=inputs: into.__setitem__(name, ins[0].double()))
                for n in norms]
            for size, keep in ((batch, seen), (args.large, split)):
                model(torch.randn(size, *module.INPUT_SHAPE) * math.sqrt(float(net.input_m2)))
                for name, x in inputs.items():
                    if keep is seen:
                        v = x.var(dim=(0, 2, 3), unbiased=False) if x.dim() == 4 else x.var(dim=0, unbiased=False)
                        seen[name].append(v / v.mean())
                    elif x.dim() == 4:
                        o = x.mean(0)
                        q = (o - o.mean((1, 2), keepdim=True)).square().mean((1, 2))
                        total = (x - o).square().mean((0, 2, 3)) + q
                        split[name].append(torch.stack([q / total.mean(), total / total.mean() - q / total.mean()]))
            for h in hooks:
                h.remove()
    print(f"# batchnorm spread: {args.spec} {' '.join('--set ' + s for s in args.set)}, {args.draws} draws, "
          f"batch {batch} (split at batch {args.large})\n")
    print("| batchnorm | positions | E[1/σ̂²]·E[σ̂²] − 1 measured | calculus | CV of σ̂² | Q/σ² | CV of Q | CV of N |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|")
    for node in norms:
        v = torch.cat(seen[node.name])
        factor = variance_spread(node, fwd[node.inputs[0]])
        if split[node.name]:
            q, n = torch.cat(split[node.name], dim=1)
            parts = f"{q.mean().item():.3f} | {(q.std() / q.mean()).item():.2f} | {(n.std() / n.mean()).item():.3f}"
        else:
            parts = " | | "
        print(f"| `{node.name}` | {node.shape.positions} | {(1 / v).mean().item() - 1:+.2%} | "
              f"{float(factor) - 1:+.2%} | {v.std().item():.3f} | {parts} |")


if __name__ == "__main__":
    sys.exit(main())
