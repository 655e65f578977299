"""Command line: ``scalecalc analyze`` (and the commands built on it)."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scalecalc.errors import ScalecalcError

if TYPE_CHECKING:
    from scalecalc.corrections import Correction

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Static scaling calculus for ReLU-family networks.")

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a parameter: k=v.")]
SymOpt = Annotated[list[str] | None, typer.Option("--symbolic", help="Keep a parameter symbolic.")]
OutStd = Annotated[float, typer.Option("--output-std", help="Target output standard deviation (§7).")]
CalcOpt = Annotated[str, typer.Option(help="exact (tracks means and shared offsets) or paper (as published).")]
DEFAULT_STD = 0.05


@app.callback()
def _root() -> None:
    """Static scaling calculus for ReLU-family networks."""


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from scalecalc import expr

    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ScalecalcError(f"--set {item!r}: expected NAME=VALUE")
        try:
            number = expr.evaluate(text, {})
        except ScalecalcError as err:
            raise ScalecalcError(f"--set {item!r}: value must be a number ({err})") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ScalecalcError(f"--set {item!r}: value must be a number")
        out[key.strip()] = number
    return out


def _console():  # type: ignore[no-untyped-def]
    """A terminal's own width; 160 columns when piped, so tables stay readable in files."""
    from scalecalc.report import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _fail(err: ScalecalcError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.command()
def analyze(
    spec: Annotated[str, typer.Argument(help="The network spec (YAML).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    set_: SetOpt = None,
    symbolic: SymOpt = None,
    init: Annotated[str | None, typer.Option(help="Use this init scheme for every weighted layer.")] = None,
    compare_inits: Annotated[
        bool, typer.Option(help="Compare γ spread and output under each scheme.")] = False,
    correct: Annotated[bool, typer.Option("--correct", help="Analyse the corrected network emit writes.")] = False,
    output_std: OutStd = DEFAULT_STD,
    calculus: CalcOpt = "exact",
) -> None:
    """Forward/backward second moments, ς, γ and γ_bias for every layer of SPEC."""
    from scalecalc.graph import build
    from scalecalc.init import SCHEMES
    from scalecalc.propagate import propagate
    from scalecalc.spec import load

    corrections: tuple[Correction, ...] = ()
    try:
        parsed = load(spec)
        overrides, symbols = _overrides(set_), tuple(symbolic or ())
        if compare_inits:
            rows = [(s, propagate(build(parsed, overrides, symbols, s), calculus)) for s in SCHEMES]
        else:
            net = build(parsed, overrides, symbols, init)
            if correct:
                from scalecalc.corrections import correct as solve

                fixed = solve(net, output_std, calculus)
                net, corrections = fixed.network, fixed.corrections
            analysis = propagate(net, calculus)
    except ScalecalcError as err:
        _fail(err)
    from scalecalc import report

    if compare_inits:
        if as_json:
            typer.echo(json.dumps({"schema": report.SCHEMA, "name": parsed.name, "calculus": calculus, "schemes": {
                s: report.to_dict(a)["summary"] for s, a in rows}}, indent=2))
        else:
            _console().print(report.compare_table(parsed.name, rows))
        return
    if as_json:
        doc = report.to_dict(analysis)
        if correct:
            doc["corrections"] = [report.correction_dict(c) for c in corrections]
        typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        console = _console()
        report.print_analysis(analysis, console)
        if correct:
            console.print(report.corrections_table(corrections))


@app.command()
def emit(
    spec: Annotated[str, typer.Argument(help="The network spec (YAML).")],
    torch_: Annotated[bool, typer.Option("--torch", help="Write a PyTorch module (the only target).")] = False,
    output: Annotated[str | None, typer.Option("-o", "--output", help="File to write (default: stdout).")] = None,
    no_correct: Annotated[bool, typer.Option("--no-correct", help="Emit the spec exactly as written.")] = False,
    set_: SetOpt = None,
    output_std: OutStd = DEFAULT_STD,
    calculus: CalcOpt = "exact",
) -> None:
    """Write a standalone PyTorch module of SPEC, corrected by the calculus unless --no-correct."""
    import hashlib
    from pathlib import Path

    from scalecalc.codegen import emit_torch
    from scalecalc.graph import build
    from scalecalc.spec import load

    try:
        if not torch_:
            raise ScalecalcError("choose a target: --torch")
        parsed = load(spec)
        net = build(parsed, _overrides(set_))
        digest = hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        if no_correct:
            source = emit_torch(parsed, net, digest=digest)
        else:
            from scalecalc.corrections import correct

            fixed = correct(net, output_std, calculus)
            comments = {c.node: c.reason for c in fixed.corrections}
            source = emit_torch(parsed, fixed.network, digest=digest, comments=comments,
                                inserted=fixed.inserted)
        if output:
            Path(output).write_text(source, encoding="utf-8")
        else:
            typer.echo(source, nl=False)
    except ScalecalcError as err:
        _fail(err)
    except OSError as err:
        _fail(ScalecalcError(f"cannot write {output}: {err.strerror}"))


@app.command()
def verify(
    spec: Annotated[str, typer.Argument(help="The network spec (YAML).")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch: Annotated[int, typer.Option(help="Samples per draw.")] = 16,
    draws: Annotated[int, typer.Option(help="Independent weight draws.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    tol: Annotated[float, typer.Option(help="Relative tolerance of a prediction.")] = 0.05,
    no_correct: Annotated[bool, typer.Option("--no-correct", help="Verify the spec as written.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="List every check, not just the main ones.")] = False,
    hessian: Annotated[bool, typer.Option(help="Also measure Hessian blocks E[(G_l r)²] against Thm 2.")] = False,
    conditioning: Annotated[bool, typer.Option(help="Also report layer-wise conditioning (Σx, Σ∇h).")] = False,
    set_: SetOpt = None,
    output_std: OutStd = DEFAULT_STD,
    calculus: CalcOpt = "exact",
) -> None:
    """Measure the emitted model over weight draws; exit 0 if every exact prediction holds, 1 if not."""
    from scalecalc import report
    from scalecalc.codegen import emit_torch
    from scalecalc.graph import build
    from scalecalc.propagate import propagate
    from scalecalc.spec import load
    from scalecalc.verify import verify as run

    try:
        parsed = load(spec)
        net = build(parsed, _overrides(set_))
        if no_correct:
            source = emit_torch(parsed, net, digest="0")
        else:
            from scalecalc.corrections import correct

            fixed = correct(net, output_std, calculus)
            net = fixed.network
            source = emit_torch(parsed, net, digest="0", inserted=fixed.inserted)
        analysis = propagate(net, calculus)
        err_console = report.Console(stderr=True)
        with report.progress(draws, err_console) as bar:
            task = bar.add_task("draws", total=draws)
            result = run(net, analysis, source, draws=draws, batch=batch, seed=seed, tol=tol, device=device,
                         hessian=hessian, conditioning=conditioning,
                         on_draw=lambda done: bar.update(task, completed=done))
    except ScalecalcError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(report.verification_dict(result), indent=2, ensure_ascii=False))
    else:
        _console().print(report.verification_table(result, show_all))
    raise typer.Exit(0 if result.passed else 1)


@app.command("report")
def review(
    spec: Annotated[str, typer.Argument(help="The network spec (YAML).")],
    output: Annotated[str, typer.Option("-o", "--output", help="review.html (one file) or review.md (+ PNGs).")]
    = "review.html",
    with_verify: Annotated[bool, typer.Option("--verify", help="Include a sampled measurement.")] = False,
    draws: Annotated[int, typer.Option(help="Weight draws for --verify.")] = 8,
    batch: Annotated[int, typer.Option(help="Samples per draw for --verify.")] = 8,
    hessian: Annotated[bool, typer.Option("--hessian", help="Add the Hessian block heat map (Fig. 2).")] = False,
    hessian_draws: Annotated[int, typer.Option(help="Weight draws for --hessian.")] = 50,
    hessian_batch: Annotated[int, typer.Option(help="Samples per draw for --hessian.")] = 16,
    set_: SetOpt = None,
    output_std: OutStd = DEFAULT_STD,
    calculus: CalcOpt = "exact",
) -> None:
    """A design review of SPEC: summary, corrections, warnings, plots and the per-layer table."""
    from scalecalc.review import write_report

    try:
        path = write_report(spec, output, overrides=_overrides(set_), calculus=calculus, verify=with_verify,
                            draws=draws, batch=batch, output_std=output_std, hessian=hessian,
                            hessian_draws=hessian_draws, hessian_batch=hessian_batch)
    except ScalecalcError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


paper_app = typer.Typer(no_args_is_help=True, help="Reproduce the paper's figures.")
app.add_typer(paper_app, name="paper")


@paper_app.command("fig1")
def paper_fig1(
    output: Annotated[str, typer.Option("-o", "--output", help="PNG file to write.")] = "fig1.png",
    setups: Annotated[int, typer.Option(help="Sampled setups (weights, loss, init scheme).")] = 100,
    batch: Annotated[int, typer.Option(help="Samples per setup.")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Figure 1: γ / E[(G_l r)²] for sampled strided-LeNet setups, as a histogram and a summary."""
    from scalecalc.paper import fig1
    from scalecalc.verify import resolve_device

    try:
        summary = fig1(output, setups=setups, batch=batch, seed=seed, device=resolve_device(device))
    except ScalecalcError as err:
        _fail(err)
    brief = {k: v for k, v in summary.items() if k not in ("ratios", "schemes")}
    if as_json:
        typer.echo(json.dumps(brief, indent=2, ensure_ascii=False, default=str))
    else:
        _console().print(brief)
        typer.echo(f"wrote {output}")


@paper_app.command("fig2")
def paper_fig2(
    output: Annotated[str, typer.Option("-o", "--output", help="PNG file to write.")] = "fig2.png",
    draws: Annotated[int, typer.Option(help="Independent draws (weights, inputs, R, directions) per scheme.")] = 400,
    batch: Annotated[int, typer.Option(help="Samples per draw.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed (the same for every scheme).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Figure 2: heat maps of the strided LeNet's per-sample Hessian blocks under each init scheme."""
    import statistics

    from scalecalc.paper import fig2
    from scalecalc.verify import resolve_device

    try:
        summary = fig2(output, draws=draws, batch=batch, seed=seed, device=resolve_device(device))
    except ScalecalcError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
        return
    typer.echo(f"{summary['quantity']}; {draws} draws × batch {batch} per scheme, {summary['seconds']:.0f} s")
    for scheme, res in summary["schemes"].items():
        diagonal = ", ".join(f"{n} {v:.3g}" for n, v in zip(res["layers"], res["diagonal"]))
        typer.echo(f"{scheme:>10}: diagonal spread {res['spread']:.3g} (Theorem 2: {res['predicted_spread']:.3g}), "
                   f"predicted/measured median {statistics.median(res['ratio']):.3g}; diagonal {diagonal}")
    typer.echo(f"wrote {output}")


def main() -> None:
    try:
        app()
    except ScalecalcError as err:  # raised outside a command's own handler
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
