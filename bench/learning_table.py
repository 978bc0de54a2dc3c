"""The learning results table (bench/results/learning/README.md) and its figures, from the results on disk.

    python bench/learning_table.py                  # writes bench/results/learning/summary.{md,json}, summary_<env>.png

The bootstrap (minutes: seconds per cell) keeps each result in ``bench/results/learning/.bootstrap-cache/``
by a hash of its inputs (:class:`Bootstrap`), so regenerating after a new row recomputes that row only;
``--no-cache`` recomputes all.

Every row is read from files other commands wrote, never typed in (bench/learning_rows.py says
which files hold which row).  Each result file says which split of the protocol
(``matwm_fast/protocol.py``) it was played on, and each split gets its own table per scenario:

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

import functools
import hashlib
import json
import os
import statistics
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from learning_rows import LEARNING, rows_for  # noqa: E402
from matwm_fast import protocol  # noqa: E402

# the row each reporting row is compared with (probability of improvement, paired)
REFERENCE = {"simple_spread": "nearest landmark", "simple_tag": "uniformly random"}
# the method's reporting row, compared with every other reporting row (its baselines, its ablations)
METHOD = "MATWM, `cpu` preset"
TUNING_MARK = "tuning episodes, no CI"
# beside the results: the bootstrap's outputs by their inputs (Bootstrap), not committed
CACHE = ".bootstrap-cache"
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


class Bootstrap:
    """The protocol's intervals and probabilities of improvement, each computed once.  Each is a
    pure function of its inputs — the returns, the resamples, the bootstrap's seed (the protocol
    seeds numpy's generator for every call) and the libraries that compute it — so a JSON file
    named by a hash of all of them holds what a fresh computation gives, and a table regenerated
    with one new row bootstraps that row's cells only.  A file that does not parse is computed
    again and rewritten; ``folder`` None computes every time."""

    def __init__(self, reps: int, folder: Path | None = None):
        self.reps, self.folder = reps, folder
        self.computed = self.reused = 0

    def interval(self, returns) -> dict:
        return self._once(protocol.interval_estimates, returns)

    def improvement(self, x, y) -> dict:
        return self._once(protocol.improvement, x, y)

    def _once(self, fn, *arrays) -> dict:
        if self.folder is None:
            self.computed += 1
            return fn(*arrays, reps=self.reps)
        inputs = {"fn": fn.__name__, "reps": self.reps, "seed": protocol.BOOTSTRAP_SEED, "size": protocol.CI_SIZE,
                  "versions": _versions(), "arrays": [np.asarray(a, float).tolist() for a in arrays]}
        path = self.folder / f"{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()}.json"
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = None
        if isinstance(kept, dict):
            self.reused += 1
            return kept
        out = fn(*arrays, reps=self.reps)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)  # whole or absent: a run cut mid-write leaves no half file under the name
        self.computed += 1
        return out


@functools.cache
def _versions() -> dict:
    """What computes an interval: rliable, the bootstrap it builds on (arch), numpy and scipy."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("rliable", "arch", "numpy", "scipy")}


def compare(x: dict, y: dict, first_x: dict, first_y: dict, boot: Bootstrap) -> dict | None:
    """P(x > y) on the seeds two rows share with the same episodes (same first episode seed and
    count), which seeds those are, and each one's mean return of both rows
    (``protocol.improvement``); None when they share none."""
    common = [s for s in sorted(set(map(int, x)) & set(map(int, y)), key=int)
              if first_x.get(s) == first_y.get(s) and len(x[_k(x, s)]) == len(y[_k(y, s)])]
    if not common:
        return None
    return {**boot.improvement([x[_k(x, s)] for s in common], [y[_k(y, s)] for s in common]),
            "seed_ids": common}


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


def report_table(scenario: str, rows: list[dict], boot: Bootstrap) -> tuple[list[str], dict]:
    """The reporting rows: IQM and mean with intervals, and P(improvement) over the reference row."""
    cols = columns(teams_of(scenario))
    ref_label = REFERENCE.get(scenario)
    ref = next((r for r in rows if r["label"] == ref_label), None)
    sp = protocol.SPLITS["report"]
    lines = [f"#### Reporting episodes (held out: training seeds {sp.seed_text()}, episode seeds from "
             f"{sp.episodes.lo:,})", "",
             f"IQM and mean over all seeds × episodes returns with 95 % stratified-bootstrap intervals (rliable, "
             f"{boot.reps} resamples of the seeds and of the episodes within each); P(> {ref_label}): the probability that "
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
            agg[h] = boot.interval(arr)
            ref_ep = lookup(ref, "episodes", m, t) if ref is not None and r is not ref else None
            found = compare(ep, ref_ep, r["first"], ref["first"], boot) if ref_ep else None
            if found:
                better[h] = found
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
    lines += method_lines(rows, cols, boot, data)
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


def method_lines(rows: list[dict], cols: list, boot: Bootstrap, data: dict) -> list[str]:
    """P(the method's row > each other row) on the same seeds and episodes, per column, with its
    interval — what "above the baseline" or "the ablation costs" rests on; also into ``data``."""
    method = next((r for r in rows if r["label"] == METHOD), None)
    others = [r for r in rows if r is not method]
    if method is None or not others:
        return []
    lines = ["", f"P({METHOD} at {method['budget']:,} env steps > row): the probability that an episode of the "
             "method's row beats the same seed's episode of the other row, paired, with its interval (0.5: "
             "level; an interval above 0.5: above with 95 % confidence).", "",
             "| row | env steps | " + " | ".join(h for h, _, _ in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for r in others:
        texts, found = [], {}
        for h, m, t in cols:
            mine, theirs = lookup(method, "episodes", m, t), lookup(r, "episodes", m, t)
            versus = compare(mine, theirs, method["first"], r["first"], boot) if mine and theirs else None
            if versus is None:
                texts.append("—")
                continue
            found[h] = versus
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
    kept = p.add_mutually_exclusive_group()
    kept.add_argument("--cache", metavar="DIR", help="where each interval, once computed, is kept as JSON by a hash "
                      "of its inputs (default: RESULTS/.bootstrap-cache)")
    kept.add_argument("--no-cache", action="store_true", help="compute every interval afresh, keep none")
    args = p.parse_args(argv)
    learning = Path(args.results)
    if not learning.is_dir():
        p.exit(2, f"error: --results {learning}: no such directory\n")
    if args.bootstrap_reps < 1:
        p.exit(2, f"error: --bootstrap-reps {args.bootstrap_reps}: must be at least 1\n")
    cache = None if args.no_cache else Path(args.cache) if args.cache else learning / CACHE
    if cache is not None and cache.exists() and not cache.is_dir():
        p.exit(2, f"error: --cache {cache}: not a directory\n")
    boot = Bootstrap(args.bootstrap_reps, cache)
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
            body, data = report_table(scenario, report, boot)
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
    if boot.computed or boot.reused:
        print(f"bootstrap: {boot.computed} computed, {boot.reused} reused" + (f" from {cache}" if cache else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
