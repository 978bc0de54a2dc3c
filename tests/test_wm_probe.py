"""matwm_fast/wm_probe.py: the scores mean what they say, the held-action imagination is the
training imagination, env branching is exact, the batched computation gives the numbers of the
per-action one ``diagnose`` ran before, and the training-time probe is that computation on its
own episodes and random streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matwm_fast import probe_episodes as pe
from matwm_fast import wm_probe as wp
from matwm_fast.acting import ContextQueues, policy_step
from matwm_fast.config import EnvConfig, preset, resolve
from matwm_fast.env import EnvSpec, MultiAgentEnv, env_spec, random_actions
from matwm_fast.imagination import ImagCaches, ImagNoise, imagine
from matwm_fast.losses import twohot_decode
from matwm_fast.policy import build_networks
from matwm_fast.protocol import RANGES, WORLD_MODEL_PROBE
from matwm_fast.transformer import segment_mask

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- scores
def test_r2_score_reference_points():
    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    assert wp.r2_score(y, y) == pytest.approx(1.0)
    assert wp.r2_score(np.full_like(y, y.mean()), y) == pytest.approx(0.0, abs=1e-12)
    assert wp.r2_score(-y + 2 * y.mean(), y) == pytest.approx(-3.0)  # mirrored: MSE = 4·Var
    per_feature = wp.r2_score(np.zeros((10, 2)), np.stack([np.arange(10.0), np.zeros(10)], 1), axis=0)
    assert per_feature[0] < 0 and np.isnan(per_feature[1])  # a constant feature has no R²


def test_reward_fit_pooled_and_per_agent():
    rng = np.random.default_rng(2)
    e, n, t = 6, 3, 25
    row_agent = np.tile(np.arange(n), e)  # (E·N,) row e·N + i is agent i's
    rew = rng.normal(size=(e * n, t)) * np.array([1.0, 2.0, 0.5])[row_agent][:, None]
    perfect = wp.reward_fit(rew, rew, n)
    assert perfect["reward_r2"] == pytest.approx(1.0)
    assert perfect["reward_r2_per_agent"] == pytest.approx([1.0] * n)
    pooled_mean = wp.reward_fit(np.full_like(rew, rew.mean()), rew, n)
    assert pooled_mean["reward_r2"] == pytest.approx(0.0, abs=1e-12)
    agent_means = np.broadcast_to(np.stack([rew[i::n].mean() for i in range(n)])[row_agent][:, None], rew.shape)
    assert wp.reward_fit(agent_means, rew, n)["reward_r2_per_agent"] == pytest.approx([0.0] * n, abs=1e-12)
    # by hand: agent 1's rows are 1, 4, 7, …; pooled over every row
    pred = rew + rng.normal(size=rew.shape) * 0.3
    fit = wp.reward_fit(pred, rew, n)
    mine = rew[1::n]
    hand = 1 - ((pred[1::n] - mine) ** 2).mean() / ((mine - mine.mean()) ** 2).mean()
    assert fit["reward_r2_per_agent"][1] == pytest.approx(hand, rel=1e-12)
    assert fit["reward_r2"] == pytest.approx(1 - ((pred - rew) ** 2).mean() / rew.var(), rel=1e-12)


def test_effect_scores_on_known_cases():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(50, 5))
    true[::7, 4] = np.nan  # an agent with only 4 actions: its padded action must be ignored
    assert wp.effect_scores(true, true)["effect_corr"] == pytest.approx(1.0)  # imagined effects = real ones
    offset = rng.normal(size=(50, 1)) * 10  # the level does not matter for which action is best
    perfect = wp.effect_scores(true, true + offset, choice=np.nanargmax(true, 1))
    assert perfect["effect_corr"] == pytest.approx(1.0)
    assert perfect["best_action_agreement"] == 1.0
    assert perfect["regret_model_pick"] == 0.0 and perfect["regret_actor_pick"] == 0.0
    assert perfect["regret_uniform_pick"] > 0.5
    inverted = wp.effect_scores(true, -true, choice=np.nanargmin(true, 1))
    assert inverted["effect_corr"] == pytest.approx(-1.0)
    worst = np.nanmean(np.nanmax(true, 1) - np.nanmin(true, 1))
    assert inverted["regret_model_pick"] == pytest.approx(worst)
    assert inverted["regret_actor_pick"] == pytest.approx(worst)
    unrelated = wp.effect_scores(true, rng.normal(size=true.shape))["effect_corr"]
    assert abs(unrelated) < 0.3


# ----------------------------------------------------------------------------- imagination
SPEC = EnvSpec(agents=("a_0", "a_1", "a_2"), obs_sizes=(6, 6, 5), action_counts=(5, 5, 3))


def test_held_action_imagination_equals_training_imagination():
    """The held-action rollout gives imagine()'s rewards when the actor always picks the held
    action and both see the same latent draws (float64), every agent's rows in one batch."""
    torch.manual_seed(0)
    cfg = preset("smoke")
    wm, ac = (m.double() for m in build_networks(cfg, SPEC))
    held = 2  # valid for every agent
    with torch.no_grad():
        ac.actor.net[-1].weight.zero_()
        ac.actor.net[-1].bias.fill_(-1e4)
        ac.actor.net[-1].bias[..., held] = 1e4
    n, b, L, h = SPEC.n_agents, 4, 5, 3
    g = torch.Generator().manual_seed(3)
    ctx_obs = torch.randn(n, L, SPEC.obs_dim, generator=g, dtype=torch.float64)  # one context per agent
    ctx_act = torch.randint(0, 3, (n, L), generator=g)  # (N, L)
    obs = ctx_obs.repeat_interleave(b, 0)  # (N·B, L, O): every row of agent i starts from its context
    act = ctx_act.repeat_interleave(b, 0)  # (N·B, L)
    first = torch.zeros(n * b, L, dtype=torch.bool)
    first[:, 0] = True
    noise = ImagNoise.draw(n * b, L, h, wm.K, wm.A, "cpu", torch.Generator().manual_seed(4))
    noise = ImagNoise(noise.ctx.double(), noise.latent.double(), noise.action.double())
    agent = torch.arange(n).repeat_interleave(b)  # (N·B,)
    with torch.no_grad():
        roll = imagine(wm, ac, obs, act, first, torch.arange(n), h,
                       ImagCaches.allocate(wm, n * b, L, h, "cpu", torch.float64), noise)
        rew, cont = wp.imagine_held_actions(wm, obs, act, agent, torch.full((n * b,), held), h, noise.ctx,
                                            noise.latent[:, :h])  # (N·B, H) each
    assert (roll.actions == held).all()
    torch.testing.assert_close(rew, roll.rewards.reshape(n * b, h), rtol=1e-9, atol=1e-9)
    assert torch.equal(cont, roll.continues.reshape(n * b, h))


# ----------------------------------------------------------------------------- env branching
def test_branched_returns_equal_straight_replays():
    cfg = EnvConfig(scenario="simple_spread")
    env = MultiAgentEnv(cfg, seed=0)
    rng = np.random.default_rng(0)
    env.reset(seed=11)
    prefix = [random_actions(rng, env.spec) for _ in range(4)]
    for a in prefix:
        env.step(a)
    state = env.get_state()
    mates = np.stack([random_actions(rng, env.spec) for _ in range(6)])  # (H, N)
    branched = pe.true_held_returns(env, state, 1, [0, 3, 4], mates)
    assert np.array_equal(branched, pe.true_held_returns(env, state, 1, [0, 3, 4], mates))
    for k, held in enumerate([0, 3, 4]):  # the same from a fresh env played straight through
        fresh = MultiAgentEnv(cfg, seed=0)
        fresh.reset(seed=11)
        for a in prefix:
            fresh.step(a)
        total = 0.0
        for step in mates:
            joint = step.copy()
            joint[1] = held
            total += float(fresh.step(joint)[1][1])
        assert branched[k] == pytest.approx(total, abs=1e-6)
    assert len(set(branched.tolist())) > 1  # holding different actions leads to different returns


# ----------------------------------------------------------------------------- the computation diagnose ran
@torch.no_grad()
def per_action_imagination(wm, obs, act, agent, action, horizon, samples):
    """diagnose's former open-loop imagination, kept as the reference: one full causal pass per
    step for one (agent, action), drawing from torch's generator → predicted rewards (S, H), each
    counted while every step before it continued (the continuation head's logit > 0)."""
    ctx = obs.shape[0]
    ag = torch.full((samples,), agent, dtype=torch.long)
    z, _ = wm.posterior(obs[None].expand(samples, -1, -1))
    acts = act[None].expand(samples, -1)
    rewards, alive = [], torch.ones(samples)
    for t in range(horizon + 1):
        first = torch.zeros(samples, ctx + t, dtype=torch.bool)
        first[:, 0] = True
        mask, pos = segment_mask(first)
        h = wm.seq(wm.mix(z, ag, acts), pos, mask)[:, -1]
        if t > 0:
            rew_logits, con_logit = wm.heads(h)
            rewards.append(twohot_decode(rew_logits, wm.bins) * alive)
            alive = alive * (con_logit > 0).float()
        if t == horizon:
            break
        z_next, _ = wm.prior(h)
        z = torch.cat([z, z_next[:, None]], 1)
        acts = torch.cat([acts, torch.full((samples, 1), action, dtype=torch.long)], 1)
    return torch.stack(rewards, 1)


@torch.no_grad()
def per_action_effects(wm, ac, env_cfg, contexts, context_len, horizon, samples, seed):
    """diagnose's former ``action_effects``: env and imagination interleaved, per action."""
    env = MultiAgentEnv(env_cfg, seed=seed)
    spec = env.spec
    rng = np.random.default_rng(seed)
    n, a_max = spec.n_agents, spec.n_actions
    true = np.full((contexts * n, a_max), np.nan)
    pred = np.full((contexts * n, a_max), np.nan)
    choice = np.zeros(contexts * n, dtype=np.int64)
    queues = ContextQueues(n, spec.obs_dim, context_len, "cpu")
    for c in range(contexts):
        obs = env.reset(seed=seed + c)
        queues.reset()
        for _ in range(context_len):
            act = random_actions(rng, spec)
            queues.push(torch.as_tensor(obs), torch.as_tensor(act))
            obs, _, _, _ = env.step(act)
        state = env.get_state()
        mates = np.stack([random_actions(rng, spec) for _ in range(horizon)])
        past_obs, past_act = queues.view()
        picks = policy_step(wm, ac, queues.obs, queues.act, queues.count_t, torch.as_tensor(obs), greedy=True).numpy()
        for i in range(n):
            row = c * n + i
            valid = list(range(spec.action_counts[i]))
            true[row, valid] = pe.true_held_returns(env, state, i, valid, mates)
            for a in valid:
                pred[row, a] = per_action_imagination(wm, past_obs[i].float(), past_act[i], i, a, horizon,
                                                      samples).sum(1).mean()
            choice[row] = picks[i]
    env.close()
    return {"true": true, "pred": pred, "choice": choice}


def trained_looking(scenario: str = "simple_spread"):
    """Smoke networks with weights moved off their initialisation, so predictions vary."""
    cfg = preset("smoke", scenario)
    spec = env_spec(cfg.env)
    cfg = resolve(cfg, spec.n_agents)
    torch.manual_seed(0)
    wm, ac = build_networks(cfg, spec)
    with torch.no_grad():
        for p in wm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return cfg, wm, ac


@pytest.mark.parametrize("scenario", ["simple_spread", "simple_speaker_listener"])
def test_batched_effects_equal_the_per_action_computation(scenario):
    """The same draws in the same order: the true returns and the actor's picks are identical,
    the imagined returns equal up to float32 rounding (a batched, key/value-cached pass)."""
    cfg, wm, ac = trained_looking(scenario=scenario)
    out = {}
    for name, fn in (("before", per_action_effects), ("now", wp.action_effects)):
        torch.manual_seed(7)
        out[name] = fn(wm, ac, cfg.env, 3, cfg.ac.context_len, 4, 5, 123)
    before, now = out["before"], out["now"]
    assert np.array_equal(before["true"], now["true"], equal_nan=True)
    assert np.array_equal(before["choice"], now["choice"])
    assert np.array_equal(np.isnan(before["pred"]), np.isnan(now["pred"]))
    np.testing.assert_allclose(now["pred"], before["pred"], rtol=1e-5, atol=1e-5)
    assert np.nanstd(now["pred"]) > 1e-3  # the comparison is not of constants
    corr = [wp.effect_scores(o["true"], o["pred"], o["choice"])["effect_corr"] for o in (before, now)]
    assert corr[1] == pytest.approx(corr[0], abs=1e-5)


# ----------------------------------------------------------------------------- the training-time probe
def test_probe_episodes_are_the_protocols_world_model_range():
    assert WORLD_MODEL_PROBE.holds(wp.HELD_OUT_SEED, wp.EPISODES)
    assert WORLD_MODEL_PROBE.holds(wp.HELD_OUT_SEED + 10_000, wp.CONTEXTS)
    others = [r for r in RANGES if r is not WORLD_MODEL_PROBE]
    assert not [r for r in others if r.lo < WORLD_MODEL_PROBE.hi and WORLD_MODEL_PROBE.lo < r.hi]


def test_probe_is_diagnoses_computation_on_its_own_random_streams():
    cfg, wm, ac = trained_looking()
    probe = wp.HeldOutProbe(cfg.env, cfg.ac.context_len, cfg.ac.horizon, seed=wp.HELD_OUT_SEED, episodes=3,
                            contexts=2, samples=4)
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    scores = probe(wm, ac)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    assert probe(wm, ac) == scores  # the same model scores the same at every evaluation
    agents = env_spec(cfg.env).agents
    assert set(scores) == {"wm_reward_r2", "wm_effect_corr", *(f"{a}_wm_reward_r2" for a in agents)}
    # what `diagnose model --seed S` computes: seeded latent draws, the fit, then the branch points
    torch.manual_seed(wp.HELD_OUT_SEED)
    data = pe.random_episodes(cfg.env, 3, wp.HELD_OUT_SEED)
    fit = wp.teacher_forced(wm, data)
    eff = wp.action_effects(wm, ac, cfg.env, 2, cfg.ac.context_len, cfg.ac.horizon, 4, wp.HELD_OUT_SEED + 10_000)
    assert scores["wm_reward_r2"] == fit["reward_r2"]
    assert scores["wm_effect_corr"] == wp.effect_scores(eff["true"], eff["pred"], eff["choice"])["effect_corr"]
    assert np.isfinite(scores["wm_reward_r2"]) and -1 <= scores["wm_effect_corr"] <= 1
    e, t, n = data["rew"].shape
    torch.manual_seed(wp.HELD_OUT_SEED)
    pred = wp.teacher_forced_pass(wm, data)[1].reshape(e, n, t)  # (E, N, T)
    for i, a in enumerate(agents):  # agent i's predictions against its column of the episodes' rewards
        assert scores[f"{a}_wm_reward_r2"] == pytest.approx(float(wp.r2_score(pred[:, i], data["rew"][:, :, i])),
                                                            rel=1e-12)


def test_probe_stops_when_asked_and_scores_later():
    cfg, wm, ac = trained_looking()
    probe = wp.HeldOutProbe(cfg.env, cfg.ac.context_len, cfg.ac.horizon, episodes=2, contexts=2, samples=2)
    asked = []

    def stop_after(k):
        return lambda: asked.append(1) or len(asked) > k

    assert probe(wm, ac, should_stop=stop_after(1)) is None  # inside the one-time setup
    asked.clear()
    assert probe(wm, ac, should_stop=lambda: True) is None
    assert probe(wm, ac) == wp.HeldOutProbe(cfg.env, cfg.ac.context_len, cfg.ac.horizon, episodes=2, contexts=2,
                                            samples=2)(wm, ac)


def test_probe_shortens_a_horizon_the_episode_cannot_hold():
    cfg, wm, ac = trained_looking()
    short = EnvConfig(scenario="simple_spread", max_cycles=cfg.ac.context_len + 1)
    scores = wp.HeldOutProbe(short, cfg.ac.context_len, cfg.ac.horizon, episodes=2, contexts=2, samples=2)(wm, ac)
    assert np.isfinite(scores["wm_reward_r2"])
    assert wp.HeldOutProbe(short, cfg.ac.context_len, cfg.ac.horizon).horizon == 1
