"""The spec expression language: arithmetic of known parameters, and nothing else.

Expressions are parsed with :mod:`ast` and interpreted from a whitelist; these tests pin
the good paths (numbers and sympy symbols) and that everything else — calls of anything
but the known functions, attributes, lambdas, comprehensions, strings, huge powers — is
refused with an :class:`ExprError` that names the expression, without running any of it.
"""

from __future__ import annotations

import builtins
import time
from typing import Any

import pytest
import sympy as sp

from scalecalc import expr
from scalecalc.errors import ScalecalcError
from scalecalc.expr import ExprError, evaluate

W = {"w": 4}
SYM_W = sp.Symbol("w", positive=True, integer=True)


# -- good paths -------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("2*w", 8),
    ("w//2", 2),
    ("(w+1)**2", 25),
    ("sqrt(w)", 2),
    ("w/2", 2),  # exact integer quotient stays an int
    ("w/8", 0.5),
    ("-w + 1", -3),
    ("w % 3", 1),
    ("floor(w/3)", 1),
    ("ceil(w/3)", 2),
    ("min(w, 3, 7)", 3),
    ("max(w, 3)", 4),
    ("abs(1 - w)", 3),
    ("1 < w <= 4", True),
    ("w > 2 and w < 3", False),
    ("not w == 4 or w", True),
    ("2.5e-3 * w", 0.01),
    ("  w  ", 4),
])
def test_numeric_values(text: str, value: object) -> None:
    got = evaluate(text, W)
    assert got == pytest.approx(value) and type(got) is type(value)


def test_sqrt_is_exact_for_squares_and_float_otherwise() -> None:
    assert evaluate("sqrt(16)", {}) == 4 and isinstance(evaluate("sqrt(16)", {}), int)
    assert evaluate("sqrt(2)", {}) == pytest.approx(2**0.5)


@pytest.mark.parametrize(("text", "expected"), [
    ("2*w", 2 * SYM_W),
    ("w//2", sp.floor(SYM_W / 2)),
    ("(w+1)**2", (SYM_W + 1) ** 2),
    ("sqrt(w)", sp.sqrt(SYM_W)),
    ("w/3", SYM_W / 3),
    ("max(w, 2)", sp.Max(SYM_W, 2)),
    ("ceil(w/2)", sp.ceiling(SYM_W / 2)),
    ("2**w", 2**SYM_W),  # a symbolic exponent is not a size guard's business
])
def test_symbolic_values(text: str, expected: sp.Expr) -> None:
    got = evaluate(text, {"w": SYM_W})
    assert expr.is_symbolic(got)
    assert sp.simplify(got - expected) == 0


def test_exact_mode_keeps_literals_exact() -> None:
    assert evaluate("sqrt(1/2)", {"__exact__": True}) == sp.sqrt(2) / 2
    assert evaluate("0.1 * w", {"__exact__": True, "w": SYM_W}) == SYM_W / 10


def test_parse_is_cached_and_returns_an_expression_tree() -> None:
    assert expr.parse("2*w") is expr.parse("2*w")
    assert type(expr.parse("2*w")).__name__ == "Expression"


# -- refused expressions ----------------------------------------------------------------

def _refused(text: str, env: dict[str, object] | None = None) -> str:
    with pytest.raises(ExprError) as info:
        evaluate(text, W if env is None else env)
    message = str(info.value)
    assert isinstance(info.value, ScalecalcError)
    assert "\n" not in message and len(message) < 400, message
    return message


CALLS = "known: sqrt, floor, ceil, min, max, abs"
NOT_ARITHMETIC = "which is not arithmetic; allowed: numbers, parameter names"


@pytest.mark.parametrize(("text", "fragments"), [
    ('__import__("os").system("true")', ["calls something other than a known function", CALLS]),
    ("open('x')", ["calls something other than a known function"]),
    ("eval('1')", ["calls something other than a known function"]),
    ("(lambda: 3)()", ["calls something other than a known function"]),
    ("w(3)", ["calls something other than a known function"]),
    ("sqrt(x=4)", ["calls something other than a known function"]),
    ("max(*w)", ["uses starred", NOT_ARITHMETIC]),
    ("lambda: 3", ["uses lambda", NOT_ARITHMETIC]),
    ("w.real", ["'w.real' uses attribute", NOT_ARITHMETIC]),
    ("().__class__.__bases__", ["uses attribute"]),
    ("[x for x in (1, 2)]", ["uses listcomp"]),
    ("{x for x in (1, 2)}", ["uses setcomp"]),
    ("{x: 1 for x in (1, 2)}", ["uses dictcomp"]),
    ("sum(x for x in (1, 2))", ["calls something other than a known function"]),
    ("(x for x in (1, 2))", ["uses generatorexp"]),
    ("[1, 2]", ["uses list"]),
    ("(1, 2)", ["uses tuple"]),
    ("w[0]", ["uses subscript"]),
    ("1 if w else 2", ["uses ifexp"]),
    ("(w := 3)", ["uses namedexpr"]),
    ("w << 2", ["uses lshift"]),
    ("w & 1", ["uses bitand"]),
    ("~w", ["uses invert"]),
    ("w @ w", ["uses matmult"]),
    ('"abc"', ["""'"abc"' contains 'abc'; only numbers are allowed"""]),
    ("b'abc'", ["contains b'abc'"]),
    ("f'{w}'", ["uses joinedstr"]),
    ("True", ["contains True"]),
    ("None", ["contains None"]),
    ("...", ["contains Ellipsis"]),
    ("1j", ["contains 1j"]),
    ("2*", ["'2*' is not an arithmetic expression"]),
    ("", ["'' is not an arithmetic expression"]),
    ("w; import os", ["is not an arithmetic expression"]),
    ("import os", ["is not an arithmetic expression"]),
    ("sqrt(4, 2)", ["sqrt() in 'sqrt(4, 2)' takes one argument, got 2"]),
    ("floor()", ["floor() in 'floor()' takes one argument, got 0"]),
    ("min()", ["min() in 'min()' takes one or more arguments, got 0"]),
])
def test_not_arithmetic(text: str, fragments: list[str]) -> None:
    message = _refused(text)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(("text", "fragment"), [
    ("2*q", "unknown parameter 'q' in '2*q'; known: w"),
    ("__builtins__", "unknown parameter '__builtins__'"),
    ("__exact__", "unknown parameter '__exact__'"),  # graph's internal env marker stays hidden
])
def test_unknown_names(text: str, fragment: str) -> None:
    assert fragment in _refused(text, {"w": 4, "__exact__": True})


def test_known_list_hides_dunder_entries_and_says_none_when_empty() -> None:
    assert _refused("x", {"__exact__": True}).endswith("known: none")


@pytest.mark.parametrize(("text", "fragment"), [
    ("10**10**10", "exponent 10000000000 in 10**10000000000 is too large (limit 64)"),
    ("10**16", "10**16 is too large (limit 1e+15)"),
    ("2**-100", "exponent -100"),
    ("(-8)**(1/3)", "(-8)**(0.3333333333333333) is not a real number"),
    ("w/0", "division by zero in 'w/0'"),
    ("w//0", "division by zero"),
    ("w%0", "division by zero"),
    ("0**-1", "division by zero"),
    ("sqrt(-w)", "sqrt of a negative number (-4)"),
    ("1e400", "'1e400' contains inf, not a finite number"),
    ("1e300*1e300 - 1e300*1e300", "not a finite real number (got nan)"),
    ("floor(1e300*1e300)", "'floor(1e300*1e300)' is too large to compute"),
    ("9" * 20, "is too large (limit 1e+15)"),
    ("1e300*1e300", "not a finite real number (got inf)"),
    ("1" + "+1" * 100, "longer than 200 characters"),
])
def test_numbers_out_of_range(text: str, fragment: str) -> None:
    assert fragment in _refused(text)


@pytest.mark.parametrize(("text", "fragment"), [
    ("1e400", "'1e400' contains inf, not a finite number"),
    ("1e300*1e300", "'1e300*1e300' is too large (limit 1e+15)"),  # exact: no inf, no 600-digit message
    ("(-8)**(1/3)", "(-8)**(1/3) is not a real number"),
    ("sqrt(0 - d)", "'sqrt(0 - d)' is not a finite real number (got 2*I)"),
    ("1/0", "'1/0' is not a finite real number (got zoo)"),
])
def test_exact_mode_out_of_range(text: str, fragment: str) -> None:
    # with some parameter symbolic, graph asks for exact arithmetic and literals become sympy numbers
    assert fragment in _refused(text, {"__exact__": True, "d": sp.Integer(4)})


def test_huge_power_of_exact_sympy_numbers_is_refused_before_computing() -> None:
    # symbolic mode turns numeric parameters into sympy Integers; d**d**d must not be computed
    start = time.perf_counter()
    message = _refused("d**d**d", {"d": sp.Integer(10)})
    assert "is too large" in message
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize(("text", "fragment"), [
    ("w > 2", "comparison in 'w > 2' needs numbers, but w is symbolic"),
    ("not w", "'not w' must be a number to decide a condition, not w"),
    ("w/0", "'w/0' is not a finite real number (got zoo)"),
    ("sqrt(0 - d)", "not a finite real number (got 2*I)"),
])
def test_symbolic_misuse(text: str, fragment: str) -> None:
    assert fragment in _refused(text, {"w": SYM_W, "d": sp.Integer(4)})


def test_hostile_expressions_never_reach_eval_or_exec(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    marker = tmp_path / "PWNED"
    called: list[str] = []

    def watch(name: str) -> Any:
        real = getattr(builtins, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            called.append(name)
            return real(*args, **kwargs)

        return spy

    for name in ("eval", "exec"):  # (ast.parse itself compiles, so compile() is not watched)
        monkeypatch.setattr(builtins, name, watch(name))
    hostile = [
        f'__import__("os").system("touch {marker}")',
        f'eval(\'__import__("os").system("touch {marker}")\')',
        "().__class__.__base__.__subclasses__()",
        f"[__import__('os').system('touch {marker}') for _ in (1,)]",
        f"(lambda: __import__('os').system('touch {marker}'))()",
    ]
    for text in hostile:
        with pytest.raises(ExprError):
            evaluate(text, W)
    monkeypatch.undo()
    assert called == []
    assert not marker.exists()
