"""Policy sampling: Gumbel-max over each agent's available actions, one kernel.

Each row is one categorical policy over A actions; action a of agent i is unavailable where
``invalid[i, a]`` (padded actions), and its logit is replaced by -1e9 before the draw:

    a* = argmax_a (logit_a + g_a),   g_a = -log(-log(u_a)),   u_a ~ U(0, 1)

which is an exact draw from softmax(logits) (the Gumbel-max trick), with the uniform clamped to
[tiny, 1 - 1e-7] so that neither log sees 0.  Eagerly that is a cast, a mask, a uniform draw, a
clamp, two logs, two negations, an add and an argmax per imagined step — ten kernels; fused, one.

Random numbers as in ``sample_latent``: with ``noise`` given (uniforms shaped like the logits)
both implementations draw the same actions (ties apart); without it the reference uses
torch.rand and the Triton kernel ``tl.rand(seed, counter + offset)`` with seed and offset read
from device memory, one counter per (row, action), so a CUDA graph draws afresh on every replay
when the caller passes a seed drawn inside the graph (or bumps the offset by ≥ rows·A).

Forward only: sampling has no gradient.
"""

from typing import Optional

import torch
from torch import Tensor

from ._triton_compat import cdiv, jit, next_pow2, tl
from .dispatch import check_impl

__all__ = ["sample_action", "sample_action_ref"]

_MASKED = -1e9  # the logit of an unavailable action (the policy's own mask value)
_U_HIGH = 1.0 - 1e-7  # largest uniform used: -log(-log(u)) stays finite


# --------------------------------------------------------------------------- #
# Reference                                                                    #
# --------------------------------------------------------------------------- #
def sample_action_ref(logits: Tensor, invalid: Tensor, noise: Tensor | None = None) -> Tensor:
    """Eager reference: logits (n, B, A), invalid (n, A) bool, noise (n, B, A) or None → (n, B) long."""
    masked = logits.to(torch.promote_types(logits.dtype, torch.float32)).masked_fill(invalid[:, None], _MASKED)
    if noise is None:
        noise = torch.rand_like(masked)
    tiny = torch.finfo(noise.dtype).tiny
    gumbel = -torch.log(-torch.log(noise.clamp(tiny, _U_HIGH)))  # (n, B, A)
    return (masked + gumbel).argmax(-1)


# --------------------------------------------------------------------------- #
# Triton kernel                                                                #
# --------------------------------------------------------------------------- #
@jit
def _sample_action_kernel(
    logits_ptr, invalid_ptr, noise_ptr, seed_ptr, offset_ptr, out_ptr,
    R, B, A, tiny,
    HAS_NOISE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    # rows r = (agent i, trajectory b) flattened, i = r // B; one policy per row in one tile
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_A)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < A)[None, :]  # (BLOCK_R, BLOCK_A)
    flat = rows.to(tl.int64)[:, None] * A + cols[None, :]
    x = tl.load(logits_ptr + flat, mask=ok, other=0.0).to(tl.float32)
    bad = tl.load(invalid_ptr + (rows // B).to(tl.int64)[:, None] * A + cols[None, :], mask=ok, other=0)
    x = tl.where(bad != 0, -1.0e9, x)
    if HAS_NOISE:
        u = tl.load(noise_ptr + flat, mask=ok, other=0.5).to(tl.float32)
    else:
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
        u = tl.rand(seed, flat + offset)
    u = tl.minimum(tl.maximum(u, tiny), 0.9999999)
    score = x - tl.log(-tl.log(u))
    score = tl.where(ok, score, -float("inf"))  # padding columns never win
    choice = tl.argmax(score, axis=1)  # (BLOCK_R,) first maximum, as torch.argmax
    tl.store(out_ptr + rows, choice.to(tl.int64), mask=row_ok)


def _sample_action_triton(logits: Tensor, invalid: Tensor, noise: Tensor | None, seed: Tensor | None,
                          offset: Tensor | None) -> Tensor:
    n, B, A = logits.shape
    x = logits.contiguous()
    out = torch.empty((n, B), dtype=torch.int64, device=logits.device)  # (n, B)
    R = n * B
    if R == 0:
        return out
    has_noise = noise is not None
    if has_noise:
        noise = noise.contiguous()
    elif seed is None or offset is None:
        raise ValueError("sample_action (triton): need `noise`, or both `seed` and `offset`")
    BLOCK_A = next_pow2(A)
    BLOCK_R = min(max(1, 2048 // BLOCK_A), next_pow2(R))
    _sample_action_kernel[(cdiv(R, BLOCK_R),)](
        x, invalid.contiguous(),  # bool, read as is
        noise if has_noise else x,  # dummy pointers: the constexpr branch never reads them
        seed if not has_noise else x,
        offset if not has_noise else x,
        out, R, B, A, torch.finfo(torch.float32).tiny,
        HAS_NOISE=has_noise, BLOCK_R=BLOCK_R, BLOCK_A=BLOCK_A, num_warps=4,
    )
    return out


@torch.library.custom_op("matwm::sample_action", mutates_args=())
def _sample_action_op(logits: Tensor, invalid: Tensor, noise: Optional[Tensor], seed: Optional[Tensor],
                      offset: Optional[Tensor]) -> Tensor:
    return _sample_action_triton(logits, invalid, noise, seed, offset)


@_sample_action_op.register_fake
def _sample_action_fake(logits, invalid, noise, seed, offset):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)  # (n, B)


# --------------------------------------------------------------------------- #
# Public entry point                                                           #
# --------------------------------------------------------------------------- #
def sample_action(logits: Tensor, invalid: Tensor, noise: Tensor | None = None, seed: Tensor | None = None,
                  offset: Tensor | None = None, impl: str = "ref") -> Tensor:
    """One action per row of each agent's policy: logits (n, B, A) unmasked, any float dtype;
    invalid (n, A) bool, True where agent i has no action a; noise (n, B, A) uniforms or None.
    Returns (n, B) long, never an invalid action.

    seed, offset: int64 device tensors (0-dim or (1,)) for the Triton generator when noise is
    None (a fresh seed is drawn from torch's generator when seed is None); ignored by the reference.
    """
    if logits.dim() != 3 or invalid.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"expected logits (n, B, A) and invalid (n, A); got {tuple(logits.shape)}, "
                         f"{tuple(invalid.shape)}")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != logits shape {tuple(logits.shape)}")
    if check_impl(impl, logits) == "ref":
        return sample_action_ref(logits, invalid, noise)
    if noise is None:
        if seed is None:
            seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=logits.device)
        if offset is None:
            offset = torch.zeros((), dtype=torch.int64, device=logits.device)
    return _sample_action_op(logits, invalid, noise, seed, offset)
