"""Single-query attention over a preallocated KV cache (imagination decoding).

During imagination the world model extends every trajectory by one token per
step.  Each row b has one new query q[b, h] and a cache k/v[b, h, :L] of which
keys j with kv_start[b] <= j < kv_len are live (kv_start masks the part of the
window that belongs to an earlier episode; kv_len is shared by all rows).

    out[b, h] = sum_j softmax_j(q[b,h] . k[b,h,j] / sqrt(D)) v[b,h,j]   over live j

kv_start and kv_len are *device* tensors so a CUDA graph captured once replays
with a different cache length: nothing here reads them on the host.  A row with
no live key gets a zero output (softmax over an empty set is undefined; zero is
what a padded row should contribute).

Dead slots are masked out of the *scores*, never by rewriting the values: a
decode step must not do work or allocate memory in proportion to the whole
cache beyond reading it once (the reference is also what Inductor compiles
under ``compile``/``cudagraphs``).  So the values in dead slots must be finite
(the model allocates its caches zeroed, once); they never affect the output.
Both implementations accumulate their dot products in float32 whatever the cache dtype.

Forward only: imagination runs under torch.no_grad.  Use impl='ref' if a
gradient is ever needed.
"""

import math

import torch
from torch import Tensor

from ._triton_compat import jit, next_pow2, tl
from .dispatch import check_impl

__all__ = ["decode_attention", "decode_attention_ref"]

_DEAD = -1.0e30  # the score of a dead key: finite, so that a row of dead keys softmaxes without NaN


# --------------------------------------------------------------------------- #
# Reference                                                                    #
# --------------------------------------------------------------------------- #
def decode_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor, kv_len: Tensor
) -> Tensor:
    """Eager reference: two batched matmuls over the cache in its own dtype, the dead keys
    masked out of the (B, H, L) scores, the softmax in float32 (float64 stays float64).

    Per step it allocates only (B, L) masks, (B, H, L) scores and the (B, H, D) output, never a
    tensor of the cache's size; the matmuls read the cache once and accumulate in float32.  (PyTorch's fused SDPA does the
    same maths, but its CPU kernel is built for long queries: 1.5–2× slower here for one.)

    The 1/√D scale multiplies the float32 scores (not q before the product: no conversions of q
    to and from float32), and dead keys get a finite -1e30 rather than -inf, so a row without a
    live key makes no NaN: its uniform weights are zeroed with the dead keys' afterwards, where
    live rows' are exactly 0 already (exp(-1e30 - max) underflows) — one mask for both.
    """
    B, H, L, D = k_cache.shape
    acc, out_dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    j = torch.arange(L, device=q.device)  # (L,)
    dead = ((j[None, :] < kv_start.reshape(B, 1)) | (j[None, :] >= kv_len.reshape(())))[:, None, :]  # (B, 1, L)
    scores = torch.matmul(q.to(k_cache.dtype).unsqueeze(2), k_cache.transpose(-1, -2)).squeeze(2)  # (B, H, L)
    scores = scores.to(acc) * (1.0 / math.sqrt(D))
    p = torch.softmax(scores.masked_fill_(dead, _DEAD), dim=-1).masked_fill(dead, 0.0)  # (B, H, L)
    return torch.matmul(p.to(v_cache.dtype).unsqueeze(2), v_cache).squeeze(2).to(out_dtype)  # (B, H, D)


# --------------------------------------------------------------------------- #
# Triton kernel                                                                #
# --------------------------------------------------------------------------- #
@jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, len_ptr, out_ptr,
    H, L, D,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh,
    qk_scale,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (row, head).  The whole cache of that head fits in one
    # (BLOCK_L, BLOCK_D) tile (L <= 64 in MATWM), so no online softmax is needed:
    # plain max-subtracted softmax over the tile, all in fp32.
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # int64: B*H*L*D can exceed 2**31 at large batch
    h = pid % H
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    start = tl.load(start_ptr + b).to(tl.int32)
    kv_len = tl.load(len_ptr).to(tl.int32)
    # j < L guards the power-of-two padding and a kv_len larger than the cache.
    live = (offs_l >= start) & (offs_l < kv_len) & (offs_l < L)  # (BLOCK_L,)
    tile_ok = live[:, None] & d_ok[None, :]  # (BLOCK_L, BLOCK_D); dead keys are never read

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)

    # qk_scale = log2(e)/sqrt(D): scores live in base-2 so we can use exp2
    # (softmax is invariant to the base once the max is subtracted).
    s = tl.sum(k * q[None, :], axis=1) * qk_scale  # (BLOCK_L,)
    # Finite sentinel instead of -inf: a row with no live key then gives
    # m = -1e30 and no inf - inf = NaN; `p` is zeroed on dead keys below anyway.
    s = tl.where(live, s, -1.0e30)
    m = tl.max(s, axis=0)
    p = tl.where(live, tl.exp2(s - m), 0.0)  # (BLOCK_L,)
    denom = tl.sum(p, axis=0)  # >= 1 if any key is live (the max contributes 2**0), else 0

    v_base = v_ptr + b * stride_vb + h * stride_vh
    v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    acc = tl.sum(p[:, None] * v, axis=0)  # (BLOCK_D,)
    # max(denom, 1) is exact when a key is live and turns 0/0 into 0/1 = 0 otherwise.
    out = acc / tl.maximum(denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _last_dim_contiguous(x: Tensor) -> Tensor:
    # The kernel assumes unit stride along D (vectorised loads); other strides are free.
    return x if x.stride(-1) == 1 else x.contiguous()


def _decode_attention_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor, kv_len: Tensor
) -> Tensor:
    B, H, L, D = k_cache.shape
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    out = q.new_empty((B, H, D))  # (B, H, D)
    BLOCK_L, BLOCK_D = next_pow2(L), next_pow2(D)
    # Tiny tiles: 2 warps hold a 32x64 fp32 tile in 32 registers/thread; go to 4
    # only for the larger caches so registers do not spill.
    num_warps = 2 if BLOCK_L * BLOCK_D <= 2048 else 4
    _decode_attention_kernel[(B * H,)](
        q, k_cache, v_cache, kv_start, kv_len, out,
        H, L, D,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        math.log2(math.e) / math.sqrt(D),
        BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------- #
# Custom op: opaque to torch.compile (fake impl gives the shape), graph-safe   #
# --------------------------------------------------------------------------- #
@torch.library.custom_op("matwm::decode_attention", mutates_args=())
def _decode_attention_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_start: Tensor, kv_len: Tensor
) -> Tensor:
    return _decode_attention_triton(q, k_cache, v_cache, kv_start, kv_len)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, kv_start, kv_len):
    B, H, L, D = k_cache.shape
    return q.new_empty((B, H, D))  # (B, H, D)


# --------------------------------------------------------------------------- #
# Public entry point                                                           #
# --------------------------------------------------------------------------- #
def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_start: Tensor,
    kv_len: Tensor,
    impl: str = "ref",
) -> Tensor:
    """Attention of one new query per row over the live part of a KV cache.

    q (B, H, D); k_cache, v_cache (B, H, L, D); kv_start (B,) int; kv_len 0-dim
    or (1,) int, all on q's device.  Key j of row b is attended iff
    kv_start[b] <= j < kv_len.  Returns (B, H, D) in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"expected q (B,H,D), k_cache = v_cache (B,H,L,D); got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if check_impl(impl, q) == "triton":
        return _decode_attention_op(q, k_cache, v_cache, kv_start, kv_len)
    return decode_attention_ref(q, k_cache, v_cache, kv_start, kv_len)
