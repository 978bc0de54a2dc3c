import math

import pytest
import torch
import torch.nn.functional as F

from matwm_fast import kernels

# (B, H, L, D): batch not a multiple of any block, cache lengths 1 / 7 / 64, and
# head dims that are and are not powers of two.
SHAPES = [(5, 3, 7, 16), (37, 2, 1, 8), (4, 2, 64, 64), (3, 2, 20, 24)]


def _inputs(B, H, L, D, dtype, device, kv_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(device, dtype)  # (B, H, D)
    k = torch.randn(B, H, L, D, generator=g).to(device, dtype)  # (B, H, L, D)
    v = torch.randn(B, H, L, D, generator=g).to(device, dtype)  # (B, H, L, D)
    kv_len = L if kv_len is None else kv_len
    kv_start = torch.randint(0, max(kv_len, 1), (B,), generator=g)  # (B,) varies per row
    kv_start[0] = 0  # full window
    if B > 1:
        kv_start[1] = kv_len  # no live key: must give zeros, not NaN
    if B > 2:
        kv_start[2] = kv_len - 1  # only the newest key
    return q, k, v, kv_start.to(device), torch.tensor(kv_len, device=device)


def _sdpa64(q, k, v, kv_start, kv_len):
    """Independent float64 oracle: SDPA with a boolean mask, rows without keys -> 0."""
    B, H, L, D = k.shape
    j = torch.arange(L, device=q.device)
    live = (j >= kv_start[:, None]) & (j < int(kv_len))  # (B, L)
    out = torch.zeros(B, H, D, dtype=torch.float64, device=q.device)
    rows = live.any(-1)
    if rows.any():
        o = F.scaled_dot_product_attention(
            q[rows].double().unsqueeze(2), k[rows].double(), v[rows].double(), attn_mask=live[rows][:, None, None, :]
        )  # (B', H, 1, D)
        out[rows] = o.squeeze(2)
    return out


def test_reference_matches_sdpa_oracle(device):
    for B, H, L, D in SHAPES:
        args = _inputs(B, H, L, D, torch.float64, device)
        torch.testing.assert_close(kernels.decode_attention_ref(*args), _sdpa64(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(impl, dtype, shape, device, tol):
    args = _inputs(*shape, dtype, device)
    out = kernels.decode_attention(*args, impl=impl)
    assert out.shape == args[0].shape and out.dtype == dtype
    expected = _sdpa64(*args)
    torch.testing.assert_close(out.double(), expected, **tol(dtype))
    assert torch.all(out[1] == 0)  # row without live keys


def test_partial_cache_and_len_shapes(impl, device, tol):
    """kv_len < L (the cache is preallocated), kv_len as (1,), int32 kv_start."""
    B, H, L, D = 7, 2, 16, 8
    for kv_len in (1, 5, 16):
        q, k, v, kv_start, _ = _inputs(B, H, L, D, torch.float32, device, kv_len=kv_len, seed=kv_len)
        # stale (finite) values beyond kv_len must be ignored; the model's caches are allocated
        # zeroed, so a dead slot holds a zero or a value of an earlier rollout, never NaN
        expected = _sdpa64(q, k, v, kv_start, kv_len)
        k[:, :, kv_len:] = 1e4
        v[:, :, kv_len:] = -1e4
        n = torch.tensor([kv_len], device=device, dtype=torch.int32)
        out = kernels.decode_attention(q, k, v, kv_start.to(torch.int32), n, impl=impl)
        torch.testing.assert_close(out.double(), expected, **tol(torch.float32))


def test_strided_cache(impl, device, tol):
    """k/v as a window of a larger buffer (non-contiguous L and H strides)."""
    B, H, L, D = 5, 3, 9, 16
    buf = torch.randn(B, 2 * H, L + 4, D, device=device)  # (B, 2H, L+4, D)
    k, v = buf[:, :H, 2 : L + 2], buf[:, H:, 1 : L + 1]
    q = torch.randn(B, 2, H, D, device=device)[:, 1]  # (B, H, D), non-contiguous
    kv_start = torch.tensor([0, 3, 8, 1, 5], device=device)
    kv_len = torch.tensor(L, device=device)
    out = kernels.decode_attention(q, k, v, kv_start, kv_len, impl=impl)
    torch.testing.assert_close(out.double(), _sdpa64(q, k, v, kv_start, kv_len), **tol(torch.float32))


def test_scale_is_inverse_sqrt_d(impl, device):
    """Two keys with value vectors e0/e1: output weight on key 1 = sigmoid((s1 - s0)/sqrt(D))."""
    D = 16
    q = torch.zeros(1, 1, D, device=device)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, D, device=device)
    k[0, 0, 1, 0] = 2.0  # s1 - s0 = 2
    v = torch.zeros(1, 1, 2, D, device=device)
    v[0, 0, 0, 0] = 1.0
    v[0, 0, 1, 1] = 1.0
    out = kernels.decode_attention(q, k, v, torch.zeros(1, dtype=torch.long, device=device), torch.tensor(2, device=device), impl=impl)
    w1 = 1 / (1 + math.exp(-2 / math.sqrt(D)))
    torch.testing.assert_close(out[0, 0, :2].cpu(), torch.tensor([1 - w1, w1]), rtol=1e-6, atol=1e-6)


def test_bad_shapes_raise():
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        kernels.decode_attention(q, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.zeros(2), torch.tensor(5))
