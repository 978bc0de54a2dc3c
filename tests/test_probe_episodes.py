"""matwm_fast/probe_episodes.py: fixed-length episodes come out as before (every step valid, none
ended), episodes that end early are padded with a mask, and branch points near the end sit
within the horizon of the end, where the actions decide the outcome."""

from __future__ import annotations

import numpy as np
import pytest

from matwm_fast import probe_episodes as pe
from matwm_fast.config import EnvConfig
from matwm_fast.env import MultiAgentEnv


def test_fixed_length_episodes_are_all_valid():
    cfg = EnvConfig(scenario="simple_spread", max_cycles=7)
    data = pe.random_episodes(cfg, 3, 5)
    assert data["obs"].shape[:3] == (3, 7, 3) and data["obs"].dtype == np.float32
    assert data["valid"].all() and not data["ended"].any()
    np.testing.assert_array_equal(data["obs"][:, 1:], data["next_obs"][:, :-1])  # consecutive steps
    again = pe.random_episodes(cfg, 3, 5)
    assert all(np.array_equal(data[k], again[k]) for k in data)


def test_branch_from_start_plays_the_context_from_the_reset():
    cfg = EnvConfig(scenario="simple_spread", max_cycles=12)
    ctx = pe.held_action_contexts(cfg, 2, 3, 4, 40)
    assert ctx.at.tolist() == [3, 3] and ctx.to_end.tolist() == [-1, -1]
    env = MultiAgentEnv(cfg, seed=0)
    for c in range(2):  # the context is the episode of seed 40 + c from its first step
        obs = env.reset(seed=40 + c)
        np.testing.assert_array_equal(ctx.past_obs[c, :, 0].numpy(), obs)
        for t in range(3):
            obs = env.step(ctx.past_act[c, :, t].numpy())[0]
        np.testing.assert_array_equal(ctx.obs[c].numpy(), obs)
    env.close()


def test_a_horizon_past_the_time_limit_is_refused():
    with pytest.raises(ValueError, match="context 8 \\+ horizon 8 exceeds the episode length 10"):
        pe.held_action_contexts(EnvConfig(scenario="simple_spread", max_cycles=10), 1, 8, 8, 0)


class Ends:
    """A stand-in env whose episode from seed s lasts 3 + s % 5 steps (every agent terminates at
    the last), rewarding agent 0 with its action at each step: enough to check the padding and the
    near-end branch points without a game."""

    def __init__(self, cfg, seed=0):
        from matwm_fast.env import EnvSpec
        self.spec = EnvSpec(agents=("a", "b"), obs_sizes=(2, 2), action_counts=(3, 2))
        self.t = self.length = 0
        self.acts: list = []

    def reset(self, seed=None):
        self.seed, self.t, self.length, self.acts = seed, 0, 3 + seed % 5, []
        return self._obs()

    def _obs(self):
        return np.array([[self.seed, self.t], [self.seed, -self.t]], np.float32)  # (N, O)

    def step(self, act):
        self.t += 1
        self.acts.append(np.array(act))
        done = self.t >= self.length
        return self._obs(), np.array([act[0], 0.0], np.float32), np.full(2, 0.0 if done else 1.0, np.float32), done

    def get_state(self):
        return {"seed": self.seed, "acts": list(self.acts)}

    def set_state(self, state):
        self.reset(state["seed"])
        for a in state["acts"]:
            self.step(a)

    def close(self):
        pass


@pytest.fixture
def ends(monkeypatch):
    monkeypatch.setattr(pe, "MultiAgentEnv", Ends)
    return EnvConfig(scenario="simple_spread", max_cycles=50)


def test_episodes_that_end_early_are_padded_and_masked(ends):
    data = pe.random_episodes(ends, 4, 10)  # seeds 10 … 13: 3, 4, 5, 6 steps
    assert data["valid"].sum(1).tolist() == [3, 4, 5, 6] and data["obs"].shape[:2] == (4, 6)
    assert data["ended"].all()
    assert (data["obs"][0, 3:] == 0).all() and (data["rew"][0, 3:] == 0).all()  # the padding
    np.testing.assert_array_equal(data["obs"][1, :4, 0, 1], [0, 1, 2, 3])  # the steps that happened


def test_near_end_branch_points_sit_within_the_horizon_of_the_end(ends):
    ctx = pe.held_action_contexts(ends, 6, 2, 3, 20, near_end=True)
    lengths = 3 + (ctx.obs[:, 0, 0].numpy().astype(int) % 5)  # (C,) from each branch point's episode seed
    assert ((ctx.to_end >= 1) & (ctx.to_end <= 3)).all()
    np.testing.assert_array_equal(ctx.at, lengths - ctx.to_end)
    assert (ctx.at >= 2).all()  # room for the context: an episode too short for it was skipped
    np.testing.assert_array_equal(ctx.obs[:, 0, 1].numpy(), ctx.at)  # the frame at the branch point
    np.testing.assert_array_equal(ctx.past_obs[:, 0, :, 1].numpy(), np.stack([ctx.at - 2, ctx.at - 1], 1))
    # agent 0 holding action a until the end earns a per step: the branch stops at the episode's end
    np.testing.assert_array_equal(ctx.true[0::2], np.outer(ctx.to_end, [0, 1, 2]))
    assert np.isnan(ctx.true[1::2, 2]).all()  # agent 1 has two actions


def test_near_end_refuses_episodes_too_short_for_the_context(ends):
    with pytest.raises(ValueError, match="simple_spread: 20 random episodes gave 0 of 2 branch points"):
        pe.held_action_contexts(ends, 2, 9, 3, 0, near_end=True)
