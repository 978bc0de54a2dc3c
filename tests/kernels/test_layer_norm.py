"""``kernels.layer_norm``: LayerNorm (+ SiLU) forward and backward against a float64 oracle."""

import pytest
import torch
import torch.nn.functional as F

from matwm_fast import kernels

# (x shape, weight shape): shared weights on 2-D and 4-D inputs, per-group weights as (G, 1, D)
# and (G, D); widths that are and are not powers of two, one row, rows not a multiple of a block
CASES = [((7, 5), (5,)), ((2, 3, 6, 20), (20,)), ((1, 64), (64,)), ((3, 11, 33), (3, 1, 33)), ((4, 9, 16), (4, 16))]
ACTS = ["none", "silu"]


def _inputs(xs, ws, dtype, wdtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(xs, generator=g) + 1).to(device, dtype).requires_grad_()  # (..., D), mean ≠ 0
    w = (1 + 0.3 * torch.randn(ws, generator=g)).to(device, wdtype).requires_grad_()
    b = (0.2 * torch.randn(ws, generator=g)).to(device, wdtype).requires_grad_()
    return x, w, b


def _oracle(x, w, b, act, eps=1e-5):
    """float64 by the definition: per-row mean and biased variance, per-group affine."""
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    shape = (w.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],) if w.dim() > 1 else w.shape
    y = (x - mean) / torch.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)
    return y * torch.sigmoid(y) if act == "silu" else y


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + "-w" + "x".join(map(str, c[1])))
def test_forward_and_backward_match_float64(impl, case, dtype, act, device, tol):
    """Forward and all three gradients; float32 weights (the trained parameters) with an x of
    ``dtype``: the reference goes through autocast's dtype rules (here: none), Triton keeps x's dtype."""
    xs, ws = case
    wdtype = dtype if impl == "ref" else torch.float32  # aten's LayerNorm takes one dtype
    x, w, b = _inputs(xs, ws, dtype, wdtype, device)
    y = kernels.layer_norm(x, w, b, 1e-5, act, impl=impl)
    assert y.shape == x.shape and y.dtype == dtype
    g = torch.randn(xs, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    got = _grads(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = _oracle(x64, w64, b64, act)
    want = _grads(y64, (x64, w64, b64), g.double())
    t = tol(dtype)
    torch.testing.assert_close(y.double(), y64, **t)
    for name, a, e in zip(("dx", "dw", "db"), got, want):
        assert a.dtype == (dtype if name == "dx" else wdtype) and a.shape == e.shape, name
        # weight gradients sum over rows: scale the tolerance by the largest term's size
        scale = e.abs().max().clamp_min(1.0) if name != "dx" else 1.0
        torch.testing.assert_close(a.double() / scale, e / scale, **t, msg=name)


def test_bf16_weights_with_bf16_x(needs_triton, device, tol):
    """A low-precision twin's weights are read as they are (bf16 in, bf16 out)."""
    x, w, b = _inputs((5, 3, 24), (5, 1, 24), torch.bfloat16, torch.bfloat16, device, seed=1)
    with torch.no_grad():
        y = kernels.layer_norm(x, w, b, 1e-5, "silu", impl="triton")
    torch.testing.assert_close(y.double(), _oracle(x, w, b, "silu"), **tol(torch.bfloat16))


def test_reference_is_the_modules_maths(device):
    """impl='ref' computes exactly what nn.LayerNorm → nn.SiLU did (so the reference path is unchanged)."""
    x, w, b = _inputs((6, 10), (10,), torch.float32, torch.float32, device)
    ln = torch.nn.LayerNorm(10).to(device)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    assert torch.equal(kernels.layer_norm(x, w, b, ln.eps, "silu", impl="ref"), F.silu(ln(x)))


def test_under_autocast_the_triton_path_keeps_bf16(needs_triton, device):
    """The fused op is not an autocast op: a bf16 activation with float32 weights stays bf16 (no
    casts either side), and float32 gradients reach the float32 weights."""
    x, w, b = _inputs((8, 12), (12,), torch.bfloat16, torch.float32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = kernels.layer_norm(x, w, b, 1e-5, "silu", impl="triton")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_bad_arguments_raise():
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="act 'relu'"):
        kernels.layer_norm(x, torch.ones(8), torch.zeros(8), act="relu")
    with pytest.raises(ValueError, match="do not fit"):
        kernels.layer_norm(x, torch.ones(7), torch.zeros(7))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.layer_norm(x, torch.ones(2, 1, 8), torch.zeros(2, 1, 8))  # 2 groups, x has 3 slices
