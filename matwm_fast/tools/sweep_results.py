"""The results of a sweep: matchups of the final checkpoints, aggregation across seeds, the table
and the figures — all read from the run directories (``OUT/<env>/seed<k>``), whichever launcher
made them, and described from each run's own ``config.json``, never from the command line.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import checkpoint as ck
from .. import protocol
from ..config import Config, diff, load_config, preset, resolve
from ..env import env_spec
from ..metrics import metrics_file, read_metrics
from ..play import play, summarise
from ..policy import Policy

TRAINED, SAMPLED, RANDOM = "trained", "trained_sampled", "random"


# ----------------------------------------------------------------------------- run directories
def run_dir(out: Path, env: str, seed: int) -> Path:
    return Path(out) / env / f"seed{seed}"


def read_rows(d: Path) -> list[dict]:
    return read_metrics(d) if metrics_file(d) is not None else []


def saved_config(d: Path) -> Config | None:
    """Run ``d``'s own ``config.json`` (None when it has none yet)."""
    raw = ck.RunDir(d).read_config()
    if raw is None:
        return None
    try:
        return load_config(raw)
    except ValueError as e:
        raise ValueError(f"{d}/config.json cannot be read: {e}") from None


# ----------------------------------------------------------------------------- matchups
def matchups(d: Path, episodes: int, seed: int, split: str = protocol.DEFAULT_SPLIT) -> dict:
    """Returns of: the trained agents (greedy and sampled), the random policy, and (several teams)
    each team trained against random others — each the summary of ``play.summarise`` and every
    episode's returns (``returns``: (E, N), agents in env order), played from episode seed ``seed``
    on (the protocol's episodes of ``split`` for this run's seed).

    Cached in ``d/matchups.json`` per (checkpoint step, episodes, first episode seed, split):
    rebuilding the table does not replay the episodes.  A cache written before the protocol (no
    split, no per-episode returns) does not match, so its matchups are played again.
    """
    cache = Path(d) / "matchups.json"
    pol = Policy(d)  # the final checkpoint, on the CPU
    cfg, wm, ac, step, spec = pol.cfg, pol.wm, pol.ac, pol.step, pol.spec
    key = {"step": step, "episodes": episodes, "seed": seed, "split": split}
    if cache.exists():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old
    act_ctx, dev = cfg.train.act_context, "cpu"

    def run(**kw) -> dict:
        returns, _, _ = play(wm, ac, cfg.env, act_ctx, episodes, seed, dev, **kw)  # (E, N)
        return {**summarise(returns, spec), "returns": np.round(returns, 6).tolist()}

    # the protocol's policy is greedy; the sampled one (as in training) shows whether argmax is the problem
    res = {TRAINED: run(), SAMPLED: run(greedy=False), RANDOM: run(random_policy=True)}
    teams = spec.teams
    if len(teams) > 1:
        for team, idx in teams.items():
            mask = np.zeros(spec.n_agents, bool)
            mask[idx] = True  # this team plays its learned policy, every other agent acts at random
            res[f"{team}_vs_random"] = run(policies=mask)
    out = {"key": key, "teams": {t: [spec.agents[i] for i in idx] for t, idx in teams.items()},
           "agents": list(spec.agents), "results": res}
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


# the training-time evaluation's world-model probe (matwm_fast/wm_probe.py): column → its name here
PROBE = {"eval_wm_reward_r2": "reward_r2", "eval_wm_effect_corr": "effect_corr"}


def probe_curve(evals: list[dict]) -> dict:
    """{name: {env step: value}} of the world-model probe's scores on held-out layouts, from the
    evaluations that logged them (none for an image scenario, or a run from before the probe)."""
    return {name: {int(r["env_step"]): float(r[col]) for r in evals if r.get(col) is not None}
            for col, name in PROBE.items()}


# settings every sweep run sets on its own: not reported as changes from the preset (nor is the
# run section: how a run ran, not what it learned)
SWEEP_SET = {"env.scenario", "train.seed"}


def config_changes(cfg: Config) -> list[str]:
    """How a run's saved config differs from its own preset (e.g. flags passed after ``--``)."""
    base = preset(cfg.preset, cfg.env.scenario)
    base = resolve(replace(base, env=cfg.env, train=replace(base.train, seed=cfg.train.seed)),
                   env_spec(cfg.env).n_agents)
    return [f"{k}: run {a!r} vs preset {b!r}" for k, a, b in diff(cfg, base) if k not in SWEEP_SET]


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
        per_seed, match, diag, probe, changes, cfgs = {}, {}, {}, {}, set(), []
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
            probe[seed] = probe_curve(evals)
            cfg = saved_config(d)
            if cfg is not None:
                cfgs.append(cfg)
                changes.update(config_changes(cfg))
            if not args.no_matchups and ck.has_checkpoint(d):
                match[seed] = matchups(d, episodes, protocol.first_episode(args.split, seed, episodes), args.split)
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
                               "protocol": {**protocol.describe(args.split), "episodes_per_seed": episodes,
                                            "episode_seeds": {s: m["key"]["seed"] for s, m in match.items()},
                                            "configs_tried": args.configs_tried,
                                            "bootstrap": protocol.bootstrap_record(args.bootstrap_reps)},
                               **protocol_aggregates(match, keys, args.bootstrap_reps),
                               "diagnostics": diag, "world_model_probe": probe_summary(probe),
                               "config_changes": sorted(changes),
                               "settings": run_settings(cfgs)}
    result["split"], result["configs_tried"] = args.split, args.configs_tried
    return result


def probe_summary(probe: dict) -> dict:
    """Per seed, each probe score's curve and its final value; across seeds, the final values'
    median [min, max] (``stats``).  Empty when no run logged the probe."""
    per_seed = {s: {name: {"curve": c, "final": c[max(c)]} for name, c in p.items() if c}
                for s, p in probe.items()}
    per_seed = {s: v for s, v in per_seed.items() if v}
    if not per_seed:
        return {}
    final = {name: stats([v[name]["final"] for v in per_seed.values() if name in v]) for name in PROBE.values()}
    return {"seeds": per_seed, "final": final,
            "about": "the world model on held-out layouts at each training-time evaluation (matwm_fast/wm_probe.py): "
                     "reward_r2, its reward head's R² on random-policy episodes; effect_corr, the correlation of "
                     "imagined and true action effects"}


def episode_returns(match: dict, keys: list[str]) -> dict:
    """{matchup: {key: {seed: [each episode's mean return over the key's agents]}}} from the runs'
    matchups (each holding its (E, N) returns)."""
    out: dict = {}
    for seed, m in match.items():
        agents = m["agents"]
        for name, res in m["results"].items():
            for key in keys:
                members = None if key == "all" else [agents.index(a) for a in m["teams"][key]]
                out.setdefault(name, {}).setdefault(key, {})[seed] = protocol.column(res["returns"], members).tolist()
    return out


def improvements_over_random(names, keys: list[str]) -> list[tuple[str, str]]:
    """(matchup, key) pairs compared with the random policy on the same episodes: the trained
    agents for every key, each team against random opponents for that team."""
    pairs = [(TRAINED, k) for k in keys]
    return pairs + [(n, n[:-len("_vs_random")]) for n in names if n.endswith("_vs_random") and n[:-len("_vs_random")] in keys]


def protocol_aggregates(match: dict, keys: list[str], reps: int) -> dict:
    """The per-episode returns, IQM and mean with their intervals per (matchup, key), and the
    probability of improvement over the random policy (paired: same seeds and episodes)."""
    if not match:
        return {"episode_returns": {}, "aggregates": {}, "improvement": {}}
    returns = episode_returns(match, keys)
    agg = {name: {key: protocol.interval_estimates(protocol.stack(per_seed)[1], reps)
                  for key, per_seed in by_key.items()} for name, by_key in returns.items()}
    better: dict = {}
    for name, key in improvements_over_random(returns, keys):
        x, y = (protocol.stack(returns[n][key])[1] for n in (name, RANDOM))
        better.setdefault(f"{name} > {RANDOM}", {})[key] = protocol.improvement(x, y, reps)
    return {"episode_returns": returns, "aggregates": agg, "improvement": better}


# ----------------------------------------------------------------------------- outputs
def fmt(s: dict) -> str:
    if not s or s.get("n", 0) == 0:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.2f}"
    return f"{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def fmt_ci(value: float, ci: list[float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def protocol_lines(r: dict) -> list[str]:
    """The final checkpoints under the protocol: what was played, IQM and mean with intervals,
    the probability of improvement over the random policy."""
    pr = r.get("protocol")
    if not pr or not r.get("aggregates"):
        return []
    keys = list(r["curves"])
    bs = pr["bootstrap"]
    tuned = ("**Tuning episodes**: settings chosen by their score here look better than they are on fresh "
             "episodes; report on held-out ones with `--split report`." if pr["split"] == "tuning" else
             "**Reporting episodes**: held out from tuning, on training seeds never used while tuning.")
    lines = ["", f"The protocol (`matwm_fast/protocol.py`), split `{pr['split']}`: the final checkpoints of seeds "
             f"{', '.join(map(str, r['seeds']))} on {pr['episodes_per_seed']} episodes each ({pr['layout']}). {tuned} "
             f"Configurations tried on tuning episodes before this one: {pr['configs_tried']}. IQM and mean over all "
             f"seeds × episodes returns, with {round(bs['confidence'] * 100)} % stratified-bootstrap intervals "
             f"(rliable, {bs['reps']} resamples of the seeds and of the episodes within each):", "",
             "| matchup | " + " | ".join(f"{label(k)}: IQM | {label(k)}: mean" for k in keys) + " |",
             "|---|" + "---:|---:|" * len(keys)]
    for name, by_key in r["aggregates"].items():
        cells = []
        for k in keys:
            a = by_key.get(k)
            cells += [fmt_ci(a["iqm"], a["iqm_ci"]), fmt_ci(a["mean"], a["mean_ci"])] if a else ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if r.get("improvement"):
        lines += ["", "Probability of improvement over the random policy on the same episodes (paired; 0.5: "
                  "level), with its interval:", "", "| comparison | " + " | ".join(label(k) for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for name, by_key in r["improvement"].items():
            lines.append(f"| {name} | " + " | ".join(fmt_ci(by_key[k]["p"], by_key[k]["p_ci"]) if k in by_key else "–"
                                                     for k in keys) + " |")
    return lines


def probe_lines(wp: dict | None) -> list[str]:
    """The world model on held-out layouts: each seed's first → final probe scores, and the
    final values across seeds."""
    if not wp:
        return []
    names = list(PROBE.values())
    lines = ["", "The world model on held-out layouts (the training-time evaluation's probe, random-policy "
             "episodes: reward head R², correlation of imagined and true action effects), first → final "
             "evaluation:", "", "| seed | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
    for seed, v in wp["seeds"].items():
        cells = []
        for n in names:
            c = v.get(n)
            cells.append(f"{c['curve'][min(c['curve'], key=int)]:.2f} → {c['final']:.2f}" if c else "–")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append("| final, all seeds | " + " | ".join(fmt(wp["final"][n]) for n in names) + " |")
    return lines


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
            lines += protocol_lines(r)
        lines += probe_lines(r.get("world_model_probe"))
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


