"""bench/baselines/heuristics.py (scripted simple_spread policies on the sweep's matchup episodes)
and bench/learning_rows.py + bench/learning_table.py (the README's results table, built from result files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "baselines"))
sys.path.insert(0, str(ROOT / "bench"))

import heuristics  # noqa: E402
import learning_rows  # noqa: E402
import learning_table  # noqa: E402

from matwm_fast.config import EnvConfig  # noqa: E402
from matwm_fast.env import MultiAgentEnv  # noqa: E402
from matwm_fast.play import play  # noqa: E402


# ----------------------------------------------------------------------------- heuristics
@pytest.mark.parametrize("target, vel, action", [
    ((0.5, 0.1), (0.0, 0.0), 2), ((-0.5, 0.1), (0.0, 0.0), 1), ((0.1, 0.5), (0.0, 0.0), 4),
    ((0.1, -0.5), (0.0, 0.0), 3), ((0.01, -0.02), (0.0, 0.0), 0),
    ((0.1, 0.0), (0.4, 0.0), 1),  # moving fast toward a near target: brake
])
def test_steer(target, vel, action):
    assert heuristics.steer(np.array(target), np.array(vel)) == action


def nearest_distance(obs: np.ndarray) -> np.ndarray:
    """(N,) each agent's distance to its nearest landmark, from its own observation."""
    return np.array([np.linalg.norm(heuristics.layout(o, len(obs))[1], axis=1).min() for o in obs])


def test_nearest_reaches_the_landmarks():
    """The observation layout and the steering signs together: heading for the nearest landmark
    brings every agent near one (from the observations alone)."""
    env = MultiAgentEnv(EnvConfig(scenario="simple_spread"), seed=0)
    for ep in range(4):
        obs, done = env.reset(seed=100 + ep), False
        start = nearest_distance(obs)  # (N,)
        while not done:
            obs, _, _, done = env.step(heuristics.nearest(obs))
        assert (nearest_distance(obs) < np.minimum(start, 0.3)).all(), (start, nearest_distance(obs))


def test_evaluation_is_paired_with_the_sweep(tmp_path):
    """Seed s plays the sweep's matchup episodes of seed s in the same split: its random policy is
    play's, there; and the scripted policies rank as coordination predicts."""
    res = heuristics.evaluate(seed=1, episodes=6)  # the tuning split, as before the protocol
    assert res["evaluation"]["episode_seeds"] == [20_006, 20_011] and res["evaluation"]["split"] == "tuning"
    assert heuristics.evaluate(seed=1, episodes=2, eval_seed=20_000)["evaluation"]["split"] is None  # off-protocol
    rep = heuristics.evaluate(seed=101, episodes=2, split="report")["evaluation"]
    assert (rep["split"], rep["episode_seeds"]) == ("report", [2_010_000, 2_010_001])
    returns, _, _ = play(None, None, EnvConfig(scenario="simple_spread"), 1, 6, 20_006, "cpu", random_policy=True)
    np.testing.assert_allclose(np.array(res["results"]["random"]["returns"]), returns, atol=1e-5)
    mean = {k: v["all"]["mean"] for k, v in res["results"].items()}
    assert mean["assignment"] > mean["nearest"] > mean["random"], mean
    for v in res["results"].values():
        assert np.array(v["returns"]).shape == (6, 3)


TAG_TEAMS = {"adversary": [0, 1, 2], "agent": [3]}


def tag_obs(adversaries: list[tuple[float, float]], prey: tuple[float, float]) -> np.ndarray:
    """(4, 16) simple_tag observations of these positions, at rest, obstacles far away, in MPE2's layout."""
    pos = [np.array(p) for p in adversaries + [prey]]
    obs = np.zeros((4, 16))
    for i, me in enumerate(pos):
        others = np.concatenate([q - me for j, q in enumerate(pos) if j != i])  # (6,)
        obs[i, 2:4], obs[i, 4:8], obs[i, 8:14] = me, 5.0, others  # velocities 0; the prey's (adversaries' 14:16) too
    return obs


@pytest.mark.parametrize("adversaries, prey, actions", [
    # each adversary heads for the prey (+x, +y, −y); the prey is pushed by 1/d² from each: the two at
    # 0.5 (left, below) outweigh the one at 0.6 above, so it runs +x
    ([(-0.5, 0.0), (0.0, -0.5), (0.0, 0.6)], (0.0, 0.0), [2, 4, 3, 2]),
    # all three to its right, one close above: it runs −x (the x push is the larger)
    ([(0.3, 0.0), (0.4, 0.1), (0.1, 0.35)], (0.0, 0.0), [1, 1, 3, 1]),
])
def test_chase_flee_heads_for_the_prey_and_away_from_the_adversaries(adversaries, prey, actions):
    assert heuristics.chase_flee(tag_obs(adversaries, prey), TAG_TEAMS).tolist() == actions


def test_the_prey_turns_back_from_the_edge():
    """Adversaries far to the left push the prey right, but past EDGE it heads back to the centre."""
    far = [(-0.8, 0.05), (-0.8, 0.0), (-0.8, -0.05)]
    assert heuristics.chase_flee(tag_obs(far, (0.0, 0.0)), TAG_TEAMS)[3] == 2
    assert heuristics.chase_flee(tag_obs(far, (heuristics.EDGE + 0.05, 0.0)), TAG_TEAMS)[3] == 1


def test_simple_tag_heuristics_play_each_team_against_random_opponents():
    """Both teams scripted, and each team scripted against random opponents, on the sweep's
    episodes: the scripted chasers catch random prey far more than random adversaries do, and the
    scripted prey is caught less than random prey."""
    res = heuristics.evaluate(seed=0, episodes=20, scenario="simple_tag")
    assert set(res["results"]) == {"chase_flee", "chase_flee_adversary_vs_random", "chase_flee_agent_vs_random",
                                   "random"}
    team = {k: {t: v["mean"] for t, v in r["teams"].items()} for k, r in res["results"].items()}
    assert team["chase_flee_adversary_vs_random"]["adversary"] > team["random"]["adversary"] + 10, team
    assert team["chase_flee_agent_vs_random"]["agent"] > team["random"]["agent"] + 5, team  # fewer catches
    assert team["chase_flee_agent_vs_random"]["adversary"] < team["random"]["adversary"], team


@pytest.mark.parametrize("args, says", [
    (["--scenario", "simple_push"], "--scenario 'simple_push': no scripted policies; allowed: simple_spread, simple_tag"),
    (["--seeds", "-1"], "--seeds -1: must be 0 or more"),
    (["--episodes", "0"], "--episodes 0: must be at least 1"),
    (["--eval-seed", "-3"], "--eval-seed -3: must be 0 or more"),
    (["--split", "report", "--seeds", "0", "101"], "--split report: seed 0 not allowed (it is a tuning seed); report "
                                                   "runs use seeds 100–199"),
    (["--split", "report", "--seeds", "100", "101", "102", "103", "104", "--episodes", "10"],
     "--split report: 10 episodes per seed; a report result needs at least 50"),
    (["--split", "report", "--eval-seed", "5"], "argument --eval-seed: not allowed with argument --split"),
])
def test_heuristics_refuse_bad_arguments(tmp_path, args, says):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "baselines" / "heuristics.py"), *args,
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"error: {says}" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the table
def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def stats(values: list[float]) -> dict:
    return {"n": len(values), "median": float(np.median(values)), "min": min(values), "max": max(values),
            "values": values}


def per_seed(seed: int, results: dict[str, float]) -> dict:
    return {"seed": seed, "results": {m: {"all": {"mean": v}, "teams": {"agent": {"mean": v}}}
                                      for m, v in results.items()}}


def test_table_from_result_files(tmp_path):
    learning = tmp_path / "learning"
    # a sweep of MATWM's base variant: 3 seeds, final step 2000
    write(learning / "tuning" / "base" / "simple_spread" / "results.json", {"envs": {"simple_spread": {
        "seeds": [0, 1, 2], "steps": [1000, 2000],
        "curves": {"all": {"1000": stats([-30.0, -31.0, -29.0]), "2000": stats([-20.0, -22.0, -18.0])}},
        "matchups": {"trained": {"all": stats([-20.0, -22.0, -18.0])},
                     "trained_sampled": {"all": stats([-21.0, -23.0, -19.0])},
                     "random": {"all": stats([-27.0, -28.0, -25.0])}}}}})
    # MAPPO at one budget, 2 seeds; the heuristics on 3 seeds
    for s, v in ((0, -40.0), (1, -30.0)):
        write(learning / "baselines" / "simple_spread" / "mappo" / f"seed{s}_step20000.json",
              per_seed(s, {"greedy": v, "sampled": v + 1, "random": -27.0}))
    for s in range(3):
        write(learning / "baselines" / "simple_spread" / "heuristics" / f"seed{s}.json",
              per_seed(s, {"noop": -23.0 - s, "nearest": -17.0 - s, "assignment": -9.0, "random": -27.0 + s}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{learning_table.BEGIN}\nold\n{learning_table.END}\n\nafter\n")
    rc = learning_table.main(["--results", str(learning), "--readme", str(readme)])
    assert rc == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{learning_table.END}\n\nafter\n")
    tuning = "tuning episodes, no CI | —"  # files without a split: the tuning episodes, no configurations recorded
    assert f"| MATWM | 2,000 | 3 | {tuning} | -20.0 [-22.0, -18.0] |" in text
    assert "](learning/summary_simple_spread.png)" in text
    md = (learning / "summary.md").read_text()
    assert f"| MATWM | 2,000 | 3 | {tuning} | -20.0 [-22.0, -18.0] | -21.0 [-23.0, -19.0] |" in md
    assert f"| MAPPO (BenchMARL) | 20,000 | 2 | {tuning} | -35.0 [-40.0, -30.0] | -34.0 [-39.0, -29.0] |" in md
    assert f"| nearest landmark | no training | 3 | {tuning} | -18.0 [-19.0, -17.0] | -18.0 [-19.0, -17.0] |" in md
    assert f"| uniformly random | no training | 3 | {tuning} | -26.0 [-27.0, -25.0]" in md
    assert "#### Tuning episodes (tuning episodes, no CI" in md and "Reporting episodes" not in md
    assert "simple_tag" not in md  # no results for it: no section
    rows = [line for line in md.splitlines() if line.startswith("| ") and "policy" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| MATWM", "| MAPPO (BenchMARL)", "| uniformly random",
                                                 "| always no-op", "| nearest landmark", "| shared assignment"]
    summary = json.loads((learning / "summary.json").read_text())
    assert summary["simple_spread"]["MATWM @ 2000"]["greedy"] == [-20.0, -22.0, -18.0]


def test_a_run_continued_to_a_larger_budget_is_a_second_row(tmp_path):
    learning = tmp_path / "learning"
    label = next(lab for lab, d in learning_rows.MATWM if d == "tuning/ent3e-3-50k")
    assert [d for lab, d in learning_rows.MATWM if lab == label] == ["tuning/ent3e-3", "tuning/ent3e-3-50k"]
    for d, final, v in (("ent3e-3", 2000, -19.0), ("ent3e-3-50k", 5000, -15.0)):
        write(learning / "tuning" / d / "simple_spread" / "results.json", {"envs": {"simple_spread": {
            "seeds": [0, 1], "steps": [1000, final],
            "curves": {"all": {"1000": stats([-30.0, -31.0]), str(final): stats([v, v - 2])}},
            "matchups": {"trained": {"all": stats([v, v - 2])}, "random": {"all": stats([-27.0, -28.0])}}}}})
    assert learning_table.main(["--results", str(learning), "--readme", str(tmp_path / "none.md")]) == 0
    md = (learning / "summary.md").read_text()
    assert f"| {label} | 2,000 | 2 | tuning episodes, no CI | — | -20.0 [-21.0, -19.0] |" in md
    assert f"| {label} | 5,000 | 2 | tuning episodes, no CI | — | -16.0 [-17.0, -15.0] |" in md
    summary = json.loads((learning / "summary.json").read_text())["simple_spread"]
    assert summary[f"{label} @ 5000"]["greedy"] == [-15.0, -17.0]


def heuristic_file(seed: int, returns: dict[str, np.ndarray], split: str) -> dict:
    """heuristics.py's file for one seed: per policy its (E, 3) returns, as play.report writes them."""
    from matwm_fast import protocol
    from matwm_fast.config import EnvConfig
    from matwm_fast.env import env_spec
    from matwm_fast.play import report

    spec = env_spec(EnvConfig(scenario="simple_spread"))
    e = len(next(iter(returns.values())))
    return {"seed": seed, "evaluation": protocol.episode_block(split, seed, e),
            "results": {m: report(r, spec) for m, r in returns.items()}}


def test_reporting_rows_get_intervals_and_tuning_counts(tmp_path, capsys):
    """A reporting sweep and the heuristics on the reporting episodes: their own table, IQM and mean
    with intervals (the protocol's), P(> nearest landmark) paired per seed, the configurations tried;
    the files of the tuning split below them as before, marked."""
    from matwm_fast import protocol

    learning, reps = tmp_path / "learning", 100
    rng = np.random.default_rng(0)
    seeds, episodes = [100, 101, 102, 103, 104], 8
    nearest = {s: rng.normal(-18, 3, (episodes, 3)) for s in seeds}  # (E, N) per seed
    matwm = {s: nearest[s] + 20 for s in seeds}  # every episode far better than the heuristic's
    per_ep = {str(s): nearest[s].mean(1).tolist() for s in seeds}
    mine = {str(s): matwm[s].mean(1).tolist() for s in seeds}
    write(learning / "report" / "cpu" / "simple_spread" / "results.json", {"envs": {"simple_spread": {
        "seeds": seeds, "steps": [1000, 2000], "curves": {"all": {"2000": stats([-1.0] * 5)}},
        "matchups": {"trained": {"all": stats([float(np.mean(v)) for v in mine.values()])},
                     "random": {"all": stats([-27.0] * 5)}},
        "protocol": {**protocol.describe("report"), "configs_tried": 30,
                     "episode_seeds": {str(s): protocol.first_episode("report", s, episodes) for s in seeds}},
        "episode_returns": {"trained": {"all": mine}, "random": {"all": per_ep}},
        "world_model_probe": {"final": {"reward_r2": stats([0.1, -0.02, 0.3, 0.2, 0.0]),
                                        "effect_corr": stats([0.31, 0.2, 0.25, 0.4, 0.33])}}}}})
    for s in seeds:
        write(learning / "report" / "baselines" / "simple_spread" / "heuristics" / f"seed{s}.json",
              heuristic_file(s, {"noop": nearest[s] - 5, "nearest": nearest[s], "assignment": nearest[s] + 8,
                                 "random": nearest[s] - 9}, "report"))
    for s in range(3):  # the tuning split's heuristics
        write(learning / "baselines" / "simple_spread" / "heuristics" / f"seed{s}.json",
              heuristic_file(s, {m: np.full((4, 3), v) for m, v in
                                 (("noop", -23.0), ("nearest", -17.0), ("assignment", -9.0), ("random", -27.0))},
                             "tuning"))
    assert learning_table.main(["--results", str(learning), "--readme", str(tmp_path / "none.md"),
                                "--bootstrap-reps", str(reps)]) == 0
    md = (learning / "summary.md").read_text()
    report_part, tuning_part = md.split("#### Tuning episodes")
    assert "#### Reporting episodes (held out: training seeds 100–199" in report_part
    row = next(line for line in report_part.splitlines() if line.startswith("| MATWM, `cpu` preset |"))
    assert row.startswith("| MATWM, `cpu` preset | 2,000 | 5 × 8 | 30 | IQM ")
    assert "<br>mean " in row and "<br>P(> nearest landmark) 1.00 [1.00, 1.00]" in row
    # the method against every other reporting row, paired: far above each heuristic here, below none
    vs = report_part.split("P(MATWM, `cpu` preset at 2,000 env steps > row)")[1]
    assert "| nearest landmark | no training | 1.00 [1.00, 1.00] | — |" in vs
    assert "| shared assignment | no training | 1.00 [1.00, 1.00] | — |" in vs  # +20 beats its +8
    assert "| MATWM, `cpu` preset |" not in vs.split("The world model")[0]
    # the world model's held-out fit beside the reporting rows that logged it
    assert "| MATWM, `cpu` preset | 2,000 | 0.10 [-0.02, 0.30] | 0.31 [0.20, 0.40] |" in report_part
    near = next(line for line in report_part.splitlines() if line.startswith("| nearest landmark |"))
    assert "| no training | 5 × 8 | — | IQM " in near and "P(>" not in near  # the reference itself
    assert "| nearest landmark | no training | 3 | tuning episodes, no CI | — | -17.0 [-17.0, -17.0] |" in tuning_part
    assert "MATWM, `cpu` preset" not in tuning_part
    summary = json.loads((learning / "summary.json").read_text())["simple_spread"]
    got = summary["report"]["MATWM, `cpu` preset @ 2000"]
    want = protocol.interval_estimates(np.array([mine[str(s)] for s in seeds]), reps)
    assert got["aggregates"]["greedy"] == want and got["configs_tried"] == 30
    assert got["world_model_probe"]["reward_r2"]["median"] == pytest.approx(0.1)
    pm = summary["report"]["nearest landmark @ None"]["improvement_of MATWM, `cpu` preset @ 2000"]["greedy"]
    want_pm = protocol.improvement(np.array([mine[str(s)] for s in seeds]),
                                   np.array([nearest[s].mean(1).tolist() for s in seeds]), reps)
    # the heuristics' files store rounded returns: their seed means match to that rounding
    assert pm.pop("seed_means") == {k: pytest.approx(v, abs=1e-5) for k, v in want_pm.pop("seed_means").items()}
    assert pm == {**want_pm, "seed_ids": seeds}
    p = protocol.improvement(np.array([mine[str(s)] for s in seeds]), np.array([per_ep[str(s)] for s in seeds]), reps)
    got_p = dict(got["improvement"]["greedy"])
    assert got_p.pop("seed_means") == {k: pytest.approx(v, abs=1e-5) for k, v in p.pop("seed_means").items()}
    assert got_p == {**p, "seed_ids": seeds, "over": "nearest landmark"}
    assert summary["nearest landmark @ None"]["split"] == "tuning"

    # again: every interval from the bootstrap's cache, the same tables to the byte
    written = {f: (learning / f).read_text() for f in ("summary.md", "summary.json")}
    first = capsys.readouterr().out.splitlines()[-1]  # e.g. "bootstrap: 12 computed, 8 reused from …": a pair met twice
    assert first.startswith("bootstrap: ") and not first.startswith("bootstrap: 0 computed")
    assert sorted((learning / learning_table.CACHE).glob("*.json"))
    assert learning_table.main(["--results", str(learning), "--readme", str(tmp_path / "none.md"),
                                "--bootstrap-reps", str(reps)]) == 0
    assert "bootstrap: 0 computed," in capsys.readouterr().out
    assert {f: (learning / f).read_text() for f in written} == written
    # and without it: every one computed, nothing kept
    shutil.rmtree(learning / learning_table.CACHE)
    assert learning_table.main(["--results", str(learning), "--readme", str(tmp_path / "none.md"),
                                "--bootstrap-reps", str(reps), "--no-cache"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" reused")  # no folder named
    assert not (learning / learning_table.CACHE).exists()
    assert {f: (learning / f).read_text() for f in written} == written


def test_the_bootstrap_cache_gives_what_a_fresh_computation_gives(tmp_path):
    """Kept by a hash of every input: other returns, resamples or pairs are computed anew; a file
    that does not parse as a result is computed again and rewritten."""
    from matwm_fast import protocol

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))  # (S, E)
    boot = learning_table.Bootstrap(40, tmp_path / "cache")
    fresh = learning_table.Bootstrap(40)
    assert boot.interval(x) == fresh.interval(x) == protocol.interval_estimates(x, 40)
    assert boot.improvement(x, y) == fresh.improvement(x, y) == protocol.improvement(x, y, 40)
    assert (boot.computed, boot.reused) == (2, 0)
    assert boot.interval(x) == fresh.interval(x) and boot.improvement(x, y) == fresh.improvement(x, y)
    assert (boot.computed, boot.reused) == (2, 2)
    boot.interval(x + 1e-9), boot.improvement(y, x), learning_table.Bootstrap(41, boot.folder).interval(x)
    assert boot.computed == 4 and len(list(boot.folder.glob("*.json"))) == 5
    for f in boot.folder.glob("*.json"):
        f.write_text("[1, 2")  # torn
    assert boot.interval(x) == fresh.interval(x) and boot.computed == 5


def test_the_cache_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_table.py"), "--results", str(tmp_path),
                           "--cache", str(tmp_path / "file")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"--cache {tmp_path / 'file'}: not a directory" in proc.stderr


def test_a_cache_and_no_cache_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        learning_table.main(["--results", str(tmp_path), "--readme", str(tmp_path / "log.md"),
                             "--cache", str(tmp_path), "--no-cache"])
    assert e.value.code == 2 and "argument --no-cache: not allowed with argument --cache" in capsys.readouterr().err


def test_table_refuses_a_missing_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_table.py"), "--results",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--results" in proc.stderr and "no such directory" in proc.stderr


def test_learning_log_shows_the_committed_table():
    """The learning log's table is summary.md's, as last written (rebuild both together)."""
    summary = (ROOT / "bench" / "results" / "learning" / "summary.md").read_text()
    log = (ROOT / "bench" / "results" / "learning" / "README.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("|")]
    assert rows
    missing = [r for r in rows if r not in log]
    assert not missing, f"the learning log lacks these rows of bench/results/learning/summary.md: {missing[:3]}"


def test_the_random_row_taken_from_a_sweep_has_no_world_model_of_its_own(tmp_path):
    """simple_tag's random row comes from the sweep's own matchups: the MATWM row's world-model
    probe must not come with it."""
    learning = tmp_path / "learning"
    write(learning / "report" / "cpu" / "simple_tag" / "results.json", {"envs": {"simple_tag": {
        "seeds": [100], "steps": [2000], "curves": {"all": {"2000": stats([1.0])}},
        "matchups": {"trained": {"all": stats([5.0])}, "random": {"all": stats([2.0])}},
        "world_model_probe": {"final": {"reward_r2": stats([0.1]), "effect_corr": stats([0.2])}}}}})
    rows = {r["label"]: r for r in learning_rows.rows_for("simple_tag", learning)}
    assert rows["MATWM, `cpu` preset"]["probe"]["reward_r2"]["values"] == [0.1]
    assert rows["uniformly random"]["probe"] is None


def test_two_teams_the_method_is_compared_with_a_tuned_baseline_team_by_team(tmp_path):
    """simple_tag: MATWM's reporting sweep and a tuned model-free row (model_free.py's per-seed
    records) on the same reporting episodes; P(MATWM > row) is paired per team and matchup — here
    MATWM's adversaries beat the baseline's in every episode and its prey loses every episode."""
    from matwm_fast import protocol
    from matwm_fast.config import EnvConfig
    from matwm_fast.env import env_spec
    from matwm_fast.play import report

    learning, reps, episodes = tmp_path / "learning", 100, 6
    seeds = [100, 101, 102, 103, 104]
    spec = env_spec(EnvConfig(scenario="simple_tag"))
    adv = [i for i, a in enumerate(spec.agents) if a.startswith("adversary")]  # (3,) of N = 4
    rng = np.random.default_rng(1)
    base = {m: {s: rng.normal(0, 5, (episodes, len(spec.agents))) for s in seeds}  # (E, N) per seed
            for m in ("greedy", "sampled", "random", "adversary_vs_random", "agent_vs_random")}
    shift = np.where(np.isin(np.arange(len(spec.agents)), adv), 30.0, -30.0)  # (N,) adversaries up, prey down
    for s in seeds:
        write(learning / "report" / "baselines" / "simple_tag" / "mappo" / f"seed{s}_step20000.json",
              {"seed": s, "configs_tried": 30, "evaluation": protocol.episode_block("report", s, episodes),
               "results": {m: report(r[s], spec) for m, r in base.items()}})
        # the scripted pair on the same episodes (heuristics.py's names): against random opponents as the
        # baseline; both teams scripted, every agent 100 better, so the method is below it there
        write(learning / "report" / "baselines" / "simple_tag" / "heuristics" / f"seed{s}.json",
              {"seed": s, "evaluation": protocol.episode_block("report", s, episodes),
               "results": {{"greedy": "chase_flee", "adversary_vs_random": "chase_flee_adversary_vs_random",
                            "agent_vs_random": "chase_flee_agent_vs_random", "random": "random"}[m]:
                           report(r[s] + 100.0 * (m == "greedy"), spec) for m, r in base.items() if m != "sampled"}})
    sweep_names = {"greedy": "trained", "sampled": "trained_sampled"}
    mine = {sweep_names.get(m, m): {s: report(r[s] + shift, spec) for s in seeds} for m, r in base.items()}
    returns = {m: {t: {str(s): protocol.column(res[s]["returns"], [spec.agents.index(a) for a in v["members"]]).tolist()
                       for s in seeds} for t, v in res[seeds[0]]["teams"].items()} for m, res in mine.items()}
    write(learning / "report" / "cpu" / "simple_tag" / "results.json", {"envs": {"simple_tag": {
        "seeds": seeds, "steps": [20000], "curves": {},
        "matchups": {m: {t: stats([float(np.mean(v[str(s)])) for s in seeds]) for t, v in by.items()}
                     for m, by in returns.items()},
        "protocol": {**protocol.describe("report"), "configs_tried": 30,
                     "episode_seeds": {str(s): protocol.first_episode("report", s, episodes) for s in seeds}},
        "episode_returns": returns}}})
    assert learning_table.main(["--results", str(learning), "--readme", str(tmp_path / "none.md"),
                                "--bootstrap-reps", str(reps)]) == 0
    md = (learning / "summary.md").read_text()
    vs = md.split("P(MATWM, `cpu` preset at 20,000 env steps > row)")[1]
    header = next(line for line in vs.splitlines() if line.startswith("| row |"))
    assert header == ("| row | env steps | team adversary, all trained (greedy) | team agent, all trained (greedy) | "
                      "team adversary trained, others random | team agent trained, others random |")
    one, zero = "1.00 [1.00, 1.00]", "0.00 [0.00, 0.00]"
    for label, budget, both in (("MAPPO (BenchMARL)", "20,000", (one, zero)), ("chase / flee (scripted)", "no training", (zero, zero))):
        row = next(line for line in vs.splitlines() if line.startswith(f"| {label} |"))
        assert row == f"| {label} | {budget} | {both[0]} | {both[1]} | {one} | {zero} |"
    mappo = next(line for line in md.splitlines() if line.startswith("| MAPPO (BenchMARL) | 20,000 | 5 × 6 | 30 |"))
    assert mappo.count("IQM") == 4
