"""Bad specs and bad options: every one is a located, one-line SpecError, never a traceback.

The contract: ``net.yaml:LINE:COL: layers[i] "name" (op: conv): what is wrong; allowed/known:
...``, exit code 2, nothing evaluated as Python. Each case below pins the location (found
independently, by searching the YAML text for the offending token), the label, a message
fragment and, where there is one, the list of alternatives. A subset runs through the real
command line as subprocesses (started in parallel to keep the file fast).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scalecalc import graph
from scalecalc.cli import main
from scalecalc.errors import ScalecalcError, SpecError, Where
from scalecalc.graph import build
from scalecalc.propagate import propagate
from scalecalc.spec import OP_FIELDS, load, parse

VEC = "name: t\ninput: {features: 4}\n"
IMG = "name: t\ninput: {channels: 3, size: 8}\n"
KNOWN_OPS = "known: " + ", ".join(OP_FIELDS)
KNOWN_SCHEMES = "known: geometric, fan_in, fan_out, arithmetic, kaiming_in, kaiming_out, xavier, lecun"
IDENT = "allowed: letters, digits and _, not starting with a digit, not a keyword"
PARAM_NAMES = ("allowed: Python identifiers, not keywords, not starting with __, not sqrt, floor, ceil, min, "
               "max, abs")
RELU_BLOCK = "blocks:\n  r:\n    params: {n: 3}\n    layers:\n      - {name: x, op: relu}\n"


def _pos(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first ``needle`` in ``text`` (the expected location)."""
    index = text.index(needle)
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def spec_error(text: str, **options: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        propagate(build(parse(text, "net.yaml"), **options))
    err = info.value
    message = str(err)
    assert "\n" not in message and len(message) < 500, message
    return err


def case(id: str, text: str, where: str | tuple[int, int] | None, label: str, fragment: str,
         allowed: str | None = None, **options: Any) -> Any:
    """``where``: a token of ``text`` whose position is the error's, a (line, col), or None (file only)."""
    return pytest.param(text, where, label, fragment, allowed, options, id=id)


CASES = [
    # -- structure ------------------------------------------------------------------------
    case("unknown-op", IMG + "layers:\n  - {name: a, op: convv, out: 4, kernel: 3}\n",
         "op: convv", 'layers[0] "a" (op: convv)', "unknown op 'convv'", KNOWN_OPS),
    case("op-not-a-string", VEC + "layers:\n  - {name: a, op: [relu]}\n",
         "op: [", "layers[0] \"a\" (op: ['relu'])", "unknown op ['relu']", KNOWN_OPS),
    case("unknown-field", IMG + "layers:\n  - {name: a, op: conv, out: 4, kernel: 3, strid: 2}\n",
         "strid", 'layers[0] "a" (op: conv)', "unknown field 'strid'",
         "allowed: bias, from, init, kernel, name, op, out, padding, stride, when"),
    case("init-on-unweighted-op", VEC + "layers:\n  - {name: a, op: relu, init: {gain: 2}}\n",
         "init", 'layers[0] "a" (op: relu)', "unknown field 'init'", "allowed: from, name, op, when"),
    case("repeat-on-op", VEC + "layers:\n  - {name: a, op: relu, repeat: 3}\n",
         "repeat", 'layers[0] "a" (op: relu)', "unknown field 'repeat'", "allowed: from, name, op, when"),
    case("missing-field", IMG + "layers:\n  - {name: a, op: conv, out: 4}\n",
         "{name: a", 'layers[0] "a" (op: conv)', "missing field 'kernel'"),
    case("missing-name", VEC + "layers:\n  - {op: relu}\n", "{op", "layers[0]", "missing field 'name'"),
    case("op-and-block", VEC + "layers:\n  - {name: a, op: relu, block: r}\n",
         "{name", 'layers[0] "a"', "a layer needs exactly one of 'op' or 'block'"),
    case("neither-op-nor-block", VEC + "layers:\n  - {name: a}\n",
         "{name", 'layers[0] "a"', "a layer needs exactly one of 'op' or 'block'"),
    case("null-required-field", IMG + "layers:\n  - {name: c, op: conv, out: 4, kernel: null}\n",
         "kernel", 'layers[0] "c" (op: conv)', "kernel needs a value, got null"),
    case("layer-not-a-mapping", VEC + "layers:\n  - relu\n", "layers", "layers[0]",
         "each layer is a mapping, not a string"),
    case("empty-layers", VEC + "layers: []\n", "layers", "spec", "layers must be a non-empty list"),
    case("top-unknown-key", VEC + "layer:\n  - {name: a, op: relu}\n", "layer:", "spec",
         "unknown field 'layer'", "allowed: blocks, init, input, layers, name, output, params"),
    case("missing-input", "name: t\nlayers:\n  - {name: a, op: relu}\n", (1, 1), "spec",
         "missing field 'input'"),
    case("empty-name", "name: ''\ninput: {features: 4}\nlayers:\n  - {name: a, op: relu}\n",
         "name", "spec", "name must be a non-empty string"),
    case("params-not-a-mapping", VEC + "params: [1]\nlayers:\n  - {name: a, op: relu}\n",
         "params", "spec", "params must be a mapping, not a list"),
    case("output-unknown-key", VEC + "output: {foo: 1}\nlayers:\n  - {name: a, op: relu}\n",
         "foo", "output", "unknown field 'foo'", "allowed: grad_second_moment"),
    # -- input ----------------------------------------------------------------------------
    case("input-missing-size", "name: t\ninput: {channels: 3}\nlayers:\n  - {name: a, op: relu}\n",
         "input", "input", "input needs {features: N} or {channels: C, size: S or [H, W]}"),
    case("input-both-kinds", "name: t\ninput: {channels: 3, size: 4, features: 3}\nlayers:\n"
         "  - {name: a, op: relu}\n", "input", "input", "give either features (vector input) or channels"),
    case("input-unknown-field", "name: t\ninput: {chanels: 3, size: 4}\nlayers:\n  - {name: a, op: relu}\n",
         "chanels", "input", "unknown field 'chanels'", "allowed: channels, features, second_moment, size"),
    case("input-not-a-mapping", "name: t\ninput: 3\nlayers:\n  - {name: a, op: relu}\n",
         "input", "spec", "input must be a mapping, not int"),
    case("input-size-zero", "name: t\ninput: {channels: 3, size: 0}\nlayers:\n  - {name: a, op: relu}\n",
         "size", "input", "size must be positive, got 0"),
    case("input-features-negative", "name: t\ninput: {features: -2}\nlayers:\n  - {name: a, op: relu}\n",
         "features", "input", "features must be positive, got -2"),
    case("input-second-moment", "name: t\ninput: {features: 4, second_moment: 0}\nlayers:\n"
         "  - {name: a, op: relu}\n", "second_moment", "input", "second_moment must be positive, got 0"),
    case("grad-second-moment", VEC + "output: {grad_second_moment: -1}\nlayers:\n  - {name: a, op: relu}\n",
         "grad_second_moment", "output", "grad_second_moment must be positive, got -1"),
    # -- values ---------------------------------------------------------------------------
    case("dropout-p-one", VEC + "layers:\n  - {name: a, op: dropout, p: 1}\n",
         "p: 1", 'layers[0] "a" (op: dropout)', "p must be in [0, 1), got 1"),
    case("dropout-p-negative", VEC + "layers:\n  - {name: a, op: dropout, p: -0.1}\n",
         "p: -", 'layers[0] "a" (op: dropout)', "p must be at least 0, got -0.1"),
    case("batchnorm-batch-one", IMG + "layers:\n  - {name: a, op: batchnorm, batch: 1}\n",
         "batch: 1", 'layers[0] "a" (op: batchnorm)', "batch must be at least 2, got 1"),
    case("kernel-larger-than-input", IMG + "layers:\n"
         "  - {name: a, op: conv, out: 4, kernel: 11, padding: 1}\n",
         "{name: a", 'layers[0] "a" (op: conv)', "kernel 11 is larger than the padded input height 8+2·1"),
    case("pool-padding", IMG + "layers:\n  - {name: c, op: avgpool, kernel: 2, padding: 2}\n",
         "{name: c", 'layers[0] "c" (op: avgpool)', "padding 2 is more than half the kernel 2"),
    case("out-zero", IMG + "layers:\n  - {name: a, op: conv, out: 0, kernel: 3}\n",
         "out", 'layers[0] "a" (op: conv)', "out must be positive, got 0"),
    case("out-negative", VEC + "layers:\n  - {name: a, op: linear, out: -3}\n",
         "out", 'layers[0] "a" (op: linear)', "out must be positive, got -3"),
    case("out-fraction", VEC + "layers:\n  - {name: a, op: linear, out: 2.5}\n",
         "out", 'layers[0] "a" (op: linear)', "out must be a whole number, got 2.5"),
    case("stride-zero", IMG + "layers:\n  - {name: a, op: conv, out: 4, kernel: 3, stride: 0}\n",
         "stride", 'layers[0] "a" (op: conv)', "stride must be positive, got 0"),
    case("kernel-zero", IMG + "layers:\n  - {name: a, op: conv, out: 4, kernel: 0}\n",
         "kernel", 'layers[0] "a" (op: conv)', "kernel must be positive, got 0"),
    case("kernel-triple", IMG + "layers:\n  - {name: c, op: conv, out: 4, kernel: [3, 3, 3]}\n",
         "kernel", 'layers[0] "c" (op: conv)', "kernel must be a number or a pair [h, w]"),
    case("kernel-mapping", IMG + "layers:\n  - {name: c, op: conv, out: 4, kernel: {a: 1}}\n",
         "kernel", 'layers[0] "c" (op: conv)', "expected a number or an expression, got {'a': 1}"),
    case("out-infinite", VEC + "layers:\n  - {name: a, op: linear, out: .inf}\n",
         "out", 'layers[0] "a" (op: linear)', "'inf' is not a finite real number (got inf)"),
    case("out-nan", VEC + "layers:\n  - {name: a, op: linear, out: .nan}\n",
         "out", 'layers[0] "a" (op: linear)', "not a finite real number (got nan)"),
    case("scale-too-large", VEC + "layers:\n  - {name: a, op: scale, value: 1e300}\n",
         "value", 'layers[0] "a" (op: scale)', "'1e300' is too large (limit 1e+15)"),
    case("add-weights-not-a-list", VEC + "layers:\n  - {name: a, op: relu}\n"
         "  - {name: b, op: add, from: [input, a], weights: 1}\n",
         "weights", 'layers[1] "b" (op: add)', "weights must be a list"),
    case("add-weights-count", VEC + "layers:\n  - {name: a, op: relu}\n"
         "  - {name: b, op: add, from: [input, a], weights: [1]}\n",
         "{name: b", 'layers[1] "b" (op: add)', "add has 2 inputs but 1 weights"),
    # -- names and wiring -----------------------------------------------------------------
    case("unknown-from", VEC + "layers:\n  - {name: a, op: relu}\n  - {name: b, op: relu, from: zz}\n",
         "from: zz", 'layers[1] "b" (op: relu)', "unknown from: 'zz'", "known here: input, a"),
    case("cycle", VEC + "layers:\n  - {name: a, op: relu, from: b}\n  - {name: b, op: relu}\n",
         "from: b", 'layers[0] "a" (op: relu)', "from: 'b' is not above this layer"),
    case("self-loop", VEC + "layers:\n  - {name: a, op: relu, from: a}\n",
         "from: a", 'layers[0] "a" (op: relu)', "this would form a cycle"),
    case("from-not-a-name", VEC + "layers:\n  - {name: a, op: relu, from: 3}\n",
         "from", 'layers[0] "a" (op: relu)', "from must be a layer name or a list of names"),
    case("two-inputs-to-relu", VEC + "layers:\n  - {name: a, op: relu}\n"
         "  - {name: b, op: relu, from: [a, input]}\n", "from: [a", 'layers[1] "b" (op: relu)',
         "relu takes one input, got 2"),
    case("add-one-input", VEC + "layers:\n  - {name: a, op: linear, out: 3}\n"
         "  - {name: b, op: add, from: [a]}\n",
         "from: [a]", 'layers[1] "b" (op: add)', "add needs 'from' with two or more inputs"),
    case("unused-output", VEC + "layers:\n  - {name: a, op: relu}\n  - {name: b, op: relu, from: input}\n",
         "{name: a", 'layers[0] "a" (op: relu)', "the output of 'a' is never used",
         "only the last layer may be left unconsumed"),
    case("duplicate-name", VEC + "layers:\n  - {name: a, op: relu}\n  - {name: a, op: tanh}\n",
         "{name: a, op: tanh", 'layers[1] "a" (op: tanh)', "duplicate name 'a' in this scope"),
    case("name-starts-with-digit", VEC + "layers:\n  - {name: 1a, op: relu}\n",
         "name: 1a", 'layers[0] "1a" (op: relu)', "name '1a' is not a Python identifier", IDENT),
    case("name-with-dash", VEC + "layers:\n  - {name: a-b, op: relu}\n",
         "name: a-b", 'layers[0] "a-b" (op: relu)', "name 'a-b' is not a Python identifier", IDENT),
    case("name-keyword", VEC + "layers:\n  - {name: class, op: relu}\n",
         "name: class", 'layers[0] "class" (op: relu)', "name 'class' is not a Python identifier", IDENT),
    case("name-input-reserved", VEC + "layers:\n  - {name: input, op: relu}\n",
         "name: input", 'layers[0] "input" (op: relu)', "name 'input' is reserved"),
    case("param-name-not-identifier", VEC + "params: {1w: 1}\nlayers:\n  - {name: a, op: relu}\n",
         "1w", "params.1w", "parameter name '1w' is not usable in expressions", PARAM_NAMES),
    case("param-name-dunder", VEC + "params: {__class__: 1}\nlayers:\n  - {name: a, op: relu}\n",
         "__class__", "params.__class__", "parameter name '__class__' is not usable", PARAM_NAMES),
    case("param-name-function", VEC + "params: {sqrt: 1}\nlayers:\n  - {name: a, op: relu}\n",
         "sqrt", "params.sqrt", "parameter name 'sqrt' is not usable", PARAM_NAMES),
    # -- shapes ---------------------------------------------------------------------------
    case("add-shape-mismatch", VEC + "layers:\n  - {name: a, op: linear, out: 3}\n"
         "  - {name: b, op: add, from: [input, a]}\n",
         "{name: b", 'layers[1] "b" (op: add)', "add inputs have different shapes: 4, 3"),
    case("linear-after-conv", IMG + "layers:\n  - {name: c, op: conv, out: 4, kernel: 3}\n"
         "  - {name: fc, op: linear, out: 3}\n", "{name: fc", 'layers[1] "fc" (op: linear)',
         "linear needs a vector input, got 4×6×6; add flatten or global_avgpool"),
    case("concat-spatial-mismatch", IMG + "layers:\n  - {name: c, op: conv, out: 4, kernel: 3}\n"
         "  - {name: j, op: concat, from: [input, c]}\n", "{name: j", 'layers[1] "j" (op: concat)',
         "concat inputs must share spatial size: 3×8×8, 4×6×6"),
    case("conv-on-vector", VEC + "layers:\n  - {name: c, op: conv, out: 4, kernel: 3}\n",
         "{name: c", 'layers[0] "c" (op: conv)',
         "conv needs a spatial input (channels×h×w), got a vector of 4"),
    case("global-pool-on-vector", VEC + "layers:\n  - {name: g, op: global_avgpool}\n",
         "{name: g", 'layers[0] "g" (op: global_avgpool)', "global_avgpool needs a spatial input"),
    case("all-layers-skipped", VEC + "layers:\n  - {name: a, op: relu, when: 0}\n",
         "layers", "spec", "the network has no layers (all skipped by 'when')"),
    # -- expressions ----------------------------------------------------------------------
    case("expr-unknown-param", VEC + "params: {w: 4}\nlayers:\n  - {name: a, op: linear, out: 2*q}\n",
         "out", 'layers[0] "a" (op: linear)', "unknown parameter 'q' in '2*q'; known: w"),
    case("expr-import", VEC + "layers:\n  - {name: a, op: linear, out: '__import__(\"os\").getcwd()'}\n",
         "out", 'layers[0] "a" (op: linear)', "calls something other than a known function; "
         "known: sqrt, floor, ceil, min, max, abs"),
    case("expr-attribute", VEC + "params: {w: 4}\nlayers:\n  - {name: a, op: linear, out: w.real}\n",
         "out", 'layers[0] "a" (op: linear)', "'w.real' uses attribute, which is not arithmetic; allowed: "
         "numbers, parameter names, + - * / // % **, comparisons, sqrt, floor, ceil, min, max, abs"),
    case("expr-lambda", VEC + "layers:\n  - {name: a, op: linear, out: '(lambda: 3)()'}\n",
         "out", 'layers[0] "a" (op: linear)', "calls something other than a known function"),
    case("expr-comprehension", VEC + "layers:\n  - {name: a, op: linear, out: '[x for x in (1, 2)]'}\n",
         "out", 'layers[0] "a" (op: linear)', "uses listcomp, which is not arithmetic"),
    case("expr-string", VEC + "layers:\n  - {name: a, op: linear, out: '\"abc\"'}\n",
         "out", 'layers[0] "a" (op: linear)', "contains 'abc'; only numbers are allowed"),
    case("expr-huge-power", VEC + "layers:\n  - {name: a, op: linear, out: 10**10**10}\n",
         "out", 'layers[0] "a" (op: linear)', "10**10000000000 is too large (limit 64)"),
    case("expr-syntax", VEC + "layers:\n  - {name: a, op: linear, out: 2*}\n",
         "out", 'layers[0] "a" (op: linear)', "'2*' is not an arithmetic expression"),
    case("expr-division-by-zero", VEC + "params: {w: 4}\nlayers:\n  - {name: a, op: linear, out: w/0}\n",
         "out", 'layers[0] "a" (op: linear)', "division by zero in 'w/0'"),
    case("expr-wrong-arity", VEC + "layers:\n  - {name: a, op: linear, out: 'sqrt(4, 2)'}\n",
         "out", 'layers[0] "a" (op: linear)', "sqrt() in 'sqrt(4, 2)' takes one argument, got 2"),
    case("expr-complex", VEC + "layers:\n  - {name: a, op: scale, value: '(-8)**(1/3)'}\n",
         "value", 'layers[0] "a" (op: scale)', "is not a real number"),
    case("expr-bool-word", VEC + "layers:\n  - {name: a, op: linear, out: 2, bias: yes please}\n",
         "bias", 'layers[0] "a" (op: linear)', "'yes please' is not an arithmetic expression"),
    case("expr-in-param", VEC + "params: {w: 4*zz}\nlayers:\n  - {name: a, op: relu}\n",
         "w: 4", "params.w", "unknown parameter 'zz' in '4*zz'; known: none"),
    case("param-not-a-number", VEC + "params: {w: {a: 1}}\nlayers:\n  - {name: a, op: relu}\n",
         "w: {", "params.w", "expected a number or an expression, got {'a': 1}"),
    case("expr-in-when", VEC + "layers:\n  - {name: a, op: relu, when: 'open(\"x\")'}\n"
         "  - {name: b, op: relu}\n",
         "when", 'layers[0] "a" (op: relu)', "calls something other than a known function"),
    case("when-on-symbolic-param", VEC + "params: {w: 4}\nlayers:\n"
         "  - {name: a, op: linear, out: w, when: w > 2}\n",
         "when", 'layers[0] "a" (op: linear)', "comparison in 'w > 2' needs numbers, but w is symbolic",
         symbolic=("w",)),
    case("when-truth-of-symbolic-param", VEC + "params: {w: 4}\nlayers:\n"
         "  - {name: a, op: linear, out: w, when: w}\n", "when", 'layers[0] "a" (op: linear)',
         "when: 'w' depends on symbolic w", "a condition needs numbers; give them with --set instead "
         "of --symbolic", symbolic=("w",)),
    # -- init -----------------------------------------------------------------------------
    case("init-unknown-scheme", VEC + "init: {scheme: foo}\nlayers:\n  - {name: a, op: linear, out: 3}\n",
         "scheme", "init", "unknown init scheme 'foo'", KNOWN_SCHEMES),
    case("init-unknown-field", VEC + "init: {schem: foo}\nlayers:\n  - {name: a, op: linear, out: 3}\n",
         "schem", "init", "unknown field 'schem'", "allowed: c, distribution, gain, scheme"),
    case("layer-init-unknown-scheme", VEC + "layers:\n"
         "  - {name: a, op: linear, out: 3, init: {scheme: foo}}\n",
         "scheme", 'layers[0] "a" (op: linear) init', "unknown init scheme 'foo'", KNOWN_SCHEMES),
    case("layer-init-unknown-field", VEC + "layers:\n  - {name: a, op: linear, out: 3, init: {gian: 2}}\n",
         "gian", 'layers[0] "a" (op: linear) init', "unknown field 'gian'",
         "allowed: c, distribution, gain, scheme"),
    case("layer-init-distribution", VEC + "layers:\n"
         "  - {name: a, op: linear, out: 3, init: {distribution: cauchy}}\n",
         "distribution", 'layers[0] "a" (op: linear) init', "unknown init distribution 'cauchy'",
         "known: normal, uniform"),
    case("layer-init-not-a-mapping", VEC + "layers:\n  - {name: a, op: linear, out: 3, init: 2}\n",
         "init", 'layers[0] "a" (op: linear)', "init must be a mapping"),
    case("init-negative-constant", VEC + "layers:\n  - {name: a, op: linear, out: 3, init: {c: -1}}\n",
         "init", 'layers[0] "a" (op: linear)', "init constant must be positive, got -1"),
    case("init-gain-for-geometric", VEC + "layers:\n  - {name: a, op: linear, out: 3, init: {gain: 1}}\n",
         "init", 'layers[0] "a" (op: linear)', "geometric init takes 'c', not 'gain'"),
    case("cli-init-scheme", VEC + "layers:\n  - {name: a, op: linear, out: 3}\n",
         None, "--init", "unknown init scheme 'bogus'", KNOWN_SCHEMES, init_scheme="bogus"),
    # -- options --------------------------------------------------------------------------
    case("set-unknown-param", VEC + "params: {w: 4}\nlayers:\n  - {name: a, op: linear, out: w}\n",
         "params", "--set", "unknown parameter 'q'", "known: w", overrides={"q": 3}),
    case("symbolic-unknown-param", VEC + "params: {w: 4}\nlayers:\n  - {name: a, op: linear, out: w}\n",
         "params", "--symbolic", "unknown parameter 'q'", "known: w", symbolic=("q",)),
    case("set-without-params", VEC + "layers:\n  - {name: a, op: relu}\n",
         None, "--set", "unknown parameter 'w'", "known: none", overrides={"w": 3}),
    case("set-bad-value", VEC + "params: {w: 4}\nlayers:\n  - {name: a, op: linear, out: w}\n",
         "out", 'layers[0] "a" (op: linear)', "out must be positive, got -3", overrides={"w": -3}),
    # -- blocks ---------------------------------------------------------------------------
    case("unknown-block", VEC + "layers:\n  - {name: a, block: nope}\n",
         "block: nope", 'layers[0] "a" (block: nope)', "unknown block 'nope'", "known: none"),
    case("unknown-block-known-list", VEC + RELU_BLOCK + "layers:\n  - {name: a, block: s}\n",
         "block: s", 'layers[0] "a" (block: s)', "unknown block 's'", "known: r"),
    case("unknown-block-param", VEC + RELU_BLOCK + "layers:\n  - {name: a, block: r, with: {m: 2}}\n",
         "m: 2", 'layers[0] "a" (block: r)', "block 'r' has no parameter 'm'", "known: n"),
    case("unknown-block-param-first", VEC + RELU_BLOCK + "layers:\n"
         "  - {name: a, block: r, repeat: 2, first: {m: 2}}\n",
         "m: 2", 'layers[0] "a" (block: r)', "block 'r' has no parameter 'm'", "known: n"),
    case("block-arg-expression", VEC + RELU_BLOCK + "layers:\n  - {name: a, block: r, with: {n: zz}}\n",
         "n: zz", 'layers[0] "a" (block: r)', "unknown parameter 'zz' in 'zz'; known: none"),
    case("block-param-default", VEC + "blocks:\n  r:\n    params: {n: zz}\n    layers:\n"
         "      - {name: x, op: relu}\nlayers:\n  - {name: a, block: r}\n",
         "n: zz", "blocks.r.params.n", "unknown parameter 'zz' in 'zz'; known: none"),
    case("block-not-a-mapping", VEC + "blocks:\n  r: 3\nlayers:\n  - {name: a, block: r}\n",
         "r: 3", "blocks", "r must be a mapping, not int"),
    case("block-empty", VEC + "blocks:\n  r:\nlayers:\n  - {name: a, block: r}\n",
         "r:", "blocks", "r must be a mapping, not empty"),
    case("blocks-not-a-mapping", VEC + "blocks: [1]\nlayers:\n  - {name: a, block: r}\n",
         "blocks", "spec", "blocks must be a mapping, not a list"),
    case("block-bad-name", VEC + "blocks:\n  1r:\n    layers:\n      - {name: x, op: relu}\n"
         "layers:\n  - {name: a, op: relu}\n",
         "1r", "blocks.1r", "name '1r' is not a Python identifier", IDENT),
    case("block-unknown-key", VEC + "blocks:\n  r:\n    layerz: []\nlayers:\n  - {name: a, block: r}\n",
         "layerz", "blocks.r", "unknown field 'layerz'", "allowed: layers, params"),
    case("block-missing-layers", VEC + "blocks:\n  r:\n    params: {n: 1}\nlayers:\n"
         "  - {name: a, block: r}\n",
         "params", "blocks.r", "missing field 'layers'"),
    case("block-layer-value", VEC + "blocks:\n  r:\n    layers:\n      - {name: x, op: relu}\n"
         "      - {name: y, op: dropout, p: 2}\nlayers:\n  - {name: a, block: r, repeat: 2}\n",
         "p: 2", 'blocks.r.layers[1] "a.0.y" (op: dropout)', "p must be in [0, 1), got 2"),
    case("block-layer-shape", VEC + "blocks:\n  r:\n    params: {n: 3}\n    layers:\n"
         "      - {name: x, op: linear, out: n}\n      - {name: y, op: add, from: [input, x]}\n"
         "layers:\n  - {name: a, block: r}\n",
         "{name: y", 'blocks.r.layers[1] "a.y" (op: add)', "add inputs have different shapes: 4, 3"),
    case("block-layer-unknown-from", VEC + "blocks:\n  r:\n    layers:\n"
         "      - {name: x, op: relu, from: a}\n"
         "layers:\n  - {name: a, op: relu}\n  - {name: b, block: r}\n",
         "from: a", 'blocks.r.layers[0] "b.x" (op: relu)', "unknown from: 'a'", "known here: input"),
    case("block-layer-duplicate", VEC + "blocks:\n  r:\n    layers:\n      - {name: x, op: relu}\n"
         "      - {name: x, op: tanh}\nlayers:\n  - {name: a, block: r}\n",
         "{name: x, op: tanh", 'blocks.r.layers[1] "x" (op: tanh)', "duplicate name 'x' in this scope"),
    case("block-inner-unknown-block", VEC + "blocks:\n  r:\n    layers:\n      - {name: x, block: q}\n"
         "layers:\n  - {name: a, block: r, repeat: 2}\n",
         "block: q", 'blocks.r.layers[0] "a.0.x" (block: q)', "unknown block 'q'", "known: r"),
    case("repeat-over-cap", VEC + RELU_BLOCK + "layers:\n  - {name: a, block: r, repeat: 5000}\n",
         "repeat", 'layers[0] "a" (block: r)', "repeat must be a number from 1 to 1000, got 5000"),
    case("repeat-zero", VEC + RELU_BLOCK + "layers:\n  - {name: a, block: r, repeat: 0}\n",
         "repeat", 'layers[0] "a" (block: r)', "repeat must be positive, got 0"),
    case("repeat-symbolic", VEC + "params: {k: 2}\n" + RELU_BLOCK + "layers:\n"
         "  - {name: a, block: r, repeat: k}\n",
         "repeat", 'layers[0] "a" (block: r)', "repeat must be a number from 1 to 1000, got k",
         symbolic=("k",)),
    case("recursive-block", VEC + "blocks:\n  r:\n    layers:\n      - {name: x, block: r}\n"
         "layers:\n  - {name: a, block: r}\n",
         "{name: x", 'blocks.r.layers[0] "a.x.x.x.x.x.x.x.x" (block: r)',
         "blocks nested deeper than 8", "a block may not use itself, directly or through another block"),
    case("mutually-recursive-blocks", VEC + "blocks:\n  r:\n    layers:\n      - {name: x, block: s}\n"
         "  s:\n    layers:\n      - {name: y, block: r}\nlayers:\n  - {name: a, block: r}\n",
         "{name: y", 'blocks.s.layers[0] "a.x.y.x.y.x.y.x.y" (block: r)', "blocks nested deeper than 8",
         "a block may not use itself, directly or through another block"),
    case("node-count-over-cap", VEC + "blocks:\n  r:\n    layers:\n      - {name: x, op: relu, when: 0}\n"
         "  s:\n    layers:\n      - {name: x, block: r, repeat: 1000}\n"
         "  u:\n    layers:\n      - {name: x, block: s, repeat: 1000}\n"
         "layers:\n  - {name: a, block: u, repeat: 1000}\n  - {name: b, op: relu}\n",
         "{name: x, op", 'blocks.r.layers[0] "a.0.x.99.x.898.x" (op: relu)',
         "more than 100000 layers after expanding blocks", "lower the repeat counts of nested blocks"),
]


@pytest.mark.parametrize(("text", "where", "label", "fragment", "allowed", "options"), CASES)
def test_spec_error(text: str, where: Any, label: str, fragment: str, allowed: str | None,
                    options: dict[str, Any]) -> None:
    err = spec_error(text, **options)
    assert err.where is not None
    line, col = _pos(text, where) if isinstance(where, str) else where or (0, 0)
    assert (err.where.file, err.where.line, err.where.col) == ("net.yaml", line, col), str(err)
    assert err.where.label == label, str(err)
    assert fragment in err.message, str(err)
    assert err.allowed == allowed, str(err)
    place = f"net.yaml:{line}:{col}" if line else "net.yaml"
    expected = f"{place}: {label}: {err.message}" + (f"; {allowed}" if allowed else "")
    assert str(err) == expected


# -- YAML and files ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "line", "col", "fragment"), [
    (VEC + "layers:\n  - {name: a, op: relu\n", 5, 1, "expected ',' or '}', but got '<stream end>'"),
    (VEC + "layers:\n  - name: a\n   op: relu\n", 5, 4, "expected <block end>"),
    (VEC + "layers:\n\t- {name: a, op: relu}\n", 4, 1, "found character '\\t' that cannot start any token"),
    (VEC + "layers:\n  - {name: a, op: relu}\n---\nname: x\n", 5, 1, "but found another document"),
    (VEC + "layers:\n  - {name: a, op: linear, out: !!python/object/apply:os.getcwd []}\n", 4, 32,
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.getcwd'"),
    (VEC + "layers: *nowhere\n", 3, 9, "found undefined alias 'nowhere'"),
])
def test_broken_yaml(text: str, line: int, col: int, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text, "net.yaml")
    err = info.value
    assert err.where == Where("net.yaml", line, col)
    assert err.message.startswith("not valid YAML: ") and fragment in err.message


@pytest.mark.parametrize(("text", "needle", "key"), [
    (VEC + "layers:\n  - {name: a, op: relu, name: b}\n", "name: b", "name"),
    (VEC + "name: u\nlayers:\n  - {name: a, op: relu}\n", "name: u", "name"),
    (VEC + "params: {w: 1, w: 2}\nlayers:\n  - {name: a, op: relu}\n", "w: 2", "w"),
])
def test_duplicate_yaml_keys(text: str, needle: str, key: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text, "net.yaml")
    assert info.value.where == Where("net.yaml", *_pos(text, needle))
    assert info.value.message == f"duplicate key {key!r}"


def test_non_string_key() -> None:
    text = VEC + "layers:\n  - {1: a, op: relu}\n"
    with pytest.raises(SpecError, match="key 1 is not a string") as info:
        parse(text, "net.yaml")
    assert info.value.where == Where("net.yaml", *_pos(text, "1: a"))


@pytest.mark.parametrize("text", ["- a\n- b\n", "hello\n", "", "# only a comment\n", "42\n"])
def test_document_not_a_mapping(text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text, "net.yaml")
    assert str(info.value) == ("net.yaml:1:1: a spec is a mapping with keys name, input, params, init, "
                               "output, blocks, layers")


def test_yaml_nested_too_deeply() -> None:
    with pytest.raises(SpecError, match="not valid YAML: nested too deeply"):
        parse(VEC + "layers: " + "[" * 400 + "]" * 400 + "\n", "net.yaml")


def test_yaml_special_character() -> None:
    with pytest.raises(SpecError, match="not valid YAML: unacceptable character #x0000"):
        parse(VEC + "layers: \x00\n", "net.yaml")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(SpecError) as info:
        load(path)
    assert info.value.where == Where(str(path))
    assert str(info.value) == f"{path}: cannot read file (No such file or directory)"


def test_directory_and_binary_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read file \(Is a directory\)"):
        load(tmp_path)
    binary = tmp_path / "net.yaml"
    binary.write_bytes(b"name: t\xff\n")
    with pytest.raises(SpecError, match=r"net.yaml: not UTF-8 text \(byte 7\)"):
        load(binary)


# -- formatting and caps -----------------------------------------------------------------

def test_where_and_spec_error_format() -> None:
    where = Where("net.yaml", 4, 15, 'layers[0] "a" (op: conv)')
    err = SpecError(where, "unknown op 'convv'", "known: conv, linear")
    assert str(err) == 'net.yaml:4:15: layers[0] "a" (op: conv): unknown op \'convv\'; known: conv, linear'
    assert str(Where("net.yaml")) == "net.yaml" and str(Where("f", 0, 0, "x")) == "f: x"
    assert str(SpecError(None, "bare")) == "bare" and isinstance(err, ScalecalcError)


def test_node_cap_counts_built_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "MAX_NODES", 50)
    text = VEC + RELU_BLOCK + "layers:\n  - {name: a, block: r, repeat: 100}\n"
    err = spec_error(text)
    assert err.where is not None and err.where.label == 'blocks.r.layers[0] "a.49.x" (op: relu)'
    assert err.message == "more than 50 layers after expanding blocks"


def test_block_labels_name_the_expanded_layer_in_nested_repeats() -> None:
    text = (VEC + "blocks:\n  inner:\n    params: {p: 0.5}\n    layers:\n"
         "      - {name: d, op: dropout, p: p}\n"
            "  outer:\n    params: {q: 0.5}\n    layers:\n"
                 "      - {name: i, block: inner, repeat: 2, with: {p: q}}\n"
            "layers:\n  - {name: s, block: outer, repeat: 3, with: {q: 0.5}, first: {q: 1.5}}\n")
    err = spec_error(text)
    assert err.where is not None
    assert err.where.label == 'blocks.inner.layers[0] "s.0.i.0.d" (op: dropout)'
    assert (err.where.line, err.where.col) == _pos(text, "p: p}")
    assert err.message == "p must be in [0, 1), got 1.5"


# -- the command line, as subprocesses ---------------------------------------------------

CLI = [sys.executable, "-c", "from scalecalc.cli import main; main()"]
ROOT = Path(__file__).resolve().parent.parent
LENET = str(ROOT / "specs" / "lenet_strided.yaml")

CLI_CASES: dict[str, tuple[str | None, list[str], str]] = {
    # name: (spec text, written to net.yaml and analysed, or None: args name the spec; args; stderr fragment)
    "unknown-op": (IMG + "layers:\n  - {name: a, op: convv, out: 4, kernel: 3}\n", [],
                   'error: net.yaml:4:15: layers[0] "a" (op: convv): unknown op \'convv\'; '
                   "known: conv, linear"),
    "broken-yaml": (VEC + "layers:\n  - {name: a, op: relu\n", [], "net.yaml:5:1: not valid YAML"),
    "hostile-expr": (VEC + "layers:\n"
         "  - {name: a, op: linear, out: '__import__(\"os\").system(\"touch {marker}\")'}\n",
                     [], "calls something other than a known function"),
    "hostile-tag": (VEC + "layers:\n"
         "  - {name: a, op: linear, out: !!python/object/apply:os.system ['touch {marker}']}\n",
                    [], "could not determine a constructor for the tag"),
    "huge-power": (VEC + "layers:\n  - {name: a, op: linear, out: 10**10**10}\n", [], "is too large"),
    "recursive-block": (VEC + "blocks:\n  r:\n    layers:\n      - {name: x, block: r}\n"
                        "layers:\n  - {name: a, block: r}\n", [], "blocks nested deeper than 8"),
    "kernel-too-large": (IMG + "layers:\n  - {name: a, op: conv, out: 4, kernel: 11}\n", [],
                         "kernel 11 is larger than the padded input"),
    "missing-file": (None, ["{tmp}/missing.yaml"],
                     "missing.yaml: cannot read file (No such file or directory)"),
    "set-unknown": (None, ["{lenet}", "--set", "q=3"],
                    "lenet_strided.yaml:6:1: --set: unknown parameter 'q'; known: w"),
    "set-malformed": (None, ["{lenet}", "--set", "w"], "--set 'w': expected NAME=VALUE"),
    "set-not-a-number": (None, ["{lenet}", "--set", "w=abc"], "'abc'"),
    "set-hostile": (None, ["{lenet}", "--set", "w=__import__('os').system('touch {marker}')"],
                    "calls something other than a known function"),
    "symbolic-unknown": (None, ["{lenet}", "--symbolic", "q"], "--symbolic: unknown parameter 'q'; known: w"),
    "init-unknown": (None, ["{lenet}", "--init", "bogus"],
                     "--init: unknown init scheme 'bogus'; known: geometric"),
    "compare-inits-bad-spec": (VEC + "layers:\n  - {name: a, op: dropout, p: 1}\n", ["--compare-inits"],
                               "p must be in [0, 1), got 1"),
}


SUBPROCESS_CASES = ("unknown-op", "hostile-expr", "hostile-tag", "set-not-a-number")


def _prepare(name: str, tmp: Path) -> tuple[list[str], Path, Path]:
    """Arguments after ``scalecalc``, the working directory, and the marker a hostile spec would create."""
    text, args, _ = CLI_CASES[name]
    marker = tmp / f"{name}.marker"
    (tmp / name).mkdir()
    args = [a.format(marker=marker, tmp=tmp, lenet=LENET) for a in args]
    if text is not None:
        (tmp / name / "net.yaml").write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
        args = ["net.yaml", *args]
    return ["analyze", *args], tmp / name, marker


def _check(name: str, code: Any, out: str, err: str, marker: Path) -> None:
    both = out + err
    assert code == 2, both
    assert "Traceback" not in both and "Error:" not in both.replace("error:", ""), both
    assert err.startswith("error: ") and CLI_CASES[name][2] in err, err
    assert len(both.splitlines()) < 25 and out == ""
    assert not marker.exists()  # nothing in a spec or option was run as Python


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_in_process(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    args, cwd, marker = _prepare(name, tmp_path)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["scalecalc", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    _check(name, info.value.code, captured.out, captured.err, marker)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start the subprocess cases at once (each pays ~0.5 s of imports) and collect the results."""
    tmp = tmp_path_factory.mktemp("cli")
    procs = {}
    for name in SUBPROCESS_CASES:
        args, cwd, marker = _prepare(name, tmp)
        cmd = [*CLI, *args]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        cwd=cwd), cmd, marker)
    results = {}
    for name, (proc, cmd, marker) in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = (subprocess.CompletedProcess(cmd, proc.returncode, out, err), marker)
    return results


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_subprocess(name: str, cli_runs: dict[str, Any]) -> None:
    result, marker = cli_runs[name]
    _check(name, result.returncode, result.stdout, result.stderr, marker)
