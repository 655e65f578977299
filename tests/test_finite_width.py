"""Finite width: the part B·y of a layer's input gradient proportional to y (``finite``), against torch.

The wide-limit rules take a gradient as independent of the weights it passed through. The
control for that assumption is the same network with its backward pass through independent
weights of the same variance ("fresh"): the forward pass, the gates and everything the
wide-limit rules read are unchanged, the gradient no longer depends on the weights it meets.

1. A plain chain of 1×1 conv-ReLU layers under a global pool. Stein's lemma puts b·M (M the
   channels' means over positions) into the shared part ū of the gradient at each conv's
   input: the excess of (ū·M̂)² over the fresh network is predicted as n·E[(b_d + b_o)²]·k.
2. A stack of pre-activation bottlenecks (the spec's block, 32 inner channels, 8×8): the
   gradient's shared part gk/g at the stack's input, where the wide-limit value has decayed
   through four blocks and B·y has not.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from scalecalc import finite
from scalecalc.codegen import emit_torch
from scalecalc.graph import build
from scalecalc.propagate import states
from scalecalc.spec import parse
from scalecalc.verify import load_module

torch = pytest.importorskip("torch")

CHAIN = """
name: chain-1x1
input: {channels: 32, size: 8}
init: {scheme: geometric, c: 2}
blocks:
  unit:
    layers:
      - {name: conv, op: conv, out: 32, kernel: 1}
      - {name: relu, op: relu}
layers:
  - {name: stem, op: conv, out: 32, kernel: 1}
  - {name: relu0, op: relu}
  - {name: body, block: unit, repeat: 4}
  - {name: pool, op: global_avgpool}
  - {name: fc, op: linear, out: 10}
"""
STACK = """
name: bottleneck-stack
input: {channels: 128, size: 8}
params: {alpha: sqrt(1/2), beta: sqrt(1/2)}
init: {scheme: geometric, c: 1}
blocks:
  bottleneck:
    layers:
      - {name: pre, op: scale, value: sqrt(beta), from: input}
      - {name: relu1, op: relu}
      - {name: scale1, op: scale, value: sqrt(2/beta)}
      - {name: conv1, op: conv, out: 32, kernel: 1, init: {c: beta}}
      - {name: relu2, op: relu}
      - {name: scale2, op: scale, value: sqrt(2/(3*beta))}
      - {name: conv2, op: conv, out: 32, kernel: 3, padding: 1, init: {c: beta}}
      - {name: relu3, op: relu}
      - {name: scale3, op: scale, value: sqrt(2/beta)}
      - {name: conv3, op: conv, out: 128, kernel: 1, init: {c: beta}}
      - {name: merge, op: add, from: [input, conv3], weights: [alpha, beta]}
layers:
  - {name: stem, op: conv, out: 128, kernel: 1}
  - {name: relu0, op: relu}
  - {name: conv0, op: conv, out: 128, kernel: 1}
  - {name: stage, block: bottleneck, repeat: 4}
  - {name: relu, op: relu}
  - {name: pool, op: global_avgpool}
  - {name: fc, op: linear, out: 100}
"""
FORK = """
name: downsampling
input: {channels: 32, size: 16}
init: {scheme: geometric, c: 2}
layers:
  - {name: conv_a, op: conv, out: 32, kernel: 1}
  - {name: relu_a, op: relu}
  - {name: pool, op: avgpool, kernel: 2}
  - {name: short, op: conv, out: 32, kernel: 1}
  - {name: main, op: conv, out: 32, kernel: 3, stride: 2, padding: 1, from: relu_a}
  - {name: merge, op: add, from: [short, main]}
  - {name: relu, op: relu}
  - {name: conv, op: conv, out: 32, kernel: 1}
  - {name: relu_top, op: relu}
  - {name: gap, op: global_avgpool}
  - {name: fc, op: linear, out: 100}
"""
TOL = 0.15  # leading order in 1/n: what the O(1/n²) terms and the gates' own sources leave


def _fresh(model, names=None, apart=None) -> None:  # type: ignore[no-untyped-def]
    """Send every conv's input gradient (or that of the convs ``names``) through independent
    weights of the same variance, drawn from ``apart`` where given (so that the main stream of
    random numbers, and the pairs of runs that share it, stay as they were)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)] if names is None else \
        [model.get_submodule(n) for n in sorted(names)]
    for conv in convs:
        w = conv.weight
        other = torch.randn(w.shape, generator=apart, dtype=w.dtype) * w.detach().square().mean().sqrt()

        def forward(x, conv=conv, other=other):  # type: ignore[no-untyped-def]
            through = conv._conv_forward(x, other, None)
            return conv._conv_forward(x, conv.weight, conv.bias).detach() + through - through.detach()

        conv.forward = forward


def _keeper(row, name, record):  # type: ignore[no-untyped-def]
    """A forward hook: ``record(output, its gradient)`` into ``row`` in the backward pass."""
    def keep(_, __, y):  # type: ignore[no-untyped-def]
        kept = y.detach()
        y.register_hook(lambda g: row.__setitem__(name, record(kept, g.detach())))
    return keep


def _sample(net, spec, draws, batch, fresh, seed, record):  # type: ignore[no-untyped-def]
    """Per draw, what ``record`` returns for each of ``record.nodes``, from the emitted model
    (``fresh``: True for every conv, or the names of some)."""
    torch.manual_seed(seed)
    apart = torch.Generator().manual_seed(seed + 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        module = load_module(emit_torch(spec, net, digest="0"), Path(tmp), "finite_width_model")
        for _ in range(draws):
            model, row = module.Model().double(), {}
            if fresh is True:
                _fresh(model)
            elif fresh:
                _fresh(model, fresh, apart)
            for name in record.nodes:
                model.get_submodule(name).register_forward_hook(_keeper(row, name, record))
            x = torch.randn(batch, *module.INPUT_SHAPE, dtype=torch.float64).requires_grad_()
            result = model(x)
            (result * torch.randn_like(result)).sum().backward()
            rows.append(row)
    return rows


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def test_shared_gradient_carries_its_input_along_the_channel_means() -> None:
    net = build(parse(CHAIN, "chain.yaml"))
    fwd, bwd = states(net)
    coherent = finite.coherent(net, fwd, bwd)
    reads = {net.node(c).inputs[0]: c for c in coherent.inputs if net.node(c).op == "conv"}
    nodes = [n for n in reads if net.node(n).op == "relu"]

    def along(y, g):  # type: ignore[no-untyped-def]
        u, m = g.mean((2, 3)), y.mean((2, 3))
        return ((u * m).sum(1) ** 2 / (m * m).sum(1)).mean().item()

    along.nodes = nodes  # type: ignore[attr-defined]
    true = _sample(net, parse(CHAIN, "chain.yaml"), 600, 8, False, 1, along)
    fresh = _sample(net, parse(CHAIN, "chain.yaml"), 600, 8, True, 2, along)
    excess = predicted = variance = 0.0
    for n in nodes:
        (t, se_t), (f, se_f) = _mean_se([r[n] for r in true]), _mean_se([r[n] for r in fresh])
        excess, variance = excess + t - f, variance + se_t**2 + se_f**2
        _, total, _ = coherent.at_input(reads[n])
        predicted += float(net.node(n).shape.channels) * total * float(fwd[n].k)
    ratio, se = excess / predicted, math.sqrt(variance) / predicted
    assert 4 * se < 2 * TOL, f"too few draws: SE {se:.2f}"
    assert abs(ratio - 1) < TOL + 4 * se, (ratio, se)
    # negative control: the first-order amplitude b = E[W²]·Σ ψ·ū alone has half this power
    assert abs(2 * ratio - 1) > TOL + 8 * se, (ratio, se)


def test_stack_input_keeps_a_shared_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse(STACK, "stack.yaml")
    net = build(spec)
    node = "stage.0.pre"

    def moments(y, g):  # type: ignore[no-untyped-def]
        p = g.shape[2] * g.shape[3]
        m = g.square().mean().item()
        return m, (g.sum((2, 3)).square().mean().item() / p - m) / (p - 1)

    moments.nodes = [node]  # type: ignore[attr-defined]
    rows = [r[node] for r in _sample(net, spec, 1500, 8, False, 3, moments)]
    g, gk = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
    measured = gk / g
    se = _mean_se([(r[1] - measured * r[0]) / g for r in rows])[1]
    assert 4 * se < 0.06 * measured, f"too few draws: SE {se / measured:.3f}"
    bwd = states(net)[1][node]
    assert abs(float(bwd.k / bwd.m) / measured - 1) < 0.05 + 4 * se / measured, (float(bwd.k / bwd.m), measured)
    monkeypatch.setattr(finite, "applies", lambda _: False)  # negative control: the wide limit alone
    wide = states(net)[1][node]
    assert float(wide.k / wide.m) / measured - 1 < -0.08 - 4 * se / measured, (float(wide.k / wide.m), measured)


def test_parts_brought_by_two_readers_add_as_amplitudes() -> None:
    """``relu_a`` is read by a pooled 1×1 shortcut and a strided 3×3 conv, added before one ReLU
    (a downsampling block in miniature): both put B·x into its gradient, driven by the same
    sources. The shortcut's part along the channel means (what independent backward weights in
    ``short`` alone remove, pairs of runs on the same draws) is its own power, through the
    pool, plus twice its product with the strided conv's part."""
    spec = parse(FORK, "fork.yaml")
    net = build(spec)
    fwd, bwd = states(net, finite_width=False)
    coherent = finite.coherent(net, fwd, bwd)
    (_, own, _), fork = coherent.at_input("short"), coherent.at_fork("relu_a")
    assert fork is not None
    x, shape = fwd["relu_a"], net.node("relu_a").shape
    means = float(shape.channels) * float(x.k + (x.m - x.k) / shape.positions)  # E[|ȳ|²], ȳ a sample's means
    alone = means * own / 16  # a 2×2 pool's transpose carries a quarter of the amplitude
    predicted = alone + means * fork[1]

    def along(y, g):  # type: ignore[no-untyped-def]
        u, m = g.mean((2, 3)), y.mean((2, 3))
        return ((u * m).sum(1) ** 2 / (m * m).sum(1)).mean().item()

    along.nodes = ["relu_a"]  # type: ignore[attr-defined]
    true = _sample(net, spec, 2000, 4, False, 5, along)
    fresh = _sample(net, spec, 2000, 4, {"short"}, 5, along)
    excess, se = _mean_se([t["relu_a"] - f["relu_a"] for t, f in zip(true, fresh)])
    assert 4 * se < 0.6 * excess, f"too few draws: SE {se / excess:.2f}"
    assert abs(excess / predicted - 1) < TOL + 4 * se / predicted, (excess, predicted, se)
    # negative control: the two parts' powers alone (the cross term left out) are several times short
    assert excess / alone - 1 > TOL + 4 * se / alone, (excess, alone, se)


def test_gate_rates_and_density_against_closed_forms() -> None:
    """E[Φ(μ/s)²] over offsets μ ~ N(0, v) is the orthant probability ¼ + arcsin(ρ)/2π with
    ρ = v/(v + s²), and ψ² + Φ·∂_μψ averages to its derivative in v, (1/2π)·s/((v+s²)·√(2v+s²))."""
    from scalecalc.state import State

    for m, k in ((1.0, 0.0), (2.0, 0.5), (1.0, 0.8)):
        x = State(m, k)
        v, s2 = k, m - k
        assert finite.gates(x)[1] == pytest.approx(0.25 + math.asin(v / (v + s2)) / (2 * math.pi), rel=1e-9)
        closed = math.sqrt(s2) / ((v + s2) * math.sqrt(2 * v + s2)) / (2 * math.pi)
        assert finite.psi2(x) == pytest.approx(closed, rel=1e-6)


def test_not_applied_where_the_rules_do_not_reach() -> None:
    """A batchnorm (or any op without a Hessian rule) keeps the wide limit, as do symbols."""
    bn = CHAIN.replace("- {name: relu, op: relu}", "- {name: bn, op: batchnorm}\n      - {name: relu, op: relu}")
    assert finite.applies(build(parse(CHAIN, "chain.yaml")))
    assert not finite.applies(build(parse(bn, "bn.yaml")))
    wide = CHAIN.replace("channels: 32", "channels: w").replace("init:", "params: {w: 32}\ninit:")
    assert not finite.applies(build(parse(wide, "w.yaml"), symbolic=("w",)))


def test_without_every_layer_the_wide_limit_is_left() -> None:
    """``states(without=...)``, the calculus' counterpart of independent backward weights in some
    layers (``benchmarks/fresh_parts.py``): with every layer named, no B·y is left anywhere;
    with only the top conv named, the parts of the layers below it, which meet the Hessian of
    the gates above through it, go too, but not those the gates between them make."""
    net = build(parse(STACK, "stack.yaml"))
    _, full = states(net)
    _, wide = states(net, finite_width=False)
    layers = frozenset(n.name for n in net.nodes if n.op in ("conv", "linear"))
    _, none = states(net, without=layers)
    for name in net.order:
        assert (float(none[name].m), float(none[name].k)) == pytest.approx((float(wide[name].m), float(wide[name].k)),
                                                                           rel=1e-12, abs=1e-300), name
    assert float(full["stem"].k) > 1.05 * float(wide["stem"].k)  # negative control: B·y is there at all
    _, top = states(net, without=frozenset({"stage.3.conv3"}))
    assert float(wide["stem"].k) < float(top["stem"].k) < float(full["stem"].k)
