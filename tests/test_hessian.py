"""Hessian blocks (Theorem 2, App. G) and layer-wise conditioning (Huang et al., Prop. 1) against sampling.

Tolerance for Theorem 2. For the top layer of an MLP the measurement is exactly
2(m+1)·E[‖x‖⁴]/n against the prediction 2(m+1)·n·E[x²]², so measured/predicted − 1 =
Var‖x‖²/E[‖x‖²]². To first order in 1/width this is b = 2/d + Σ_i 5/n_i: 2/d from the Gaussian
input (kurtosis 3), 5/n for each ReLU layer of width n below (E[z⁴]/E[z²]² = 6 for a rectified
Gaussian). Below the top layer the weights above appear in both factors of Φᵀ S Φ, adding terms
of the same order; sampled, every layer sits at ≈ b (b = 0.047, 0.19, 0.75 at widths 256, 64, 16).
So a prediction passes when −z·se ≤ measured/predicted − 1 ≤ 2b + z·se, se the draw-to-draw
standard error and z = 4 (a few checks, no false alarm expected).

The full block matrix (Fig. 2) is checked exactly: against double-backward Hessian-vector
products of one sample's loss, against J_lᵀ S J_m formed from the Jacobian, and, on a net small
enough to form the whole Hessian, for ‖H_lm‖²_F from basis and from Gaussian directions.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from scalecalc import hessian  # noqa: E402
from scalecalc.codegen import emit_torch  # noqa: E402
from scalecalc.graph import build  # noqa: E402
from scalecalc.hessian import (  # noqa: E402
    block_matrix,
    block_moments,
    conditioning,
    hessian_blocks,
    hessian_matrix,
    predicted_hessian,
)
from scalecalc.propagate import propagate  # noqa: E402
from scalecalc.spec import load, parse  # noqa: E402
from scalecalc.verify import load_module  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

Z = 4.0
WIDE = (256, 256, 256, 256)
SCHEMES = ("geometric", "fan_in", "fan_out", "arithmetic")


def mlp(widths: tuple[int, ...], tmp: Path, init: str = "fan_in"):  # type: ignore[no-untyped-def]
    """(net, module, weighted) of a ReLU MLP with the given widths (input first); ``init`` is the
    body of the spec's ``init:`` mapping after the scheme name."""
    layers = []
    for i, width in enumerate(widths[1:], 1):
        layers.append(f"  - {{name: fc{i}, op: linear, out: {width}}}")
        if i < len(widths) - 1:
            layers.append(f"  - {{name: relu{i}, op: relu}}")
    text = f"name: mlp\ninput: {{features: {widths[0]}}}\ninit: {{scheme: {init}}}\nlayers:\n" + "\n".join(layers)
    spec = parse(text + "\n")
    net = build(spec)
    stem = "mlp_" + "_".join(map(str, widths))
    return net, load_module(emit_torch(spec, net, digest="0"), tmp, stem), [n.name for n in net.nodes if n.weighted]


def first_order(widths: tuple[int, ...]) -> float:
    return 2 / widths[0] + sum(5 / n for n in widths[1:-1])


def ratios(predicted: dict[str, float], measured: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """measured/predicted − 1 and its standard error, per layer."""
    out = {}
    for name, values in measured.items():
        se = statistics.stdev(values) / math.sqrt(len(values))
        out[name] = (statistics.fmean(values) / predicted[name] - 1, se / predicted[name])
    return out


@pytest.fixture(scope="module")
def wide(tmp_path_factory):  # type: ignore[no-untyped-def]
    net, module, weighted = mlp(WIDE, tmp_path_factory.mktemp("wide"))
    return net, hessian_blocks(module, weighted, draws=100, batch=16, seed=1)


def test_loss_gradient_moment_is_2_m_plus_1() -> None:
    """E_R[(Sy)²] = 2(m+1)·E[y²] for S = R + Rᵀ, the factor predicted_hessian uses."""
    gen = torch.Generator().manual_seed(0)
    m, draws = 5, 40000
    y = torch.randn(m, dtype=torch.float64, generator=gen)
    R = torch.randn(draws, m, m, dtype=torch.float64, generator=gen)
    sy = (R + R.transpose(1, 2)) @ y
    assert sy.square().mean().item() == pytest.approx(2 * (m + 1) * y.square().mean().item(), rel=0.03)


def test_per_sample_block_is_the_double_backward_hvp(tmp_path: Path) -> None:
    spec = load(ROOT / "specs" / "lenet_strided.yaml")
    net = build(spec)
    module = load_module(emit_torch(spec, net, digest="0"), tmp_path, "lenet_hvp")
    weighted = [n.name for n in net.nodes if n.weighted]
    torch.manual_seed(0)
    model = module.Model().double()
    x = torch.randn(32, *module.INPUT_SHAPE, dtype=torch.float64)
    R = torch.randn(10, 10, dtype=torch.float64)
    rs = {n: torch.randn_like(model.get_submodule(n).weight) for n in weighted}
    got = block_moments(model, x, weighted, R, rs)

    def hvp(xs, name):  # type: ignore[no-untyped-def]
        """H r by double backward: g = ∂L/∂W with create_graph, then ∂(g·r)/∂W."""
        w = model.get_submodule(name).weight
        y = model(xs).reshape(xs.shape[0], -1)
        (g,) = torch.autograd.grad(torch.einsum("bi,ij,bj->", y, R, y), w, create_graph=True)
        return torch.autograd.grad((g * rs[name]).sum(), w)[0]

    for name in weighted:
        for b in range(3):  # batch of one: the definition
            assert got[name][b].item() == pytest.approx(hvp(x[b:b + 1], name).square().mean().item(), rel=1e-9)
    # the batch Hessian is Σ_b H_b, and its cross terms are far from negligible: /B overstates
    assert hvp(x, "fc3").square().mean().item() / 32 > 3 * got["fc3"].mean().item()


def test_wide_mlp_matches_theorem_2(wide) -> None:  # type: ignore[no-untyped-def]
    net, measured = wide
    b = first_order(WIDE)
    for name, (dev, se) in ratios(predicted_hessian(propagate(net), net), measured).items():
        assert -Z * se <= dev <= 2 * b + Z * se, (name, dev, se, b)
        assert se < 0.03, (name, se)  # the check has power: a 10% error would show


def test_narrow_layer_shows_the_o_1_over_n_correction(tmp_path: Path) -> None:
    """A width-8 bottleneck: Theorem 2's O(1/n_out) term is visible, at the first-order size b.

    Every layer is measured 0.3–0.8 above its prediction (b ≈ 0.67 here), well outside the band
    the wide network allows; the prediction is the leading term only."""
    widths = (256, 256, 8, 256, 256)
    net, module, weighted = mlp(widths, tmp_path)
    measured = hessian_blocks(module, weighted, draws=100, batch=16, seed=2)
    b = first_order(widths)
    for name, (dev, se) in ratios(predicted_hessian(propagate(net), net), measured).items():
        assert dev > 2 * first_order(WIDE) + 2 * se, (name, dev, se)  # fails the wide net's tolerance
        assert dev <= 2 * b + Z * se, (name, dev, se)


def test_wrong_prediction_is_detected(wide, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Negative control: predictions from an analysis that assumed gain 2.4 for weights drawn
    with gain 2 (each E[W²] 20% off; the Hessian prediction moves by 1.2⁴ ≈ 2) are caught."""
    _, measured = wide
    wrong, _, _ = mlp(WIDE, tmp_path, init="fan_in, gain: 2.4")
    b = first_order(WIDE)
    devs = ratios(predicted_hessian(propagate(wrong), wrong), measured)
    failed = [n for n, (dev, se) in devs.items() if not -Z * se <= dev <= 2 * b + Z * se]
    assert failed == ["fc1", "fc2", "fc3"], devs


def lenet(tmp: Path, scheme: str | None = None):  # type: ignore[no-untyped-def]
    """(net, module, weighted) of specs/lenet_strided.yaml, under ``scheme`` if given."""
    spec = load(ROOT / "specs" / "lenet_strided.yaml")
    net = build(spec, None, (), scheme)
    module = load_module(emit_torch(spec, net, digest="0"), tmp, f"lenet_{scheme or 'spec'}")
    return net, module, [n.name for n in net.nodes if n.weighted]


def drawn(module, model, weighted, batch: int, seed: int):  # type: ignore[no-untyped-def]
    """float64 inputs, R and one direction per layer, for exact comparisons."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *module.INPUT_SHAPE, dtype=torch.float64, generator=gen)
    R = torch.randn(10, 10, dtype=torch.float64, generator=gen)
    rs = {n: torch.randn(model.get_submodule(n).weight.shape, dtype=torch.float64, generator=gen) for n in weighted}
    return x, R, rs


def test_matrix_diagonal_is_block_moments(tmp_path: Path) -> None:
    """On the diagonal ∂²y/∂W_l² = 0 (y is linear in each W_l), so the full block, its
    Gauss–Newton part and block_moments's three-pass product agree to rounding."""
    _, module, weighted = lenet(tmp_path)
    torch.manual_seed(0)
    model = module.Model().double()
    x, R, rs = drawn(module, model, weighted, 4, 1)
    diagonal = block_moments(model, x, weighted, R, rs)
    for gauss_newton in (False, True):
        got = block_matrix(model, x, weighted, R, rs, gauss_newton=gauss_newton)
        for name in weighted:
            assert torch.allclose(got[name][name], diagonal[name], rtol=1e-9, atol=0), (name, gauss_newton)


def test_off_diagonal_blocks_are_the_double_backward_hvp(tmp_path: Path) -> None:
    """Every block (l, m) of one sample: H_lm r_m = ∂/∂W_l (∂L_b/∂W_m · r_m) by double backward,
    and the Gauss–Newton part J_lᵀ S J_m r_m from the per-output Jacobian rows."""
    _, module, weighted = lenet(tmp_path)
    torch.manual_seed(0)
    model = module.Model().double()
    x, R, rs = drawn(module, model, weighted, 3, 2)
    full = block_matrix(model, x, weighted, R, rs)
    gn = block_matrix(model, x, weighted, R, rs, gauss_newton=True)
    ws = [model.get_submodule(n).weight for n in weighted]
    sizes = {n: w.numel() for n, w in zip(weighted, ws)}
    for b in range(3):
        y = model(x[b:b + 1]).reshape(-1)
        jac = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(y[i], ws, retain_graph=True)])
               for i in range(y.numel())]
        J = torch.stack(jac)  # (m, Σ d_l): rows ∂y_i/∂W
        starts = dict(zip(weighted, [0, *torch.tensor([w.numel() for w in ws]).cumsum(0).tolist()]))
        for m, w_m in zip(weighted, ws):
            (g,) = torch.autograd.grad(y @ R @ y, w_m, create_graph=True)
            hv = torch.autograd.grad((g * rs[m]).sum(), ws, retain_graph=True, allow_unused=True)
            Jm = J[:, starts[m]:starts[m] + sizes[m]]
            gn_hv = J.T @ ((R + R.T) @ (Jm @ rs[m].reshape(-1)))
            for n, h in zip(weighted, hv):
                h = torch.zeros_like(rs[n]) if h is None else h
                size = min(sizes[n], sizes[m])
                assert full[n][m][b].item() == pytest.approx(h.square().sum().item() / size, rel=1e-9), (n, m, b)
                want = gn_hv[starts[n]:starts[n] + sizes[n]].square().sum().item() / size
                assert gn[n][m][b].item() == pytest.approx(want, rel=1e-9), (n, m, b)
    # the second-order term Σ_i (Sy)_i ∂²y_i/∂W_l∂W_m is not small: the two differ off the diagonal
    assert all(abs(full[n][m].mean().item() / gn[n][m].mean().item() - 1) > 0.05
               for n in weighted for m in weighted if n != m)


def test_frobenius_norms_on_a_tiny_net(tmp_path: Path) -> None:
    """The whole Hessian of one sample's loss by torch.autograd.functional.hessian on a 4-6-5-3
    ReLU MLP. (i) Basis directions e_j, summed over j, give ‖H_lm‖²_F exactly; as H is symmetric,
    (l, m) and (m, l) then agree although they come from different columns. (ii) With N Gaussian
    directions the mean estimates ‖H_lm‖²_F; ‖Hr‖² has variance 2‖H_lmᵀH_lm‖²_F = 2Σσ⁴, so the
    tolerance is Z·√(2Σσ⁴/N) from the exact singular values."""
    from torch.func import functional_call

    _, module, weighted = mlp((4, 6, 5, 3), tmp_path)
    torch.manual_seed(0)
    model = module.Model().double()
    x = torch.randn(1, 4, dtype=torch.float64)
    R = torch.randn(3, 3, dtype=torch.float64)
    shapes = {n: model.get_submodule(n).weight.shape for n in weighted}
    sizes = {n: math.prod(s) for n, s in shapes.items()}

    def loss(flat):  # type: ignore[no-untyped-def]
        parts = dict(zip(weighted, flat.split(list(sizes.values()))))
        y = functional_call(model, {f"{n}.weight": p.reshape(shapes[n]) for n, p in parts.items()}, (x,))[0]
        return y @ R @ y

    flat = torch.cat([model.get_submodule(n).weight.detach().reshape(-1) for n in weighted])
    H = torch.autograd.functional.hessian(loss, flat)
    edges = dict(zip(weighted, torch.tensor([0, *sizes.values()]).cumsum(0).tolist()))
    block = {(n, m): H[edges[n]:edges[n] + sizes[n], edges[m]:edges[m] + sizes[m]] for n in weighted for m in weighted}
    exact = {k: b.square().sum().item() / min(sizes[k[0]], sizes[k[1]]) for k, b in block.items()}
    assert all(exact[k] > 0 for k in exact)

    basis = {k: 0.0 for k in exact}
    for j in range(max(sizes.values())):
        directions = {n: torch.nn.functional.one_hot(torch.tensor(j), sizes[n]).double().reshape(shapes[n])
                      if j < sizes[n] else torch.zeros(shapes[n], dtype=torch.float64) for n in weighted}
        got = block_matrix(model, x, weighted, R, directions)
        for n, m in basis:
            basis[n, m] += got[n][m].item()
    for (n, m), value in basis.items():
        assert value == pytest.approx(exact[n, m], rel=1e-9), (n, m)
        assert value == pytest.approx(basis[m, n], rel=1e-9), (n, m)

    draws = 200
    torch.manual_seed(1)
    sampled = {k: 0.0 for k in exact}
    for _ in range(draws):
        got = block_matrix(model, x, weighted, R)
        for n, m in sampled:
            sampled[n, m] += got[n][m].item() / draws
    for (n, m), value in sampled.items():
        sigma = torch.linalg.svdvals(block[n, m])
        se = math.sqrt(2 * sigma.pow(4).sum().item() / draws) / min(sizes[n], sizes[m])
        assert abs(value - exact[n, m]) <= Z * se, (n, m, value, exact[n, m], se)


@pytest.fixture(scope="module")
def schemes(tmp_path_factory):  # type: ignore[no-untyped-def]
    """The LeNet block matrix under each init scheme: 40 draws × batch 8, one seed for all."""
    tmp = tmp_path_factory.mktemp("schemes")
    out = {}
    for scheme in SCHEMES:
        net, module, weighted = lenet(tmp, scheme)
        out[scheme] = (net, module, hessian_matrix(module, weighted, draws=40, batch=8, seed=3))
    return weighted, out


def test_geometric_init_equalises_the_diagonal(schemes) -> None:  # type: ignore[no-untyped-def]
    """Fig. 2's claim. Theorem 2 predicts an exactly flat diagonal under geometric init; the
    measurement is prediction × (1 + ε_l) with the finite-width term 0 ≤ ε_l ≲ 0.25 at LeNet's
    widths (docs/paper.md), so the true spread is at most 1 + β, β = 0.5 (twice that, as the 2b
    allowance above). A draw's value is skewed (one R, one set of weights): its relative spread
    across draws is s_l·√N ≈ 0.4–0.9, so each layer's mean is known to s_l and the spread of the
    two extreme layers i, j to a factor exp(Z·√(s_i² + s_j²)). The same bound rejects every other
    scheme: they are the negative control, the assertion fails where the diagonal is not flat."""
    weighted, results = schemes
    beta = 0.5
    verdict = {}
    for scheme, (net, _, values) in results.items():
        predicted = predicted_hessian(propagate(net, "paper"), net)
        flat_prediction = max(predicted.values()) / min(predicted.values()) < 1 + 1e-9
        assert flat_prediction == (scheme == "geometric"), (scheme, predicted)
        mean = {n: statistics.fmean(values[n][n]) for n in weighted}
        rel_se = {n: statistics.stdev(values[n][n]) / mean[n] / math.sqrt(len(values[n][n])) for n in weighted}
        hi, lo = max(mean, key=mean.__getitem__), min(mean, key=mean.__getitem__)
        bound = (1 + beta) * math.exp(Z * math.hypot(rel_se[hi], rel_se[lo]))
        assert bound < 4, (scheme, rel_se)  # enough draws for the check to have power
        verdict[scheme] = (mean[hi] / mean[lo] <= bound, round(mean[hi] / mean[lo], 3), round(bound, 3))
    assert {s: v[0] for s, v in verdict.items()} == {s: s == "geometric" for s in SCHEMES}, verdict


def test_schemes_differ_by_positive_homogeneity(schemes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Zero biases: y(c·W) = C·y(W) with C = Π_k c_k, so L scales by C² and H_lm by C²/(c_l c_m).
    One seed draws the same normals for every scheme, so each cell differs from geometric's by
    exactly (C²/(c_l c_m))², c_l the ratio of the schemes' weight scales: an exact check of the
    off-diagonal blocks' bilinear structure (float32 rounding only)."""
    weighted, results = schemes
    scale = {}
    for scheme, (_, module, _) in results.items():
        torch.manual_seed(0)
        model = module.Model()
        scale[scheme] = {n: model.get_submodule(n).weight.detach().double().square().mean().sqrt().item()
                         for n in weighted}
    base = results["geometric"][2]
    for scheme in SCHEMES[1:]:
        c = {n: scale[scheme][n] / scale["geometric"][n] for n in weighted}
        big_c = math.prod(c.values())
        values = results[scheme][2]
        for n in weighted:
            for m in weighted:
                factor = (big_c**2 / (c[n] * c[m])) ** 2
                for got, ref in zip(values[n][m], base[n][m]):
                    assert got == pytest.approx(factor * ref, rel=1e-3), (scheme, n, m)


def test_conditioning_is_finite_on_a_convnet(tmp_path: Path) -> None:
    spec = load(ROOT / "specs" / "lenet_strided.yaml")
    net = build(spec)
    module = load_module(emit_torch(spec, net, digest="0"), tmp_path, "lenet_cond")
    weighted = [n.name for n in net.nodes if n.weighted]
    result = conditioning(module, weighted, batch=32)
    for name, s in result.items():
        for side in ("x", "grad"):
            assert 0 < s[f"{side}_lmax"] < math.inf and 1 <= s[f"{side}_kappa"] < math.inf, (name, s)
            assert s[f"{side}_rank"] <= min(s[f"{side}_dim"], s[f"{side}_samples"])
        assert s["kappa"] == pytest.approx(s["x_kappa"] * s["grad_kappa"])
    assert result["conv1"]["x_dim"] == 75 and result["conv1"]["x_samples"] == 32 * 16 * 16  # patches
    assert result["fc1"]["x_rank"] == 32 < result["fc1"]["x_dim"]  # fewer samples than features


def test_ill_conditioned_input_raises_kappa_x(tmp_path: Path) -> None:
    """iid input: κ(Σx) of the first layer is the Marchenko–Pastur ((1+√q)/(1−√q))², q = d/N.
    Per-feature E[x²] spanning 10⁴ (same draws): Σx = D^½ Σ̂ D^½, so κ(D)/κ̂ ≤ κ ≤ κ(D)·κ̂."""
    d, batch = 32, 4096
    _, module, weighted = mlp((d, 64, 10), tmp_path)
    iid = conditioning(module, weighted, batch=batch, seed=3)["fc1"]["x_kappa"]
    q = d / batch
    assert iid == pytest.approx(((1 + math.sqrt(q)) / (1 - math.sqrt(q))) ** 2, rel=0.1)
    scaled = conditioning(module, weighted, batch=batch, seed=3, input_m2=torch.logspace(-2, 2, d).tolist())
    assert 1e4 / iid * (1 - 1e-9) <= scaled["fc1"]["x_kappa"] <= 1e4 * iid * (1 + 1e-9)
    assert scaled["fc2"]["x_kappa"] > 3 * conditioning(module, weighted, batch=batch, seed=3)["fc2"]["x_kappa"]


def test_input_scale_moves_lmax_not_kappa(tmp_path: Path) -> None:
    """Zero biases and positive homogeneity: ×100 on E[x₀²] scales every Σx by 100, leaves Σ∇h and κ."""
    _, module, weighted = mlp((48, 96, 32, 10), tmp_path)
    one = conditioning(module, weighted, batch=256, seed=4)
    big = conditioning(module, weighted, batch=256, seed=4, input_m2=100.0)
    for name in weighted:
        assert big[name]["x_lmax"] == pytest.approx(100 * one[name]["x_lmax"], rel=1e-9)
        for key in ("x_kappa", "grad_lmax", "grad_kappa", "kappa"):
            assert big[name][key] == pytest.approx(one[name][key], rel=1e-6), (name, key)


def test_large_covariances_are_subsampled(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, module, weighted = mlp((40, 64, 10), tmp_path)
    full = conditioning(module, weighted, batch=512, seed=5)["fc1"]
    monkeypatch.setattr(hessian, "MAX_FEATURES", 16)
    sub = conditioning(module, weighted, batch=512, seed=5)["fc1"]
    assert sub["x_kept"] == 16 and sub["x_dim"] == 40 and full["x_kept"] == 40
    assert sub["x_kappa"] <= full["x_kappa"] and sub["x_lmax"] <= full["x_lmax"]  # interlacing


def test_fig1_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from scalecalc.errors import ScalecalcError
    from scalecalc.paper import fig1

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ScalecalcError, match="matplotlib is needed"):
        fig1(str(tmp_path / "f.png"), setups=1, batch=1)


def test_fig1_small_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from scalecalc.paper import LENET_STRIDED, fig1

    spec_file = (ROOT / "specs" / "lenet_strided.yaml").read_text(encoding="utf-8")
    assert "".join(line for line in spec_file.splitlines(True) if not line.startswith("#")) == LENET_STRIDED
    out = tmp_path / "fig1.png"
    summary = fig1(str(out), setups=4, batch=8, seed=1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary["layers"]) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert summary["overall"]["n"] == 20 and all(s["n"] == 4 for s in summary["layers"].values())
    assert all(v > 0 for values in summary["ratios"].values() for v in values)


def test_fig2_small_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from scalecalc.paper import fig2

    out = tmp_path / "fig2.png"
    summary = fig2(str(out), draws=2, batch=2, seed=1)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(summary["schemes"]) == list(SCHEMES)
    for res in summary["schemes"].values():
        assert res["layers"] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
        assert all(len(row) == 5 and all(v > 0 for v in row) for row in res["matrix"])
        assert res["diagonal"] == [res["matrix"][i][i] for i in range(5)]
        assert res["spread"] == pytest.approx(max(res["diagonal"]) / min(res["diagonal"]))
        assert res["ratio"] == pytest.approx([p / d for p, d in zip(res["predicted"], res["diagonal"])])
    assert summary["schemes"]["geometric"]["predicted_spread"] == pytest.approx(1.0)


def test_fig2_errors_exit_2_without_traceback(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from scalecalc.cli import app

    result = CliRunner().invoke(app, ["paper", "fig2", "-o", str(tmp_path / "f.png"), "--draws", "1"])
    assert result.exit_code == 2 and "need draws ≥ 2" in result.output and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    result = CliRunner().invoke(app, ["paper", "fig2", "-o", str(tmp_path / "f.png")])
    assert result.exit_code == 2 and "matplotlib is needed" in result.output


def test_analyze_does_not_import_torch_or_hessian() -> None:
    code = ("import sys; from scalecalc.cli import app\n"
            "try:\n    app(['analyze', 'specs/libsvm_mlp.yaml', '--json'])\nexcept SystemExit:\n    pass\n"
            "print('scalecalc.hessian' in sys.modules, 'torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stderr.strip().endswith("False False"), out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_on_gpu_match_cpu(tmp_path: Path) -> None:
    _, module, weighted = mlp((64, 128, 128, 10), tmp_path)
    torch.manual_seed(0)
    model = module.Model().double()
    x = torch.randn(64, 64, dtype=torch.float64)
    R = torch.randn(10, 10, dtype=torch.float64)
    rs = {n: torch.randn_like(model.get_submodule(n).weight) for n in weighted}
    cpu = block_moments(model, x, weighted, R, rs)
    gpu = block_moments(model.cuda(), x.cuda(), weighted, R.cuda(), {n: r.cuda() for n, r in rs.items()})
    for name in weighted:
        assert torch.allclose(gpu[name].cpu(), cpu[name], rtol=1e-9), name
    result = conditioning(module, weighted, batch=256, device="cuda")
    assert all(1 <= s["kappa"] < math.inf for s in result.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_matrix_on_gpu_matches_cpu(tmp_path: Path) -> None:
    _, module, weighted = lenet(tmp_path)
    torch.manual_seed(0)
    model = module.Model().double()
    x, R, rs = drawn(module, model, weighted, 8, 5)
    cpu = block_matrix(model, x, weighted, R, rs)
    gpu = block_matrix(model.cuda(), x.cuda(), weighted, R.cuda(), {n: r.cuda() for n, r in rs.items()})
    for n in weighted:
        for m in weighted:
            assert torch.allclose(gpu[n][m].cpu(), cpu[n][m], rtol=1e-9), (n, m)
    values = hessian_matrix(module, weighted, draws=2, batch=4, device="cuda")
    assert all(v > 0 for row in values.values() for cell in row.values() for v in cell)
