"""The learning results table (bench/results/learning/README.md) and its figures, from the results on disk.

    python bench/learning_table.py                  # writes bench/results/learning/summary.{md,json}, summary_<env>.png

Every row is read from files other commands wrote, never typed in:

- MATWM and its variants: the sweep's ``results.json`` (``python -m matwm_fast.sweep ...
  --aggregate-only``) under ``bench/results/learning/<dir>/``, one row per variant and budget (the
  final checkpoint's step); the cells are its final-checkpoint matchups;
- MAPPO / IPPO: ``bench/baselines/model_free.py``'s ``seed<s>_step<budget>.json``;
- the scripted policies and the random policy: ``bench/baselines/heuristics.py``'s ``seed<s>.json``
  (the random policy also comes with every sweep and model-free run, on the same episodes).

All of them are evaluated on the same episodes per seed (seed s: ``reset(seed=20,000 + s·50 + e)``,
e < 50), so a cell of one row and the same column of another are paired.  A cell is the median
[min, max] over seeds of the mean return (over agents of the column's team, over 50 episodes).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEARNING = ROOT / "bench" / "results" / "learning"

# MATWM rows: (label, directory under bench/results/learning holding <env>/results.json or results.json,
# a sweep's --results); the first is the method, then the paper's ablations, then the tuning variants.  A
# label may come twice (one run continued to a larger budget): the row's budget is its final step.
MATWM = [
    ("MATWM", "tuning/base"),
    ("MATWM", "tuning/base-50k"),
    ("MATWM, uniform replay (ablation)", "tuning/uniform"),
    ("MATWM, no teammate predictor (ablation)", "tuning/noteam"),
    ("MATWM, no action scaling (ablation)", "tuning/noscale"),
    ("MATWM, entropy 3e-3", "tuning/ent3e-3"),
    ("MATWM, entropy 3e-3", "tuning/ent3e-3-50k"),
    ("MATWM, entropy 1e-2", "tuning/ent1e-2"),
    ("MATWM, entropy 3e-3, 128 imagined trajectories", "tuning/ent3e-3-imag128"),
    ("MATWM, dropout 0.1 + symlog targets", "tuning/wmreg"),
    ("MATWM, world-model learning rate 3e-5 (the paper's)", "tuning/wmlr"),
    ("MATWM, entropy 3e-3 + uniform replay", "tuning/ent3e-3-uniform"),
    ("MATWM, entropy 3e-3, no action scaling", "tuning/ent3e-3-noscale"),
    ("MATWM, entropy 3e-3, world-model batch 24", "tuning/wmbatch24"),
    ("MATWM, entropy 3e-3, world-model batch 24", "tuning/wmbatch24-50k"),
    ("MATWM, entropy 3e-3, latent 32 × 32 (the paper's)", "tuning/latent32"),
    ("MATWM, entropy 3e-3, world-model learning rate 1e-3", "tuning/wmlr1e-3"),
    ("MATWM, entropy 3e-3, world-model batch 48", "tuning/wmbatch48"),
    ("MATWM, entropy 3e-3, world-model batch 24, no action scaling", "tuning/wmbatch24-noscale"),
    ("MATWM, entropy 3e-3, world-model batch 24, 128 imagined trajectories", "tuning/wmbatch24-imag128"),
    ("MATWM, entropy 3e-3, world-model batch 24, horizon 12 (the paper's)", "tuning/wmbatch24-h12"),
    ("MATWM, entropy 3e-3, world-model batch 24, two world-model updates per env step", "tuning/wmbatch24-wmupd2"),
    ("MATWM, entropy 3e-3, world-model batch 24, dropout 0.1 + symlog targets", "tuning/wmbatch24-wmreg"),
    ("MATWM, entropy 3e-3, world-model batch 24, uniform replay", "tuning/wmbatch24-uniform"),
    ("MATWM, entropy 3e-3, world-model batch 24, discount 0.95", "tuning/wmbatch24-gamma95"),
    ("MATWM, entropy 3e-3, world-model batch 24, discount 0.9 (the cpu preset's on simple_spread)", "tuning/wmbatch24-gamma90"),
    ("MATWM, entropy 3e-3, world-model batch 24, discount 0.8", "tuning/wmbatch24-gamma80"),
    ("MATWM, world-model batch 24", "tuning/wmbatch24-ent3e-4"),
    ("MATWM before the redesign (fp32, commit af7bb40)", "simple_spread_20k"),
    ("MATWM before the redesign (fp32, commit d3fb0f7), 3k steps", "."),
]
MODEL_FREE = {"MAPPO (BenchMARL)": "mappo", "IPPO (BenchMARL)": "ippo"}
HEURISTICS = {"always no-op": "noop", "nearest landmark": "nearest", "shared assignment": "assignment"}
# the sweep's matchup names → the evaluators' (model_free.py, heuristics.py)
SWEEP_NAMES = {"trained": "greedy", "trained_sampled": "sampled"}
# the learning log's block that this script rewrites
BEGIN, END = "<!-- learning-table: written by bench/learning_table.py -->", "<!-- /learning-table -->"


def columns(teams: list[str]) -> list[tuple[str, str, str]]:
    """(header, matchup, team) per column: one team → greedy and sampled; several → each team
    against the trained other team, and each trained team against random opponents."""
    if teams == ["all"]:
        return [("greedy", "greedy", "all"), ("sampled", "sampled", "all")]
    out = [(f"team {t}, all trained (greedy)", "greedy", t) for t in teams]
    out += [(f"team {t} trained, others random", f"{t}_vs_random", t) for t in teams]
    return out


def teams_of(scenario: str) -> list[str]:
    from matwm_fast.config import EnvConfig
    from matwm_fast.env import env_spec

    teams = list(env_spec(EnvConfig(scenario=scenario)).teams)
    return ["all"] if len(teams) == 1 else teams


# ----------------------------------------------------------------------------- reading the results
def sweep_rows(label: str, path: Path, scenario: str, learning: Path) -> list[dict]:
    """One row from a sweep's results.json: {matchup: {team: [value per seed]}} at its final step."""
    data = json.loads(path.read_text())
    env = data.get("envs", {}).get(scenario)
    if env is None or not env.get("matchups"):
        return []
    cells = {SWEEP_NAMES.get(m, m): {t: s.get("values", []) for t, s in by_team.items()}
             for m, by_team in env["matchups"].items()}
    curves = {t: {int(k): v for k, v in c.items()} for t, c in env.get("curves", {}).items()}
    return [{"label": label, "budget": max(env["steps"]), "seeds": env["seeds"], "cells": cells, "curves": curves,
             "source": str(path.relative_to(learning))}]


def per_seed_rows(label: str, files: list[Path], budget: int | None, learning: Path) -> dict | None:
    """One row from per-seed evaluator JSONs (model_free.py, heuristics.py), each with ``results``
    {matchup: {"all": {"mean"}, "teams": {t: {"mean"}}}}."""
    if not files:
        return None
    runs = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["seed"])
    cells: dict = {}
    for r in runs:
        for m, res in r["results"].items():
            by_team = cells.setdefault(m, {})
            by_team.setdefault("all", []).append(res["all"]["mean"])
            for t, v in res["teams"].items():
                by_team.setdefault(t, []).append(v["mean"])
    return {"label": label, "budget": budget, "seeds": [r["seed"] for r in runs], "cells": cells, "curves": {},
            "source": str(files[0].parent.relative_to(learning))}


def rows_for(scenario: str, learning: Path = LEARNING) -> list[dict]:
    baselines = learning / "baselines"
    rows = []
    for label, d in MATWM:
        for path in (learning / d / scenario / "results.json", learning / d / "results.json"):
            if path.is_file():
                rows += sweep_rows(label, path, scenario, learning)
                break
    for label, algo in MODEL_FREE.items():
        budgets = sorted({int(f.stem.split("_step")[1]) for f in (baselines / scenario / algo).glob("seed*_step*.json")})
        for b in budgets:
            rows.append(per_seed_rows(label, sorted((baselines / scenario / algo).glob(f"seed*_step{b}.json")), b, learning))
    heur = sorted((baselines / scenario / "heuristics").glob("seed*.json"))
    if heur:
        base = per_seed_rows("", heur, None, learning)
        for label, name in {"uniformly random": "random", **HEURISTICS}.items():
            rows.append({**base, "label": label, "cells": {"greedy": base["cells"][name]}})
    elif rows:  # the random policy from the first result that played it
        src = next(r for r in rows if "random" in r["cells"])
        rows.append({**src, "label": "uniformly random", "budget": None, "curves": {},
                     "cells": {"greedy": src["cells"]["random"],
                               **{f"{t}_vs_random": src["cells"]["random"] for t in src["cells"]["random"]}}})
    return rows


# ----------------------------------------------------------------------------- the table
def cell(values: list[float] | None) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    return f"{med:.1f} [{min(values):.1f}, {max(values):.1f}]" if len(values) > 1 else f"{med:.1f}"


def table(scenario: str, rows: list[dict]) -> tuple[list[str], dict]:
    cols = columns(teams_of(scenario))
    lines = [f"### {scenario}", "",
             "| policy | env steps | seeds | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|---:|---:|" + "---:|" * len(cols)]
    data = {}
    for r in rows:
        vals = []
        for _, m, t in cols:
            by_team = r["cells"].get(m) or (r["cells"].get("greedy") if r["budget"] is None else None) or {}
            vals.append(by_team.get(t))
        budget = f"{r['budget']:,}" if r["budget"] else "no training"
        lines.append(f"| {r['label']} | {budget} | {len(r['seeds'])} | " + " | ".join(cell(v) for v in vals) + " |")
        data[f"{r['label']} @ {r['budget']}"] = {"source": r["source"], "seeds": r["seeds"],
                                                  **{h: v for (h, _, _), v in zip(cols, vals)}}
    return lines + [""], data


def figure(scenario: str, rows: list[dict], out: Path) -> Path | None:
    """Median curves (min–max band) of the MATWM rows, the model-free policies at their budgets
    (median, min–max bar) and the untrained policies as levels, one panel per team."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (pip install -e '.[viz]')", file=sys.stderr)
        return None
    teams = teams_of(scenario)
    # the legend stands right of the last panel: inside, it hid the curves' last steps
    fig, axes = plt.subplots(1, len(teams), figsize=(6 * len(teams) + 4.5, 4.8), squeeze=False)
    # 20 colours, as tab20's dark shades then its light ones: the grid has more rows than tab10's 10,
    # and neighbouring rows should not get two shades of one hue
    palette = plt.get_cmap("tab20").colors[0::2] + plt.get_cmap("tab20").colors[1::2]
    colours: dict[str, object] = {}  # one colour per row label across panels and budgets

    def colour(label: str) -> object:
        if label not in colours:
            colours[label] = "0.45" if "random" in label else palette[sum(c != "0.45" for c in colours.values()) % len(palette)]
        return colours[label]

    for ax, team in zip(axes[0], teams):
        for r in rows:
            c = colour(r["label"])
            curve = r["curves"].get(team)
            if curve:
                x = sorted(curve)
                # a run continued to a larger budget repeats its shorter self: one legend entry per label
                shown = any(h.startswith(r["label"] + " (") for h in ax.get_legend_handles_labels()[1])
                ax.plot(x, [curve[s]["median"] for s in x], color=c,
                        label=None if shown else f"{r['label']} ({len(r['seeds'])} seeds)")
                ax.fill_between(x, [curve[s]["min"] for s in x], [curve[s]["max"] for s in x], alpha=0.15, color=c)
            elif r["budget"]:
                v = r["cells"].get("greedy", {}).get(team)
                if v:
                    med = statistics.median(v)
                    ax.errorbar([r["budget"]], [med], yerr=[[med - min(v)], [max(v) - med]], fmt="o", capsize=4,
                                color=c, label=f"{r['label']} @ {r['budget']:,} ({len(v)} seeds)")
            else:
                v = r["cells"]["greedy"].get(team)
                if v:
                    ax.axhline(statistics.median(v), ls="--", lw=1, color=c,
                               label=f"{r['label']} (median {statistics.median(v):.1f})")
        ax.set_title(f"{scenario}: {'all agents' if team == 'all' else 'team ' + team} (greedy, 50 episodes)")
        ax.set_xlabel("env steps")
        ax.set_ylabel("mean episode return")
        ax.grid(alpha=0.3)
    handles = {lab: h for ax in axes[0] for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.97))
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python bench/learning_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(LEARNING), help="the learning results directory (default %(default)s)")
    p.add_argument("--readme", default=str(LEARNING / "README.md"),
                   help=f"a Markdown file whose block between {BEGIN!r} and {END!r} gets the tables (default "
                        "%(default)s; left alone when it has no such block)")
    args = p.parse_args(argv)
    learning = Path(args.results)
    if not learning.is_dir():
        p.exit(2, f"error: --results {learning}: no such directory\n")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    lines = ["# Learning results: MATWM, its ablations, model-free baselines and scripted policies", "",
             "Written by `python bench/learning_table.py` from the results under `bench/results/learning/` "
             "(its docstring says which file each row comes from). Median [min, max] over seeds of the mean "
             "return; every row is played on the same 50 episodes per seed (paired); `—`: not run. MATWM rows: "
             "`cpu` preset with the paper's entropy weight 3e-4 unless the row says otherwise. A row with fewer "
             "seeds pairs only with the same seeds of the others (e.g. seed 0 alone: compare seed 0's values "
             "in `summary.json`).", ""]
    summary = {}
    for scenario in ("simple_spread", "simple_tag"):
        rows = rows_for(scenario, learning)
        if not rows:
            continue
        rows.sort(key=lambda r: (r["budget"] is None, r["budget"] or 0))
        body, summary[scenario] = table(scenario, rows)
        lines += body
        png = figure(scenario, rows, learning / f"summary_{scenario}.png")
        if png:
            lines += [f"![{scenario}]({png.name})", ""]
    (learning / "summary.md").write_text("\n".join(lines))
    readme = Path(args.readme)
    if readme.is_file() and BEGIN in (text := readme.read_text()) and END in text:
        rel = os.path.relpath(learning, readme.parent)
        block = [line.replace("](summary_", f"]({rel}/summary_") for line in lines[4:]]  # the tables and figures
        head, rest = text.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n" + "\n".join(block) + "\n" + END + rest.split(END, 1)[1])
        print(f"updated the table in {readme}")
    (learning / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
