"""``python -m matwm_fast.plot RUN_DIR [RUN_DIR ...]`` — learning curves to a PNG.

    python -m matwm_fast.plot runs/simple_tag-cpu-s* --out tag.png

Plots return against env steps: the periodic evaluations (``eval_return_mean``) when every run
has them, else the training episodes' ``episode_return``; ``--metric NAME`` picks any other
column.  Runs whose configs differ only in the seed (and in settings that do not change learning,
such as ``train.steps``) form one curve: the median across seeds with the min–max (``--band
minmax``, default) or interquartile (``--band iqr``) spread shaded.  In scenarios with several
teams (simple_tag, simple_adversary, ...) each team's return gets its own panel too.

:func:`draw` is the one place that draws these curves: ``python -m matwm_fast.sweep`` draws its
figures with it too, adding reference levels (:class:`Level`: the random policy) and markers
(:class:`Marker`: the final-checkpoint matchups).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..config import RunConfig, flatten
from ..cli import Parser, fail
from ..metrics import read_metrics

DEFAULTS = ("eval_return_mean", "episode_return")
# how a run ran, not what it learned: never a reason to draw two curves (the names also match
# the configs written before these settings moved from ``train`` to their own ``run`` section)
RUN_FIELDS = {f.name for f in fields(RunConfig)}


def build_parser() -> Parser:
    p = Parser(prog="python -m matwm_fast.plot", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (several seeds are aggregated)")
    p.add_argument("--out", metavar="FILE.png", default=None,
                   help="output image (default RUN_DIR/learning_curve.png for one run, ./learning_curves.png for several)")
    p.add_argument("--metric", default=None, help="column of metrics.jsonl to plot (default eval_return_mean, else episode_return)")
    p.add_argument("--band", choices=("minmax", "iqr"), default="minmax", help="spread across seeds to shade (default minmax)")
    p.add_argument("--no-teams", action="store_true", help="do not add per-team panels")
    p.add_argument("--title", default=None, help="figure title")
    return p


class Run:
    """One run directory: its metric rows and the config that groups it with other seeds."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is not a directory")
        self.rows = read_metrics(self.path)
        cfg_file = self.path / "config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}

    def has(self, metric: str) -> bool:
        return any(r.get(metric) is not None for r in self.rows)

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps (T,), values (T,)) of the rows holding ``metric`` (non-finite ones left out)."""
        pts = sorted((r["env_step"], float(r[metric])) for r in self.rows if r.get(metric) is not None)
        return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)

    def group_key(self) -> dict:
        """What the run learned (``config.flatten`` of its ``config.json``, the items ``config.diff``
        compares) minus the seed, each value as JSON."""
        return {k: json.dumps(v) for k, v in flatten(self.config).items()
                if k != "train.seed" and k.split(".", 1)[1] not in RUN_FIELDS}


def metrics_of(runs: list[Run]) -> list[str]:
    return sorted({k for r in runs for row in r.rows for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "env_step"})


def choose_metric(runs: list[Run], metric: str | None) -> str:
    if metric is not None:
        missing = [str(r.path) for r in runs if not r.has(metric)]
        if missing:
            raise ValueError(f"no metric {metric!r} in {', '.join(missing)}; valid metrics: {', '.join(metrics_of(runs))}")
        return metric
    for m in DEFAULTS:
        if all(r.has(m) for r in runs):
            return m
    raise ValueError("no run has finished an episode yet (no episode_return rows); "
                     f"pick a metric with --metric, one of: {', '.join(metrics_of(runs))}")


def team_metric(metric: str, team: str) -> str | None:
    """The per-team column of a default return metric; None for other metrics."""
    return {"eval_return_mean": f"eval_team_{team}_return_mean",
            "episode_return": f"team_{team}_episode_return"}.get(metric)


def teams_of(runs: list[Run]) -> list[str]:
    """Team names found in the runs' columns (``team_<name>_episode_return``), in first-seen order."""
    seen: dict[str, None] = {}
    for r in runs:
        for row in r.rows:
            for k in row:
                if k.startswith("team_") and k.endswith("_episode_return"):
                    seen[k[len("team_"): -len("_episode_return")]] = None
    return list(seen)


def group(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs with equal configs (seed aside) → one labelled group each, in the order given."""
    groups: dict[str, list[Run]] = {}
    keys = {}
    for r in runs:
        k = json.dumps(r.group_key(), sort_keys=True)
        groups.setdefault(k, []).append(r)
        keys[k] = r.group_key()
    # a label names the scenario and preset, plus what distinguishes the group from the others
    varying = {f for f in set().union(*keys.values()) if len({keys[k].get(f) for k in keys}) > 1}
    out = []
    for k, members in groups.items():
        cfg = members[0].config
        label = f"{cfg.get('env', {}).get('scenario', members[0].path.name)} ({cfg.get('preset', '?')})"
        extra = [f"{f}={json.loads(keys[k][f])}" for f in sorted(varying - {"env.scenario"}) if f in keys[k]]
        if extra:
            label += " " + " ".join(extra)
        if not cfg:
            label = members[0].path.name  # no config.json: each run stands alone
        out.append((label, members))
    return out


def aggregate(series: list[tuple[np.ndarray, np.ndarray]], band: str):
    """Per-run (steps, values) → (grid (G,), median (G,), low (G,), high (G,)) across runs.

    Runs logged at different steps are interpolated onto the union of their steps, each only
    inside its own range (NaN outside), so a shorter run does not drag the median.
    """
    grid = np.unique(np.concatenate([s for s, _ in series]))  # (G,)
    vals = np.full((len(series), grid.size), np.nan)  # (R, G)
    for i, (s, v) in enumerate(series):
        inside = (grid >= s[0]) & (grid <= s[-1])
        vals[i, inside] = np.interp(grid[inside], s, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is fine: nothing is drawn there
        med = np.nanmedian(vals, 0)  # (G,)
        if band == "iqr":
            lo, hi = np.nanpercentile(vals, 25, 0), np.nanpercentile(vals, 75, 0)  # (G,), (G,)
        else:
            lo, hi = np.nanmin(vals, 0), np.nanmax(vals, 0)  # (G,), (G,)
    return grid, med, lo, hi


@dataclass(frozen=True)
class Level:
    """A reference level across a panel (the random policy's return): a dashed line at ``value``,
    ``lo``–``hi`` shaded."""

    label: str
    value: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Marker:
    """One value with an error bar from ``lo`` to ``hi`` at env step ``step`` (a final-checkpoint
    matchup)."""

    label: str
    step: float
    value: float
    lo: float
    hi: float


def panels(runs: list[Run], metric: str, teams: bool = True) -> list[tuple[str, str, str]]:
    """(key, title, column) of each panel: ``all`` for ``metric`` itself, plus one per team (keyed
    by its name) when ``metric`` is a return with team columns and there are several teams."""
    out = [("all", "all agents" if metric in DEFAULTS else metric, metric)]
    if teams and metric in DEFAULTS:
        tms = teams_of(runs)
        if len(tms) > 1:  # competitive: one panel per team
            out += [(t, f"team {t}", team_metric(metric, t)) for t in tms]
    return out


def draw_panel(ax, groups: list[tuple[str, list[Run]]], col: str, band: str = "minmax",
               extras: list[Level | Marker] = ()) -> None:
    """Column ``col`` of every group on ``ax``: the median across its runs with the ``band``
    shaded (a single run: its own line), then the reference ``extras``."""
    for label, members in groups:
        series = [m.series(col) for m in members if m.has(col)]
        if not series:
            continue
        grid, med, lo, hi = aggregate(series, band)
        n = len(series)
        line, = ax.plot(grid, med, marker="o" if grid.size <= 30 else None, markersize=3,
                        label=f"{label} (n={n})" if n > 1 else label)
        if n > 1:
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
    for e in extras:
        if isinstance(e, Level):
            ax.axhline(e.value, color="gray", ls="--", label=e.label)
            ax.axhspan(e.lo, e.hi, color="gray", alpha=0.12)
        else:
            ax.errorbar([e.step], [e.value], yerr=[[e.value - e.lo], [e.hi - e.value]], fmt="s", capsize=3,
                        color="C2", label=e.label)


def figure(runs: list[Run], metric: str, band: str = "minmax", teams: bool = True,
           title: str | None = None, extras: dict[str, list[Level | Marker]] | None = None):
    """The figure: one panel per :func:`panels` entry; ``extras`` adds reference levels and
    markers to the panels of those keys (``all``, a team name)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    panel_list, extras = panels(runs, metric, teams), extras or {}
    unknown = sorted(set(extras) - {k for k, _, _ in panel_list})
    if unknown:
        raise ValueError(f"no panel {', '.join(map(repr, unknown))} to draw on; panels: "
                         f"{', '.join(k for k, _, _ in panel_list)}")
    groups = group(runs)
    fig, axes = plt.subplots(1, len(panel_list), figsize=(5.5 * len(panel_list), 4), squeeze=False)
    for i, (ax, (key, name, col)) in enumerate(zip(axes[0], panel_list)):
        draw_panel(ax, groups, col, band, extras.get(key, ()))
        ax.set_title(name)
        ax.set_xlabel("env steps")
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
        if i == 0 or extras.get(key):  # the curves' legend once; references wherever they are
            ax.legend(fontsize=7 if extras else 8)
    spread = "min–max" if band == "minmax" else "interquartile range"
    several = any(len(m) > 1 for _, m in groups)
    # wrapped at the figure's edges: a sweep's title is longer than one panel is wide
    fig.suptitle(title or (f"{metric}: median across seeds, shaded {spread}" if several else f"{metric} vs env steps"),
                 fontsize=10, wrap=True)
    fig.tight_layout()
    return fig


def draw(runs: list[Run], metric: str, out: Path, band: str = "minmax", teams: bool = True,
         title: str | None = None, extras: dict[str, list[Level | Marker]] | None = None) -> Path:
    """:func:`figure` written to ``out`` as a PNG."""
    fig = figure(runs, metric, band, teams, title, extras)  # first: it picks the file-only backend
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [Run(Path(p)) for p in args.runs]
        metric = choose_metric(runs, args.metric)
        if args.out is not None and not args.out.lower().endswith(".png"):
            raise ValueError(f"--out {args.out!r}: the image is a PNG, so the name must end in .png")
        out = Path(args.out) if args.out else (runs[0].path / "learning_curve.png" if len(runs) == 1
                                               else Path("learning_curves.png"))
        path = draw(runs, metric, out, band=args.band, teams=not args.no_teams, title=args.title)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    except ImportError as e:
        fail(f"plotting needs matplotlib ({e}): pip install 'matwm_fast[viz]'")
    groups = group(runs)
    print(f"{metric}: {len(runs)} run(s) in {len(groups)} group(s): "
          + "; ".join(f"{label} × {len(m)}" for label, m in groups))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
