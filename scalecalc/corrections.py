"""Stage 5: the corrected, preconditioned network and the reason for each change.

The calculus fixes every free constant of the design by four conditions, solved jointly:

1. equal γ (Eq. 3, §11): each weighted layer uses geometric init with its own constant,
   c_l = c₀·√(ς_l/ς_ref), where ς_l is the ς the layer carries. In a chain ς is the same
   everywhere and c_l = c₀ = 2/k_typical (§6.2); inside a residual branch that carries β² of
   the stream's ς this gives c_l = β·c₀ (§11);
2. γ_bias = γ (§8, §8.1): a fixed multiplier on each weighted layer's input makes
   n·k²·E[x²]² = 1 there (T/ρ² replaces k² with padding). At the first layer this is the
   input scaling 1/(n₀k²)^¼ of §8.1; elsewhere it is the √(k_typical/k) of §6.2, which keeps
   forward moments on the Eq. 6 track;
3. residual balance (§11): in a weighted ``add`` every branch after the first is rescaled
   to the first one's second moment, so α² + β² = 1 keeps E[y²] = E[x²];
4. output scale (§7): a final multiplier sets the output standard deviation.

Learnable scalars get u = (ς_u/γ)^¼, the √c of Appendix E. All conditions are solved by
iterating the analysis to a fixed point; in a ReLU network the forward conditions converge
in as many sweeps as the network is deep, and the γ condition geometrically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import networkx as nx

from scalecalc import expr
from scalecalc.borders import border_factors
from scalecalc.errors import ScalecalcError
from scalecalc.exact import EXACT
from scalecalc.graph import Network, Node
from scalecalc.init import Init, weight_m2
from scalecalc.propagate import Analysis, propagate
from scalecalc.rules import RULES
from scalecalc.state import State, bordered, scaled

DEFAULT_OUTPUT_STD = 0.05
MAX_SWEEPS = 1000
TOLERANCE = 1e-12
KEEPS = frozenset(op for op, rule in RULES.items() if rule.keeps_scaling.startswith("keeps"))


@dataclass(frozen=True)
class Correction:
    kind: str  # init | input | kernel | balance | residual | learnable | output | warning
    node: str  # the node changed or inserted
    value: float | None
    formula: str
    reason: str


@dataclass(frozen=True)
class Corrected:
    network: Network
    corrections: tuple[Correction, ...]
    inserted: Mapping[str, tuple[str, int]]  # multiplier → (node it feeds, input index); ("", 0): output
    sweeps: int


@dataclass
class _Plan:
    c: dict[str, float]  # weighted node → geometric constant
    pre: dict[str, float]  # weighted node → multiplier on its input
    branch: dict[tuple[str, int], float]  # (add node, input index ≥ 1) → multiplier
    learn: dict[str, float]  # learnable scale → u
    out: float
    bias: dict[str, float]  # standalone bias node → multiplier on its input


def correct(net: Network, output_std: float = DEFAULT_OUTPUT_STD, calculus: str = "exact") -> Corrected:
    """Solve the four conditions under ``calculus`` and return the corrected network."""
    if net.symbols:
        raise ScalecalcError("corrections need numbers; drop --symbolic " + " ".join(net.symbols))
    if not output_std > 0:
        raise ScalecalcError(f"--output-std must be positive, got {output_std}")
    weighted = [n for n in net.nodes if n.weighted]
    if not weighted:
        raise ScalecalcError("the network has no conv or linear layer to correct")
    c0 = _base_constant(net)
    plan = _Plan(
        c={n.name: c0 for n in weighted}, pre={n.name: 1.0 for n in weighted},
        branch={(n.name, i): 1.0 for n in net.nodes if n.op == "add" for i in range(1, len(n.inputs))},
        learn={n.name: float(n.attrs["value"]) for n in net.nodes if n.op == "scale" and n.attrs["learnable"]},
        out=1.0, bias={n.name: 1.0 for n in net.nodes if n.op == "bias"},
    )
    ref = weighted[0].name
    held: dict[str, float] = {}
    for sweep in range(1, MAX_SWEEPS + 1):  # noqa: B007 (reported after the loop)
        change, rules = _forward_sweep(net, plan, output_std, calculus, held)
        a = propagate(apply(net, plan)[0], calculus)
        # where the spatial kernel holds a map, the analysis' E[x²] is its, not the rules': the
        # sweep takes the ratio (unchanged by multipliers on a chain) into the next sweep
        new = {r.name: float(r.forward_m2) / rules[r.name] for r in a.nodes if rules.get(r.name)}
        change = max(change, _balance(plan, a, ref), *(abs(v / held.get(n, 1.0) - 1) for n, v in new.items()))
        held = new
        if change < TOLERANCE:
            break
    else:
        raise ScalecalcError(f"corrections did not converge in {MAX_SWEEPS} sweeps (last change {change:.2g})")
    corrected, origin = apply(net, plan, prune=True)
    inserted = {name: (target, index) for name, (kind, target, index) in origin.items()}
    return Corrected(corrected, tuple(_explain(net, plan, c0, output_std)), inserted, sweeps=sweep)


def _base_constant(net: Network) -> float:
    """c₀: the spec's own network-wide c, else 2/k_typical (§6.2)."""
    first = next(n for n in net.nodes if n.weighted)
    init = first.init
    if init is not None and init.scheme == "geometric" and init.constant != 2 / net.k_typical:
        return float(init.constant)
    return 2 / float(net.k_typical)


def _move(old: float, new: float, change: list[float]) -> float:
    change.append(abs(new / old - 1))
    return new


def _forward_sweep(net: Network, plan: _Plan, output_std: float, calculus: str, held: Mapping[str, float],
                   ) -> tuple[float, dict[str, float]]:
    """Set the forward conditions (2–4) in graph order, each from the moments above it (the
    rules' E[x²] times ``held``, the spatial kernel's ratio to it); return the largest
    relative change and the rules' E[x²] per node."""
    fixed, origin = apply(net, plan)
    change: list[float] = [0.0]
    states = {"input": State(net.input_m2, 0)}
    border = border_factors(fixed) if calculus == "exact" else {}
    for node in fixed.nodes[1:]:
        ins = [states[s] for s in node.inputs]
        xs = [float(x.m) * held.get(s, 1.0) for s, x in zip(node.inputs, ins)]
        kind, target, index = origin.get(node.name, ("", "", 0))
        if kind == "pre":
            value = 1 / math.sqrt(xs[0] * math.sqrt(_k_eff(net.node(target))))
            plan.pre[target] = _move(plan.pre[target], value, change)
        elif kind == "branch":
            source = fixed.node(target).inputs[0]
            value = math.sqrt(states[source].m * held.get(source, 1.0) / xs[0])
            plan.branch[(target, index)] = _move(plan.branch[(target, index)], value, change)
        elif kind == "out":
            value = output_std / math.sqrt(xs[0])
            plan.out = _move(plan.out, value, change)
        elif calculus == "exact":
            out, f = EXACT[node.op].forward(node, ins), border.get(node.name, (1, 1, 1))[0]
            states[node.name] = bordered(out, f)
            continue
        else:
            states[node.name] = State(RULES[node.op].forward(node, xs), 0)
            continue
        states[node.name] = scaled(ins[0], value**2)
    return max(change), {name: float(s.m) for name, s in states.items()}


def _balance(plan: _Plan, a: Analysis, ref: str) -> float:
    """Condition 1 and App. E: move each c (and learnable u) towards the reference γ."""
    change: list[float] = [0.0]
    gamma_ref = float(a[ref].gamma)
    for name, c in plan.c.items():
        plan.c[name] = _move(c, c * math.sqrt(float(a[name].gamma) / gamma_ref), change)
    for name, u in plan.learn.items():
        plan.learn[name] = _move(u, u * (float(a[name].gamma) / gamma_ref) ** 0.25, change)
    for name, v in plan.bias.items():  # γ_bias ∝ 1/v⁴ once the layers below re-balance
        if float(a[name].gamma_bias) > 0:  # zero: a batchnorm below cancels the bias
            plan.bias[name] = _move(v, v * (float(a[name].gamma_bias) / gamma_ref) ** 0.25, change)
    return max(change)


def _k_eff(node: Node) -> float:
    """n·k² of the γ_bias = γ condition, with exact border taps: n·(T/ρ'²)·(T/(k²ρ'²))."""
    a, positions = node.attrs, node.shape.positions
    return float(a["n_in"] * (a["taps"] / positions) * (a["taps"] / (a["k2"] * positions)))


def apply(net: Network, plan: _Plan, prune: bool = False) -> tuple[Network, dict[str, tuple[str, str, int]]]:
    """The network with the plan's inits and fixed multipliers inserted as ``scale`` nodes,
    and for each inserted node the plan entry it comes from."""
    taken = set(net.order)
    nodes: list[Node] = []
    rename: dict[str, str] = {}
    origin: dict[str, tuple[str, str, int]] = {}

    def insert(before: Node, src: str, value: float, suffix: str) -> str:
        if prune and abs(value - 1) < 1e-9:
            return src
        name = _fresh(f"{before.name}_{suffix}", taken)
        if suffix != "in":
            origin[name] = ("branch", before.name, int(suffix[2:]))
        else:
            origin[name] = ("pre" if before.weighted else "bias", before.name, 0)
        shape = before.in_shapes[0] if suffix == "in" else _shape_of(nodes, net, src)
        nodes.append(Node(name, "scale", (src,), MappingProxyType({"value": value, "learnable": False}),
                          shape, (shape,), before.where, block=before.block))
        return name

    for node in net.nodes[1:]:
        inputs = tuple(rename.get(s, s) for s in node.inputs)
        if node.weighted:
            inputs = (insert(node, inputs[0], plan.pre[node.name], "in"),)
            a = node.attrs
            assert node.init is not None
            c = plan.c[node.name]
            init = Init("geometric", c, node.init.distribution,
                        weight_m2("geometric", c, a["n_in"], a["n_out"], a["k"]))
            node = replace(node, inputs=inputs, init=init)
        elif node.op == "add":
            inputs = tuple(s if i == 0 else insert(node, s, plan.branch[(node.name, i)], f"in{i}")
                           for i, s in enumerate(inputs))
            node = replace(node, inputs=inputs)
        elif node.op == "bias":
            node = replace(node, inputs=(insert(node, inputs[0], plan.bias[node.name], "in"),))
        elif node.name in plan.learn:
            attrs = dict(node.attrs, value=plan.learn[node.name])
            node = replace(node, inputs=inputs, attrs=MappingProxyType(attrs))
        else:
            node = replace(node, inputs=inputs)
        nodes.append(node)
    last = nodes[-1]
    out = _fresh("output_scale", taken)
    nodes.append(Node(out, "scale", (last.name,), MappingProxyType({"value": plan.out, "learnable": False}),
                      last.shape, (last.shape,), last.where))
    origin[out] = ("out", "", 0)
    return assemble(net, nodes), origin


def _shape_of(nodes: Sequence[Node], net: Network, name: str):  # type: ignore[no-untyped-def]
    for node in reversed(nodes):
        if node.name == name:
            return node.shape
    return net.node(name).shape


def _fresh(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}{i}", i + 1
    taken.add(candidate)
    return candidate


def assemble(template: Network, nodes: Sequence[Node]) -> Network:
    """A network like ``template`` with ``nodes`` (in graph order) after its input."""
    graph = nx.DiGraph()
    graph.add_node("input", node=template.node("input"))
    for node in nodes:
        graph.add_node(node.name, node=node)
        graph.add_edges_from((src, node.name) for src in node.inputs)
    return replace(template, graph=graph, order=("input", *(n.name for n in nodes)))


def _explain(net: Network, plan: _Plan, c0: float, output_std: float) -> list[Correction]:
    out: list[Correction] = []
    first = next(n for n in net.nodes if n.weighted).name
    for node in net.nodes:
        if node.weighted:
            assert node.init is not None
            c = plan.c[node.name]
            ratio = c / c0
            was = str(node.init)
            if abs(ratio - 1) < 1e-9:
                why = "Eq. 3: geometric init, c₀ = 2/k_typical (§6.2)" if node.init.scheme != "geometric" \
                    or not _same(node.init.constant, c) else ""
                if why:
                    out.append(Correction("init", node.name, c, f"c = {c:.4g}", f"{why}; was {was}"))
            else:
                out.append(Correction("init", node.name, c, f"c = {ratio:.4g}·c₀ = {c:.4g}",
                                      f"§11 equal γ: carries {ratio**2:.4g} of ς, so c = {ratio:.4g}·c₀ "
                                      f"= {c:.4g} (spec: {was})"))
            alpha = plan.pre[node.name]
            if abs(alpha - 1) > 1e-9:
                k = node.attrs["k"]
                rule = f"n·k²·E[x²]² = 1 at {node.name} (n·k² = {_k_eff(node):.4g})"
                if node.name == first:
                    kind, why = "input", f"§8.1 input scaling: {rule}"
                elif k != net.k_typical:
                    kind, why = "kernel", f"§6.2 kernel {k}×{k} vs typical {net.k_typical}: {rule}"
                else:
                    kind, why = "balance", f"§8 γ_bias = γ: {rule}"
                out.append(Correction(kind, f"{node.name}_in", alpha, "×(E[x²]·√(n·k²))^-½", why))
        elif node.op == "add":
            for i in range(1, len(node.inputs)):
                v = plan.branch[(node.name, i)]
                if abs(v - 1) > 1e-9:
                    out.append(Correction("residual", f"{node.name}_in{i}", v, f"×{v:.4g}",
                                          f"§11: E[x²] of {node.inputs[i]} set to that of {node.inputs[0]}"))
        elif node.op == "bias" and abs(plan.bias[node.name] - 1) > 1e-9:
            v = plan.bias[node.name]
            out.append(Correction("balance", f"{node.name}_in", v, "×(γ_bias/γ)^¼",
                                  f"§8: γ_bias = γ at the standalone bias {node.name}"))
        elif node.name in plan.learn:
            u = plan.learn[node.name]
            out.append(Correction("learnable", node.name, u, f"u = {u:.4g}",
                                  "App. E: learnable scalar u = √c of its layers (equal γ)"))
        if node.op not in KEEPS and node.op != "input":
            out.append(Correction("warning", node.name, None, "",
                                  f"{node.op} {RULES[node.op].keeps_scaling}; left as written"))
    out.append(Correction("output", "output_scale", plan.out, f"×{plan.out:.4g}",
                          f"§7: output standard deviation {output_std:g}"))
    return out


def _same(a: object, b: float) -> bool:
    return not expr.is_symbolic(a) and abs(float(a) / b - 1) < 1e-9  # type: ignore[arg-type]
