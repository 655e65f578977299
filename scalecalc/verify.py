"""Stage 7: hold every prediction against a sampled forward/backward pass of the emitted model.

For each of N independent weight draws the emitted module (the very file ``emit`` writes) is
run on iid Gaussian inputs with the spec's E[x₀²] and backpropagated from an iid Gaussian
output gradient with E[Δy²] = ``output.grad_second_moment``. Hooks record per node the mean
squares of its output and of the gradient there; per weighted layer E[W²] and the per-sample
E[ΔW²] (a batch gradient sums B independent per-sample gradients, so its mean square is B
times theirs). Channels within one draw share weights, so uncertainty comes from the spread
between draws: the standard error of the mean over draws.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalecalc.errors import ScalecalcError
from scalecalc.graph import Network
from scalecalc.propagate import Analysis

FALSE_ALARM = 0.01  # chance that a correct calculus fails a run, shared over all its checks


def threshold(checks: int, draws: int) -> float:
    """Standard errors beyond which a check fails: the two-sided Student-t quantile for a
    family-wise false-alarm rate FALSE_ALARM over ``checks`` (Bonferroni), ``draws − 1``
    degrees of freedom (Cornish–Fisher expansion around the normal quantile)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - FALSE_ALARM / (2 * max(checks, 1)))
    nu = draws - 1
    return z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)


@dataclass(frozen=True)
class Check:
    node: str
    op: str
    quantity: str  # forward_m2 | backward_m2 | weight_m2 | gamma | hessian
    predicted: float
    measured: float
    se: float
    trusted: bool  # computed only from exact rules whose assumptions hold here

    @property
    def error(self) -> float:
        """Relative error of the prediction: measured/predicted − 1."""
        return self.measured / self.predicted - 1

    def failed(self, tol: float, z: float) -> bool:
        off = abs(self.measured - self.predicted)
        return self.trusted and abs(self.error) > tol and off > z * self.se


@dataclass(frozen=True)
class Verification:
    name: str
    device: str
    draws: int
    batch: int
    seed: int
    tol: float
    checks: tuple[Check, ...]
    seconds: float
    conditioning: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def z(self) -> float:
        return threshold(sum(c.trusted for c in self.checks), self.draws)

    @property
    def failures(self) -> tuple[Check, ...]:
        z = self.z
        return tuple(c for c in self.checks if c.failed(self.tol, z))

    @property
    def passed(self) -> bool:
        return not self.failures


def load_module(source: str, directory: Path, stem: str = "scalecalc_model") -> Any:
    """Import emitted source as a fresh module (written to ``directory``)."""
    path = directory / f"{stem}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(stem, None)
    spec.loader.exec_module(module)
    return module


def sample(module: Any, nodes: list[str], weighted: list[str], *, draws: int, batch: int, input_m2: float = 1.0,
           grad_m2: float = 1.0, seed: int = 0, device: str = "cpu", dtype: str = "float64",
           on_draw: Callable[[int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Per node and quantity, the value measured in each draw."""
    import torch

    torch.manual_seed(seed)
    kind = getattr(torch, dtype)
    out: dict[str, dict[str, list[float]]] = {}
    for draw in range(draws):
        model = module.Model().to(device=device, dtype=kind)
        fwd: dict[str, Any] = {}
        bwd: dict[str, Any] = {}
        hooks = [model.get_submodule(n).register_forward_hook(_keeper(n, fwd, bwd)) for n in nodes]
        x = torch.randn(batch, *module.INPUT_SHAPE, device=device, dtype=kind) * math.sqrt(input_m2)
        x.requires_grad_(True)
        y = model(x)
        (y * torch.randn_like(y) * math.sqrt(grad_m2)).sum().backward()
        forward = torch.stack([fwd[n] for n in nodes]).tolist()  # one device sync per draw
        backward = torch.stack([bwd[n] for n in nodes]).tolist()
        for n, f, b in zip(nodes, forward, backward):
            row = out.setdefault(n, {})
            row.setdefault("forward_m2", []).append(f)
            row.setdefault("backward_m2", []).append(b)
        for n in weighted:
            w = model.get_submodule(n).weight
            m2 = w.detach().square().mean().item()
            row = out.setdefault(n, {})
            row.setdefault("weight_m2", []).append(m2)
            row.setdefault("gamma", []).append(w.grad.square().mean().item() / batch / m2)
        for h in hooks:
            h.remove()
        if on_draw:
            on_draw(draw + 1)
    return out


def _keeper(name: str, fwd: dict[str, Any], bwd: dict[str, Any]) -> Callable[..., None]:
    """Record a node's mean squares as they pass: its output now, its gradient in backward.

    Only two scalars per node are kept, so measuring costs little memory beyond autograd's.
    """
    def hook(module: Any, args: Any, output: Any) -> None:
        fwd[name] = output.detach().square().mean()
        output.register_hook(lambda grad: bwd.__setitem__(name, grad.detach().square().mean()))

    return hook


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ScalecalcError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ScalecalcError(f"unknown device {device!r}; known: auto, cpu, cuda")
    return device


def verify(net: Network, analysis: Analysis, source: str, *, draws: int = 20, batch: int = 16, seed: int = 0,
           tol: float = 0.05, device: str = "auto", dtype: str = "float64", hessian: bool = False,
           conditioning: bool = False, on_draw: Callable[[int], None] | None = None) -> Verification:
    """Measure the module ``source`` emitted for ``net`` and compare with ``analysis``.

    ``hessian`` adds, per weighted layer, the average squared singular value of its diagonal
    Hessian block under the random quadratic loss yᵀRy against Thm 2's γ-based prediction
    (shown, not judged: Thm 2 holds up to an O(1/width) term). ``conditioning`` adds the
    layer-wise λmax and κ of Σx, Σ∇h and their product (Huang et al., Prop. 1).
    """
    from scalecalc.assumptions import check

    if net.symbols:
        raise ScalecalcError("verify needs numbers; drop --symbolic")
    if draws < 2 or batch < 1:
        raise ScalecalcError(f"need --draws ≥ 2 and --batch ≥ 1, got {draws} and {batch}")
    stats = sorted({int(n.attrs["batch"]) for n in net.nodes if n.op == "batchnorm" and n.attrs.get("batch")})
    if stats and stats != [batch]:
        raise ScalecalcError(f"the spec's batchnorms take their statistics over a batch of {stats[0]}, but "
                             f"verify samples batches of {batch}: give --batch {stats[0]}, or set the spec's batch")
    device = resolve_device(device)
    ok = check(net, analysis.calculus)
    nodes = list(net.order[1:])
    weighted = [n.name for n in net.nodes if n.weighted]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(source, Path(tmp))
        measured = sample(module, nodes, weighted, draws=draws, batch=batch, input_m2=float(net.input_m2),
                          grad_m2=float(net.grad_m2), seed=seed, device=device, dtype=dtype, on_draw=on_draw)
        blocks, kappas = {}, {}
        if hessian:
            from scalecalc.hessian import hessian_blocks

            blocks = hessian_blocks(module, weighted, draws=draws, batch=batch, seed=seed, device=device,
                                    dtype=dtype, input_m2=float(net.input_m2))
        if conditioning:
            from scalecalc.hessian import conditioning as layer_conditioning

            kappas = layer_conditioning(module, weighted, batch=batch, seed=seed, device=device, dtype=dtype,
                                        input_m2=float(net.input_m2))
    seconds = time.perf_counter() - start
    checks = []
    for name in nodes:
        r = analysis[name]
        trust = {"forward_m2": ok.forward_ok[name], "backward_m2": ok.backward_ok[name],
                 "weight_m2": True, "gamma": ok.gamma_ok[name] and r.gamma_exact}
        for quantity, values in measured[name].items():
            mean = statistics.fmean(values)
            se = statistics.stdev(values) / math.sqrt(len(values))
            checks.append(Check(name, r.op, quantity, float(getattr(r, quantity)), mean, se, trust[quantity]))
    if blocks:
        from scalecalc.hessian import predicted_hessian

        for name, predicted in predicted_hessian(analysis, net).items():
            values = blocks[name]
            se = statistics.stdev(values) / math.sqrt(len(values))
            checks.append(Check(name, net.node(name).op, "hessian", predicted, statistics.fmean(values), se, False))
    return Verification(net.name, device, draws, batch, seed, tol, tuple(checks), seconds, kappas)
