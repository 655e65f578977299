"""`scalecalc.review.write_report`: self-contained HTML and Markdown design reviews."""

from __future__ import annotations

import base64
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from scalecalc.errors import ScalecalcError
from scalecalc.review import SECTIONS, write_report
from tests.conftest import ROOT, SPECS

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
CHROMIUM = Path("/usr/bin/chromium")


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m, validate=True) for m in IMG.findall(text)]


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_html_report_is_self_contained(spec: Path, tmp_path: Path) -> None:
    out = write_report(str(spec), str(tmp_path / "review.html"))
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), "external resource"
    for section in SECTIONS:
        assert f">{section}</h2>" in text, section
    pngs = _pngs(text)
    assert len(pngs) >= 3
    assert all(p.startswith(PNG) and len(p) > 10_000 for p in pngs)
    assert "<script" not in text.lower()
    assert "Design review:" in text and "output std" in text


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_markdown_report_links_resolve(spec: Path, tmp_path: Path) -> None:
    out = write_report(str(spec), str(tmp_path / "review.md"))
    text = out.read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) >= 3
    for link in links:
        png = (out.parent / link).resolve()
        assert png.parent == (tmp_path / "review_files").resolve()
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000
    for section in SECTIONS:
        assert f"## {section}" in text, section


def test_verify_adds_predicted_vs_measured_plot(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    text = write_report(str(ROOT / "specs" / "libsvm_mlp.yaml"), str(tmp_path / "r.html"), verify=True,
                        draws=4, batch=4).read_text(encoding="utf-8")
    assert 'id="plot-verify"' in text and "Predicted vs measured" in text
    assert len(_pngs(text)) == 4
    assert "verify (4 draws × batch 4" in text


def test_names_are_escaped(tmp_path: Path) -> None:
    spec = (ROOT / "specs" / "libsvm_mlp.yaml").read_text(encoding="utf-8")
    name = re.search(r"^name:\s*(\S+)", spec, re.M)
    assert name
    evil = tmp_path / "evil.yaml"
    evil.write_text(spec.replace(name.group(0), 'name: "<b>x</b>&"', 1), encoding="utf-8")
    text = write_report(str(evil), str(tmp_path / "evil.html")).read_text(encoding="utf-8")
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;&amp;" in text


def test_overrides_and_bad_suffix(tmp_path: Path) -> None:
    spec = str(ROOT / "specs" / "resnet50_preact.yaml")
    text = write_report(spec, str(tmp_path / "small.md"), overrides={"w": 8, "size": 32}).read_text(encoding="utf-8")
    assert "stage4.2.conv3" in text
    assert re.search(r"\| input \| input \| [^|]*32", text), "overrides not applied"
    with pytest.raises(ScalecalcError, match=r"\.html or \.md"):
        write_report(spec, str(tmp_path / "review.pdf"))


def test_missing_matplotlib_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_mpl(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ScalecalcError, match=r"pip install 'scalecalc\[report\]'"):
        write_report(str(ROOT / "specs" / "libsvm_mlp.yaml"), str(tmp_path / "r.html"))


@pytest.mark.parametrize("suffix", [".html", ".md"])
def test_hessian_adds_the_block_heat_map(suffix: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = write_report(str(ROOT / "specs" / "lenet_strided.yaml"), str(tmp_path / f"r{suffix}"), hessian=True,
                       hessian_draws=3, hessian_batch=2)
    text = out.read_text(encoding="utf-8")
    assert "Hessian blocks" in text and "3 draws × batch 2" in text and "min(d_l, d_m)" in text
    for layer in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert re.search(rf"{layer}(</td><td[^>]*>| \| )[0-9.e+-]+ ± ", text), layer  # a diagonal row per layer
    if suffix == ".html":
        assert 'id="plot-hessian"' in text
        pngs = _pngs(text)
        assert len(pngs) == 4 and all(p.startswith(PNG) and len(p) > 10_000 for p in pngs)
    else:
        assert "![hessian plot](r_files/hessian.png)" in text
        png = tmp_path / "r_files" / "hessian.png"
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 10_000
    for section in SECTIONS:
        assert section in text


def test_hessian_with_batchnorm_explains_why_there_is_no_heat_map(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from scalecalc.cli import app

    spec = (ROOT / "specs" / "lenet_strided.yaml").read_text(encoding="utf-8")
    bn = tmp_path / "lenet_bn.yaml"
    bn.write_text(spec.replace("  - {name: relu1, op: relu}", "  - {name: bn1, op: batchnorm}\n"
                               "  - {name: relu1, op: relu}", 1), encoding="utf-8")
    for name in ("r.html", "r.md"):
        result = CliRunner().invoke(app, ["report", str(bn), "-o", str(tmp_path / name), "--hessian"])
        assert result.exit_code == 0, result.output
        text = (tmp_path / name).read_text(encoding="utf-8")
        assert "No Hessian heat map: the network has batchnorm (bn1)" in text and "couple the samples" in text
        assert "plot-hessian" not in text and "hessian.png" not in text
    assert not (tmp_path / "r_files" / "hessian.png").exists()


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120, check=False)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    out = write_report(str(ROOT / "specs" / "vgg11.yaml"), str(tmp_path / "review.html"))
    url = out.resolve().as_uri()
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", url)
    assert shot.exists() and shot.stat().st_size > 20_000, "no screenshot"
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1400, 3000)
        lo, hi = rgb.convert("L").getextrema()
        assert hi - lo > 100, "blank screenshot"
        # the plots were decoded and drawn: matplotlib's first line colour (tab:blue) shows up
        blue = sum(n for n, (r, g, b) in rgb.getcolors(maxcolors=1 << 22) or []
                   if abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12)
        assert blue > 500, "no plot pixels in the screenshot"
    dom = _chromium(tmp_path, "--dump-dom", url).stdout.decode("utf-8", "replace")
    assert len(IMG.findall(dom)) >= 3 and ">Plots</h2>" in dom
