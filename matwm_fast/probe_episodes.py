"""The env side of the world-model probe (:mod:`matwm_fast.wm_probe`): random-policy episodes for
the teacher-forced reward fit, and the branch points of the held-action test with their true
returns.  Nothing here depends on a model, so a probe makes it once and scores any number of
models on it.

Two kinds of scenario, one code path each:

- **Fixed-length episodes** (MPE2: no termination, only the time limit).  Every episode has
  ``max_cycles`` steps, and a branch point comes after ``context_len`` random steps from the reset:
  the held actions then play the ``horizon`` steps after it.
- **Episodes that end early** (Cooperative Pong ends at a missed ball, KAZ when the knights die,
  Pistonball when the ball reaches the wall).  Episodes are padded to the longest with zeros and a
  ``valid`` mask (E, T) says which steps happened.  Branch points taken at a fixed step would
  mostly miss what the actions decide — a random Cooperative Pong episode lasts 27–160 steps and
  the ball cannot leave the screen in its first 27, so after 8 + 8 steps every action would earn
  the same — so with ``near_end`` a branch point is ``k`` steps before the end of a random episode
  played from that seed, ``k`` drawn uniformly in 1 … ``horizon``: within the horizon of the moment
  the episode ended under random play, where holding one action or another can keep the ball in.
  The context is the ``context_len`` steps before it, a segment of its own, as imagination's
  contexts are mid-episode windows of the replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import EnvConfig
from .env import EnvSpec, MultiAgentEnv, random_actions

Tensor = torch.Tensor


def play_random(env: MultiAgentEnv, rng: np.random.Generator, seed: int) -> dict[str, list]:
    """One whole episode of uniformly random actions from ``reset(seed=seed)`` → lists obs, act,
    rew, next_obs (one entry per step) and ``ended``: whether it ended before the time limit."""
    obs = env.reset(seed=seed)
    ep: dict[str, list] = {"obs": [], "act": [], "rew": [], "next_obs": []}
    done, cont = False, None
    while not done:
        act = random_actions(rng, env.spec)  # (N,)
        nxt, rew, cont, done = env.step(act)
        for k, v in zip(("obs", "act", "rew", "next_obs"), (obs, act, rew, nxt)):
            ep[k].append(v)
        obs = nxt
    ep["ended"] = bool(not np.asarray(cont).any())  # every continuation 0: terminated, not truncated
    return ep


def random_episodes(env_cfg: EnvConfig, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Whole episodes of uniformly random actions, ``reset(seed=seed + e)`` → obs (E, T, N, *obs),
    act (E, T, N), rew (E, T, N), valid (E, T) which steps happened, ended (E,) which episodes ended
    before the time limit; for vector scenarios next_obs (E, T, N, O) too (a frame scenario's would
    double the memory, and only the vector regressions read it).  T is the longest episode; steps
    past an episode's end are zeros."""
    env = MultiAgentEnv(env_cfg, seed=seed)
    rng = np.random.default_rng(seed)
    keys = ("obs", "act", "rew") if env.spec.is_image else ("obs", "act", "rew", "next_obs")
    try:
        played = [play_random(env, rng, seed + e) for e in range(episodes)]
    finally:
        env.close()
    t_max = max(len(ep["act"]) for ep in played)
    out = {}
    for k in keys:
        first = np.asarray(played[0][k][0])
        arr = np.zeros((episodes, t_max, *first.shape), first.dtype)  # (E, T, N, ...)
        for e, ep in enumerate(played):
            arr[e, :len(ep[k])] = np.stack(ep[k])
        out[k] = arr
    out["valid"] = np.arange(t_max)[None] < np.array([len(ep["act"]) for ep in played])[:, None]  # (E, T)
    out["ended"] = np.array([ep["ended"] for ep in played])  # (E,)
    return out


@dataclass
class HeldActionContexts:
    """Branch points of the held-action test and their true returns: everything of it that the
    real env decides, so it is computed once for any number of world models."""

    spec: EnvSpec
    context: int  # L random steps before the branch point
    horizon: int  # H steps each action is held
    past_obs: Tensor  # (C, N, L, *obs) each agent's context observations
    past_act: Tensor  # (C, N, L) and actions
    obs: Tensor  # (C, N, *obs) the observations at the branch point
    true: np.ndarray  # (C·N, A) true return of holding each action (NaN: not the agent's action)
    at: np.ndarray  # (C,) the branch point's step in its episode
    to_end: np.ndarray  # (C,) steps from the branch point to the random episode's end (near_end), else -1


def true_held_returns(env: MultiAgentEnv, state: dict, agent: int, actions: list[int],
                      mates: np.ndarray) -> np.ndarray:
    """Branch the env at ``state`` once per action: ``agent`` holds it while the others replay
    ``mates`` (H, N); → the agent's summed reward over the H steps (to the episode's end if it
    ends sooner), one per action."""
    out = []
    for a in actions:
        env.set_state(state)
        total = 0.0
        for step in mates:
            joint = step.copy()
            joint[agent] = a
            _, rew, _, done = env.step(joint)
            total += float(rew[agent])
            if done:
                break
        out.append(total)
    return np.array(out)


def _branch_from_start(env, rng, seed: int, context_len: int):
    """``context_len`` random steps from the reset → (context obs, acts, obs now, step, -1)."""
    obs = env.reset(seed=seed)
    ctx_obs, ctx_act = [], []
    for _ in range(context_len):
        act = random_actions(rng, env.spec)
        ctx_obs.append(obs)
        ctx_act.append(act)
        obs, _, _, _ = env.step(act)
    return ctx_obs, ctx_act, obs, context_len, -1


def _branch_near_end(env, rng, seed: int, context_len: int, horizon: int):
    """A random episode from ``seed``, then back to ``k`` ∈ 1 … horizon steps before its end (module
    doc) → the same as :func:`_branch_from_start`, or None when that leaves no room for the context."""
    ep = play_random(env, rng, seed)
    k = int(rng.integers(1, horizon + 1))
    at = len(ep["act"]) - k
    if at < context_len:
        return None
    env.reset(seed=seed)
    for act in ep["act"][:at]:
        env.step(act)
    return ep["obs"][at - context_len:at], ep["act"][at - context_len:at], ep["obs"][at], at, k


MAX_TRIES = 10
"""Episodes tried per branch point at most (``near_end``), before refusing the scenario."""


def held_action_contexts(env_cfg: EnvConfig, contexts: int, context_len: int, horizon: int, seed: int,
                         should_stop: Callable[[], bool] | None = None,
                         near_end: bool = False) -> HeldActionContexts | None:
    """``contexts`` branch points from episodes ``reset(seed=seed + j)``: after ``context_len`` random
    steps, or with ``near_end`` a random 1 … ``horizon`` steps before a random episode's end (module
    doc; an episode too short for the context is skipped).  At each, every agent holds each of its
    actions for ``horizon`` steps in a branch of the env while the others replay one random
    sequence.  None when ``should_stop`` (asked between contexts) says so."""
    if not near_end and context_len + horizon > env_cfg.max_cycles:
        raise ValueError(f"context {context_len} + horizon {horizon} exceeds the episode length {env_cfg.max_cycles}")
    env = MultiAgentEnv(env_cfg, seed=seed)
    spec = env.spec
    rng = np.random.default_rng(seed)
    n, a_max = spec.n_agents, spec.n_actions
    true = np.full((contexts * n, a_max), np.nan)  # (X, A)
    past_obs, past_act, now, at, to_end = [], [], [], [], []
    j = 0  # episodes started
    try:
        for c in range(contexts):
            if should_stop is not None and should_stop():
                return None
            branch = None
            while branch is None:
                if j >= MAX_TRIES * contexts:
                    raise ValueError(f"{env_cfg.scenario}: {j} random episodes gave {c} of {contexts} branch points; "
                                     f"its episodes are too short for a context of {context_len} steps")
                branch = (_branch_near_end(env, rng, seed + j, context_len, horizon) if near_end
                          else _branch_from_start(env, rng, seed + j, context_len))
                j += 1
            ctx_obs, ctx_act, obs, step, k = branch
            state = env.get_state()
            mates = np.stack([random_actions(rng, spec) for _ in range(horizon)])  # (H, N)
            for i in range(n):
                valid = list(range(spec.action_counts[i]))  # this agent's real actions
                true[c * n + i, valid] = true_held_returns(env, state, i, valid, mates)
            past_obs.append(torch.as_tensor(np.stack(ctx_obs, 1)))  # (N, L, *obs)
            past_act.append(torch.as_tensor(np.stack(ctx_act, 1)))  # (N, L)
            now.append(torch.as_tensor(obs))  # (N, *obs)
            at.append(step)
            to_end.append(k)
    finally:
        env.close()
    return HeldActionContexts(spec, context_len, horizon, torch.stack(past_obs), torch.stack(past_act),
                              torch.stack(now), true, np.array(at), np.array(to_end))
