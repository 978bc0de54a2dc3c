"""LayerNorm over the last axis with an optional SiLU, in one kernel each way.

    y = act((x - mean) / sqrt(var + eps) * w + b),   act = identity or SiLU (y·sigmoid(y))

Every MLP layer of the model is Linear → LayerNorm → SiLU, and every transformer block has two
LayerNorms.  Eagerly that is two kernels per norm (LayerNorm, SiLU), and under CUDA's bf16
autocast four: autocast runs LayerNorm in float32, so the bf16 activation is cast up before it
and cast back down at the next matmul.  The fused kernel reads the activation in its own dtype
and the weights in theirs (float32 parameters, or a bf16 twin's), computes in float32 and writes
the activation's dtype: one kernel, no conversion either side — "LayerNorm kept in bf16".

Weights are shared by every row, (D,), or one set per leading slice of x, (G, 1, D) or (G, D)
for x (G, ..., D): the per-agent LayerNorms of the stacked actors and critics
(:class:`matwm_fast.nn.StackedLayerNorm`), where row m of the flattened x belongs to group
m // (M / G).

Backward (training): dx from the saved mean and 1/std, with the SiLU's derivative recomputed
from the pre-activation; dw and db as float32 partial sums over row blocks, one program per
(group, block), summed by one reduction:

    y0 = x̂·w + b,   g0 = dy · silu'(y0) = dy · s·(1 + y0·(1 − s)),  s = sigmoid(y0)
    dx = rstd · (g0·w − mean(g0·w) − x̂ · mean(g0·w · x̂)),   dw = Σ g0·x̂,   db = Σ g0
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton_compat import cdiv, jit, next_pow2, tl
from .dispatch import check_impl

__all__ = ["layer_norm", "layer_norm_ref", "ACTS"]

ACTS = ("none", "silu")
_TILE = 4096  # elements of x per program: rows × next_pow2(D); 32 fp32 registers/thread at 4 warps
_MAX_PARTIALS = 64  # backward programs per group: each sums its rows' dw, db; one reduction adds them up


# --------------------------------------------------------------------------- #
# Reference                                                                    #
# --------------------------------------------------------------------------- #
def layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, act: str = "none") -> Tensor:
    """Eager reference: ``F.layer_norm`` (then ``F.silu``), as ``nn.LayerNorm`` computes it — the
    dtype is whatever autocast makes of it.  Per-group weights are applied after an affine-free
    norm with ``addcmul``, in x's dtype (float32 weights would promote a bf16 activation)."""
    d = x.shape[-1]
    if weight.dim() == 1:
        y = F.layer_norm(x, (d,), weight, bias, eps)
    else:
        shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (d,)  # (G, 1, ..., D)
        w, b = (weight, bias) if weight.shape == shape else (weight.reshape(shape), bias.reshape(shape))
        w, b = w.to(x.dtype), b.to(x.dtype)
        y = torch.addcmul(b, F.layer_norm(x, (d,), eps=eps), w)
    return F.silu(y) if act == "silu" else y


# --------------------------------------------------------------------------- #
# Triton kernels                                                               #
# --------------------------------------------------------------------------- #
@jit
def _ln_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, D, rows_per_group, eps,
    SILU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_D)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D  # (BLOCK_M,)
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)  # biased variance, as nn.LayerNorm
    wofs = (rows // rows_per_group).to(tl.int64)[:, None] * D + cols[None, :]  # the row's group's weights
    w = tl.load(w_ptr + wofs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + wofs, mask=ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w + b
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@jit
def _ln_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr,
    D, rows_per_group, blocks_per_part,
    SILU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # program (g, p): rows [p·blocks_per_part·BLOCK_M, ...) of group g; writes its dx rows and its
    # float32 partial sums at part[0, g, p] (dw) and part[1, g, p] (db)
    g = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + g.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    b = tl.load(b_ptr + g.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = g.to(tl.int64) * rows_per_group
    for i in range(blocks_per_part):
        local = (p * blocks_per_part + i) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) within the group
        row_ok = local < rows_per_group
        rows = first + local
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if SILU:
            y0 = xhat * w[None, :] + b[None, :]
            s = 1.0 / (1.0 + tl.exp(-y0))
            dy = dy * (s * (1.0 + y0 * (1.0 - s)))
        dy = tl.where(ok, dy, 0.0)
        gw = dy * w[None, :]
        c1 = tl.sum(gw * xhat, axis=1) / D  # (BLOCK_M,)
        c2 = tl.sum(gw, axis=1) / D
        dx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    part = part_ptr + (g * tl.num_programs(1) + p).to(tl.int64) * D + cols  # part[0, g, p]
    tl.store(part, dw, mask=col_ok)
    tl.store(part + tl.num_programs(0) * tl.num_programs(1) * D, db, mask=col_ok)  # part[1, g, p]


def _block_rows(D: int, M: int) -> tuple[int, int]:
    BLOCK_D = next_pow2(D)
    return min(max(1, _TILE // BLOCK_D), next_pow2(max(M, 1))), BLOCK_D


def _groups(x: Tensor, weight: Tensor) -> tuple[int, int]:
    """(G, rows per group) of x viewed as (M, D)."""
    M = x.numel() // x.shape[-1]
    G = 1 if weight.dim() == 1 else weight.shape[0]
    return G, M // G


def _ln_fwd_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float, silu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    D = x.shape[-1]
    x = x.contiguous()
    M = x.numel() // D
    G, per = _groups(x, weight)
    y = torch.empty_like(x)  # (..., D) in x's dtype
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)  # (...,)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)  # (...,)
    if M == 0:
        return y, mean, rstd
    BLOCK_M, BLOCK_D = _block_rows(D, M)
    _ln_fwd_kernel[(cdiv(M, BLOCK_M),)](
        x, weight.contiguous(), bias.contiguous(), y, mean, rstd, M, D, max(per, 1), float(eps),
        SILU=silu, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return y, mean, rstd


def _ln_bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                   silu: bool) -> Tuple[Tensor, Tensor]:
    D = x.shape[-1]
    x, dy = x.contiguous(), dy.contiguous()
    G, per = _groups(x, weight)
    dx = torch.empty_like(x)  # (..., D)
    BLOCK_M, BLOCK_D = _block_rows(D, per)
    blocks = cdiv(per, BLOCK_M)
    parts = max(1, min(_MAX_PARTIALS, blocks))
    partial = torch.empty((2, G, parts, D), dtype=torch.float32, device=x.device)  # ([dw, db], G, P, D)
    if per == 0:
        partial.zero_()
    else:
        _ln_bwd_kernel[(G, parts)](
            dy, x, weight.contiguous(), bias.contiguous(), mean, rstd, dx, partial,
            D, per, cdiv(blocks, parts),
            SILU=silu, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4,
        )
    # (2, G, D) float32: dw and db in one reduction, each half contiguous (split by the caller: a
    # custom op's outputs may not alias one another)
    return dx, partial.sum(dim=2)


# --------------------------------------------------------------------------- #
# Custom ops + autograd                                                        #
# --------------------------------------------------------------------------- #
@torch.library.custom_op("matwm::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, silu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _ln_fwd_triton(x, weight, bias, eps, silu)


@_layer_norm_op.register_fake
def _layer_norm_fake(x, weight, bias, eps, silu):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)  # (...,)
    return x.new_empty(x.shape), stats, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("matwm::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                            silu: bool) -> Tuple[Tensor, Tensor]:
    return _ln_bwd_triton(dy, x, weight, bias, mean, rstd, silu)


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dy, x, weight, bias, mean, rstd, silu):
    groups = 1 if weight.dim() == 1 else weight.shape[0]
    return x.new_empty(x.shape), x.new_empty((2, groups, x.shape[-1]), dtype=torch.float32)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.silu = silu
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient: no zero tensors made for them


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    # mean and rstd are internal outputs (the public function drops them): no gradient flows in
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, sums = _layer_norm_backward_op(dy, x, weight, bias, mean, rstd, ctx.silu)
    dw = sums[0].reshape(weight.shape).to(weight.dtype)
    db = sums[1].reshape(bias.shape).to(bias.dtype)
    return dx, dw, db, None, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# --------------------------------------------------------------------------- #
# Public entry point                                                           #
# --------------------------------------------------------------------------- #
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, act: str = "none",
               impl: str = "ref") -> Tensor:
    """act(LayerNorm(x)·w + b) over the last axis, act in :data:`ACTS`.

    x (..., D); weight, bias (D,), or one set per leading slice of x: (G, 1, D) or (G, D) for
    x (G, ..., D).  Returns x's shape and, on the Triton path, x's dtype whatever the weights'
    (float32 statistics and affine inside); the reference is ``F.layer_norm`` under the caller's
    autocast.  Differentiable in x, weight and bias.
    """
    if act not in ACTS:
        raise ValueError(f"act {act!r}: allowed values are {', '.join(map(repr, ACTS))}")
    d = x.shape[-1]
    if weight.shape[-1] != d or weight.shape != bias.shape or weight.dim() not in (1, 2, 3) or (
            weight.dim() > 1 and (weight.numel() != weight.shape[0] * d or x.dim() < 2 or x.shape[0] != weight.shape[0])):
        raise ValueError(f"weight/bias {tuple(weight.shape)}/{tuple(bias.shape)} do not fit x {tuple(x.shape)}: "
                         "(D,), or (G, 1, D) / (G, D) with x (G, ..., D)")
    if check_impl(impl, x) == "ref":
        return layer_norm_ref(x, weight, bias, eps, act)
    y, _mean, _rstd = _layer_norm_op(x, weight, bias, float(eps), act == "silu")
    return y
