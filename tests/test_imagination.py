"""Imagination: shapes, and the all-agent batch equals separate per-agent rollouts (same draws)."""

import pytest
import torch

from matwm_fast.config import preset
from matwm_fast.env import EnvSpec
from matwm_fast.imagination import ImagCaches, ImagNoise, imagine
from matwm_fast.policy import build_networks

SPEC = EnvSpec(agents=("speaker_0", "listener_0", "x_0"), obs_sizes=(3, 11, 7), action_counts=(3, 5, 4))


def build(dtype=torch.float64, kernels="ref"):
    torch.manual_seed(0)
    cfg = preset("smoke")
    wm, ac = (m.to(dtype) for m in build_networks(cfg, SPEC, kernels))
    # a non-trivial actor: random last layer so actions depend on the state
    torch.nn.init.normal_(ac.actor.net[-1].weight, std=1.0)
    return cfg, wm, ac


def contexts(n, b, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n * b, length, SPEC.obs_dim, generator=g, dtype=torch.float64)  # (R, L, O)
    act = torch.randint(0, 3, (n * b, length), generator=g)  # valid for every agent
    first = torch.rand(n * b, length, generator=g) < 0.2  # some contexts cross an episode start
    return obs, act, first


def test_rollout_shapes_and_action_masks():
    cfg, wm, ac = build()
    n, b, h, L = SPEC.n_agents, 7, 5, 4
    obs, act, first = contexts(n, b, L)
    caches = ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.float64)
    with torch.no_grad():
        roll = imagine(wm, ac, obs, act, first, torch.arange(n), h, caches)
    s = cfg.wm.latent_vars * cfg.wm.latent_classes + cfg.wm.width + (n - 1) * SPEC.n_actions
    assert roll.states.shape == (n, b, h + 1, s)
    assert roll.actions.shape == roll.rewards.shape == roll.continues.shape == (n, b, h)
    # every agent's sampled actions stay inside its own action set
    for i, count in enumerate(SPEC.action_counts):
        assert roll.actions[i].max() < count
    assert set(roll.continues.unique().tolist()) <= {0.0, 1.0}


def test_batched_equals_per_agent_rollouts():
    cfg, wm, ac = build()
    n, b, h, L = SPEC.n_agents, 6, 4, 4
    obs, act, first = contexts(n, b, L, seed=1)
    noise = ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu")
    noise = ImagNoise(noise.ctx.double(), noise.latent.double(), noise.action.double())
    with torch.no_grad():
        batched = imagine(wm, ac, obs, act, first, torch.arange(n), h,
                          ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.float64), noise)
        for i in range(n):
            rows = slice(i * b, (i + 1) * b)
            alone = imagine(wm, ac, obs[rows], act[rows], first[rows], torch.tensor([i]), h,
                            ImagCaches.allocate(wm, b, L, h, "cpu", torch.float64), noise.rows(rows))
            assert torch.equal(alone.actions[0], batched.actions[i])
            torch.testing.assert_close(alone.states[0], batched.states[i], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(alone.rewards[0], batched.rewards[i], rtol=1e-10, atol=1e-10)
            assert torch.equal(alone.continues[0], batched.continues[i])


def test_same_noise_same_rollout_different_noise_differs():
    cfg, wm, ac = build()
    n, b, h, L = SPEC.n_agents, 5, 3, 4
    obs, act, first = contexts(n, b, L)
    caches = ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.float64)
    nz = [ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu", torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    with torch.no_grad():
        r = [imagine(wm, ac, obs, act, first, torch.arange(n), h, caches, z) for z in nz]
    assert torch.equal(r[0].states, r[1].states)
    assert not torch.equal(r[0].states, r[2].states)


def test_context_before_episode_start_is_invisible():
    cfg, wm, ac = build()
    n, b, h, L = SPEC.n_agents, 4, 3, 6
    obs, act, first = contexts(n, b, L)
    first[:] = False
    first[:, 3] = True  # the last three context steps start a new episode
    noise = ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu")
    noise = ImagNoise(noise.ctx.double(), noise.latent.double(), noise.action.double())
    obs2 = obs.clone()
    obs2[:, :3] += 5.0
    caches = ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.float64)
    with torch.no_grad():
        a = imagine(wm, ac, obs, act, first, torch.arange(n), h, caches, noise)
        c = imagine(wm, ac, obs2, act, first, torch.arange(n), h, caches, noise)
    torch.testing.assert_close(a.states, c.states)
    assert torch.equal(a.actions, c.actions)


def test_triton_kernels_equal_reference_in_imagination():
    """The whole rollout of a model built with ``kernels="triton"`` equals the same model built with
    ``kernels="ref"`` under the same draws (the choice made at construction reaches every call)."""
    from matwm_fast import kernels

    if not kernels.triton_runs_on("cpu"):
        pytest.skip(kernels.why_triton_cannot_run("cpu"))
    n, b, h, L = SPEC.n_agents, 3, 2, 3
    out = {}
    for impl in ("ref", "triton"):
        cfg, wm, ac = build(torch.float32, impl)  # same seed: same weights
        obs, act, first = contexts(n, b, L, seed=2)
        obs = obs.float()
        noise = ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu", torch.Generator().manual_seed(3))
        with torch.no_grad():
            out[impl] = imagine(wm, ac, obs, act, first, torch.arange(n), h,
                                ImagCaches.allocate(wm, n * b, L, h, "cpu"), noise)
    assert torch.equal(out["ref"].actions, out["triton"].actions)
    torch.testing.assert_close(out["ref"].states, out["triton"].states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["ref"].rewards, out["triton"].rewards, rtol=1e-4, atol=1e-4)


def uncached_rollout(wm, ac, obs, act, first, agents, horizon, noise):
    """Algorithm 1 recomputed from scratch at every step: whole causal passes over the growing
    token and latent sequences (no cache, no per-rollout tables), the heads at every step."""
    from matwm_fast.actor_critic import agent_state
    from matwm_fast.losses import twohot_decode
    from matwm_fast.transformer import segment_mask

    r, length = act.shape
    n, b = agents.shape[0], r // agents.shape[0]
    agent = agents.repeat_interleave(b)  # (R,)

    def flags(t: int) -> torch.Tensor:  # the context's episode starts, then t imagined steps of the last episode
        return torch.cat([first, torch.zeros(r, t, dtype=torch.bool)], 1)

    def last(module, x, t):
        mask, pos = segment_mask(flags(t))
        return module(x, pos, mask, agent)[:, -1] if module is wm.teammates else module(x, pos, mask)[:, -1]

    z_ctx, _ = wm.posterior(obs, noise.ctx)  # (R, L, K·C)
    tokens = wm.mix(z_ctx, agent, act)  # (R, L, D)
    h = last(wm.seq, tokens, 0)  # (R, D)
    z, _ = wm.prior(h, noise.latent[:, 0])
    zs, states, actions, rewards, conts = z_ctx, [], [], [], []
    for t in range(horizon + 1):
        zs = torch.cat([zs, z[:, None]], 1)  # (R, L+t+1, K·C)
        states.append(agent_state(z, h, last(wm.teammates, zs, t + 1), obs.dtype))
        if t == horizon:
            break
        a = ac.act(states[-1].view(n, b, -1), noise.action[:, t].view(n, b, -1)).view(r)  # (R,)
        tokens = torch.cat([tokens, wm.mix(z, agent, a)[:, None]], 1)  # (R, L+t+1, D)
        h = last(wm.seq, tokens, t + 1)
        rew, con = wm.heads(h)
        rewards.append(twohot_decode(rew, wm.bins))
        conts.append((con > 0).to(obs.dtype))
        actions.append(a)
        z, _ = wm.prior(h, noise.latent[:, t + 1])
    return [torch.stack(x, 1).view(n, b, *torch.stack(x, 1).shape[1:]) for x in (states, actions, rewards, conts)]


def test_rollout_equals_uncached_recomputation():
    """The cached rollout — per-rollout positional embeddings, mixer table and teammate bias, each
    step reading only its live cache slots, rewards and continuations from all h at the end —
    equals recomputing every step from scratch (float64, same draws)."""
    cfg, wm, ac = build()
    n, b, h, L = SPEC.n_agents, 4, 4, 5
    obs, act, first = contexts(n, b, L, seed=4)
    noise = ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu", torch.Generator().manual_seed(5))
    noise = ImagNoise(noise.ctx.double(), noise.latent.double(), noise.action.double())
    with torch.no_grad():
        roll = imagine(wm, ac, obs, act, first, torch.arange(n), h, ImagCaches.allocate(wm, n * b, L, h, "cpu",
                                                                                       torch.float64), noise)
        states, actions, rewards, conts = uncached_rollout(wm, ac, obs, act, first, torch.arange(n), h, noise)
    assert torch.equal(roll.actions, actions) and torch.equal(roll.continues, conts)
    torch.testing.assert_close(roll.states, states, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(roll.rewards, rewards, rtol=1e-10, atol=1e-10)


def test_bf16_rollout_runs_on_twins_refreshed_at_its_start():
    """Under bf16 the caches hold bf16 twins of the world model and the actors (no critics, float32
    buffers, eval mode, no gradients); each rollout copies the current weights in first, runs with
    autocast off whatever encloses it, and stores bf16 states."""
    cfg, wm, ac = build(torch.float32)
    n, b, h, L = SPEC.n_agents, 3, 3, 4
    obs, act, first = contexts(n, b, L, seed=6)
    caches = ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.bfloat16, ac=ac)
    twins = caches.weights
    assert twins is not None and twins.ac.critic is None and twins.ac.slow_critic is None
    assert all(p.dtype is torch.bfloat16 and not p.requires_grad for p in (*twins.wm.parameters(), *twins.ac.parameters()))
    assert twins.wm.bins.dtype is torch.float32 and not twins.wm.training
    assert ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.bfloat16).weights is None  # no actors given: none
    with torch.no_grad():
        wm.seq.pos.weight.add_(1.0)  # an optimiser step, say: the rollout must read the new weights
        ac.actor.net[0].weight.mul_(2.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        roll = imagine(wm, ac, obs.float(), act, first, torch.arange(n), h, caches)
    for src, twin in ((wm, twins.wm), (ac.actor, twins.ac.actor)):
        for (name, p), q in zip(src.named_parameters(), twin.parameters()):
            assert torch.equal(q, p.detach().to(torch.bfloat16)), name
    assert roll.states.dtype is torch.bfloat16 and torch.isfinite(roll.states.float()).all()
    assert roll.rewards.dtype is torch.float32 and roll.actions.shape == (n, b, h)
    _, other, other_ac = build(torch.float32)
    with pytest.raises(ValueError, match="other modules"):
        imagine(other, other_ac, obs.float(), act, first, torch.arange(n), h, caches)


def test_twin_pieces_equal_the_autocast_model_within_bf16():
    """The twins without autocast compute what the float32 model computes under bf16 autocast
    (the previous formulation): the sequence model, teammate predictor and heads over the same
    latents agree to bf16's precision."""
    from matwm_fast.imagination import ImagWeights
    from matwm_fast.transformer import segment_mask

    cfg, wm, ac = build(torch.float32)
    twins = ImagWeights.make(wm, ac, torch.bfloat16)
    twins.refresh(wm, ac)
    r, t = 6, 5
    g = torch.Generator().manual_seed(7)
    z = torch.nn.functional.one_hot(torch.randint(0, wm.C, (r, t, wm.K), generator=g), wm.C).flatten(-2).float()
    agent = torch.arange(r) % SPEC.n_agents
    act = torch.randint(0, 3, (r, t), generator=g)
    mask, pos = segment_mask(torch.rand(r, t, generator=g) < 0.2)

    def run(m, zz):
        h = m.seq(m.mix(zz, agent, act), pos, mask)  # (R, T, D)
        return h, m.teammates(zz, pos, mask, agent).clamp(-30, 30), *m.heads(h), m.dyn_head(h)

    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = run(wm, z)
        got = run(twins.wm, z.bfloat16())
    eps = torch.finfo(torch.bfloat16).eps
    for a, e in zip(got, want):
        assert a.dtype is torch.bfloat16
        scale = e.float().abs().max().item()  # LayerNorm-scaled outputs: errors relative to their size
        torch.testing.assert_close(a.float(), e.float(), rtol=4 * eps, atol=4 * eps * scale)
