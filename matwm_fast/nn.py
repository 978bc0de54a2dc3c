"""Building blocks: MLPs, and per-agent ("stacked") MLPs whose agents are a batch dimension.

A stacked layer holds one weight per agent, ``(N, in, out)``, and applies all agents in one
batched matmul on inputs shaped ``(N, B, in)``: N small networks cost one kernel launch, and
Adam (element-wise) on the stacked tensor is exactly N independent Adams.

Every LayerNorm → SiLU pair runs as one ``kernels.layer_norm(..., act="silu")`` of the model's
``kernels`` choice: one fused Triton kernel (reading the weights in their dtype, writing the
activation's), or the reference ``F.layer_norm`` and ``F.silu``.  The modules stay what they
were (``nn.LayerNorm``, ``nn.SiLU``), so parameter names and checkpoints do not change.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .kernels import layer_norm

Tensor = torch.Tensor


def norm(ln: nn.LayerNorm, x: Tensor, kernels: str, act: str = "none") -> Tensor:
    """``act(ln(x))`` as one op of ``kernels`` (see the module docstring)."""
    return layer_norm(x, ln.weight, ln.bias, ln.eps, act, impl=kernels)


class MLP(nn.Sequential):
    """An ``nn.Sequential`` of Linear, LayerNorm and SiLU layers (same names and parameters as
    one) whose every LayerNorm → SiLU pair runs fused (:func:`norm`).  ``run(x, start)`` runs the
    layers from ``start`` on (slicing a Sequential would make a new module per call)."""

    def __init__(self, *mods: nn.Module, kernels: str = "ref"):
        super().__init__(*mods)
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)

    def run(self, x: Tensor, start: int = 0) -> Tensor:
        mods = list(self._modules.values())
        i = start
        while i < len(mods):
            m = mods[i]
            if isinstance(m, nn.LayerNorm):
                silu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.SiLU)
                x = norm(m, x, self.kernels, "silu" if silu else "none")
                i += 2 if silu else 1
            else:
                x = m(x)
                i += 1
        return x


def mlp(d_in: int, width: int, layers: int, d_out: int, kernels: str = "ref") -> MLP:
    """``layers`` × (Linear → LayerNorm → SiLU) then a Linear to ``d_out``."""
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, width, bias=False), nn.LayerNorm(width), nn.SiLU()]
        d = width
    mods.append(nn.Linear(d, d_out))
    return MLP(*mods, kernels=kernels)


class StackedLinear(nn.Module):
    """N independent Linear layers: (N, B, in) → (N, B, out)."""

    def __init__(self, n: int, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, per agent
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))  # (N, in, out)
        self.bias = nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound)) if bias else None  # (N, 1, out)

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """``idx`` (n,) selects a subset of the agents' weights for x (n, B, in)."""
        w = self.weight if idx is None else self.weight[idx]  # (n, in, out)
        if self.bias is None:
            return torch.bmm(x, w)  # (n, B, out)
        b = self.bias if idx is None else self.bias[idx]  # (n, 1, out)
        return torch.baddbmm(b, x, w)  # (n, B, out)


class StackedLayerNorm(nn.Module):
    """N independent LayerNorms over the last axis: (N, B, D) → (N, B, D), optionally followed
    by a SiLU in the same op.  The reference applies the affine in x's dtype: under bf16 autocast
    float32 weights would promote the whole (n, B, D) activation back to float32 and cost a
    conversion at the next matmul (the Triton kernel reads them as they are)."""

    def __init__(self, n: int, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, d))  # (N, 1, D)
        self.bias = nn.Parameter(torch.zeros(n, 1, d))  # (N, 1, D)
        self.eps = eps

    def forward(self, x: Tensor, idx: Tensor | None = None, act: str = "none", kernels: str = "ref") -> Tensor:
        w = self.weight if idx is None else self.weight[idx]  # (n, 1, D)
        b = self.bias if idx is None else self.bias[idx]  # (n, 1, D)
        return layer_norm(x, w, b, self.eps, act, impl=kernels)


class StackedMLP(nn.Module):
    """N independent MLPs of the shape of :func:`mlp`: (N, B, in) → (N, B, out)."""

    def __init__(self, n: int, d_in: int, width: int, layers: int, d_out: int, kernels: str = "ref"):
        super().__init__()
        self.kernels = kernels
        mods: list[nn.Module] = []
        d = d_in
        for _ in range(layers):
            mods += [StackedLinear(n, d, width, bias=False), StackedLayerNorm(n, width), nn.SiLU()]
            d = width
        mods.append(StackedLinear(n, d, d_out))
        self.net = nn.ModuleList(mods)

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """x (n, B, in) → (n, B, out); ``idx`` (n,) names the agents when n < N."""
        for m in self.net:
            if isinstance(m, StackedLayerNorm):  # always followed by its SiLU: one op
                x = m(x, idx, "silu", self.kernels)
            elif not isinstance(m, nn.SiLU):
                x = m(x, idx)
        return x


def per_agent_grad_clip(params: list[Tensor], max_norm: float, eps: float = 1e-6) -> Tensor:
    """Clip each agent's gradient (row i of every stacked parameter) to ``max_norm`` on its own.

    One agent's large gradient must not shrink another's (SPEC §5), so the norm is taken over
    the non-agent axes only; returns the (N,) pre-clip norms, as a tensor (no host sync).
    """
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads]).sum(0)  # (N,)
    norm = sq.sqrt()  # (N,)
    scale = (max_norm / (norm + eps)).clamp(max=1.0)  # (N,)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norm


def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target ← decay·target + (1−decay)·source, parameter-wise (the slow critic, SPEC §5)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1.0 - decay)


class LowPrecisionCopy:
    """A twin of ``module`` whose floating-point parameters are stored in ``dtype`` (buffers as
    they are), for forward passes without gradients: imagination reads bf16 weights instead of
    casting each float32 weight at every call, as autocast does (per layer and per decode step).

    :meth:`refresh` copies the source's current parameters in, converting on the way, in one
    ``torch._foreach_copy_`` (one kernel group, at fixed addresses: capture-safe).  The submodules
    named in ``leave_out`` are not copied (the twin holds None there), so a twin of the
    actor-critic carries the actors only.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, leave_out: tuple[str, ...] = ()):
        memo = {id(getattr(module, name)): None for name in leave_out}  # deepcopy puts None there
        # eval mode: a twin only ever runs inference (no dropout, whatever mode its source is in)
        self.module = copy.deepcopy(module, memo).requires_grad_(False).eval()
        src = dict(module.named_parameters())
        self.src: list[Tensor] = []
        self.dst: list[Tensor] = []
        for name, p in self.module.named_parameters():
            p.grad = None
            if p.is_floating_point():
                p.data = p.data.to(dtype)
            self.src.append(src[name])
            self.dst.append(p)

    def refresh(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.dst, self.src)
