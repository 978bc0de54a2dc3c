"""The math API: transforms, two-hot, λ-returns, KL with free bits, unimix, straight-through.

The two-hot weights and the straight-through estimator are tested as the model runs them: the
reference ops of ``matwm_fast.kernels`` (``twohot_ref`` inside ``twohot_ce_ref``,
``straight_through`` inside ``sample_latent``)."""

import math

import pytest
import torch

from matwm_fast.kernels import straight_through, twohot_ref
from matwm_fast import losses
from matwm_fast.losses import categorical_kl, kl_free_bits, lambda_returns, symexp, symlog, twohot_decode, unimix_probs


def test_symlog_symexp_inverse():
    x = torch.tensor([-1e4, -20.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(symlog(symexp(x.clamp(-30, 30))), x.clamp(-30, 30), rtol=1e-12, atol=1e-12)
    assert symlog(torch.tensor(math.e - 1)).item() == pytest.approx(1.0)
    assert symlog(torch.tensor(-(math.e - 1))).item() == pytest.approx(-1.0)


def test_twohot_round_trip_and_edges():
    bins = torch.linspace(-20, 20, 255, dtype=torch.float64)
    x = torch.empty(1000, dtype=torch.float64).uniform_(-20, 20)
    w = twohot_ref(x, bins)
    assert w.shape == (1000, 255)
    torch.testing.assert_close(w.sum(-1), torch.ones(1000, dtype=torch.float64))
    torch.testing.assert_close((w * bins).sum(-1), x)  # exact decode inside the range
    assert ((w > 0).sum(-1) <= 2).all()  # at most two neighbours carry mass
    # a value on a bin is one-hot on it; the ends are one-hot on the end bins
    on = twohot_ref(bins[[0, 17, 254]], bins)
    assert torch.equal(on.argmax(-1), torch.tensor([0, 17, 254])) and torch.allclose(on.max(-1).values, torch.ones(3, dtype=torch.float64))
    # out-of-range values clamp to the end bins
    out = twohot_ref(torch.tensor([-100.0, 100.0], dtype=torch.float64), bins)
    assert out[0, 0] == 1 and out[1, -1] == 1


def test_twohot_decode_inverts_a_twohot_target():
    """A head that puts a two-hot of symlog(y) decodes to y: symexp of the symlog-space mean."""
    bins = torch.linspace(-20, 20, 255)
    target = torch.tensor([3.5, -0.25, 0.0])
    logits = torch.log(twohot_ref(symlog(target), bins) + 1e-30)
    torch.testing.assert_close(twohot_decode(logits, bins), target, rtol=1e-4, atol=1e-4)


def test_lambda_returns_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    c = torch.tensor([[1.0, 0.0, 1.0]])
    v = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    g, lam = 0.9, 0.5
    g2 = 3 + g * 1 * ((1 - lam) * 40 + lam * 40)  # 39.0
    g1 = 2 + g * 0 * ((1 - lam) * 30 + lam * g2)  # 2.0 — terminal: no bootstrap
    g0 = 1 + g * 1 * ((1 - lam) * 20 + lam * g1)  # 1 + 0.9·(10 + 1) = 10.9
    torch.testing.assert_close(lambda_returns(r, c, v, g, lam), torch.tensor([[g0, g1, g2]]))
    # λ=0 is one-step TD, λ=1 with c=1 is the discounted Monte-Carlo sum bootstrapped by V_H
    ones = torch.ones(1, 3)
    torch.testing.assert_close(lambda_returns(r, ones, v, g, 0.0), r + g * v[:, 1:])
    mc0 = 1 + g * 2 + g**2 * 3 + g**3 * 40
    assert lambda_returns(r, ones, v, g, 1.0)[0, 0].item() == pytest.approx(mc0)
    with pytest.raises(ValueError):
        lambda_returns(r, c, v[:, :3], g, lam)


def test_kl_free_bits():
    k, c = 4, 3
    p = torch.softmax(torch.randn(5, k, c), -1)
    q = torch.softmax(torch.randn(5, k, c), -1)
    kl = (p * (p / q).log()).sum((-1, -2))
    torch.testing.assert_close(categorical_kl(p, q), kl)
    dyn, rep, raw = kl_free_bits(p, q, free_bits=1.0)
    torch.testing.assert_close(dyn, kl.clamp_min(1.0))
    torch.testing.assert_close(raw, kl)
    # identical distributions: KL 0, clipped to the free bits, and no gradient flows through the clip
    pp = p.clone().requires_grad_(True)
    dyn, rep, raw = kl_free_bits(pp, p.clone(), free_bits=1.0)
    assert torch.allclose(dyn, torch.ones(5)) and torch.allclose(raw, torch.zeros(5), atol=1e-6)
    rep.sum().backward()
    assert pp.grad.abs().max() == 0
    # dyn trains only the prior, rep only the posterior (stop-gradients of Eq. 3)
    post = torch.softmax(torch.randn(2, k, c), -1).requires_grad_(True)
    prior = torch.softmax(torch.randn(2, k, c), -1).requires_grad_(True)
    dyn, rep, _ = kl_free_bits(post, prior, free_bits=0.0)
    dyn.sum().backward(retain_graph=True)
    assert post.grad is None and prior.grad.abs().sum() > 0
    prior.grad = None
    rep.sum().backward()
    assert post.grad.abs().sum() > 0 and prior.grad is None


def test_unimix():
    logits = torch.tensor([[100.0, -100.0, -100.0, -100.0]])
    p = unimix_probs(logits, 0.01)
    torch.testing.assert_close(p, torch.tensor([[0.99 + 0.0025, 0.0025, 0.0025, 0.0025]]))
    torch.testing.assert_close(p.sum(-1), torch.ones(1))


def test_straight_through_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    probs = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(probs.argmax(-1), 5).float()
    st = straight_through(onehot, probs)
    assert torch.equal(st, onehot)  # forward is exactly the hard sample: onehot + (p − p) adds an exact 0
    w = torch.randn(3, 5)
    (st * w).sum().backward()
    g_st = logits.grad.clone()
    logits.grad = None
    (torch.softmax(logits, -1) * w).sum().backward()
    torch.testing.assert_close(g_st, logits.grad)  # backward is the softmax's


@pytest.mark.parametrize("m", [1, 2, 7, 9216])
def test_percentile_is_torch_quantile_without_a_quantile_tensor(m):
    """The return range's sorted-rank quantile equals torch.quantile's linear interpolation."""
    x = torch.randn(3, m, dtype=torch.float64)
    s = x.sort(dim=1).values
    for p in (0.0, 0.05, 0.5, 0.95, 1.0):
        torch.testing.assert_close(losses.percentile(s, p), torch.quantile(x, p, dim=1), rtol=0, atol=1e-12)
