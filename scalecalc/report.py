"""Stage 5: analysis results for people (rich tables) and machines (JSON-ready dicts)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from scalecalc import __version__, expr
from scalecalc.propagate import Analysis, NodeResult

if TYPE_CHECKING:
    from scalecalc.corrections import Correction
    from scalecalc.verify import Verification

SCHEMA = 1
NODE_FIELDS = ("forward_m2", "backward_m2", "varsigma", "weight_m2", "gamma", "gamma_bias")


def value(v: Any) -> Any:
    """A JSON value: null, a number, or a formula as text when symbolic."""
    if v is None:
        return None
    if expr.is_symbolic(v):
        return str(v)
    if isinstance(v, bool):
        return v
    number = float(v)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def fmt(v: Any) -> str:
    return "–" if v is None else expr.short(v)


def to_dict(analysis: Analysis) -> dict[str, Any]:
    """The ``--json`` document (schema 1)."""
    net, s = analysis.network, analysis.summary
    return {
        "schema": SCHEMA,
        "scalecalc": __version__,
        "name": net.name,
        "calculus": analysis.calculus,
        "input": {"shape": str(net.input_shape), "second_moment": value(net.input_m2)},
        "output": {"name": net.output, "grad_second_moment": value(net.grad_m2)},
        "params": {k: value(v) for k, v in net.params.items()},
        "symbols": list(net.symbols),
        "nodes": [_node(r) for r in analysis.nodes],
        "summary": {
            "gamma_min": value(s.gamma_min),
            "gamma_max": value(s.gamma_max),
            "gamma_spread": value(s.gamma_spread),
            "gamma_bias_spread": value(s.gamma_bias_spread),
            "output_m2": value(s.output_m2),
            "exact": s.exact,
            "varsigma_changes": [
                {"node": c.node, "op": c.op, "ratio": value(c.ratio), "reason": c.reason}
                for c in s.varsigma_changes
            ],
        },
    }


def _node(r: NodeResult) -> dict[str, Any]:
    out: dict[str, Any] = {"name": r.name, "op": r.op, "inputs": list(r.inputs), "shape": r.shape}
    out.update({f: value(getattr(r, f)) for f in NODE_FIELDS})
    out["exact"] = r.exact
    out["notes"] = list(r.notes)
    return out


def table(analysis: Analysis) -> Table:
    t = Table(title=f"{analysis.network.name} ({analysis.calculus} calculus)", box=box.SIMPLE_HEAD,
              title_justify="left")
    for col in ("node", "op", "shape", "E[x²]", "E[Δx²]", "ς", "γ", "γ_b", "notes"):
        left = col in ("node", "op", "notes", "shape")
        # names stay whole; long formulas (symbolic mode) fold within their column
        t.add_column(Text(col), justify="left" if left else "right", overflow="fold",
                     no_wrap=col in ("node", "op", "shape"))
    for r in analysis.nodes:
        cells = (r.name, r.op, r.shape, fmt(r.forward_m2), fmt(r.backward_m2), fmt(r.varsigma),
                 fmt(r.gamma), fmt(r.gamma_bias), "; ".join(r.notes))
        t.add_row(*map(Text, cells), style=None if r.exact else "yellow")
    return t


def summary(analysis: Analysis) -> Text:
    s = analysis.summary
    lines = Text()
    if s.gamma_spread is None and s.gamma_min is None and any(r.gamma is not None for r in analysis.nodes):
        lines.append("γ: differs between layers (depends on the symbols)\n")
    elif s.gamma_spread is not None:
        verdict = "preconditioned" if _close_to_one(s.gamma_spread) else "not preconditioned"
        lines.append(f"γ: min {fmt(s.gamma_min)}, max {fmt(s.gamma_max)}, spread {fmt(s.gamma_spread)} "
                     f"→ {verdict}\n")
    if s.gamma_bias_spread is not None:
        lines.append(f"γ_bias spread: {fmt(s.gamma_bias_spread)}\n")
    lines.append(f"output E[x²]: {fmt(s.output_m2)}\n")
    if s.varsigma_changes:
        lines.append("ς changes at:\n")
        for c in s.varsigma_changes:
            lines.append(f"  {c.node} ({c.op}) ×{fmt(c.ratio)}: {c.reason}\n")
    else:
        lines.append("ς is kept by every op\n")
    if not s.exact:
        lines.append("some rules are approximate here (yellow rows; see notes)\n", style="yellow")
    return lines


def _close_to_one(v: Any) -> bool:
    return not expr.is_symbolic(v) and abs(float(v) - 1) < 0.02


def correction_dict(c: Correction) -> dict[str, Any]:
    return {"kind": c.kind, "node": c.node, "value": c.value, "formula": c.formula, "reason": c.reason}


def corrections_table(corrections: Sequence[Correction]) -> Table:
    t = Table(title="corrections", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("kind", "node", "value", "reason"):
        t.add_column(Text(col), justify="right" if col == "value" else "left", no_wrap=col != "reason")
    for c in corrections:
        t.add_row(*map(Text, (c.kind, c.node, fmt(c.value), c.reason)),
                  style="yellow" if c.kind == "warning" else None)
    return t


def compare_table(name: str, rows: Sequence[tuple[str, Analysis]]) -> Table:
    t = Table(title=f"{name}: initialization schemes", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("scheme", "γ min", "γ max", "γ spread", "γ_b spread", "output E[x²]"):
        t.add_column(Text(col), justify="left" if col == "scheme" else "right")
    for scheme, a in rows:
        s = a.summary
        t.add_row(scheme, fmt(s.gamma_min), fmt(s.gamma_max), fmt(s.gamma_spread),
                  fmt(s.gamma_bias_spread), fmt(s.output_m2))
    return t


def print_analysis(analysis: Analysis, console: Console) -> None:
    console.print(Group(table(analysis), summary(analysis)))


def render_text(analysis: Analysis, width: int = 160) -> str:
    """The human report as plain text at a fixed width (for files and golden tests)."""
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    print_analysis(analysis, console)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def verification_dict(v: Verification) -> dict[str, Any]:
    z = v.z
    return {
        "schema": SCHEMA, "name": v.name, "passed": v.passed, "device": v.device, "draws": v.draws,
        "batch": v.batch, "seed": v.seed, "tol": v.tol, "z": z, "seconds": v.seconds,
        "conditioning": {k: dict(v) for k, v in v.conditioning.items()},
        "checks": [{"node": c.node, "op": c.op, "quantity": c.quantity, "predicted": c.predicted,
                    "measured": c.measured, "se": c.se, "error": c.error, "trusted": c.trusted,
                    "failed": c.failed(v.tol, z)} for c in v.checks],
    }


def verification_table(v: Verification, show_all: bool = False) -> Group:
    """Predicted vs measured; failing rows in red, approximate ones (not judged) dimmed."""
    z = v.z
    t = Table(title=f"{v.name}: {v.draws} draws × batch {v.batch} on {v.device}", box=box.SIMPLE_HEAD,
              title_justify="left")
    for col in ("node", "quantity", "predicted", "measured", "± se", "ratio", "status"):
        t.add_column(Text(col), justify="left" if col in ("node", "quantity", "status") else "right", no_wrap=True)
    for c in v.checks:
        failed = c.failed(v.tol, z)
        if not (show_all or failed or not c.trusted or c.quantity in ("gamma", "forward_m2", "hessian")):
            continue
        status, style = ("FAIL", "bold red") if failed else ("ok", None) if c.trusted else ("approx", "dim")
        t.add_row(*map(Text, (c.node, c.quantity, fmt(c.predicted), fmt(c.measured), fmt(c.se),
                              f"{c.measured / c.predicted:.3f}", status)), style=style)
    trusted = [c for c in v.checks if c.trusted]
    untrusted = [c for c in v.checks if not c.trusted]
    lines = Text()
    worst = max(trusted, key=lambda c: abs(c.error), default=None)
    if worst is not None:
        lines.append(f"checked {len(trusted)} predictions from exact rules: worst {worst.node} {worst.quantity} "
                     f"{100 * worst.error:+.1f}% (tolerance {100 * v.tol:g}% and {z:.1f} standard errors)\n")
    if untrusted:
        far = max(untrusted, key=lambda c: abs(c.error))
        lines.append(f"{len(untrusted)} predictions rest on approximate rules (not judged): worst {far.node} "
                     f"{far.quantity} ×{far.measured / far.predicted:.3g}\n", style="dim")
    parts: list[Any] = [t]
    if v.conditioning:
        cond = Table(title="layer-wise conditioning (Σx, Σ∇h; κ of the layer's Fisher block ≈ product)",
                     box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("layer", "λmax Σx", "κ Σx", "λmax Σ∇h", "κ Σ∇h", "κ product"):
            cond.add_column(Text(col), justify="left" if col == "layer" else "right", no_wrap=True)
        for name, row in v.conditioning.items():
            cond.add_row(*map(Text, (name, fmt(row.get("x_lmax")), fmt(row.get("x_kappa")), fmt(row.get("grad_lmax")),
                                     fmt(row.get("grad_kappa")), fmt(row.get("kappa")))))
        parts.append(cond)
    if v.passed:
        lines.append("PASS", style="bold green")
    else:
        names = ", ".join(sorted({c.node for c in v.failures}))
        lines.append(f"FAIL at {names}", style="bold red")
    lines.append(f" ({v.seconds:.1f} s)\n")
    return Group(*parts, lines)


def progress(total: int, console: Console) -> Any:
    """A progress bar over weight draws, on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)
