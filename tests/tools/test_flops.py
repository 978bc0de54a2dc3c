"""The analytic FLOP count (``matwm_fast.tools.flops``) against torch's own count of the matrix
products that the real step functions run, and the matmul-peak measurement."""

from __future__ import annotations

import statistics
from dataclasses import replace
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from matwm_fast.acting import policy_step
from matwm_fast.config import preset
from matwm_fast.tools import flops
from matwm_fast.trainer import build


@pytest.fixture(scope="module")
def warm(one_thread):
    """A smoke trainer past warm-up, on the reference kernels (whose products torch can see)."""
    tr = build(preset("smoke"), device="cpu", backend="eager", kernels="ref")
    while not tr.warm:
        tr.env_step()
    tr.train_step()
    return tr


def measured(fn) -> int:
    """FLOPs of fn() as torch.utils.flop_counter counts them.  The math SDPA backend: the CPU's
    fused attention kernel has no formula there (it would count 0), the math one is plain bmm."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_each_phase_matches_torchs_count_exactly(warm):
    tr, c = warm, warm.cfg
    batch = tr.replay.sample_sequences(c.wm.batch_per_agent, c.wm.seq_len, c.replay.priority_decay)
    ctx = tr.replay.sample_contexts(c.ac.imag_batch, c.ac.context_len)
    roll = tr.imagine(ctx)
    # forward + backward (the optimiser steps do no matrix products)
    assert measured(lambda: tr.wm_update(batch)) == flops.wm_update(c, tr.spec).total
    assert measured(lambda: tr.imagine(ctx)) == flops.imagine(c, tr.spec).total
    assert measured(lambda: tr.ac_update(roll)) == flops.ac_update(c, tr.spec).total
    n, o, length = tr.n, tr.spec.obs_dim, c.train.act_context
    past = torch.randn(n, length, o), torch.zeros(n, length, dtype=torch.long)
    for queue in (0, 1, length):  # empty, one step, a full context queue: the same work
        got = measured(lambda: policy_step(tr.wm, tr.ac, *past, torch.tensor(queue), torch.randn(n, o)))
        assert got == flops.act(c, tr.spec).total, queue


def test_whole_train_step_matches(warm):
    """One real ``train_step``: acting at the current queue length plus the three updates."""
    tr = warm
    per_step = flops.step_flops(tr.cfg, tr.spec)
    expected = flops.act(tr.cfg, tr.spec).total + sum(per_step[p] for p in ("wm_update", "imagine", "ac_update"))
    assert measured(tr.train_step) == expected


def test_backward_convention():
    c = flops.Count()
    c.linear(10, 4, 3, grad=True)  # grad-input and grad-weight
    assert (c.fwd, c.bwd) == (240, 480)
    c = flops.Count()
    c.mlp(10, 4, 8, 1, 3, grad=True, input_grad=False)  # data in: the first layer's weight gradient only
    assert c.fwd == 2 * 10 * (4 * 8 + 8 * 3) and c.bwd == 2 * 10 * 4 * 8 + 2 * 2 * 10 * 8 * 3


def test_paper_budget_scales_with_the_imagined_rows():
    """The paper preset's imagination is 36,864 imagined steps: its count is dominated by the
    per-step products of 3,072 rows, and doubling the rows doubles it exactly."""
    from dataclasses import replace

    from matwm_fast.config import resolve
    from matwm_fast.env import env_spec

    cfg = preset("paper")
    spec = env_spec(cfg.env)
    a = resolve(cfg, spec.n_agents)
    b = resolve(replace(cfg, ac=replace(cfg.ac, imag_batch=2 * 768)), spec.n_agents)
    assert flops.imagine(b, spec).total == 2 * flops.imagine(a, spec).total
    per_step = flops.step_flops(a, spec)
    assert per_step["env"] == per_step["replay_sample"] == 0
    assert per_step["imagine"] > per_step["wm_update"] > 0
    with pytest.raises(ValueError, match="resolved config"):
        flops.step_flops(cfg, spec)  # imag_batch 0: the paper rule not yet applied


def test_phase_precision():
    assert flops.phase_precision("imagine", torch.bfloat16) == "bf16"
    assert flops.phase_precision("ac_update", torch.bfloat16) == "bf16"
    assert flops.phase_precision("act", torch.bfloat16) == "fp32"
    assert flops.phase_precision("imagine", None) == "fp32"


def test_rates_against_the_peak_of_each_phases_precision():
    step = {"act": 2e9, "env": 0.0, "imagine": 8e9, "ac_update": 0.0}
    r = flops.rates(step, {"act": 100.0, "env": 1.0, "imagine": 10.0, "ac_update": 0.0}, torch.bfloat16,
                    {"fp32": 1e12, "bf16": 4e12})
    assert r["flops_per_s"] == {"act": 2e10, "imagine": 8e11}  # phases without arithmetic: no rate
    assert r["phase_precision"] == {"act": "fp32", "imagine": "bf16"}
    assert r["peak_fraction"] == {"act": pytest.approx(0.02), "imagine": pytest.approx(0.2)}
    assert flops.rates(step, {"act": 0.0, "imagine": 10.0}, None, None)["peak_fraction"] == {"act": None, "imagine": None}


def test_matmul_peak_is_the_rate_of_its_product(one_thread):
    """The peak is 2·n³ over the median time of one n×n product: within a band of the same
    statistic timed here independently.  A FLOP count off by 2 (n³) or more, or the rate of
    another product, falls outside it; the band leaves room for a shared machine's noise."""
    n = 256
    rate = flops.matmul_peak(torch.device("cpu"), torch.float32, seconds=0.05, n=n)
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    here = 2 * n**3 / statistics.median(times)
    assert 0.6 * here < rate < 1.67 * here


@pytest.mark.parametrize("shape, stages", [((3, 16, 12), 2), ((1, 13, 11), 3)])
def test_image_phases_match_torchs_count_exactly(shape, stages, one_thread):
    """Frames (an odd size among them): the convolutions of the encoder and decoder counted as
    torch counts them, on the real step functions — the world-model update (forward and
    backward), a rollout (the context frames encoded once) and acting over a full queue."""
    from frames import image_config, image_spec, sequences

    from matwm_fast import steps
    from matwm_fast.imagination import ImagCaches
    from matwm_fast.policy import build_networks

    spec = image_spec(shape)
    cfg = image_config(spec, stages=stages)
    torch.manual_seed(0)
    wm, ac = build_networks(cfg, spec)
    obs, act, rew, cont, first, team_act, agent = sequences(spec, cfg.wm.batch_size, cfg.wm.seq_len)

    def update():
        loss, _ = steps.wm_loss(wm, obs, act, rew, cont, first, team_act, agent, None, "ref")
        loss.backward()

    assert measured(update) == flops.wm_update(cfg, spec).total
    a = cfg.ac
    rows = spec.n_agents * a.imag_batch
    ctx = sequences(spec, rows, a.context_len, seed=1)
    caches = ImagCaches.allocate(wm, rows, a.context_len, a.horizon, "cpu", ac=ac)
    agents = torch.arange(spec.n_agents)
    got = measured(lambda: steps.rollout(wm, ac, ctx[0], ctx[1], ctx[4], agents, a.horizon, caches, None, None))
    assert got == flops.imagine(cfg, spec).total
    n, length = spec.n_agents, cfg.train.act_context
    past = sequences(spec, n, length, seed=2)[0], torch.zeros(n, length, dtype=torch.long)
    got = measured(lambda: policy_step(wm, ac, *past, torch.tensor(length), past[0][:, 0]))
    assert got == flops.act(cfg, spec).total


def test_image_decode_steps_cost_what_vector_ones_do():
    """Imagination sees the latent: its per-step FLOPs do not depend on the observation — frames of
    any size or a vector, the same; only the prefill grows with the pixels."""
    from frames import image_config, image_spec

    from matwm_fast.config import resolve
    from matwm_fast.env import EnvSpec

    def per_step(spec, cfg):
        longer = replace(cfg, ac=replace(cfg.ac, horizon=cfg.ac.horizon + 1))
        return flops.imagine(longer, spec).total - flops.imagine(cfg, spec).total

    small, large = image_spec((3, 16, 16)), image_spec((3, 64, 64))
    vector = EnvSpec(agents=small.agents, obs_sizes=(10, 10), action_counts=small.action_counts)
    cfg = image_config(small)
    steps = {per_step(spec, cfg) for spec in (small, large)} | {per_step(vector, resolve(cfg, 2))}
    assert len(steps) == 1 and steps.pop() > 0
    assert flops.imagine(cfg, large).total > flops.imagine(cfg, small).total  # the prefill's encoder


def test_image_train_step_matches(one_thread):
    """One real ``train_step`` of an image scenario (the smoke preset on Cooperative Pong): acting
    plus the three updates, as analytically counted (skipped without the Butterfly envs)."""
    pytest.importorskip("pymunk", reason="needs pip install 'matwm_fast[butterfly]'")
    tr = build(preset("smoke", "cooperative_pong"), device="cpu", backend="eager", kernels="ref")
    assert tr.wm.image
    while not tr.warm:
        tr.env_step()
    tr.train_step()
    per_step = flops.step_flops(tr.cfg, tr.spec)
    expected = flops.act(tr.cfg, tr.spec).total + sum(per_step[p] for p in ("wm_update", "imagine", "ac_update"))
    assert measured(tr.train_step) == expected
