"""Arithmetic expressions in spec fields (``2*w``, ``w//2``, ``sqrt(w)``), parsed safely.

The text is parsed by :func:`ast.parse` into a syntax tree and only a whitelist of node
types is interpreted here; nothing is ever handed to ``eval`` or ``sympify``. Values are
plain Python numbers, or sympy expressions where a parameter is kept symbolic.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from scalecalc.errors import ScalecalcError

MAX_LENGTH = 200
MAX_MAGNITUDE = 1e15  # guards `10**10**10`-style expressions before they are computed
FUNCTIONS = ("sqrt", "floor", "ceil", "min", "max", "abs")
_VARIADIC = ("min", "max")  # the others take exactly one argument

Value = Any  # int | float | sympy.Expr


class ExprError(ScalecalcError):
    """An expression that is not arithmetic of known parameters."""


def is_symbolic(value: Value) -> bool:
    return hasattr(value, "free_symbols") and bool(value.free_symbols)


def short(value: Value) -> str:
    """A moment for people: 4 significant digits, also for the numeric coefficients of a formula."""
    if not is_symbolic(value):
        return f"{float(value):.4g}"
    import sympy

    return str(value.xreplace({f: sympy.Float(f"{float(f):.4g}") for f in value.atoms(sympy.Float)}))


def _sympy(value: Value) -> bool:
    return type(value).__module__.startswith("sympy")


def sqrt(x: Value) -> Value:
    if _sympy(x):
        import sympy

        return sympy.sqrt(x)
    if x < 0:
        raise ExprError(f"sqrt of a negative number ({x})")
    root = math.isqrt(x) if isinstance(x, int) else None
    return root if root is not None and root * root == x else math.sqrt(x)


def _floor(x: Value) -> Value:
    if _sympy(x):
        import sympy

        return sympy.floor(x)
    return math.floor(x)


def _ceil(x: Value) -> Value:
    if _sympy(x):
        import sympy

        return sympy.ceiling(x)
    return math.ceil(x)


def _minmax(pick: Callable[..., Value], name: str) -> Callable[..., Value]:
    def fn(*args: Value) -> Value:
        if not args:
            raise ExprError(f"{name}() needs at least one argument")
        if any(_sympy(a) for a in args):
            import sympy

            return getattr(sympy, name.capitalize())(*args)
        return pick(args)

    return fn


def _floordiv(a: Value, b: Value) -> Value:
    if _sympy(a) or _sympy(b):
        import sympy

        return sympy.floor(a / b)
    return a // b


def truediv(a: Value, b: Value) -> Value:
    if _sympy(a) or _sympy(b):
        return a / b
    quotient = a / b
    return int(quotient) if isinstance(a, int) and isinstance(b, int) and a % b == 0 else quotient


def _pow(a: Value, b: Value) -> Value:
    # |a**b| = 10**(b·log10|a|): decide before computing (sympy numbers included)
    if not is_symbolic(b) and abs(b) > 64:
        raise ExprError(f"exponent {b} in {a}**{b} is too large (limit 64)")
    if not (is_symbolic(a) or is_symbolic(b)):
        if abs(a) > 1 and b * math.log10(abs(a)) > math.log10(MAX_MAGNITUDE):
            raise ExprError(f"{a}**{b} is too large (limit {MAX_MAGNITUDE:g})")
        if a < 0 and b != int(b):
            raise ExprError(f"({a})**({b}) is not a real number")
    return a**b


def check(value: Value, text: str) -> Value:
    """``value`` if it is a real, finite number of sane size (or a symbolic expression)."""
    if _sympy(value):
        import sympy

        if value.has(sympy.zoo, sympy.nan, sympy.oo) or value.is_extended_real is False:
            raise ExprError(f"{text!r} is not a finite real number (got {value})")
        if is_symbolic(value):
            return value
    elif isinstance(value, complex) or not math.isfinite(value):
        raise ExprError(f"{text!r} is not a finite real number (got {value})")
    if abs(value) > MAX_MAGNITUDE:  # exact for sympy numbers too
        raise ExprError(f"{text!r} is too large (limit {MAX_MAGNITUDE:g})")
    return value


_FUNCS: dict[str, Callable[..., Value]] = {
    "sqrt": sqrt,
    "floor": _floor,
    "ceil": _ceil,
    "min": _minmax(min, "min"),
    "max": _minmax(max, "max"),
    "abs": abs,
}
_BINOPS: dict[type, Callable[[Value, Value], Value]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: truediv,
    ast.FloorDiv: _floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _pow,
}
_CMPOPS: dict[type, Callable[[Value, Value], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


@lru_cache(maxsize=4096)
def parse(text: str) -> ast.Expression:
    """Parse ``text`` and check that it uses only arithmetic, names and known functions."""
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        raise ExprError(f"{text!r} is not an arithmetic expression") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS) or node.keywords:
                raise ExprError(f"{text!r} calls something other than a known function; "
                                f"known: {', '.join(FUNCTIONS)}")
            name = node.func.id
            if (len(node.args) != 1 and name not in _VARIADIC) or not node.args:
                wanted = "one or more arguments" if name in _VARIADIC else "one argument"
                raise ExprError(f"{name}() in {text!r} takes {wanted}, got {len(node.args)}")
        elif isinstance(node, ast.Constant):
            value = node.value
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ExprError(f"{text!r} contains {value!r}; only numbers are allowed")
            if not math.isfinite(value):  # 1e400 reads as inf
                raise ExprError(f"{text!r} contains {value!r}, not a finite number")
        elif not isinstance(
            node,
            (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.Compare,
             ast.BoolOp, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd,
             *_BINOPS, *_CMPOPS),
        ):
            raise ExprError(
                f"{text!r} uses {type(node).__name__.lower()}, which is not arithmetic; "
                f"allowed: numbers, parameter names, + - * / // % **, comparisons, "
                f"{', '.join(FUNCTIONS)}"
            )
    return tree


def evaluate(text: str, env: Mapping[str, Value]) -> Value:
    """Value of the expression ``text`` with parameter values from ``env``."""
    try:
        return check(_eval(parse(text).body, env, text), text)
    except (OverflowError, ValueError):  # e.g. floor(1e400), float(10**400)
        raise ExprError(f"{text!r} is too large to compute") from None


def _eval(node: ast.AST, env: Mapping[str, Value], text: str) -> Value:
    if isinstance(node, ast.Constant):
        if env.get("__exact__"):  # symbolic mode: literals stay exact, so sqrt(1/2) is √2/2
            import sympy

            return sympy.Rational(str(node.value)) if isinstance(node.value, float) else sympy.Integer(node.value)
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env or node.id.startswith("__"):
            known = ", ".join(sorted(k for k in env if not k.startswith("__"))) or "none"
            raise ExprError(f"unknown parameter {node.id!r} in {text!r}; known: {known}")
        return env[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env, text), _eval(node.right, env, text)
        try:
            return _BINOPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ExprError(f"division by zero in {text!r}") from None
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env, text)
        if isinstance(node.op, ast.Not):
            return not _truth(value, text)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        return _FUNCS[node.func.id](*(_eval(a, env, text) for a in node.args))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env, text)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, env, text)
            if is_symbolic(left) or is_symbolic(right):
                names = ", ".join(sorted({str(s) for v in (left, right) if is_symbolic(v)
                                          for s in v.free_symbols}))
                raise ExprError(f"comparison in {text!r} needs numbers, but {names} is symbolic")
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = (_truth(_eval(v, env, text), text) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    raise ExprError(f"cannot evaluate {text!r}")  # unreachable after parse()


def _truth(value: Value, text: str) -> bool:
    if is_symbolic(value):
        raise ExprError(f"{text!r} must be a number to decide a condition, not {value}")
    return bool(value)
