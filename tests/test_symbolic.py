"""Symbolic derivations of the paper's closed forms from the calculus' own output.

Each test builds a small network with some parameters kept as sympy symbols, propagates
the second moments and then *derives* a closed form of Defazio & Bottou with sympy
(``solve``, ``simplify``, equality of expressions): nothing below compares against a
number copied from the implementation. In symbolic mode every quantity must be exact, so
the derived expressions are also checked to contain no floating-point constant.

1. Eq. 3: geometric init gives every weighted layer the same γ (= ς/c²); the fan-in,
   fan-out and arithmetic schemes do not (their γ ratios depend on the widths).
2. Eq. 6: a ReLU conv stack with equal kernels and c = 2/k has E[x_L²] = √(n₀/n_L)·E[x₀²].
3. §8.1: γ₀ = γ₀ᵇ for the first conv exactly when E[x₀²] = 1/√(n₀·k²).
4. §11: inside a weighted residual block α·S(x) + β·F(x) (α² + β² = 1), a main-branch conv
   matches the γ of the convs outside the block when its geometric constant is β·c
   (the shortcut conv: α·c), c being the network's constant.
5. App. E: a learnable scalar u matches the convs of a geometric network when u = √c.
6. App. C / Thm 1: the intrinsic (Eq. 2) and extrinsic forms of γ agree, numerically on
   every shipped spec and exactly on symbolic networks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sympy as sp

from scalecalc import channels
from scalecalc.graph import build
from scalecalc.propagate import Analysis, NodeResult, propagate
from scalecalc.spec import load, parse

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))


# --- helpers -----------------------------------------------------------------------------

def analyse(text: str, symbolic: Sequence[str] = (), init_scheme: str | None = None) -> Analysis:
    return propagate(build(parse(text, "t.yaml"), symbolic=tuple(symbolic), init_scheme=init_scheme))


def symbols(a: Analysis, *names: str) -> list[sp.Symbol]:
    """The sympy symbols the network was built with (same assumptions as in the expressions)."""
    return [a.network.params[name] for name in names]


def assert_exact(value: Any, what: str) -> None:
    """Symbolic mode promises exact numbers: no sympy Float may appear."""
    floats = sp.sympify(value).atoms(sp.Float)
    assert not floats, f"{what} contains inexact constants {sorted(map(str, floats))}: {value}"


def assert_same(got: Any, expected: Any, what: str) -> None:
    assert_exact(got, what)
    difference = sp.simplify(sp.sympify(got) - sp.sympify(expected))
    assert difference == 0, f"{what}: got {got}, expected {expected} (difference {difference})"


def weighted(a: Analysis) -> list[NodeResult]:
    nodes = [n for n in a.nodes if n.op in ("conv", "linear")]
    assert len(nodes) >= 2
    return nodes


def conserved_varsigma(a: Analysis) -> Any:
    """ς of the input, after checking it is the same at every node (all ops here keep ς)."""
    varsigma = a["input"].varsigma
    for node in a.nodes:
        assert_same(node.varsigma, varsigma, f"ς at {node.name}")
    return varsigma


def positive_solution(equation: Any, unknown: sp.Symbol) -> Any:
    """The unique solution of ``equation`` (an Eq, or an expression = 0) for ``unknown``."""
    solutions = sp.solve(equation, unknown)
    assert len(solutions) == 1, f"expected one solution for {unknown}, got {solutions}"
    return solutions[0]


# --- 1. Eq. 3: geometric init equalises γ ------------------------------------------------

# conv and linear layers with different widths and kernel sizes (3, 2 with stride 2, 1, and
# linear); stride = kernel and no padding, so every op keeps ς (Table 1)
MIXED = """
name: mixed
input: {channels: n0, size: 16, second_moment: s}
params: {n0: 3, n1: 8, n2: 16, n3: 32, n4: 24, n5: 10, c: 0.5, s: 1}
init: {scheme: geometric, c: c}
layers:
  - {name: conv1, op: conv, out: n1, kernel: 3}
  - {name: relu1, op: relu}
  - {name: conv2, op: conv, out: n2, kernel: 2, stride: 2}
  - {name: relu2, op: relu}
  - {name: conv3, op: conv, out: n3, kernel: 1}
  - {name: relu3, op: relu}
  - {name: flat, op: flatten}
  - {name: fc1, op: linear, out: n4}
  - {name: relu4, op: relu}
  - {name: fc2, op: linear, out: n5}
"""
MIXED_SYMBOLS = ("n0", "n1", "n2", "n3", "n4", "n5", "c", "s")
WIDTHS = ("n0", "n1", "n2", "n3", "n4", "n5")


def test_geometric_init_gives_equal_gamma_across_layers() -> None:
    a = analyse(MIXED, MIXED_SYMBOLS)
    (c,) = symbols(a, "c")
    layers = weighted(a)
    for left, right in itertools.combinations(layers, 2):
        ratio = sp.simplify(left.gamma / right.gamma)
        assert ratio == 1, f"γ_{left.name}/γ_{right.name} = {ratio}, expected 1 (Eq. 3)"
    # and the common value is ς/c², the form used in §11 and App. E
    varsigma = conserved_varsigma(a)
    for layer in layers:
        assert_same(layer.gamma, varsigma / c**2, f"γ of {layer.name}")


@pytest.mark.parametrize("scheme", ["fan_in", "fan_out", "arithmetic"])
def test_other_inits_do_not_equalise_gamma(scheme: str) -> None:
    """Negative control for Eq. 3 (§6.1): the γ ratios of these schemes depend on the widths."""
    a = analyse(MIXED, MIXED_SYMBOLS, init_scheme=scheme)
    widths = symbols(a, *WIDTHS)
    # a ratio that does not depend on the widths has the same value at two width assignments
    c, s = symbols(a, "c", "s")
    fixed = {c: sp.Rational(1, 2), s: 1}
    points = ((3, 8, 16, 32, 24, 10), (5, 7, 11, 13, 17, 19))
    at = [{**dict(zip(widths, values)), **fixed} for values in points]
    changed = []
    for x, y in itertools.combinations(weighted(a), 2):
        ratio = sp.cancel(x.gamma / y.gamma)
        values = [ratio.subs(point) for point in at]
        if sp.simplify(values[0] - values[1]) != 0:
            changed.append(f"γ_{x.name}/γ_{y.name} = {ratio}")
    assert changed, f"{scheme}: every γ ratio is the same at two width assignments"


# --- 2. Eq. 6: output second moment of a ReLU conv stack ---------------------------------

def conv_stack(k: int, depth: int, scheme: str = "geometric") -> str:
    widths = ", ".join(f"n{i}: {4 * (i + 1)}" for i in range(depth + 1))
    layers = "".join(f"  - {{name: conv{i}, op: conv, out: n{i}, kernel: {k}}}\n"
                     f"  - {{name: relu{i}, op: relu}}\n" for i in range(1, depth + 1))
    size = depth * (k - 1) + 3
    return (f"name: stack\ninput: {{channels: n0, size: {size}, second_moment: s}}\n"
            f"params: {{{widths}, s: 1}}\ninit: {{scheme: {scheme}}}\nlayers:\n{layers}")


@pytest.mark.parametrize(("k", "depth"), [(1, 4), (2, 3), (3, 3), (5, 2)])
def test_output_second_moment_eq6(k: int, depth: int) -> None:
    names = [f"n{i}" for i in range(depth + 1)]
    a = analyse(conv_stack(k, depth), (*names, "s"))
    n, (s,) = symbols(a, *names), symbols(a, "s")
    # all kernels equal: the default geometric constant is c = 2/k (§6.2, §7)
    for i in range(1, depth + 1):
        assert_same(a[f"conv{i}"].weight_m2, sp.Rational(2, k) / (k * sp.sqrt(n[i - 1] * n[i])),
                    f"E[W²] of conv{i} (Eq. 3 with c = 2/k)")
    # each conv + ReLU multiplies the second moment by √(n_l/n_{l+1}) (Eq. 6) ...
    for i in range(1, depth + 1):
        before = a[a[f"conv{i}"].inputs[0]].forward_m2
        assert_same(a[f"relu{i}"].forward_m2 / before, sp.sqrt(n[i - 1] / n[i]), f"Eq. 6 at layer {i}")
    # ... so the product telescopes to √(n₀/n_L)·E[x₀²]
    assert_same(a.summary.output_m2, sp.sqrt(n[0] / n[-1]) * s, "E[x_L²]")


def test_output_second_moment_eq6_fails_for_fan_in() -> None:
    """Negative control: fan-in init keeps E[x²] constant instead (§6.1), not √(n₀/n_L)·E[x₀²]."""
    names = ["n0", "n1", "n2", "n3"]
    a = analyse(conv_stack(1, 3, "fan_in"), (*names, "s"))
    n, (s,) = symbols(a, *names), symbols(a, "s")
    assert_same(a.summary.output_m2, s, "E[x_L²] under fan-in")
    assert sp.simplify(a.summary.output_m2 - sp.sqrt(n[0] / n[-1]) * s) != 0


# --- 3. §8.1: input scaling balances the first layer's weights against its bias -------------

def first_layer(kernel: int | str, init: str) -> str:
    k_param = ", k: 3" if kernel == "k" else ""
    return f"""
name: first
input: {{channels: n0, size: 32, second_moment: s}}
params: {{n0: 3, n1: 16, s: 1, c: 0.5{k_param}}}
init: {init}
layers:
  - {{name: conv1, op: conv, out: n1, kernel: {kernel}, bias: true}}
  - {{name: relu1, op: relu}}
  - {{name: flat, op: flatten}}
  - {{name: fc, op: linear, out: 10}}
"""


@pytest.mark.parametrize("init", ["{scheme: geometric, c: c}", "{scheme: fan_in}"])
@pytest.mark.parametrize("kernel", [1, 3, 5, "k"])
def test_input_scaling_balances_weight_and_bias(kernel: int | str, init: str) -> None:
    symbolic = ("n0", "n1", "s", "c", *(("k",) if kernel == "k" else ()))
    a = analyse(first_layer(kernel, init), symbolic)
    n0, s = symbols(a, "n0", "s")
    k = symbols(a, "k")[0] if kernel == "k" else sp.Integer(kernel)
    conv = a["conv1"]
    assert conv.gamma_bias is not None
    assert_exact(conv.gamma, "γ₀")
    assert_exact(conv.gamma_bias, "γ₀ᵇ")
    s_star = positive_solution(sp.Eq(conv.gamma, conv.gamma_bias), s)
    assert_same(s_star, 1 / sp.sqrt(n0 * k**2), "E[x₀²] solving γ₀ = γ₀ᵇ")


# --- 4. §11: the constant of the convolutions inside a weighted residual block ------------

# x = relu(stem(input)); y = α·S(x) + β·F(x) with α² + β² = 1, then more layers outside.
# Each branch has its own random conv, so the add's inputs are uncorrelated; fixed scalars
# (§6.2, §11) undo each branch's forward gain so that E[S(x)²] = E[F(x)²] = E[x²] whatever
# the branch constants are (Eq. 9 and the ReLU halving). Outside convs use the network
# constant c; branch convs c_branch (F) and c_short (S).
RESIDUAL = """
name: residual
input: {{channels: n0, size: 12, second_moment: s}}
params: {{n0: 3, n: 16, w: 8, m: 10, s: 1, c: 0.5, cb: 0.5, cs: 0.5, beta: 0.5, alpha: {alpha}}}
init: {{scheme: geometric, c: c}}
layers:
  - {{name: stem, op: conv, out: n, kernel: 3}}
  - {{name: relu0, op: relu}}
  - {{name: short_conv, op: conv, out: n, kernel: 3, bias: false, init: {{c: cs}}, from: relu0}}
  - {{name: short_fix, op: scale, value: {short_fix}}}
  - {{name: conv_a, op: conv, out: w, kernel: 3, init: {{c: cb}}, from: relu0}}
  - {{name: relu_a, op: relu}}
  - {{name: conv_b, op: conv, out: n, kernel: 1, init: {{c: cb}}}}
  - {{name: main_fix, op: scale, value: {main_fix}}}
  - {{name: merge, op: add, from: [short_fix, main_fix], weights: [alpha, beta]}}
  - {{name: relu1, op: relu}}
  - {{name: conv_out, op: conv, out: n, kernel: 3}}
  - {{name: relu2, op: relu}}
  - {{name: flat, op: flatten}}
  - {{name: fc, op: linear, out: m}}
"""
RESIDUAL_SYMBOLS = ("n0", "n", "w", "m", "s", "c", "cb", "cs", "beta")
# Eq. 9: the 3×3 shortcut conv multiplies E[x²] by 3·cs; conv_a, relu_a, conv_b by 3·cb²/2.
# (Written so that every operation involves a symbol: see the note on literals in the report.)
FIXES = {"short_fix": "1/sqrt(3*cs)", "main_fix": "sqrt(2/(3*cb**2))"}


def residual(alpha: str = "sqrt(1 - beta**2)", **fixes: str) -> str:
    return RESIDUAL.format(alpha=alpha, **{**FIXES, **fixes})


def test_residual_block_setup_meets_the_assumptions_of_section_11() -> None:
    a = analyse(residual(), RESIDUAL_SYMBOLS)
    (beta,) = symbols(a, "beta")
    assert a["merge"].exact and a.summary.exact, a["merge"].notes  # uncorrelated add inputs
    x = a["relu0"].forward_m2
    assert_same(a["short_fix"].forward_m2, x, "E[S(x)²]")
    assert_same(a["main_fix"].forward_m2, x, "E[F(x)²]")
    # the block keeps ς overall, and its main branch carries ς_R = β²·ς (§11)
    varsigma = a["relu0"].varsigma
    assert_same(a["merge"].varsigma, varsigma, "ς after the block")
    for node in ("conv_a", "relu_a", "conv_b", "main_fix"):
        assert_same(a[node].varsigma, beta**2 * varsigma, f"ς_R at {node}")


@pytest.mark.parametrize("conv", ["conv_a", "conv_b"])
def test_residual_branch_constant_is_beta_times_c(conv: str) -> None:
    """Normalisation: outside convs use the network constant c (γ = ς/c²); the paper's
    'c = β' is the case c = 1 of the c_branch = β·c derived here."""
    a = analyse(residual(), RESIDUAL_SYMBOLS)
    c, cb, beta = symbols(a, "c", "cb", "beta")
    outside = [a[name].gamma for name in ("stem", "conv_out", "fc")]
    for gamma in outside[1:]:
        assert_same(gamma / outside[0], 1, "γ outside the block")
    assert cb not in sp.simplify(outside[0]).free_symbols
    c_branch = positive_solution(sp.Eq(sp.simplify(a[conv].gamma / outside[0]), 1), cb)
    assert_same(c_branch, beta * c, f"c_branch of {conv}")


def test_residual_shortcut_constant_is_alpha_times_c() -> None:
    a = analyse(residual(), RESIDUAL_SYMBOLS)
    c, cs, beta = symbols(a, "c", "cs", "beta")
    c_short = positive_solution(sp.Eq(sp.simplify(a["short_conv"].gamma / a["stem"].gamma), 1), cs)
    assert_same(c_short, sp.sqrt(1 - beta**2) * c, "c_short (= α·c)")


@pytest.mark.parametrize(("alpha", "fixes"), [
    ("1", {}),  # α² + β² ≠ 1
    ("sqrt(1 - beta**2)", {"main_fix": "1"}),  # E[F(x)²] ≠ E[x²]
])
def test_residual_branch_constant_needs_the_assumptions(alpha: str, fixes: dict[str, str]) -> None:
    """Negative control: without α² + β² = 1 or E[F(x)²] = E[S(x)²], β·c no longer matches."""
    symbolic = (*RESIDUAL_SYMBOLS, *(("alpha",) if alpha == "1" else ()))
    a = analyse(residual(alpha, **fixes), symbolic)
    c, cb, beta = symbols(a, "c", "cb", "beta")
    ratio = sp.simplify(a["conv_a"].gamma / a["stem"].gamma)
    assert sp.simplify(ratio.subs(cb, beta * c) - 1) != 0


# --- 5. App. E: a learnable scalar multiplier ---------------------------------------------

LEARNABLE = """
name: learnable
input: {channels: n0, size: 10, second_moment: s}
params: {n0: 3, n1: 16, n2: 32, n3: 10, c: 0.5, u: 0.5, s: 1}
init: {scheme: geometric, c: c}
layers:
  - {name: conv1, op: conv, out: n1, kernel: 3}
  - {name: relu1, op: relu}
  - {name: gain, op: scale, value: u, learnable: true}
  - {name: conv2, op: conv, out: n2, kernel: 1}
  - {name: relu2, op: relu}
  - {name: flat, op: flatten}
  - {name: fc, op: linear, out: n3}
"""


def test_learnable_scalar_matches_convs_when_u_is_sqrt_c() -> None:
    a = analyse(LEARNABLE, ("n0", "n1", "n2", "n3", "c", "u", "s"))
    c, u = symbols(a, "c", "u")
    varsigma = conserved_varsigma(a)
    gain = a["gain"]
    assert_same(gain.gamma, varsigma / u**4, "γ of the scalar (App. E: ς/E[u²]²)")
    assert_same(gain.gamma_extrinsic, gain.gamma, "Eq. 11 vs ς/E[u²]²")
    for conv in ("conv1", "conv2", "fc"):
        u_star = positive_solution(sp.Eq(gain.gamma, a[conv].gamma), u)
        assert_same(u_star, sp.sqrt(c), f"u matching {conv}")


# --- 6. App. C / Thm 1: intrinsic and extrinsic γ agree ----------------------------------

@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_gamma_forms_agree_numerically(path: Path) -> None:
    # an identity of the paper's calculus; the exact calculus adds pair terms to Thm 1's form
    a = propagate(build(load(path)), "paper")
    gammas = [n for n in a.nodes if n.gamma is not None]
    assert gammas
    for node in gammas:
        g, ge = float(node.gamma), float(node.gamma_extrinsic)
        assert g > 0
        assert abs(g - ge) <= 1e-9 * abs(g), f"{path.name} {node.name}: γ = {g}, extrinsic {ge}"


SYMBOLIC_CASES = {
    "mixed": (lambda: analyse(MIXED, MIXED_SYMBOLS)),
    "residual": (lambda: analyse(residual(), RESIDUAL_SYMBOLS)),
    "learnable": (lambda: analyse(LEARNABLE, ("n0", "n1", "n2", "n3", "c", "u", "s"))),
    "libsvm_mlp": (lambda: propagate(build(load(SPECS[0].parent / "libsvm_mlp.yaml"),
                                           symbolic=("d", "h1", "h2", "classes")))),
    # padding and strides: border taps make T/ρ² and T/k² non-integers
    "lenet_strided": (lambda: propagate(build(load(SPECS[0].parent / "lenet_strided.yaml"),
                                              symbolic=("w",)))),
}


@pytest.mark.parametrize("case", SYMBOLIC_CASES)
def test_gamma_forms_agree_symbolically(case: str) -> None:
    a = SYMBOLIC_CASES[case]()
    gammas = [n for n in a.nodes if n.gamma is not None]
    assert gammas
    for node in gammas:
        assert_exact(node.gamma, f"γ of {node.name}")
        assert_same(node.gamma_extrinsic, node.gamma, f"extrinsic γ of {node.name}")


POST_ACTIVATION = """
name: post
input: {channels: 8, size: 4}
params: {w: 16}
layers:
  - {name: conv1, op: conv, out: w, kernel: 1, bias: false}
  - {name: relu1, op: relu}
  - {name: conv2, op: conv, out: w, kernel: 1, bias: false}
  - {name: merge, op: add, from: [relu1, conv2]}
  - {name: relu2, op: relu}
  - {name: head, op: conv, out: 16, kernel: 1}
"""


def test_relu_after_shortcut_is_flagged_in_symbolic_mode() -> None:
    """A ReLU reading a shortcut's ReLU output has an input with a mean: numbers integrate its
    law, symbolic mode keeps the centred closed form and must say so."""
    symbolic = propagate(build(parse(POST_ACTIVATION, "post.yaml"), symbolic=("w",)))
    relu2 = symbolic["relu2"]
    assert not relu2.exact and any("identity path" in n for n in relu2.notes)
    assert symbolic["relu1"].exact  # a ReLU of a conv output is centred
    numeric = propagate(build(parse(POST_ACTIVATION, "post.yaml")))
    # with numbers the mean is integrated: more than half of E[x²] passes
    assert float(numeric["relu2"].forward_m2) > 0.5 * float(numeric["merge"].forward_m2) * 1.1
    assert any("has a mean" in c.reason for c in numeric.summary.varsigma_changes if c.node == "relu2")


BN_CHAIN = """
name: bn-chain-1x1
input: {channels: 16, size: 6}
params: {w: 64}
blocks:
  unit:
    layers:
      - {name: conv, op: conv, out: w, kernel: 1, bias: false}
      - {name: bn, op: batchnorm, batch: 16}
      - {name: relu, op: relu}
layers:
  - {name: c0, op: conv, out: w, kernel: 1, bias: false}
  - {name: r0, op: relu}
  - {name: layer, block: unit, repeat: 3}
  - {name: gap, op: global_avgpool}
  - {name: fc, op: linear, out: 10}
"""


def test_batchnorm_chain_symbolic_matches_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Symbolic mode through three batchnorms (1×1 convs, so no border taps or kept offsets):
    where σ² is symbolic its ε is left out, and the node says so; so are the channels' finite-
    width covariances, which symbolic mode takes as 0. Substituting w must give the numeric
    analysis without them, up to ε/σ² ≈ 1e-5; with ε kept, σ²/(σ² + ε) reached every later
    ReLU's arc-cosine and the formulas grew past what sympy simplifies in minutes."""
    spec = parse(BN_CHAIN, "bn.yaml")
    symbolic = propagate(build(spec, symbolic=("w",)))
    notes = symbolic["layer.0.bn"].notes
    assert any("≫ ε" in n for n in notes) and any("independent" in n for n in notes)
    monkeypatch.setattr(channels, "cross", lambda node, xs, out: None)
    for width in (16, 128):
        numeric = propagate(build(spec, {"w": width}))
        for s, n in zip(symbolic.nodes, numeric.nodes):
            for quantity in ("forward_m2", "backward_m2", "gamma"):
                got, want = getattr(s, quantity), getattr(n, quantity)
                if want is None:
                    continue
                got = sp.sympify(got)
                value = float(got.subs({symbol: width for symbol in got.free_symbols}))
                assert abs(value / float(want) - 1) < 1e-4, f"{s.name} {quantity} at w={width}: {value} vs {want}"
