"""The rows of the learning table (bench/learning_table.py), read from the result files on disk:
which directories hold which row, and each row's per-seed values and per-episode returns.

Every row is read from files other commands wrote, never typed in:

- MATWM and its variants: the sweep's ``results.json`` (``python -m matwm_fast.sweep ...
  --aggregate-only``) under ``bench/results/learning/<dir>/``, one row per variant and budget (the
  final checkpoint's step); the cells are its final-checkpoint matchups;
- MAPPO / IPPO / QMIX / VDN / IQL: ``bench/baselines/model_free.py``'s ``seed<s>_step<budget>.json``
  (the reporting runs of ``bench/baselines/tune.py report`` carry the tuning's configurations tried);
- the scripted policies and the random policy: ``bench/baselines/heuristics.py``'s ``seed<s>.json``
  (the random policy also comes with every sweep and model-free run, on the same episodes).

A row is a dict: ``label``, ``budget`` (env steps; None for untrained policies), ``seeds``,
``cells`` {matchup: {team: [value per seed]}}, ``episodes`` {matchup: {team: {seed: [return per
episode]}}}, ``first`` {seed: first episode seed}, ``split`` (the protocol's, or None), ``curves``,
``configs_tried``, ``source`` and (sweeps) ``probe``.
"""

from __future__ import annotations

import json
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
# heuristics.py's scripted policies (a row where a scenario's files have it); with several teams a
# policy's file also holds ``<name>_<team>_vs_random``, that team scripted against random opponents
HEURISTICS = {"always no-op": "noop", "nearest landmark": "nearest", "shared assignment": "assignment",
              "chase / flee (scripted)": "chase_flee"}
# the sweep's matchup names → the evaluators' (model_free.py, heuristics.py)
SWEEP_NAMES = {"trained": "greedy", "trained_sampled": "sampled"}


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
                if name not in base["cells"]:
                    continue
                vs = {m[len(name) + 1:]: m for m in base["cells"] if m.startswith(f"{name}_") and m.endswith("_vs_random")}
                rows.append({**base, "label": label,
                             "cells": {"greedy": base["cells"][name], **{v: base["cells"][m] for v, m in vs.items()}},
                             "episodes": {"greedy": base["episodes"].get(name, {}),
                                          **{v: base["episodes"].get(m, {}) for v, m in vs.items()}}})
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
