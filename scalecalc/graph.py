"""Stage 2: a :class:`~scalecalc.spec.Spec` → a resolved, shape-checked layer graph.

Blocks are expanded (``stage1.0.conv1``), expressions evaluated against the parameters
(numbers, or sympy symbols for parameters kept symbolic), shapes inferred and checked,
and every weighted layer gets its initialization with E[W²] in closed form.
"""

from __future__ import annotations

import reprlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import networkx as nx

from scalecalc import expr
from scalecalc.errors import ScalecalcError, SpecError, Where
from scalecalc.init import ALIASES, SCHEMES, Init, resolve_init
from scalecalc.spec import MAX_REPEAT, OP_FIELDS, REQUIRED, WEIGHTED_OPS, Layer, Spec

MAX_NODES = 100_000
MAX_DEPTH = 8


@dataclass(frozen=True)
class Shape:
    """Per-sample shape: ``channels`` (features for vectors) and spatial ``h``×``w`` or None."""

    channels: Any
    h: Any = None
    w: Any = None

    @property
    def spatial(self) -> bool:
        return self.h is not None

    @property
    def positions(self) -> Any:
        """ρ², the number of spatial positions (1 for a vector)."""
        return self.h * self.w if self.spatial else 1

    @property
    def size(self) -> Any:
        """n·ρ², the number of elements per sample."""
        return self.channels * self.positions

    def __str__(self) -> str:
        return f"{self.channels}×{self.h}×{self.w}" if self.spatial else f"{self.channels}"


@dataclass(frozen=True)
class Node:
    """A resolved layer: its op, resolved fields, input and output shapes, init."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    shape: Shape
    in_shapes: tuple[Shape, ...]
    where: Where
    init: Init | None = None
    block: str = ""

    @property
    def weighted(self) -> bool:
        return self.op in WEIGHTED_OPS


@dataclass(frozen=True)
class Network:
    name: str
    graph: nx.DiGraph = field(repr=False, compare=False)
    order: tuple[str, ...]
    input_shape: Shape
    input_m2: Any
    grad_m2: Any
    params: Mapping[str, Any]
    symbols: tuple[str, ...]
    k_typical: Any
    file: str = "<spec>"

    def node(self, name: str) -> Node:
        node: Node = self.graph.nodes[name]["node"]
        return node

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self.node(n) for n in self.order)

    @property
    def output(self) -> str:
        return self.order[-1]


def build(spec: Spec, overrides: Mapping[str, Any] | None = None,
          symbolic: Sequence[str] = (), init_scheme: str | None = None) -> Network:
    """Resolve ``spec`` into a :class:`Network`.

    ``overrides`` replaces parameter values (``--set``), ``symbolic`` keeps the named
    parameters as sympy symbols, ``init_scheme`` replaces every weighted layer's scheme.
    """
    if init_scheme is not None and init_scheme not in (*SCHEMES, *ALIASES):
        raise SpecError(Where(spec.file, label="--init"), f"unknown init scheme {init_scheme!r}",
                        "known: " + ", ".join((*SCHEMES, *ALIASES)))
    env = _params(spec, overrides or {}, symbolic)
    b = _Builder(spec, env)
    in_shape, in_m2 = b.input_shape()
    b.shapes["input"] = in_shape
    last = b.expand(spec.layers, env, prefix="", source="input", label="layers", depth=0)
    if last == "input":
        raise SpecError(spec.where.get("layers"), "the network has no layers (all skipped by 'when')")
    grad_m2 = b.number(spec.output.get("grad_second_moment", 1), env,
                       spec.where.get("output.grad_second_moment"), "grad_second_moment", positive=True)
    b.finish_inits(init_scheme)
    graph = nx.DiGraph()
    graph.add_node("input", node=Node("input", "input", (), MappingProxyType({}), in_shape, (),
                                      spec.where.get("input", Where(spec.file))))
    for node in b.nodes:
        graph.add_node(node.name, node=node)
        for src in node.inputs:
            graph.add_edge(src, node.name)
    consumed = {src for node in b.nodes for src in node.inputs}
    for node in b.nodes[:-1]:
        if node.name not in consumed:
            raise SpecError(node.where, f"the output of {node.name!r} is never used",
                            "only the last layer may be left unconsumed")
    return Network(
        name=spec.name, graph=graph, order=("input", *(n.name for n in b.nodes)),
        input_shape=in_shape, input_m2=in_m2, grad_m2=grad_m2,
        params=MappingProxyType({k: v for k, v in env.items() if k != _EXACT}),
        symbols=tuple(symbolic), k_typical=b.k_typical, file=spec.file,
    )


def _params(spec: Spec, overrides: Mapping[str, Any], symbolic: Sequence[str]) -> dict[str, Any]:
    for option, keys in (("--set", overrides), ("--symbolic", symbolic)):
        for key in keys:
            if key not in spec.params:
                raise SpecError(spec.where.get("params", Where(spec.file)).at(option),
                                f"unknown parameter {key!r}", "known: " + (", ".join(spec.params) or "none"))
    env: dict[str, Any] = {_EXACT: True} if symbolic else {}
    for key, raw in spec.params.items():
        where = spec.where.get(f"params.{key}")
        if key in symbolic:
            import sympy

            value = _value(raw, env, where)
            integer = bool(getattr(value, "is_integer", False)) or type(value) is int
            env[key] = sympy.Symbol(key, positive=True, integer=integer)
        elif key in overrides:
            env[key] = overrides[key]
        else:
            env[key] = _value(raw, env, where)
    return env


def _value(raw: Any, env: Mapping[str, Any], where: Where | None) -> Any:
    """Evaluate a field; in symbolic mode (sympy values in ``env``) numbers become exact."""
    if isinstance(raw, bool):
        raw = int(raw)
    if not isinstance(raw, (int, float, str)):
        raise SpecError(where, f"expected a number or an expression, got {reprlib.repr(raw)}")
    try:
        value = expr.evaluate(raw, env) if isinstance(raw, str) else expr.check(raw, str(raw))
    except ScalecalcError as err:
        raise SpecError(where, str(err)) from None
    if isinstance(value, (int, float)) and env.get(_EXACT):
        import sympy

        return sympy.Rational(str(value)) if isinstance(value, float) else sympy.Integer(value)
    return value


_EXACT = "__exact__"  # env marker: keep numbers exact (sympy) because some params are symbols


class _Builder:
    def __init__(self, spec: Spec, env: Mapping[str, Any]) -> None:
        self.spec = spec
        self.nodes: list[Node] = []
        self.shapes: dict[str, Shape] = {}
        self.layer_inits: dict[str, tuple[Mapping[str, Any], Mapping[str, Any], Where]] = {}
        self.k_typical: Any = None
        self._env: Mapping[str, Any] = env
        self.expanded = 0

    def number(self, raw: Any, env: Mapping[str, Any], where: Where | None, what: str,
               integer: bool = False, positive: bool = False, minimum: Any = None) -> Any:
        value = _value(raw, env, where)
        if expr.is_symbolic(value):
            return value
        if integer:
            if float(value) != int(value):
                raise SpecError(where, f"{what} must be a whole number, got {value}")
            value = int(value) if isinstance(value, (int, float)) else value  # sympy stays exact
        if positive and not value > 0:
            raise SpecError(where, f"{what} must be positive, got {value}")
        if minimum is not None and value < minimum:
            raise SpecError(where, f"{what} must be at least {minimum}, got {value}")
        return value

    def input_shape(self) -> tuple[Shape, Any]:
        spec, raw = self.spec, self.spec.input
        where = spec.where.get("input", Where(spec.file)).at("input")
        at = {key: spec.where.get(f"input.{key}", where) for key in raw}
        env = self._env
        allowed = {"channels", "size", "features", "second_moment"}
        for key in raw:
            if key not in allowed:
                raise SpecError(at[key], f"unknown field {key!r}", "allowed: " + ", ".join(sorted(allowed)))
        m2 = self.number(raw.get("second_moment", 1), env, at.get("second_moment"), "second_moment",
                         positive=True)
        if "features" in raw:
            if "channels" in raw or "size" in raw:
                raise SpecError(where, "give either features (vector input) or channels and size")
            return Shape(self.number(raw["features"], env, at["features"], "features", True, True)), m2
        if "channels" not in raw or "size" not in raw:
            raise SpecError(where, "input needs {features: N} or {channels: C, size: S or [H, W]}")
        h, w = self.pair(raw["size"], env, at["size"], "size", positive=True)
        return Shape(self.number(raw["channels"], env, at["channels"], "channels", True, True), h, w), m2

    def pair(self, raw: Any, env: Mapping[str, Any], where: Where | None, what: str,
             positive: bool = False, minimum: Any = None) -> tuple[Any, Any]:
        items = raw if isinstance(raw, list) else [raw, raw]
        if len(items) != 2:
            raise SpecError(where, f"{what} must be a number or a pair [h, w]")
        h, w = (self.number(v, env, where, what, True, positive, minimum) for v in items)
        return h, w

    def expand(self, layers: Sequence[Layer], env: Mapping[str, Any], prefix: str,
               source: str, label: str, depth: int) -> str:
        """Add ``layers`` (a scope) after ``source``; return the scope's output node."""
        self._env = env
        names: dict[str, str] = {"input": source}
        previous = source
        later = {layer.name for layer in layers}
        for layer in layers:
            later.discard(layer.name)
            full = prefix + layer.name
            self.expanded += 1  # skipped layers count too: nested repeats multiply
            if self.expanded > MAX_NODES:
                raise SpecError(_located(layer, full), f"more than {MAX_NODES} layers after expanding "
                                "blocks", "lower the repeat counts of nested blocks")
            inputs = self._sources(layer, full, names, later, previous)
            if layer.when is not None and not self._when(layer, full, env):
                names[layer.name] = inputs[0]  # a skipped layer stands for its input
                previous = inputs[0]
                continue
            if layer.block is not None:
                previous = self._use_block(layer, env, full, inputs[0], depth)
            else:
                self._add(layer, env, full, inputs)
                previous = full
            names[layer.name] = previous
        return previous

    def _when(self, layer: Layer, full: str, env: Mapping[str, Any]) -> bool:
        where = _located(layer, full, "when")
        value = _value(layer.when, env, where)
        if expr.is_symbolic(value):
            names = ", ".join(sorted(map(str, value.free_symbols)))
            raise SpecError(where, f"when: {layer.when!r} depends on symbolic {names}",
                            "a condition needs numbers; give them with --set instead of --symbolic")
        return bool(value)

    def _sources(self, layer: Layer, full: str, names: Mapping[str, str], later: set[str],
                 previous: str) -> tuple[str, ...]:
        if layer.sources is None:
            return (previous,)
        out = []
        for src in layer.sources:
            if src in names:
                out.append(names[src])
            elif src == layer.name or src in later:
                raise SpecError(_located(layer, full, "from"), f"from: {src!r} is not above this layer "
                                "(inputs must come from earlier layers; this would form a cycle)")
            else:
                raise SpecError(_located(layer, full, "from"), f"unknown from: {src!r}",
                                "known here: " + ", ".join(names))
        return tuple(out)

    def _use_block(self, layer: Layer, env: Mapping[str, Any], full: str, source: str,
                   depth: int) -> str:
        block = self.spec.blocks.get(layer.block or "")
        if block is None:
            raise SpecError(_located(layer, full, "block"), f"unknown block {layer.block!r}",
                            "known: " + (", ".join(self.spec.blocks) or "none"))
        if depth >= MAX_DEPTH:
            raise SpecError(_located(layer, full), f"blocks nested deeper than {MAX_DEPTH}",
                            "a block may not use itself, directly or through another block")
        for kind, args in (("with", layer.args), ("first", layer.first)):
            for key in args:
                if key not in block.params:
                    raise SpecError(_located(layer, full, f"{kind}.{key}"),
                                    f"block {block.name!r} has no parameter {key!r}",
                                    "known: " + (", ".join(block.params) or "none"))
        repeat = layer.repeat
        where = _located(layer, full, "repeat")
        count = 1 if repeat is None else self.number(repeat, env, where, "repeat", True, True)
        if expr.is_symbolic(count) or count > MAX_REPEAT:
            raise SpecError(where, f"repeat must be a number from 1 to {MAX_REPEAT}, got {count}")
        out = source
        for i in range(count):
            inner = dict(env)
            for key, default in block.params.items():
                kind = "first" if i == 0 and key in layer.first else "with" if key in layer.args else ""
                if kind:  # an argument, in the caller's scope
                    raw = (layer.first if kind == "first" else layer.args)[key]
                    inner[key] = _value(raw, env, _located(layer, full, f"{kind}.{key}"))
                else:  # a default, which may use the block's earlier parameters
                    inner[key] = _value(default, inner, block.param_where.get(key))
            prefix = f"{full}.{i}." if repeat is not None else f"{full}."
            out = self.expand(block.layers, inner, prefix, out, f"blocks.{block.name}", depth + 1)
        self._env = env
        return out

    def _add(self, layer: Layer, env: Mapping[str, Any], full: str, inputs: tuple[str, ...]) -> None:
        op = layer.op or ""
        where = _located(layer, full)
        in_shapes = tuple(self.shapes[s] for s in inputs)
        attrs: dict[str, Any] = {}
        for key, default in OP_FIELDS[op].items():
            raw = layer.fields.get(key, default)
            if raw is None and default is not None:
                raise SpecError(_located(layer, full, key), f"{key} needs a value, got null")
            attrs[key] = self._field(op, key, raw, env, _located(layer, full, key))
        from scalecalc.shapes import infer

        try:
            shape, extra = infer(op, attrs, in_shapes)
        except ScalecalcError as err:
            raise SpecError(where, str(err)) from None
        attrs.update(extra)
        node = Node(full, op, inputs, MappingProxyType(attrs), shape, in_shapes, where,
                    block=full.rsplit(".", 1)[0] if "." in full else "")
        if layer.op in WEIGHTED_OPS:
            self.layer_inits[full] = (layer.init or {}, env, layer.field_where.get("init", where))
        self.nodes.append(node)
        self.shapes[full] = shape

    def _field(self, op: str, key: str, raw: Any, env: Mapping[str, Any], where: Where) -> Any:
        if key in ("bias", "learnable"):
            return bool(_value(raw, env, where)) if not isinstance(raw, bool) else raw
        if key in ("kernel", "stride", "padding"):
            if raw is None:
                return None
            return self.pair(raw, env, where, key, positive=key != "padding", minimum=0)
        if key == "out":
            return self.number(raw, env, where, key, integer=True, positive=True)
        if key == "p":
            p = self.number(raw, env, where, "p", minimum=0)
            if not expr.is_symbolic(p) and p >= 1:
                raise SpecError(where, f"p must be in [0, 1), got {p}")
            return p
        if key == "batch":  # the samples a train-mode batchnorm's statistics are taken over
            return None if raw is None else self.number(raw, env, where, key, True, True, minimum=2)
        if key == "weights":
            if raw is None:
                return None
            if not isinstance(raw, list):
                raise SpecError(where, "weights must be a list [α, β, ...]")
            return tuple(self.number(v, env, where, "weight") for v in raw)
        assert raw is not REQUIRED
        return self.number(raw, env, where, key)

    def finish_inits(self, scheme: str | None) -> None:
        """Resolve every weighted node's init; geometric's default c needs k_typical."""
        kernels = [n.attrs.get("k", 1) for n in self.nodes if n.weighted]
        counts = Counter(kernels)
        if counts:
            top = max(counts.values())
            tied = [k for k in counts if counts[k] == top]
            self.k_typical = min(tied, key=lambda k: (expr.is_symbolic(k), 0 if expr.is_symbolic(k) else k))
        for i, node in enumerate(self.nodes):
            if not node.weighted:
                continue
            local, env, where = self.layer_inits[node.name]
            merged = dict(local) if "scheme" in local else {**self.spec.init, **local}
            if scheme is not None:
                merged = {"scheme": scheme}
            try:
                init = resolve_init(merged, env, node, self.k_typical)
            except ScalecalcError as err:
                raise SpecError(where.at(node.where.label), str(err)) from None
            self.nodes[i] = _replace(node, init=init)


def _located(layer: Layer, full: str, key: str | None = None) -> Where:
    """Where ``layer`` (or its field ``key``) is written, labelled with the expanded dotted name."""
    where = layer.field_where.get(key, layer.where) if key else layer.where
    return where.at(layer.where.label.replace(f'"{layer.name}"', f'"{full}"', 1))


def _replace(node: Node, **changes: Any) -> Node:
    from dataclasses import replace

    return replace(node, **changes)
