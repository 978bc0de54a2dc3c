"""Fused two-hot cross-entropy (DreamerV3 reward / value heads), forward and backward.

A scalar target t (already symlog-transformed) is spread over the two bins
that bracket it, with i such that bins[i] <= t <= bins[i+1]:

    w_i = (bins[i+1] - t) / (bins[i+1] - bins[i]),   w_{i+1} = 1 - w_i

(t clamped to [bins[0], bins[-1]] first; t equal to a bin gives an exact one-hot).
The loss is the cross-entropy against that distribution:

    loss[m]   = -sum_j tw[m,j] log_softmax(x[m])_j = lse[m] - (w_i x_i + w_{i+1} x_{i+1})
    dloss/dx  = softmax(x[m]) - tw[m]          (because sum_j tw[m,j] = 1)

The eager version materialises log_softmax (M, NB) and the (M, NB) two-hot and
keeps both for backward.  The fused forward reads the logits once and keeps only
lse (M,); the backward re-reads the logits and recomputes softmax = exp(x - lse)
and the two bins, so no (M, NB) temporary ever hits memory.

In the kernel the bracketing bin comes from arithmetic on evenly spaced bins,
i = floor((t - bins[0]) / step), then one correction step against the actual
bins[i], bins[i+1] values (the division can round across a bin edge); the
weights always use the stored bin values, so they match `twohot_ref`.
"""

from typing import Tuple

import torch
from torch import Tensor

from ._triton_compat import cdiv, jit, next_pow2, tl
from .dispatch import check_impl

__all__ = ["twohot_ce", "twohot_ce_ref", "twohot_ref"]


# --------------------------------------------------------------------------- #
# Reference                                                                    #
# --------------------------------------------------------------------------- #
def twohot_ref(target: Tensor, bins: Tensor) -> Tensor:
    """Two-hot weights (..., NB) for targets (...) over sorted bins (NB,); float32 (or float64)."""
    acc = torch.promote_types(target.dtype, torch.float32)
    b = bins.to(acc)
    NB = b.shape[0]
    t = target.to(acc).clamp(b[0], b[-1])
    # Largest i with bins[i] <= t, kept in [0, NB-2] so i+1 exists (t == bins[-1]
    # then lands on i = NB-2 with all weight on the last bin).
    i = (torch.searchsorted(b, t.contiguous(), right=True) - 1).clamp(0, NB - 2)  # (...)
    lo, hi = b[i], b[i + 1]
    w_lo = (hi - t) / (hi - lo)  # (...)
    tw = torch.zeros(*t.shape, NB, dtype=acc, device=t.device)  # (..., NB)
    tw.scatter_(-1, i.unsqueeze(-1), w_lo.unsqueeze(-1))
    tw.scatter_add_(-1, (i + 1).unsqueeze(-1), (1.0 - w_lo).unsqueeze(-1))
    return tw


def twohot_ce_ref(logits: Tensor, target: Tensor, bins: Tensor) -> Tensor:
    """Eager two-hot cross-entropy (M,) in float32; autograd provides the backward."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    # The target is a fixed label (no gradient to target or bins), as in the fused op.
    tw = twohot_ref(target.detach().to(acc), bins.detach())  # (M, NB)
    logp = torch.log_softmax(logits.to(acc), dim=-1)  # (M, NB)
    return -(tw * logp).sum(dim=-1)


# --------------------------------------------------------------------------- #
# Triton kernels                                                               #
# --------------------------------------------------------------------------- #
@jit
def _twohot_bins(target_ptr, bins_ptr, rows, row_ok, NB):
    """Lower bin index i (int32) and weight on it, per row; see module docstring."""
    t = tl.load(target_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    lo = tl.load(bins_ptr).to(tl.float32)
    hi = tl.load(bins_ptr + NB - 1).to(tl.float32)
    t = tl.minimum(tl.maximum(t, lo), hi)
    i = tl.floor((t - lo) / ((hi - lo) / (NB - 1))).to(tl.int32)
    i = tl.minimum(tl.maximum(i, 0), NB - 2)
    b0 = tl.load(bins_ptr + i, mask=row_ok, other=0.0).to(tl.float32)
    b1 = tl.load(bins_ptr + i + 1, mask=row_ok, other=1.0).to(tl.float32)
    i = tl.where(t < b0, i - 1, tl.where(t > b1, i + 1, i))
    i = tl.minimum(tl.maximum(i, 0), NB - 2)
    b0 = tl.load(bins_ptr + i, mask=row_ok, other=0.0).to(tl.float32)
    b1 = tl.load(bins_ptr + i + 1, mask=row_ok, other=1.0).to(tl.float32)
    w_lo = (b1 - t) / (b1 - b0)
    return i, w_lo


@jit
def _twohot_tile(cols, i, w_lo):
    # (BLOCK_M, BLOCK_N) two-hot weights built in registers, never stored.
    c = cols[None, :]
    return tl.where(c == i[:, None], w_lo[:, None], 0.0) + tl.where(c == i[:, None] + 1, 1.0 - w_lo[:, None], 0.0)


@jit
def _twohot_ce_fwd_kernel(
    logits_ptr, target_ptr, bins_ptr, loss_ptr, lse_ptr,
    M, NB, stride_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < NB)[None, :]  # (BLOCK_M, BLOCK_N)
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_m + cols[None, :], mask=ok, other=0.0)
    # Finite sentinel: exp(-1e30 - m) = 0 on padded columns, padded rows stay
    # NaN-free, and tw * x = 0 * -1e30 = 0 there.
    x = tl.where(ok, x.to(tl.float32), -1.0e30)
    m = tl.max(x, axis=1)
    lse = m + tl.log(tl.sum(tl.exp(x - m[:, None]), axis=1))  # (BLOCK_M,)
    i, w_lo = _twohot_bins(target_ptr, bins_ptr, rows, row_ok, NB)
    tw = _twohot_tile(cols, i, w_lo)
    loss = lse - tl.sum(tw * x, axis=1)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@jit
def _twohot_ce_bwd_kernel(
    grad_ptr, logits_ptr, target_ptr, bins_ptr, lse_ptr, dlogits_ptr,
    M, NB, stride_g, stride_m, stride_dm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < NB)[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_m + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # stride_g may be 0: the grad of loss.sum()/mean() arrives as an expanded scalar.
    g = tl.load(grad_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32)
    i, w_lo = _twohot_bins(target_ptr, bins_ptr, rows, row_ok, NB)
    p = tl.exp(x - lse[:, None])  # softmax recomputed from the saved logsumexp
    d = g[:, None] * (p - _twohot_tile(cols, i, w_lo))
    tl.store(dlogits_ptr + rows64[:, None] * stride_dm + cols[None, :], d.to(dlogits_ptr.dtype.element_ty), mask=ok)


def _launch_config(M: int, NB: int) -> tuple[int, int]:
    BLOCK_N = next_pow2(NB)
    # ~2048 elements per program (8 rows of 255 bins): enough work per program
    # to hide latency, few enough registers at 4 warps to avoid spills.
    BLOCK_M = min(max(1, 2048 // BLOCK_N), next_pow2(M))
    return BLOCK_M, BLOCK_N


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _twohot_ce_fwd_triton(logits: Tensor, target: Tensor, bins: Tensor) -> tuple[Tensor, Tensor]:
    M, NB = logits.shape
    logits, target, bins = _rows(logits), target.contiguous(), bins.contiguous()
    loss = torch.empty((M,), dtype=torch.float32, device=logits.device)  # (M,)
    lse = torch.empty((M,), dtype=torch.float32, device=logits.device)  # (M,)
    if M == 0:
        return loss, lse
    BLOCK_M, BLOCK_N = _launch_config(M, NB)
    _twohot_ce_fwd_kernel[(cdiv(M, BLOCK_M),)](
        logits, target, bins, loss, lse, M, NB, logits.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return loss, lse


def _twohot_ce_bwd_triton(grad: Tensor, logits: Tensor, target: Tensor, bins: Tensor, lse: Tensor) -> Tensor:
    M, NB = logits.shape
    logits, target, bins = _rows(logits), target.contiguous(), bins.contiguous()
    dlogits = torch.empty((M, NB), dtype=logits.dtype, device=logits.device)  # (M, NB)
    if M == 0:
        return dlogits
    BLOCK_M, BLOCK_N = _launch_config(M, NB)
    _twohot_ce_bwd_kernel[(cdiv(M, BLOCK_M),)](
        grad, logits, target, bins, lse, dlogits,
        M, NB, grad.stride(0), logits.stride(0), dlogits.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
    )
    return dlogits


# --------------------------------------------------------------------------- #
# Custom ops: forward returns (loss, lse); backward is its own op so that       #
# AOTAutograd can trace it through the fake impl.                               #
# --------------------------------------------------------------------------- #
@torch.library.custom_op("matwm::twohot_ce", mutates_args=())
def _twohot_ce_op(logits: Tensor, target: Tensor, bins: Tensor) -> Tuple[Tensor, Tensor]:
    return _twohot_ce_fwd_triton(logits, target, bins)


@_twohot_ce_op.register_fake
def _twohot_ce_fake(logits, target, bins):
    M = logits.shape[0]
    return logits.new_empty((M,), dtype=torch.float32), logits.new_empty((M,), dtype=torch.float32)  # (M,) x2


@torch.library.custom_op("matwm::twohot_ce_backward", mutates_args=())
def _twohot_ce_backward_op(grad: Tensor, logits: Tensor, target: Tensor, bins: Tensor, lse: Tensor) -> Tensor:
    return _twohot_ce_bwd_triton(grad, logits, target, bins, lse)


@_twohot_ce_backward_op.register_fake
def _twohot_ce_backward_fake(grad, logits, target, bins, lse):
    return logits.new_empty(logits.shape)  # (M, NB)


def _twohot_ce_setup(ctx, inputs, output):
    logits, target, bins = inputs
    _loss, lse = output
    ctx.save_for_backward(logits, target, bins, lse)
    ctx.set_materialize_grads(False)  # lse gets no gradient: no zero tensor made for it per call


def _twohot_ce_backward(ctx, grad_loss, grad_lse):
    # lse is an internal output (the public function drops it), so grad_lse is ignored.
    logits, target, bins, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None
    return _twohot_ce_backward_op(grad_loss, logits, target, bins, lse), None, None


_twohot_ce_op.register_autograd(_twohot_ce_backward, setup_context=_twohot_ce_setup)


# --------------------------------------------------------------------------- #
# Public entry point                                                           #
# --------------------------------------------------------------------------- #
def twohot_ce(logits: Tensor, target: Tensor, bins: Tensor, impl: str = "ref") -> Tensor:
    """Symlog two-hot cross-entropy.

    logits (M, NB) (or (..., NB)), target (M,) (or (...)) already in symlog
    space, bins (NB,) sorted and evenly spaced.  Returns the per-row loss
    (M,) (or (...)) in float32.  Differentiable w.r.t. logits only.
    """
    NB = logits.shape[-1]
    if bins.dim() != 1 or bins.shape[0] != NB or NB < 2:
        raise ValueError(f"bins must be (NB,) with NB = logits.shape[-1] >= 2; got {tuple(bins.shape)} for NB={NB}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} != logits.shape[:-1] {tuple(logits.shape[:-1])}")
    rows, flat = logits.reshape(-1, NB), target.reshape(-1)  # (M, NB), (M,): both impls see rows
    if check_impl(impl, logits) == "ref":
        loss = twohot_ce_ref(rows, flat, bins)
    else:
        loss, _lse = _twohot_ce_op(rows, flat, bins)
    return loss.reshape(target.shape)
