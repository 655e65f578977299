"""Design-review report: one HTML file (plots embedded) or Markdown with a folder of PNGs.

``write_report`` analyses a spec as written, lists the corrections ``emit`` would apply and the
ops that break scaling, plots moments, γ under every init scheme and ς along depth, and with
``verify`` samples the spec's own network and plots predicted against measured values; with
``hessian`` it adds the heat map of the network's per-sample Hessian blocks (``scalecalc.heatmap``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalecalc.errors import ScalecalcError
from scalecalc.propagate import Analysis
from scalecalc.report import fmt

MAX_LABELS = 40
NEED_MPL = "matplotlib is needed for reports: pip install 'scalecalc[report]'"
COLUMNS = ("node", "op", "shape", "E[x²]", "E[Δx²]", "ς", "γ", "γ_b", "notes")
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#eee;position:sticky;top:0}td.n{text-align:right;font-family:monospace}tr.approx{background:#fff6d5}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
.bad{color:#b00;font-weight:bold}.good{color:#070;font-weight:bold}"""


@dataclass
class _Content:
    title: str
    summary: list[tuple[str, str]]
    corrections: Sequence[Sequence[str]]
    warnings: Sequence[Sequence[str]]
    plots: list[tuple[str, str, bytes]]  # (file stem, caption, PNG)
    layers: Sequence[tuple[Sequence[str], bool]]  # (cells, exact)
    spec_text: str
    notes: list[str] = field(default_factory=list)
    hessian: tuple[str, Sequence[Sequence[str]], bytes | None] | None = None  # (text, diagonal rows, PNG)


def write_report(spec_path: str, out: str, *, overrides: dict[str, Any] | None = None, calculus: str = "exact",
                 verify: bool = False, draws: int = 8, batch: int = 8, output_std: float = 0.05,
                 hessian: bool = False, hessian_draws: int = 50, hessian_batch: int = 16) -> Path:
    """Write the design review of ``spec_path`` to ``out`` (``.html`` or ``.md``) and return its path."""
    path = Path(out)
    if path.suffix.lower() not in (".html", ".md"):
        raise ScalecalcError(f"report {out!r}: the file name must end in .html or .md")
    _require_matplotlib()
    content = _collect(spec_path, overrides, calculus, verify, draws, batch, output_std,
                       (hessian_draws, hessian_batch) if hessian else None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".html":
            path.write_text(_html(content), encoding="utf-8")
        else:
            folder = path.parent / f"{path.stem}_files"
            folder.mkdir(exist_ok=True)
            for stem, _, png in content.plots + ([("hessian", "", content.hessian[2])]
                                                 if content.hessian and content.hessian[2] else []):
                (folder / f"{stem}.png").write_bytes(png)
            path.write_text(_markdown(content, folder.name), encoding="utf-8")
    except OSError as err:
        raise ScalecalcError(f"cannot write {out}: {err.strerror}") from None
    return path


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ScalecalcError(NEED_MPL) from None


def _collect(spec_path: str, overrides: dict[str, Any] | None, calculus: str, verify: bool, draws: int,
             batch: int, output_std: float, hessian: tuple[int, int] | None = None) -> _Content:
    from scalecalc.corrections import correct
    from scalecalc.graph import build
    from scalecalc.heatmap import section as _hessian_section
    from scalecalc.init import SCHEMES
    from scalecalc.propagate import propagate
    from scalecalc.spec import load

    spec = load(spec_path)
    net = build(spec, overrides)
    analysis = propagate(net, calculus)
    fixed = correct(net, output_std, calculus)
    schemes = [("as written", analysis)] + [(s, propagate(build(spec, overrides, init_scheme=s), calculus))
                                            for s in SCHEMES]
    s = analysis.summary
    approx = sum(not r.exact for r in analysis.nodes)
    spread = s.gamma_spread
    verdict = "–" if spread is None else ("preconditioned" if abs(float(spread) - 1) < 0.02 else "not preconditioned")
    summary = [("network", net.name), ("calculus", calculus),
               ("verdict", f"{verdict} (γ spread {fmt(spread)}, γ min {fmt(s.gamma_min)}, max {fmt(s.gamma_max)})"),
               ("output std √E[y²]", f"{fmt(math.sqrt(float(s.output_m2)))} at {net.output} "
                                     f"(target for emit: {output_std:g})"),
               ("nodes", f"{len(analysis.nodes)}, of which {approx} use approximate rules"),
               ("γ_bias spread", fmt(s.gamma_bias_spread))]
    corrections = [(c.kind, c.node, fmt(c.value), c.formula, c.reason) for c in fixed.corrections
                   if c.kind != "warning"]
    warnings = [(c.node, c.op, f"×{fmt(c.ratio)}", c.reason) for c in s.varsigma_changes]
    warnings += [(c.node, "warning", fmt(c.value), c.reason) for c in fixed.corrections if c.kind == "warning"]
    plots = [("moments", "Forward E[x²] and backward E[Δx²] second moments along depth", _plot_moments(analysis)),
             ("gamma", "γ per weighted layer under each init scheme", _plot_gamma(schemes)),
             ("varsigma", "ς along depth; red marks where it changes", _plot_varsigma(analysis))]
    notes = []
    if verify:
        result = _verify(spec, net, analysis, draws, batch)
        verdict = "PASS" if result.passed else "FAIL at " + ", ".join(sorted({c.node for c in result.failures}))
        notes.append(f"verify ({result.draws} draws × batch {result.batch} on {result.device}, spec as written): "
                     f"{verdict}")
        plots.append(("verify", "Predicted vs measured (spec as written; error bars ±2 se)", _plot_verify(result)))
    layers = [((r.name, r.op, r.shape, fmt(r.forward_m2), fmt(r.backward_m2), fmt(r.varsigma), fmt(r.gamma),
                fmt(r.gamma_bias), "; ".join(r.notes)), r.exact) for r in analysis.nodes]
    text = Path(spec_path).read_text(encoding="utf-8")
    return _Content(f"Design review: {net.name}", summary, corrections, warnings, plots, layers, text, notes,
                    _hessian_section(spec, net, calculus, *hessian) if hessian else None)


def _verify(spec: Any, net: Any, analysis: Analysis, draws: int, batch: int) -> Any:
    from scalecalc.codegen import emit_torch
    from scalecalc.verify import verify

    return verify(net, analysis, emit_torch(spec, net, digest="0"), draws=draws, batch=batch)


# ---- plots -----------------------------------------------------------------------------------------------


def _figure(height: float = 4.8) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _prefix(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _ticks(names: Sequence[str]) -> tuple[list[int], list[str], list[int]]:
    """Tick positions and labels (every node, or the first node of each block prefix, block prefixes
    before lone nodes, at least a fixed gap apart) and the positions where a block starts."""
    if len(names) <= MAX_LABELS:
        return list(range(len(names))), list(names), []
    starts = [i for i, n in enumerate(names) if i == 0 or _prefix(n) != _prefix(names[i - 1])]
    gap = max(1.5, len(names) / 50)  # about 15 px between rotated labels on a 900 px axis
    ends = (0, len(names) - 1)
    shown: list[int] = []
    for i in sorted(starts, key=lambda i: ("." not in names[i], i not in ends, i)):
        if all(abs(i - j) >= gap for j in shown):
            shown.append(i)
    shown.sort()
    return shown, [_prefix(names[i]) for i in shown], starts


def _depth_axis(ax: Any, names: Sequence[str], xlabel: str) -> None:
    pos, labels, starts = _ticks(names)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8 if len(labels) > 20 else 9)
    for i in starts:
        ax.axvline(i - 0.5, color="#ddd", lw=0.6, zorder=0)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel(xlabel)


def _scale(ax: Any, values: Sequence[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and min(positive) > 0 and max(positive) / min(positive) > 30:
        ax.set_yscale("log")


def _legend(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, borderaxespad=0)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _plot_moments(a: Analysis) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    names = [r.name for r in a.nodes]
    fwd, bwd = [_num(r.forward_m2) for r in a.nodes], [_num(r.backward_m2) for r in a.nodes]
    ax.plot(fwd, "o-", ms=3, label="forward E[x²] (node output)")
    ax.plot(bwd, "s-", ms=3, label="backward E[Δx²] (gradient at node output)")
    _scale(ax, fwd + bwd)
    ax.set_ylabel("second moment per element")
    ax.set_title(f"{a.network.name}: second moments along depth")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    _legend(ax)
    _depth_axis(ax, names, "node (depth order; labels mark the first node of each block)" if len(names) > MAX_LABELS
                else "node (depth order)")
    return _png(fig)


def _plot_gamma(schemes: Sequence[tuple[str, Analysis]]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    names = [r.name for r in schemes[0][1].nodes if r.gamma is not None]
    values: list[float] = []
    for i, (scheme, a) in enumerate(schemes):
        g = [_num(r.gamma) for r in a.nodes if r.gamma is not None]
        values += g
        style = {"color": "black", "lw": 2, "zorder": 5} if i == 0 else {"lw": 1.2}
        ax.plot(g, "o-" if i == 0 else ".-", ms=4, label=f"{scheme} (spread {fmt(a.summary.gamma_spread)})", **style)
    _scale(ax, values)
    ax.set_ylabel("γ = E[ΔW²]/E[W²]")
    ax.set_title("γ per weighted layer under each init scheme (equal γ = preconditioned)")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    _legend(ax)
    _depth_axis(ax, names, "weighted layer (depth order)")
    return _png(fig)


def _plot_varsigma(a: Analysis) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    names = [r.name for r in a.nodes]
    vs = [_num(r.varsigma) for r in a.nodes]
    ax.plot(vs, "-", color="tab:blue", lw=1.2, label="ς = n·ρ²·E[Δx²]·E[x²]")
    index = {n: i for i, n in enumerate(names)}
    changes = [(index[c.node], _num(c.ratio), c.op) for c in a.summary.varsigma_changes if c.node in index]
    if changes:
        ax.plot([i for i, _, _ in changes], [vs[i] for i, _, _ in changes], "o", color="tab:red", ms=5,
                label=f"ς changes ({len(changes)} nodes)")
        shown: list[int] = []  # label the large changes (over 10%), well apart
        for i, ratio, op in sorted(changes, key=lambda c: -abs(math.log(abs(c[1]) or 1))):
            if abs(math.log(abs(ratio) or 1)) > math.log(1.1) and all(abs(i - j) > len(vs) / 15 for j in shown):
                shown.append(i)
                dx = -100 if i > 0.85 * len(vs) else -30
                ax.annotate(f"{op} ×{ratio:.3g}", (i, vs[i]), textcoords="offset points", xytext=(dx, 14),
                            fontsize=8, color="tab:red", arrowprops={"arrowstyle": "-", "color": "tab:red", "lw": 0.5})
    _scale(ax, vs)
    ax.margins(y=0.2)
    ax.set_ylabel("ς (scaling invariant)")
    ax.set_title("ς along depth: constant where every op keeps scaling")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax)
    _depth_axis(ax, names, "node (depth order)")
    return _png(fig)


def _plot_verify(result: Any) -> bytes:
    fig = _figure(6.5)
    ax = fig.add_subplot()
    low, high = math.inf, 0.0
    for q, marker in (("forward_m2", "o"), ("backward_m2", "s"), ("weight_m2", "^"), ("gamma", "D")):
        for trusted in (True, False):
            cs = [c for c in result.checks if c.quantity == q and c.trusted == trusted and c.predicted > 0
                  and c.measured > 0]
            if not cs:
                continue
            x, y = [c.predicted for c in cs], [c.measured for c in cs]
            low, high = min(low, *x, *y), max(high, *x, *y)
            ax.errorbar(x, y, yerr=[min(2 * c.se, 0.999 * c.measured) for c in cs], fmt=marker, ms=5, capsize=2,
                        mfc=None if trusted else "none", alpha=0.85,
                        label=f"{q}" + ("" if trusted else " (approximate rule)"))
    if high > 0:
        ax.plot([low / 2, high * 2], [low / 2, high * 2], "k--", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted (calculus)")
    ax.set_ylabel("measured (mean over weight draws)")
    ax.set_title(f"{result.name}: predicted vs measured per node ({result.draws} draws × batch {result.batch})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return _png(fig)


# ---- rendering -------------------------------------------------------------------------------------------

SECTIONS = ("Summary", "Warnings", "Plots", "Corrections", "Per-layer table", "Spec")
FOLD = 25  # rows
HESSIAN = "Hessian blocks"
HESSIAN_COLUMNS = ("layer", "measured diagonal ± se", "Theorem 2", "predicted / measured")


def _esc(text: str) -> str:
    return html.escape(str(text))


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Callable[[int], bool],
                classes: Sequence[str] = ()) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        cls = f' class="{classes[k]}"' if k < len(classes) and classes[k] else ""
        cells = "".join(f'<td class="n">{_esc(c)}</td>' if numeric(j) else f"<td>{_esc(c)}</td>"
                        for j, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _fold(table: str, rows: int, what: str) -> str:
    """Long tables start folded so the plots stay near the top."""
    return f"<details><summary>show all {rows} {what}</summary>{table}</details>" if rows > FOLD else table


def _html(c: _Content) -> str:
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(c.title)}</title>'
             f"<style>{CSS}</style></head><body><h1>{_esc(c.title)}</h1>", '<h2 id="summary">Summary</h2><ul>']
    for key, val in c.summary:
        cls = ' class="good"' if val.startswith("preconditioned") else ' class="bad"' if "not precond" in val else ""
        parts.append(f"<li><b>{_esc(key)}</b>: <span{cls}>{_esc(val)}</span></li>")
    parts += [f"<li>{_esc(n)}</li>" for n in c.notes]
    parts.append('</ul><h2 id="warnings">Warnings</h2>')
    table = _html_table(("node", "op", "ς ratio / value", "reason"), c.warnings, lambda j: j == 2)
    parts.append(f"<p>{len(c.warnings)} nodes where ς changes (ops that break scaling) or that need attention.</p>"
                 + _fold(table, len(c.warnings), "warnings") if c.warnings else "<p>None: every op keeps ς.</p>")
    parts.append('<h2 id="plots">Plots</h2>')
    for stem, caption, png in c.plots:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure id="plot-{stem}"><img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
                     f"<figcaption>{_esc(caption)}</figcaption></figure>")
    if c.hessian:
        text, rows, image = c.hessian
        parts.append(f'<h2 id="hessian">{HESSIAN}</h2><p>{_esc(text)}</p>')
        if image:
            data = base64.b64encode(image).decode("ascii")
            parts.append(f'<figure id="plot-hessian"><img src="data:image/png;base64,{data}" alt="{HESSIAN}">'
                         "<figcaption>Heat map; right: the diagonal against Theorem 2</figcaption></figure>")
            parts.append(_html_table(HESSIAN_COLUMNS, rows, lambda j: j > 0))
    parts.append('<h2 id="corrections">Corrections</h2>')
    table = _html_table(("kind", "node", "value", "formula", "reason"), c.corrections, lambda j: j == 2)
    parts.append(f"<p>{len(c.corrections)} corrections that <code>scalecalc emit</code> would apply.</p>"
                 + _fold(table, len(c.corrections), "corrections")
                 if c.corrections else "<p>None: emit writes the spec as it stands.</p>")
    parts.append('<h2 id="layers">Per-layer table</h2><p>Rows on yellow rest on approximate rules (see notes).</p>')
    parts.append(_html_table(COLUMNS, [cells for cells, _ in c.layers], lambda j: 3 <= j <= 7,
                             ["" if exact else "approx" for _, exact in c.layers]))
    parts.append(f'<h2 id="spec">Spec</h2><pre>{_esc(c.spec_text)}</pre></body></html>\n')
    return "\n".join(parts)


def _md_cell(text: str) -> str:  # markup characters escaped; quotes need not be in Markdown text
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return [*lines, ""]


def _markdown(c: _Content, folder: str) -> str:
    lines = [f"# {_md_cell(c.title)}", "", "## Summary", ""]
    lines += [f"- **{_md_cell(k)}**: {_md_cell(v)}" for k, v in c.summary] + [f"- {_md_cell(n)}" for n in c.notes]
    lines += ["", "## Warnings", ""]
    lines += (_md_table(("node", "op", "ς ratio / value", "reason"), c.warnings) if c.warnings
              else ["None: every op keeps ς.", ""])
    lines += ["## Plots", ""]
    for stem, caption, _ in c.plots:
        lines += [f"![{stem} plot]({folder}/{stem}.png)", "", f"*{_md_cell(caption)}*", ""]
    if c.hessian:
        text, rows, image = c.hessian
        lines += [f"## {HESSIAN}", "", _md_cell(text), ""]
        if image:
            lines += [f"![hessian plot]({folder}/hessian.png)", "", *_md_table(HESSIAN_COLUMNS, rows)]
    lines += ["## Corrections", ""]
    lines += (_md_table(("kind", "node", "value", "formula", "reason"), c.corrections) if c.corrections
              else ["None: emit writes the spec as it stands.", ""])
    lines += ["## Per-layer table", "", "Rows marked ⚠ rest on approximate rules (see notes).", ""]
    lines += _md_table(COLUMNS, [(cells[0] + ("" if exact else " ⚠"), *cells[1:]) for cells, exact in c.layers])
    fence = "````" if "```" in c.spec_text else "```"
    lines += ["## Spec", "", f"{fence}yaml", c.spec_text.rstrip("\n"), fence, ""]
    return "\n".join(lines)
