"""`scalecalc verify`: a verdict from sampling the emitted model, able to fail."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from scalecalc import exact, rules  # noqa: E402
from scalecalc.codegen import emit_torch  # noqa: E402
from scalecalc.corrections import correct  # noqa: E402
from scalecalc.graph import build  # noqa: E402
from scalecalc.propagate import propagate  # noqa: E402
from scalecalc.spec import load  # noqa: E402
from scalecalc.verify import threshold, verify  # noqa: E402
from tests.conftest import ROOT, SPECS  # noqa: E402

CLI = [sys.executable, "-c", "from scalecalc.cli import main; main()"]
SMALL = {"resnet50_preact": {"w": 8, "size": 32}, "vgg11": {"w": 16}, "alexnet_strided": {"w": 32, "fc": 256}}


def run_verify(name: str, draws: int = 20, batch: int = 8, calculus: str = "exact"):  # type: ignore[no-untyped-def]
    spec = load(ROOT / "specs" / f"{name}.yaml")
    fixed = correct(build(spec, SMALL.get(name)), calculus=calculus)
    source = emit_torch(spec, fixed.network, digest="0", inserted=fixed.inserted)
    analysis = propagate(fixed.network, calculus)
    return verify(fixed.network, analysis, source, draws=draws, batch=batch, device="cpu")


@pytest.mark.parametrize("name", [p.stem for p in SPECS])
def test_verify_passes_on_every_spec(name: str) -> None:
    result = run_verify(name)
    assert result.passed, [(c.node, c.quantity, c.error, c.se) for c in result.failures]
    trusted = [c for c in result.checks if c.trusted]
    assert trusted, "nothing was checked"
    # E[W²] of every weighted layer is drawn as analysed (within 5 standard errors)
    for c in result.checks:
        if c.quantity == "weight_m2":
            assert abs(c.measured - c.predicted) < 5 * c.se + 1e-3 * c.predicted, c


@pytest.mark.parametrize("calculus", ["paper", "exact"])
def test_planted_wrong_rule_fails_and_names_the_nodes(calculus: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if calculus == "paper":
        relu = rules.RULES["relu"]
        wrong = rules.Rule("relu", lambda node, xs: 0.6 * xs[0], relu.backward, True, relu.keeps_scaling, "planted")
        monkeypatch.setitem(rules.RULES, "relu", wrong)
    else:
        relu_exact = exact.EXACT["relu"]
        planted = exact.ExactRule(lambda node, xs: exact.State(0.6 * xs[0].m, xs[0].k), relu_exact.backward)
        monkeypatch.setitem(exact.EXACT, "relu", planted)
    result = run_verify("libsvm_mlp", calculus=calculus)
    assert not result.passed
    failing = {c.node for c in result.failures}
    assert "relu1" in failing and all(c.quantity == "forward_m2" for c in result.failures)


def test_cli_exit_codes_and_json() -> None:
    out = subprocess.run([*CLI, "verify", str(ROOT / "specs" / "libsvm_mlp.yaml"), "--json", "--draws", "8",
                          "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["passed"] is True and doc["draws"] == 8 and doc["device"] == "cpu"
    assert {c["quantity"] for c in doc["checks"]} == {"forward_m2", "backward_m2", "weight_m2", "gamma"}
    bad = subprocess.run([*CLI, "verify", str(ROOT / "specs" / "libsvm_mlp.yaml"), "--draws", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "draws" in bad.stderr and "Traceback" not in bad.stderr


def test_batchnorm_batch_must_match_the_sampled_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A batchnorm's 1/batch terms are predicted for the batch the spec names; sampling another
    batch would hold them against the wrong measurement."""
    spec = tmp_path / "bn.yaml"
    spec.write_text("name: bn\ninput: {channels: 4, size: 4}\nlayers:\n"
                    "  - {name: c, op: conv, out: 8, kernel: 1, bias: false}\n"
                    "  - {name: bn, op: batchnorm, batch: 16}\n  - {name: fc, op: conv, out: 8, kernel: 1}\n")
    out = subprocess.run([*CLI, "verify", str(spec), "--batch", "8", "--draws", "2", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "--batch 16" in out.stderr and "Traceback" not in out.stderr
    ok = subprocess.run([*CLI, "verify", str(spec), "--batch", "16", "--draws", "4", "--device", "cpu"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ok.returncode in (0, 1) and "Traceback" not in ok.stderr, ok.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_bad_input() -> None:
    out = subprocess.run([*CLI, "verify", str(ROOT / "specs" / "libsvm_mlp.yaml"), "--device", "cuda"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2 and "no CUDA device" in out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_on_gpu() -> None:
    spec = load(ROOT / "specs" / "lenet_strided.yaml")
    fixed = correct(build(spec))
    source = emit_torch(spec, fixed.network, digest="0", inserted=fixed.inserted)
    result = verify(fixed.network, propagate(fixed.network), source, draws=20, batch=16, device="cuda")
    assert result.device == "cuda" and result.passed


def test_threshold_grows_with_checks_and_shrinks_with_draws() -> None:
    assert threshold(10, 1000) == pytest.approx(3.29, abs=0.05)  # 1% over 10 two-sided checks, normal limit
    assert threshold(100, 20) > threshold(10, 20) > threshold(10, 200)
    assert not math.isnan(threshold(1, 2))


def test_cli_hessian_and_conditioning() -> None:
    out = subprocess.run([*CLI, "verify", str(ROOT / "specs" / "libsvm_mlp.yaml"), "--json", "--draws", "4",
                          "--device", "cpu", "--hessian", "--conditioning"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    hess = [c for c in doc["checks"] if c["quantity"] == "hessian"]
    assert {c["node"] for c in hess} == {"fc1", "fc2", "fc3"} and not any(c["trusted"] for c in hess)
    assert all(0.5 < c["measured"] / c["predicted"] < 2.5 for c in hess), hess  # Thm 2 up to O(1/width)
    assert set(doc["conditioning"]) == {"fc1", "fc2", "fc3"}
    assert all(row["x_kappa"] >= 1 and row["grad_kappa"] >= 1 for row in doc["conditioning"].values())


def test_cli_paper_fig1(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig1.png"
    out = subprocess.run([*CLI, "paper", "fig1", "-o", str(png), "--setups", "3", "--batch", "32", "--device", "cpu",
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "median" in out.stdout
