"""Building blocks: MLPs, and per-agent ("stacked") MLPs whose agents are a batch dimension.

A stacked layer holds one weight per agent, ``(N, in, out)``, and applies all agents in one
batched matmul on inputs shaped ``(N, B, in)``: N small networks cost one kernel launch, and
Adam (element-wise) on the stacked tensor is exactly N independent Adams.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def mlp(d_in: int, width: int, layers: int, d_out: int) -> nn.Sequential:
    """``layers`` × (Linear → LayerNorm → SiLU) then a Linear to ``d_out``."""
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, width, bias=False), nn.LayerNorm(width), nn.SiLU()]
        d = width
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


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
    """N independent LayerNorms over the last axis: (N, B, D) → (N, B, D)."""

    def __init__(self, n: int, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, 1, d))  # (N, 1, D)
        self.bias = nn.Parameter(torch.zeros(n, 1, d))  # (N, 1, D)
        self.eps = eps

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        w = self.weight if idx is None else self.weight[idx]  # (n, 1, D)
        b = self.bias if idx is None else self.bias[idx]  # (n, 1, D)
        # the affine in x's dtype: under bf16 autocast float32 weights would promote the whole
        # (n, B, D) activation back to float32 and cost a conversion at the next matmul
        return torch.addcmul(b.to(x.dtype), F.layer_norm(x, x.shape[-1:], eps=self.eps), w.to(x.dtype))


class StackedMLP(nn.Module):
    """N independent MLPs of the shape of :func:`mlp`: (N, B, in) → (N, B, out)."""

    def __init__(self, n: int, d_in: int, width: int, layers: int, d_out: int):
        super().__init__()
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
            x = m(x) if isinstance(m, nn.SiLU) else m(x, idx)
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
