"""The evaluation protocol (matwm_fast/protocol.py): disjoint episode ranges and training-seed
splits, the training-time evaluation on episodes of its own, and rliable's aggregates checked
against a direct computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from matwm_fast import protocol as pr

REPS = 300  # bootstrap resamples: enough for these checks, fast


# ----------------------------------------------------------------------------- ranges and splits
def test_the_named_ranges_are_disjoint():
    for a, b in itertools.combinations(pr.RANGES, 2):
        assert a.hi <= b.lo or b.hi <= a.lo, (a, b)
    tuning, report = pr.SPLITS["tuning"], pr.SPLITS["report"]
    assert not set(tuning.seeds) & set(report.seeds)
    assert len(report.seeds) >= report.min_seeds >= 5 and report.min_episodes >= 50
    assert max(report.seeds) < pr.TUNING.lo  # a run's own env (reset(seed=training seed)) plays none of them


@pytest.mark.parametrize("name", list(pr.SPLITS))
@pytest.mark.parametrize("episodes", [1, 7, 50, 100, 1000])
def test_a_splits_episodes_are_its_own_for_any_seeds(name, episodes):
    """Every seed of the split, every episode count: inside the split's range, one block per seed,
    no two seeds sharing an episode (so any subset of seeds is disjoint too)."""
    sp = pr.SPLITS[name]
    firsts = np.array([pr.first_episode(name, s, episodes) for s in sp.seeds])
    assert (firsts >= sp.episodes.lo).all() and (firsts + episodes <= sp.episodes.hi).all()
    assert (np.diff(firsts) >= episodes).all()
    assert all(pr.range_of(f, episodes) is sp.episodes for f in firsts)


def test_the_tuning_split_is_where_the_committed_results_were_played():
    assert [pr.first_episode("tuning", s, 50) for s in (0, 1, 2)] == [20_000, 20_050, 20_100]
    assert pr.episode_block("report", 101, 50) == {"split": "report", "episodes": 50, "seed": 2_010_000,
                                                   "episode_seeds": [2_010_000, 2_010_049]}
    # more reporting episodes extend a seed's block: 50 are the first 50 of 100
    assert pr.first_episode("report", 103, 100) == pr.first_episode("report", 103, 50)


def test_seeds_of_the_other_split_are_refused_by_name():
    with pytest.raises(ValueError) as e:
        pr.check_seeds("report", [100, 0, 2])
    msg = str(e.value)
    assert "--split report: seeds 0, 2 not allowed (they are tuning seeds)" in msg
    assert "report runs use seeds 100–199" in msg and "--seeds 100 101 102 103 104" in msg
    with pytest.raises(ValueError, match=r"--split tuning: seed 150 not allowed \(it is a report seed\); tuning runs "
                                         "use seeds 0–99"):
        pr.check_seeds("tuning", [0, 150])
    with pytest.raises(ValueError, match="unknown split; allowed: tuning, report"):
        pr.split("test")
    pr.check_seeds("report", range(100, 105))  # no error


def test_a_report_needs_five_seeds_and_fifty_episodes():
    with pytest.raises(ValueError, match="4 seeds given; a report result needs at least 5"):
        pr.check_minimums("report", [100, 101, 102, 103], 50)
    with pytest.raises(ValueError, match="49 episodes per seed; a report result needs at least 50"):
        pr.check_minimums("report", range(100, 105), 49)
    pr.check_minimums("report", range(100, 105), 50)
    pr.check_minimums("tuning", [0], 1)
    with pytest.raises(ValueError, match="at most 10000 fit"):
        pr.first_episode("report", 100, 10_001)


def test_the_training_time_evaluation_plays_its_own_episodes():
    rng = np.random.default_rng(0)
    steps = [0, 1, 40, 1000, 10_000, 50_000, 9_999_999, 10**12, *rng.integers(0, 10**9, 200).tolist()]
    for episodes in (1, 50, 500):
        for step in steps:
            first = pr.training_eval_first(step, episodes)
            assert pr.range_of(first, episodes) is pr.TRAINING_EVAL, (step, episodes, first)
    assert pr.training_eval_first(1000, 50) == 10_001_000  # consecutive evaluations start one env step apart


def test_training_evaluates_on_its_own_episodes(tmp_path, monkeypatch):
    """A run with --eval-every: each evaluation's episodes lie in TRAINING_EVAL, and nothing during
    training resets an env to a tuning or reporting episode."""
    from matwm_fast import env as env_mod
    from matwm_fast import train

    evals, resets = [], []
    real_evaluate, real_reset = train.evaluate, env_mod.MultiAgentEnv.reset

    def spy_evaluate(*args, **kw):
        evals.append((kw["seed"], args[4]))  # (first episode seed, episodes)
        return real_evaluate(*args, **kw)

    def spy_reset(self, seed=None):
        resets.append(seed)
        return real_reset(self, seed)

    monkeypatch.setattr(train, "evaluate", spy_evaluate)
    monkeypatch.setattr(env_mod.MultiAgentEnv, "reset", spy_reset)
    assert train.main(["--preset", "smoke", "--device", "cpu", "--steps", "60", "--eval-every", "20",
                       "--eval-episodes", "2", "--max-cycles", "10", "--run-dir", str(tmp_path / "run")]) == 0
    assert [f for f, _ in evals] == [pr.training_eval_first(s, 2) for s in (40, 60)]
    assert all(pr.range_of(f, n) is pr.TRAINING_EVAL for f, n in evals)
    played = [s for s in resets if s is not None]
    assert played and not [s for s in played if pr.range_of(s) in (pr.TUNING, pr.REPORT)]


# ----------------------------------------------------------------------------- aggregates (rliable)
def direct_iqm(x: np.ndarray) -> float:
    v = np.sort(np.asarray(x, float).ravel())
    k = len(v) // 4
    return float(v[k:len(v) - k].mean())


def test_iqm_and_mean_equal_a_direct_computation():
    # 4 seeds × 6 episodes (24 returns: the IQM is the mean of the middle 12), with outliers
    x = np.array([[-20.0, -18.0, -17.5, -16.0, -60.0, -15.0],
                  [-19.0, -19.5, -18.2, -17.1, -16.6, -2.0],
                  [-21.0, -22.0, -16.3, -15.9, -18.8, -17.7],
                  [-90.0, -18.1, -17.9, -16.2, -15.5, -19.9]])
    a = pr.interval_estimates(x, reps=REPS)
    assert a["iqm"] == pytest.approx(direct_iqm(x)) and a["mean"] == pytest.approx(x.mean())
    assert pr.iqm(x) == pytest.approx(direct_iqm(x))
    assert (a["seeds"], a["episodes"]) == (4, 6)
    assert a["iqm"] > a["mean"]  # the outliers pull the mean down, not the IQM
    for stat in ("iqm", "mean"):
        lo, hi = a[f"{stat}_ci"]
        assert lo <= a[stat] <= hi


def test_intervals_contain_the_estimate_and_narrow_with_more_data():
    rng = np.random.default_rng(1)
    widths = []
    for seeds, episodes in ((3, 10), (5, 50), (20, 200)):
        # seeds differ in level (a run-to-run spread) and episodes around it
        x = rng.normal(-18, 0.8, (seeds, 1)) + rng.normal(0, 5, (seeds, episodes))
        a = pr.interval_estimates(x, reps=REPS)
        for stat in ("iqm", "mean"):
            lo, hi = a[f"{stat}_ci"]
            assert lo <= a[stat] <= hi
        widths.append(a["mean_ci"][1] - a["mean_ci"][0])
    assert widths[0] > widths[1] > widths[2], widths


def test_intervals_are_reproducible_and_leave_numpys_generator_alone():
    x = np.random.default_rng(2).normal(size=(5, 20))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, b = pr.interval_estimates(x, reps=100), pr.interval_estimates(x, reps=100)
    assert a == b
    assert (np.random.get_state()[1] == before).all()
    assert pr.interval_estimates(x, reps=100, seed=1) != a


def test_probability_of_improvement():
    rng = np.random.default_rng(3)
    x = rng.normal(-18, 4, (5, 50))
    same = pr.improvement(x, x.copy(), reps=REPS)
    assert same["p"] == 0.5 and same["p_ci"] == [0.5, 0.5]
    far = pr.improvement(x + 30, x, reps=REPS)  # every episode better
    assert far["p"] == 1.0 and far["p_ci"][0] > 0.99
    worse = pr.improvement(x - 30, x, reps=REPS)
    assert worse["p"] == 0.0
    some = pr.improvement(x + 2, x, reps=REPS)  # a gap of half an episode's spread: in between
    assert 0.5 < some["p"] < 1 and some["p_ci"][0] <= some["p"] <= some["p_ci"][1]
    # each seed's mean of both, in the seeds' order: x row s against y row s
    assert some["seed_means"]["x"] == pytest.approx((x + 2).mean(1).tolist())
    assert some["seed_means"]["y"] == pytest.approx(x.mean(1).tolist()) and len(some["seed_means"]["y"]) == 5
    with pytest.raises(ValueError, match="same seeds and episodes"):
        pr.improvement(x, x[:, :10], reps=REPS)


def test_bad_returns_are_refused():
    with pytest.raises(ValueError, match="array \\(seeds, episodes\\)"):
        pr.interval_estimates(np.zeros(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        pr.interval_estimates(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="different numbers of episodes"):
        pr.stack({0: [1.0, 2.0], 1: [1.0]})
    seeds, arr = pr.stack({"10": [1.0, 2.0], "2": [3.0, 4.0]})  # JSON keys: sorted as numbers
    assert seeds == ["2", "10"] and arr.tolist() == [[3.0, 4.0], [1.0, 2.0]]
