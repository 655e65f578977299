"""Stage 1: YAML text → a validated, located :class:`Spec` (structure only, no arithmetic).

Every mapping keeps the line and column of its keys, so later stages can point at the
exact place in the file when a value turns out to be wrong.
"""

from __future__ import annotations

import keyword
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from scalecalc.errors import SpecError, Where
from scalecalc.expr import FUNCTIONS
from scalecalc.init import ALIASES, DISTRIBUTIONS, SCHEMES

REQUIRED = object()
_POOL = {"kernel": REQUIRED, "stride": None, "padding": 0}

#: The ops of spec language v1 and their fields with defaults (REQUIRED: no default).
OP_FIELDS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "conv": {"out": REQUIRED, "kernel": REQUIRED, "stride": 1, "padding": 0, "bias": True},
    "linear": {"out": REQUIRED, "bias": True},
    "relu": {},
    "leaky_relu": {"slope": 0.01},
    "tanh": {},
    "sigmoid": {},
    "gelu": {},
    "avgpool": _POOL,
    "maxpool": _POOL,
    "global_avgpool": {},
    "flatten": {},
    "dropout": {"p": REQUIRED},
    "scale": {"value": REQUIRED, "learnable": False},
    "bias": {},
    "add": {"weights": None},
    "concat": {},
    "batchnorm": {"batch": None},
    "layernorm": {},
    "identity": {},
})
WEIGHTED_OPS = frozenset({"conv", "linear"})
MULTI_INPUT_OPS = frozenset({"add", "concat"})
LAYER_KEYS = frozenset({"name", "op", "from", "init", "when"})
BLOCK_USE_KEYS = frozenset({"name", "block", "from", "repeat", "with", "first", "when"})
INIT_KEYS = frozenset({"scheme", "c", "gain", "distribution"})
TOP_KEYS = ("name", "input", "params", "init", "output", "blocks", "layers")
OUTPUT_KEYS = ("grad_second_moment",)
MAX_REPEAT = 1000


@dataclass(frozen=True)
class Layer:
    """One entry of a ``layers:`` list: an op (``op`` set) or a block use (``block`` set)."""

    name: str
    op: str | None
    block: str | None
    fields: Mapping[str, Any]
    sources: tuple[str, ...] | None
    init: Mapping[str, Any] | None
    repeat: Any
    args: Mapping[str, Any]
    first: Mapping[str, Any]
    when: Any
    where: Where
    field_where: Mapping[str, Where]


@dataclass(frozen=True)
class Block:
    name: str
    params: Mapping[str, Any]
    layers: tuple[Layer, ...]
    where: Where
    param_where: Mapping[str, Where]


@dataclass(frozen=True)
class Spec:
    name: str
    file: str
    input: Mapping[str, Any]
    params: Mapping[str, Any]
    init: Mapping[str, Any]
    output: Mapping[str, Any]
    blocks: Mapping[str, Block]
    layers: tuple[Layer, ...]
    where: Mapping[str, Where]


class _Map(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers where each key was written."""

    marks: dict[str, tuple[int, int]]
    mark: tuple[int, int]


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.marks = {}
    out.mark = (node.start_mark.line + 1, node.start_mark.column + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        if not isinstance(key, str):
            raise SpecError(Where(loader.name, *where), f"key {key!r} is not a string")
        if key in out:
            raise SpecError(Where(loader.name, *where), f"duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.marks[key] = where
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(path: str | Path) -> Spec:
    """Read and structurally validate a spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(Where(str(path)), f"cannot read file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise SpecError(Where(str(path)), f"not UTF-8 text (byte {err.start})") from None
    return parse(text, str(path))


def parse(text: str, file: str = "<spec>") -> Spec:
    try:
        loader = _Loader(text)
        loader.name = file
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = Where(file, mark.line + 1, mark.column + 1) if mark else Where(file)
        raise SpecError(where, f"not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise SpecError(Where(file), f"not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise SpecError(Where(file), "not valid YAML: nested too deeply") from None
    if not isinstance(doc, _Map):
        raise SpecError(Where(file, 1, 1), "a spec is a mapping with keys " + ", ".join(TOP_KEYS))
    top = _Ctx(file, doc, "spec")
    top.check_keys(TOP_KEYS, required=("name", "input", "layers"))
    name = doc["name"]
    if not isinstance(name, str) or not name.strip():
        raise SpecError(top.at("name"), "name must be a non-empty string")
    blocks_ctx = _Ctx(file, top.mapping("blocks"), "blocks")
    blocks = {}
    for bname in blocks_ctx.doc:
        _identifier(bname, blocks_ctx.at(bname, f"blocks.{bname}"))
        bctx = _Ctx(file, blocks_ctx.mapping(bname, required=True), f"blocks.{bname}")
        bctx.check_keys(("params", "layers"), required=("layers",))
        params = _params(bctx, f"blocks.{bname}.params")
        blocks[bname] = Block(
            bname, MappingProxyType(dict(params)), _layers(bctx, f"blocks.{bname}.layers"),
            bctx.at(None), MappingProxyType({k: Where(file, *params.marks[k], f"blocks.{bname}.params.{k}")
                                             for k in params}),
        )
    init = top.mapping("init")
    _check_init(init, _Ctx(file, init, "init"))
    output = _Ctx(file, top.mapping("output"), "output")
    output.check_keys(OUTPUT_KEYS)
    located = {key: top.at(key) for key in doc}
    for key in ("input", "output"):  # located sub-fields, e.g. "input.size"
        located.update(_wheres(top.mapping(key), file, key, key))
    params = _params(top, "params")
    located.update(_wheres(params, file, "params"))
    return Spec(
        name=name.strip(), file=file,
        input=MappingProxyType(dict(top.mapping("input"))),
        params=MappingProxyType(dict(params)),
        init=MappingProxyType(dict(init)),
        output=MappingProxyType(dict(output.doc)),
        blocks=MappingProxyType(blocks), layers=_layers(top, "layers"),
        where=MappingProxyType(located),
    )


class _Ctx:
    """A mapping being validated, with the file and a label for messages."""

    def __init__(self, file: str, doc: _Map, label: str) -> None:
        self.file, self.doc, self.label = file, doc, label

    def at(self, key: str | None, label: str | None = None) -> Where:
        line, col = self.doc.marks.get(key, self.doc.mark) if key else self.doc.mark
        return Where(self.file, line, col, label if label is not None else self.label)

    def check_keys(self, allowed: Any, required: tuple[str, ...] = ()) -> None:
        for key in self.doc:
            if key not in allowed:
                raise SpecError(self.at(key), f"unknown field {key!r}",
                                "allowed: " + ", ".join(sorted(allowed)))
        for key in required:
            if key not in self.doc:
                raise SpecError(self.at(None), f"missing field {key!r}")

    def mapping(self, key: str, required: bool = False) -> _Map:
        """The mapping under ``key``; an absent or empty (null) one reads as ``{}``."""
        value = self.doc.get(key)
        if value is None and not required:
            empty = _Map()
            empty.marks, empty.mark = {}, self.doc.marks.get(key, self.doc.mark)
            return empty
        if not isinstance(value, _Map):
            raise SpecError(self.at(key), f"{key} must be a mapping, not {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}
    return kinds.get(type(value), type(value).__name__)


def _wheres(doc: _Map, file: str, prefix: str, label: str | None = None) -> dict[str, Where]:
    """Where each key of ``doc`` was written, keyed ``prefix.key``."""
    return {f"{prefix}.{k}": Where(file, *doc.marks[k], label or f"{prefix}.{k}") for k in doc}


def _params(ctx: _Ctx, label: str) -> _Map:
    params = ctx.mapping("params")
    for key in params:
        where = Where(ctx.file, *params.marks[key], f"{label}.{key}")
        if not key.isidentifier() or keyword.iskeyword(key) or key.startswith("__") or key in FUNCTIONS:
            raise SpecError(where, f"parameter name {key!r} is not usable in expressions",
                            "allowed: Python identifiers, not keywords, not starting with __, not "
                            + ", ".join(FUNCTIONS))
    return params


def _identifier(name: Any, where: Where) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise SpecError(where, f"name {name!r} is not a Python identifier",
                        "allowed: letters, digits and _, not starting with a digit, not a keyword")
    if name == "input":
        raise SpecError(where, "name 'input' is reserved for the network or block input")
    return name


def _layers(ctx: _Ctx, label: str) -> tuple[Layer, ...]:
    items = ctx.doc.get("layers")
    if not isinstance(items, list) or not items:
        raise SpecError(ctx.at("layers"), "layers must be a non-empty list")
    layers, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, _Map):
            raise SpecError(ctx.at("layers", f"{label}[{i}]"),
                            f"each layer is a mapping, not {_kind(item)}")
        layer = _layer(_Ctx(ctx.file, item, f"{label}[{i}]"), item)
        if layer.name in seen:
            raise SpecError(layer.where, f"duplicate name {layer.name!r} in this scope")
        seen.add(layer.name)
        layers.append(layer)
    return tuple(layers)


def _layer(ctx: _Ctx, item: _Map) -> Layer:
    raw_name = item.get("name")
    what = f'{ctx.label} "{raw_name}"' if raw_name is not None else ctx.label
    if "name" not in item:
        raise SpecError(ctx.at(None), "missing field 'name'")
    has_op, has_block = "op" in item, "block" in item
    if has_op == has_block:
        raise SpecError(ctx.at(None, what), "a layer needs exactly one of 'op' or 'block'")
    op, block = item.get("op"), item.get("block")
    ctx.label = f'{ctx.label} "{raw_name}" ' + (f"(op: {op})" if has_op else f"(block: {block})")
    name = _identifier(raw_name, ctx.at("name"))
    if has_op:
        if not isinstance(op, str) or op not in OP_FIELDS:
            raise SpecError(ctx.at("op"), f"unknown op {op!r}", "known: " + ", ".join(OP_FIELDS))
        fields = OP_FIELDS[op]
        allowed = LAYER_KEYS | set(fields)
        if op not in WEIGHTED_OPS:
            allowed = allowed - {"init"}
        ctx.check_keys(allowed, required=tuple(k for k, v in fields.items() if v is REQUIRED))
    else:
        if not isinstance(block, str):
            raise SpecError(ctx.at("block"), "block must name an entry of 'blocks'")
        ctx.check_keys(BLOCK_USE_KEYS)
        fields = {}
    sources = item.get("from")
    if sources is not None:
        listed = sources if isinstance(sources, list) else [sources]
        if not listed or not all(isinstance(s, str) for s in listed):
            raise SpecError(ctx.at("from"), "from must be a layer name or a list of names")
        sources = tuple(listed)
    if op in MULTI_INPUT_OPS and (sources is None or len(sources) < 2):
        raise SpecError(ctx.at("from" if sources else None), f"{op} needs 'from' with two or more inputs")
    if op not in MULTI_INPUT_OPS and sources is not None and len(sources) != 1:
        raise SpecError(ctx.at("from"), f"{op or 'a block'} takes one input, got {len(sources)}")
    init = item.get("init")
    if init is not None:
        if not isinstance(init, _Map):
            raise SpecError(ctx.at("init"), "init must be a mapping")
        _check_init(init, _Ctx(ctx.file, init, ctx.label + " init"))
    args, first = ctx.mapping("with"), ctx.mapping("first")
    field_where = {k: ctx.at(k) for k in item}
    for key, doc in (("with", args), ("first", first)):
        field_where.update(_wheres(doc, ctx.file, key, ctx.label))
    return Layer(
        name=name, op=op, block=block,
        fields=MappingProxyType({k: item[k] for k in fields if k in item}),
        sources=sources, init=init, repeat=item.get("repeat"),
        args=MappingProxyType(dict(args)), first=MappingProxyType(dict(first)),
        when=item.get("when"), where=ctx.at(None),
        field_where=MappingProxyType(field_where),
    )


def _check_init(init: _Map, ctx: _Ctx) -> None:
    ctx.check_keys(INIT_KEYS)
    for key, known in (("scheme", (*SCHEMES, *ALIASES)), ("distribution", DISTRIBUTIONS)):
        if key in init and init[key] not in known:
            raise SpecError(ctx.at(key), f"unknown init {key} {init[key]!r}", "known: " + ", ".join(known))
