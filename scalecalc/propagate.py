"""Stage 4: push second moments through the graph and derive ς, γ and γ_bias.

Forward in graph order from E[x₀²]; backward in reverse order from E[Δy²] at the output,
where a node read by several layers receives the sum of their (uncorrelated) gradients.
Two calculi: ``paper`` (the rule registry, uncentred moments as published) and ``exact``
(``exact.py``: the same moments plus the covariance that positions of a channel share).
Where ``finite`` applies, the exact backward pass runs twice: the wide-limit gradients set the
O(1/n) part B·y of a gradient that follows its own input, which the second pass adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from scalecalc import channels, expr, finite
from scalecalc.assumptions import Checks, check
from scalecalc.borders import border_factors
from scalecalc.errors import ScalecalcError
from scalecalc.exact import EXACT, bias_grad_m2, mask_grad_m2, weight_grad_m2
from scalecalc.graph import Network, Node
from scalecalc.normalise import profile_weights
from scalecalc.rules import BN_EPS, RULES, Rule
from scalecalc.state import State, added, bordered, is_zero, ratio

if TYPE_CHECKING:
    from scalecalc.kernel import Kernel

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
    gamma_exact: bool = True  # False where γ rests on the approximate pair terms


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


CALCULI = ("exact", "paper")
LIMIT = 1e150  # a moment this far from 1 has vanished or exploded; products must stay finite
VARSIGMA_TOLERANCE = 0.02  # exact calculus: smaller ς drifts (border taps) are not reported as changes
PAIR_SHARE = 0.1  # γ is trusted as exact only while pair terms stay below this share of E[ΔW²]
TIDY_OPS = 200  # larger symbolic moments are left as built: simplifying them costs more than it shows


@dataclass(frozen=True)
class Analysis:
    network: Network
    nodes: tuple[NodeResult, ...]
    summary: Summary
    calculus: str = "exact"

    @property
    def symbolic(self) -> bool:
        return bool(self.network.symbols)

    def __getitem__(self, name: str) -> NodeResult:
        return next(n for n in self.nodes if n.name == name)


def propagate(net: Network, calculus: str = "exact") -> Analysis:
    """Analyse ``net``: per-node moments, ς, γ and γ_bias and a summary."""
    if calculus not in CALCULI:
        raise ScalecalcError(f"unknown calculus {calculus!r}; known: {', '.join(CALCULI)}")
    tidy = _simplifier(net)
    exact = calculus == "exact"
    border, fwd, bwd, sent, spatial, wide = _states(net, exact, tidy)
    checks = check(net, calculus)
    results, changes = [], []
    masks = _masks(net, bwd) if exact else {}
    normalised = _normalised(net) if exact else set()
    for node in net.nodes:
        result, change = _node_result(node, fwd, bwd, sent.get(node.name, ()), checks, tidy, exact,
                                      masks, border.get(node.name, (1, 1, 1))[2], node.name in normalised, spatial,
                                      bool(net.symbols))
        if node.weighted and node.name in wide:
            result = replace(result, notes=(*result.notes, _finite_note(wide[node.name], bwd[node.name])))
        results.append(result)
        if change:
            changes.append(change)
    summary = _summary(results, changes, fwd[net.output].m, tidy)
    return Analysis(net, tuple(results), summary, calculus)


def states(net: Network, finite_width: bool = True, without: frozenset[str] = frozenset()
           ) -> tuple[dict[str, State], dict[str, State]]:
    """The exact calculus' full state of every node, forward and backward (for diagnostics:
    the shared parts k and gk, means, groups, batch coupling); the wide limit alone without
    ``finite_width``; ``without`` the finite-width part of the layers named there
    (``finite.coherent``), as independent backward weights in them would have it."""
    _, fwd, bwd, _, _, _ = _states(net, True, _simplifier(net), finite_width, without)
    return fwd, bwd


Borders = dict[str, tuple[float, float, float]]


def _states(net: Network, exact: bool, tidy: Any, finite_width: bool = True, without: frozenset[str] = frozenset()
            ) -> tuple[Borders, dict[str, State], dict[str, State], dict[str, tuple[State, ...]], Kernel | None,
                       dict[str, State]]:
    """Border factors, forward and backward states, what each node sends back, the spatial
    kernel, and the wide-limit gradients where the finite-width part changed them."""
    forward = {op: r.forward for op, r in EXACT.items()} if exact else {op: _lift(r) for op, r in RULES.items()}
    backward = {op: r.backward for op, r in EXACT.items()} if exact else {op: _lift_back(r) for op, r in RULES.items()}
    border = border_factors(net) if exact and not net.symbols else {}
    fwd = _forward(net, forward, tidy, border)
    # a batchnorm keeps offsets that vary over positions; the profile they give the moments
    # below it needs the forward moments, so where there are any the forward pass runs again
    offsets = {} if not border else {
        node.name: w for node in net.nodes if node.op == "batchnorm" and net.node(node.inputs[0]).op == "conv"
        and (w := profile_weights(node, fwd[node.inputs[0]])) is not None}
    if offsets:
        border = border_factors(net, offsets)
        fwd = _forward(net, forward, tidy, border)
    # where the maps are small, the pair structure of the gradient comes from the spatial kernel
    spatial = maps = None
    if exact and not net.symbols:
        from scalecalc import kernel  # numpy, only for numbers

        maps = kernel.hold(net, fwd)
        spatial = None if maps is None else kernel.backward(net, maps, fwd)
        for name, (m, k) in ({} if spatial is None else spatial.forward).items():
            fwd[name] = replace(fwd[name], m=m, k=fwd[name].k if k is None else k)
    bwd, sent = _backward(net, fwd, backward, tidy, border, spatial)
    wide: dict[str, State] = {}
    if exact and finite_width and finite.applies(net):  # the O(1/n) part the wide limit leaves out, from its gradients
        extra = finite.coherent(net, fwd, bwd, without)
        if maps is not None:
            spatial = kernel.backward(net, maps, fwd, extra)
        first = bwd
        bwd, sent = _backward(net, fwd, backward, tidy, border, spatial, extra)
        wide = {n: g for n, g in first.items() if _changed(g, bwd[n])}
    return border, fwd, bwd, sent, spatial, wide


def _backward(net: Network, fwd: Mapping[str, State], backward: Mapping[str, Any], tidy: Any, border: Borders,
              spatial: Kernel | None, extra: finite.Coherent | None = None
              ) -> tuple[dict[str, State], dict[str, tuple[State, ...]]]:
    """Every node's gradient, from E[Δy²] at the output; with ``extra``, the part B·y a
    gradient carries at finite width (``finite``), where the spatial kernel does not hold it."""
    held = set() if spatial is None else set(spatial.forward)
    bwd: dict[str, State] = {name: State(0, 0) for name in net.order}
    bwd[net.output] = State(net.grad_m2, 0)
    sent: dict[str, tuple[State, ...]] = {}
    for node in reversed(net.nodes[1:]):
        g, y = bwd[node.name], fwd[node.name]
        fork = None if extra is None else extra.at_fork(node.name)
        if fork is not None:  # its readers' B·x parts add as amplitudes, where the rules added powers
            dm, dk = finite.power(fork[0], fork[1], y, fork[2])
            g = replace(g, m=g.m + dm, k=g.k + dk)
        bwd[node.name] = g = _tidied(g, tidy, net, node, "E[Δx²]")
        b = border.get(node.name, (1, 1, 1))[1]
        sent[node.name] = tuple(bordered(s, b) for s in backward[node.op](node, [fwd[s] for s in node.inputs], g))
        if extra is not None and node.name in extra.relus and node.name not in held:
            (dx,), (vd, vy, vx, local) = sent[node.name], extra.at_relu(node.name)
            (my, ky), (mx, kx) = finite.power(vd, vy, y, local), finite.power(vd, vx, y, local)
            (gated,) = backward[node.op](node, [fwd[node.inputs[0]]], State(my, ky))  # the rule gates B·y,
            sent[node.name] = (replace(dx, m=dx.m + mx - gated.m, k=dx.k + kx - gated.k),)  # which passes whole
        if spatial is not None and node.name in spatial.sent:
            pairs = zip(sent[node.name], spatial.sent[node.name])
            sent[node.name] = tuple(_held_gradient(s, m, r) for s, (m, r) in pairs)
        if extra is not None and node.name in extra.inputs and node.inputs[0] not in held:  # Stein's B·x
            (dx,), (vd, vt, local) = sent[node.name], extra.at_input(node.name)
            dm, dk = finite.power(vd, vt, fwd[node.inputs[0]], local)
            sent[node.name] = (replace(dx, m=dx.m + dm, k=dx.k + dk),)
        for src, grad in zip(node.inputs, sent[node.name]):
            bwd[src] = grad if bwd[src] == State(0, 0) else added(bwd[src], grad)
    bwd["input"] = replace(bwd["input"], m=tidy(bwd["input"].m), k=tidy(bwd["input"].k))
    return bwd, sent


def _changed(wide: State, g: State) -> bool:
    """The finite-width part moves E[Δx²] by 1% or the shared part gk by 5%."""
    return abs(float(ratio(g.m, wide.m)) - 1) > 0.01 or (wide.k != 0 and abs(float(g.k / wide.k) - 1) > 0.05)


def _finite_note(wide: State, g: State) -> str:
    shared = f", gk/g ×{float(g.k / g.m / (wide.k / wide.m)):.2f}" if wide.k != 0 and g.m != 0 else ""
    return f"finite width (B·y, O(1/n)): E[Δx²] {100 * (float(g.m / wide.m) - 1):+.1f}%{shared} over the wide limit"


def _forward(net: Network, forward: Mapping[str, Any], tidy: Any, border: Borders) -> dict[str, State]:
    fwd: dict[str, State] = {"input": State(net.input_m2, 0)}
    for node in net.nodes[1:]:
        xs = [fwd[s] for s in node.inputs]
        out = forward[node.op](node, xs)
        out = bordered(out, border.get(node.name, (1, 1, 1))[0])
        if not net.symbols:  # formulas of 1/n terms: numbers only
            if node.weighted and node.op in ("conv", "linear"):
                out = replace(out, rank=channels.patch(node, xs[0]))
            out = replace(out, cross=channels.cross(node, xs, out), cross_near=channels.near(node, xs, out))
        fwd[node.name] = _tidied(out, tidy, net, node, "E[x²]")
    return fwd


def _tidied(s: State, tidy: Any, net: Network, node: Node, what: str) -> State:
    """s with m simplified and checked. With symbols, k, shared and batch become multiples
    of that m, so that a ratio such as ρ = k/m stays a number where it is one."""
    m = _finite(tidy(s.m), node, what)
    if not net.symbols:
        return replace(s, m=m)
    def part(v: M) -> M:
        return v if v is None or is_zero(v) else tidy(ratio(v, s.m)) * m

    return replace(s, m=m, k=part(s.k), shared=part(s.shared), batch=part(s.batch))


def _held_gradient(s: State, m: float | None, ratio: float) -> State:
    """A sent gradient with the spatial kernel's E[Δx²] (where it has one) and gk/g."""
    g = s.m if m is None else m
    return replace(s, m=g, k=g * ratio)


def _masks(net: Network, bwd: Mapping[str, State]) -> dict[str, tuple[M, State]]:
    """Weighted layers read only by one (leaky) ReLU: its slope and its output gradient."""
    out = {}
    for node in net.nodes:
        consumers = list(net.graph.successors(node.name))
        if node.weighted and len(consumers) == 1 and net.node(consumers[0]).op in ("relu", "leaky_relu"):
            relu = net.node(consumers[0])
            out[node.name] = (relu.attrs.get("slope", 0), bwd[relu.name])
    return out


def _normalised(net: Network) -> set[str]:
    """Weighted layers whose every reader is a batchnorm, directly or through concats and
    average pools (linear and per channel, so Σ Δy·y = 0 still holds at the layer)."""
    def normalised(name: str) -> bool:
        readers = [net.node(c) for c in net.graph.successors(name)]
        return bool(readers) and all(r.op == "batchnorm" or (r.op in ("concat", "avgpool") and normalised(r.name))
                                     for r in readers)

    return {node.name for node in net.nodes if node.weighted and normalised(node.name)}


def _lift(rule: Rule) -> Any:
    return lambda node, xs: State(rule.forward(node, [x.m for x in xs]), 0)


def _lift_back(rule: Rule) -> Any:
    return lambda node, xs, dy: tuple(State(g, 0) for g in rule.backward(node, [x.m for x in xs], dy.m))


def _node_result(node: Node, fwd_states: Mapping[str, State], bwd_states: Mapping[str, State],
                 sent_states: tuple[State, ...], checks: Checks, tidy: Any, exact: bool,
                 masks: Mapping[str, tuple[M, State]], border: float, normalised: bool = False,
                 spatial: Kernel | None = None, symbolic: bool = False) -> tuple[NodeResult, VarsigmaChange | None]:
    y, dy = fwd_states[node.name].m, bwd_states[node.name].m
    sent = tuple(g.m for g in sent_states)
    varsigma = tidy(node.shape.size * dy * y)
    if node.op == "input":
        return NodeResult(node.name, "input", (), str(node.shape), y, dy, varsigma), None
    rule = RULES[node.op]
    xs = [fwd_states[s].m for s in node.inputs]
    # ς carried into this node: each input's ς counted with the gradient this node sends it
    varsigma_in = tidy(sum(s.size * x * g for s, x, g in zip(node.in_shapes, xs, sent)))
    note = EXACT[node.op].note if exact else rule.note
    notes = [note] if note else []
    notes.extend(checks.notes[node.name])
    mean = fwd_states[node.inputs[0]].mean if exact else 0
    if node.op in ("relu", "leaky_relu") and expr.is_symbolic(mean):  # no closed form: flagged, not exact
        note = f"{node.op}: input has a mean (a ReLU on an identity path); symbolic mode takes it as centred"
        notes.append(note)
    if node.op in ("batchnorm", "layernorm") and expr.is_symbolic(xs[0]):
        notes.append(f"{node.op}: σ² is symbolic and taken as ≫ ε = {BN_EPS:g} (numbers with --set keep ε)")
    if node.op == "batchnorm" and exact and symbolic:
        notes.append("batchnorm: symbolic mode takes the channels it reads as independent (their covariance "
                     "at finite width needs numbers)")
    weight_m2 = gamma = gamma_ext = gamma_bias = None
    gamma_exact = True
    a = node.attrs
    if node.weighted:
        assert node.init is not None
        weight_m2 = node.init.m2
        n_in, n_out, k2, taps = a["n_in"], a["n_out"], a["k2"], a["taps"]
        # extrinsic form; without padding T/ρ_out² = k² and T/k² = ρ_out² (App. D, Thm 1)
        gamma_ext = tidy(n_in * taps * taps * xs[0] ** 2 * dy / (node.shape.positions * k2 * y))
        if exact:  # Thm 1 directly, with the pair terms of shared offsets and pooled gradients
            x_state, g_state = fwd_states[node.inputs[0]], bwd_states[node.name]
            held = None if spatial is None else spatial.weight_grad.get(node.name)
            if held is not None:  # every pair of positions in the wide limit, and the mask's 1/fan-in
                grad = held + mask_grad_m2(node, x_state, fwd_states[node.name], masks.get(node.name))
            else:
                grad = border * weight_grad_m2(node, x_state, fwd_states[node.name], g_state, masks.get(node.name))
            nu = fwd_states[node.name].dof
            if normalised and nu is not None:  # BN's gradient is ⟂ its input ŷ ∝ W·x, so ΔW ⟂ W: 1 of ν directions
                grad = grad * (1 - fwd_states[node.name].rank / nu)  # ρ/ν where the input's channels covary
            gamma = tidy(grad / weight_m2)
            single = border * weight_grad_m2(node, State(x_state.m, 0), fwd_states[node.name], State(g_state.m, 0))
            share = 1 - single / grad if not expr.is_symbolic(grad) else 0
            if share > PAIR_SHARE:
                gamma_exact = False
                notes.append(f"γ: {100 * share:.0f}% of E[ΔW²] is pair terms of shared offsets and pooled "
                             "gradients (" + ("every pair of positions, wide limit" if held is not None else
                                              "Gaussian, independence approximations") + ")")
        else:  # Eq. 2 with the ς this layer itself carries back to its input (App. C)
            gamma = tidy(varsigma_in / (n_out * n_in * k2 * weight_m2**2))
        notes.append(str(node.init))
    elif node.op == "scale" and a["learnable"]:
        weight_m2 = a["value"] ** 2
        gamma = tidy(varsigma_in / weight_m2**2)  # App. E: γ = ς/E[u²]²
        gamma_ext = tidy(node.in_shapes[0].size * xs[0] ** 2 * dy / y)  # Eq. 11
    if a.get("bias") is True or node.op == "bias":
        if exact and spatial is not None and node.name in spatial.bias_grad:
            gamma_bias = spatial.bias_grad[node.name] / y
        elif exact:  # E[Δb²]/E[y²], the pair terms included
            gamma_bias = tidy(bias_grad_m2(node, bwd_states[node.name]) / y)
            if is_zero(gamma_bias):
                notes.append("bias: a batchnorm below subtracts it again; its gradient is zero")
        else:  # Eq. 7: ρ²·E[Δy²]/E[y²]
            gamma_bias = tidy(node.shape.positions * dy / y)
    change = None
    ratio = tidy(varsigma / varsigma_in) if varsigma_in != 0 else 1  # 0: underflow, nothing to compare
    if not _is_one(ratio, VARSIGMA_TOLERANCE if exact else 1e-9):
        reason = rule.keeps_scaling
        if reason.startswith("keeps") and node.op in ("relu", "leaky_relu") and not is_zero(mean):
            reason = "its input has a mean (a ReLU on an identity path), so it passes more than half"
        elif reason.startswith("keeps"):  # Table 1 says it keeps ς: what the paper's model leaves out
            reason = "position effects the paper's model leaves out (means kept by pooling, border taps)"
        change = VarsigmaChange(node.name, node.op, ratio, reason)
        notes.append(f"ς ×{expr.short(ratio)}: {reason}")
    result = NodeResult(node.name, node.op, node.inputs, str(node.shape), y, dy, varsigma,
                        weight_m2, gamma, gamma_ext, gamma_bias,
                        not note and checks.holds(node.name) and gamma_exact, tuple(notes), gamma_exact)
    return result, change


def _summary(results: list[NodeResult], changes: list[VarsigmaChange], out: M, tidy: Any) -> Summary:
    gammas = [r.gamma for r in results if r.gamma is not None]
    biases = [r.gamma_bias for r in results if r.gamma_bias is not None and not is_zero(r.gamma_bias)]
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
    if not expr.is_symbolic(value) and not LIMIT**-1 < float(value) < LIMIT:
        raise ScalecalcError(f"{node.where}: {what} of {node.name!r} is {float(value):.3g}; the signal "
                             "overflows or vanishes here (check scale values and widths)")
    return value


def _is_one(value: M, tolerance: float) -> bool:
    if expr.is_symbolic(value):
        return bool(value == 1)
    return abs(float(value) - 1) < tolerance


def _simplifier(net: Network) -> Any:
    if not net.symbols:
        return lambda v: v
    import sympy

    def tidy(value: M) -> M:
        value = sympy.sympify(value)
        if not value.free_symbols:  # a number: keep it exact, nothing to simplify
            return value
        if sympy.count_ops(value) > TIDY_OPS:  # cancel() would multiply out nested denominators
            return value
        if value.has(sympy.Float):  # a numeric rule's coefficients: cancel() over floats is slow, and no tidier
            return sympy.powsimp(sympy.factor_terms(value), force=True)
        return sympy.powsimp(sympy.factor_terms(sympy.cancel(value)), force=True)

    return tidy
