"""Benchmark of raw environment stepping: MultiAgentEnv.step with random actions (no model).

    pytest bench/test_bench_env.py --benchmark-only

The env is the same for every backend (numpy on the host), so it is measured once.  A round is
``STEPS`` env steps, resetting at episode ends as the trainer does, so per-call overhead of the
benchmark harness is negligible next to a ~0.1 ms step.
"""

from __future__ import annotations

import numpy as np

from matwm_fast.env import MultiAgentEnv, random_actions

STEPS = 200


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
