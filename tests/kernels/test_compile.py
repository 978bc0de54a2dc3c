"""The ops inside torch.compile(fullgraph=True), and torch.library.opcheck of the custom ops.

One combined compile per backend/impl keeps this cheap: Inductor on CPU takes
~20 s for the reference graph (forward + backward) on two cores.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from matwm_fast import kernels
from matwm_fast.kernels.decode_attention import _decode_attention_op
from matwm_fast.kernels.layer_norm import _layer_norm_backward_op, _layer_norm_op
from matwm_fast.kernels.sample_action import _sample_action_op
from matwm_fast.kernels.sample_latent import _sample_latent_op
from matwm_fast.kernels.twohot_ce import _twohot_ce_backward_op, _twohot_ce_op


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 5, 2, 7, 16
    att = (
        torch.randn(B, H, D, generator=g).to(device),  # q (B, H, D)
        torch.randn(B, H, L, D, generator=g).to(device),  # k_cache (B, H, L, D)
        torch.randn(B, H, L, D, generator=g).to(device),  # v_cache (B, H, L, D)
        torch.tensor([0, 2, 6, 7, 3], device=device),  # kv_start (B,)
        torch.tensor(L, device=device),  # kv_len ()
    )
    logits = torch.randn(3, 4, 8, generator=g).to(device)  # (B, K, C)
    noise = torch.rand(3, 4, generator=g).to(device)  # (B, K): one uniform per categorical
    x = torch.randn(6, 17, generator=g).to(device)  # (M, NB)
    target = (3 * torch.randn(6, generator=g)).to(device)  # (M,)
    bins = torch.linspace(-5, 5, 17, device=device)  # (NB,)
    return att, logits, noise, x, target, bins


def _step(att, logits, noise, x, target, bins, impl):
    out = kernels.decode_attention(*att, impl=impl)
    sample, probs = kernels.sample_latent(logits, 0.01, noise=noise, impl=impl)
    loss = kernels.twohot_ce(x, target, bins, impl=impl)
    # layer_norm with gradient (to x here; its weights: tests/kernels/test_layer_norm.py), sample_action without
    normed = kernels.layer_norm(x, bins.abs() + 1, bins, act="silu", impl=impl)  # (M, NB)
    acts = kernels.sample_action(logits.detach(), logits[:, 0].detach() > 1.0, noise[..., None].expand(-1, -1, 8),
                                 impl=impl)  # (B, K)
    total = (sample * torch.arange(8.0, device=x.device)).sum() + probs.square().sum() + loss.mean() + normed.square().mean()
    return out, sample, probs, loss, normed, acts, total


def _run(fn, device, impl):
    att, logits, noise, x, target, bins = _inputs(device)
    logits.requires_grad_(True)
    x.requires_grad_(True)
    outs = fn(att, logits, noise, x, target, bins, impl)
    outs[-1].backward()
    return [o.detach() for o in outs] + [logits.grad, x.grad]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(impl, backend, device):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_step, backend=counter, fullgraph=True)  # raises on a graph break
    got = _run(compiled, device, impl)
    want = _run(_step, device, impl)
    assert counter.frame_count == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck_custom_ops(needs_triton, device):
    """Schema, fake-tensor impl, autograd registration and AOT dispatch of every custom op."""
    att, logits, noise, x, target, bins = _inputs(device)
    torch.library.opcheck(_decode_attention_op, att)
    seed = torch.tensor(3, device=device)
    off = torch.tensor(0, device=device)
    torch.library.opcheck(_sample_latent_op, (logits.requires_grad_(True), 0.01, noise, None, None))
    torch.library.opcheck(_sample_latent_op, (logits, 0.1, None, seed, off))
    torch.library.opcheck(_twohot_ce_op, (x.requires_grad_(True), target, bins))
    loss, lse = _twohot_ce_op(x.detach(), target, bins)
    torch.library.opcheck(_twohot_ce_backward_op, (torch.rand_like(loss), x.detach(), target, bins, lse))
    w, b = (bins.abs() + 1).requires_grad_(True), bins.clone().requires_grad_(True)
    torch.library.opcheck(_layer_norm_op, (x, w, b, 1e-5, True))
    y, mean, rstd = _layer_norm_op(x.detach(), w.detach(), b.detach(), 1e-5, False)
    torch.library.opcheck(_layer_norm_backward_op, (torch.rand_like(y), x.detach(), w.detach(), b.detach(), mean, rstd, False))
    invalid = torch.zeros(3, 8, dtype=torch.bool, device=device)
    torch.library.opcheck(_sample_action_op, (logits.detach(), invalid, torch.rand(3, 4, 8, device=device), None, None))
    torch.library.opcheck(_sample_action_op, (logits.detach(), invalid, None, seed, off))
