import pytest
import torch

from matwm_fast import kernels

BINS = torch.linspace(-20.0, 20.0, 255)


def _targets(M, bins, seed=0):
    """Random symlog targets plus the edge cases: exactly on bins, endpoints, out of range, near edges."""
    g = torch.Generator().manual_seed(seed)
    t = (bins[-1] - bins[0]) * 0.6 * (torch.rand(M, generator=g) - 0.5)  # (M,)
    step = float(bins[1] - bins[0])
    a, b = bins[min(3, len(bins) - 1)], bins[min(10, len(bins) - 1)]
    specials = [
        a, bins[0], bins[-1], bins[0] - 5, bins[-1] + 5,  # on a bin, ends, clamped
        b + 1e-6 * step, b - 1e-6 * step, bins[-2] + 0.5 * step,  # near edges
    ]
    n = min(M, len(specials))
    t[:n] = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in specials[:n]])
    return t


def _twohot_loop(t, bins):
    """Brute force: scan the bins in Python."""
    t = min(max(t, bins[0]), bins[-1])
    w = [0.0] * len(bins)
    for i in range(len(bins) - 1):
        if bins[i] <= t <= bins[i + 1]:
            a = (bins[i + 1] - t) / (bins[i + 1] - bins[i])
            w[i], w[i + 1] = a, 1 - a
            return w
    raise AssertionError


# ----------------------------------------------------------------------------- #
# twohot_ref                                                                    #
# ----------------------------------------------------------------------------- #
def test_twohot_ref_matches_loop():
    bins = torch.linspace(-3.0, 3.0, 13).double()
    t = torch.tensor([-7.0, -3.0, -2.9, -0.25, 0.0, 0.1, 1.5, 2.99, 3.0, 9.0]).double()
    tw = kernels.twohot_ref(t, bins)
    assert tw.shape == (10, 13) and tw.dtype == torch.float64
    expected = torch.tensor([_twohot_loop(float(x), bins.tolist()) for x in t], dtype=torch.float64)
    torch.testing.assert_close(tw, expected, rtol=1e-12, atol=1e-12)


def test_twohot_ref_properties():
    t = _targets(64, BINS)
    tw = kernels.twohot_ref(t, BINS)  # (M, NB)
    assert tw.dtype == torch.float32
    assert torch.all(tw >= 0) and torch.all((tw > 0).sum(-1) <= 2)
    torch.testing.assert_close(tw.sum(-1), torch.ones(64))
    # the expectation over bins recovers the (clamped) target: the point of two-hot
    torch.testing.assert_close(tw.double() @ BINS.double(), t.clamp(BINS[0], BINS[-1]).double(), rtol=0, atol=1e-5)
    # exact one-hot on a bin, at both ends and when clamped
    for row, j in ((0, 3), (1, 0), (2, 254), (3, 0), (4, 254)):
        onehot = torch.zeros(255)
        onehot[j] = 1.0
        assert torch.equal(tw[row], onehot), row


def test_twohot_ref_leading_dims():
    t = _targets(12, BINS).reshape(3, 4)
    assert torch.equal(kernels.twohot_ref(t, BINS), kernels.twohot_ref(t.reshape(12), BINS).reshape(3, 4, 255))


# ----------------------------------------------------------------------------- #
# twohot_ce forward / backward vs float64                                        #
# ----------------------------------------------------------------------------- #
def _loss64(logits, target, bins):
    """The float64 reference on the logits' device: targets and bins follow the logits there (on
    CUDA a CPU ``bins`` is a device mismatch, which the CPU alone never shows)."""
    x = logits.detach().double().requires_grad_(True)
    loss = kernels.twohot_ce_ref(x, target.to(x.device).double(), bins.to(x.device).double())
    return x, loss


def test_reference_helper_puts_every_input_on_the_logits_device(monkeypatch):
    """What failed on the first GPU (2026-11-27): callers pass the module's CPU ``BINS`` with CUDA
    logits.  Meta tensors stand in for a second device, so this runs on the CPU."""
    seen = []
    monkeypatch.setattr(kernels, "twohot_ce_ref", lambda *a: seen.append([t.device.type for t in a]) or a[0].sum(-1))
    _loss64(torch.randn(3, 255, device="meta"), _targets(3, BINS), BINS)
    assert seen == [["meta", "meta", "meta"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,NB", [(5, 255), (37, 255), (37, 17), (1, 2)])
def test_forward_backward_match_float64(impl, dtype, M, NB, device, tol):
    bins = torch.linspace(-20.0, 20.0, NB) if NB > 2 else torch.tensor([-1.0, 1.0])
    target = _targets(M, bins, seed=M).to(device)
    bins = bins.to(device)
    g = torch.Generator().manual_seed(NB)
    logits = (3 * torch.randn(M, NB, generator=g)).to(device, dtype).requires_grad_(True)  # (M, NB)
    grad_out = torch.rand(M, generator=g).to(device)  # (M,)

    loss = kernels.twohot_ce(logits, target, bins, impl=impl)
    assert loss.shape == (M,) and loss.dtype == torch.float32
    (dlogits,) = torch.autograd.grad(loss, logits, grad_out)
    assert dlogits.dtype == dtype

    x64, loss64 = _loss64(logits, target, bins)
    (d64,) = torch.autograd.grad(loss64, x64, grad_out.double())
    # The loss is computed in fp32 from (possibly bf16) logits, so it has fp32 accuracy.
    torch.testing.assert_close(loss.double(), loss64, **tol(torch.float32))
    torch.testing.assert_close(dlogits.double(), d64, **tol(dtype))


def test_backward_of_mean_and_leading_dims(impl, device, tol):
    """loss.mean() sends an expanded (stride-0) grad; (B, T, NB) logits keep their shape."""
    B, T, NB = 3, 5, 255
    target = _targets(B * T, BINS).reshape(B, T).to(device)
    logits = torch.randn(B, T, NB, device=device, requires_grad=True)
    loss = kernels.twohot_ce(logits, target, BINS.to(device), impl=impl)
    assert loss.shape == (B, T)
    loss.mean().backward()
    x64, loss64 = _loss64(logits, target, BINS)
    loss64.mean().backward()
    torch.testing.assert_close(loss.double(), loss64, **tol(torch.float32))
    torch.testing.assert_close(logits.grad.double(), x64.grad, **tol(torch.float32))


def test_row_strided_logits(impl, device, tol):
    """Logits as a column slice of a wider head output (row stride != NB)."""
    M, NB = 9, 255
    wide = torch.randn(M, NB + 7, device=device, requires_grad=True)  # (M, NB + 7)
    logits = wide[:, 3 : 3 + NB]
    target = _targets(M, BINS).to(device)
    loss = kernels.twohot_ce(logits, target, BINS.to(device), impl=impl)
    loss.sum().backward()
    x64, loss64 = _loss64(logits, target, BINS)
    loss64.sum().backward()
    torch.testing.assert_close(loss.double(), loss64, **tol(torch.float32))
    torch.testing.assert_close(wide.grad[:, 3 : 3 + NB].double(), x64.grad, **tol(torch.float32))
    assert torch.all(wide.grad[:, :3] == 0) and torch.all(wide.grad[:, 3 + NB :] == 0)


def test_no_gradient_to_target(impl, device):
    target = _targets(4, BINS).to(device).requires_grad_(True)
    logits = torch.randn(4, 255, device=device, requires_grad=True)
    kernels.twohot_ce(logits, target, BINS.to(device), impl=impl).sum().backward()
    assert logits.grad is not None
    assert target.grad is None or torch.all(target.grad == 0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        kernels.twohot_ce(torch.randn(4, 255), torch.zeros(4), torch.linspace(-1, 1, 254))
    with pytest.raises(ValueError):
        kernels.twohot_ce(torch.randn(4, 255), torch.zeros(5), BINS)


def test_fused_twohot_weights_match_ref(impl, device):
    """With zero logits and grad 1, dlogits = 1/NB - twohot: read back the kernel's weights.

    Targets sit on every bin and a hair either side of it, where the kernel's
    floor((t - lo) / step) can round into the neighbouring bin.
    """
    NB = 255
    eps = torch.tensor([0.0, 1e-5, -1e-5, 0.5 * float(BINS[1] - BINS[0])])
    target = (BINS[:, None] + eps[None, :]).reshape(-1).to(device)  # (M,)
    logits = torch.zeros(target.shape[0], NB, device=device, requires_grad=True)
    kernels.twohot_ce(logits, target, BINS.to(device), impl=impl).sum().backward()
    tw = 1.0 / NB - logits.grad
    torch.testing.assert_close(tw, kernels.twohot_ref(target, BINS.to(device)), rtol=0, atol=2e-5)
