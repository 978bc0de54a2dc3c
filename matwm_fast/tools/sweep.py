"""``python -m matwm_fast.sweep`` — learning curves over seeds, with baselines, as a table and a plot.

    python -m matwm_fast.sweep --env simple_spread --seeds 0 1 2 3 --preset cpu --steps 3000 --jobs 2
    python -m matwm_fast.sweep --env simple_tag --seeds 0 1 --out runs/sweep --aggregate-only
    python -m matwm_fast.sweep --env simple_spread --seeds 0 -- --wm.lr 1e-4   # flags after -- go to train

Each (env, seed) is one ``python -m matwm_fast.train`` subprocess in ``OUT/<env>/seed<k>``, evaluated
with the paper's protocol (greedy policy, every ``--eval-every`` env steps, mean return over
``--eval-episodes`` episodes, of all agents and per team).  Afterwards, from the final checkpoint
and with the same evaluator, the *matchups*: the trained agents (greedy, and sampling from the
policy as in training), the uniformly random policy, and
for scenarios with several teams each team trained against random opponents.  Results:
``results.json``, ``results.md`` (median and min/max across seeds at fixed step counts) and
``learning_<env>.png`` (median, min–max band and the random baseline vs env steps).

A run already finished is not retrained, and one with a checkpoint is resumed, so a sweep can be
rerun to add seeds; ``--aggregate-only`` only rebuilds the table and plots from the run dirs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dataclasses import replace

from .. import checkpoint as ck
from ..config import LEARNED, load_config, preset, resolve
from ..env import env_spec
from ..eval import Policy
from ..metrics import read_metrics
from ..play import evaluate
from ..trainer import config_diff

TRAINED, SAMPLED, RANDOM = "trained", "trained_sampled", "random"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m matwm_fast.sweep", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--env", nargs="+", required=True, metavar="SCENARIO", help="MPE2 scenario(s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (default 0)")
    p.add_argument("--preset", default="cpu", help="config preset of every run (default cpu)")
    p.add_argument("--steps", type=int, default=None, help="env steps per run (default: the preset's)")
    p.add_argument("--jobs", type=int, default=1, help="training subprocesses at a time (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OMP threads per subprocess (default: CPU cores // jobs, at least 1)")
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
    return args.steps if args.steps is not None else preset(args.preset).train.steps


# ----------------------------------------------------------------------------- training
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


def train_cmd(args, env: str, seed: int, extra: list[str]) -> list[str]:
    d = run_dir(args.out, env, seed)
    common = ["--steps", str(total_steps(args)), "--eval-every", str(args.eval_every),
              "--eval-episodes", str(args.eval_episodes)]
    # an interrupted run continues exactly instead of starting over; its config is the checkpoint's
    # (train refuses changed training flags on resume), so the extra flags are not passed again
    if has_checkpoint(d):
        return [sys.executable, "-m", "matwm_fast.train", "--resume", str(d), *common]
    return [sys.executable, "-m", "matwm_fast.train", "--preset", args.preset, "--scenario", env,
            "--seed", str(seed), "--run-dir", str(d), *common, *extra]


def run_training(args, extra: list[str]) -> list[dict]:
    """Train every (env, seed) not yet complete, ``--jobs`` at a time; returns what ran and how."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(args.jobs, 1))
    # one BLAS/OMP pool per process: J processes × T threads should not exceed the cores
    child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    todo, log = [], []
    for env in args.env:
        for seed in args.seeds:
            d = run_dir(args.out, env, seed)
            if is_complete(d, total_steps(args)):
                print(f"sweep: {d} already at {total_steps(args)} steps, not retrained")
                log.append({"env": env, "seed": seed, "status": "complete before"})
            else:
                todo.append((env, seed, train_cmd(args, env, seed, extra)))
    running: list[tuple] = []

    def on_term(signum, _frame):  # `kill SWEEP_PID` stops the runs as Ctrl-C does
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        while todo or running:
            while todo and len(running) < max(args.jobs, 1):
                env, seed, cmd = todo.pop(0)
                d = run_dir(args.out, env, seed)
                d.mkdir(parents=True, exist_ok=True)
                print(f"sweep: start {env} seed {seed} ({threads} threads): {shlex.join(cmd)}", flush=True)
                fh = open(d / "train.log", "a")
                # own session: a terminal Ctrl-C reaches only the sweep, which then sends each run a
                # single SIGTERM (a second signal would make train quit without its checkpoint)
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env,
                                        start_new_session=True)
                running.append((env, seed, cmd, proc, fh, time.perf_counter()))
            time.sleep(0.5)
            for item in list(running):
                env, seed, cmd, proc, fh, t0 = item
                if proc.poll() is None:
                    continue
                fh.close()
                running.remove(item)
                wall = time.perf_counter() - t0
                print(f"sweep: {env} seed {seed} exited {proc.returncode} after {wall:.0f} s", flush=True)
                log.append({"env": env, "seed": seed, "status": proc.returncode, "wall_s": round(wall, 1),
                            "command": shlex.join(cmd)})
    except KeyboardInterrupt:
        # SIGTERM makes train checkpoint at the next step boundary; a rerun resumes from there
        for _, _, _, proc, _, _ in running:
            proc.terminate()
        for _, _, _, proc, _, _ in running:
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return log


# ----------------------------------------------------------------------------- matchups
def load_models(d: Path):
    """The final checkpoint of run ``d`` → (config, wm, ac, step, spec), on the CPU."""
    pol = Policy(d)
    return pol.cfg, pol.wm, pol.ac, pol.step, pol.spec


def matchups(d: Path, episodes: int, seed: int) -> dict:
    """Returns of: the trained agents (greedy and sampled), the random policy, and (several teams)
    each team trained against random others.

    Cached in ``d/matchups.json`` per (checkpoint step, episodes, seed): rebuilding the table
    does not replay the episodes.
    """
    cache = Path(d) / "matchups.json"
    cfg, wm, ac, step, spec = load_models(d)
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


def config_changes(d: Path, preset_name: str) -> list[str]:
    """How run ``d``'s saved config differs from its preset (e.g. flags passed after ``--``)."""
    f = Path(d) / "config.json"
    if not f.exists():
        return []
    cfg = load_config(json.loads(f.read_text()))
    base = preset(cfg.preset or preset_name)
    base = resolve(replace(base, env=cfg.env, train=replace(base.train, seed=cfg.train.seed)),
                   env_spec(cfg.env).n_agents)
    return [line.replace("checkpoint", "run").replace("this run", "preset")
            for line in config_diff(cfg, base, LEARNED) if line.split(":")[0] not in SWEEP_SET]


def aggregate(args, argv: list[str]) -> dict:
    out = Path(args.out)
    episodes = args.baseline_episodes or args.eval_episodes
    result: dict = {"command": shlex.join(["python", "-m", "matwm_fast.sweep", *argv]),
                    "preset": args.preset, "envs": {}}
    for env in args.env:
        curves: dict = {}
        per_seed, match, diag, changes = {}, {}, {}, set()
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
            changes.update(config_changes(d, args.preset))
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
                               "diagnostics": diag, "config_changes": sorted(changes)}
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


def markdown(result: dict, args) -> str:
    lines = ["# Learning results", "",
             f"Preset `{result['preset']}`. Each cell: median [min, max] across seeds (a single number when "
             "there is one seed) of the mean episode return over the evaluation episodes (greedy policy).", "",
             f"Command: `{result['command']}`", ""]
    for env, r in result["envs"].items():
        keys = list(r["curves"])
        lines += [f"## {env} (seeds {', '.join(map(str, r['seeds']))})", ""]
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


def plot(result: dict, results_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for env, r in result["envs"].items():
        keys = list(r["curves"])
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            c = r["curves"][key]
            steps = [s for s in r["steps"] if c[s]["n"] > 0]
            med = [c[s]["median"] for s in steps]
            ax.fill_between(steps, [c[s]["min"] for s in steps], [c[s]["max"] for s in steps], alpha=0.25,
                            label="min–max over seeds")
            ax.plot(steps, med, marker="o", label=f"MATWM median ({len(r['seeds'])} seeds)")
            rnd = r["matchups"].get(RANDOM, {}).get(key)
            if rnd and rnd["n"]:
                ax.axhline(rnd["median"], color="gray", ls="--", label="random policy")
                ax.axhspan(rnd["min"], rnd["max"], color="gray", alpha=0.12)
            m = r["matchups"].get(f"{key}_vs_random", {}).get(key)  # this team trained, its opponents random
            if m and m["n"]:
                ax.errorbar([steps[-1]], [m["median"]], fmt="s", capsize=3, color="C2",
                            label=f"trained {key} vs random opponents (final)",
                            yerr=[[m["median"] - m["min"]], [m["max"] - m["median"]]])
            ax.set_title(f"{env}: {label(key)}")
            ax.set_xlabel("env steps")
            ax.set_ylabel("mean episode return")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = results_dir / f"learning_{env}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = split_argv(argv)
    args = build_parser().parse_args(own)
    results_dir = Path(args.results or args.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    log = []
    if not args.aggregate_only:
        t0 = time.perf_counter()
        try:
            log = run_training(args, extra)
        except KeyboardInterrupt:
            print("sweep: interrupted; the runs checkpointed, rerun the same command to resume them",
                  file=sys.stderr)
            return 130
        print(f"sweep: training done in {time.perf_counter() - t0:.0f} s")
    torch.set_num_threads(args.threads or (os.cpu_count() or 1))  # training is over: evaluation gets the cores
    try:
        result = aggregate(args, argv)
    except (ck.CheckpointError, ValueError) as e:  # a run's checkpoint or config that cannot be used
        print(f"error: {e}", file=sys.stderr)
        return 2
    old = results_dir / "results.json"
    if args.aggregate_only and old.exists():  # keep the record of how the runs were trained
        log = json.loads(old.read_text()).get("runs", [])
    result["runs"] = log
    (results_dir / "results.json").write_text(json.dumps(result, indent=1))
    (results_dir / "results.md").write_text(markdown(result, args))
    pngs = plot(result, results_dir)
    print(f"sweep: wrote {results_dir / 'results.md'}, {results_dir / 'results.json'}, "
          + ", ".join(map(str, pngs)))
    failed = [r for r in log if r["status"] not in (0, "complete before")]
    return 1 if failed or not result["envs"] else 0


if __name__ == "__main__":
    sys.exit(main())
