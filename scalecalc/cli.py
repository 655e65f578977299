"""Command line: ``scalecalc analyze`` (and the commands built on it)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from scalecalc.errors import ScalecalcError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Static scaling calculus for ReLU-family networks.")

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a parameter: k=v.")]
SymOpt = Annotated[list[str] | None, typer.Option("--symbolic", help="Keep a parameter symbolic.")]


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
        number = expr.evaluate(text, {})
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ScalecalcError(f"--set {item!r}: value must be a number")
        out[key.strip()] = number
    return out


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
    compare_inits: Annotated[bool, typer.Option(help="Compare γ spread and output under each scheme.")] = False,
) -> None:
    """Forward/backward second moments, ς, γ and γ_bias for every layer of SPEC."""
    from scalecalc.graph import build
    from scalecalc.init import SCHEMES
    from scalecalc.propagate import propagate
    from scalecalc.spec import load

    try:
        parsed = load(spec)
        overrides, symbols = _overrides(set_), tuple(symbolic or ())
        if compare_inits:
            rows = [(s, propagate(build(parsed, overrides, symbols, s))) for s in SCHEMES]
        else:
            analysis = propagate(build(parsed, overrides, symbols, init))
    except ScalecalcError as err:
        _fail(err)
    from scalecalc import report

    if compare_inits:
        if as_json:
            typer.echo(json.dumps({"schema": report.SCHEMA, "name": parsed.name, "schemes": {
                s: report.to_dict(a)["summary"] for s, a in rows}}, indent=2))
        else:
            report.Console().print(report.compare_table(parsed.name, rows))
        return
    if as_json:
        typer.echo(json.dumps(report.to_dict(analysis), indent=2))
    else:
        report.print_analysis(analysis, report.Console())


def main() -> None:
    try:
        app()
    except ScalecalcError as err:  # raised outside a command's own handler
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
