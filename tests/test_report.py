"""The analyze command's outputs: table goldens, the JSON contract, and a torch-free start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scalecalc import analyze
from scalecalc.report import render_text
from tests.conftest import ROOT, SPECS

CLI = [sys.executable, "-c", "from scalecalc.cli import main; main()"]
NODE_KEYS = {"name", "op", "inputs", "shape", "forward_m2", "backward_m2", "varsigma", "weight_m2",
             "gamma", "gamma_bias", "exact", "notes"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("name", ["lenet_strided", "libsvm_mlp", "vgg11"])
def test_table_golden(name: str, golden) -> None:
    golden(f"{name}.txt", render_text(analyze(str(ROOT / "specs" / f"{name}.yaml"))))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_json_contract(spec) -> None:
    out = run("analyze", str(spec), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == 1 and doc["name"] and doc["input"]["second_moment"] == 1
    assert set(doc["summary"]) >= {"gamma_min", "gamma_max", "gamma_spread", "output_m2", "varsigma_changes"}
    for node in doc["nodes"]:
        assert set(node) == NODE_KEYS
        if node["op"] in ("conv", "linear"):
            assert node["gamma"] is not None and node["weight_m2"] is not None
        elif node["op"] != "scale":  # a learnable scale also has γ (App. E)
            assert node["gamma"] is None and node["weight_m2"] is None
        assert node["forward_m2"] > 0 and node["backward_m2"] > 0
        if node["op"] in ("relu", "flatten", "add", "maxpool"):
            assert node["gamma"] is None and node["gamma_bias"] is None
    names = [n["name"] for n in doc["nodes"]]
    assert all(src in names[: names.index(n["name"])] for n in doc["nodes"] for src in n["inputs"])


def test_table_cli_and_compare_inits() -> None:
    out = run("analyze", str(ROOT / "specs" / "libsvm_mlp.yaml"))
    assert out.returncode == 0 and "preconditioned" in out.stdout and "fc3" in out.stdout
    out = run("analyze", str(ROOT / "specs" / "libsvm_mlp.yaml"), "--compare-inits", "--json")
    schemes = json.loads(out.stdout)["schemes"]
    assert set(schemes) == {"geometric", "fan_in", "fan_out", "arithmetic"}
    # Eq. 3 equalises γ; the other schemes leave a spread because widths 300→384→64→10 differ
    assert schemes["geometric"]["gamma_spread"] == pytest.approx(1)
    assert all(schemes[s]["gamma_spread"] > 1.5 for s in ("fan_in", "fan_out", "arithmetic"))


def test_symbolic_json_has_formulas() -> None:
    out = run("analyze", str(ROOT / "specs" / "lenet_strided.yaml"), "--symbolic", "w", "--json")
    doc = json.loads(out.stdout)
    conv1 = next(n for n in doc["nodes"] if n["name"] == "conv1")
    assert doc["symbols"] == ["w"] and "w" in conv1["forward_m2"]


def test_analyze_does_not_import_torch() -> None:
    code = ("import sys; sys.argv = ['scalecalc', 'analyze', 'specs/resnet50_preact.yaml', '--json'];"
            "from scalecalc.cli import main\ntry: main()\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_report_command_writes_html_and_refuses_other_suffixes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    target = tmp_path / "review.html"
    out = run("report", str(ROOT / "specs" / "libsvm_mlp.yaml"), "-o", str(target))
    assert out.returncode == 0, out.stderr
    assert target.read_text().count("data:image/png;base64,") >= 3
    bad = run("report", str(ROOT / "specs" / "libsvm_mlp.yaml"), "-o", str(tmp_path / "review.pdf"))
    assert bad.returncode == 2 and ".html or .md" in bad.stderr and "Traceback" not in bad.stderr
