"""Stage 6: a standalone, readable PyTorch module for a (corrected) network.

The file imports only torch and math. Each spec block becomes one ``nn.Module`` class whose
``forward`` is spelled out in graph order; the model builds one instance per repetition. A
layer that ``when:`` skips in some instance is an ``nn.Identity`` there, which is exactly its
meaning in the graph (a skipped layer stands for its input). Every name written to the file
is re-validated as an identifier here; numbers are written with ``repr``; no spec string is
written anywhere else.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scalecalc import __version__
from scalecalc.errors import ScalecalcError
from scalecalc.graph import Network, Node
from scalecalc.prelude import prelude
from scalecalc.spec import Layer, Spec

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# attributes of torch.nn.Module a submodule must not shadow (checked against torch in tests)
MODULE_ATTRS = frozenset("""
T_destination add_module apply bfloat16 buffers call_super_init children compile cpu cuda double
dump_patches eval extra_repr float forward get_buffer get_extra_state get_parameter get_submodule
half ipu load_state_dict modules mtia named_buffers named_children named_modules named_parameters
parameters register_backward_hook register_buffer register_forward_hook register_forward_pre_hook
register_full_backward_hook register_full_backward_pre_hook register_load_state_dict_post_hook
register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict
to to_empty train training type xpu zero_grad
""".split())
HELPERS = ("Scale", "LearnableScale", "Bias", "Add", "Concat", "GlobalAvgPool", "Model", "conv",
           "linear", "init_weight")


def ident(name: str) -> str:
    """``name`` if it is safe to write as a Python identifier and attribute, else an error."""
    if not _IDENT.match(name) or keyword.iskeyword(name) or name.startswith("__"):
        raise ScalecalcError(f"name {name!r} cannot be written to Python code")
    if name in MODULE_ATTRS:
        raise ScalecalcError(f"layer name {name!r} clashes with torch.nn.Module.{name}; rename it")
    if name == "self":
        raise ScalecalcError("layer name 'self' cannot be written to Python code; rename it")
    return name


def _num(value: object) -> str:
    """A number as Python source: 12 significant digits, far below any effect the calculus sees,
    so the text does not depend on the last bits of an iterative solve."""
    number = float(f"{float(value):.12g}")  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def _tuple(values: Sequence[object]) -> str:
    items = [_num(v) for v in values]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _pair(value: Sequence[object]) -> str:
    a, b = (_num(v) for v in value)
    return a if a == b else f"({a}, {b})"


def _conv(n: Node) -> str:
    a, init = n.attrs, n.init
    assert init is not None
    return (f"conv({_num(a['n_in'])}, {_num(a['n_out'])}, {_pair(a['kernel'])}, stride={_pair(a['stride'])}, "
            f"padding={_pair(a['padding'])}, bias={bool(a['bias'])}, m2={_num(init.m2)}"
            + (f", distribution={init.distribution!r})" if init.distribution != "normal" else ")"))


def _linear(n: Node) -> str:
    a, init = n.attrs, n.init
    assert init is not None
    return (f"linear({_num(a['n_in'])}, {_num(a['n_out'])}, bias={bool(a['bias'])}, m2={_num(init.m2)}"
            + (f", distribution={init.distribution!r})" if init.distribution != "normal" else ")"))


def _pool(cls: str) -> Callable[[Node], str]:
    def emit(n: Node) -> str:
        a = n.attrs
        return f"nn.{cls}({_pair(a['kernel'])}, stride={_pair(a['stride'])}, padding={_pair(a['padding'])})"

    return emit


def _norm(n: Node) -> str:
    if n.op == "layernorm":
        shape = (n.shape.channels, n.shape.h, n.shape.w) if n.shape.spatial else (n.shape.channels,)
        return f"nn.LayerNorm({_tuple(shape)})"
    return f"nn.BatchNorm{'2' if n.shape.spatial else '1'}d({_num(n.shape.channels)})"


def _scale(n: Node) -> str:
    cls = "LearnableScale" if n.attrs["learnable"] else "Scale"
    return f"{cls}({_num(n.attrs['value'])})"


def _bias(n: Node) -> str:
    s = n.shape
    return f"Bias({_num(s.channels)}, spatial={s.spatial})"


def _add(n: Node) -> str:
    weights = n.attrs.get("weights")
    return f"Add({_tuple(weights)})" if weights else "Add()"


#: How each op is written as a module; the same keys as the rule registry.
EMITTERS: Mapping[str, Callable[[Node], str]] = {
    "conv": _conv,
    "linear": _linear,
    "relu": lambda n: "nn.ReLU()",
    "leaky_relu": lambda n: f"nn.LeakyReLU({_num(n.attrs['slope'])})",
    "tanh": lambda n: "nn.Tanh()",
    "sigmoid": lambda n: "nn.Sigmoid()",
    "gelu": lambda n: "nn.GELU()",
    "avgpool": _pool("AvgPool2d"),
    "maxpool": _pool("MaxPool2d"),
    "global_avgpool": lambda n: "GlobalAvgPool()",
    "flatten": lambda n: "nn.Flatten()",
    "dropout": lambda n: f"nn.Dropout({_num(n.attrs['p'])})",
    "scale": _scale,
    "bias": _bias,
    "add": _add,
    "concat": lambda n: "Concat()",
    "batchnorm": _norm,
    "layernorm": _norm,
    "identity": lambda n: "nn.Identity()",
}


@dataclass(frozen=True)
class _Entry:
    """One line of a forward body: a submodule reading earlier locals."""

    local: str
    sources: tuple[str, ...]
    layer: Layer | None  # None for an inserted multiplier


def emit_torch(spec: Spec, net: Network, *, digest: str, comments: Mapping[str, str] | None = None,
               inserted: Mapping[str, tuple[str, int]] | None = None) -> str:
    """Python source of the network ``net`` built from ``spec``.

    ``inserted`` maps multipliers added by the corrections to (node they feed, input index);
    ``comments`` gives the reason to write beside a node's line.
    """
    return _Writer(spec, net, comments or {}, inserted or {}).write(digest)


class _Writer:
    def __init__(self, spec: Spec, net: Network, comments: Mapping[str, str],
                 inserted: Mapping[str, tuple[str, int]]) -> None:
        self.spec, self.net, self.comments = spec, net, comments
        self.feeds: dict[str, list[tuple[str, int]]] = {}
        for name, (target, index) in inserted.items():
            self.feeds.setdefault(target, []).append((name, index))
        self.present = set(net.order)
        self.classes: dict[str, str] = {}
        self.skeletons: dict[str, list[_Entry]] = {}  # block name → its forward lines
        self.used_helpers: set[str] = set()

    def write(self, digest: str) -> str:
        top = self._skeleton(self.spec.layers, [""])
        out_feed = self.feeds.get("", [])
        body = self._construct_lines(self.spec.layers, top, "", indent=8)
        forward = self._forward(top, out_feed)
        block_src = "".join(self.classes[name] for name in sorted(self.classes))
        name = self.spec.name if re.fullmatch(r"[\w .\-]{1,80}", self.spec.name) else "(unnamed)"
        shape = self.net.input_shape
        dims = (shape.channels, shape.h, shape.w) if shape.spatial else (shape.channels,)
        if not re.fullmatch(r"[0-9a-f]{1,64}", digest):
            raise ScalecalcError("digest must be a hexadecimal hash")
        header = (f'"""PyTorch model generated by scalecalc {__version__} from spec {name!r}.\n\n'
                  f"Spec sha256: {digest}\n\nWeights are initialised with the E[W²] the analysis assumed;\n"
                  "fixed multipliers are buffers, not parameters.\n\"\"\"\n\n"
                  "import math\n\nimport torch\nfrom torch import nn\n\n"
                  f"INPUT_SHAPE = {_tuple(dims)}\n\n")
        model = ("\n\nclass Model(nn.Module):\n"
                 f'    """{_doc(name)}"""\n\n'
                 "    def __init__(self) -> None:\n        super().__init__()\n"
                 + body + "\n" + forward)
        return header + prelude(self.used_helpers) + block_src + model

    # -- structure ----------------------------------------------------------------------

    def _skeleton(self, layers: Sequence[Layer], prefixes: Sequence[str]) -> list[_Entry]:
        """The forward lines of a scope: its layers plus the multipliers inserted before them."""
        entries: list[_Entry] = []
        previous = "input"
        for layer in layers:
            sources = list(layer.sources or (previous,))
            for local, index in self._inserted_before(layer.name, prefixes):
                entries.append(_Entry(local, (sources[index],), None))
                sources[index] = local
            entries.append(_Entry(ident(layer.name), tuple(sources), layer))
            previous = layer.name
        return entries

    def _inserted_before(self, name: str, prefixes: Sequence[str]) -> list[tuple[str, int]]:
        seen: dict[str, int] = {}
        for prefix in prefixes:
            for full, index in self.feeds.get(prefix + name, []):
                seen.setdefault(ident(full[len(prefix):]), index)
        return sorted(seen.items(), key=lambda item: item[1])

    def _instances(self, layer: Layer, prefix: str) -> list[str]:
        """Prefixes of the repetitions of a block use that the graph holds."""
        full = prefix + layer.name
        if layer.repeat is None:
            return [full + "."]
        heads = {n[len(full) + 1:].split(".", 1)[0] for n in self.present if n.startswith(full + ".")}
        count = max((int(h) + 1 for h in heads if h.isdigit()), default=0)
        return [f"{full}.{i}." for i in range(count)]

    # -- construction -------------------------------------------------------------------

    def _module(self, full: str) -> str:
        """The constructor of node ``full``; a layer skipped here (``when``) is the identity."""
        if full not in self.present:
            return "nn.Identity()"
        code = EMITTERS[self.net.node(full).op](self.net.node(full))
        for helper in HELPERS:
            if code.startswith(helper + "("):
                self.used_helpers.add(helper)
        return code

    def _block_expr(self, layer: Layer, prefix: str, indent: int) -> str:
        block = self.spec.blocks[layer.block or ""]
        cls = self._block_class(layer.block or "", block.layers)
        instances = self._instances(layer, prefix)
        exprs = []
        inner = indent + 4 if layer.repeat is None else indent + 8
        for inst in instances:
            args = []
            pad = " " * (inner + 4)
            for entry in self.skeletons[layer.block or ""]:
                full = inst + entry.local
                if entry.layer is not None and entry.layer.block is not None:
                    value = self._block_expr(entry.layer, inst, inner + 4)
                else:
                    value = self._module(full)
                args.append(f"{pad}{entry.local}={value},{self._comment(full, entry.layer)}")
            exprs.append(f"{cls}(\n" + "\n".join(args) + f"\n{' ' * inner})")
        if layer.repeat is None:
            return exprs[0]
        pad = " " * (indent + 4)
        return "nn.ModuleList([\n" + "".join(f"{pad}{e},\n" for e in exprs) + f"{' ' * indent}])"

    def _block_class(self, block_name: str, layers: Sequence[Layer]) -> str:
        cls = "".join(part.capitalize() for part in ident(block_name).split("_")) or "Block"
        if cls in HELPERS:
            cls += "Block"
        if block_name in self.skeletons:
            return cls
        prefixes = self._all_instances(block_name)
        entries = self._skeleton(layers, prefixes)
        self.skeletons[block_name] = entries
        args = "".join(f"        {e.local}: nn.Module,\n" for e in entries)
        assigns = "".join(f"        self.{e.local} = {e.local}\n" for e in entries)
        self.classes[block_name] = (
            f"\n\nclass {cls}(nn.Module):\n"
            f'    """Block {block_name!r} of the spec."""\n\n'
            f"    def __init__(\n        self,\n        *,\n{args}    ) -> None:\n"
            f"        super().__init__()\n{assigns}\n"
            + self._forward(entries, [])
        )
        return cls

    def _all_instances(self, block_name: str) -> list[str]:
        """Every prefix (``stage1.0.``) at which ``block_name`` is used, at any depth."""
        found: list[str] = []

        def walk(layers: Sequence[Layer], prefix: str) -> None:
            for layer in layers:
                if layer.block is None:
                    continue
                for inst in self._instances(layer, prefix):
                    if layer.block == block_name:
                        found.append(inst)
                    walk(self.spec.blocks[layer.block].layers, inst)

        walk(self.spec.layers, "")
        return found

    def _construct_lines(self, layers: Sequence[Layer], entries: Sequence[_Entry], prefix: str,
                         indent: int) -> str:
        lines = []
        pad = " " * indent
        for entry in entries:
            full = prefix + entry.local
            if entry.layer is not None and entry.layer.block is not None:
                value = self._block_expr(entry.layer, prefix, indent)
            else:
                value = self._module(full)
            lines.append(f"{pad}self.{entry.local} = {value}{self._comment(full, entry.layer)}")
        for name, _ in self.feeds.get("", []):
            lines.append(f"{pad}self.{ident(name)} = {self._module(name)}"
                         f"{self._comment(name, None)}")
        return "\n".join(lines) + "\n"

    def _comment(self, full: str, layer: Layer | None) -> str:
        text = self.comments.get(full, "")
        init = self.net.node(full).init if full in self.present else None
        if not text and init is not None:
            text = f"{init} (Eq. 3)" if init.scheme == "geometric" else str(init)
        if not text and layer is not None and layer.when is not None and full not in self.present:
            text = "skipped here (when: false): stands for its input"
        return f"  # {_clean(text)}" if text else ""

    # -- forward ------------------------------------------------------------------------

    def _forward(self, entries: Sequence[_Entry], after: Sequence[tuple[str, int]]) -> str:
        lines = ["    def forward(self, input: torch.Tensor) -> torch.Tensor:"]
        last = "input"
        each = "each"  # the loop variable over repetitions, named apart from every node
        while each in {e.local for e in entries}:
            each += "_"
        for entry in entries:
            var = entry.local
            args = ", ".join((s) for s in entry.sources)
            if entry.layer is not None and entry.layer.block is not None and entry.layer.repeat is not None:
                lines.append(f"        {var} = {args}")
                lines.append(f"        for {each} in self.{entry.local}:")
                lines.append(f"            {var} = {each}({var})")
            else:
                lines.append(f"        {var} = self.{entry.local}({args})")
            last = var
        for name, _ in after:
            lines.append(f"        {name} = self.{ident(name)}({last})")
            last = name
        lines.append(f"        return {last}")
        return "\n".join(lines) + "\n"


def _clean(text: str) -> str:
    """A comment stays one printable line."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _doc(name: str) -> str:
    return f"The network {name!r}; build with Model() and feed tensors of shape (batch, *INPUT_SHAPE)."
