"""`scalecalc emit --torch`: the emitted file is valid, standalone, faithful and safe."""

from __future__ import annotations

import functools
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from scalecalc.codegen import EMITTERS, MODULE_ATTRS  # noqa: E402
from scalecalc.corrections import correct  # noqa: E402
from scalecalc.graph import build  # noqa: E402
from scalecalc.propagate import propagate  # noqa: E402
from scalecalc.rules import RULES  # noqa: E402
from scalecalc.spec import load, parse  # noqa: E402
from scalecalc.verify import load_module, sample  # noqa: E402
from tests.conftest import ROOT, SPECS  # noqa: E402

CLI = [sys.executable, "-c", "from scalecalc.cli import main; main()"]
SMALL = {"resnet50_preact": ["--set", "w=8", "--set", "size=32"]}


def emit(spec, *args: str) -> str:  # type: ignore[no-untyped-def]
    out = subprocess.run([*CLI, "emit", "--torch", str(spec), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_emitters_cover_every_rule() -> None:
    assert set(EMITTERS) == set(RULES)


def test_module_attrs_list_is_complete() -> None:
    public = {a for a in dir(torch.nn.Module) if not a.startswith("_")}
    assert public <= MODULE_ATTRS | {"T_destination"}, sorted(public - MODULE_ATTRS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
@pytest.mark.parametrize("flag", ["", "--no-correct"])
def test_emitted_file_is_valid(spec, flag: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    source = emit(spec, *([flag] if flag else []), *SMALL.get(spec.stem, []))
    path = tmp_path / f"emitted_{spec.stem}.py"
    path.write_text(source)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", str(path)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    assert "scalecalc" not in {line.split()[1] for line in source.splitlines()
                               if line.startswith(("import ", "from "))}
    module = load_module(source, tmp_path, path.stem)
    model = module.Model()
    x = torch.randn(2, *module.INPUT_SHAPE, requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert not any(isinstance(b, torch.nn.Parameter) for b in model.buffers())
    sets = dict(kv.split("=") for kv in SMALL.get(spec.stem, [])[1::2])
    net = build(load(spec), {k: int(v) for k, v in sets.items()})
    net = net if flag else correct(net).network
    shapes = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:]))) for n in net.order[1:]]
    model(x)
    for h in hooks:
        h.remove()
    for node in net.nodes[1:]:
        s = node.shape
        assert shapes[node.name] == ((s.channels, s.h, s.w) if s.spatial else (s.channels,)), node.name


@pytest.mark.parametrize("name", ["lenet_strided", "vgg11"])
def test_emitted_golden(name: str, golden) -> None:
    golden(f"emit_{name}.py", emit(ROOT / "specs" / f"{name}.yaml"))


def test_no_correct_reproduces_spec_init(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = """
name: own-init
input: {features: 200}
init: {scheme: fan_in, distribution: uniform}
layers:
  - {name: fc1, op: linear, out: 300}
  - {name: relu1, op: relu}
  - {name: fc2, op: linear, out: 100, init: {scheme: xavier}}
  - {name: relu2, op: relu}
  - {name: fc3, op: linear, out: 50, init: {scheme: geometric, c: 0.5}}
"""
    spec = tmp_path / "own.yaml"
    spec.write_text(text)
    module = load_module(emit(spec, "--no-correct"), tmp_path, "own_init")
    model = module.Model().double()
    # fan_in: gain/n_in with gain 2; Xavier: 2·gain/(n_in + n_out) with gain 1; geometric: c/√(n_in·n_out)
    expected = {"fc1": 2 / 200, "fc2": 2 / (300 + 100), "fc3": 0.5 / math.sqrt(100 * 50)}
    rel_se = {"fc1": math.sqrt(0.8 / (200 * 300)), "fc2": math.sqrt(2 / (300 * 100)),
              "fc3": math.sqrt(2 / (100 * 50))}  # Var(W²)/E[W²]² = 4/5 uniform, 2 normal
    for name, m2 in expected.items():
        measured = model.get_submodule(name).weight.square().mean().item()
        assert abs(measured / m2 - 1) < 5 * rel_se[name], (name, measured, m2)
    weights = model.get_submodule("fc1").weight
    bound = math.sqrt(3 * expected["fc1"])
    assert weights.abs().max().item() <= bound  # uniform, not normal


HOSTILE = [
    'name: "evil\\"\\"\\"\\nimport os  # "\ninput: {features: 4}\nlayers:\n  - {name: fc, op: linear, out: 2}\n',
    "name: t\ninput: {features: 4}\nlayers:\n  - {name: forward, op: linear, out: 2}\n",
    "name: t\ninput: {features: 4}\nlayers:\n  - {name: \"x; import os\", op: linear, out: 2}\n",
    "name: t\ninput: {features: 4}\nblocks:\n  \"B(nn.Module): pass\\nimport os\\nclass C\":\n"
    "    layers: [{name: fc, op: linear, out: 2}]\nlayers:\n"
    "  - {name: b, block: \"B(nn.Module): pass\\nimport os\\nclass C\"}\n",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_never_reach_the_file(text: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "hostile.yaml"
    spec.write_text(text)
    target = tmp_path / "out.py"
    out = subprocess.run([*CLI, "emit", "--torch", str(spec), "-o", str(target)], capture_output=True,
                         text=True, cwd=ROOT)
    assert "Traceback" not in out.stderr
    if out.returncode == 0:
        source = target.read_text()
        assert "import os" not in source and '"""\n' not in source.split('"""', 2)[1]
        compile(source, str(target), "exec")
    else:
        assert out.returncode == 2 and not target.exists()


@functools.cache
def corrected_sample(name: str, tmp: str):  # type: ignore[no-untyped-def]
    """The corrected model of spec ``name``, sampled over 24 weight draws (batch 8)."""
    spec = ROOT / "specs" / f"{name}.yaml"
    fixed = correct(build(load(spec)))
    assert propagate(fixed.network).summary.gamma_spread == pytest.approx(1, abs=0.02)
    module = load_module(emit(spec), Path(tmp), f"corrected_{name}")
    weighted = [n.name for n in fixed.network.nodes if n.weighted]
    stats = sample(module, [fixed.network.output], weighted, draws=24, batch=8)
    return fixed.network.output, weighted, {n: {k: statistics.fmean(v) for k, v in row.items()}
                                            for n, row in stats.items()}


@pytest.mark.parametrize("name", ["lenet_strided", "alexnet_strided"])
def test_corrected_model_has_equal_measured_gamma(name: str, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    _, weighted, stats = corrected_sample(name, str(tmp_path_factory.getbasetemp()))
    ratios = [stats[n]["gamma"] for n in weighted]
    assert max(ratios) / min(ratios) < 1.10, dict(zip(weighted, ratios))


@pytest.mark.parametrize("name", ["lenet_strided", "alexnet_strided"])
def test_corrected_model_output_std(name: str, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    output, _, stats = corrected_sample(name, str(tmp_path_factory.getbasetemp()))
    out = stats[output]["forward_m2"]
    assert abs(math.sqrt(out) / 0.05 - 1) < 0.10, out


def _corrected_pooled_lenet(calculus: str, tmp: Path) -> tuple[float, float]:
    """Measured spread of E[γ_l] over the weighted layers and output std of the pooled LeNet
    corrected under ``calculus`` (1000 draws × 8: the SE of a layer's E[γ] is at most 1.5%)."""
    from scalecalc.codegen import emit_torch

    spec = load(ROOT / "benchmarks" / "nets" / "lenet_pooled.yaml")
    fixed = correct(build(spec), calculus=calculus)
    module = load_module(emit_torch(spec, fixed.network, digest="0", inserted=fixed.inserted), tmp,
                         f"pooled_{calculus}")
    weighted = [n.name for n in fixed.network.nodes if n.weighted]
    stats = sample(module, [fixed.network.output], weighted, draws=1000, batch=8, dtype="float32",
                   input_m2=float(fixed.network.input_m2))
    gammas = [statistics.fmean(stats[n]["gamma"]) for n in weighted]
    return max(gammas) / min(gammas), math.sqrt(statistics.fmean(stats[fixed.network.output]["forward_m2"]))


def test_corrected_pooled_network_is_measured_preconditioned(tmp_path: Path) -> None:
    """Corrections solved with the exact calculus precondition a network whose ReLU means are
    kept by average pooling; solved with the paper's rules (the negative control) they do not:
    the paper under-counts γ above the pools 5–6×, so its corrections leave that spread in."""
    spread, std = _corrected_pooled_lenet("exact", tmp_path)
    assert spread < 1.10 and abs(std / 0.05 - 1) < 0.10, (spread, std)
    spread, std = _corrected_pooled_lenet("paper", tmp_path)
    assert spread > 3 and std / 0.05 > 2, (spread, std)


def test_corrected_analysis_is_preconditioned_on_specs_that_keep_scaling() -> None:
    from scalecalc.corrections import KEEPS

    for spec in SPECS:
        net = build(load(spec))
        fixed = propagate(correct(net, 0.05).network)
        if all(n.op in KEEPS for n in net.nodes[1:]):
            assert fixed.summary.gamma_spread <= 1.02, spec.stem
        assert math.sqrt(fixed.summary.output_m2) == pytest.approx(0.05, rel=1e-6)


def test_symbolic_spec_cannot_be_corrected() -> None:
    from scalecalc.errors import ScalecalcError

    spec = parse("name: t\ninput: {features: n}\nparams: {n: 4}\nlayers:\n  - {name: fc, op: linear, out: 2}\n")
    with pytest.raises(ScalecalcError, match="numbers"):
        correct(build(spec, symbolic=("n",)))


def test_node_names_never_collide_with_generated_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A repeated block named like the loop variable and a layer named `each`; `self` is refused."""
    spec = tmp_path / "names.yaml"
    spec.write_text("""
name: names
input: {channels: 4, size: 8}
blocks:
  dense:
    layers:
      - {name: conv, op: conv, out: 4, kernel: 3, padding: 1}
      - {name: act, op: relu}
layers:
  - {name: block, block: dense, repeat: 2}
  - {name: each, block: dense, repeat: 2}
  - {name: pool, op: global_avgpool}
  - {name: fc, op: linear, out: 3}
""")
    module = load_module(emit(spec), tmp_path, "names_model")
    model = module.Model()
    assert model(torch.randn(2, *module.INPUT_SHAPE)).shape == (2, 3)
    assert isinstance(model.get_submodule("each.1.act"), torch.nn.ReLU)
    spec.write_text(spec.read_text().replace("name: act", "name: self"))
    out = subprocess.run([*CLI, "emit", "--torch", str(spec)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "'self'" in out.stderr and "Traceback" not in out.stderr
