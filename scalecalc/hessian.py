"""Sampled curvature of each weighted layer: the Hessian blocks of §5.1 (Theorem 2, App. F–G)
and the layer-wise conditioning of the Fisher blocks (Huang et al., Proposition 1).

Loss (§5.1). For a draw, R is an m×m matrix of iid N(0, 1) entries, m the number of output
elements per sample, and each sample b contributes L_b = y_bᵀ R y_b; one R is shared by the
whole batch of a draw. Its gradient at the output is S·y_b with S = R + Rᵀ.

Per-sample curvature. The Hessian of the batch loss Σ_b L_b is the sum Σ_b H_b of per-sample
blocks, so E[(Σ_b H_b r)²] = B·E[(H_b r)²] + B(B−1)·E[(H_b r)(H_b′ r)]. The cross term does not
vanish: H_b r = δ_b ⊗ x_b (linear layer) and inputs after a ReLU have a positive mean, so
E[x_b·x_b′] grows like n·E[x]², and all samples share W, R and r. Dividing the batch
Hessian-vector product by B therefore overstates the per-sample moment by a factor that grows
with B. Instead every sample's H_b r is formed exactly and squared on its own.

How. Layer l computes h = W·x (or a convolution) and the network above it is piecewise linear
in h, so y = Φ_b h locally and the block is H_b = J_bᵀ Φ_bᵀ S Φ_b J_b (App. F: the Gauss–Newton
form is exact here), with J_b r = (layer applied to x_b with weights r). Three autograd passes
over the part above l give it for all samples at once: Φ_bᵀ v as a function of a dummy v,
its derivative along J_b r (= Φ_b J_b r, the "double-vjp" forward product), and the backward
pass of S·Φ_b J_b r down to h (= δ_b). H_b r is then the per-sample weight gradient built from
δ_b and the layer input. With smooth non-linearities above l (tanh, GELU, norms) this is the
Gauss–Newton block rather than the full Hessian block.

Off-diagonal blocks (Fig. 2). y is multilinear in the weights, so for l ≠ m the full block
H_lm = (Φ_l J_l)ᵀ S (Φ_m J_m) + Σ_i (Sy)_i ∂²y_i/∂W_l∂W_m has a second term that Gauss–Newton drops.
``block_matrix`` forms the exact H_b[:, m] r_m for every sample as the derivative, along r_m
on W_m, of the per-sample weight gradients g_l = Σ_p δ_l,p x_l,pᵀ (p: positions):
ġ_l = Σ_p (δ̇_l,p x_l,pᵀ + δ_l,p ẋ_l,pᵀ). Gradients with respect to activations are already
per sample (no batch statistics), so one forward-mode pass (jvp) over the batch backward pass
gives δ, δ̇, x and ẋ of every sample at once; only the sum over positions is done per sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from scalecalc.errors import ScalecalcError
from scalecalc.graph import Network
from scalecalc.propagate import Analysis

MAX_FEATURES = 4096  # largest covariance side diagonalised; larger ones are subsampled
CHUNK = 2**24  # per-sample weight-gradient elements held in memory at once


def predicted_hessian(analysis: Analysis, net: Network) -> dict[str, float]:
    """Theorem 2's E[(G_l r)²] for every weighted layer of ``analysis``, under the loss yᵀRy.

    Per sample, (Sy)_i = 2R_ii·y_i + Σ_{j≠i}(R_ij + R_ji)·y_j. R plays no part in the forward
    pass, so it is independent of y, and the terms are uncorrelated with zero mean:
    E_R[(Sy)_i²] = 4y_i² + 2Σ_{j≠i} y_j² = 2‖y‖² + 2y_i². Averaged over the m outputs,

        E[(Sy)²] = 2(m + 1)·E[y²].

    The analysis starts its backward pass from E[Δy²] = net.grad_m2; every backward moment, ς
    and hence γ (Eq. 2) is linear in that value, so the loss's γ is γ_l·2(m + 1)·E[y²]/grad_m2.
    By App. G this is E[(G_l r)²] = n·E[x²]²·E[Δy_l²]/E[y_l²] up to the O(1/n_out) term of
    Theorem 2 (k² and border taps enter exactly as in the extrinsic γ of a convolution).
    """
    if net.symbols:
        raise ScalecalcError("the Hessian prediction needs numbers; drop --symbolic")
    m = float(net.node(net.output).shape.size)
    loss_m2 = 2 * (m + 1) * float(analysis[net.output].forward_m2)
    return {n.name: float(analysis[n.name].gamma) * loss_m2 / float(net.grad_m2) for n in net.nodes if n.weighted}


def hessian_blocks(module: Any, weighted: list[str], *, draws: int, batch: int, seed: int = 0, device: str = "cpu",
                   dtype: str = "float64", input_m2: float | Sequence[float] = 1.0) -> dict[str, list[float]]:
    """Per weighted layer, E[(H_ll r)²] measured in each of ``draws`` independent draws.

    A draw is a fresh ``module.Model()``, a batch of iid N(0, input_m2) inputs, one loss matrix
    R and, per layer, one direction r with W_l's shape and iid N(0, 1) entries. The value is
    the mean over the batch of the per-sample mean square entry of H_b r (module docstring).
    """
    import torch

    if draws < 1 or batch < 1:
        raise ScalecalcError(f"need draws ≥ 1 and batch ≥ 1, got {draws} and {batch}")
    torch.manual_seed(seed)
    kind = getattr(torch, dtype)
    out: dict[str, list[float]] = {n: [] for n in weighted}
    for _ in range(draws):
        model = module.Model().to(device=device, dtype=kind)
        x = _inputs(module, batch, input_m2, kind, device)
        for name, values in block_moments(model, x, weighted).items():
            out[name].append(values.mean().item())
    return out


def block_moments(model: Any, x: Any, weighted: list[str], loss: Any = None,
                  directions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per layer, a tensor of B values: the mean square entry of H_b r for each sample.

    ``loss`` is R (drawn iid N(0, 1) when None); ``directions`` maps a layer to its r (drawn
    when missing). Drawing order: R, then each missing r in the order of ``weighted``.
    """
    import torch

    _per_sample_only(model)
    kept = _capture(model, weighted)
    y = model(x).reshape(x.shape[0], -1)
    R = torch.randn(y.shape[1], y.shape[1], dtype=y.dtype, device=y.device) if loss is None else loss
    S = R + R.T
    out = {}
    for name in weighted:
        layer = model.get_submodule(name)
        r = (directions or {}).get(name)
        r = torch.randn_like(layer.weight) if r is None else r
        x_in, h = kept[name]
        u = _apply(layer, x_in, r)  # J_b r: the layer run with weights r (no bias)
        v = torch.zeros_like(y, requires_grad=True)
        (phi_t_v,) = torch.autograd.grad(y, h, v, create_graph=True, retain_graph=True)  # Φᵀv, linear in v
        if phi_t_v.requires_grad:
            (y_dot,) = torch.autograd.grad(phi_t_v, v, u, retain_graph=True, allow_unused=True)
        else:  # every path above l is switched off: Φ = 0
            y_dot = None
        y_dot = torch.zeros_like(y) if y_dot is None else y_dot
        (delta,) = torch.autograd.grad(y, h, y_dot @ S, retain_graph=True)  # Φᵀ S Φ J r, S symmetric
        out[name] = _weight_grad_m2(layer, x_in, delta.detach())
    return out


def hessian_matrix(module: Any, weighted: list[str], *, draws: int, batch: int, seed: int = 0, device: str = "cpu",
                   dtype: str = "float32", input_m2: float | Sequence[float] = 1.0,
                   gauss_newton: bool = False) -> dict[str, dict[str, list[float]]]:
    """Per pair of weighted layers (l, m), ‖H_lm‖²_F / min(d_l, d_m) measured in each draw.

    Draws as in ``hessian_blocks``; the value is the batch mean of ``block_matrix``. It is the
    mean squared singular value of the per-sample block (d: the number of weights of a layer;
    the block has min(d_l, d_m) singular values), and on the diagonal it is E[(G_l r)²].
    float32 by default: forward-mode products of float64 convolutions are far slower on CPU.
    ``gauss_newton`` measures J_lᵀ S J_m only (``block_matrix``).
    """
    import torch

    if draws < 1 or batch < 1:
        raise ScalecalcError(f"need draws ≥ 1 and batch ≥ 1, got {draws} and {batch}")
    torch.manual_seed(seed)
    kind = getattr(torch, dtype)
    out: dict[str, dict[str, list[float]]] = {n: {m: [] for m in weighted} for n in weighted}
    for _ in range(draws):
        model = module.Model().to(device=device, dtype=kind)
        x = _inputs(module, batch, input_m2, kind, device)
        for row, cells in block_matrix(model, x, weighted, gauss_newton=gauss_newton).items():
            for col, values in cells.items():
                out[row][col].append(values.mean().item())
    return out


def block_matrix(model: Any, x: Any, weighted: list[str], loss: Any = None, directions: dict[str, Any] | None = None,
                 gauss_newton: bool = False) -> dict[str, dict[str, Any]]:
    """Per pair (l, m), a tensor of B values: ‖H_b,lm r_m‖² / min(d_l, d_m) for each sample.

    The full per-sample Hessian (module docstring), off-diagonal blocks included; r_m has
    W_m's shape and iid N(0, 1) entries, so E_r‖H_lm r_m‖² = ‖H_lm‖²_F. ``loss`` and
    ``directions`` as in ``block_moments``, drawn in the same order; on the diagonal the values
    equal ``block_moments``'s for the same R and r. ``gauss_newton`` keeps only J_lᵀ S J_m:
    ġ_l = Σ_p δᴳᴺ_l,p x_l,pᵀ with δᴳᴺ_l = Φ_lᵀ S ẏ, ẏ = J_m r_m (the same on the diagonal).
    """
    import torch
    from torch.func import functional_call, grad, jvp

    _per_sample_only(model)
    probes: dict[str, Any] = {}  # zeros added to each layer's output h_l: ∂L/∂probe = δ_l
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def add(module: Any, args: Any, output: Any) -> Any:
            inputs[name], outputs[name] = args[0], output
            return output + probes[name] if name in probes else output

        return add

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in weighted]
    try:
        with torch.no_grad():
            y = model(x).reshape(x.shape[0], -1)
        R = torch.randn(y.shape[1], y.shape[1], dtype=y.dtype, device=y.device) if loss is None else loss
        zeros = {n: torch.zeros_like(outputs[n]) for n in weighted}
        layers = {n: model.get_submodule(n) for n in weighted}
        rs = {n: (directions or {}).get(n) for n in weighted}
        rs = {n: torch.randn_like(layers[n].weight) if r is None else r for n, r in rs.items()}
        params = {k: v.detach() for k, v in model.named_parameters()}
        weights = {n: layers[n].weight.detach() for n in weighted}

        def run(e: dict[str, Any], ws: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            probes.clear()
            probes.update(e)
            inputs.clear()
            out = functional_call(model, {**params, **{f"{n}.weight": w for n, w in ws.items()}}, (x,))
            return out.reshape(x.shape[0], -1), dict(inputs)

        def batch_loss(e: dict[str, Any], ws: dict[str, Any]) -> tuple[Any, tuple[dict[str, Any], Any]]:
            out, xs = run(e, ws)
            return torch.einsum("bi,ij,bj->", out, R, out), (xs, out)  # Σ_b y_bᵀ R y_b

        def fields(ws: dict[str, Any]) -> tuple[dict[str, Any], tuple[dict[str, Any], Any]]:
            return grad(batch_loss, has_aux=True)(zeros, ws)  # δ_l and (x_l, y) of every sample

        result: dict[str, dict[str, Any]] = {n: {} for n in weighted}
        for m in weighted:
            tangent = {n: rs[n] if n == m else torch.zeros_like(w) for n, w in weights.items()}
            with warnings.catch_warnings():  # torch's first forward-mode call scripts its decompositions
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
                primal, dot = jvp(fields, (weights,), (tangent,))[:2]  # values and their derivatives along r_m
            (delta, (xs, _)), (delta_dot, (xs_dot, y_dot)) = primal, dot
            if gauss_newton:  # backward pass of S·ẏ at fixed weights; no ẋ term
                g = y_dot.detach() @ (R + R.T)
                delta_dot = grad(lambda e, g=g: (run(e, weights)[0] * g).sum())(zeros)
            for n in weighted:
                terms = [(xs[n], delta_dot[n])]  # ġ_l = Σ_p δ̇ xᵀ + δ ẋᵀ
                if not gauss_newton and bool(xs_dot[n].any()):  # ẋ_l = 0 unless W_m lies below l
                    terms.append((xs_dot[n], delta[n]))
                size = min(layers[n].weight.numel(), layers[m].weight.numel())
                result[n][m] = _grad_sq(layers[n], [(a.detach(), d.detach()) for a, d in terms]) / size
    finally:
        for handle in handles:
            handle.remove()
        probes.clear()
        inputs.clear()
    return result


def conditioning(module: Any, weighted: list[str], *, batch: int, seed: int = 0, device: str = "cpu",
                 dtype: str = "float64", input_m2: float | Sequence[float] = 1.0) -> dict[str, dict[str, float]]:
    """Per weighted layer, the spectra behind Proposition 1 of Huang et al.: F_l ≈ Σx ⊗ Σ∇h.

    One draw; iid N(0, input_m2) inputs (``input_m2`` may give one E[x²] per input feature, in
    the order of ``INPUT_SHAPE`` flattened) and an iid N(0, 1) output gradient, as in verify.
    Σx = E[x xᵀ] over the layer's inputs, Σ∇h = E[g gᵀ] over the gradients at its output
    (both uncentred, as in the paper); a convolution contributes one row per sample and output
    position: its input patch (unfold) and the gradient there. Keys, for ``x`` and ``grad``:
    ``*_lmax``, ``*_kappa`` = λmax/λmin over the non-zero eigenvalues (Huang et al.'s κ;
    inf when there are none), ``*_rank`` (eigenvalues above λmax·dim·ε), ``*_dim``,
    ``*_samples`` (rows), ``*_kept`` (features used: when rows and features both exceed
    MAX_FEATURES a random principal sub-block of Σ is taken; by eigenvalue interlacing its λmax
    and κ are then lower bounds);
    and ``lmax``, ``kappa``: the products, λmax and κ of the Kronecker factored sub-FIM.
    """
    import torch

    if batch < 1:
        raise ScalecalcError(f"need batch ≥ 1, got {batch}")
    torch.manual_seed(seed)
    kind = getattr(torch, dtype)
    model = module.Model().to(device=device, dtype=kind)
    kept = _capture(model, weighted, retain=True)
    x = _inputs(module, batch, input_m2, kind, device)
    y = model(x)
    (y * torch.randn_like(y)).sum().backward()
    out = {}
    for name in weighted:
        layer = model.get_submodule(name)
        x_in, h = kept[name]
        if isinstance(layer, torch.nn.Conv2d):
            rows = _patches(layer, x_in).flatten(0, 1)  # (B·P, C_in·k²)
            grads = h.grad.flatten(2).transpose(1, 2).flatten(0, 1)  # (B·P, C_out)
        else:
            rows, grads = x_in.reshape(-1, x_in.shape[-1]), h.grad.reshape(-1, h.shape[-1])
        stats = {**_spectrum("x", rows), **_spectrum("grad", grads)}
        stats["lmax"] = stats["x_lmax"] * stats["grad_lmax"]
        stats["kappa"] = stats["x_kappa"] * stats["grad_kappa"]
        out[name] = stats
    return out


# -- helpers -------------------------------------------------------------------------------


def _inputs(module: Any, batch: int, input_m2: float | Sequence[float], kind: Any, device: str) -> Any:
    import torch

    shape = tuple(module.INPUT_SHAPE)
    m2 = torch.as_tensor(input_m2, dtype=kind, device=device)
    if m2.numel() > 1:
        if m2.numel() != math.prod(shape):
            raise ScalecalcError(f"input_m2 has {m2.numel()} values; the input has {math.prod(shape)} features")
        m2 = m2.reshape(shape)
    if bool((m2 < 0).any()):
        raise ScalecalcError("input_m2 must be non-negative")
    return torch.randn(batch, *shape, dtype=kind, device=device) * m2.sqrt()


def _per_sample_only(model: Any) -> None:
    """Batch statistics couple the samples, so a per-sample Hessian is not defined."""
    import torch

    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) and model.training:
        raise ScalecalcError("per-sample Hessian blocks are undefined with batchnorm in training mode")


def _capture(model: Any, weighted: list[str], retain: bool = False) -> dict[str, tuple[Any, Any]]:
    """Hooks that keep each weighted layer's input (detached) and output (in the graph)."""
    kept: dict[str, tuple[Any, Any]] = {}

    def keeper(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if retain:
                output.retain_grad()
            kept[name] = (args[0].detach(), output)
            handles[name].remove()

        return hook

    handles = {n: model.get_submodule(n).register_forward_hook(keeper(n)) for n in weighted}
    return kept


def _apply(layer: Any, x: Any, w: Any) -> Any:
    import torch.nn.functional as F
    from torch import nn

    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w)
    raise ScalecalcError(f"{type(layer).__name__} is not a conv or linear layer")


def _patches(layer: Any, x: Any) -> Any:
    """(B, P, C_in·k²): each output position's input patch, ordered like the weight."""
    import torch.nn.functional as F

    if layer.groups != 1 or isinstance(layer.padding, str):
        raise ScalecalcError("grouped convolutions and string padding are not supported")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if (dh, dw) != (1, 1):
        return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
    # a strided view (much faster than F.unfold): (B, C, h_out, w_out, kh, kw) → (B, P, C·kh·kw)
    view = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)
    return view.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], view.shape[2] * view.shape[3], -1)


def _weight_grad_m2(layer: Any, x: Any, delta: Any) -> Any:
    """Per sample, the mean square entry of the weight gradient Σ_p δ_p x_pᵀ (p: positions)."""
    return _grad_sq(layer, [(x, delta)]) / layer.weight.numel()


def _grad_sq(layer: Any, terms: list[tuple[Any, Any]]) -> Any:
    """Per sample, ‖Σ_k Σ_p δ_k,p x_k,pᵀ‖²_F over the (input, output gradient) pairs ``terms``."""
    import torch

    b, size = terms[0][0].shape[0], layer.weight.numel()
    if isinstance(layer, torch.nn.Conv2d):  # (B, P, C_in·k²), (B, C_out, P); the terms are more positions
        xs = torch.cat([_patches(layer, x) for x, _ in terms], 1)
        ds = torch.cat([d.flatten(2) for _, d in terms], 2)
    elif terms[0][0].dim() == 2:  # one position: ‖Σ_k δ_k x_kᵀ‖² = Σ_kk′ (δ_k·δ_k′)(x_k·x_k′), no outer products
        return torch.stack([(d * e).sum(1) * (x * z).sum(1) for x, d in terms for z, e in terms]).sum(0)
    else:
        xs = torch.cat([x.reshape(b, -1, x.shape[-1]) for x, _ in terms], 1)
        ds = torch.cat([d.reshape(b, -1, d.shape[-1]) for _, d in terms], 1).transpose(1, 2)
    step = max(1, CHUNK // size)
    return torch.cat([torch.bmm(ds[i:i + step], xs[i:i + step]).square().flatten(1).sum(1)
                      for i in range(0, b, step)])


def _spectrum(prefix: str, rows: Any) -> dict[str, float]:
    """λmax, κ over non-zero eigenvalues and rank of Σ = rowsᵀrows/N (N rows of ``dim`` features).

    When N < dim the non-zero eigenvalues are those of the N×N matrix rows·rowsᵀ/N, which is
    smaller; only when both sides exceed MAX_FEATURES are features subsampled.
    """
    import torch

    eps = torch.finfo(rows.dtype).eps
    samples, dim = rows.shape
    if min(samples, dim) > MAX_FEATURES:
        rows = rows[:, torch.randperm(dim, device=rows.device)[:MAX_FEATURES]]
    rows = rows.double()
    kept = rows.shape[1]
    gram = rows.T @ rows if kept <= samples else rows @ rows.T
    lam = torch.linalg.eigvalsh(gram / samples)
    top = lam[-1].item()
    positive = lam[lam > max(top, 0.0) * max(samples, kept) * eps]  # numerical rank, as numpy's matrix_rank
    kappa = top / positive[0].item() if top > 0 and positive.numel() else math.inf
    return {f"{prefix}_lmax": top, f"{prefix}_kappa": kappa, f"{prefix}_rank": float(positive.numel()),
            f"{prefix}_dim": float(dim), f"{prefix}_samples": float(samples), f"{prefix}_kept": float(kept)}
