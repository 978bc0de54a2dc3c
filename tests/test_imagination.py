"""Imagination: shapes, and the all-agent batch equals separate per-agent rollouts (same draws)."""

import pytest
import torch

from matwm_fast.actor_critic import ActorCritic, state_dim
from matwm_fast.config import preset
from matwm_fast.env import EnvSpec
from matwm_fast.imagination import ImagCaches, ImagNoise, imagine
from matwm_fast.world_model import WorldModel

SPEC = EnvSpec(agents=("speaker_0", "listener_0", "x_0"), obs_sizes=(3, 11, 7), action_counts=(3, 5, 4))


def build(dtype=torch.float64, kernels="ref"):
    torch.manual_seed(0)
    cfg = preset("smoke")
    wm = WorldModel(cfg.wm, SPEC, kernels).to(dtype)
    s_dim = state_dim(cfg.wm.latent_vars, cfg.wm.latent_classes, cfg.wm.width, SPEC.n_agents, SPEC.n_actions)
    ac = ActorCritic(cfg.ac, SPEC, s_dim, wm.bins, kernels).to(dtype)
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
