"""Initialization schemes for weighted layers, each with E[W²] in closed form.

For a layer with fan-in n_in, fan-out n_out and a k×k kernel (k = 1 for linear):

- ``geometric``:  E[W²] = c / (k·√(n_in·n_out))          (Eq. 3; c = 2/k_typical by default, §6.2)
- ``fan_in``:     E[W²] = gain / (n_in·k²)                 (Eq. 4, Kaiming fan-in)
- ``fan_out``:    E[W²] = gain / (n_out·k²)                (Eq. 4, Kaiming fan-out)
- ``arithmetic``: E[W²] = 2·gain / ((n_in + n_out)·k²)     (Eq. 5)

gain defaults to 2 (ReLU). Weights are drawn zero-mean, normal or uniform with that E[W²].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scalecalc import expr
from scalecalc.errors import ScalecalcError

SCHEMES = ("geometric", "fan_in", "fan_out", "arithmetic")
ALIASES: Mapping[str, tuple[str, Any]] = {
    "kaiming_in": ("fan_in", None),
    "kaiming_out": ("fan_out", None),
    "xavier": ("arithmetic", 1),
    "lecun": ("fan_in", 1),
}
DISTRIBUTIONS = ("normal", "uniform")


@dataclass(frozen=True)
class Init:
    scheme: str
    constant: Any  # c for geometric, gain otherwise
    distribution: str
    m2: Any  # E[W²]

    def __str__(self) -> str:
        name = "c" if self.scheme == "geometric" else "gain"
        value = self.constant if expr.is_symbolic(self.constant) else f"{float(self.constant):.4g}"
        return f"{self.scheme}({name}={value})"


def weight_m2(scheme: str, constant: Any, n_in: Any, n_out: Any, k: Any) -> Any:
    """E[W²] of ``scheme`` for a layer with the given fans and kernel side ``k``."""
    if scheme == "geometric":
        return constant / (k * expr.sqrt(n_in * n_out))
    fan = {"fan_in": n_in, "fan_out": n_out, "arithmetic": (n_in + n_out) / 2}[scheme]
    return constant / (fan * k * k)


def resolve_init(raw: Mapping[str, Any], env: Mapping[str, Any], node: Any, k_typical: Any) -> Init:
    """The init of weighted ``node`` from its merged ``init:`` mapping."""
    name = raw.get("scheme", "geometric")
    if name not in SCHEMES and name not in ALIASES:
        raise ScalecalcError(f"unknown init scheme {name!r}; known: " + ", ".join((*SCHEMES, *ALIASES)))
    scheme, gain = ALIASES.get(name, (name, None))
    distribution = raw.get("distribution", "normal")
    if distribution not in DISTRIBUTIONS:
        raise ScalecalcError(f"unknown distribution {distribution!r}; known: normal, uniform")
    if scheme == "geometric":
        if "gain" in raw:
            raise ScalecalcError("geometric init takes 'c', not 'gain'")
        constant = _number(raw["c"], env) if "c" in raw else expr.truediv(2, k_typical)
    else:
        if "c" in raw:
            raise ScalecalcError(f"{name} init takes 'gain', not 'c'")
        if "gain" in raw and gain is not None:
            raise ScalecalcError(f"{name} fixes gain={gain}; use {scheme} to set another gain")
        constant = _number(raw["gain"], env) if "gain" in raw else (gain if gain is not None else 2)
    m2 = weight_m2(scheme, constant, node.attrs["n_in"], node.attrs["n_out"], node.attrs["k"])
    return Init(scheme, constant, distribution, m2)


def _number(raw: Any, env: Mapping[str, Any]) -> Any:
    value = expr.evaluate(raw, env) if isinstance(raw, str) else raw
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "is_number")):
        raise ScalecalcError(f"init constant must be a number, got {raw!r}")
    if not expr.is_symbolic(value) and value <= 0:
        raise ScalecalcError(f"init constant must be positive, got {value}")
    return value
