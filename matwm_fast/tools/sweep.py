"""``python -m matwm_fast.sweep`` — learning curves over seeds, with baselines, as a table and a plot.

    python -m matwm_fast.sweep --env simple_spread --seeds 0 1 2 3 --preset cpu --steps 3000 --jobs 2
    python -m matwm_fast.sweep --env simple_tag --seeds 0 1 --out runs/sweep --aggregate-only
    python -m matwm_fast.sweep --env simple_spread --seeds 0 -- --wm.lr 1e-4   # flags after -- go to train
    python -m matwm_fast.sweep --env simple_tag --seeds 0 1 2 --launcher ray --address auto --gpus-per-trial 0.5

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

A run already finished is not retrained, and one with a checkpoint is resumed, so a sweep can be
rerun to add seeds; ``--aggregate-only`` only rebuilds the table and plots from the run dirs.  A
run whose config differs from what this sweep would train (another preset, other flags after
``--``) is refused before anything starts, and the sweep holds ``OUT/.sweep.lock`` while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ck
from ..cli import config_from_args, fail
from ..config import LEARNED, Config, check_fields, load_config, preset, resolve
from ..env import env_spec
from ..eval import Policy
from ..metrics import read_metrics
from ..play import evaluate
from ..trainer import config_diff
from . import launch

TRAINED, SAMPLED, RANDOM = "trained", "trained_sampled", "random"


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
    p.add_argument("--baseline-seed", type=int, default=20_000,
                   help="evaluation seed of seed s's matchups is this + s·episodes (disjoint episodes per "
                        "run, and away from training's 10,000 + step)")
    p.add_argument("--table-steps", nargs="+", type=int, default=None,
                   help="env steps shown in the table (default: every evaluated step)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild table and plots from OUT")
    p.add_argument("--no-matchups", action="store_true", help="skip the final-checkpoint matchup evaluations")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Sweep flags before ``--``, train flags after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def run_dir(out: Path, env: str, seed: int) -> Path:
    return Path(out) / env / f"seed{seed}"


def total_steps(args) -> int:
    return args.steps if args.steps is not None else preset(args.preset).run.steps


# ----------------------------------------------------------------------------- runs and their configs
def read_rows(d: Path) -> list[dict]:
    return read_metrics(d) if (Path(d) / "metrics.jsonl").exists() else []


def has_checkpoint(d: Path) -> bool:
    try:
        ck.CheckpointDir(d).latest()
        return True
    except ck.CheckpointError:
        return False


def is_complete(d: Path, steps: int) -> bool:
    rows = read_rows(d)
    return has_checkpoint(d) and bool(rows) and max(r.get("env_step", 0) for r in rows) >= steps


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


def saved_config(d: Path) -> Config | None:
    """Run ``d``'s own ``config.json`` (None when it has none yet)."""
    raw = ck.RunDir(d).read_config()
    if raw is None:
        return None
    try:
        return load_config(raw)
    except ValueError as e:
        raise ValueError(f"{d}/config.json cannot be read: {e}") from None


def differences(a: Config, b: Config, names=("run", "sweep")) -> list[str]:
    """What is learned differently under ``a`` and ``b``: the preset and every field of the
    learned sections (the run section — length, device, evaluation — may differ)."""
    out = [] if a.preset == b.preset else [f"preset: {names[0]} {a.preset!r}, {names[1]} {b.preset!r}"]
    da, db = a.to_dict(), b.to_dict()
    return out + [f"{sec}.{k}: {names[0]} {da[sec][k]!r}, {names[1]} {db[sec][k]!r}"
                  for sec in LEARNED for k in da[sec] if da[sec][k] != db[sec][k]]


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


# ----------------------------------------------------------------------------- matchups
def matchups(d: Path, episodes: int, seed: int) -> dict:
    """Returns of: the trained agents (greedy and sampled), the random policy, and (several teams)
    each team trained against random others.

    Cached in ``d/matchups.json`` per (checkpoint step, episodes, seed): rebuilding the table
    does not replay the episodes.
    """
    cache = Path(d) / "matchups.json"
    pol = Policy(d)  # the final checkpoint, on the CPU
    cfg, wm, ac, step, spec = pol.cfg, pol.wm, pol.ac, pol.step, pol.spec
    key = {"step": step, "episodes": episodes, "seed": seed}
    if cache.exists():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old
    act_ctx, dev = cfg.train.act_context, "cpu"
    # the protocol's policy is greedy; the sampled one (as in training) shows whether argmax is the problem
    res = {TRAINED: evaluate(wm, ac, cfg.env, act_ctx, episodes, seed, dev)[0],
           SAMPLED: evaluate(wm, ac, cfg.env, act_ctx, episodes, seed, dev, greedy=False)[0],
           RANDOM: evaluate(None, None, cfg.env, act_ctx, episodes, seed, dev, random_policy=True)[0]}
    teams = spec.teams
    if len(teams) > 1:
        for team, idx in teams.items():
            mask = np.zeros(spec.n_agents, bool)
            mask[idx] = True  # this team plays its learned policy, every other agent acts at random
            res[f"{team}_vs_random"] = evaluate(wm, ac, cfg.env, act_ctx, episodes, seed, dev, policies=mask)[0]
    out = {"key": key, "teams": {t: [spec.agents[i] for i in idx] for t, idx in teams.items()}, "results": res}
    cache.write_text(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------- aggregation
def stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return {"n": 0}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(med), "min": float(v.min()), "max": float(v.max()),
            "q25": float(q25), "q75": float(q75), "values": v.tolist()}


def curve_keys(rows: list[dict]) -> list[str]:
    """'all' plus one key per team, read from the eval rows' ``eval_team_<team>_return_mean``."""
    teams = sorted({k[len("eval_team_"):-len("_return_mean")] for r in rows for k in r
                    if k.startswith("eval_team_") and k.endswith("_return_mean")})
    return ["all"] + (teams if len(teams) > 1 else [])


def eval_value(row: dict, key: str, prefix: str = "eval_") -> float | None:
    return row.get(f"{prefix}return_mean" if key == "all" else f"{prefix}team_{key}_return_mean")


def diagnostics(rows: list[dict], agents: list[str]) -> dict:
    """First and last warm training row of the metrics that show whether learning is sane."""
    warm = [r for r in rows if "shared_wm_total_loss" in r]
    if not warm:
        return {}

    def pick(r: dict) -> dict:
        out = {k: r.get(k) for k in ("env_step", "shared_wm_total_loss", "shared_wm_rec_loss",
                                     "shared_wm_rew_loss", "shared_wm_con_loss", "shared_wm_team_loss",
                                     "shared_wm_kl_loss")}
        for m in ("entropy", "return", "imag_reward", "return_scale", "value"):
            vals = [r.get(f"{a}_{m}") for a in agents if r.get(f"{a}_{m}") is not None]
            out[f"agent_mean_{m}"] = float(np.mean(vals)) if vals else None
        return out

    return {"first": pick(warm[0]), "last": pick(warm[-1])}


# settings every sweep run sets on its own: not reported as changes from the preset (nor is the
# run section: how a run ran, not what it learned)
SWEEP_SET = {"env.scenario", "train.seed"}


def config_changes(cfg: Config) -> list[str]:
    """How a run's saved config differs from its own preset (e.g. flags passed after ``--``)."""
    base = preset(cfg.preset)
    base = resolve(replace(base, env=cfg.env, train=replace(base.train, seed=cfg.train.seed)),
                   env_spec(cfg.env).n_agents)
    return [line.replace("checkpoint", "run").replace("this run", "preset")
            for line in config_diff(cfg, base, LEARNED) if line.split(":")[0] not in SWEEP_SET]


def run_settings(cfgs: list[Config]) -> dict:
    """What the runs' own configs say about how they were trained: each setting's values across
    the seeds (one value when they agree)."""
    def values(get) -> list:
        return sorted({get(c) for c in cfgs}, key=repr)

    return {"preset": values(lambda c: c.preset), "steps": values(lambda c: c.run.steps),
            "max_cycles": values(lambda c: c.env.max_cycles),
            "scenario_args": values(lambda c: ", ".join(f"{k}={v}" for k, v in c.env.kwargs)),
            "eval_every": values(lambda c: c.run.eval_every), "eval_episodes": values(lambda c: c.run.eval_episodes)}


def aggregate(args, argv: list[str]) -> dict:
    out = Path(args.out)
    episodes = args.baseline_episodes or args.eval_episodes
    result: dict = {"command": shlex.join(["python", "-m", "matwm_fast.sweep", *argv]), "envs": {}}
    for env in args.env:
        curves: dict = {}
        per_seed, match, diag, changes, cfgs = {}, {}, {}, set(), []
        for seed in args.seeds:
            d = run_dir(out, env, seed)
            rows = read_rows(d)
            evals = [r for r in rows if "eval_return_mean" in r]
            if not evals:
                print(f"sweep: {d} has no evaluations yet; left out")
                continue
            keys = curve_keys(evals)
            per_seed[seed] = {key: {int(r["env_step"]): eval_value(r, key) for r in evals} for key in keys}
            agents = sorted({c[len("eval_"):-len("_return_mean")] for r in evals for c in r
                             if c.endswith("_return_mean") and not c.startswith(("eval_team_", "eval_return"))})
            diag[seed] = diagnostics(rows, agents)
            cfg = saved_config(d)
            if cfg is not None:
                cfgs.append(cfg)
                changes.update(config_changes(cfg))
            if not args.no_matchups and has_checkpoint(d):
                match[seed] = matchups(d, episodes, args.baseline_seed + seed * episodes)
        if not per_seed:
            continue
        keys = list(next(iter(per_seed.values())))
        steps = sorted({s for c in per_seed.values() for s in c["all"]})
        for key in keys:
            curves[key] = {s: stats([c[key].get(s) for c in per_seed.values()]) for s in steps}
        mres: dict = {}
        for name in (next(iter(match.values()))["results"] if match else {}):
            mres[name] = {key: stats([eval_value(m["results"][name], key, prefix="") for m in match.values()])
                          for key in keys}
        result["envs"][env] = {"seeds": sorted(per_seed), "steps": steps, "curves": curves,
                               "matchups": mres, "matchup_episodes": episodes,
                               "teams": next(iter(match.values()))["teams"] if match else None,
                               "diagnostics": diag, "config_changes": sorted(changes),
                               "settings": run_settings(cfgs)}
    return result


# ----------------------------------------------------------------------------- outputs
def fmt(s: dict) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.2f}"
    return f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def label(key: str) -> str:
    return "all agents" if key == "all" else f"team {key}"


def settings_line(st: dict) -> str:
    """The runs' settings in a sentence; a setting the seeds disagree on shows every value."""
    def v(key: str) -> str:
        return " / ".join(str(x) for x in st.get(key, [])) or "?"

    args = f", scenario args {v('scenario_args')}" if any(st.get("scenario_args", [])) else ""
    return (f"Preset `{v('preset')}`, {v('steps')} env steps per run, episodes of {v('max_cycles')} steps{args}; "
            f"greedy evaluation every {v('eval_every')} env steps on {v('eval_episodes')} episodes.")


def markdown(result: dict, args) -> str:
    lines = ["# Learning results", "",
             "Each cell: median [min, max] across seeds (a single number when there is one seed) of the mean "
             "episode return over the evaluation episodes (greedy policy). The settings are read from each run's "
             "own `config.json`.", ""]
    for env, r in result["envs"].items():
        keys = list(r["curves"])
        lines += [f"## {env} (seeds {', '.join(map(str, r['seeds']))})", "", settings_line(r["settings"]), ""]
        if r["config_changes"]:
            lines += ["Config changed from the preset: " + "; ".join(f"`{c}`" for c in r["config_changes"]), ""]
        lines += ["| env step | seeds | " + " | ".join(label(k) for k in keys) + " |",
                  "|---:|---:|" + "---:|" * len(keys)]
        shown = [s for s in r["steps"] if args.table_steps is None or s in args.table_steps]
        for s in shown:
            n = r["curves"]["all"][s]["n"]
            lines.append(f"| {s} | {n} | " + " | ".join(fmt(r["curves"][k][s]) for k in keys) + " |")
        if r["matchups"]:
            lines += ["", f"Final checkpoint, {r['matchup_episodes']} episodes per run, same evaluator "
                      "(`<team>_vs_random`: that team plays its learned policy, every other agent acts uniformly at random):",
                      "", "| matchup | " + " | ".join(label(k) for k in keys) + " |", "|---|" + "---:|" * len(keys)]
            for name, m in r["matchups"].items():
                lines.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in keys) + " |")
        lines += ["", "Training diagnostics (first → last logged row after warm-up; agent means):", "",
                  "| seed | WM total | WM reward | WM rec | entropy | imag. reward | λ-return | return scale |",
                  "|---:|---|---|---|---|---|---|---|"]
        for seed, dg in r["diagnostics"].items():
            if not dg:
                continue
            f, la = dg["first"], dg["last"]

            def arrow(k):
                a, b = f.get(k), la.get(k)
                return "–" if a is None or b is None else f"{a:.3g} → {b:.3g}"

            lines.append(f"| {seed} | " + " | ".join(arrow(k) for k in (
                "shared_wm_total_loss", "shared_wm_rew_loss", "shared_wm_rec_loss", "agent_mean_entropy",
                "agent_mean_imag_reward", "agent_mean_return", "agent_mean_return_scale")) + " |")
        lines.append("")
    return "\n".join(lines)


def figures(result: dict, out: Path, results_dir: Path) -> list[Path]:
    """``learning_<env>.png``: the runs' evaluation curves drawn by ``tools.plot`` (median across
    seeds, min–max shaded), with the random policy's level and each team's trained-vs-random
    matchup (final checkpoint) from the matchups."""
    from . import plot

    paths = []
    for env, r in result["envs"].items():
        runs = [plot.Run(run_dir(out, env, s)) for s in r["seeds"]]
        panel_keys = {k for k, _, _ in plot.panels(runs, "eval_return_mean")}
        extras: dict = {}
        for key in r["curves"]:
            items = []
            rnd = r["matchups"].get(RANDOM, {}).get(key)
            if rnd and rnd["n"]:
                items.append(plot.Level("random policy (final matchups)", rnd["median"], rnd["min"], rnd["max"]))
            m = r["matchups"].get(f"{key}_vs_random", {}).get(key)  # this team trained, its opponents random
            if m and m["n"]:
                items.append(plot.Marker(f"trained {key} vs random opponents (final)", r["steps"][-1],
                                         m["median"], m["min"], m["max"]))
            if items and key in panel_keys:
                extras[key] = items
        title = (f"{env}: greedy evaluation return, median across {len(runs)} seeds, min–max shaded"
                 if len(runs) > 1 else f"{env}: greedy evaluation return")
        paths.append(plot.draw(runs, "eval_return_mean", results_dir / f"learning_{env}.png", band="minmax",
                               title=title, extras=extras))
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_argv(argv)
    args = build_parser().parse_args(own)
    train = not args.aggregate_only
    try:
        preset(args.preset)
        launch.check_flags(args)
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
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))  # training is over: evaluation gets the cores
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
