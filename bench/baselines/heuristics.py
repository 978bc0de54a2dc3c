"""Scripted reference policies for simple_spread and simple_tag, scored by this project's
evaluator: the heuristic rows of the learning results (``bench/results/learning/README.md``).

    python bench/baselines/heuristics.py --seeds 0 1 2                  # the tuning episodes of seeds 0-2
    python bench/baselines/heuristics.py --split report --seeds 100 101 102 103 104   # the reporting episodes
    python bench/baselines/heuristics.py --scenario simple_tag --split report --seeds 100 101 102 103 104
    python bench/baselines/heuristics.py --seeds 0 --eval-seed 777 --episodes 100 --out DIR   # other episodes

They need no training, so they have no env-step budget: they are the bar a learned policy must
clear at any budget.  Each policy plays ``matwm_fast.play.play`` on the episodes a MATWM run of
seed s plays its final matchups on in the same split of the protocol (``matwm_fast/protocol.py``:
``--split tuning``, the default, seed s: ``reset(seed=20,000 + s·episodes + e)``; ``--split
report``, seed s: ``reset(seed=2,000,000 + (s − 100)·10,000 + e)``), so every comparison with a
trained run, MAPPO or IPPO of the same seed and split is paired.  ``--eval-seed S`` plays episodes
outside the protocol instead (``S + s·episodes + e``; the file's split is then null).

- ``noop``: every agent always takes action 0 (stays put, up to its drift);
- ``nearest``: every agent heads for the landmark nearest to it (agents may pile onto one);
- ``assignment``: every agent computes, from its own observation, the same matching of agents to
  landmarks with the least total distance (all positions are relative, so each can) and heads for
  its own landmark — about what a cooperative policy can reach.

The observation layout is MPE2's simple_spread with N agents and N landmarks: self velocity (2),
self position (2), landmarks relative (N×2), the other agents relative ((N−1)×2), communication.
Actions: 0 no-op, 1 −x, 2 +x, 3 −y, 4 +y.

simple_tag (MPE2's default: 3 adversaries, 1 prey, 2 obstacles) has one scripted pair,
``chase_flee``: every adversary heads for where the prey will be (its position plus
``LEAD_STEPS`` of its velocity, both in the adversary's observation); the prey runs from the
adversaries, each pushing with the inverse of its squared distance, and back toward the centre
once past ``EDGE`` on an axis (the reward punishes leaving [−0.9, 0.9]).  It is played as the
learned policies are: both teams scripted (``chase_flee``), and each team scripted against
uniformly random opponents (``chase_flee_<team>_vs_random``).  Observations there: self velocity
(2), self position (2), obstacles relative (2×2), the other agents relative (adversaries first,
the prey last), then — in an adversary's — the prey's velocity (2).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from matwm_fast import protocol  # noqa: E402
from matwm_fast.config import EnvConfig  # noqa: E402
from matwm_fast.env import env_spec  # noqa: E402
from matwm_fast.play import play, report  # noqa: E402

EVAL_SEED = protocol.TUNING.lo  # the tuning split's: seed s plays 20,000 + s·episodes + e
LEARNING = ROOT / "bench" / "results" / "learning"


def results_dir(scenario: str, split: str) -> Path:
    """Where seed<s>.json go by default: beside the reporting rows for the report split, else the tuning ones."""
    return (LEARNING / "report" / "baselines" if split == "report" else LEARNING / "baselines") / scenario / "heuristics"


# steering: aim at the target minus this many steps of the current velocity (so an agent brakes
# before it arrives), and stay put once the aim point is within this distance on both axes
BRAKE_STEPS, ARRIVED = 0.5, 0.05
# simple_tag: an adversary aims this many steps of the prey's velocity ahead of it; the prey turns
# back toward the centre past this coordinate (the bound penalty starts at 0.9), that hard
LEAD_STEPS, EDGE, EDGE_PULL = 0.5, 0.7, 5.0
TAG_OBSTACLES = 2  # MPE2 simple_tag's default num_obstacles


def steer(target: np.ndarray, vel: np.ndarray) -> int:
    """The discrete action toward ``target`` (relative position), braking on the current velocity."""
    aim = target - BRAKE_STEPS * vel  # (2,)
    if np.abs(aim).max() < ARRIVED:
        return 0
    if abs(aim[0]) > abs(aim[1]):
        return 2 if aim[0] > 0 else 1
    return 4 if aim[1] > 0 else 3


def layout(o: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One agent's observation → (velocity (2,), landmarks relative (n, 2), all agents relative, self first (n, 2))."""
    vel = o[0:2]  # (2,)
    landmarks = o[4:4 + 2 * n].reshape(n, 2)  # (n, 2)
    others = o[4 + 2 * n:4 + 2 * n + 2 * (n - 1)].reshape(n - 1, 2)  # (n-1, 2)
    return vel, landmarks, np.vstack([np.zeros(2), others])


def noop(obs: np.ndarray) -> np.ndarray:
    return np.zeros(len(obs), np.int64)  # (N,)


def nearest(obs: np.ndarray) -> np.ndarray:
    n, out = len(obs), []
    for o in obs:
        vel, lm, _ = layout(o, n)
        out.append(steer(lm[np.linalg.norm(lm, axis=1).argmin()], vel))
    return np.array(out, np.int64)  # (N,)


def assignment(obs: np.ndarray) -> np.ndarray:
    n, out = len(obs), []
    for o in obs:
        vel, lm, agents = layout(o, n)
        best = min(itertools.permutations(range(n)),
                   key=lambda p: sum(np.linalg.norm(agents[k] - lm[p[k]]) for k in range(n)))
        out.append(steer(lm[best[0]], vel))  # agent 0 of this view is me
    return np.array(out, np.int64)  # (N,)


def chase_flee(obs: np.ndarray, teams: dict[str, list[int]]) -> np.ndarray:
    """simple_tag: the adversaries chase the prey's next position, the prey flees them (module docstring)."""
    adversaries, prey = teams["adversary"], teams["agent"]
    n_adv, others = len(adversaries), 4 + 2 * TAG_OBSTACLES  # where the other agents' positions start
    out = np.zeros(len(obs), np.int64)  # (N,)
    for i in adversaries:
        o = obs[i]
        target = o[others + 2 * (n_adv - 1):others + 2 * n_adv]  # (2,) the prey, relative (listed last)
        prey_vel = o[others + 2 * n_adv:others + 2 * n_adv + 2]  # (2,)
        out[i] = steer(target + LEAD_STEPS * prey_vel, np.zeros(2))  # no braking: collide at speed
    for i in prey:
        o = obs[i]
        rel = o[others:others + 2 * n_adv].reshape(n_adv, 2)  # (A, 2) the adversaries, relative
        push = -(rel / np.maximum((rel ** 2).sum(1, keepdims=True), 1e-6)).sum(0)  # (2,) away, nearer ones harder
        pos = o[2:4]  # (2,)
        push = push - EDGE_PULL * np.sign(pos) * (np.abs(pos) > EDGE)
        out[i] = steer(push, np.zeros(2))
    return out


# scenario → name → policy (observations (N, obs) [, the scenario's teams] → actions (N,))
POLICIES: dict[str, dict[str, Callable]] = {
    "simple_spread": {"noop": noop, "nearest": nearest, "assignment": assignment},
    "simple_tag": {"chase_flee": chase_flee},
}


def evaluate(seed: int, episodes: int, eval_seed: int | None = None, split: str = protocol.DEFAULT_SPLIT,
             scenario: str = "simple_spread") -> dict:
    """Every heuristic of ``scenario`` and the random policy on seed ``seed``'s matchup episodes of
    ``split`` (``eval_seed`` given: on ``eval_seed + seed·episodes + e`` instead, outside the
    protocol); with several teams, also each team scripted against random opponents."""
    env_cfg = EnvConfig(scenario=scenario)
    spec = env_spec(env_cfg)
    if eval_seed is None:
        where = protocol.episode_block(split, seed, episodes)
    else:
        first = eval_seed + seed * episodes
        where = {"split": None, "episodes": episodes, "seed": first, "episode_seeds": [first, first + episodes - 1]}
    first = where["seed"]
    out = {"scenario": scenario, "seed": seed, "max_cycles": env_cfg.max_cycles,
           "evaluation": {**where,
                          "protocol": "matwm_fast.play.play: MultiAgentEnv, episode e from reset(seed=seed + e); "
                                      "returns summarised by matwm_fast.play.report"},
           "results": {}}
    for name, pol in POLICIES[scenario].items():
        act = pol if len(spec.teams) == 1 else (lambda obs, pol=pol: pol(obs, spec.teams))
        returns, _, _ = play(None, None, env_cfg, 1, episodes, first, "cpu", act=act)  # (E, N)
        out["results"][name] = report(returns, spec)
        for team, idx in spec.teams.items() if len(spec.teams) > 1 else ():
            mask = np.zeros(spec.n_agents, bool)
            mask[idx] = True  # this team scripted, every other agent uniformly random
            returns, _, _ = play(None, None, env_cfg, 1, episodes, first, "cpu", act=act, policies=mask)  # (E, N)
            out["results"][f"{name}_{team}_vs_random"] = report(returns, spec)
    returns, _, _ = play(None, None, env_cfg, 1, episodes, first, "cpu", random_policy=True)  # (E, N)
    out["results"]["random"] = report(returns, spec)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/baselines/heuristics.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--scenario", default="simple_spread", help=f"MPE2 scenario: {', '.join(POLICIES)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds whose episodes to play")
    protocol.add_episode_arguments(p, "episodes per seed")
    p.add_argument("--out", default=None, help="where seed<s>.json go (default bench/results/learning/baselines/"
                                               "SCENARIO/heuristics for the tuning split and --eval-seed, "
                                               "bench/results/learning/report/baselines/SCENARIO/heuristics for the "
                                               "report split)")
    args = p.parse_args(argv)
    split = args.split or protocol.DEFAULT_SPLIT
    bad = ([f"--scenario {args.scenario!r}: no scripted policies; allowed: {', '.join(POLICIES)}"]
           * (args.scenario not in POLICIES)
           + [f"--episodes {args.episodes}: must be at least 1"] * (args.episodes < 1)
           + [f"--seeds {s}: must be 0 or more" for s in args.seeds if s < 0]
           + [f"--eval-seed {args.eval_seed}: must be 0 or more"] * (args.eval_seed is not None and args.eval_seed < 0))
    if not bad and args.eval_seed is None:
        try:
            protocol.check_seeds(split, args.seeds)
            protocol.check_minimums(split, args.seeds, args.episodes)
            for s in args.seeds:
                protocol.first_episode(split, s, args.episodes)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        p.exit(2, f"error: {bad[0]}\n")
    out = Path(args.out or results_dir(args.scenario, split if args.eval_seed is None else "tuning"))
    if out.exists() and not out.is_dir():
        p.exit(2, f"error: --out {out}: is a file, not a directory\n")
    out.mkdir(parents=True, exist_ok=True)
    for s in args.seeds:
        res = evaluate(s, args.episodes, args.eval_seed, split, args.scenario)
        path = out / f"seed{s}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"seed {s} (episodes {res['evaluation']['episode_seeds']}): " +
              ", ".join(f"{k} {v['all']['mean']:.2f}" for k, v in res["results"].items()) + f" → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
