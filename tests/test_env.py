"""Env wrapper: padding, masks, truncation ≠ termination, every scenario, parameters."""

import numpy as np
import pytest

from matwm_fast.config import EnvConfig
from matwm_fast.env import SCENARIOS, MultiAgentEnv, parse_kwargs, random_actions


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_pads_and_steps(scenario):
    env = MultiAgentEnv(EnvConfig(scenario=scenario, max_cycles=5), seed=0)
    s = env.spec
    obs = env.reset(seed=1)
    assert obs.shape == (s.n_agents, s.obs_dim) and obs.dtype == np.float32
    mask = s.obs_mask()
    assert (obs[mask == 0] == 0).all()  # padding is zero
    am = s.action_mask()
    assert am.shape == (s.n_agents, s.n_actions) and am.sum(1).tolist() == list(s.action_counts)
    rng = np.random.default_rng(0)
    for t in range(5):
        a = random_actions(rng, s)
        assert (a < np.array(s.action_counts)).all()
        obs, rew, cont, done = env.step(a)
        assert rew.shape == (s.n_agents,)
        # MPE only truncates: the continuation flag stays 1 even on the last step
        assert (cont == 1).all()
        assert done == (t == 4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(a)


def test_heterogeneous_padding():
    env = MultiAgentEnv(EnvConfig(scenario="simple_speaker_listener"), seed=0)
    s = env.spec
    assert s.obs_sizes == (3, 11) and s.action_counts == (3, 5)
    assert s.obs_dim == 11 and s.n_actions == 5
    assert s.action_mask()[0].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="outside"):
        env.step(np.array([4, 0]))  # the speaker has only 3 actions


def test_scenario_parameters_and_errors():
    env = MultiAgentEnv(EnvConfig(scenario="simple_tag", kwargs=parse_kwargs("simple_tag", ["num_good=2", "num_adversaries=2"])))
    assert env.spec.agents == ("adversary_0", "adversary_1", "agent_0", "agent_1")
    assert env.spec.teams == {"adversary": [0, 1], "agent": [2, 3]}
    with pytest.raises(ValueError, match="valid: .*num_good"):
        parse_kwargs("simple_tag", ["num_goood=2"])
    with pytest.raises(ValueError, match="--env.scenario 'simple_tig': unknown scenario; valid scenarios: simple_tag"):
        MultiAgentEnv(EnvConfig(scenario="simple_tig"))


def test_state_round_trip_is_exact():
    env = MultiAgentEnv(EnvConfig(), seed=3)
    rng = np.random.default_rng(0)
    for _ in range(7):
        env.step(random_actions(rng, env.spec))
    st = env.get_state()
    acts = [random_actions(rng, env.spec) for _ in range(10)]
    first = [env.step(a)[0] for a in acts]
    env.set_state(st)
    second = [env.step(a)[0] for a in acts]
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
