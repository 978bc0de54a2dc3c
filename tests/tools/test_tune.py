"""bench/baselines/tune.py: the model-free baselines' random search on tuning seeds, and the
chosen configuration on reporting seeds.

The draw, the objective and the refusals run everywhere; the end-to-end search only where
BenchMARL is installed (``pip install -e '.[baselines]'``; CI does not install it), on budgets of
200 env steps: the plumbing, not the tuning's outcome.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "baselines" / "tune.py"
HAS_LIBRARY = all(importlib.util.find_spec(m) is not None for m in ("benchmarl", "torchrl", "tensordict"))
needs_library = pytest.mark.skipif(not HAS_LIBRARY, reason="BenchMARL is not installed (pip install -e '.[baselines]')")
sys.path.insert(0, str(SCRIPT.parent))
import tune  # noqa: E402


def script(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


# ----------------------------------------------------------------------------- the draw
# BenchMARL 1.5.2's defaults for PPO's dimensions (tune.field_defaults reads them from BenchMARL)
PPO_DEFAULTS = {"gamma": 0.99, "lr": 5e-5, "frames-per-batch": 5000, "minibatch-iters": 45}


def test_the_draw_is_the_defaults_then_distinct_grid_points_that_fit_the_budget():
    space = tune.parse_space([], "mappo")
    configs = tune.draw(space, 20_000, 30, 0, PPO_DEFAULTS)
    assert len(configs) == 30 and configs[0] == {"frames-per-batch": 5000}  # BenchMARL's defaults first
    keys = [tuple(sorted(c.items())) for c in configs]
    assert len(set(keys)) == 30  # no configuration twice
    for c in configs[1:]:
        assert set(c) == set(space) and all(c[k] in space[k] for k in c)
        assert 20_000 % c["frames-per-batch"] == 0
        assert c != PPO_DEFAULTS  # the defaults' run is not drawn again
    assert configs == tune.draw(space, 20_000, 30, 0, PPO_DEFAULTS)  # seeded: the same draw again
    assert configs != tune.draw(space, 20_000, 30, 1, PPO_DEFAULTS)
    # the whole grid: 81 points less the defaults' own
    assert len(tune.draw(space, 20_000, 81, 0, PPO_DEFAULTS)) == 81
    # a budget that 5,000 does not divide: the defaults take the largest batch of the grid that does
    assert tune.draw(space, 4000, 1, 0, PPO_DEFAULTS) == [{"frames-per-batch": 2000}]
    assert all(4000 % c["frames-per-batch"] == 0 for c in tune.draw(space, 4000, 20, 0, PPO_DEFAULTS))


def test_the_space_is_the_familys_and_can_be_changed():
    assert "minibatch-iters" in tune.parse_space([], "ippo")
    assert "off_policy_n_optimizer_steps" in tune.parse_space([], "qmix")
    space = tune.parse_space(["gamma=0.8,0.9", "algorithm.mixing_embed_dim=16,64", "loss_function=l2"], "qmix")
    assert space["gamma"] == [0.8, 0.9] and space["algorithm.mixing_embed_dim"] == [16, 64]
    assert space["loss_function"] == ["l2"]
    assert tune.flags({"gamma": 0.9, "algorithm.mixing_embed_dim": 16, "frames-per-batch": 1000}) == [
        "--set", "algorithm.mixing_embed_dim=16", "--frames-per-batch", "1000", "--gamma", "0.9"]


def test_a_draw_larger_than_the_grid_is_refused():
    space = tune.parse_space(["gamma=0.9,0.99", "lr=3e-4", "frames-per-batch=1000", "minibatch-iters=5"], "mappo")
    assert len(tune.draw(space, 20_000, 3, 0, PPO_DEFAULTS)) == 3
    with pytest.raises(ValueError, match="--configs 4: the grid holds 2 configurations besides the defaults"):
        tune.draw(space, 20_000, 4, 0, PPO_DEFAULTS)


def record(greedy: dict, random: dict, vs_random: dict | None = None) -> dict:
    """A model_free.py result with the team means given (teams: name → mean)."""
    def block(teams):
        return {"all": {"mean": sum(teams.values()) / len(teams)}, "teams": {t: {"mean": v} for t, v in teams.items()}}

    res = {"greedy": block(greedy), "random": block(random)}
    for t, teams in (vs_random or {}).items():
        res[f"{t}_vs_random"] = block(teams)
    return {"results": res}


def test_the_objective():
    # one team: the greedy policy's mean return
    assert tune.score(record({"agent": -20.0}, {"agent": -27.0})) == -20.0
    # two teams: the mean of each team's gain over random, each playing against random opponents
    r = record({"adversary": 5.0, "agent": -9.0}, {"adversary": 1.0, "agent": -2.0},
               {"adversary": {"adversary": 9.0, "agent": -12.0}, "agent": {"adversary": 0.5, "agent": -1.0}})
    assert tune.score(r) == pytest.approx(((9.0 - 1.0) + (-1.0 - -2.0)) / 2)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("args, says", [
    (["run", "--scenario", "simple_nope", "--algo", "mappo", "--seeds", "0"], "--scenario 'simple_nope': unknown scenario"),
    (["run", "--scenario", "simple_tag", "--algo", "dqn", "--seeds", "0"], "--algo 'dqn': unknown algorithm; allowed: mappo"),
    (["run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "100"],
     "--split tuning: seed 100 not allowed (it is a report seed)"),
    (["report", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "3"],
     "--split report: seed 3 not allowed (it is a tuning seed)"),
    (["run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "0", "--configs", "0"], "--configs 0: need at least 1"),
    (["run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "0", "--jobs", "0"], "--jobs 0: need at least 1"),
    (["run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "0", "--budget", "0"], "--budget 0: need at least 1"),
    (["run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "0", "--space", "gamma"],
     "--space 'gamma': expected NAME=V1,V2,..."),
    (["run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "0", "--budget", "1500"],
     "--budget 1500: no frames per batch of the grid ([1000, 2000, 5000]) divides it, nor the default 5000"),
    (["report", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "100", "--results", "none"],
     "none/simple_tag/mappo/tuning.json: no tuning here"),
])
def test_bad_arguments_are_refused(tmp_path, args, says):
    proc = script(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: " in proc.stderr and says in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- end to end (library)
TINY = ["--budget", "200", "--episodes", "2", "--space", "frames-per-batch=100", "--space", "minibatch-size=50",
        "--space", "minibatch-iters=1", "--space", "gamma=0.9,0.99", "--space", "lr=3e-4"]


@needs_library
def test_a_search_then_its_report(tmp_path):
    proc = script("run", "--scenario", "simple_spread", "--algo", "mappo", "--configs", "3", "--seeds", "0", "1",
                  "--jobs", "2", "--results", "res", "--out", "runs", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tuning = json.loads((tmp_path / "res" / "simple_spread" / "mappo" / "tuning.json").read_text())
    assert tuning["configs_tried"] == 3 and len(tuning["configs"]) == 3 and tuning["split"] == "tuning"
    for row in tuning["configs"]:
        for s in (0, 1):
            res = json.loads((tmp_path / "res" / "simple_spread" / "mappo" / f"c{row['index']}" / "simple_spread"
                              / "mappo" / f"seed{s}_step200.json").read_text())
            assert res["evaluation"]["split"] == "tuning" and res["evaluation"]["episodes"] == 2
            assert row["scores"][str(s)] == tune.score(res)
    best = max(tuning["configs"], key=lambda r: r["mean"])
    assert tuning["best"] == best["index"]
    # resumes: nothing left to train
    again = script("run", "--scenario", "simple_spread", "--algo", "mappo", "--configs", "3", "--seeds", "0", "1",
                   "--results", "res", "--out", "runs", *TINY, cwd=tmp_path)
    assert again.returncode == 0 and "0 trainings to run" in again.stdout, again.stderr[-2000:]
    # report: the best configuration on a reporting seed, 50 episodes, the count of configurations beside it
    rep = script("report", "--scenario", "simple_spread", "--algo", "mappo", "--seeds", "100", "--results", "res",
                 "--out", "runs", "--report-results", "rep", cwd=tmp_path)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    res = json.loads((tmp_path / "rep" / "simple_spread" / "mappo" / "seed100_step200.json").read_text())
    assert res["configs_tried"] == 3 and res["evaluation"]["split"] == "report" and res["evaluation"]["episodes"] == 50
    field = {"frames-per-batch": "on_policy_collected_frames_per_batch", "minibatch-size": "on_policy_minibatch_size",
             "minibatch-iters": "on_policy_n_minibatch_iters", "gamma": "gamma", "lr": "lr"}
    assert res["settings"]["tuned"] == {field[k]: v for k, v in best["config"].items()}
    # the report resumes too: its seed is not trained again
    again = script("report", "--scenario", "simple_spread", "--algo", "mappo", "--seeds", "100", "--results", "res",
                   "--out", "runs", "--report-results", "rep", cwd=tmp_path)
    assert again.returncode == 0 and "0 trainings to run" in again.stdout, again.stderr[-2000:]


@needs_library
def test_the_defaults_are_benchmarls(tmp_path):
    """The grid point that repeats the defaults' run is found from BenchMARL's own defaults."""
    import model_free

    space = tune.parse_space([], "mappo")
    assert tune.field_defaults(model_free.require_library(), "mappo", space, 20_000) == PPO_DEFAULTS
    proc = script("run", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "0", "--configs", "82",
                  "--results", "res", cwd=tmp_path)
    assert proc.returncode == 2 and "--configs 82: the grid holds 80 configurations besides the defaults" in proc.stderr


@needs_library
def test_a_bad_field_in_the_space_is_refused_before_any_training(tmp_path):
    proc = script("run", "--scenario", "simple_spread", "--algo", "mappo", "--configs", "2", "--seeds", "0",
                  "--results", "res", "--out", "runs", *TINY, "--space", "nope=1,2", cwd=tmp_path)
    assert proc.returncode == 2 and "error: --set nope: not a field of BenchMARL's experiment config" in proc.stderr
    assert not (tmp_path / "runs").exists() and not list((tmp_path).glob("res/**/*.json"))


def test_a_tuning_file_that_is_not_one_is_refused(tmp_path):
    d = tmp_path / "res" / "simple_tag" / "mappo"
    d.mkdir(parents=True)
    for text in ("{not json", json.dumps({"configs": []})):
        (d / "tuning.json").write_text(text)
        proc = script("report", "--scenario", "simple_tag", "--algo", "mappo", "--seeds", "100", "--results", "res",
                      cwd=tmp_path)
        assert proc.returncode == 2 and "tuning.json: not a tuning written by `tune.py run`" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- the committed searches
COMMITTED = ROOT / "bench" / "results" / "learning"


def test_a_record_is_read_as_written_or_gzipped(tmp_path):
    import gzip

    rec = {"results": {"greedy": {"teams": {"agent": {}}, "all": {"mean": -21.5}}}}
    plain = tmp_path / "a" / "simple_spread" / "mappo" / "seed0_step200.json"
    zipped = tmp_path / "b" / "simple_spread" / "mappo" / "seed0_step200.json.gz"
    for p in (plain, zipped):
        p.parent.mkdir(parents=True)
    plain.write_text(json.dumps(rec))
    with gzip.open(zipped, "wt") as f:
        json.dump(rec, f)
    for base, want in ((tmp_path / "a", plain), (tmp_path / "b", zipped)):
        path = tune.result_file(base, "simple_spread", "mappo", 0, 200)
        assert path == want and tune.score(tune.load_result(path)) == -21.5
    assert tune.result_file(tmp_path / "a", "simple_spread", "mappo", 1, 200) is None


@pytest.mark.parametrize("tuning", sorted((COMMITTED / "tuning" / "baselines").glob("*/*/tuning.json")),
                         ids=lambda p: f"{p.parent.parent.name}-{p.parent.name}")
def test_every_committed_search_reproduces_from_its_records(tuning):
    """Each committed tuning.json: every score recomputed from its gzipped per-run records, the best
    the highest mean, and the reporting runs made from it carry its count of configurations."""
    t = json.loads(tuning.read_text())
    base = tuning.parent
    assert t["configs_tried"] == len(t["configs"])
    for row in t["configs"]:
        for s in t["seeds"]:
            path = tune.result_file(base / f"c{row['index']}", t["scenario"], t["algorithm"], s, t["budget"])
            assert path is not None, f"c{row['index']} seed {s}: no record"
            assert tune.score(tune.load_result(path)) == pytest.approx(row["scores"][str(s)], abs=1e-12)
    assert t["best"] == max(t["configs"], key=lambda r: r["mean"])["index"]
    reports = sorted((COMMITTED / "report" / "baselines" / t["scenario"] / t["algorithm"]).glob("seed*_step*.json"))
    assert len(reports) >= 5
    for r in map(lambda p: json.loads(p.read_text()), reports):
        assert r["configs_tried"] == t["configs_tried"] and r["evaluation"]["split"] == "report"


def fake_library(configs: list[dict]):
    """What :func:`tune.pending` asks of BenchMARL (the settable fields' defaults), for configurations
    whose --set fields are experiment fields of the values' types."""
    import types

    exp = {k: type(v)(0) for c in configs for k, v in c.items() if k not in tune.FLAGS}
    return types.SimpleNamespace(settable=lambda algo: {"experiment": exp, "algorithm": {}})


@pytest.mark.parametrize("tuning", sorted((COMMITTED / "tuning" / "baselines").glob("*/*/tuning.json")),
                         ids=lambda p: f"{p.parent.parent.name}-{p.parent.name}")
def test_every_committed_search_and_report_resumes_with_nothing_to_train(tuning):
    """Each committed record is recognised as the training its command would make: the search and
    the report, run again over the committed files, would train nothing."""
    t = tune.read_tuning(tuning)
    configs = [r["config"] for r in sorted(t["configs"], key=lambda r: r["index"])]
    bm = fake_library(configs)
    jobs = tune.search_jobs(t["scenario"], t["algorithm"], configs, t["seeds"], t["budget"], t["episodes"],
                            tuning.parent, "runs")
    assert len(jobs) == len(configs) * len(t["seeds"]) and tune.pending(jobs, bm) == []
    report = tune.report_jobs(t["scenario"], t["algorithm"], t, [100, 101, 102, 103, 104], [t["budget"]],
                              str(COMMITTED / "report" / "baselines"), "runs")
    assert tune.pending(report, bm) == []


def test_a_record_of_other_settings_is_refused_and_a_missing_one_trains(tmp_path):
    tuning = COMMITTED / "tuning" / "baselines" / "simple_spread" / "mappo" / "tuning.json"
    t = tune.read_tuning(tuning)
    bm = fake_library([t["chosen"]["config"]])
    source = COMMITTED / "report" / "baselines" / "simple_spread" / "mappo" / "seed100_step20000.json"
    copy = tmp_path / "simple_spread" / "mappo" / source.name
    copy.parent.mkdir(parents=True)
    record = json.loads(source.read_text())

    def jobs(tried=None):
        return tune.report_jobs("simple_spread", "mappo", {**t, "configs_tried": tried or t["configs_tried"]}, [100],
                                [t["budget"]], str(tmp_path), "runs")

    assert tune.pending(jobs(), bm) == jobs()  # no record: it trains
    copy.write_text(json.dumps(record))
    assert tune.pending(jobs(), bm) == []  # its record: done
    with pytest.raises(ValueError, match=r"seed100_step20000.json: a record of other settings.*configs_tried 30 "
                                         r"\(this run: 31\)"):
        tune.pending(jobs(tried=31), bm)
    other = {**record["settings"]["tuned"], "gamma": 0.5}
    copy.write_text(json.dumps({**record, "settings": {**record["settings"], "tuned": other}}))
    with pytest.raises(ValueError, match="tuned"):
        tune.pending(jobs(), bm)
    assert json.loads(copy.read_text())["settings"]["tuned"]["gamma"] == 0.5  # refused, not overwritten
    for text in ("{torn", "[1, 2]"):
        copy.write_text(text)
        with pytest.raises(ValueError, match="seed100_step20000.json: not a record written by model_free.py"):
            tune.pending(jobs(), bm)
