"""The sweep end to end: two seeds trained in parallel subprocesses, the table and the plot; runs
trained with other settings refused, the table described from the runs' own configs, one sweep
at a time per output directory.

This checks the plumbing (runs, evaluations, matchups, aggregation, outputs), not that the agent
learns: the smoke preset trains for a few dozen steps.  The launchers themselves (local, Ray) are
tested in test_launch.py.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from matwm_fast import checkpoint as ck
from matwm_fast import protocol

ROOT = Path(__file__).resolve().parents[2]  # the repository
STEPS, EVAL_EVERY, EPISODES, MAX_CYCLES = 60, 20, 2, 10  # smoke warm-up is 40 steps: evals at 40 and 60
REPS = 100  # bootstrap resamples: the plumbing, not the statistics (tests/test_protocol.py)


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.sweep", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_tiny_sweep_writes_table_and_plot(tmp_path, capsys, monkeypatch):
    out, res = tmp_path / "runs", tmp_path / "results"
    common = ["--env", "simple_tag", "--seeds", "0", "1", "--preset", "smoke", "--steps", str(STEPS),
              "--eval-every", str(EVAL_EVERY), "--eval-episodes", str(EPISODES), "--out", str(out),
              "--results", str(res), "--split", "tuning", "--bootstrap-reps", str(REPS)]
    sweep(tmp_path, *common, "--configs-tried", "3", "--jobs", "2", "--", "--max-cycles", str(MAX_CYCLES))
    for seed in (0, 1):
        assert (out / "simple_tag" / f"seed{seed}" / "metrics.jsonl").exists()
        assert (out / "simple_tag" / f"seed{seed}" / "matchups.json").exists()
    r = json.loads((res / "results.json").read_text())["envs"]["simple_tag"]
    # the protocol: the tuning split's episodes (seed s: 20,000 + s·E + e), every episode's return kept,
    # IQM and mean with intervals, P(improvement) over random, and the configurations tried
    assert r["protocol"]["split"] == "tuning" and r["protocol"]["configs_tried"] == 3
    assert r["protocol"]["episode_seeds"] == {"0": 20_000, "1": 20_000 + EPISODES}
    m = json.loads((out / "simple_tag" / "seed1" / "matchups.json").read_text())
    assert m["key"]["split"] == "tuning" and len(m["results"]["trained"]["returns"]) == EPISODES
    trained = r["episode_returns"]["trained"]["all"]
    assert sorted(trained) == ["0", "1"] and all(len(v) == EPISODES for v in trained.values())
    assert trained["1"] == pytest.approx(np.mean(m["results"]["trained"]["returns"], axis=1).tolist())
    agg = r["aggregates"]["trained"]["all"]
    assert agg["mean"] == pytest.approx(np.mean(list(trained.values())))
    assert agg["mean_ci"][0] <= agg["mean"] <= agg["mean_ci"][1] and (agg["seeds"], agg["episodes"]) == (2, EPISODES)
    assert set(r["improvement"]["trained > random"]) == {"all", "adversary", "agent"}
    assert set(r["improvement"]["agent_vs_random > random"]) == {"agent"}
    assert r["seeds"] == [0, 1]
    assert r["steps"] == [40, 60]
    assert set(r["curves"]) == {"all", "adversary", "agent"}  # competitive: per team too
    final = r["curves"]["all"]["60"]
    assert final["n"] == 2 and final["min"] <= final["median"] <= final["max"]
    assert {"trained", "trained_sampled", "random", "adversary_vs_random", "agent_vs_random"} <= set(r["matchups"])
    assert r["matchups"]["random"]["adversary"]["n"] == 2
    # the world model on held-out layouts, as each run's training-time evaluations logged it
    wp = r["world_model_probe"]
    assert sorted(wp["seeds"]) == ["0", "1"] and wp["final"]["reward_r2"]["n"] == 2
    logged = [json.loads(x) for x in (out / "simple_tag" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    logged = {row["env_step"]: row["eval_wm_reward_r2"] for row in logged if "eval_wm_reward_r2" in row}
    assert wp["seeds"]["1"]["reward_r2"]["curve"] == {str(k): pytest.approx(v) for k, v in logged.items()}
    assert wp["seeds"]["1"]["reward_r2"]["final"] == pytest.approx(logged[60])
    md = (res / "results.md").read_text()
    assert "| 60 | 2 |" in md and "adversary_vs_random" in md
    assert "The world model on held-out layouts" in md and f"→ {logged[60]:.2f} |" in md
    assert "split `tuning`" in md and "**Tuning episodes**" in md and "before this one: 3." in md
    assert "| trained > random |" in md
    png = res / "learning_simple_tag.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerunning does not retrain finished runs; --aggregate-only rebuilds the outputs from the run dirs.
    # In-process (no torch import per call): the runs are done, only aggregation remains.
    from matwm_fast.tools import sweep as sw

    png.unlink()
    assert sw.main([*common, "--threads", "1", "--", "--max-cycles", str(MAX_CYCLES)]) == 0
    assert "not retrained" in capsys.readouterr().out and png.exists()
    png.unlink()
    assert sw.main([*common, "--threads", "1", "--aggregate-only"]) == 0
    assert png.exists()

    # runs trained with other settings than the sweep's are refused before anything starts, saying how to go on
    seed0 = out / "simple_tag" / "seed0"
    before = (seed0 / "metrics.jsonl").read_bytes()
    for argv, diff in [(common, "env.max_cycles: run 10, sweep 25"),
                       ([*common, "--preset", "cpu", "--", "--max-cycles", str(MAX_CYCLES)], "preset: run 'smoke', sweep 'cpu'")]:
        with pytest.raises(SystemExit) as e:
            sw.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: {seed0} holds a run trained with other settings than this sweep's (" in err
        assert diff in err and "Sweep into another --out, or remove that run (rm -r " in err
    assert (seed0 / "metrics.jsonl").read_bytes() == before

    # the table describes what the runs' config.json say, not this command line (aggregation only:
    # --preset cpu and --eval-episodes 7 are not what the runs were trained with)
    assert sw.main([*common, "--aggregate-only", "--preset", "cpu", "--eval-episodes", "7",
                    "--baseline-episodes", str(EPISODES)]) == 0
    md = (res / "results.md").read_text()
    assert ("Preset `smoke`, 60 env steps per run, episodes of 10 steps; greedy evaluation every 20 env steps on "
            "2 episodes.") in md
    assert "cpu" not in md and "Command" not in md

    # the report split: its seeds only, its minimums, its episodes. The plumbing on the runs above copied to
    # seeds 100 and 101 (aggregation only, so no new training), with the protocol's minimums lowered to fit
    rep = tmp_path / "report"
    for s, t in ((0, 100), (1, 101)):
        shutil.copytree(out / "simple_tag" / f"seed{s}", rep / "simple_tag" / f"seed{t}",
                        ignore=shutil.ignore_patterns("matchups.json"))
    report = ["--env", "simple_tag", "--preset", "smoke", "--out", str(rep), "--split", "report", "--aggregate-only",
              "--bootstrap-reps", str(REPS), "--eval-episodes", str(EPISODES)]
    with pytest.raises(SystemExit) as e:
        sw.main([*report, "--seeds", "100", "101"])
    assert e.value.code == 2 and "--split report: 2 seeds given; a report result needs at least 5" in capsys.readouterr().err
    monkeypatch.setitem(protocol.SPLITS, "report", replace(protocol.SPLITS["report"], min_seeds=2, min_episodes=2))
    assert sw.main([*report, "--seeds", "100", "101", "--configs-tried", "30"]) == 0
    r = json.loads((rep / "results.json").read_text())["envs"]["simple_tag"]
    assert r["protocol"]["split"] == "report" and r["protocol"]["configs_tried"] == 30
    assert r["protocol"]["episode_seeds"] == {"100": 2_000_000, "101": 2_010_000}
    assert json.loads((rep / "simple_tag" / "seed101" / "matchups.json").read_text())["key"] == {
        "step": 60, "episodes": EPISODES, "seed": 2_010_000, "split": "report"}
    assert "**Reporting episodes**" in (rep / "results.md").read_text()

    # --aggregate-only over seeds that differ in more than the seed is refused: one median would mix them
    other = tmp_path / "mixed"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns(".sweep.lock"))
    cfg_file = other / "simple_tag" / "seed1" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["wm"]["lr"] = 0.5
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        sw.main([*common, "--out", str(other), "--aggregate-only"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{other / 'simple_tag' / 'seed1'} and {other / 'simple_tag' / 'seed0'} were trained" in err
    assert f"wm.lr: {other / 'simple_tag' / 'seed1'} 0.5, {other / 'simple_tag' / 'seed0'} 0.001" in err


def test_one_sweep_at_a_time_per_output_directory(tmp_path, capsys):
    from matwm_fast.tools import sweep as sw

    out = tmp_path / "runs"
    out.mkdir()
    fd = ck.lock_file(out / ".sweep.lock")  # a sweep training into OUT (this process stands in for it)
    try:
        with pytest.raises(SystemExit) as e:
            sw.main(["--env", "simple_tag", "--preset", "smoke", "--out", str(out), "--aggregate-only"])
    finally:
        ck.unlock_file(fd)
    assert e.value.code == 2
    assert (f"error: {out} is in use by sweep process {os.getpid()}; wait for it to finish, or sweep into another "
            "--out") in capsys.readouterr().err
    assert not (out / "results.md").exists()
    # free again: the sweep runs (nothing to aggregate yet: status 1, and the lock is released after)
    assert sw.main(["--env", "simple_tag", "--preset", "smoke", "--out", str(out), "--aggregate-only"]) == 1
    assert ck.lock_holder(out / ".sweep.lock") is None


def test_a_bad_flag_for_train_is_refused_once_before_anything_starts(tmp_path, capsys):
    from matwm_fast.tools import sweep as sw

    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        sw.main(["--env", "simple_tag", "--seeds", "0", "1", "--preset", "smoke", "--out", str(out), "--", "--wm.lrr", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --wm.lrr" in err and "did you mean --wm.lr" in err
    assert not out.exists()


def test_the_sweeps_evaluation_uses_one_thread_unless_told(tmp_path, monkeypatch):
    # two threads acting on N rows only spin-wait beside other trainings (--aggregate-only is run beside them)
    import torch

    from matwm_fast.tools import sweep as sw

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    out = tmp_path / "runs"
    base = ["--env", "simple_tag", "--preset", "smoke", "--out", str(out), "--aggregate-only"]
    assert sw.main(base) == 1  # nothing to aggregate yet
    assert sw.main([*base, "--threads", "3"]) == 1
    assert calls == [1, 3]


def test_a_damaged_checkpoint_counts_as_one(tmp_path):
    """One meaning of "the run has a checkpoint" (checkpoint.has_checkpoint) for launching and for
    aggregating: a pointer whose file is lost still counts, so the run is resumed or evaluated and
    the reader names what is missing — never started over, nor left out of the matchups unsaid."""
    from matwm_fast.tools import sweep as sw

    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"env_step": 60}) + "\n")
    assert not ck.has_checkpoint(d) and not sw.is_complete(d, 60)
    (d / "checkpoints" / "latest").write_text("step_000000060.pt")  # its file lost
    assert ck.has_checkpoint(d) and sw.is_complete(d, 60) and not sw.is_complete(d, 70)
    with pytest.raises(ck.CheckpointError, match="names step_000000060.pt, which is missing"):
        ck.resolve(d)


@pytest.mark.parametrize("args, says", [
    (["--split", "report", "--seeds", "100", "1", "2", "103", "104"],
     "--split report: seeds 1, 2 not allowed (they are tuning seeds); report runs use seeds 100–199 — seeds never "
     "used while tuning, e.g. --seeds 100 101 102 103 104"),
    (["--split", "report", "--seeds", "100", "101", "102", "103", "104", "--eval-episodes", "20"],
     "--split report: 20 episodes per seed; a report result needs at least 50"),
    (["--seeds", "0", "100"], "--split tuning: seed 100 not allowed (it is a report seed); tuning runs use seeds 0–99"),
    (["--configs-tried", "0"], "--configs-tried 0: must be at least 1"),
])
def test_the_protocol_is_checked_before_anything_starts(tmp_path, capsys, args, says):
    """A reporting sweep on a tuning seed exits 2 naming the seed and the allowed ones (and the
    other refusals of the protocol), before any run directory is made."""
    from matwm_fast.tools import sweep as sw

    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        sw.main(["--env", "simple_spread", "--preset", "smoke", "--out", str(out), *args])
    assert e.value.code == 2 and f"error: {says}" in capsys.readouterr().err
    assert not out.exists()


def test_the_world_model_probe_summary_takes_each_seeds_final_score_and_skips_runs_without_it():
    from matwm_fast.tools.sweep_results import probe_curve, probe_summary

    evals = {0: [{"env_step": 1000, "eval_return_mean": -20.0, "eval_wm_reward_r2": 0.1, "eval_wm_effect_corr": 0.2},
                 {"env_step": 2000, "eval_return_mean": -19.0, "eval_wm_reward_r2": 0.3, "eval_wm_effect_corr": 0.4}],
             1: [{"env_step": 1000, "eval_return_mean": -21.0, "eval_wm_reward_r2": -0.5, "eval_wm_effect_corr": 0.1}],
             2: [{"env_step": 1000, "eval_return_mean": -22.0}]}  # an image scenario, or a run from before the probe
    wp = probe_summary({s: probe_curve(rows) for s, rows in evals.items()})
    assert sorted(wp["seeds"]) == [0, 1]
    assert wp["seeds"][0]["reward_r2"] == {"curve": {1000: 0.1, 2000: 0.3}, "final": 0.3}
    assert wp["final"]["reward_r2"]["values"] == [0.3, -0.5] and wp["final"]["effect_corr"]["median"] == pytest.approx(0.25)
    assert probe_summary({2: probe_curve(evals[2])}) == {}
