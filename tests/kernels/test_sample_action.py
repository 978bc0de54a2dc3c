"""``kernels.sample_action``: Gumbel-max over each agent's available actions."""

import math

import pytest
import torch

from matwm_fast import kernels

SHAPES = [(3, 7, 5), (1, 1, 2), (4, 33, 9), (2, 5, 17)]  # (n, B, A)


def _case(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, _, a = shape
    logits = (3 * torch.randn(shape, generator=g)).to(device, dtype)  # (n, B, A)
    invalid = torch.rand(n, a, generator=g) < 0.3  # (n, A)
    invalid[:, 0] = False  # every agent has an action
    noise = torch.rand(shape, generator=g).to(device)  # (n, B, A)
    return logits, invalid.to(device), noise


def _gumbel_max64(logits, invalid, noise):
    """The definition in float64: argmax(masked logits − log(−log u))."""
    x = logits.double().masked_fill(invalid[:, None], -1e9)
    u = noise.double().clamp(torch.finfo(torch.float32).tiny, 1 - 1e-7)
    return (x - torch.log(-torch.log(u))).argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_same_noise_same_actions(impl, shape, dtype, device):
    logits, invalid, noise = _case(shape, dtype, device)
    a = kernels.sample_action(logits, invalid, noise, impl=impl)
    assert a.shape == shape[:2] and a.dtype == torch.long
    assert torch.equal(a, _gumbel_max64(logits, invalid, noise))
    assert not invalid.gather(1, a).any()


def test_reference_is_the_policys_old_formula(device):
    """impl='ref' is what ActorCritic.act computed before the op existed: float32 logits masked
    to -1e9, Gumbel noise of the clamped uniforms, argmax."""
    logits, invalid, noise = _case((3, 6, 5), torch.bfloat16, device, seed=2)
    masked = logits.float().masked_fill(invalid[:, None], -1e9)
    gumbel = -torch.log(-torch.log(noise.clamp(torch.finfo(noise.dtype).tiny, 1.0 - 1e-7)))
    assert torch.equal(kernels.sample_action(logits, invalid, noise, impl="ref"), (masked + gumbel).argmax(-1))


def test_own_draws_follow_the_policy(impl, device):
    """Without noise: action frequencies match softmax over the available actions (4 sigma),
    masked actions never drawn; the Triton draw changes with the offset and repeats with it."""
    torch.manual_seed(0)  # the reference's draws: a fixed sample, not a flaky one
    n, b, a = 2, 4000, 6
    logits = torch.randn(n, 1, a, generator=torch.Generator().manual_seed(3)).expand(n, b, a).contiguous().to(device)
    invalid = torch.tensor([[False] * a, [False, True, False, True, False, False]], device=device)
    kw = {}
    if impl == "triton":
        kw = dict(seed=torch.tensor(7, device=device), offset=torch.tensor(0, device=device))
    acts = kernels.sample_action(logits, invalid, impl=impl, **kw)
    p = torch.softmax(logits[:, 0].double().masked_fill(invalid, -math.inf), -1)  # (n, A)
    freq = torch.stack([torch.bincount(acts[i], minlength=a) for i in range(n)]).double() / b
    assert ((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / b) + 1e-12).all(), (freq, p)
    if impl == "triton":
        again = kernels.sample_action(logits, invalid, impl=impl, **kw)
        moved = kernels.sample_action(logits, invalid, impl=impl, seed=kw["seed"],
                                      offset=torch.tensor(n * b * a, device=device))
        assert torch.equal(acts, again) and not torch.equal(acts, moved)


def test_extreme_noise_is_clamped(impl, device):
    """u = 0 and u = 1 give finite scores and a valid action."""
    logits, invalid, _ = _case((2, 4, 5), torch.float32, device, seed=4)
    noise = torch.zeros(2, 4, 5, device=device)
    noise[:, ::2] = 1.0
    a = kernels.sample_action(logits, invalid, noise, impl=impl)
    assert not invalid.gather(1, a).any()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected logits"):
        kernels.sample_action(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="noise shape"):
        kernels.sample_action(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool), torch.rand(2, 3, 5))
