"""Does acting at an episode's first step with h = 0 cost return?

Imagination never produces a state with h = 0: its first state pairs z_0 with the sequence
model's output at the last context step (SPEC §4), so the actor is trained on no state like the one
it meets at every episode's first real step (``matwm_fast.acting``'s CHOICE).  This measures what
that costs, on trained checkpoints and without retraining, by replaying the sweep's paired matchup
episodes (seed s plays ``reset(seed=20,000 + 50·s + e)``, greedy) with the first step acted four ways:

- ``h0``: as the library acts (the queue is empty, h = 0).  Must reproduce the run's
  ``matchups.json`` greedy return exactly: the check that this script plays the protocol's episodes.
- ``primed``: the queue starts with one made-up step, (first observation, no-op).  In MPE every
  entity starts at rest and a no-op leaves it at rest, so "everyone stood still for one step" is a
  history consistent with the first observation; h is then the sequence model's output at a real
  token, as imagination pairs it, and z_t the posterior of the same observation.
- ``nearest`` and ``assignment``: (simple_spread only) the first action of every agent is that
  heuristic's (``bench/baselines/heuristics.py``), the learned policy acts from the second step
  on: how much a better first action could give at all.

    python bench/experiments/first_step.py RUN_DIR [RUN_DIR ...] [--out FILE]

Each RUN_DIR is a finished run (its latest checkpoint is played); the seed comes from its config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (ROOT, ROOT / "bench" / "baselines"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import heuristics  # noqa: E402  (bench/baselines: simple_spread's scripted policies, the matchup seeds)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from matwm_fast.acting import ContextQueues, policy_step  # noqa: E402
from matwm_fast.policy import Policy  # noqa: E402
from matwm_fast.play import play, summarise  # noqa: E402

EVAL_SEED, EPISODES, NOOP = heuristics.EVAL_SEED, 50, 0  # the tuning split's first episode and episodes; MPE's no-op
ARMS = ("h0", "primed", "nearest", "assignment")
FIRST_FROM_HEURISTIC = ("nearest", "assignment")  # simple_spread's scripted policies


def learned(pol: Policy, arm: str):
    """The learned greedy policy as ``play``'s ``act`` callable, with its own context queue and the
    first step of each episode acted per ``arm``.  MPE episodes all last ``max_cycles`` steps (no
    agent terminates), so a step counter finds the episode starts; ``calls`` lets the caller check it."""
    spec, cfg = pol.spec, pol.cfg
    q = ContextQueues(spec.n_agents, spec.obs_dim, cfg.train.act_context, "cpu")
    length = cfg.env.max_cycles
    state = {"calls": 0}

    def act(obs: np.ndarray) -> np.ndarray:
        first = state["calls"] % length == 0
        state["calls"] += 1
        o = torch.as_tensor(obs)  # (N, O)
        if first:
            q.reset()
            if arm == "primed":
                q.push(o, torch.full((spec.n_agents,), NOOP, dtype=torch.long))
        # called in every arm, so each draws the same latent samples from the seeded generator
        a = policy_step(pol.wm, pol.ac, q.obs, q.act, q.count_t, o, greedy=True)  # (N,)
        if first and arm in FIRST_FROM_HEURISTIC:
            a = torch.as_tensor(heuristics.POLICIES["simple_spread"][arm](obs))  # (N,)
        q.push(o, a)
        return a.numpy()

    return act, state


def measure(run: Path, arms: tuple[str, ...], episodes: int) -> dict:
    pol = Policy(run)
    seed = pol.cfg.train.seed
    first = EVAL_SEED + seed * episodes
    out = {"run": str(run), "checkpoint_step": pol.step, "seed": seed, "episode_seeds": [first, first + episodes - 1],
           "results": {}}
    for arm in arms:
        if arm in FIRST_FROM_HEURISTIC and pol.cfg.env.scenario != "simple_spread":
            continue
        act, state = learned(pol, arm)
        returns, _, _ = play(None, None, pol.cfg.env, 1, episodes, first, "cpu", act=act)  # (E, N)
        if state["calls"] != episodes * pol.cfg.env.max_cycles:
            raise SystemExit(f"{run}: {state['calls']} steps played, expected {episodes} × {pol.cfg.env.max_cycles} "
                             "(an episode ended early: the step counter cannot find episode starts)")
        out["results"][arm] = summarise(returns, pol.spec)
    cache = run / "matchups.json"
    if cache.exists():
        m = json.loads(cache.read_text())
        if {k: m["key"].get(k) for k in ("step", "episodes", "seed")} == {"step": pol.step, "episodes": episodes,
                                                                        "seed": first}:  # any split
            out["matchups_trained"] = m["results"]["trained"]["return_mean"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="first-step variants to play")
    p.add_argument("--episodes", type=int, default=EPISODES, help="episodes per run (the sweep's 50)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    for r in args.runs:
        if not (r / "checkpoints" / "latest").is_file():
            p.exit(2, f"error: {r}: not a run directory (no checkpoints/latest)\n")
    torch.set_num_threads(1)
    rows = []
    for r in args.runs:
        res = measure(r, tuple(args.arms), args.episodes)
        rows.append(res)
        check = res.get("matchups_trained")
        print(f"{r} (seed {res['seed']}, step {res['checkpoint_step']}): "
              + ", ".join(f"{k} {v['return_mean']:.2f}" for k, v in res["results"].items())
              + (f"  [matchups.json greedy {check:.2f}]" if check is not None else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
