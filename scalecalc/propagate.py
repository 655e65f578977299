"""Stage 4: push second moments through the graph and derive ς, γ and γ_bias.

Forward in graph order from E[x₀²]; backward in reverse order from E[Δy²] at the output,
where a node read by several layers receives the sum of their (uncorrelated) gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scalecalc import expr
from scalecalc.assumptions import Checks, check
from scalecalc.errors import ScalecalcError
from scalecalc.graph import Network, Node
from scalecalc.rules import RULES

M = Any


@dataclass(frozen=True)
class NodeResult:
    name: str
    op: str
    inputs: tuple[str, ...]
    shape: str
    forward_m2: M
    backward_m2: M
    varsigma: M
    weight_m2: M = None
    gamma: M = None
    gamma_extrinsic: M = None
    gamma_bias: M = None
    exact: bool = True
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class VarsigmaChange:
    node: str
    op: str
    ratio: M
    reason: str


@dataclass(frozen=True)
class Summary:
    gamma_min: M
    gamma_max: M
    gamma_spread: M
    gamma_bias_spread: M
    output_m2: M
    varsigma_changes: tuple[VarsigmaChange, ...]
    exact: bool


@dataclass(frozen=True)
class Analysis:
    network: Network
    nodes: tuple[NodeResult, ...]
    summary: Summary

    @property
    def symbolic(self) -> bool:
        return bool(self.network.symbols)

    def __getitem__(self, name: str) -> NodeResult:
        return next(n for n in self.nodes if n.name == name)


def propagate(net: Network) -> Analysis:
    """Analyse ``net``: per-node moments, ς, γ, γ_bias and a summary."""
    tidy = _simplifier(net)
    fwd: dict[str, M] = {"input": net.input_m2}
    for node in net.nodes[1:]:
        fwd[node.name] = _finite(tidy(RULES[node.op].forward(node, [fwd[s] for s in node.inputs])), node, "E[x²]")
    bwd: dict[str, M] = {name: 0 for name in net.order}
    bwd[net.output] = net.grad_m2
    sent: dict[str, tuple[M, ...]] = {}
    for node in reversed(net.nodes[1:]):
        bwd[node.name] = _finite(tidy(bwd[node.name]), node, "E[Δx²]")
        sent[node.name] = tuple(RULES[node.op].backward(node, [fwd[s] for s in node.inputs],
                                                        bwd[node.name]))
        for src, grad in zip(node.inputs, sent[node.name]):
            bwd[src] = bwd[src] + grad
    bwd["input"] = tidy(bwd["input"])
    checks = check(net)
    results, changes = [], []
    for node in net.nodes:
        result, change = _node_result(node, fwd, bwd, sent.get(node.name, ()), checks, tidy)
        results.append(result)
        if change:
            changes.append(change)
    return Analysis(net, tuple(results), _summary(results, changes, fwd[net.output], tidy))


def _node_result(node: Node, fwd: Mapping[str, M], bwd: Mapping[str, M], sent: tuple[M, ...],
                 checks: Checks, tidy: Any
                 ) -> tuple[NodeResult, VarsigmaChange | None]:
    y, dy = fwd[node.name], bwd[node.name]
    varsigma = tidy(node.shape.size * dy * y)
    if node.op == "input":
        return NodeResult(node.name, "input", (), str(node.shape), y, dy, varsigma), None
    rule = RULES[node.op]
    xs = [fwd[s] for s in node.inputs]
    # ς carried into this node: each input's ς counted with the gradient this node sends it
    varsigma_in = tidy(sum(s.size * x * g for s, x, g in zip(node.in_shapes, xs, sent)))
    notes = [rule.note] if rule.note else []
    notes.extend(checks.notes[node.name])
    weight_m2 = gamma = gamma_ext = gamma_bias = None
    a = node.attrs
    if node.weighted:
        assert node.init is not None
        weight_m2 = node.init.m2
        n_in, n_out, k2, taps = a["n_in"], a["n_out"], a["k2"], a["taps"]
        # Eq. 2 with the ς this layer itself carries back to its input (App. C)
        gamma = tidy(varsigma_in / (n_out * n_in * k2 * weight_m2**2))
        # extrinsic form; without padding T/ρ_out² = k² and T/k² = ρ_out² (App. D, Thm 1)
        gamma_ext = tidy(n_in * taps * taps * xs[0] ** 2 * dy / (node.shape.positions * k2 * y))
        notes.append(str(node.init))
    elif node.op == "scale" and a["learnable"]:
        weight_m2 = a["value"] ** 2
        gamma = tidy(varsigma_in / weight_m2**2)  # App. E: γ = ς/E[u²]²
        gamma_ext = tidy(node.in_shapes[0].size * xs[0] ** 2 * dy / y)  # Eq. 11
    if a.get("bias") is True or node.op == "bias":
        gamma_bias = tidy(node.shape.positions * dy / y)  # Eq. 7: ρ²·E[Δy²]/E[y²]
    change = None
    ratio = tidy(varsigma / varsigma_in)
    if not _is_one(ratio):
        change = VarsigmaChange(node.name, node.op, ratio, rule.keeps_scaling)
        notes.append(f"ς ×{_short(ratio)}: {rule.keeps_scaling}")
    result = NodeResult(node.name, node.op, node.inputs, str(node.shape), y, dy, varsigma,
                        weight_m2, gamma, gamma_ext, gamma_bias, rule.exact and checks.holds(node.name),
                        tuple(notes))
    return result, change


def _summary(results: list[NodeResult], changes: list[VarsigmaChange], out: M, tidy: Any) -> Summary:
    gammas = [r.gamma for r in results if r.gamma is not None]
    biases = [r.gamma_bias for r in results if r.gamma_bias is not None]
    lo, hi, spread = _range(gammas, tidy)
    return Summary(lo, hi, spread, _range(biases, tidy)[2], out, tuple(changes),
                   all(r.exact for r in results))


def _range(values: list[M], tidy: Any) -> tuple[M, M, M]:
    """min, max and max/min; for symbolic values only when they are all equal."""
    if not values:
        return None, None, None
    if any(expr.is_symbolic(v) for v in values):
        distinct = {tidy(v / values[0]) for v in values}
        return (values[0], values[0], 1) if distinct == {1} else (None, None, None)
    lo, hi = min(values), max(values)
    return lo, hi, hi / lo


def _finite(value: M, node: Node, what: str) -> M:
    """Stop at the first moment that leaves the floating-point range, naming the node."""
    if not expr.is_symbolic(value) and not 0 < float(value) < math.inf:
        raise ScalecalcError(f"{node.where}: {what} of {node.name!r} is {float(value):.3g}; the signal "
                             "overflows or vanishes here (check scale values and widths)")
    return value


def _is_one(value: M) -> bool:
    if expr.is_symbolic(value):
        return bool(value == 1)
    return abs(float(value) - 1) < 1e-9


def _short(value: M) -> str:
    return f"{float(value):.4g}" if not expr.is_symbolic(value) else str(value)


def _simplifier(net: Network) -> Any:
    if not net.symbols:
        return lambda v: v
    import sympy

    def tidy(value: M) -> M:
        return sympy.powsimp(sympy.factor_terms(sympy.cancel(sympy.sympify(value))), force=True)

    return tidy
