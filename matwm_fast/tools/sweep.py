"""``python -m matwm_fast.sweep`` — learning curves over seeds, with baselines, as a table and a plot.

    python -m matwm_fast.sweep --env simple_spread --seeds 0 1 2 3 --preset cpu --steps 3000 --jobs 2
    python -m matwm_fast.sweep --env simple_tag --seeds 0 1 --out runs/sweep --aggregate-only
    python -m matwm_fast.sweep --env simple_spread --seeds 0 -- --wm.lr 1e-4   # flags after -- go to train
    python -m matwm_fast.sweep --env simple_tag --seeds 0 1 2 --launcher ray --address auto --gpus-per-trial 0.5
    python -m matwm_fast.sweep --split report --env simple_spread --seeds 100 101 102 103 104 --configs-tried 30

Each (env, seed) is one ``python -m matwm_fast.train`` run in ``OUT/<env>/seed<k>``, evaluated
with the paper's protocol (greedy policy, every ``--eval-every`` env steps, mean return over
``--eval-episodes`` episodes, of all agents and per team).  The runs are started by a launcher
(:mod:`matwm_fast.tools.launch`): ``local`` subprocesses, ``--jobs`` at a time (default), or
``ray`` tasks on a Ray cluster.  Afterwards, from the final checkpoint and with the same
evaluator, the *matchups*: the trained agents (greedy, and sampling from the policy as in
training), the uniformly random policy, and for scenarios with several teams each team trained
against random opponents.  Results: ``results.json``, ``results.md`` (median and min/max across
seeds at fixed step counts, described from the runs' own ``config.json``) and
``learning_<env>.png`` (drawn by :mod:`matwm_fast.tools.plot`, with the random baseline).

The matchups follow the protocol (:mod:`matwm_fast.protocol`): ``--split tuning`` (default) allows
training seeds 0–99 and plays seed s's tuning episodes; ``--split report`` allows seeds 100–199 —
never used while tuning — at least 5 of them and 50 episodes each, on held-out episodes; a seed of
the other split is refused before anything starts (status 2, naming it and the allowed ones).
Every episode's returns are kept, and ``results.json``/``results.md`` give the IQM and mean over
seeds × episodes with 95 % stratified-bootstrap intervals (rliable), the probability of
improvement over the random policy on the same episodes, and ``--configs-tried``: how many
configurations were scored on tuning episodes before this one was chosen.

A run already finished is not retrained, and one with a checkpoint is resumed, so a sweep can be
rerun to add seeds; ``--aggregate-only`` only rebuilds the table and plots from the run dirs.  A
run whose config differs from what this sweep would train (another preset, other flags after
``--``) is refused before anything starts, and the sweep holds ``OUT/.sweep.lock`` while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint as ck
from .. import protocol
from ..cli import config_from_args, fail
from ..config import Config, check_fields, diff, preset, resolve
from ..env import env_spec
from . import launch
from .sweep_results import aggregate, figures, markdown, read_rows, run_dir, saved_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m matwm_fast.sweep", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--env", nargs="+", required=True, metavar="SCENARIO", help="MPE2 scenario(s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default 0)")
    p.add_argument("--preset", default="cpu", help="config preset of every run (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="env steps per run (default: the preset's)")
    launch.add_flags(p)
    p.add_argument("--out", default="runs/sweep", help="run directories go to OUT/<env>/seed<k>")
    p.add_argument("--results", default=None, help="where the table and plots go (default OUT)")
    p.add_argument("--eval-every", type=int, default=1000, help="env steps between evaluations (paper: 1000)")
    p.add_argument("--eval-episodes", type=int, default=50, help="episodes per evaluation (paper: 50)")
    p.add_argument("--baseline-episodes", type=int, default=None,
                   help="episodes per matchup evaluation (default: --eval-episodes)")
    p.add_argument("--split", default=protocol.DEFAULT_SPLIT, choices=list(protocol.SPLITS),
                   help="the protocol's split (matwm_fast/protocol.py): which training seeds are allowed and which "
                        "episodes the final checkpoints are scored on. tuning (default): seeds 0-99, the episodes "
                        "settings are chosen on (seed s: 20,000 + s·E + e); report: seeds 100-199, at least 5 seeds "
                        "and 50 episodes each, held-out episodes (seed s: 2,000,000 + (s-100)·10,000 + e)")
    p.add_argument("--configs-tried", type=int, default=1, metavar="N",
                   help="configurations tried on tuning episodes before this one was chosen (default 1), written "
                        "beside the results")
    p.add_argument("--bootstrap-reps", type=int, default=protocol.BOOTSTRAP_REPS, metavar="N",
                   help=f"bootstrap resamples of the confidence intervals (default {protocol.BOOTSTRAP_REPS})")
    p.add_argument("--table-steps", nargs="+", type=int, default=None,
                   help="env steps shown in the table (default: every evaluated step)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild table and plots from OUT")
    p.add_argument("--no-matchups", action="store_true", help="skip the final-checkpoint matchup evaluations")
    return p


def check_protocol(args) -> None:
    """The seeds belong to the split, a reporting sweep has the protocol's minimums, and the
    library of its intervals is here — refused (ValueError, ImportError) before anything starts."""
    protocol.check_seeds(args.split, args.seeds)
    episodes = args.baseline_episodes or args.eval_episodes
    protocol.check_minimums(args.split, args.seeds, episodes)
    for s in args.seeds:
        protocol.first_episode(args.split, s, episodes)  # the episodes fit the split's range
    if args.configs_tried < 1:
        raise ValueError(f"--configs-tried {args.configs_tried}: must be at least 1 (this configuration)")
    if args.bootstrap_reps < 1:
        raise ValueError(f"--bootstrap-reps {args.bootstrap_reps}: must be at least 1")
    if not args.no_matchups:
        protocol.rliable()


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Sweep flags before ``--``, train flags after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def total_steps(args) -> int:
    return args.steps if args.steps is not None else preset(args.preset).run.steps


# ----------------------------------------------------------------------------- runs and their configs
def is_complete(d: Path, steps: int) -> bool:
    rows = read_rows(d)
    return ck.has_checkpoint(d) and bool(rows) and max(r.get("env_step", 0) for r in rows) >= steps


def resume_args(args) -> list[str]:
    """The run settings every run gets, fresh or resumed: the budget and the evaluation protocol."""
    return ["--steps", str(total_steps(args)), "--eval-every", str(args.eval_every),
            "--eval-episodes", str(args.eval_episodes)]


def fresh_args(args, env: str, seed: int, extra: list[str]) -> list[str]:
    """``train``'s flags for a new run of (env, seed)."""
    d = run_dir(args.out, env, seed).resolve()  # absolute: a Ray worker has another working directory
    return ["--preset", args.preset, "--scenario", env, "--seed", str(seed), "--run-dir", str(d),
            *resume_args(args), *extra]


def expected_config(train_args: list[str]) -> Config:
    """The config ``train`` resolves from these flags (its own parser: a bad flag after ``--`` is
    refused here, once, not by every run)."""
    from ..train import build_parser as train_parser

    cfg = config_from_args(train_parser().parse_args(train_args))
    check_fields(cfg)
    return resolve(cfg, env_spec(cfg.env).n_agents)


def differences(a: Config, b: Config, names=("run", "sweep")) -> list[str]:
    """What is learned differently under ``a`` and ``b``, worded for a refusal: the preset and
    every field of the learned sections (the run section — length, device, evaluation — may differ)."""
    return [f"{k}: {names[0]} {x!r}, {names[1]} {y!r}" for k, x, y in diff(a, b, include_preset=True)]


def unseeded(cfg: Config) -> Config:
    return replace(cfg, train=replace(cfg.train, seed=0))  # seeds differ by design


def _listed(diff: list[str], most: int = 8) -> str:
    return "; ".join(diff[:most]) + (f"; and {len(diff) - most} more" if len(diff) > most else "")


def check_runs(args, wanted: dict[str, Config] | None) -> None:
    """Refuse (ValueError) runs whose settings are not the sweep's, before anything starts.

    Training (``wanted``: each scenario's config, from :func:`expected_config`): a run in ``--out``
    trained otherwise than this sweep would (another preset, other flags after ``--``) — resuming
    it would mix two experiments in one curve, and retraining it would delete someone's results.
    ``--aggregate-only`` (``wanted`` None): seeds of one scenario that differ in more than the
    seed, since one median across them would mix experiments.
    """
    train = wanted is not None
    for env in args.env:
        ref = (unseeded(wanted[env]), "") if train else None
        for seed in args.seeds:
            d = run_dir(args.out, env, seed)
            cfg = saved_config(d)
            if cfg is None:
                continue
            cfg = unseeded(cfg)
            if ref is None:
                ref = (cfg, str(d))
                continue
            diff = differences(cfg, ref[0], names=("run", "sweep") if train else (str(d), ref[1]))
            if diff and train:
                raise ValueError(
                    f"{d} holds a run trained with other settings than this sweep's ({_listed(diff)}); its results "
                    f"would be mixed with the new ones. Sweep into another --out, or remove that run (rm -r {d}) "
                    "to train it again with these settings")
            if diff:
                raise ValueError(f"{d} and {ref[1]} were trained with different settings ({_listed(diff)}); one median "
                                 "across them would mix two experiments: aggregate them from separate --out "
                                 "directories, or compare them with python -m matwm_fast.plot")


def trials(args, extra: list[str], threads: int) -> tuple[list[launch.Trial], list[dict]]:
    """The runs still to train, and a log entry for each one already complete."""
    todo, log = [], []
    for env in args.env:
        for seed in args.seeds:
            d = run_dir(args.out, env, seed)
            if is_complete(d, total_steps(args)):
                print(f"sweep: {d} already at {total_steps(args)} steps, not retrained")
                log.append({"env": env, "seed": seed, "status": "complete before"})
            else:
                todo.append(launch.Trial(env, seed, str(d.resolve()), tuple(fresh_args(args, env, seed, extra)),
                                         tuple(resume_args(args)), threads))
    return todo, log


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_argv(argv)
    args = build_parser().parse_args(own)
    train = not args.aggregate_only
    try:
        preset(args.preset)
        launch.check_flags(args)
        check_protocol(args)
        if train and args.launcher == "ray":
            launch.import_ray()  # missing: say which extra brings it, before anything starts
        # what each scenario's runs will be (a bad flag after -- is refused here, once)
        wanted = {env: expected_config(fresh_args(args, env, args.seeds[0], extra)) for env in args.env} if train else None
    except (ValueError, ImportError) as e:
        fail(str(e))
    out, results_dir = Path(args.out), Path(args.results or args.out)
    for d in (out, results_dir):
        d.mkdir(parents=True, exist_ok=True)
    try:  # one sweep at a time in OUT: two would train, evaluate and write the same files
        lock = ck.lock_file(out / ".sweep.lock")
    except ck.LockHeld as e:
        fail(f"{out} is in use by sweep process {e.holder}; wait for it to finish, or sweep into another --out")
    try:
        try:  # with OUT locked: no other sweep changes the runs between this check and the training
            check_runs(args, wanted)
        except (ValueError, ck.CheckpointError) as e:
            fail(str(e))
        return _run(args, argv, extra, train, out, results_dir)
    finally:
        ck.unlock_file(lock)


def _run(args, argv: list[str], extra: list[str], train: bool, out: Path, results_dir: Path) -> int:
    """Train what is missing (``train``), then aggregate, with ``OUT`` locked."""
    log = []
    if train:
        t0 = time.perf_counter()
        launcher, threads = launch.from_args(args)
        todo, log = trials(args, extra, threads)
        token = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # marks this sweep's attempts in train.log
        try:
            log += launcher.run(todo, token) if todo else []
        except KeyboardInterrupt:
            print("sweep: interrupted; the runs checkpointed, rerun the same command to resume them",
                  file=sys.stderr)
            return 130
        except (ImportError, ConnectionError) as e:  # Ray missing or its cluster unreachable
            fail(str(e))
        print(f"sweep: training done in {time.perf_counter() - t0:.1f} s")
    # Evaluation acts on batches of N rows: a second thread gains ~1.1x on an idle 2-core machine
    # (5-7 s per run's matchups), and beside other trainings it only spin-waits (measured during
    # the tuning runs, niced, 2-core AMD EPYC: ~17 min per run's matchups with two threads, ~2.5
    # min with one).  So one
    # thread, as eval.py's default, unless --threads says otherwise.
    torch.set_num_threads(args.threads or 1)
    try:
        result = aggregate(args, argv)
    except (ck.CheckpointError, ValueError) as e:  # a run's checkpoint or config that cannot be used
        fail(str(e))
    old = results_dir / "results.json"
    if not train and old.exists():  # keep the record of how the runs were trained
        log = json.loads(old.read_text()).get("runs", [])
    result["runs"] = log
    (results_dir / "results.json").write_text(json.dumps(result, indent=1))
    (results_dir / "results.md").write_text(markdown(result, args))
    pngs = figures(result, out, results_dir)
    print(f"sweep: wrote {results_dir / 'results.md'}, {results_dir / 'results.json'}, "
          + ", ".join(map(str, pngs)))
    failed = [r for r in log if r["status"] not in (0, "complete before")]
    return 1 if failed or not result["envs"] else 0


if __name__ == "__main__":
    sys.exit(main())
