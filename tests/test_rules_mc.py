"""Monte Carlo tests of the rule registry against an independent float64 torch reference.

For every case of ``mc_cases`` the spec is analysed by scalecalc and the same network,
written out by hand below with ``torch.nn.functional``, is sampled: per draw fresh
zero-mean Gaussian weights (E[W²] = the node's init m2), zero biases, iid Gaussian inputs
with the spec's E[x₀²] and an iid N(0, 1) output gradient g (loss = Σ y·g). Per draw we
record, for every node, E[y²] and E[Δy²]; for every weighted layer the per-sample
E[ΔW²] over E[W²]; for every bias the per-sample E[Δb²] over E[y²] (Eq. 7); for a
learnable scale u, E[Δu²]/u². Per-sample gradients are formed from each layer's input and
output gradient (checked against autograd's batch sum), so each sample is one sample's
gradient as in the paper. A quantity's estimate is its mean over draws (for a ratio, the
ratio of the means), with a standard error from the draw-to-draw spread / √draws:
channels within one draw share weights and are not independent, so √(2/N) over all
N values would be optimistic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from scalecalc import activations, channels, exact, gaussian, kernel, normalise
from scalecalc.codegen import EMITTERS
from scalecalc.exact import EXACT
from scalecalc.graph import build
from scalecalc.propagate import Analysis, propagate
from scalecalc.rules import RULES
from scalecalc.spec import parse
from scalecalc.state import ExactRule, State
from tests.mc_cases import COMBO_CASES, EXACT_TOL, EXTRA_CASES, KNOWN_ISSUES, MC_CASES, N_SE, MCCase

torch = pytest.importorskip("torch")
F = torch.nn.functional
F64 = torch.float64
Tensor = Any  # torch.Tensor (torch is imported lazily above)


# --- the reference networks ---------------------------------------------------------------

@dataclass
class _Weighted:
    x: Tensor  # the layer's input
    w: Tensor
    window: dict[str, int] | None  # conv geometry for unfold; None for linear


@dataclass
class Net:
    """Builds one draw of a reference network and records its nodes and parameters."""

    m2: Mapping[str, float]  # E[W²] of each weighted node (its init's closed form)
    nodes: dict[str, Tensor] = field(default_factory=dict)
    weighted: dict[str, _Weighted] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    scales: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def node(self, name: str, y: Tensor) -> Tensor:
        y.retain_grad()
        self.nodes[name] = y
        return y

    def _weight(self, name: str, shape: tuple[int, ...]) -> Tensor:
        return (torch.randn(shape, dtype=F64) * math.sqrt(self.m2[name])).requires_grad_()

    def _bias(self, name: str, channels: int, bias: bool) -> Tensor | None:
        if not bias:
            return None
        self.biases[name] = torch.zeros(channels, dtype=F64, requires_grad=True)
        return self.biases[name]

    def linear(self, name: str, x: Tensor, out: int, bias: bool = True) -> Tensor:
        w, b = self._weight(name, (out, x.shape[1])), self._bias(name, out, bias)
        self.weighted[name] = _Weighted(x, w, None)
        return self.node(name, F.linear(x, w, b))

    def conv(self, name: str, x: Tensor, out: int, kernel: int, stride: int = 1, padding: int = 0,
             bias: bool = True) -> Tensor:
        w, b = self._weight(name, (out, x.shape[1], kernel, kernel)), self._bias(name, out, bias)
        window = {"kernel_size": kernel, "stride": stride, "padding": padding}
        self.weighted[name] = _Weighted(x, w, window)
        return self.node(name, F.conv2d(x, w, b, stride=stride, padding=padding))

    def bias(self, name: str, x: Tensor) -> Tensor:
        b = self._bias(name, x.shape[1], True)
        return self.node(name, x + b.view(1, -1, *[1] * (x.dim() - 2)))

    def scale(self, name: str, x: Tensor, value: float, learnable: bool = False) -> Tensor:
        u = torch.tensor(value, dtype=F64, requires_grad=learnable)
        if learnable:
            self.scales[name] = (x, u)
        return self.node(name, u * x)


# One function per case, mirroring its spec in mc_cases.py layer by layer (by hand: the
# test checks that node names and shapes agree with scalecalc's graph).

def _linear(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.linear("fc1", x, 128)))
    return net.linear("fc2", h, 512)


def _conv(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.conv("conv1", x, 32, 3, stride=2, padding=1)))
    return net.conv("conv2", h, 128, 2, stride=2)


def _conv_same(net: Net, x: Tensor) -> Tensor:
    return net.conv("conv", x, 64, 5, padding=2)


def _relu(net: Net, x: Tensor) -> Tensor:
    return net.linear("fc", net.node("relu", F.relu(x)), 1024)


def _leaky_relu(net: Net, x: Tensor) -> Tensor:
    h = net.node("leaky", F.leaky_relu(net.conv("conv1", x, 32, 3), 0.3))
    return net.conv("conv2", h, 128, 2, stride=2)


def _dropout(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.linear("fc1", x, 256)))
    h = net.node("drop", F.dropout(h, p=0.3, training=True))
    return net.linear("fc2", h, 512)


def _scale(net: Net, x: Tensor) -> Tensor:
    h = net.scale("fixed", net.linear("fc1", x, 64), 0.5)
    h = net.node("relu", F.relu(h))
    return net.scale("gain", net.linear("fc2", h, 512), 1.5, learnable=True)


def _identity(net: Net, x: Tensor) -> Tensor:
    h = net.node("id", net.linear("fc1", x, 128).clone())
    h = net.node("relu", F.relu(h))
    return net.linear("fc2", h, 512)


def _flatten(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.conv("conv", x, 32, 3)))
    h = net.node("flat", h.flatten(1))
    return net.linear("fc", h, 256)


def _bias(net: Net, x: Tensor) -> Tensor:
    h = net.bias("b", net.conv("conv1", x, 32, 3, bias=False))
    h = net.node("relu", F.relu(h))
    return net.conv("conv2", h, 128, 2, stride=2)


def _add(net: Net, x: Tensor) -> Tensor:
    a, b = net.linear("fa", x, 128), net.linear("fb", x, 128)
    h = net.node("sum", 0.6 * a + 1.5 * b)
    h = net.node("relu", F.relu(h))
    return net.linear("fc", h, 512)


def _concat(net: Net, x: Tensor) -> Tensor:
    a, b = net.conv("ca", x, 128, 1), net.conv("cb", x, 64, 1)
    h = net.node("cat", torch.cat([a, b], dim=1))
    h = net.node("relu", F.relu(h))
    return net.conv("conv", h, 128, 2, stride=2)


def _avgpool(net: Net, x: Tensor) -> Tensor:
    h = net.conv("conv1", x, 64, 1, bias=False)
    h = net.node("pool", F.avg_pool2d(h, 3, stride=2, padding=1))  # count_include_pad=True
    return net.conv("conv2", h, 128, 1)


def _global_avgpool(bias: bool) -> Callable[[Net, Tensor], Tensor]:
    def ref(net: Net, x: Tensor) -> Tensor:
        h = net.conv("conv", x, 64, 3, bias=bias)
        h = net.node("gap", h.mean((2, 3)))
        return net.linear("fc", h, 512)

    return ref


def _maxpool(net: Net, x: Tensor) -> Tensor:
    h = net.conv("conv1", x, 32, 1)
    h = net.node("pool", F.max_pool2d(h, 3, stride=2))
    return net.conv("conv2", h, 512, 1)


def _affine(n: int) -> tuple[Tensor, Tensor]:
    return torch.ones(n, dtype=F64), torch.zeros(n, dtype=F64)  # the norm's affine at init


def _batchnorm(net: Net, x: Tensor) -> Tensor:
    h = net.conv("conv1", x, 32, 3, bias=False)
    h = _train_bn(net, "bn", h)
    h = net.node("relu", F.relu(h))
    return net.conv("conv2", h, 256, 1)


def _layernorm(net: Net, x: Tensor) -> Tensor:
    h = net.linear("fc1", x, 256)
    h = net.node("ln", F.layer_norm(h, (256,), *_affine(256), eps=1e-5))
    h = net.node("relu", F.relu(h))
    return net.linear("fc2", h, 512)


def _smooth(act: Callable[[Tensor], Tensor]) -> Callable[[Net, Tensor], Tensor]:
    def ref(net: Net, x: Tensor) -> Tensor:
        h = net.node("act", act(net.linear("fc1", x, 256)))
        return net.linear("fc2", h, 512)

    return ref


def _relu_then_pool(pool: Callable[[Tensor], Tensor]) -> Callable[[Net, Tensor], Tensor]:
    def ref(net: Net, x: Tensor) -> Tensor:
        h = net.node("relu", F.relu(net.conv("conv1", x, 64, 3, bias=False)))
        h = net.node("pool", pool(h))
        return net.conv("conv2", h, 256, 1)

    return ref


def _relu_avgpool_relu(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.conv("conv1", x, 64, 3, bias=False)))
    h = net.node("relu2", F.relu(net.node("pool", F.avg_pool2d(h, 2))))
    return net.conv("conv2", h, 256, 1)


def _residual_add(net: Net, x: Tensor) -> Tensor:
    stem = net.conv("stem", x, 64, 1, bias=False)
    h = net.node("relu1", F.relu(stem))
    h = net.node("relu2", F.relu(net.conv("conv1", h, 64, 3, padding=1, bias=False)))
    h = net.node("merge", stem + net.conv("conv2", h, 64, 1, bias=False))
    return net.conv("head", net.node("relu3", F.relu(h)), 256, 1)


def _concat_correlated(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.conv("conv1", x, 64, 1, bias=False)))
    h = net.node("cat", torch.cat([h, net.conv("grow", h, 32, 1, bias=False)], dim=1))
    return net.conv("conv2", h, 256, 1)


def _small_map_pooled_gradient(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(net.conv("ca", x, 64, 1, bias=False)))
    h = net.conv("c1", net.conv("c0", h, 64, 1, bias=False), 64, 3, padding=1, bias=False)
    return net.linear("fc", net.node("gap", h.mean((2, 3))), 256)


def _padded_chain_pooled_gradient(net: Net, x: Tensor) -> Tensor:
    h = net.node("r0", F.relu(net.conv("c0", x, 96, 1, bias=False)))
    h = net.node("r1", F.relu(net.conv("c1", h, 96, 3, padding=1, bias=False)))
    h = net.node("r2", F.relu(net.conv("c2", h, 96, 3, padding=1)))
    return net.linear("fc", net.node("gap", h.mean((2, 3))), 256)


def _relu_maxpool_pooled(net: Net, x: Tensor) -> Tensor:
    h = net.node("r1", F.relu(net.conv("c1", x, 96, 1, bias=False)))
    h = net.node("r2", F.relu(net.conv("c2", h, 96, 3, padding=1, bias=False)))
    h = net.node("gap", net.node("pool", F.max_pool2d(h, 2)).mean((2, 3)))
    return net.linear("fc", h, 256)


def _maxpool_chain(net: Net, x: Tensor) -> Tensor:
    h = net.node("r1", F.relu(net.conv("c1", x, 128, 3, padding=1, bias=False)))
    h = net.node("r2", F.relu(net.conv("c2", net.node("p1", F.max_pool2d(h, 2)), 128, 3, padding=1, bias=False)))
    return net.linear("fc", net.node("flat", net.node("p2", F.max_pool2d(h, 2)).flatten(1)), 256)


def _train_bn(net: Net, name: str, h: Tensor) -> Tensor:
    return net.node(name, F.batch_norm(h, None, None, *_affine(h.shape[1]), training=True, eps=1e-5))


def _conv_bn_relu_conv(width: int, padding: int = 0) -> Callable[[Net, Tensor], Tensor]:
    """conv1 (1×1, ``width`` channels) → batchnorm → ReLU → conv2 (1×1, 256 channels)."""
    def reference(net: Net, x: Tensor) -> Tensor:
        h = _train_bn(net, "bn", net.conv("conv1", x, width, 1, padding=padding, bias=False))
        return net.conv("conv2", net.node("relu", F.relu(h)), 256, 1)

    return reference


_batchnorm_small_batch, _batchnorm_narrow_conv = _conv_bn_relu_conv(128), _conv_bn_relu_conv(256)
_batchnorm_padded_border = _conv_bn_relu_conv(256, padding=1)


def _batchnorm_kept_offsets(net: Net, x: Tensor) -> Tensor:
    h = net.node("r0", F.relu(net.conv("c0", x, 128, 1, bias=False)))
    for i in (1, 2):
        h = net.node(f"r{i}", F.relu(_train_bn(net, f"bn{i}", net.conv(f"c{i}", h, 128, 3, padding=1, bias=False))))
    return net.linear("fc", net.node("flat", h.flatten(1)), 256)


def _batchnorm_offsets_pooled(net: Net, x: Tensor) -> Tensor:
    h = net.node("r0", F.relu(net.conv("c0", x, 128, 1, bias=False)))
    for i in (1, 2):
        h = net.node(f"r{i}", F.relu(_train_bn(net, f"bn{i}", net.conv(f"c{i}", h, 128, 3, padding=1, bias=False))))
    return net.linear("fc", net.node("gap", h.mean((2, 3))), 64)


def _post_activation_stack(net: Net, x: Tensor) -> Tensor:
    h = net.node("r0", F.relu(_train_bn(net, "bn0", net.conv("c0", x, 256, 1, bias=False))))
    for i in range(1, 5):
        b = _train_bn(net, f"bn{i}", net.conv(f"c{i}", h, 256, 1, bias=False))
        h = net.node(f"r{i}", F.relu(net.node(f"m{i}", h + b)))
    return net.linear("fc", net.node("flat", h.flatten(1)), 64)


def _maxpool_leaky_odd(net: Net, x: Tensor) -> Tensor:
    h = net.node("r1", F.leaky_relu(net.conv("c1", x, 128, 3, padding=1, bias=False), 0.2))
    h = net.conv("c2", net.node("p1", F.max_pool2d(h, 2)), 128, 3, padding=1, bias=False)
    return net.linear("fc", net.node("flat", net.node("p2", F.max_pool2d(h, 2)).flatten(1)), 256)


def _batchnorm_then_gelu(net: Net, x: Tensor) -> Tensor:
    h = net.conv("conv1", x, 32, 3, bias=False)
    h = _train_bn(net, "bn", h)
    return net.conv("conv2", net.node("act", F.gelu(h)), 256, 1)


def _batchnorm_pooled_gradient(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu1", F.relu(net.conv("conv1", x, 256, 1, bias=False)))
    h = net.node("relu2", F.relu(net.conv("conv2", h, 256, 1, bias=False)))
    h = net.conv("conv3", h, 64, 1, bias=False)
    h = _train_bn(net, "bn", h)
    return net.linear("fc", net.node("gap", h.mean((2, 3))), 256)


def _batchnorm_relu_pooled(net: Net, x: Tensor) -> Tensor:
    h = net.node("relu", F.relu(_train_bn(net, "bn", net.conv("conv1", x, 256, 1, bias=False))))
    return net.linear("fc", net.node("gap", h.mean((2, 3))), 256)


def _batchnorm_low_rank_input(net: Net, x: Tensor) -> Tensor:
    h = net.node("r0", F.relu(net.conv("c0", x, 16, 1, bias=False)))
    h = net.node("r1", F.relu(_train_bn(net, "bn", net.conv("proj", h, 32, 1, stride=2, bias=False))))
    return net.linear("fc", net.node("flat", h.flatten(1)), 64)


def _batchnorm_after_avgpool(net: Net, x: Tensor) -> Tensor:
    h = net.node("r0", F.relu(_train_bn(net, "bn0", net.conv("c0", x, 64, 1, bias=False))))
    h = net.node("tpool", F.avg_pool2d(net.conv("tconv", h, 32, 1, bias=False), 2))
    h = net.node("r1", F.relu(_train_bn(net, "bn1", h)))
    return net.linear("fc", net.node("gap", h.mean((2, 3))), 64)


def _concat_then_batchnorm(net: Net, x: Tensor) -> Tensor:
    h = net.conv("conv1", x, 128, 1, bias=False)
    h = net.node("cat", torch.cat([h, net.conv("grow", h, 32, 1, bias=False)], dim=1))
    h = _train_bn(net, "bn", h)
    return net.conv("conv2", net.node("relu", F.relu(h)), 256, 1)


def _post_activation_shortcut(net: Net, x: Tensor) -> Tensor:
    h = net.conv("conv1", x, 256, 1, bias=False)
    h = net.node("relu1", F.relu(net.node("bn1", F.batch_norm(h, None, None, *_affine(256), training=True))))
    b = net.node("bn2", F.batch_norm(net.conv("conv2", h, 256, 1, bias=False), None, None, *_affine(256),
                                     training=True))
    return net.conv("conv3", net.node("relu2", F.relu(net.node("merge", h + b))), 256, 1)


REFERENCES: dict[str, Callable[[Net, Tensor], Tensor]] = {
    "relu_then_avgpool": _relu_then_pool(lambda h: F.avg_pool2d(h, 2)),
    "relu_then_maxpool": _relu_then_pool(lambda h: F.max_pool2d(h, 2)),
    "relu_avgpool_relu": _relu_avgpool_relu,
    "residual_add": _residual_add, "concat_correlated": _concat_correlated,
    "small_map_pooled_gradient": _small_map_pooled_gradient,
    "padded_chain_pooled_gradient": _padded_chain_pooled_gradient, "relu_maxpool_pooled": _relu_maxpool_pooled,
    "maxpool_chain": _maxpool_chain, "maxpool_leaky_odd": _maxpool_leaky_odd,
    "batchnorm_small_batch": _batchnorm_small_batch, "batchnorm_kept_offsets": _batchnorm_kept_offsets,
    "batchnorm_offsets_pooled": _batchnorm_offsets_pooled,
    "post_activation_stack": _post_activation_stack,
    "batchnorm_narrow_conv": _batchnorm_narrow_conv, "batchnorm_padded_border": _batchnorm_padded_border,
    "batchnorm_then_gelu": _batchnorm_then_gelu,
    "batchnorm_pooled_gradient": _batchnorm_pooled_gradient, "batchnorm_relu_pooled": _batchnorm_relu_pooled,
    "concat_then_batchnorm": _concat_then_batchnorm, "batchnorm_low_rank_input": _batchnorm_low_rank_input,
    "batchnorm_after_avgpool": _batchnorm_after_avgpool,
    "post_activation_shortcut": _post_activation_shortcut,
    "linear": _linear, "conv": _conv, "conv_same": _conv_same, "relu": _relu,
    "leaky_relu": _leaky_relu, "dropout": _dropout, "scale": _scale, "identity": _identity,
    "flatten": _flatten, "bias": _bias, "add": _add, "concat": _concat, "avgpool": _avgpool,
    "global_avgpool": _global_avgpool(bias=False), "bias_before_pool": _global_avgpool(bias=True),
    "maxpool": _maxpool, "batchnorm": _batchnorm, "layernorm": _layernorm,
    "tanh": _smooth(torch.tanh), "sigmoid": _smooth(torch.sigmoid), "gelu": _smooth(F.gelu),
}

CASES: dict[str, tuple[str, MCCase]] = {**{op: (op, c) for op, c in MC_CASES.items()}, **EXTRA_CASES}
COMBOS: dict[str, tuple[str, MCCase]] = {name: ("combination", c) for name, c in COMBO_CASES.items()}
ALL_CASES = {**CASES, **KNOWN_ISSUES, **COMBOS}


# --- measurement ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    mean: Mapping[tuple[str, str], float]  # (node, quantity) → estimate over the draws
    se: Mapping[tuple[str, str], float]  # its standard error
    shapes: Mapping[str, str]  # node → per-sample shape, written like scalecalc's


def _per_sample_weight_m2(layer: _Weighted, dy: Tensor) -> float:
    """E[ΔW²] of one sample's gradient, averaged over the batch; the per-sample gradients
    must add up to autograd's W.grad."""
    x = layer.x.detach()
    if layer.window is None:  # ΔW_b = Δy_b ⊗ x_b, so E[ΔW_b²] = E[Δy_b²]·E[x_b²]
        assert torch.allclose(dy.T @ x, layer.w.grad)
        return (dy.pow(2).mean(1) * x.pow(2).mean(1)).mean().item()
    cols = F.unfold(x, **layer.window)  # (batch, in·k², positions)
    grads = torch.einsum("bop,bkp->bok", dy.flatten(2), cols)
    assert torch.allclose(grads.sum(0), layer.w.grad.reshape(grads.shape[1:]))
    return grads.pow(2).mean().item()


def _draw(case: MCCase, reference: Callable[[Net, Tensor], Tensor], net: Net, in_shape: tuple[int, ...],
          in_m2: float) -> dict[tuple[str, str], tuple[float, float]]:
    """One draw: each quantity as (numerator, denominator); moments have denominator 1."""
    x = (torch.randn((case.batch, *in_shape), dtype=F64) * math.sqrt(in_m2)).requires_grad_()
    net.node("input", x)
    y = reference(net, x)
    assert y is net.nodes[list(net.nodes)[-1]], "the reference must return its last node"
    (y * torch.randn_like(y)).sum().backward()
    out: dict[tuple[str, str], tuple[float, float]] = {}
    m2 = {name: t.detach().pow(2).mean().item() for name, t in net.nodes.items()}
    for name, t in net.nodes.items():
        out[name, "forward_m2"] = (m2[name], 1.0)
        out[name, "backward_m2"] = (t.grad.pow(2).mean().item(), 1.0)
    for name, layer in net.weighted.items():  # E[ΔW²] / E[W²]
        grad = (layer.w.grad.pow(2).mean().item() / case.batch if case.batch_gradient
                else _per_sample_weight_m2(layer, net.nodes[name].grad))
        out[name, "gamma"] = (grad, layer.w.detach().pow(2).mean().item())
    for name, b in net.biases.items():  # E[Δb²] / E[y²], Δb = one sample's Δy summed over positions
        dy = net.nodes[name].grad
        db = dy.flatten(2).sum(2) if dy.dim() > 2 else dy
        assert torch.allclose(db.sum(0), b.grad)
        out[name, "gamma_bias"] = (db.pow(2).mean().item(), m2[name])
    for name, (inp, u) in net.scales.items():  # E[Δu²] / u²
        du = (inp.detach() * net.nodes[name].grad).flatten(1).sum(1)
        assert torch.allclose(du.sum(), u.grad)
        out[name, "gamma"] = (du.pow(2).mean().item(), u.item() ** 2)
    return out


@functools.cache
def measure(name: str) -> Measurement:
    """Sample case ``name``: every quantity and its standard error over the draws.

    A ratio of expectations (γ, γ_bias) is estimated as the ratio of the draw means, not
    the mean of per-draw ratios (which Jensen's inequality biases); its standard error is
    the delta method's, i.e. the spread of numerator − ratio·denominator.
    """
    _, case = ALL_CASES[name]
    net_spec = build(parse(case.spec, f"{name}.yaml"))
    m2 = {n.name: float(n.init.m2) for n in net_spec.nodes if n.init is not None}
    s = net_spec.input_shape
    in_shape = (s.channels, s.h, s.w) if s.spatial else (s.channels,)
    draws, shapes = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tensors are small: threads only add overhead
    try:
        for d in range(case.draws):
            torch.manual_seed(100_000 * case.seed + d)
            net = Net(m2)
            draws.append(_draw(case, REFERENCES[name], net, in_shape, float(net_spec.input_m2)))
            shapes = {n: "×".join(map(str, t.shape[1:])) for n, t in net.nodes.items()}
    finally:
        torch.set_num_threads(threads)
    keys = list(draws[0])
    num, den = torch.tensor([[d[k] for k in keys] for d in draws], dtype=F64).unbind(2)
    ratio = num.mean(0) / den.mean(0)
    se = ((num - ratio * den) / den.mean(0)).std(0) / math.sqrt(case.draws)
    return Measurement(dict(zip(keys, ratio.tolist())), dict(zip(keys, se.tolist())), shapes)


# --- comparison ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    node: str
    quantity: str  # a NodeResult field
    predicted: float
    measured: float
    se: float

    @property
    def rel_err(self) -> float:
        return abs(self.predicted - self.measured) / abs(self.measured)

    @property
    def rel_se(self) -> float:
        return self.se / abs(self.measured)

    def __str__(self) -> str:
        return (f"{self.node}.{self.quantity}: predicted {self.predicted:.5g}, measured "
                f"{self.measured:.5g} ± {self.se:.2g} (off {self.rel_err:.2%}, "
                f"{abs(self.predicted - self.measured) / self.se:.1f} SE)")


#: predicted field → the measured quantity it is compared with (both γ forms vs one ratio)
_MEASURED_AS = {"forward_m2": "forward_m2", "backward_m2": "backward_m2", "gamma": "gamma",
                "gamma_extrinsic": "gamma", "gamma_bias": "gamma_bias"}


def checks(analysis: Analysis, meas: Measurement) -> list[Check]:
    """Pair every prediction of ``analysis`` with its measurement; the structures must agree."""
    assert set(meas.shapes) == {n.name for n in analysis.nodes}, "reference and spec have different nodes"
    out = []
    for n in analysis.nodes:
        assert meas.shapes[n.name] == n.shape, f"{n.name}: torch shape {meas.shapes[n.name]}, spec {n.shape}"
        for field_name, quantity in _MEASURED_AS.items():
            predicted = getattr(n, field_name)
            key = (n.name, quantity)
            assert (predicted is None) == (key not in meas.mean), f"{key}: predicted and measured sets differ"
            if predicted is not None:
                out.append(Check(n.name, field_name, float(predicted), meas.mean[key], meas.se[key]))
    return out


#: what N_SE standard errors may be at most, so that a real 3% error cannot hide in the noise
PRECISION = 2 / 3 * EXACT_TOL


def failures(found: list[Check], tol: float, n_se: float | None) -> list[str]:
    """Checks off by more than ``tol`` (relative) or, if given, by more than ``n_se`` SE."""
    return [str(c) for c in found
            if c.rel_err > tol or (n_se is not None and abs(c.predicted - c.measured) > n_se * c.se)]


def assert_agrees(found: list[Check], tol: float, n_se: float | None) -> None:
    bad = failures(found, tol, n_se)
    assert not bad, "rule predictions disagree with torch:\n  " + "\n  ".join(bad)


def analyse(name: str, calculus: str = "paper") -> Analysis:
    return propagate(build(parse(ALL_CASES[name][1].spec, f"{name}.yaml")), calculus)


# --- tests ---------------------------------------------------------------------------------

def test_every_rule_has_a_case() -> None:
    assert set(MC_CASES) == set(RULES) == set(EXACT) == set(EMITTERS)
    assert set(REFERENCES) == set(ALL_CASES)
    for name, (op, case) in {**CASES, **KNOWN_ISSUES}.items():
        assert (case.tol is None) == RULES[op].exact, f"{name}: give a tolerance iff the rule is approximate"
        assert op in {n.op for n in analyse(name).nodes}, f"case {name} does not use {op}"


@pytest.mark.parametrize("calculus", ["paper", "exact", "averaged"])
@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_torch(name: str, calculus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rule against torch: the paper's, the exact calculus', and the exact calculus'
    averaged rules alone ("averaged": no map held by the spatial kernel, which otherwise
    replaces them on these small maps and would hide an error in them)."""
    op, case = CASES[name]
    if calculus == "averaged":
        monkeypatch.setattr(kernel, "CAP", 0)
    analysis = analyse(name, "paper" if calculus == "paper" else "exact")
    found = checks(analysis, measure(name))
    assert len(found) >= 2 * len(analysis.nodes)
    if RULES[op].exact:
        # the case must stay inside the exact rules' assumptions, and be precise enough
        assert all(n.exact for n in analysis.nodes), [n.notes for n in analysis.nodes if not n.exact]
        coarse = [str(c) for c in found if N_SE * c.rel_se > PRECISION]
        assert not coarse, f"too few samples to test {EXACT_TOL:.0%}: {coarse}"
        assert_agrees(found, EXACT_TOL, N_SE)
    else:
        assert case.tol is not None
        assert_agrees(found, case.tol, None)


def test_same_conv_needs_border_taps() -> None:
    """5×5 'same' conv on 32×32: the paper's n·k²·E[W²]·E[x²] (Eqs. 9–10, no border
    correction) is measurably off, while the tap-counted rule matches (negative control)."""
    analysis, meas = analyse("conv_same"), measure("conv_same")
    conv = analysis["conv"]
    node = analysis.network.node("conv")
    n_in, n_out, k2, m2 = node.in_shapes[0].channels, node.shape.channels, 25, float(node.init.m2)
    paper = {("conv", "forward_m2"): n_in * k2 * m2 * float(analysis["input"].forward_m2),
             ("input", "backward_m2"): n_out * k2 * m2 * float(conv.backward_m2)}
    ours = {("conv", "forward_m2"): conv.forward_m2, ("input", "backward_m2"): analysis["input"].backward_m2}
    for key, value in paper.items():
        wrong = Check(*key, value, meas.mean[key], meas.se[key])
        right = Check(*key, float(ours[key]), meas.mean[key], meas.se[key])
        assert wrong.rel_err > 0.05 and failures([wrong], EXACT_TOL, N_SE), wrong
        assert not failures([right], EXACT_TOL, N_SE), right


_PLANTED = {
    "relu forward 0.6·E[x²]": ("relu", "relu", lambda rule: replace(
        rule, forward=lambda node, xs: 0.6 * xs[0])),
    "global_avgpool backward 1/ρ²": ("global_avgpool", "global_avgpool", lambda rule: replace(
        rule, backward=lambda node, xs, dy: (dy / node.in_shapes[0].positions,))),
    "avgpool without border taps": ("avgpool", "avgpool", lambda rule: replace(
        rule, forward=lambda node, xs: xs[0] / node.attrs["k2"])),
}


@pytest.mark.parametrize("planted", list(_PLANTED))
def test_planted_wrong_rule_is_caught(planted: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a wrong rule in the registry makes the comparison fail."""
    name, op, wrong = _PLANTED[planted]
    monkeypatch.setitem(RULES, op, wrong(RULES[op]))
    with pytest.raises(AssertionError, match="rule predictions disagree"):
        assert_agrees(checks(analyse(name), measure(name)), EXACT_TOL, N_SE)


@pytest.mark.xfail(strict=True, reason="γ_bias (Eq. 7) assumes gradients uncorrelated across positions")
@pytest.mark.parametrize("name", list(KNOWN_ISSUES))
def test_known_issue(name: str) -> None:
    """Limitations of the paper's calculus, kept visible: these fail by design."""
    found = [c for c in checks(analyse(name), measure(name)) if c.quantity == "gamma_bias"]
    assert_agrees(found, EXACT_TOL, N_SE)


@pytest.mark.parametrize("name", list(KNOWN_ISSUES))
def test_exact_calculus_fixes_known_issue(name: str) -> None:
    """The exact calculus counts the pair terms of a pooled gradient in E[Δb²]."""
    found = [c for c in checks(analyse(name, "exact"), measure(name)) if c.quantity == "gamma_bias"]
    assert found and all(c.rel_err < 0.05 for c in found) and not failures(found, 1.0, N_SE), found


@pytest.mark.parametrize("name", list(COMBO_CASES))
def test_exact_calculus_on_combinations(name: str) -> None:
    """Means after ReLU kept by pooling, max pooling after a ReLU, an identity shortcut
    around a ReLU-conv branch, concat of correlated inputs, BN then GELU: the exact calculus
    matches torch (the paper's extrinsic γ, reported beside it, is not its prediction)."""
    case, analysis = COMBO_CASES[name], analyse(name, "exact")
    found = [c for c in checks(analysis, measure(name)) if c.quantity != "gamma_extrinsic"]
    if all(n.exact for n in analysis.nodes):
        coarse = [str(c) for c in found if N_SE * c.rel_se > EXACT_TOL]
        assert not coarse, f"too few samples to test {EXACT_TOL:.0%}: {coarse}"
        assert_agrees(found, EXACT_TOL, N_SE)
    else:
        assert case.tol is not None, "a case with approximate rules needs a tolerance"
        assert_agrees(found, case.tol, None)


def _averaged_concat() -> ExactRule:
    """concat as one group of channels: the channel-weighted average of its inputs."""
    def forward(node: Any, xs: Any) -> State:
        sizes = [s.channels for s in node.in_shapes]
        return State(sum(n * x.m for n, x in zip(sizes, xs)) / sum(sizes),
                     sum(n * x.k for n, x in zip(sizes, xs)) / sum(sizes))

    return ExactRule(forward, lambda node, xs, dy: (State(dy.m, dy.k),) * len(node.inputs))


def _decoupling_batchnorm() -> ExactRule:
    """batchnorm whose gradient neither keeps a shared part nor couples the samples."""
    rule = EXACT["batchnorm"]
    return ExactRule(rule.forward, lambda node, xs, dy: (State(rule.backward(node, xs, dy)[0].m, 0),))


def _gaussian_add() -> ExactRule:
    """add whose output is taken as Gaussian (no law kept for the ReLU that reads it)."""
    rule = EXACT["add"]
    return ExactRule(lambda node, xs: replace(rule.forward(node, xs), law=None), rule.backward)


def _misses(name: str, worst: float | None = None) -> None:
    """Under a patched (simpler) rule the exact calculus must fail combination ``name``: some
    check off by more than ``worst`` and the tolerance check raising."""
    found = [c for c in checks(analyse(name, "exact"), measure(name)) if c.quantity != "gamma_extrinsic"]
    if worst is not None:
        assert max(c.rel_err for c in found) > worst
    with pytest.raises(AssertionError, match="rule predictions disagree"):
        assert_agrees(found, COMBO_CASES[name].tol or 0, None)


@pytest.mark.parametrize(("name", "op", "simpler", "worst"), [
    ("batchnorm_pooled_gradient", "batchnorm", _decoupling_batchnorm, 0.9),
    ("concat_then_batchnorm", "concat", _averaged_concat, 1.2),
    ("post_activation_shortcut", "add", _gaussian_add, 0.03),
])
def test_simpler_rules_miss_batchnorm_combinations(monkeypatch: pytest.MonkeyPatch, name: str, op: str,
                                                  simpler: Callable[[], ExactRule], worst: float) -> None:
    """Negative control: the batchnorm combinations fail with the simpler rules — a BN
    gradient with no shared part and no batch coupling (conv3's γ comes out 2× too high, as
    if the ReLU mean stayed in its batch gradient; conv2's 26%), concat groups averaged (the
    narrow group's gradient 2.4× too high, the concat's 28% too low), and a shortcut sum
    taken as Gaussian (relu2's E[x²] 3% low; without the correlated gates relu1's gradient
    4% low)."""
    monkeypatch.setitem(EXACT, op, simpler())
    _misses(name, worst)


def test_batch_sampled_variance_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a batchnorm that takes its σ̂² as the channel's exact variance (no
    sample-variance factor) passes about 13% too little gradient over 16 values per channel."""
    monkeypatch.setattr(normalise, "sampled_variance", lambda values: 1)
    _misses("batchnorm_small_batch", 0.1)


def test_kept_offsets_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: without the offsets a batchnorm keeps over a 4×4 map (σ² taken as
    m − k, the channels' σ² spread only by their weights, no profile), the gradient below the
    two batchnorms comes out about 5% low and c2's E[x²] 2% high."""
    monkeypatch.setattr(exact, "conv_offsets", lambda *args: None)
    _misses("batchnorm_kept_offsets", 0.045)


def test_same_position_samples_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: pairing two samples at one position by k, as two positions, where a
    batchnorm kept offsets over positions and a pool shares the gradient, puts c2's γ 4.5% high."""
    monkeypatch.setattr(exact, "same_position", lambda node, x, dy: 0)
    _misses("batchnorm_offsets_pooled", 0.035)


def test_post_activation_stack_needs_the_law_of_its_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: each shortcut sum taken as a Gaussian of its moments (the gate chain
    then weighs the wrong law), the gradients below the four blocks come out 9% high."""
    own_part, cached = gaussian._own_part, (gaussian.rectified_sum, gaussian._gated_law)
    monkeypatch.setattr(gaussian, "_own_part", lambda u, inner: own_part(u, None))
    for f in cached:
        f.cache_clear()
    try:
        _misses("post_activation_stack", 0.05)
    finally:
        for f in cached:
            f.cache_clear()


def test_post_activation_stack_needs_the_gate_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: each shortcut's gate paired only with the next one's, the bottom of
    the stack gets 3.7% too little gradient."""
    weight = activations.chain_weight
    monkeypatch.setattr(activations, "chain_weight", lambda law, c, rest, parts: weight(law, c, 1.0, ()))
    _misses("post_activation_stack", 0.03)


def test_own_weights_spread_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a conv of 6 inputs under a batchnorm that sends back E[W²]·E[1/σ_c²]
    (as if its weights and its channels' variances were independent) sends 50% too much."""
    monkeypatch.setattr(exact, "despread", lambda dy: (dy, None))
    _misses("batchnorm_narrow_conv", 0.4)


def test_padded_border_degrees_of_freedom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: counting a channel's χ² by the mean taps of an output (6·25/49 for a
    1×1 conv with padding 1 on 5×5) instead of by the weights it sums (6) spreads σ_c² more
    than it is, and the conv's gradient comes out about 2× too large."""
    monkeypatch.setattr(exact, "_dof", lambda node: node.attrs["n_in"] * node.attrs["taps"] / node.shape.positions)
    _misses("batchnorm_padded_border", 0.4)


def test_projection_of_a_pooled_relu_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a batchnorm whose projection on ŷ takes only the diagonal 1/M, as if
    the gradient above were uncorrelated with ŷ, sends 1/(π·B) = 4% too much under a BN-ReLU-pool."""
    monkeypatch.setattr(normalise, "projection", lambda dy, positions, batch: 0)
    _misses("batchnorm_relu_pooled", 0.03)


def test_covarying_channels_spread_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: taking a 16-wide layer's channels as independent, a batchnorm reading
    them through a 1×1 conv has E[1/σ_c²] too small, and the gradient below it comes out 5–6% low."""
    monkeypatch.setattr(channels, "cross", lambda node, xs, out: None)
    _misses("batchnorm_low_rank_input", 0.04)


@pytest.mark.parametrize("name", ["padded_chain_pooled_gradient", "maxpool_chain"])
def test_averaged_pairs_miss_padded_maps(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Negative control for the spatial kernel: with every map too large to hold (CAP = 0) the
    calculus falls back to the covariance of two positions averaged over all pairs, and the
    shared gradient and γ of the padded convs come out several percent low; under max pools
    on small maps, forward and backward moments 8–10% low."""
    monkeypatch.setattr(kernel, "CAP", 0)
    _misses(name)


def test_pooled_relu_mean_reaches_the_next_relu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: an average pool that drops its input's mean hands the next ReLU a
    centred input, which halves a non-negative signal (E[x²] off by 2×)."""
    rule = EXACT["avgpool"]
    monkeypatch.setitem(EXACT, "avgpool", ExactRule(lambda node, xs: replace(rule.forward(node, xs), mean=0),
                                                    rule.backward))
    _misses("relu_avgpool_relu", 0.4)


@pytest.mark.parametrize("name", ["relu_then_avgpool", "relu_then_maxpool"])
def test_paper_calculus_misses_pooled_relu(name: str) -> None:
    """Negative control for the combinations: after a pooled ReLU the paper's rules are off
    by about 2× (E[x²] above the pool, γ above and below it), far outside any tolerance."""
    found = checks(analyse(name, "paper"), measure(name))
    assert max(c.rel_err for c in found) > 0.4
    with pytest.raises(AssertionError, match="rule predictions disagree"):
        assert_agrees(found, 0.05, None)


@pytest.mark.parametrize(("size", "kernel", "stride", "padding"),
                         [(2, 3, 1, 1), (4, 3, 1, 1), (5, 3, 2, 1), (9, 7, 2, 3), (6, 2, 2, 0), (1, 3, 1, 1)])
def test_common_taps_match_brute_force(size: int, kernel: int, stride: int, padding: int) -> None:
    """S = Σ over ordered output pairs of the taps real for both, counted directly."""
    spec = f"""
name: taps
input: {{channels: 1, size: {size}}}
layers:
  - {{name: conv, op: conv, out: 1, kernel: {kernel}, stride: {stride}, padding: {padding}}}
"""
    node = build(parse(spec, "taps.yaml")).node("conv")
    out = (size + 2 * padding - kernel) // stride + 1
    positions = [(i, j) for i in range(out) for j in range(out)]

    def real(p: tuple[int, int], t: tuple[int, int]) -> bool:
        return all(0 <= stride * p[d] - padding + t[d] < size for d in (0, 1))

    taps = [(a, b) for a in range(kernel) for b in range(kernel)]
    brute = sum(real(p, t) and real(q, t) for p in positions for q in positions for t in taps)
    assert node.attrs["pairs"] == brute
    assert node.attrs["taps"] == sum(real(p, t) for p in positions for t in taps)
    # the traces a batchnorm's kept offsets need: tr(ΠXΠY)/P² for X, Y ∈ {N, diag N}
    common = torch.tensor([[sum(real(p, t) and real(q, t) for t in taps) for q in positions] for p in positions],
                          dtype=F64)
    if len(positions) == 1:
        assert node.attrs["offsets"] is None
        return
    centre = torch.eye(len(positions), dtype=F64) - 1 / len(positions)
    diag = torch.diag(torch.diagonal(common))
    expected = [float(torch.trace(centre @ a @ centre @ b)) / len(positions) ** 2
                for a, b in ((common, common), (common, diag), (diag, diag))]
    assert node.attrs["offsets"] == pytest.approx(expected, rel=1e-12, abs=1e-12)
