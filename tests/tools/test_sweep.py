"""The sweep end to end: two seeds trained in parallel subprocesses, the table and the plot.

This checks the plumbing (runs, evaluations, matchups, aggregation, outputs), not that the agent
learns: the smoke preset trains for a few dozen steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
STEPS, EVAL_EVERY, EPISODES, MAX_CYCLES = 60, 20, 2, 10  # smoke warm-up is 40 steps: evals at 40 and 60


def sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.sweep", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_tiny_sweep_writes_table_and_plot(tmp_path, capsys):
    out, res = tmp_path / "runs", tmp_path / "results"
    common = ["--env", "simple_tag", "--seeds", "0", "1", "--preset", "smoke", "--steps", str(STEPS),
              "--eval-every", str(EVAL_EVERY), "--eval-episodes", str(EPISODES), "--out", str(out),
              "--results", str(res)]
    sweep(tmp_path, *common, "--jobs", "2", "--", "--max-cycles", str(MAX_CYCLES))
    for seed in (0, 1):
        assert (out / "simple_tag" / f"seed{seed}" / "metrics.jsonl").exists()
        assert (out / "simple_tag" / f"seed{seed}" / "matchups.json").exists()
    r = json.loads((res / "results.json").read_text())["envs"]["simple_tag"]
    assert r["seeds"] == [0, 1]
    assert r["steps"] == [40, 60]
    assert set(r["curves"]) == {"all", "adversary", "agent"}  # competitive: per team too
    final = r["curves"]["all"]["60"]
    assert final["n"] == 2 and final["min"] <= final["median"] <= final["max"]
    assert {"trained", "trained_sampled", "random", "adversary_vs_random", "agent_vs_random"} <= set(r["matchups"])
    assert r["matchups"]["random"]["adversary"]["n"] == 2
    md = (res / "results.md").read_text()
    assert "| 60 | 2 |" in md and "adversary_vs_random" in md
    png = res / "learning_simple_tag.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerunning does not retrain finished runs; --aggregate-only rebuilds the outputs from the run dirs.
    # In-process (no torch import per call): the runs are done, only aggregation remains.
    from matwm_fast.tools import sweep as sw

    png.unlink()
    assert sw.main([*common, "--threads", "1"]) == 0
    assert "not retrained" in capsys.readouterr().out and png.exists()
    png.unlink()
    assert sw.main([*common, "--threads", "1", "--aggregate-only"]) == 0
    assert png.exists()
