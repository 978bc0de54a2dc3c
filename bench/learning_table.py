"""The learning results table (bench/results/learning/README.md) and its figures, from the results on disk.

    python bench/learning_table.py                  # writes bench/results/learning/summary.{md,json}, summary_<env>.png

Every row is read from files other commands wrote, never typed in:

- MATWM and its variants: the sweep's ``results.json`` (``python -m matwm_fast.sweep ...
  --aggregate-only``) under ``bench/results/learning/<dir>/``, one row per variant and budget (the
  final checkpoint's step); the cells are its final-checkpoint matchups;
- MAPPO / IPPO / QMIX / VDN / IQL: ``bench/baselines/model_free.py``'s ``seed<s>_step<budget>.json``
  (the reporting runs of ``bench/baselines/tune.py report`` carry the tuning's configurations tried);
- the scripted policies and the random policy: ``bench/baselines/heuristics.py``'s ``seed<s>.json``
  (the random policy also comes with every sweep and model-free run, on the same episodes).

Each result file says which split of the protocol (``matwm_fast/protocol.py``) it was played on,
and each split gets its own table per scenario:

- **reporting episodes** (split ``report``: training seeds 100–199 never used while tuning, seed s
  on ``reset(seed=2,000,000 + (s − 100)·10,000 + e)``): a cell is the IQM and the mean over all
  seeds × episodes returns, each with its 95 % stratified-bootstrap interval (rliable), and the
  probability of improvement over the scenario's reference row (``REFERENCE``) on the same seeds
  and episodes, with its interval; beside it the configurations tried on tuning episodes;
- **tuning episodes** (split ``tuning``, seed s on ``reset(seed=20,000 + s·E + e)``; every file
  written before the protocol, which records no split, was played there): a cell is the median
  [min, max] over seeds of the mean return, with no interval — settings were chosen on these
  episodes, so their numbers are optimistic.

Within a table every row of a seed plays the same episodes, so a cell of one row and the same
column of another are paired.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from matwm_fast import protocol  # noqa: E402

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
    # the reporting runs (split report; bench/results/learning/README.md#how-to-read-the-numbers): skipped until they exist
    ("MATWM, `cpu` preset", "report/cpu"),
    ("MATWM, `cpu` preset", "report/cpu-50k"),
    ("MATWM, `paper` preset", "report/paper"),
    ("MATWM, `cpu` preset, uniform replay (ablation)", "report/uniform"),
    ("MATWM, `cpu` preset, no teammate predictor (ablation)", "report/noteam"),
    ("MATWM, `cpu` preset, no action scaling (ablation)", "report/noscale"),
]
MODEL_FREE = {"MAPPO (BenchMARL)": "mappo", "IPPO (BenchMARL)": "ippo", "QMIX (BenchMARL)": "qmix",
              "VDN (BenchMARL)": "vdn", "IQL (BenchMARL)": "iql"}
HEURISTICS = {"always no-op": "noop", "nearest landmark": "nearest", "shared assignment": "assignment"}
# the sweep's matchup names → the evaluators' (model_free.py, heuristics.py)
SWEEP_NAMES = {"trained": "greedy", "trained_sampled": "sampled"}
# the row each reporting row is compared with (probability of improvement, paired)
REFERENCE = {"simple_spread": "nearest landmark", "simple_tag": "uniformly random"}
# the method's reporting row, compared with every other reporting row (its baselines, its ablations)
METHOD = "MATWM, `cpu` preset"
TUNING_MARK = "tuning episodes, no CI"
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
def team_members(res: dict) -> dict[str, list[int]]:
    """An evaluation record's (``play.report``) team → agent indices, from its agent order."""
    agents = list(res["agents"])
    return {t: [agents.index(a) for a in v["members"]] for t, v in res["teams"].items()}


def file_split(evaluation: dict, seed: int) -> str | None:
    """The split an evaluator's file was played on: its own record, else (written before the
    protocol) tuning when its episodes are the tuning split's for its seed, else None (others)."""
    if "split" in evaluation:
        return evaluation["split"]
    if "episodes" not in evaluation:  # no record of its episodes: from when every evaluator played the tuning ones
        return "tuning"
    try:
        tuning = protocol.first_episode("tuning", seed, evaluation["episodes"])
    except ValueError:
        return None
    return "tuning" if evaluation.get("seed") == tuning else None


def sweep_rows(label: str, path: Path, scenario: str, learning: Path) -> list[dict]:
    """One row from a sweep's results.json: {matchup: {team: [value per seed]}} at its final step,
    and (written under the protocol) every episode's return per matchup, team and seed."""
    data = json.loads(path.read_text())
    env = data.get("envs", {}).get(scenario)
    if env is None or not env.get("matchups"):
        return []
    cells = {SWEEP_NAMES.get(m, m): {t: s.get("values", []) for t, s in by_team.items()}
             for m, by_team in env["matchups"].items()}
    episodes = {SWEEP_NAMES.get(m, m): by_team for m, by_team in env.get("episode_returns", {}).items()}
    curves = {t: {int(k): v for k, v in c.items()} for t, c in env.get("curves", {}).items()}
    pr = env.get("protocol") or {}
    return [{"label": label, "budget": max(env["steps"]), "seeds": env["seeds"], "cells": cells, "curves": curves,
             "source": str(path.relative_to(learning)), "split": pr.get("split", "tuning"),
             "configs_tried": pr.get("configs_tried"), "episodes": episodes,
             "first": {int(k): v for k, v in pr.get("episode_seeds", {}).items()},
             "probe": (env.get("world_model_probe") or {}).get("final")}]


def tried(group: list[dict]) -> int | None:
    """The configurations tried for the settings of these runs (model_free.py's ``configs_tried``;
    None for records made before it was written, and for the heuristics)."""
    counts = {r.get("configs_tried") for r in group}
    if len(counts) > 1:
        raise ValueError(f"seeds {[r['seed'] for r in group]}: runs of one row from different tunings ({counts})")
    return counts.pop()


def per_seed_rows(label: str, files: list[Path], budget: int | None, learning: Path) -> list[dict]:
    """Rows from per-seed evaluator JSONs (model_free.py, heuristics.py), each with ``results``
    {matchup: {"all": {"mean"}, "teams": {t: {"mean"}}, "returns": (E, N)}}: one per split."""
    if not files:
        return []
    runs = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["seed"])
    by_split: dict = {}
    for r in runs:
        by_split.setdefault(file_split(r.get("evaluation", {}), r["seed"]), []).append(r)
    rows = []
    for split, group in by_split.items():
        cells: dict = {}
        episodes: dict = {}
        for r in group:
            for m, res in r["results"].items():
                by_team = cells.setdefault(m, {})
                by_team.setdefault("all", []).append(res["all"]["mean"])
                for t, v in res["teams"].items():
                    by_team.setdefault(t, []).append(v["mean"])
                if "returns" in res:
                    ep = episodes.setdefault(m, {})
                    ep.setdefault("all", {})[r["seed"]] = protocol.column(res["returns"]).tolist()
                    for t, idx in team_members(res).items():
                        ep.setdefault(t, {})[r["seed"]] = protocol.column(res["returns"], idx).tolist()
        rows.append({"label": label, "budget": budget, "seeds": [r["seed"] for r in group], "cells": cells,
                     "curves": {}, "source": str(files[0].parent.relative_to(learning)), "split": split,
                     "configs_tried": tried(group), "episodes": episodes,
                     "first": {r["seed"]: r.get("evaluation", {}).get("seed") for r in group}})
    return rows


def rows_for(scenario: str, learning: Path = LEARNING) -> list[dict]:
    rows = []
    for label, d in MATWM:
        for path in (learning / d / scenario / "results.json", learning / d / "results.json"):
            if path.is_file():
                rows += sweep_rows(label, path, scenario, learning)
                break
    for baselines in (learning / "baselines", learning / "report" / "baselines"):
        for label, algo in MODEL_FREE.items():
            d = baselines / scenario / algo
            budgets = sorted({int(f.stem.split("_step")[1]) for f in d.glob("seed*_step*.json")})
            for b in budgets:
                rows += per_seed_rows(label, sorted(d.glob(f"seed*_step{b}.json")), b, learning)
        for base in per_seed_rows("", sorted((baselines / scenario / "heuristics").glob("seed*.json")), None, learning):
            for label, name in {"uniformly random": "random", **HEURISTICS}.items():
                rows.append({**base, "label": label, "cells": {"greedy": base["cells"][name]},
                             "episodes": {"greedy": base["episodes"].get(name, {})}})
    for split in {r["split"] for r in rows}:
        if any(r["label"] == "uniformly random" and r["split"] == split for r in rows):
            continue
        src = next((r for r in rows if r["split"] == split and "random" in r["cells"]), None)
        if src is not None:  # the random policy from the first result of this split that played it
            rnd, ep = src["cells"]["random"], src["episodes"].get("random", {})
            rows.append({**src, "label": "uniformly random", "budget": None, "curves": {}, "configs_tried": None, "probe": None,
                         "cells": {"greedy": rnd, **{f"{t}_vs_random": rnd for t in rnd}},
                         "episodes": {"greedy": ep, **{f"{t}_vs_random": ep for t in ep}}})
    return rows


# ----------------------------------------------------------------------------- the table
def cell(values: list[float] | None, digits: int = 1) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    f = f".{digits}f"
    return f"{med:{f}} [{min(values):{f}}, {max(values):{f}}]" if len(values) > 1 else f"{med:{f}}"


def lookup(r: dict, field: str, matchup: str, team: str):
    """A row's entry of ``field`` (cells or episodes) for a column; untrained rows (no budget) show
    their one policy in every column."""
    by_team = r[field].get(matchup) or (r[field].get("greedy") if r["budget"] is None else None) or {}
    return by_team.get(team)


def paired(x: dict, y: dict, first_x: dict, first_y: dict) -> tuple[list, list] | None:
    """The seeds two rows share with the same episodes (same first episode seed and count)."""
    common = [s for s in sorted(set(map(int, x)) & set(map(int, y)), key=int)
              if first_x.get(s) == first_y.get(s) and len(x[_k(x, s)]) == len(y[_k(y, s)])]
    if not common:
        return None
    return [x[_k(x, s)] for s in common], [y[_k(y, s)] for s in common]


def _k(d: dict, seed: int):
    return seed if seed in d else str(seed)


def ci_cell(a: dict | None, p: dict | None, ref: str) -> str:
    if not a:
        return "—"
    out = (f"IQM {a['iqm']:.1f} [{a['iqm_ci'][0]:.1f}, {a['iqm_ci'][1]:.1f}]<br>"
           f"mean {a['mean']:.1f} [{a['mean_ci'][0]:.1f}, {a['mean_ci'][1]:.1f}]")
    if p:
        out += f"<br>P(> {ref}) {p['p']:.2f} [{p['p_ci'][0]:.2f}, {p['p_ci'][1]:.2f}]"
    return out


def report_table(scenario: str, rows: list[dict], reps: int) -> tuple[list[str], dict]:
    """The reporting rows: IQM and mean with intervals, and P(improvement) over the reference row."""
    cols = columns(teams_of(scenario))
    ref_label = REFERENCE.get(scenario)
    ref = next((r for r in rows if r["label"] == ref_label), None)
    sp = protocol.SPLITS["report"]
    lines = [f"#### Reporting episodes (held out: training seeds {sp.seed_text()}, episode seeds from "
             f"{sp.episodes.lo:,})", "",
             f"IQM and mean over all seeds × episodes returns with 95 % stratified-bootstrap intervals (rliable, "
             f"{reps} resamples of the seeds and of the episodes within each); P(> {ref_label}): the probability that "
             f"an episode of the row beats the same seed's episode of the {ref_label} row, paired, with its interval. "
             "Configs tried: configurations scored on tuning episodes before this one was chosen.", "",
             "| policy | env steps | seeds × episodes | configs tried | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(cols)]
    data = {}
    for r in rows:
        texts, agg, better = [], {}, {}
        for h, m, t in cols:
            ep = lookup(r, "episodes", m, t)
            if not ep:
                texts.append("—")
                continue
            seeds, arr = protocol.stack(ep)
            agg[h] = protocol.interval_estimates(arr, reps)
            ref_ep = lookup(ref, "episodes", m, t) if ref is not None and r is not ref else None
            pair = paired(ep, ref_ep, r["first"], ref["first"]) if ref_ep else None
            if pair:
                better[h] = protocol.improvement(*pair, reps=reps)
            texts.append(ci_cell(agg[h], better.get(h), ref_label))
        size = next(iter(agg.values())) if agg else None
        shape = f"{size['seeds']} × {size['episodes']}" if size else str(len(r["seeds"]))
        budget = f"{r['budget']:,}" if r["budget"] else "no training"
        tried = r["configs_tried"] if r["configs_tried"] is not None else "—"
        lines.append(f"| {r['label']} | {budget} | {shape} | {tried} | " + " | ".join(texts) + " |")
        data[f"{r['label']} @ {r['budget']}"] = {"source": r["source"], "split": "report", "seeds": r["seeds"],
                                                  "configs_tried": r["configs_tried"], "aggregates": agg,
                                                  "improvement": {h: {**v, "over": ref_label} for h, v in better.items()},
                                                  "world_model_probe": r.get("probe")}
    lines += method_lines(rows, cols, reps, data)
    probed = [r for r in rows if r.get("probe")]
    if probed:
        lines += ["", "The world model on held-out layouts at the final training-time evaluation (matwm_fast/wm_probe.py, "
                  "random-policy episodes; median [min, max] over seeds): reward R² and the correlation of imagined "
                  "with true action effects.", "", "| policy | env steps | reward R² | action-effect correlation |",
                  "|---|---:|---:|---:|"]
        for r in probed:
            p = r["probe"]
            lines.append(f"| {r['label']} | {r['budget']:,} | {cell(p['reward_r2'].get('values'), 2)} | "
                         f"{cell(p['effect_corr'].get('values'), 2)} |")
    return lines + [""], data


def method_lines(rows: list[dict], cols: list, reps: int, data: dict) -> list[str]:
    """P(the method's row > each other row) on the same seeds and episodes, per column, with its
    interval — what "above the baseline" or "the ablation costs" rests on; also into ``data``."""
    method = next((r for r in rows if r["label"] == METHOD), None)
    others = [r for r in rows if r is not method]
    if method is None or not others:
        return []
    lines = ["", f"P({METHOD} > row): the probability that an episode of the method's row at its final budget beats "
             "the same seed's episode of the other row, paired, with its interval (0.5: level; an interval above "
             "0.5: above with 95 % confidence).", "",
             "| row | env steps | " + " | ".join(h for h, _, _ in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in others:
        texts, found = [], {}
        for h, m, t in cols:
            mine, theirs = lookup(method, "episodes", m, t), lookup(r, "episodes", m, t)
            pair = paired(mine, theirs, method["first"], r["first"]) if mine and theirs else None
            if pair is None:
                texts.append("—")
                continue
            found[h] = protocol.improvement(*pair, reps=reps)
            texts.append(f"{found[h]['p']:.2f} [{found[h]['p_ci'][0]:.2f}, {found[h]['p_ci'][1]:.2f}]")
        if found:
            budget = f"{r['budget']:,}" if r["budget"] else "no training"
            lines.append(f"| {r['label']} | {budget} | " + " | ".join(texts) + " |")
            data[f"{r['label']} @ {r['budget']}"][f"improvement_of {METHOD} @ {method['budget']}"] = found
    return lines


def table(scenario: str, rows: list[dict]) -> tuple[list[str], dict]:
    """The tuning rows (and every file from before the protocol): median [min, max], no interval."""
    cols = columns(teams_of(scenario))
    lines = ["| policy | env steps | seeds | evaluated on | configs tried | " + " | ".join(h for h, _, _ in cols) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * len(cols)]
    data = {}
    for r in rows:
        vals = [lookup(r, "cells", m, t) for _, m, t in cols]
        budget = f"{r['budget']:,}" if r["budget"] else "no training"
        tried = r["configs_tried"] if r["configs_tried"] is not None else "—"
        mark = TUNING_MARK if r["split"] == "tuning" else "other episodes, no CI"
        lines.append(f"| {r['label']} | {budget} | {len(r['seeds'])} | {mark} | {tried} | "
                     + " | ".join(cell(v) for v in vals) + " |")
        data[f"{r['label']} @ {r['budget']}"] = {"source": r["source"], "split": r["split"], "seeds": r["seeds"],
                                                  "configs_tried": r["configs_tried"],
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
    p.add_argument("--bootstrap-reps", type=int, default=protocol.BOOTSTRAP_REPS, metavar="N",
                   help="bootstrap resamples of the reporting rows' intervals (default %(default)s)")
    args = p.parse_args(argv)
    learning = Path(args.results)
    if not learning.is_dir():
        p.exit(2, f"error: --results {learning}: no such directory\n")
    if args.bootstrap_reps < 1:
        p.exit(2, f"error: --bootstrap-reps {args.bootstrap_reps}: must be at least 1\n")
    lines = ["# Learning results: MATWM, its ablations, model-free baselines and scripted policies", "",
             "Written by `python bench/learning_table.py` from the results under `bench/results/learning/` "
             "(its docstring says which file each row comes from); `—`: not run. Per scenario, a table of the "
             "reporting episodes (the protocol of `matwm_fast/protocol.py`: held-out episodes and training seeds, "
             "IQM and mean with 95 % intervals), when there are reporting runs, then one of the tuning episodes: "
             "median [min, max] over seeds of the mean return, no interval — the settings were chosen on these "
             "episodes. Every row of a table is played on the same episodes per seed (paired). MATWM rows on "
             "tuning episodes: `cpu` preset with the paper's entropy weight 3e-4 unless the row says otherwise. A "
             "row with fewer seeds pairs only with the same seeds of the others (e.g. seed 0 alone: compare seed "
             "0's values in `summary.json`).", ""]
    summary = {}
    for scenario in ("simple_spread", "simple_tag"):
        rows = rows_for(scenario, learning)
        if not rows:
            continue
        rows.sort(key=lambda r: (r["budget"] is None, r["budget"] or 0))
        lines += [f"### {scenario}", ""]
        summary[scenario] = {}
        report = [r for r in rows if r["split"] == "report"]
        if report:
            body, data = report_table(scenario, report, args.bootstrap_reps)
            lines += body
            summary[scenario]["report"] = data
            png = figure(scenario, report, learning / f"summary_{scenario}_report.png")
            if png:
                lines += [f"![{scenario}, reporting runs]({png.name})", ""]
        lines += [f"#### Tuning episodes ({TUNING_MARK}: the settings were chosen on them)", ""]
        body, data = table(scenario, [r for r in rows if r["split"] != "report"])
        lines += body
        summary[scenario].update(data)
        png = figure(scenario, [r for r in rows if r["split"] != "report"], learning / f"summary_{scenario}.png")
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
