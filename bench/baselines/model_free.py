"""Model-free baselines at MATWM's env-step budgets: BenchMARL's MAPPO and IPPO (on-policy PPO)
and QMIX, VDN and IQL (off-policy Q-learning) on MPE2, scored with this project's evaluator: the
model-free rows of the learning results (``bench/results/learning/baselines/``).

    python bench/baselines/model_free.py train --scenario simple_spread --algo mappo --seed 0 --budgets 20000 50000
    python bench/baselines/model_free.py train --scenario simple_tag --algo qmix --gamma 0.9 --frames-per-batch 1000 \
        --set off_policy_n_optimizer_steps=100 --set algorithm.mixing_embed_dim=64
    python bench/baselines/model_free.py eval runs/baselines/simple_spread/mappo/seed0/policy_step20000.pt
    python bench/baselines/model_free.py table --results bench/results/learning/baselines

``train`` trains one algorithm on one scenario with one seed until the largest budget, keeps the
policy when exactly each budget's env steps have been collected and trained on (the smaller
budgets are points of the same run: nothing in BenchMARL's PPO depends on the total length),
saves each as ``RUN_DIR/policy_step<budget>.pt`` and evaluates it.  An env step is one joint
transition of all agents (BenchMARL's "frame": one entry of a collected batch of shape
(envs, steps)); the budgets must be multiples of ``--frames-per-batch``, so training stops at
each budget exactly.

The evaluation is ``matwm_fast.play``'s, on the protocol's episodes (``matwm_fast/protocol.py``):
``--split tuning`` (the default; seeds 0–99) plays seed s's tuning episodes ``reset(seed=20,000 +
s·episodes + e)``, ``--split report`` (seeds 100–199, at least 50 episodes) its reporting episodes
``reset(seed=2,000,000 + (s − 100)·10,000 + e)`` — the sweep's matchup episodes of the same seed
and split; ``--eval-seed S`` plays ``S + s·episodes + e`` instead, outside the protocol.  Every
agent's episode returns are kept (``returns``, (E, N)), summarised by ``matwm_fast.play.report``:
greedy (argmax) and sampled, the uniformly random policy on the same episodes, and with several
teams each team's policy against random opponents (``<team>_vs_random``).  One JSON per run and
budget under ``RESULTS/<scenario>/<algo>/`` (default ``bench/results/learning/baselines``, and
``bench/results/learning/report/baselines`` for the report split).

Everything else is BenchMARL's default for the algorithm, its MLP and its experiment, except what
the flags change: ``--frames-per-batch`` and ``--n-envs`` (the family's collection: BenchMARL's
``on_policy_*`` or ``off_policy_*`` fields), ``--minibatch-size`` and ``--minibatch-iters`` (PPO's
epochs), ``--gamma``, ``--lr``, and ``--set FIELD=VALUE`` for any other field of BenchMARL's
experiment config or, as ``algorithm.FIELD``, of the algorithm's.  What a run changed is its
JSON's ``settings.tuned``; ``--configs-tried`` records how many configurations the tuning that
chose them tried (``bench/baselines/tune.py``).

BenchMARL, TorchRL and TensorDict are optional: ``pip install -e '.[baselines]'``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

from matwm_fast import protocol  # noqa: E402
from matwm_fast.config import EnvConfig  # noqa: E402
from matwm_fast.env import SCENARIOS, env_spec  # noqa: E402

INSTALL = "pip install -e '.[baselines]'"
ALGOS = ("mappo", "ippo", "qmix", "vdn", "iql")
ON_POLICY = ("mappo", "ippo")  # PPO; the others learn off-policy from a replay buffer
# BenchMARL's experiment fields that a flag sets (and checks): --set refuses them
OWN_FLAG = {"on_policy_collected_frames_per_batch": "--frames-per-batch",
            "off_policy_collected_frames_per_batch": "--frames-per-batch",
            "on_policy_n_envs_per_worker": "--n-envs", "off_policy_n_envs_per_worker": "--n-envs",
            "on_policy_minibatch_size": "--minibatch-size", "on_policy_n_minibatch_iters": "--minibatch-iters",
            "gamma": "--gamma", "lr": "--lr"}
BUDGETS = (20_000, 50_000)
RESULTS = ROOT / "bench" / "results" / "learning" / "baselines"
REPORT_RESULTS = ROOT / "bench" / "results" / "learning" / "report" / "baselines"
FORMAT = "matwm_fast-model-free-policy/1"
# BenchMARL's experiment defaults (conf/experiment/base_experiment.yaml) that the budget changes:
# 6,000 frames per batch divides neither 20,000 nor 50,000; 5,000 does (4 and 10 iterations)
FRAMES_PER_BATCH = 5_000


class MissingLibrary(RuntimeError):
    pass


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def require_library():
    """Import the BenchMARL side (benchmarl_mpe2.py), or say how to install it."""
    try:
        return importlib.import_module("benchmarl_mpe2")
    except ImportError as e:
        raise MissingLibrary(f"the model-free baselines need BenchMARL (with TorchRL and TensorDict), which is "
                             f"not installed here ({e}); install it with: {INSTALL}") from e


def versions() -> dict:
    out = {}
    for name in ("benchmarl", "torchrl", "tensordict", "torch", "pettingzoo", "mpe2", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/baselines/model_free.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", metavar="{train,eval,table}")
    sub.required = True
    t = sub.add_parser("train", help="train one algorithm to the budgets, save and evaluate the policies",
                       allow_abbrev=False)
    t.add_argument("--scenario", required=True, help=f"MPE2 scenario: {', '.join(SCENARIOS)}")
    t.add_argument("--algo", required=True, help=f"algorithm: {', '.join(ALGOS)}")
    t.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    t.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS),
                   help="env steps (joint transitions) at which to save and evaluate the policy; training runs "
                        "to the largest (default 20000 50000)")
    t.add_argument("--max-cycles", type=int, default=25, help="episode length, as MATWM's runs (default 25)")
    t.add_argument("--frames-per-batch", type=int, default=FRAMES_PER_BATCH,
                   help=f"env steps collected per iteration (default {FRAMES_PER_BATCH}; BenchMARL's 6000 "
                        "divides neither budget); every budget must be a multiple")
    t.add_argument("--n-envs", type=int, default=None, help="envs collected from in turn (default BenchMARL's: 10)")
    t.add_argument("--minibatch-size", type=int, default=None, help="PPO minibatch (default BenchMARL's: 400)")
    t.add_argument("--minibatch-iters", type=int, default=None,
                   help="PPO epochs over each batch (default BenchMARL's: 45)")
    t.add_argument("--gamma", type=float, default=None, help="discount (default BenchMARL's: 0.99)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default BenchMARL's: 5e-5)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other field of BenchMARL's experiment config, or algorithm.FIELD of the "
                        "algorithm's (repeatable)")
    t.add_argument("--configs-tried", type=int, default=1,
                   help="configurations the tuning that chose these settings tried (recorded; default 1)")
    protocol.add_episode_arguments(t)
    t.add_argument("--results", default=None, help="where the JSONs go: RESULTS/<scenario>/<algo>/"
                                                    f"seed<s>_step<budget>.json (default {RESULTS}; {REPORT_RESULTS} "
                                                    "for the report split)")
    t.add_argument("--run-dir", default=None,
                   help="where the policies and BenchMARL's folder go (default runs/baselines/<scenario>/<algo>/seed<s>)")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")

    e = sub.add_parser("eval", help="evaluate a saved policy file again", allow_abbrev=False)
    e.add_argument("policy", metavar="POLICY.pt", help="a policy_step<budget>.pt written by train")
    protocol.add_episode_arguments(e)
    e.add_argument("--out", metavar="FILE.json", default=None, help="where to write (default: next to the policy)")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")

    a = sub.add_parser("table", help="results.md and results.json from the JSONs of RESULTS", allow_abbrev=False)
    a.add_argument("--results", default=str(RESULTS), help="default %(default)s")
    return p


def evaluation_block(args, seed: int) -> dict:
    """The episodes seed ``seed``'s policy is scored on: the split's, or --eval-seed's."""
    if args.eval_seed is None:
        return protocol.episode_block(args.split or protocol.DEFAULT_SPLIT, seed, args.episodes)
    first = args.eval_seed + seed * args.episodes
    return {"split": None, "episodes": args.episodes, "seed": first, "episode_seeds": [first, first + args.episodes - 1]}


def check_choices(scenario: str, algo: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"--scenario {scenario!r}: unknown scenario; allowed: {', '.join(SCENARIOS)}")
    if algo not in ALGOS:
        raise ValueError(f"--algo {algo!r}: unknown algorithm; allowed: {', '.join(ALGOS)}")


def check_train_args(args) -> None:
    check_choices(args.scenario, args.algo)
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: must be 0 or more")
    if args.algo not in ON_POLICY:
        for flag, v in (("--minibatch-size", args.minibatch_size), ("--minibatch-iters", args.minibatch_iters)):
            if v is not None:
                raise ValueError(f"{flag} {v}: PPO's (mappo, ippo) only; {args.algo} learns off-policy "
                                 "(--set off_policy_train_batch_size=..., off_policy_n_optimizer_steps=...)")
    if args.gamma is not None and not 0.0 < args.gamma <= 1.0:
        raise ValueError(f"--gamma {args.gamma}: a discount in (0, 1]")
    if args.lr is not None and not args.lr > 0.0:
        raise ValueError(f"--lr {args.lr}: must be positive")
    if args.configs_tried < 1:
        raise ValueError(f"--configs-tried {args.configs_tried}: at least 1 (the configuration run)")
    args.set_pairs = parse_sets(args.sets)
    for flag, v in (("--max-cycles", args.max_cycles), ("--frames-per-batch", args.frames_per_batch),
                    ("--n-envs", args.n_envs), ("--minibatch-size", args.minibatch_size),
                    ("--minibatch-iters", args.minibatch_iters)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v}: must be at least 1")
    n_envs = args.n_envs if args.n_envs is not None else 10
    if args.frames_per_batch % n_envs:
        raise ValueError(f"--frames-per-batch {args.frames_per_batch}: must be a multiple of the {n_envs} envs "
                         "(each env adds the same number of steps to a batch)")
    for b in args.budgets:
        if b < 1 or b % args.frames_per_batch:
            raise ValueError(f"--budgets {b}: each budget must be a positive multiple of --frames-per-batch "
                             f"{args.frames_per_batch}, so that training stops exactly there")
    check_eval_args(args)
    if args.eval_seed is None:
        protocol.check_seeds(args.split or protocol.DEFAULT_SPLIT, [args.seed])
        evaluation_block(args, args.seed)
    if args.results is None:
        args.results = str(REPORT_RESULTS if args.split == "report" else RESULTS)
    check_dir("--results", Path(args.results))


def parse_sets(sets: list[str]) -> dict[str, str]:
    """``FIELD=VALUE`` strings → {FIELD: VALUE}; the fields and values are checked against
    BenchMARL's configs by :func:`settings_for` (it needs the library)."""
    out = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE (e.g. gamma=0.9, algorithm.mixing_embed_dim=64)")
        if key in out:
            raise ValueError(f"--set {key}: given twice")
        out[key] = value
    return out


def typed(flag: str, value: str, default):
    """``value`` as the type of BenchMARL's default for the field."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"{flag}: {value!r} is not a boolean; allowed: true, false")
        return value.lower() == "true"
    for kind in ((int,) if isinstance(default, int) else (float,) if isinstance(default, float) else
                 () if isinstance(default, str) else (int, float)):
        try:
            return kind(value)
        except ValueError:
            if isinstance(default, (int, float)):
                raise ValueError(f"{flag}: {value!r} is not {'an integer' if kind is int else 'a number'} "
                                 f"(BenchMARL's default: {default!r})") from None
    return value


def settings_for(bm, args) -> tuple[dict, dict]:
    """BenchMARL settings {"experiment": {...}, "algorithm": {...}} from the flags, and what was
    tuned (the flags' and --set's fields, flat: ``gamma``, ``algorithm.mixing_embed_dim``)."""
    family = "on_policy" if args.algo in ON_POLICY else "off_policy"
    exp = {f"{family}_collected_frames_per_batch": args.frames_per_batch}
    for key, v in ((f"{family}_n_envs_per_worker", args.n_envs), ("on_policy_minibatch_size", args.minibatch_size),
                   ("on_policy_n_minibatch_iters", args.minibatch_iters), ("gamma", args.gamma), ("lr", args.lr)):
        if v is not None:
            exp[key] = v
    alg: dict = {}
    allowed = bm.settable(args.algo)
    for key, value in args.set_pairs.items():
        section, field = ("algorithm", key.split(".", 1)[1]) if key.startswith("algorithm.") else ("experiment", key)
        fields = allowed[section]
        if field not in fields:
            where = f"{args.algo}'s algorithm config" if section == "algorithm" else "BenchMARL's experiment config"
            raise ValueError(f"--set {key}: not a field of {where}; allowed: "
                             + ", ".join(("algorithm." if section == "algorithm" else "") + f for f in sorted(fields)))
        if section == "experiment" and field in OWN_FLAG:
            raise ValueError(f"--set {key}: has its own flag, {OWN_FLAG[field]}")
        target = alg if section == "algorithm" else exp
        target[field] = typed(f"--set {key}", value, fields[field])
    tuned = {**exp, **{f"algorithm.{k}": v for k, v in alg.items()}}
    return {"experiment": exp, "algorithm": alg}, tuned


def check_eval_args(args) -> None:
    if args.episodes < 1:
        raise ValueError(f"--episodes {args.episodes}: need at least 1")
    if args.eval_seed is not None and args.eval_seed < 0:
        raise ValueError(f"--eval-seed {args.eval_seed}: must be 0 or more")
    if args.eval_seed is None:
        protocol.check_minimums(args.split or protocol.DEFAULT_SPLIT, None, args.episodes)
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: need 0 (torch's default) or more")


def check_dir(flag: str, d: Path) -> None:
    if d.exists() and not d.is_dir():
        raise ValueError(f"{flag} {d}: is a file, not a directory")
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {d}: {parent} is not writable")


# ----------------------------------------------------------------------------- evaluation
def evaluate_policy(bm, policy, group_map: dict, env_cfg: EnvConfig, episodes: int, seed: int) -> dict:
    """greedy, sampled, random and (several teams) ``<team>_vs_random`` on the same episodes."""
    from matwm_fast.play import play, report

    spec = env_spec(env_cfg)
    acts = {mode: bm.action_function(policy, group_map, spec.agents, spec.obs_sizes, greedy=mode == "greedy")
            for mode in ("greedy", "sampled")}
    out = {}

    def run(name, **kw):
        t = time.perf_counter()
        returns, _, _ = play(None, None, env_cfg, 1, episodes, seed, "cpu", **kw)  # (E, N)
        out[name] = {**report(returns, spec), "wall_s": round(time.perf_counter() - t, 3)}

    run("greedy", act=acts["greedy"])
    run("sampled", act=acts["sampled"])
    run("random", random_policy=True)
    if len(spec.teams) > 1:
        for team, idx in spec.teams.items():
            mask = np.zeros(spec.n_agents, bool)
            mask[idx] = True  # this team plays its greedy policy, every other agent acts uniformly at random
            run(f"{team}_vs_random", act=acts["greedy"], policies=mask)
    return out


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def print_summary(tag: str, res: dict) -> None:
    parts = [f"{name} {r['all']['mean']:.2f}" for name, r in res.items()]
    print(f"{tag}: all agents " + ", ".join(parts), flush=True)


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    import torch

    bm = require_library()
    settings, tuned = settings_for(bm, args)  # refuses a bad --set before anything is written
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = sorted(set(args.budgets))
    run_dir = Path(args.run_dir or f"runs/baselines/{args.scenario}/{args.algo}/seed{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    env_cfg = EnvConfig(scenario=args.scenario, max_cycles=args.max_cycles)
    where = evaluation_block(args, args.seed)
    episodes, eval_seed = args.episodes, where["seed"]

    t0 = time.perf_counter()
    snaps = bm.Snapshots(budgets)
    exp = bm.build(SCENARIOS[args.scenario], args.scenario, args.max_cycles, {}, args.algo, args.seed, settings,
                   str(run_dir), budgets[-1], callbacks=[snaps])
    setup_s = time.perf_counter() - t0
    print(f"{args.algo} on {args.scenario}, seed {args.seed}: training to {budgets[-1]} env steps "
          f"({budgets[-1] // args.frames_per_batch} iterations of {args.frames_per_batch}), groups {exp.group_map}",
          flush=True)
    snaps.start = time.perf_counter()
    exp.run()
    train_s = time.perf_counter() - snaps.start
    if snaps.env_steps != budgets[-1] or sorted(snaps.saved) != budgets:
        raise RuntimeError(f"collected {snaps.env_steps} env steps, snapshots at {sorted(snaps.saved)}; "
                           f"expected {budgets[-1]} and {budgets}")
    defaults = bm.defaults()
    info = {"library": versions(), "scenario": args.scenario, "max_cycles": args.max_cycles,
            "algorithm": args.algo, "seed": args.seed, "configs_tried": args.configs_tried,
            "settings": {"benchmarl_defaults": {k: defaults[k] for k in ("experiment", args.algo, "model")},
                         "tuned": tuned, "algorithm_changed": settings["algorithm"],
                         "changed": {**settings["experiment"], "max_n_frames": budgets[-1],
                                     "prefer_continuous_actions": False,
                                     "evaluation": False, "loggers": [], "create_json": False,
                                     "checkpoint_at_end": False},
                         "critic_model": "PPO's critic: the same MLP as the policy (BenchMARL's default)",
                         "train_env_seeds": f"{bm.TRAIN_ENV_SEED} + 1000·seed + env index"},
            "group_map": exp.group_map, "train_setup_s": round(setup_s, 3), "train_total_s": round(train_s, 3),
            "batches": snaps.batches}
    for b in budgets:
        snap = snaps.saved[b]
        policy_file = run_dir / f"policy_step{b}.pt"
        torch.save({"format": FORMAT, **info, "budget": b, "env_steps": b, "iterations": snap["iterations"],
                    "build": settings, "policy": snap["policy"]}, policy_file)
        exp.policy.load_state_dict(snap["policy"])
        t = time.perf_counter()
        res = evaluate_policy(bm, exp.policy, exp.group_map, env_cfg, episodes, eval_seed)
        out = {**info, "budget": b, "env_steps": b, "iterations": snap["iterations"],
               "train_wall_s": round(snap["train_wall_s"], 3), "eval_wall_s": round(time.perf_counter() - t, 3),
               "policy_file": str(policy_file),
               "evaluation": {**where,
                              "protocol": "matwm_fast.play.play: MultiAgentEnv, episode e from reset(seed=seed + e); "
                                          "returns summarised by matwm_fast.play.report"},
               "results": res}
        path = Path(args.results) / args.scenario / args.algo / f"seed{args.seed}_step{b}.json"
        write_json(path, out)
        print_summary(f"step {b} (trained in {snap['train_wall_s']:.0f} s)", res)
        print(f"wrote {path} and {policy_file}", flush=True)
    return 0


def cmd_eval(args) -> int:
    import torch

    bm = require_library()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.policy)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # data only: opening it runs no code
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ValueError(f"{path}: not a policy file written by train ({e})") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path}: not a policy file written by train (format {FORMAT})")
    where = evaluation_block(args, saved["seed"])  # refuses a seed that is not the split's
    with tempfile.TemporaryDirectory() as tmp:
        fpb = next(v for k, v in saved["build"]["experiment"].items() if k.endswith("_collected_frames_per_batch"))
        exp = bm.build(SCENARIOS[saved["scenario"]], saved["scenario"], saved["max_cycles"], {}, saved["algorithm"],
                       saved["seed"], saved["build"], tmp, fpb)
        exp.policy.load_state_dict(saved["policy"])
        env_cfg = EnvConfig(scenario=saved["scenario"], max_cycles=saved["max_cycles"])
        res = evaluate_policy(bm, exp.policy, exp.group_map, env_cfg, args.episodes, where["seed"])
        exp.close()
    out = {k: v for k, v in saved.items() if k not in ("policy", "format", "build")}
    out.update(policy_file=str(path), evaluation=where, results=res)
    dest = Path(args.out) if args.out else path.with_name(path.stem + "_eval.json")
    write_json(dest, out)
    print_summary(f"{saved['algorithm']} on {saved['scenario']}, seed {saved['seed']}, step {saved['budget']}", res)
    print(f"wrote {dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "train":
            check_train_args(args)
            return cmd_train(args)
        if args.cmd == "eval":
            check_eval_args(args)
            if not Path(args.policy).is_file():
                raise ValueError(f"{args.policy}: no such policy file")
            if args.out is not None and Path(args.out).is_dir():
                raise ValueError(f"--out {args.out}: is a directory; give a file name")
            return cmd_eval(args)
        from model_free_table import cmd_table

        return cmd_table(args)
    except (ValueError, MissingLibrary) as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
