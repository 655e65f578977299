"""Sampling an emitted module: per-node moments and weight-to-gradient ratios over weight draws."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


def load_module(source: str, path: Path):  # type: ignore[no-untyped-def]
    """Import emitted source written to ``path`` as a fresh module."""
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float  # standard error from the draw-to-draw spread


def _estimate(values: list[float]) -> Estimate:
    return Estimate(statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)))


def _keep(name: str, outputs: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    def hook(module, args, out):  # type: ignore[no-untyped-def]
        out.retain_grad()
        outputs[name] = out

    return hook


def sample(module, nodes: list[str], weighted: list[str], draws: int, batch: int,  # type: ignore[no-untyped-def]
           input_m2: float = 1.0, seed: int = 0) -> dict[str, dict[str, Estimate]]:
    """E[y²], E[Δy²] per node and the per-sample E[ΔW²]/E[W²] per weighted layer.

    Inputs are iid N(0, input_m2), the output gradient iid N(0, 1), float64. The batch's
    weight gradient is a sum of ``batch`` independent per-sample gradients, so its second
    moment is ``batch`` times the per-sample one.
    """
    torch.manual_seed(seed)
    raw: dict[str, dict[str, list[float]]] = {}
    for _ in range(draws):
        model = module.Model().double()
        outputs: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(n).register_forward_hook(_keep(n, outputs)) for n in nodes]
        x = torch.randn(batch, *module.INPUT_SHAPE, dtype=torch.float64) * math.sqrt(input_m2)
        x.requires_grad_(True)
        y = model(x)
        (y * torch.randn_like(y)).sum().backward()
        for n in nodes:
            out = outputs[n]
            row = raw.setdefault(n, {})
            row.setdefault("forward", []).append(out.detach().square().mean().item())
            row.setdefault("backward", []).append(out.grad.square().mean().item())
        for n in weighted:
            w = model.get_submodule(n).weight
            ratio = w.grad.square().mean().item() / batch / w.detach().square().mean().item()
            raw.setdefault(n, {}).setdefault("ratio", []).append(ratio)
        for h in handles:
            h.remove()
    return {n: {k: _estimate(v) for k, v in row.items()} for n, row in raw.items()}
