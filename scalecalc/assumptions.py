"""Where the calculus' assumptions hold: per node, which approximations its rule makes here.

A rule is exact under assumptions about its inputs (paper §3 and the rule's docstring). Three
of them can fail structurally, and each is checked on the graph alone:

- **symmetric inputs.** ReLU halves E[x²] only for inputs symmetric about zero. Conv/linear
  outputs are symmetric over the weight draw (zero-mean symmetric weights), and so are scaled,
  dropped-out, pooled, added or concatenated symmetric signals, and tanh of one; a ReLU,
  sigmoid, GELU, max or normalisation output is not.
- **mean-free inputs.** Average pooling divides E[x²] by the window only if positions are
  uncorrelated. After a ReLU each element has a mean; a conv turns it into a per-channel
  offset shared by all positions, which pooling keeps in full. The same shared parts in both
  the input and the gradient of a conv (a pooling below it) make γ approximate.
- **uniform positions.** A window op averages E[x²] over its taps, which is exact only when
  every input position has the same moment. Padding (border windows with fewer taps) makes
  the output non-uniform, and so does uneven coverage of the input in the backward pass. The
  size of the effect is estimated from per-axis position profiles of the moments, and a node
  is flagged where it exceeds ``BORDER_TOLERANCE``.
- **uncorrelated branches.** ``add`` and ``concat`` sum moments; two inputs that share a
  source through no random weight are correlated.
- **wide layers.** The rules are the limit of wide layers. Where a global pool has made the
  gradient shared by all positions, each (leaky) ReLU it passes on its way down adds an O(1/n) drift (n its
  channels). The wide limit alone drifts by about 1.2·Σ1/n on a plain pooled conv chain and
  0.35–0.7·Σ1/n in bottleneck stacks; with the leading finite-width term (``finite``, where it
  applies) by about 0.4·Σ1/n on the chain (``docs/accuracy.md``). A backward moment is trusted
  only while Σ1/n stays within ``WIDTH_TOLERANCE``, or ``FINITE_TOLERANCE`` where that term is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scalecalc import finite
from scalecalc.borders import border_factors
from scalecalc.graph import Network, Node

NEEDS_SYMMETRIC = frozenset({"relu", "leaky_relu"})
MAKES_ASYMMETRIC = frozenset({"relu", "leaky_relu", "sigmoid", "gelu", "maxpool", "batchnorm", "layernorm"})
POOLS = frozenset({"avgpool", "global_avgpool"})
ADDS_MEAN = frozenset({"relu", "leaky_relu", "sigmoid", "gelu", "maxpool"})
MAKES_SYMMETRIC = frozenset({"conv", "linear"})
BORDER_TOLERANCE = 0.03  # the accuracy asked of exact rules
WIDTH_TOLERANCE = 0.025  # Σ 1/n below a global pool: a drift of ≈1.2·Σ1/n stays within 3%
FINITE_TOLERANCE = 0.075  # the same with the finite-width term: ≈0.4·Σ1/n


@dataclass(frozen=True)
class Checks:
    """Per node: the notes of every assumption that fails there (empty: all hold), and
    whether its predictions rest only on exact rules whose assumptions hold: its forward
    moment (every node above it), its backward moment (every node below it) and its γ."""

    notes: Mapping[str, tuple[str, ...]]
    forward_ok: Mapping[str, bool]
    backward_ok: Mapping[str, bool]
    gamma_ok: Mapping[str, bool]

    def holds(self, name: str) -> bool:
        return not self.notes.get(name)


def check(net: Network, calculus: str = "exact") -> Checks:
    """The assumptions that fail at each node. The exact calculus tracks means and shared
    offsets itself, so there only border effects and correlated branches remain."""
    symmetric: dict[str, bool] = {}
    mean_free: dict[str, bool] = {}
    notes: dict[str, list[str]] = {name: [] for name in net.order}
    bad: dict[str, set[str]] = {"forward": set(), "backward": set(), "gamma": set()}
    shared = _shared_randomness(net)
    grad_free = _uncorrelated_gradients(net)
    paper = calculus == "paper"  # the exact calculus tracks means and shared gradients itself
    pooled: dict[str, bool] = {}  # an average of ReLU outputs: non-negative, not Gaussian
    for node in net.nodes:
        if not node.inputs:
            symmetric[node.name] = mean_free[node.name] = True
            pooled[node.name] = False
            continue
        sym_in = all(symmetric[s] for s in node.inputs)
        free_in = all(mean_free[s] for s in node.inputs)
        pooled[node.name] = ((node.op in POOLS and not free_in)
                             or (node.op in ("scale", "bias", "identity") and pooled[node.inputs[0]]))
        if not paper and node.op in ("relu", "leaky_relu") and pooled[node.inputs[0]]:
            notes[node.name].append(f"{node.op}: input averages ReLU outputs (non-negative, taken as Gaussian "
                                    "with its mean); approximate")
            bad["forward"].add(node.name)
            bad["backward"].add(node.name)
        if paper and node.op in NEEDS_SYMMETRIC and not sym_in:
            notes[node.name].append(f"{node.op}: input not symmetric about zero; approximate")
            bad["forward"].add(node.name)
            bad["backward"].add(node.name)
        if paper and node.op in POOLS and not free_in:
            notes[node.name].append(f"{node.op}: input positions share a per-channel mean (ReLU above), "
                                    "which pooling keeps; under-predicts")
            bad["forward"].add(node.name)
        if paper and node.op == "conv" and not free_in and not grad_free[node.name]:
            notes[node.name].append("conv: input and gradient both correlated across positions "
                                    "(ReLU above, pooling below); γ approximate")
            bad["gamma"].add(node.name)
        symmetric[node.name] = (node.op in MAKES_SYMMETRIC or (node.op not in MAKES_ASYMMETRIC and sym_in)
                                or (node.op == "tanh" and sym_in))
        mean_free[node.name] = (free_in and node.op not in ADDS_MEAN) or node.op in ("batchnorm", "layernorm")
        correlated = _correlated(node, shared)
        if correlated:
            notes[node.name].append(f"{node.op}: inputs share randomness via {correlated} "
                                    "(rule assumes uncorrelated)")
            bad["forward"].add(node.name)
            bad["backward"].add(node.name)
    if not net.symbols:
        width, tolerance = _finite_width(net), FINITE_TOLERANCE if finite.applies(net) else WIDTH_TOLERANCE
        for node in net.nodes[1:]:
            crossed = [r for r in net.graph.successors(node.name) if width[r] <= tolerance < width[node.name]]
            if crossed:
                notes[node.name].append(f"{node.op}: the globally pooled gradient has passed ReLU layers of Σ1/n = "
                                        f"{width[node.name]:.3f} on its way here; the wide-limit rules drift by "
                                        "about that fraction (finite width)")
                bad["backward"].add(node.name)
    if not net.symbols and paper:  # the exact calculus applies these factors itself
        for name, (fwd, bwd, _) in border_factors(net).items():
            for error, what in ((fwd, "input"), (bwd, "gradient")):
                if abs(error - 1) > BORDER_TOLERANCE:
                    notes[name].append(f"{net.node(name).op}: {what} moments differ across positions (border "
                                       f"taps); the position average is off by ≈{100 * (error - 1):+.0f}%")
                    bad["forward" if what == "input" else "backward"].add(name)
    return _chain(net, {k: tuple(v) for k, v in notes.items()}, bad, calculus)


def _chain(net: Network, notes: Mapping[str, tuple[str, ...]], bad: Mapping[str, set[str]],
           calculus: str) -> Checks:
    """Trust a prediction only if every rule it is computed from is exact where it is used."""
    from scalecalc.exact import EXACT
    from scalecalc.rules import RULES

    if calculus == "exact":
        approx = {n.name for n in net.nodes[1:] if EXACT[n.op].note}
    else:
        approx = {n.name for n in net.nodes[1:] if not RULES[n.op].exact}
    fwd: dict[str, bool] = {}
    for node in net.nodes:
        fwd[node.name] = node.name not in approx | bad["forward"] and all(fwd[s] for s in node.inputs)
    bwd = {name: True for name in net.order}
    for node in reversed(net.nodes[1:]):
        sends = bwd[node.name] and node.name not in approx | bad["backward"]
        for src in node.inputs:
            bwd[src] = bwd[src] and sends
    gamma = {n.name: bool(n.inputs) and fwd[n.inputs[0]] and bwd[n.name] and n.name not in bad["gamma"]
             for n in net.nodes}
    return Checks(notes, fwd, bwd, gamma)


def _uncorrelated_gradients(net: Network) -> dict[str, bool]:
    """Per node: whether the gradient at its output is uncorrelated across positions.

    Average pooling hands one gradient to every position of a window (global pooling to all
    of them); convs, activations and scalars carry such a shared part further up.
    """
    flags = {name: True for name in net.order}
    for node in reversed(net.nodes[1:]):
        sent = flags[node.name] and node.op not in POOLS
        for src in node.inputs:
            flags[src] = flags[src] and sent
    return flags


def _finite_width(net: Network) -> dict[str, float]:
    """Per node: Σ 1/n over the (leaky) ReLU layers that a globally pooled gradient — one
    shared by every position of a map — has passed on its way down to it (n: their channels),
    the most over all paths. (A window pool shares a gradient among K positions only.)"""
    total = {name: 0.0 for name in net.order}
    pooled = {name: False for name in net.order}
    for node in reversed(net.nodes[1:]):
        below = pooled[node.name] or node.op == "global_avgpool"
        step = 1 / float(node.shape.channels) if node.op in NEEDS_SYMMETRIC and pooled[node.name] else 0.0
        for src in node.inputs:
            pooled[src] = pooled[src] or below
            total[src] = max(total[src], total[node.name] + step)
    return total


def _shared_randomness(net: Network) -> dict[str, frozenset[str]]:
    """For each node, the nodes whose randomness reaches it through no random weight.

    A conv/linear output is uncorrelated with its input (its weights are zero-mean and
    independent), so it starts a fresh set; other ops pass their inputs' sets on.
    """
    sets: dict[str, frozenset[str]] = {}
    for node in net.nodes:
        if node.weighted or not node.inputs:
            sets[node.name] = frozenset({node.name})
        else:
            sets[node.name] = frozenset({node.name}).union(*(sets[s] for s in node.inputs))
    return sets


def _correlated(node: Node, shared: Mapping[str, frozenset[str]]) -> str:
    if len(node.inputs) < 2:
        return ""
    seen: set[str] = set()
    for src in node.inputs:
        common = seen & shared[src]
        if common:
            return sorted(common)[0]
        seen |= shared[src]
    return ""
