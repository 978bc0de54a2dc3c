"""The model-free baselines' summary: ``results.md`` and ``results.json`` from the per-run JSONs
that ``model_free.py train`` wrote under ``RESULTS/<scenario>/<algo>/`` (median [min, max] over
seeds of each run's mean return, per budget and algorithm; each team's policy against random
opponents; training wall time).  ``python bench/baselines/model_free.py table --results DIR``.
The README's learning table, with intervals, is ``bench/learning_table.py``'s.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def med(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"


def tuned(run: dict) -> dict:
    """What a run changed from BenchMARL's defaults (``model_free.py train``'s flags and --set);
    the records made before --set list only the frames per batch."""
    s = run["settings"]
    if "tuned" in s:
        return s["tuned"]
    return {k: v for k, v in s["changed"].items() if k.startswith("on_policy")}


def load_results(results: Path) -> list[dict]:
    runs = []
    for f in sorted(results.glob("*/*/seed*_step*.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: unreadable ({e})") from e
    return runs


def cmd_table(args) -> int:
    results = Path(args.results)
    if not results.is_dir():
        raise ValueError(f"--results {results}: no such directory")
    runs = load_results(results)
    if not runs:
        raise ValueError(f"--results {results}: no <scenario>/<algo>/seed<s>_step<budget>.json files")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["budget"], r["algorithm"]), []).append(r)
    lib = runs[0]["library"]
    agg, lines = {}, []
    algos = " / ".join(sorted({r["algorithm"].upper() for r in runs}))
    changed = sorted({f"`{k}` = {v}" for r in runs for k, v in tuned(r).items()})
    lines += [f"# Model-free baselines at MATWM's env-step budgets (BenchMARL {algos})", "",
              f"BenchMARL {lib['benchmarl']}, TorchRL {lib['torchrl']}, TensorDict {lib['tensordict']}, "
              f"torch {lib['torch']}, PettingZoo {lib['pettingzoo']}, MPE2 {lib['mpe2']}. "
              "BenchMARL's default algorithms, MLP and experiment settings except, over the runs here: "
              f"{', '.join(changed)} (each run's JSON: `settings`). Evaluation: this project's protocol (`matwm_fast.play`), "
              f"{runs[0]['evaluation']['episodes']} episodes per run and policy, seed s on the protocol's episodes "
              f"of split {' / '.join(sorted({str(r['evaluation'].get('split', 'tuning')) for r in runs}))} "
              "(matwm_fast/protocol.py; tuning: reset(seed = 20,000 + s·50 + e)) — the MATWM sweep's matchup "
              "episodes of the same seed. "
              "Median [min, max] over seeds of the mean return; `random`: the uniformly random policy on the "
              "same episodes.", ""]
    for scenario in sorted({k[0] for k in groups}):
        keys = sorted(k for k in groups if k[0] == scenario)
        teams = list(groups[keys[0]][0]["results"]["greedy"]["teams"])
        multi = len(teams) > 1
        lines += [f"## {scenario}", ""]
        head = "| env steps | algorithm | seeds | all agents, greedy | all agents, sampled | all agents, random |"
        sep = "|---:|---|---:|---:|---:|---:|"
        if multi:
            for t in teams:
                head += f" team {t}, greedy | team {t}, sampled |"
                sep += "---:|---:|"
        lines += [head, sep]
        for key in keys:
            rs = sorted(groups[key], key=lambda r: r["seed"])
            row = {"seeds": [r["seed"] for r in rs]}
            for pol in ("greedy", "sampled", "random"):
                row[f"all_{pol}"] = [r["results"][pol]["all"]["mean"] for r in rs]
                for t in teams:
                    row[f"team_{t}_{pol}"] = [r["results"][pol]["teams"][t]["mean"] for r in rs]
            for t in teams if multi else []:
                for u in teams:  # team t plays its policy, the others random: every team's return
                    row[f"{t}_vs_random_team_{u}"] = [r["results"][f"{t}_vs_random"]["teams"][u]["mean"] for r in rs]
            row["train_wall_s"] = [r["train_wall_s"] for r in rs]
            row["train_total_s"] = [r["train_total_s"] for r in rs]
            agg[f"{scenario}/{key[1]}/{key[2]}"] = row
            cells = f"| {key[1]:,} | {key[2].upper()} | {len(rs)} | {med(row['all_greedy'])} | " \
                    f"{med(row['all_sampled'])} | {med(row['all_random'])} |"
            if multi:
                for t in teams:
                    cells += f" {med(row[f'team_{t}_greedy'])} | {med(row[f'team_{t}_sampled'])} |"
            lines.append(cells)
        lines.append("")
        if multi:
            lines += ["Each team's greedy policy against uniformly random opponents (`<team>_vs_random`), "
                      "that team's return, next to the random team's on the same episodes:", ""]
            head = "| env steps | algorithm |" + "".join(f" {t} trained vs random | {t} random (all random) |"
                                                         for t in teams)
            lines += [head, "|---:|---|" + "---:|---:|" * len(teams)]
            for key in keys:
                row = agg[f"{scenario}/{key[1]}/{key[2]}"]
                lines.append(f"| {key[1]:,} | {key[2].upper()} |" + "".join(
                    f" {med(row[f'{t}_vs_random_team_{t}'])} | {med(row[f'team_{t}_random'])} |" for t in teams))
            lines.append("")
        lines += ["Wall time per run (training only, 1 torch thread, 2 cores shared with two MATWM trainings): "
                  "median [min, max] seconds to reach each budget:", "",
                  "| env steps | algorithm | training s |", "|---:|---|---:|"]
        for key in keys:
            lines.append(f"| {key[1]:,} | {key[2].upper()} | {med(agg[f'{scenario}/{key[1]}/{key[2]}']['train_wall_s'])} |")
        lines.append("")
    (results / "results.md").write_text("\n".join(lines))
    (results / "results.json").write_text(json.dumps(agg, indent=1))
    print("\n".join(lines))
    print(f"wrote {results / 'results.md'} and {results / 'results.json'}")
    return 0


