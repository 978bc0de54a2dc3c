"""A small causal transformer with a preallocated key/value cache (gpt-fast style).

Three entry points share one set of weights:

* ``forward``  — a whole sequence (training), causal and segment-masked;
* ``prefill``  — the same pass over a context, also writing every token's keys/values into the cache;
* ``decode``   — one new token per row against the cache.  The write slot is either a device
  tensor (static shapes: one compiled graph serves every slot) or, in a rollout unrolled on the
  host, a Python int — then the step also reads only the slots written so far (L + t + 1 of
  L + H in imagined step t) instead of scoring the whole cache and masking the rest.

Attention never crosses an episode boundary: a token attends to earlier tokens of its own segment
(``attn_mask`` in training/prefill, ``kv_start`` in decode).  Positions are counted from the start
of the token's segment (SPEC §2 CHOICE), so the model sees the same positions in training,
imagination and acting.  Every LayerNorm is ``kernels.layer_norm`` of the model's ``kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .kernels import decode_attention
from .nn import norm

Tensor = torch.Tensor


@dataclass
class KVCache:
    """Keys and values, one (B, heads, L, head_dim) tensor per layer, allocated once.

    One tensor per layer rather than one (layers, …) tensor: a write into ``k[i]`` of a stacked
    cache is a write through a view, which a compiled graph functionalises into a copy of the whole
    stack (``select_scatter``) at every decode step; a write into a layer's own tensor stays an
    in-place ``index_put_`` of a few rows (tests/test_world_model.py checks both backends)."""

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]

    @staticmethod
    def allocate(layers: int, batch: int, heads: int, length: int, head_dim: int, device, dtype) -> "KVCache":
        def zeros() -> tuple[Tensor, ...]:  # zeroed once: a slot never read holds no NaN
            return tuple(torch.zeros(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(layers))

        return KVCache(zeros(), zeros())

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def tensors(self) -> tuple[Tensor, ...]:
        return self.k + self.v


def segment_mask(first: Tensor) -> tuple[Tensor, Tensor]:
    """Causal same-episode mask and in-episode positions from episode-start flags.

    first: (B, T) bool, True where an episode starts (the window's step 0 always starts a segment).
    Returns mask (B, T, T) bool — query i may attend key j iff j ≤ i and both lie in one segment —
    and positions (B, T) long, the step index since the segment's start.

    The segment id is the count of starts so far; whether step 0 is flagged only shifts every id
    of a row by one, which the equality test ignores, so ``first`` is used as it is (no copy with
    step 0 set: two kernels fewer per call).
    """
    b, t = first.shape
    seg = torch.cumsum(first, dim=1)  # (B, T) long: segment id, up to a per-row shift
    idx = torch.arange(t, device=first.device)  # (T,)
    causal = idx[None, :, None] >= idx[None, None, :]  # (1, T, T)
    mask = causal & (seg[:, :, None] == seg[:, None, :])  # (B, T, T)
    # position = i − (index of the segment's first step) = i − max_{j ≤ i, start_j} j; step 0
    # counts as a start either way (its index is the 0 that unflagged steps contribute)
    start_idx = torch.where(first, idx, 0).cummax(dim=1).values  # (B, T)
    return mask, idx[None] - start_idx


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d, masked) · v for q, k, v (B, H, T, hd), mask (B, 1, T, T) bool → (B, H, T, hd).

    Written out rather than PyTorch's fused SDPA: our sequences are short (≤ 64), where the CPU's
    flash kernel (built for long ones) is slower — 1.3–1.7× in imagination's prefill and 2–5×
    for a bf16 training pass, forward and backward — and Inductor fuses these few ops itself.
    The softmax runs in float32 (bf16 scores would round the attention weights).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, T, T)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float64 stays float64
    scores = scores.masked_fill(~mask, float("-inf"))  # every query sees itself: no empty row
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)  # (B, H, T, hd)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + drop(MHA(LN(x))), then x + drop(FFN(LN(x))).

    Dropout acts in training mode only (the world model's update); decoding is imagination and
    acting, always in eval mode, so it has none."""

    def __init__(self, width: int, heads: int, ffn_mult: int, kernels: str = "ref", dropout: float = 0.0):
        super().__init__()
        self.heads, self.hd, self.kernels = heads, width // heads, kernels
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.SiLU(), nn.Linear(ffn_mult * width, width))
        self.drop = nn.Dropout(dropout)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        *lead, d = x.shape
        qkv = self.qkv(norm(self.ln1, x, self.kernels)).view(*lead, 3, self.heads, self.hd)  # (..., 3, H, hd)
        return qkv.unbind(-3)  # 3 × (..., H, hd)

    def forward(self, x: Tensor, mask: Tensor, cache_k: Tensor | None = None, cache_v: Tensor | None = None) -> Tensor:
        """x (B, T, D), mask (B, T, T) → (B, T, D); writes k/v to cache[:, :, :T] when given."""
        b, t, d = x.shape
        q, k, v = (y.transpose(1, 2) for y in self._qkv(x))  # 3 × (B, H, T, hd)
        if cache_k is not None:
            cache_k[:, :, :t] = k.to(cache_k.dtype)
            cache_v[:, :, :t] = v.to(cache_v.dtype)
        a = attend(q, k, v, mask[:, None])  # (B, H, T, hd)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))  # (B, T, D)
        return x + self.drop(self.ffn(norm(self.ln2, x, self.kernels)))

    def decode(self, x: Tensor, cache_k: Tensor, cache_v: Tensor, index: Tensor | int, kv_start: Tensor,
               kv_len: Tensor, live: int | None = None) -> Tensor:
        """x (B, D) at cache slot ``index`` → (B, D), attending slots kv_start ≤ j < kv_len.

        ``index`` is a 0-dim device tensor (one decode graph serves every slot: the compiled
        ``step`` rollout) or a Python int (an unrolled rollout, where each step's slot is fixed).
        ``live``, when given, is a host bound on kv_len: only ``cache[:, :, :live]`` is read, so
        imagined step t scores L + t + 1 slots rather than all L + H."""
        b, d = x.shape
        q, k, v = self._qkv(x)  # 3 × (B, H, hd)
        if isinstance(index, int):  # a fixed slot: a plain copy into it
            cache_k[:, :, index] = k.to(cache_k.dtype)
            cache_v[:, :, index] = v.to(cache_v.dtype)
        else:
            # a device index (no host sync) as an index_put_, which Inductor performs in place on
            # the static cache; a compiled index_copy_ became a copy of the whole cache per step
            slot = (slice(None), slice(None), index.view(1))
            cache_k[slot] = k.unsqueeze(2).to(cache_k.dtype)
            cache_v[slot] = v.unsqueeze(2).to(cache_v.dtype)
        keys, values = (cache_k, cache_v) if live is None else (cache_k[:, :, :live], cache_v[:, :, :live])
        a = decode_attention(q, keys, values, kv_start, kv_len, impl=self.kernels)  # (B, H, hd)
        x = x + self.proj(a.reshape(b, d).to(x.dtype))  # (B, D)
        return x + self.ffn(norm(self.ln2, x, self.kernels))


class CausalTransformer(nn.Module):
    """Learned positional embedding + ``layers`` pre-LN blocks + final LayerNorm."""

    def __init__(self, width: int, layers: int, heads: int, ffn_mult: int, max_len: int, kernels: str = "ref",
                 dropout: float = 0.0):
        super().__init__()
        self.width, self.n_layers, self.heads, self.max_len, self.kernels = width, layers, heads, max_len, kernels
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, ffn_mult, kernels, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def allocate_cache(self, batch: int, length: int, device, dtype=torch.float32) -> KVCache:
        return KVCache.allocate(self.n_layers, batch, self.heads, length, self.width // self.heads, device, dtype)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor, cache: KVCache | None = None) -> Tensor:
        """x (B, T, D), pos (B, T), mask (B, T, T) → h (B, T, D); prefills ``cache`` when given."""
        x = x + self.pos(pos)
        for i, blk in enumerate(self.blocks):
            if cache is None:
                x = blk(x, mask)
            else:
                x = blk(x, mask, cache.k[i], cache.v[i])
        return norm(self.ln_f, x, self.kernels)

    def decode(self, x: Tensor, pos: Tensor, cache: KVCache, index: Tensor, kv_start: Tensor) -> Tensor:
        """One token per row: x (B, D), pos (B,) → h (B, D); keys kv_start ≤ j ≤ index are attended."""
        return self.decode_embedded(x + self.pos(pos), cache, index, kv_start, index + 1)

    def decode_embedded(self, x: Tensor, cache: KVCache, index: Tensor | int, kv_start: Tensor, kv_len: Tensor,
                        live: int | None = None) -> Tensor:
        """:meth:`decode` of a token whose positional embedding is already in x (imagination adds a
        rollout's embeddings once, for all its steps); kv_len (0-dim device tensor) bounds the
        attended slots, ``live`` the slots read (see :meth:`Block.decode`)."""
        for i, blk in enumerate(self.blocks):
            x = blk.decode(x, cache.k[i], cache.v[i], index, kv_start, kv_len, live)
        return norm(self.ln_f, x, self.kernels)
