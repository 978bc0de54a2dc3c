"""Scripted reference policies on simple_spread, on the episodes `python -m matwm_fast.eval RUN
--episodes 100 --seed 777` plays (episode e starts from reset(seed=777 + e)), so the numbers pair
with a trained policy's.  Run from the repository root: python bench/results/learning/diagnose/spread_baselines.py

- noop: every agent always takes action 0 (stays where it is, up to drift);
- nearest: every agent heads for its nearest landmark (agents may pile onto one landmark);
- assignment: every agent computes the same minimum-total-distance agent→landmark matching from its
  own observation (positions are all relative, so each can) and heads for its landmark.
Observation layout (MPE2 simple_spread, N=3): self vel (2), self pos (2), landmarks rel (3×2),
other agents rel (2×2), communication (2×2).  Actions: 0 no-op, 1 −x, 2 +x, 3 −y, 4 +y.
"""

import itertools
import json
import sys

import numpy as np

sys.path.insert(0, ".")
from matwm_fast.config import EnvConfig  # noqa: E402
from matwm_fast.env import MultiAgentEnv  # noqa: E402

EPISODES, SEED = 100, 777


def steer(target: np.ndarray, vel: np.ndarray) -> int:
    """Discrete action toward ``target`` (relative position), braking on the current velocity."""
    t = target - 0.5 * vel
    if np.abs(t).max() < 0.05:
        return 0
    if abs(t[0]) > abs(t[1]):
        return 2 if t[0] > 0 else 1
    return 4 if t[1] > 0 else 3


def nearest(obs: np.ndarray) -> np.ndarray:
    out = []
    for o in obs:
        lm = o[4:10].reshape(3, 2)
        out.append(steer(lm[np.linalg.norm(lm, axis=1).argmin()], o[0:2]))
    return np.array(out)


def assignment(obs: np.ndarray) -> np.ndarray:
    out = []
    for o in obs:
        lm = o[4:10].reshape(3, 2)  # relative to me
        agents = np.vstack([np.zeros(2), o[10:14].reshape(2, 2)])  # me first
        best = min(itertools.permutations(range(3)),
                   key=lambda p: sum(np.linalg.norm(agents[k] - lm[p[k]]) for k in range(3)))
        out.append(steer(lm[best[0]], o[0:2]))
    return np.array(out)


def play(policy) -> np.ndarray:
    env = MultiAgentEnv(EnvConfig(scenario="simple_spread"), seed=SEED)
    returns = []
    for e in range(EPISODES):
        obs, total, done = env.reset(seed=SEED + e), np.zeros(3), False
        while not done:
            obs, rew, _, done = env.step(policy(obs))
            total += rew
        returns.append(total.mean())
    return np.array(returns)


if __name__ == "__main__":
    res = {}
    for name, pol in [("noop", lambda o: np.zeros(3, dtype=int)), ("nearest", nearest), ("assignment", assignment)]:
        r = play(pol)
        res[name] = {"mean": float(r.mean()), "std": float(r.std())}
        print(f"{name:>10}: {r.mean():.2f} ± {r.std():.2f} ({EPISODES} episodes, seed {SEED})")
    with open("bench/results/learning/diagnose/spread_baselines.json", "w") as f:
        json.dump(res, f, indent=1)
