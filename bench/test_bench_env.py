"""Benchmark of raw environment stepping: MultiAgentEnv.step with random actions (no model).

    pytest bench/test_bench_env.py --benchmark-only

The env is the same for every backend (numpy on the host), so it is measured once.  A round is
``STEPS`` env steps, resetting at episode ends as the trainer does, so per-call overhead of the
benchmark harness is negligible next to a ~0.1 ms step.

The PettingZoo Butterfly games (``test_bench_butterfly_step[layer-scenario]``) at their default
sizes (Pistonball's 20 pistons, KAZ's 2 archers and 2 knights), each two ways: ``game`` is the
simulator alone — PettingZoo's parallel env with the settings matwm_fast fixes, stepped with dicts
of random actions — and ``env`` is :class:`~matwm_fast.butterfly.ButterflyEnv` on top of it (every
agent's frame resized to 64 × 64 and packed into the (N, 3, 64, 64) uint8 array).  They are
milliseconds a step, so a round is ``BUTTERFLY_STEPS`` steps over fewer rounds.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from matwm_fast.config import EnvConfig, preset
from matwm_fast.env import MultiAgentEnv, random_actions

STEPS = 200
BUTTERFLY_STEPS = 50
BUTTERFLY_ROUNDS = 5
BUTTERFLY = ("cooperative_pong", "pistonball", "knights_archers_zombies")


def test_bench_env_step(benchmark, bench, bench_cfg):
    env = MultiAgentEnv(bench_cfg.env, seed=0)
    rng = np.random.default_rng(0)
    actions = [random_actions(rng, env.spec) for _ in range(STEPS)]  # (N,) each, drawn outside the clock

    def fn():
        steps = 0
        for a in actions:
            obs, rew, _, done = env.step(a)
            steps += 1
            if done:
                env.reset()
        return steps, obs, rew

    info = bench.info(None, bench_cfg) | {"agents": env.spec.n_agents, "steps_per_round": STEPS}
    steps, obs, rew = bench.measure(benchmark, fn, info, {"env_steps_per_s": STEPS}, rounds=10)
    assert steps == STEPS and np.isfinite(obs).all() and np.isfinite(rew).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("scenario", BUTTERFLY)
@pytest.mark.parametrize("layer", ["game", "env"])
def test_bench_butterfly_step(benchmark, bench, layer, scenario):
    if importlib.util.find_spec("pymunk") is None:
        pytest.skip("needs pip install 'matwm_fast[butterfly]'")
    cfg = preset(bench.preset, scenario)  # the game's own episode length (config.SCENARIO_DEFAULTS)
    env = MultiAgentEnv(EnvConfig(scenario, max_cycles=cfg.env.max_cycles), seed=0)
    rng = np.random.default_rng(0)
    actions = [random_actions(rng, env.spec) for _ in range(BUTTERFLY_STEPS)]  # (N,) each
    game, agents = env.env, env.spec.agents  # PettingZoo's parallel env inside the ButterflyEnv

    def play_env():
        for a in actions:
            obs, rew, _, done = env.step(a)
            if done:
                env.reset()
        return obs

    def play_game():
        for a in actions:
            live = game.agents
            obs, *_ = game.step({x: int(a[i]) for i, x in enumerate(agents) if x in live})
            if not game.agents:
                obs, _ = game.reset(seed=int(rng.integers(2**31)))
        return obs

    info = bench.info(None, cfg) | {"agents": env.spec.n_agents, "steps_per_round": BUTTERFLY_STEPS, "layer": layer,
                                    "max_cycles": cfg.env.max_cycles}
    obs = bench.measure(benchmark, play_env if layer == "env" else play_game, info,
                        {"env_steps_per_s": BUTTERFLY_STEPS}, rounds=BUTTERFLY_ROUNDS)
    if layer == "env":
        assert obs.shape == (env.spec.n_agents, 3, 64, 64) and obs.dtype == np.uint8
    env.close()
