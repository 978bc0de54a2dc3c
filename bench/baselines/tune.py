"""Tuning the model-free baselines under the evaluation protocol: a random search over a grid of
BenchMARL settings on tuning seeds and tuning episodes, then the chosen configuration trained on
fresh reporting seeds, with the number of configurations tried written beside every result.

    python bench/baselines/tune.py run --scenario simple_spread --algo mappo --configs 30 --seeds 0 1 --jobs 2
    python bench/baselines/tune.py report --scenario simple_spread --algo mappo --seeds 100 101 102 103 104 --jobs 2

``run`` tries ``--configs`` configurations: BenchMARL's defaults first (with the frames per batch
that fit the budget), then the others drawn without replacement from the grid of :data:`SPACES`
(less the point that is the defaults again)
(or as ``--space`` changes it) by a generator seeded with ``--search-seed`` — random search, which
for the same number of trials covers each setting that matters more finely than a full grid.
Each configuration trains on every ``--seeds`` seed (tuning seeds, 0–99) to ``--budget`` env steps
and is scored on those seeds' tuning episodes (``matwm_fast/protocol.py``) by :func:`score`: the
greedy policy's mean return; with several teams, the mean over teams of the team's gain over
random when it plays against random opponents.  Runs already done are kept (the command
resumes; a record made with other settings is refused, not overwritten).  It writes
``tuning.json`` and ``tuning.md`` in ``RESULTS/<scenario>/<algo>/`` (default
``bench/results/learning/tuning/baselines``): every configuration's flags and per-seed scores, the
best, and the count.

``report`` trains the best configuration of that ``tuning.json`` on reporting seeds (100–199)
with ``--split report`` and 50 episodes, and ``--configs-tried`` set to the tuning's count: the
rows ``bench/learning_table.py`` reads from ``bench/results/learning/report/baselines``.  It
resumes as ``run`` does: a reporting seed whose records are there, made with the chosen
configuration and count, is not trained again.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import model_free  # noqa: E402
from matwm_fast import protocol  # noqa: E402

SCRIPT = HERE / "model_free.py"
RESULTS = ROOT / "bench" / "results" / "learning" / "tuning" / "baselines"
ALGOS, ON_POLICY = model_free.ALGOS, model_free.ON_POLICY
# model_free.py's own flags; any other name is passed as --set NAME=VALUE (a BenchMARL field)
FLAGS = ("gamma", "lr", "frames-per-batch", "n-envs", "minibatch-size", "minibatch-iters")
# The grids: what the small-budget literature moves first — the discount, the learning rate
# (BenchMARL's 5e-5 is set for millions of frames), the batch of env steps per iteration, and how
# hard each batch is trained on (PPO's epochs; Q-learning's gradient steps per batch).
SPACES = {
    "on_policy": {"gamma": [0.9, 0.95, 0.99], "lr": [5e-5, 3e-4, 1e-3], "frames-per-batch": [1000, 2000, 5000],
                  "minibatch-iters": [5, 15, 45]},
    "off_policy": {"gamma": [0.9, 0.95, 0.99], "lr": [5e-5, 3e-4, 1e-3], "frames-per-batch": [500, 1000, 2000],
                   "off_policy_n_optimizer_steps": [50, 200, 1000]},
}
DEFAULT_FRAMES = model_free.FRAMES_PER_BATCH
OBJECTIVE = ("the greedy policy's mean return over all agents; with several teams, the mean over teams of "
             "(the team's return when it plays greedily against random opponents − its return when everyone is random)")


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/baselines/tune.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", metavar="{run,report}")
    sub.required = True
    for name, helptext in (("run", "random search on tuning seeds and episodes"),
                           ("report", "the best configuration of a tuning on reporting seeds")):
        c = sub.add_parser(name, help=helptext, allow_abbrev=False)
        c.add_argument("--scenario", required=True, help="MPE2 scenario (model_free.py's)")
        c.add_argument("--algo", required=True, help=f"algorithm: {', '.join(ALGOS)}")
        c.add_argument("--seeds", type=int, nargs="+", required=True,
                       help="training seeds: tuning seeds (0–99) for run, reporting seeds (100–199) for report")
        c.add_argument("--jobs", type=int, default=1, help="trainings at a time (default 1; one torch thread each)")
        c.add_argument("--results", default=str(RESULTS), help="where tuning.json is (default %(default)s)")
        c.add_argument("--out", default="runs/tune", help="where the policies go (default %(default)s)")
    r = sub.choices["run"]
    r.add_argument("--configs", type=int, default=30, help="configurations to try (default 30)")
    r.add_argument("--budget", type=int, default=20_000, help="env steps per training (default 20000)")
    r.add_argument("--episodes", type=int, default=50, help="tuning episodes per seed (default 50)")
    r.add_argument("--search-seed", type=int, default=0, help="seeds the draw of configurations (default 0)")
    r.add_argument("--space", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="replace (or add) one dimension of the grid: a model_free.py flag "
                        f"({', '.join(FLAGS)}) or a BenchMARL field (repeatable)")
    rep = sub.choices["report"]
    rep.add_argument("--budgets", type=int, nargs="+", default=None,
                     help="env steps to report at (default: the tuning's budget)")
    rep.add_argument("--report-results", default=str(model_free.REPORT_RESULTS),
                     help="where the reporting runs' JSONs go (default %(default)s)")
    return p


# ----------------------------------------------------------------------------- the search
def parse_space(items: list[str], algo: str) -> dict[str, list]:
    space = {k: list(v) for k, v in SPACES["on_policy" if algo in ON_POLICY else "off_policy"].items()}
    for item in items:
        name, eq, values = item.partition("=")
        if not eq or not name or not values:
            raise ValueError(f"--space {item!r}: expected NAME=V1,V2,... (e.g. gamma=0.9,0.99)")
        out = []
        for v in values.split(","):
            try:
                out.append(int(v) if v.lstrip("-").isdigit() else float(v))
            except ValueError:
                out.append(v)  # a string or boolean field: model_free.py checks it against BenchMARL's type
        space[name] = out
    return space


def defaults_config(space: dict, budget: int) -> dict:
    """BenchMARL's defaults: nothing changed but the frames per batch, which must divide the budget."""
    if budget % DEFAULT_FRAMES == 0:
        return {"frames-per-batch": DEFAULT_FRAMES}
    fitting = [f for f in space.get("frames-per-batch", [budget]) if budget % f == 0]
    if not fitting:
        raise ValueError(f"--budget {budget}: no frames per batch of the grid ({space['frames-per-batch']}) "
                         f"divides it, nor the default {DEFAULT_FRAMES}")
    return {"frames-per-batch": max(fitting)}


def field_defaults(bm, algo: str, space: dict, budget: int) -> dict:
    """The value each dimension of ``space`` takes in :func:`defaults_config`'s run: BenchMARL's
    default of the field behind it (``bm.settable``), the frames per batch that config's."""
    family = "on_policy" if algo in ON_POLICY else "off_policy"
    fields = {flag[2:]: field for field, flag in model_free.OWN_FLAG.items()  # flag → the family's field
              if not field.startswith(("on_policy", "off_policy")) or field.startswith(family)}
    allowed = bm.settable(algo)
    out = {}
    for name in space:
        if name == "frames-per-batch":
            out[name] = defaults_config(space, budget)[name]
        elif name.startswith("algorithm."):
            out[name] = allowed["algorithm"].get(name.split(".", 1)[1])
        else:
            out[name] = allowed["experiment"].get(fields.get(name, name))
    return out


def draw(space: dict, budget: int, n: int, search_seed: int, defaults: dict) -> list[dict]:
    """The defaults, then n − 1 distinct grid points whose frames per batch divide the budget and
    which differ from the defaults' run (``defaults``: each dimension's value in it)."""
    first = defaults_config(space, budget)
    names = sorted(space)
    grid = [dict(zip(names, values)) for values in itertools.product(*(space[k] for k in names))]
    grid = [c for c in grid if budget % c.get("frames-per-batch", DEFAULT_FRAMES) == 0
            and any(c[k] != defaults.get(k) for k in names)]
    if n - 1 > len(grid):
        raise ValueError(f"--configs {n}: the grid holds {len(grid)} configurations besides the defaults "
                         f"that fit --budget {budget}")
    return [first] + random.Random(search_seed).sample(grid, n - 1)


def flags(config: dict) -> list[str]:
    out = []
    for name, value in sorted(config.items()):
        out += [f"--{name}", str(value)] if name in FLAGS else ["--set", f"{name}={value}"]
    return out


def score(result: dict) -> float:
    """:data:`OBJECTIVE` of one run's evaluation (model_free.py's JSON): higher is better."""
    res = result["results"]
    teams = list(res["greedy"]["teams"])
    if len(teams) == 1:
        return float(res["greedy"]["all"]["mean"])
    return sum(res[f"{t}_vs_random"]["teams"][t]["mean"] - res["random"]["teams"][t]["mean"] for t in teams) / len(teams)


def train(job: dict) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "train", *job["args"]], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    tail = (proc.stdout + proc.stderr)[-2000:]
    return proc.returncode, tail


def record_differs(record: dict, want: dict) -> str | None:
    """What in an earlier record of a training differs from the training about to be made (``want``:
    scenario, algorithm, seed, budget, max_cycles, configs_tried, split, episodes and the tuned
    settings); None when it is that training."""
    evaluation, settings = record.get("evaluation") or {}, record.get("settings") or {}
    got = {**{k: record.get(k) for k in ("scenario", "algorithm", "seed", "budget", "max_cycles", "configs_tried")},
           "split": evaluation.get("split"), "episodes": evaluation.get("episodes"), "tuned": settings.get("tuned")}
    diffs = [f"{k} {got[k]!r} (this run: {v!r})" for k, v in want.items() if got[k] != v]
    return "; ".join(diffs) or None


def pending(jobs: list[dict], bm) -> list[dict]:
    """The jobs still to run.  Every job's arguments are checked first (model_free.py's checks,
    BenchMARL's fields through ``bm``).  A job whose records are all there, made with these very
    settings, is done (the command resumes); one missing a budget's record runs again.  A record
    made with other settings — another draw, count of configurations or episodes — is refused
    rather than reused or overwritten."""
    todo = []
    for job in jobs:
        args = model_free.build_parser().parse_args(["train", *job["args"]])
        model_free.check_train_args(args)
        _, tuned = model_free.settings_for(bm, args)
        want = {"scenario": args.scenario, "algorithm": args.algo, "seed": args.seed, "max_cycles": args.max_cycles,
                "configs_tried": args.configs_tried, "split": args.split, "episodes": args.episodes, "tuned": tuned}
        budgets = sorted(set(args.budgets))
        found = [result_file(Path(args.results), args.scenario, args.algo, args.seed, b) for b in budgets]
        for b, path in zip(budgets, found):
            if path is None:
                continue
            try:
                record = load_result(path)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:  # a torn or foreign file: named, not retrained over
                raise ValueError(f"{path}: not a record written by model_free.py ({type(e).__name__}: {e})") from e
            why = record_differs(record, {**want, "budget": b})
            if why:
                raise ValueError(f"{path}: a record of other settings than {job['name']}'s: {why}; move it away, "
                                 "or write this run's records elsewhere")
        if None in found:
            todo.append(job)
    return todo


def run_jobs(jobs: list[dict], n: int) -> None:
    with ThreadPoolExecutor(max_workers=n) as pool:
        for job, (rc, tail) in zip(jobs, pool.map(train, jobs)):
            if rc != 0:
                raise RuntimeError(f"{job['name']}: model_free.py exited {rc}:\n{tail}")
            print(f"done {job['name']}", flush=True)


def result_file(results: Path, scenario: str, algo: str, seed: int, budget: int) -> Path | None:
    """model_free.py's record of one training, as it wrote it or gzipped (as the committed searches
    keep them); None when neither is there."""
    path = results / scenario / algo / f"seed{seed}_step{budget}.json"
    zipped = path.with_name(path.name + ".gz")
    return path if path.is_file() else zipped if zipped.is_file() else None


def load_result(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def cmd_run(args) -> int:
    space = parse_space(args.space, args.algo)
    defaults_config(space, args.budget)  # a budget that no batch divides is refused before BenchMARL loads
    bm = model_free.require_library()
    defaults = field_defaults(bm, args.algo, space, args.budget)
    configs = draw(space, args.budget, args.configs, args.search_seed, defaults)
    base = Path(args.results) / args.scenario / args.algo
    jobs = search_jobs(args.scenario, args.algo, configs, args.seeds, args.budget, args.episodes, base, args.out)
    jobs = pending(jobs, bm)
    print(f"{args.algo} on {args.scenario}: {len(configs)} configurations × seeds {args.seeds}; "
          f"{len(jobs)} trainings to run", flush=True)
    run_jobs(jobs, args.jobs)
    rows = []
    for k, config in enumerate(configs):
        scores = {s: score(load_result(result_file(base / f"c{k}", args.scenario, args.algo, s, args.budget)))
                  for s in args.seeds}
        rows.append({"index": k, "config": config, "flags": flags(config), "scores": scores,
                     "mean": sum(scores.values()) / len(scores)})
    best = max(rows, key=lambda r: r["mean"])
    record = {"scenario": args.scenario, "algorithm": args.algo, "budget": args.budget, "seeds": args.seeds,
              "episodes": args.episodes, "split": "tuning", "search_seed": args.search_seed, "space": space,
              "objective": OBJECTIVE,
              "configs_tried": len(configs), "best": best["index"], "configs": rows}
    (base / "tuning.json").write_text(json.dumps(record, indent=1))
    lines = [f"# Tuning {args.algo.upper()} on {args.scenario}: {len(configs)} configurations, {args.budget:,} env "
             f"steps, tuning seeds {args.seeds}, {args.episodes} tuning episodes each", "",
             f"Objective: {record['objective']}", "", "| # | settings | " + " | ".join(f"seed {s}" for s in args.seeds)
             + " | mean |", "|---:|---|" + "---:|" * (len(args.seeds) + 1)]
    for r in sorted(rows, key=lambda r: -r["mean"]):
        mark = " **best**" if r is best else ""
        lines.append(f"| {r['index']} | {' '.join(r['flags'])}{mark} | "
                     + " | ".join(f"{r['scores'][s]:.2f}" for s in args.seeds) + f" | {r['mean']:.2f} |")
    (base / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + min(5, len(rows))]))
    print(f"wrote {base / 'tuning.json'} and {base / 'tuning.md'}")
    return 0


def read_tuning(path: Path) -> dict:
    """A ``tuning.json`` written by :func:`cmd_run`, with ``chosen``: its best configuration's row."""
    try:
        tuning = json.loads(path.read_text())
        chosen = next(c for c in tuning["configs"] if c["index"] == tuning["best"])
        if not (isinstance(chosen["flags"], list) and isinstance(tuning["configs_tried"], int)
                and isinstance(tuning["budget"], int)):
            raise TypeError("flags, configs_tried or budget of the wrong type")
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration) as e:
        raise ValueError(f"{path}: not a tuning written by `tune.py run` ({type(e).__name__}: {e})") from e
    return {**tuning, "chosen": chosen}


def search_jobs(scenario: str, algo: str, configs: list[dict], seeds: list[int], budget: int, episodes: int,
                base: Path, out: str) -> list[dict]:
    """One training per configuration and tuning seed, scored on that seed's tuning episodes;
    configuration k's records in ``base/c<k>``."""
    return [{"name": f"config {k} seed {s}", "args": [
        "--scenario", scenario, "--algo", algo, "--seed", str(s), "--budgets", str(budget),
        "--split", "tuning", "--episodes", str(episodes), "--threads", "1",
        "--results", str(base / f"c{k}"), "--run-dir", f"{out}/{scenario}/{algo}/c{k}/seed{s}", *flags(config)]}
        for k, config in enumerate(configs) for s in seeds]


def report_jobs(scenario: str, algo: str, tuning: dict, seeds: list[int], budgets: list[int], results: str,
                out: str) -> list[dict]:
    """The tuning's chosen configuration on each reporting seed: 50 reporting episodes, the count of
    configurations tried recorded beside it."""
    return [{"name": f"report seed {s}", "args": [
        "--scenario", scenario, "--algo", algo, "--seed", str(s), "--budgets", *map(str, budgets),
        "--split", "report", "--episodes", "50", "--threads", "1", "--configs-tried", str(tuning["configs_tried"]),
        "--results", results, "--run-dir", f"{out}/{scenario}/{algo}/report/seed{s}", *tuning["chosen"]["flags"]]}
        for s in seeds]


def cmd_report(args) -> int:
    path = Path(args.results) / args.scenario / args.algo / "tuning.json"
    if not path.is_file():
        raise ValueError(f"{path}: no tuning here; run `tune.py run --scenario {args.scenario} --algo {args.algo}` first")
    tuning = read_tuning(path)
    chosen, tried = tuning["chosen"], tuning["configs_tried"]
    jobs = report_jobs(args.scenario, args.algo, tuning, args.seeds, args.budgets or [tuning["budget"]],
                       args.report_results, args.out)
    jobs = pending(jobs, model_free.require_library())
    print(f"{args.algo} on {args.scenario}: configuration {chosen['index']} of {tried} ({' '.join(chosen['flags'])}) "
          f"on reporting seeds {args.seeds}; {len(jobs)} trainings to run", flush=True)
    run_jobs(jobs, args.jobs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_free.check_choices(args.scenario, args.algo)
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: need at least 1")
        split = "tuning" if args.cmd == "run" else "report"
        protocol.check_seeds(split, args.seeds)
        if args.cmd == "run":
            if args.configs < 1:
                raise ValueError(f"--configs {args.configs}: need at least 1")
            if args.budget < 1:
                raise ValueError(f"--budget {args.budget}: need at least 1 env step")
            protocol.check_minimums(split, None, args.episodes)
            return cmd_run(args)
        return cmd_report(args)
    except (ValueError, RuntimeError, model_free.MissingLibrary) as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
