"""The evaluation protocol: which episodes each kind of evaluation plays, which training seeds a
tuning or a reporting run may use, and the statistics a result is reported with.

Every evaluation plays episode e of a block from ``env.reset(seed=first + e)`` (``play.play``).
Episode seeds are cut into named, disjoint ranges [lo, hi):

- ``TRAINING_ENVS`` [0, 20,000): a MATWM run's own env, ``reset(seed=training seed)`` then unseeded;
- ``TUNING`` [20,000, 1,000,000): split ``tuning``, seed s plays 20,000 + s·E + e — where every
  result committed before this protocol was played;
- ``MODEL_FREE_TRAINING`` [1,000,000, 2,000,000): BenchMARL's training env i of seed s,
  1,000,000 + 1000·s + i (``bench/baselines/benchmarl_mpe2.py``);
- ``REPORT`` [2,000,000, 3,000,000): split ``report``, seed s plays 2,000,000 + (s − 100)·10,000 + e;
- ``TRAINING_EVAL`` [10,000,000, 20,000,000): ``--eval-every`` during training, at env step t
  10,000,000 + t mod (10,000,000 − E) + e;
- ``WORLD_MODEL_PROBE`` [10⁹, 10⁹ + 10⁶): the world model's held-out fit (``wm_probe``).

Training seeds are split too: tuning runs use seeds 0–99, reporting runs 100–199 — seeds never
used while choosing settings.  A reporting result needs at least ``REPORT.min_seeds`` (5) seeds
and ``min_episodes`` (50) episodes per seed; E (episodes per seed) is configurable above that.
Within a split every seed has its own episodes, and two policies evaluated for the same seed
play the same episodes (a paired comparison).

Aggregates (:func:`interval_estimates`, :func:`improvement`) are rliable's (Agarwal et al., 2021),
computed on the per-episode returns of all seeds, an array (seeds S × episodes E): IQM and mean
over the S·E returns with 95 % stratified bootstrap confidence intervals — the strata are the
seeds: every bootstrap sample redraws the seeds and, within each, its episodes (rliable's
``StratifiedBootstrap`` with ``task_bootstrap``, the seeds as its "tasks" and the episodes as its
"runs"), so an interval covers a new set of training seeds, not only new episodes.  The
probability of improvement P(X > Y) of a paired comparison (same seeds, same episodes) is
rliable's, per seed over episode pairs and averaged over seeds, its interval from the same
bootstrap applied to both arrays with the same draws.  rliable is optional:
``pip install -e '.[protocol]'``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

INSTALL = "pip install -e '.[protocol]'"
CI_SIZE = 0.95
BOOTSTRAP_REPS = 2_000  # rliable's default is 50,000: fewer keep a table's dozens of intervals to seconds (--bootstrap-reps)
BOOTSTRAP_SEED = 0  # the bootstrap's draws: the same intervals every time the same returns are aggregated


@dataclass(frozen=True)
class EpisodeRange:
    """Episode seeds [lo, hi): one kind of evaluation's episodes."""

    name: str
    lo: int
    hi: int

    def holds(self, first: int, episodes: int) -> bool:
        """Episodes first, first + 1, ..., first + episodes − 1 all lie in this range."""
        return self.lo <= first and first + episodes <= self.hi

    def describe(self) -> str:
        return f"{self.name} episodes [{self.lo:,}, {self.hi:,})"


TRAINING_ENVS = EpisodeRange("training envs", 0, 20_000)
TUNING = EpisodeRange("tuning", 20_000, 1_000_000)
MODEL_FREE_TRAINING = EpisodeRange("model-free training envs", 1_000_000, 2_000_000)
REPORT = EpisodeRange("reporting", 2_000_000, 3_000_000)
TRAINING_EVAL = EpisodeRange("training-time evaluation", 10_000_000, 20_000_000)
WORLD_MODEL_PROBE = EpisodeRange("world-model probe", 1_000_000_000, 1_001_000_000)
RANGES = (TRAINING_ENVS, TUNING, MODEL_FREE_TRAINING, REPORT, TRAINING_EVAL, WORLD_MODEL_PROBE)


@dataclass(frozen=True)
class Split:
    """Training seeds and the episodes their final policies are scored on."""

    name: str
    episodes: EpisodeRange
    seeds: range  # the training seeds this split may use
    stride: int | None  # episode seeds between two consecutive training seeds; None: E (the legacy layout)
    min_seeds: int
    min_episodes: int

    def seed_text(self) -> str:
        return f"{self.seeds.start}–{self.seeds.stop - 1}"


SPLITS = {
    "tuning": Split("tuning", TUNING, range(0, 100), None, 1, 1),
    "report": Split("report", REPORT, range(100, 200), 10_000, 5, 50),
}
DEFAULT_SPLIT = "tuning"  # what a sweep, eval or baseline evaluated on before the protocol existed


def split(name: str) -> Split:
    if name not in SPLITS:
        raise ValueError(f"--split {name!r}: unknown split; allowed: {', '.join(SPLITS)}")
    return SPLITS[name]


def check_seeds(name: str, seeds) -> None:
    """Refuse (ValueError) training seeds that do not belong to split ``name``, naming them and
    the allowed ones."""
    sp = split(name)
    bad = [s for s in seeds if s not in sp.seeds]
    if not bad:
        return
    other = [n for n, o in SPLITS.items() if n != name and all(s in o.seeds for s in bad)]
    whose = (f" ({'they are' if len(bad) > 1 else 'it is a'} {other[0]} seed{'s' * (len(bad) > 1)})"
             if other else "")
    hint = (" — seeds never used while tuning, e.g. --seeds "
            + " ".join(str(sp.seeds.start + i) for i in range(sp.min_seeds))) if name == "report" else ""
    raise ValueError(f"--split {name}: seed{'s' * (len(bad) > 1)} {', '.join(map(str, bad))} "
                     f"not allowed{whose}; {name} runs use seeds {sp.seed_text()}{hint}")


def check_minimums(name: str, seeds, episodes: int) -> None:
    """Refuse (ValueError) fewer seeds or episodes per seed than split ``name`` reports on
    (``seeds`` None: one run's evaluation, the episodes only)."""
    sp = split(name)
    if seeds is not None and len(set(seeds)) < sp.min_seeds:
        raise ValueError(f"--split {name}: {len(set(seeds))} seed{'s' * (len(set(seeds)) != 1)} given; a {name} "
                         f"result needs at least {sp.min_seeds} (e.g. --seeds "
                         + " ".join(str(sp.seeds.start + i) for i in range(sp.min_seeds)) + ")")
    if episodes < sp.min_episodes:
        raise ValueError(f"--split {name}: {episodes} episodes per seed; a {name} result needs at least "
                         f"{sp.min_episodes}")


def add_episode_arguments(parser, episodes_help: str = "evaluation episodes per seed") -> None:
    """``--episodes`` and the choice of whose episodes are played — ``--split`` (the protocol's) or
    ``--eval-seed`` (outside it) — for the tools that play fixed episodes of a training seed s."""
    parser.add_argument("--episodes", type=int, default=50, help=f"{episodes_help} (default 50, the paper's protocol)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", choices=list(SPLITS), default=None,
                       help="the protocol's split whose episodes training seed s plays (matwm_fast/protocol.py): "
                            "tuning (default; seeds 0-99) or report (seeds 100-199, at least 5 seeds and 50 episodes)")
    where.add_argument("--eval-seed", type=int, default=None,
                       help="play reset(seed=EVAL_SEED + s·episodes + e) instead, outside the protocol")


def first_episode(name: str, seed: int, episodes: int) -> int:
    """The first episode seed training seed ``seed``'s final policy is scored on in split ``name``
    (it plays ``first + e``, e < ``episodes``)."""
    sp = split(name)
    check_seeds(name, [seed])
    if episodes < 1:
        raise ValueError(f"{episodes} episodes: need at least 1")
    stride = sp.stride or episodes
    if episodes > stride:
        raise ValueError(f"--split {name}: {episodes} episodes per seed; at most {stride} fit a seed's block")
    first = sp.episodes.lo + (seed - sp.seeds.start) * stride
    if not sp.episodes.holds(first, episodes):
        raise ValueError(f"--split {name}: seed {seed} with {episodes} episodes would leave the "
                         f"{sp.episodes.describe()}; use fewer episodes")
    return first


def episode_block(name: str, seed: int, episodes: int) -> dict:
    """How a result records the episodes it played: split, first and last episode seed."""
    first = first_episode(name, seed, episodes)
    return {"split": name, "episodes": episodes, "seed": first, "episode_seeds": [first, first + episodes - 1]}


def training_eval_first(step: int, episodes: int) -> int:
    """The first episode seed of the training-time evaluation at env step ``step`` (it plays
    ``first + e``, e < ``episodes``): inside ``TRAINING_EVAL`` for every step."""
    span = TRAINING_EVAL.hi - TRAINING_EVAL.lo
    if not 1 <= episodes < span:
        raise ValueError(f"{episodes} evaluation episodes: need 1 to {span - 1:,}")
    return TRAINING_EVAL.lo + step % (span - episodes)


def range_of(first: int, episodes: int = 1) -> EpisodeRange | None:
    """The named range holding episodes first … first + episodes − 1 (None: none holds them all)."""
    return next((r for r in RANGES if r.holds(first, episodes)), None)


def describe(name: str) -> dict:
    """The protocol of split ``name`` as a results file records it."""
    sp = split(name)
    return {"split": name, "episode_range": [sp.episodes.lo, sp.episodes.hi],
            "training_seeds": [sp.seeds.start, sp.seeds.stop - 1],
            "layout": ("seed s plays reset(seed=20,000 + s·E + e), e < E" if sp.stride is None else
                       f"seed s plays reset(seed={sp.episodes.lo:,} + (s − {sp.seeds.start})·{sp.stride:,} + e), e < E"),
            "min_seeds": sp.min_seeds, "min_episodes": sp.min_episodes}


# ----------------------------------------------------------------------------- per-episode returns
def column(returns, members: list[int] | None = None) -> np.ndarray:
    """An evaluation's returns (E, N) → (E,) each episode's mean over ``members`` (all agents when
    None): the value a table column aggregates (the same mean as ``metrics.summarise_returns``)."""
    r = np.asarray(returns, float).reshape(len(returns), -1)  # (E, N)
    return (r if members is None else r[:, members]).mean(1)


def stack(per_seed: dict) -> tuple[list, np.ndarray]:
    """{seed: (E,) returns} → (seeds in order, array (S, E)); every seed must have the same E."""
    seeds = sorted(per_seed, key=int)
    lengths = {len(per_seed[s]) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"seeds played different numbers of episodes ({sorted(lengths)}): they cannot be aggregated")
    return seeds, np.array([per_seed[s] for s in seeds], float)  # (S, E)


# ----------------------------------------------------------------------------- aggregates (rliable)
def rliable():
    """rliable's (library, metrics) modules, or an ImportError naming the extra that brings them."""
    try:
        from rliable import library, metrics
    except ImportError as e:
        raise ImportError(f"the protocol's confidence intervals need rliable, which is not installed here ({e}); "
                          f"install it with: {INSTALL}") from e
    except TypeError as e:  # arch < 8 (rliable caps it) fails at import under pandas 3
        raise ImportError(f"rliable does not import here ({e}): its arch needs pandas < 3; install the "
                          f"protocol's versions with: {INSTALL}") from e
    return library, metrics


@contextmanager
def _seeded(seed: int):
    """rliable's stratified bootstrap draws from numpy's global generator: seed it for the
    bootstrap and give it back as it was."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check(returns) -> np.ndarray:
    r = np.asarray(returns, float)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"returns must be an array (seeds, episodes), got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError("returns hold NaN or Inf")
    return r


def iqm(returns) -> float:
    """The interquartile mean of all returns (rliable's: the 25 % trimmed mean)."""
    _, metrics = rliable()
    return float(metrics.aggregate_iqm(_check(returns).T))


def interval_estimates(returns, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> dict:
    """returns (S seeds, E episodes) → IQM and mean over the S·E returns, each with its 95 %
    stratified bootstrap interval (seeds and the episodes within each redrawn; module docstring)."""
    library, metrics = rliable()
    scores = _check(returns).T  # (E, S): rliable's (runs, tasks)

    def both(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])

    with _seeded(seed):
        point, ci = library.get_interval_estimates({"x": scores}, both, reps=reps, task_bootstrap=True,
                                                   confidence_interval_size=CI_SIZE)
    p, c = point["x"], ci["x"]  # (2,), (2, 2): rows lower/upper, columns IQM/mean
    return {"iqm": float(p[0]), "iqm_ci": [float(c[0, 0]), float(c[1, 0])],
            "mean": float(p[1]), "mean_ci": [float(c[0, 1]), float(c[1, 1])],
            "seeds": scores.shape[1], "episodes": scores.shape[0]}


def improvement(x, y, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> dict:
    """P(X > Y) of a paired comparison: x and y (S seeds, E episodes), row s of both the same
    seed's episodes in the same order.  rliable's probability of improvement (per seed, over all
    episode pairs, ties counting one half; averaged over seeds) with its 95 % interval, the
    bootstrap drawing the same seeds and episodes from both arrays; and each seed's mean of both,
    so a per-seed difference quoted beside P reads off the same record."""
    library, metrics = rliable()
    a, b = _check(x).T, _check(y).T  # (E, S)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same seeds and episodes: shapes {a.T.shape} and {b.T.shape}")
    with _seeded(seed):
        ci = library.StratifiedBootstrap(a, b, task_bootstrap=True).conf_int(
            metrics.probability_of_improvement, reps=reps, size=CI_SIZE, method="percentile")
    return {"p": float(metrics.probability_of_improvement(a, b)), "p_ci": [float(ci[0, 0]), float(ci[1, 0])],
            "seeds": a.shape[1], "episodes": a.shape[0],
            "seed_means": {"x": a.mean(0).tolist(), "y": b.mean(0).tolist()}}


def bootstrap_record(reps: int, seed: int = BOOTSTRAP_SEED) -> dict:
    """How the intervals of a results file were computed."""
    return {"library": "rliable", "method": "percentile, stratified bootstrap: seeds and the episodes within each redrawn",
            "confidence": CI_SIZE, "reps": reps, "seed": seed}
