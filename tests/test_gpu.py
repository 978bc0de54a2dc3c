"""GPU-only checks (skipped without CUDA): CUDA graphs, bf16 autocast, Triton on the device."""

import pytest
import torch

from matwm_fast import steps
from matwm_fast.config import preset
from matwm_fast.imagination import ImagNoise
from matwm_fast.trainer import build

pytestmark = pytest.mark.gpu


def warm_trainer(backend: str, amp: str, kernels: str = "auto"):
    tr = build(preset("smoke"), device="cuda", backend=backend, amp=amp, kernels=kernels)
    while not tr.warm:
        tr.env_step()
    return tr


def test_bf16_world_model_loss_close_to_fp32():
    fp32, bf16 = warm_trainer("eager", amp="fp32"), warm_trainer("eager", amp="bf16")
    bf16.wm.load_state_dict(fp32.wm.state_dict())
    batch = fp32.replay.sample_sequences(fp32.cfg.wm.batch_per_agent, fp32.cfg.wm.seq_len, 0.9998)
    args = (batch.obs, batch.act, batch.rew, batch.cont, batch.first, batch.team_act, batch.agent)
    torch.manual_seed(0)
    l32, _ = steps.wm_loss(fp32.wm, *args, fp32.rt.amp, fp32.rt.kernels)
    torch.manual_seed(0)
    l16, _ = steps.wm_loss(bf16.wm, *args, bf16.rt.amp, bf16.rt.kernels)
    assert abs(l16.item() - l32.item()) / abs(l32.item()) < 5e-2  # bf16: ~3 significant digits


def test_triton_imagination_equals_reference_on_cuda():
    ref, tri = warm_trainer("eager", amp="fp32", kernels="ref"), warm_trainer("eager", amp="fp32", kernels="triton")
    tri.wm.load_state_dict(ref.wm.state_dict())
    tri.ac.load_state_dict(ref.ac.state_dict())
    c = ref.cfg
    ctx = ref.replay.sample_contexts(c.ac.imag_batch, c.ac.context_len)
    noise = ImagNoise.draw(ref.n * c.ac.imag_batch, c.ac.context_len, c.ac.horizon, ref.wm.K, ref.wm.A, "cuda")
    a, b = ref.imagine(ctx, noise), tri.imagine(ctx, noise)
    assert (a.actions != b.actions).float().mean() < 0.01  # near-ties may flip a rare Gumbel argmax
    if torch.equal(a.actions, b.actions):
        torch.testing.assert_close(a.states, b.states, rtol=1e-4, atol=1e-4)


# Inductor's: its cold compilation takes minutes on a fresh GPU machine, so the GPU check runs it
# in its last stage, with the time left (bench/gpucheck), not among the first tests
@pytest.mark.inductor
def test_cudagraphs_steps_run_without_recompiling_and_with_fresh_noise():
    tr = warm_trainer("cudagraphs", amp="bf16")
    for _ in range(3):  # warm-up + capture
        tr.train_step()
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(3):
            m = tr.train_step()
    finally:
        torch._dynamo.config.error_on_recompile = False
    tr.check_finite()
    assert torch.isfinite(m["shared_wm_total_loss"])
    # two replays of the captured rollout on the same contexts draw different random numbers
    ctx = tr.replay.sample_contexts(tr.cfg.ac.imag_batch, tr.cfg.ac.context_len)
    torch.compiler.cudagraph_mark_step_begin()
    a = tr.imagine(ctx).states.clone()
    torch.compiler.cudagraph_mark_step_begin()
    b = tr.imagine(ctx).states.clone()
    assert not torch.equal(a, b)
