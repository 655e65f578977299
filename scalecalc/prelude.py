"""The helper definitions an emitted PyTorch file starts with, each written only when used."""

from __future__ import annotations

_SNIPPETS = {
    "init_weight": '''
def init_weight(layer: nn.Module, m2: float, distribution: str) -> nn.Module:
    """Zero-mean weights with E[W²] = m2 (normal, or uniform on ±√(3·m2)); zero biases."""
    with torch.no_grad():
        if distribution == "uniform":
            bound = math.sqrt(3 * m2)
            layer.weight.uniform_(-bound, bound)
        else:
            layer.weight.normal_(0.0, math.sqrt(m2))
        if layer.bias is not None:
            layer.bias.zero_()
    return layer
''',
    "conv": '''
def conv(n_in, n_out, kernel, stride, padding, bias, m2, distribution="normal") -> nn.Conv2d:
    return init_weight(nn.Conv2d(n_in, n_out, kernel, stride, padding, bias=bias), m2, distribution)
''',
    "linear": '''
def linear(n_in, n_out, bias, m2, distribution="normal") -> nn.Linear:
    return init_weight(nn.Linear(n_in, n_out, bias=bias), m2, distribution)
''',
    "Scale": '''
class Scale(nn.Module):
    """A fixed multiplier y = value·x, stored as a buffer (never trained)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value
''',
    "LearnableScale": '''
class LearnableScale(nn.Module):
    """A learnable scalar y = u·x (Appendix E)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight
''',
    "Bias": '''
class Bias(nn.Module):
    """A standalone bias, one per channel, starting at zero."""

    def __init__(self, channels: int, spatial: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros((channels, 1, 1) if spatial else (channels,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias
''',
    "Add": '''
class Add(nn.Module):
    """y = Σ wᵢ·xᵢ with fixed weights (all 1 by default)."""

    def __init__(self, weights: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        weights = self.weights or (1.0,) * len(xs)
        return sum(w * x for w, x in zip(weights, xs))
''',
    "Concat": '''
class Concat(nn.Module):
    """Concatenation along the channel axis."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)
''',
    "GlobalAvgPool": '''
class GlobalAvgPool(nn.Module):
    """Mean over the spatial positions: (B, C, H, W) → (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
''',
}


def prelude(used: set[str]) -> str:
    if used & {"conv", "linear"}:
        used = used | {"init_weight"}
    return "".join(_SNIPPETS[name] + "\n" for name in _SNIPPETS if name in used)
