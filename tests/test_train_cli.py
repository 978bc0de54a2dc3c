"""End to end: the real CLI in a subprocess, its metrics, progress lines and the per-step budget
counters."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(tmp_path: Path, *args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.train", "--run-dir", str(run_dir), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return proc, rows


def check_budget_row(row: dict, agents: list[str], sequences: int, imagined: int) -> None:
    assert "shared_wm_total_loss" in row
    assert not [k for k in row if k.endswith("_wm_total_loss") and k != "shared_wm_total_loss"]  # never per agent
    for a in agents:
        assert f"{a}_actor_loss" in row and f"{a}_critic_loss" in row
    assert row["wm_sequences"] == sequences
    assert row["wm_sequences_per_agent"] == sequences // len(agents)
    assert row["imagined_steps"] == imagined


@pytest.mark.parametrize("scenario,agents", [
    ("simple_tag", ["adversary_0", "adversary_1", "adversary_2", "agent_0"]),
    ("simple_speaker_listener", ["speaker_0", "listener_0"]),
])
def test_smoke_cli(tmp_path, scenario, agents):
    proc, rows = train(tmp_path, "--preset", "smoke", "--scenario", scenario, "--wm.batch-size", "4")
    assert "device = cpu" in proc.stdout and "wm.batch_size = 4" in proc.stdout
    warm = [r for r in rows if r.get("warm") and "shared_wm_total_loss" in r]
    assert warm, rows
    # smoke: 4 sequences in total; 6 trajectories × 3 steps per agent
    check_budget_row(warm[-1], agents, sequences=4, imagined=len(agents) * 6 * 3)
    assert any("episode_return" in r for r in rows)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:  # the same rows, every key a column
        reader = csv.DictReader(f)
        assert [int(r["env_step"]) for r in reader] == [r["env_step"] for r in rows]
        assert set(reader.fieldnames) == {k for r in rows for k in r}
    # progress in a log (stderr is a pipe here): one plain line per logged row, no carriage returns
    progress = [ln for ln in proc.stderr.splitlines() if "env steps/s" in ln]
    assert "\r" not in proc.stderr and len(progress) == len(rows) and "imagined steps/s" in progress[-1]


def test_evaluation_rows_hold_the_world_models_held_out_scores(tmp_path):
    """--eval-every: each evaluation row holds the world model's reward R² (pooled and per agent)
    and action-effect correlation on held-out episodes; agents of 3 and 5 actions."""
    _, rows = train(tmp_path, "--preset", "smoke", "--scenario", "simple_speaker_listener", "--steps", "60",
                    "--eval-every", "20", "--eval-episodes", "2")
    evals = [r for r in rows if "eval_return_mean" in r]
    assert [r["env_step"] for r in evals] == [40, 60]
    for r in evals:
        for k in ("eval_wm_reward_r2", "eval_speaker_0_wm_reward_r2", "eval_listener_0_wm_reward_r2"):
            assert isinstance(r[k], float) and r[k] <= 1.0, (k, r[k])
        assert r["eval_wm_effect_corr"] is None or -1.0 <= r["eval_wm_effect_corr"] <= 1.0
        assert r["perf_eval_play_s"] > 0 and r["perf_eval_wm_probe_s"] > 0
    assert evals[0]["eval_wm_reward_r2"] != evals[1]["eval_wm_reward_r2"]  # the model of each step


@pytest.mark.slow
def test_paper_preset_budget_on_simple_tag(tmp_path):
    """One real update at the paper's sizes: 16 sequences (4 per agent) and 36,864 imagined steps."""
    _, rows = train(tmp_path, "--preset", "paper", "--replay.warmup", "512", "--steps", "512",
                    "--log-every", "512", "--checkpoint-every", "0", "--run.keep-checkpoints", "1")
    row = rows[-1]
    check_budget_row(row, ["adversary_0", "adversary_1", "adversary_2", "agent_0"], sequences=16,
                     imagined=36_864)
    assert row["imagined_steps_total"] == 36_864


def test_paper_config_json_records_the_sizes_that_ran(tmp_path):
    """config.json is the config that ran: the paper's imagination rule and per-agent split resolved
    (the preset leaves them to the rule), and the runtime chosen for this machine."""
    train(tmp_path, "--preset", "paper", "--steps", "2", "--log-every", "1", "--checkpoint-every", "0", timeout=900)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["ac"]["imag_batch"], cfg["ac"]["horizon"], cfg["wm"]["batch_per_agent"]) == (768, 12, 4)
    from matwm_fast.runtime import cpu_has_fast_bf16

    amp = "bf16" if cpu_has_fast_bf16() else "fp32"  # auto: native bf16 matmuls or not
    assert cfg["runtime"] == {"device": "cpu", "backend": "eager", "kernels": "ref", "amp": amp, "rollout_graph": "whole"}
    from matwm_fast.config import load_config, preset

    assert preset("paper").ac.imag_batch == 0 and load_config(cfg).ac.imag_batch == 768
