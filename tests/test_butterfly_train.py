"""The Butterfly games end to end at the smoke preset (they need the image world model,
matwm_fast/vision.py): the real CLI trains Cooperative Pong on 64 × 64 uint8 frames, Pistonball
and KAZ train too, a run interrupted and resumed logs the same rows as one never interrupted (the
env restored by replaying its episode), the image path's graphed phases are capture-ready, and
``eval --video`` writes a GIF of the game beside the frames the agents see."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pettingzoo.butterfly.cooperative_pong_v6", reason="needs pip install 'matwm_fast[butterfly]'")
pytest.importorskip("pymunk", reason="needs pip install 'matwm_fast[butterfly]'")

from matwm_fast import checkpoint as ck  # noqa: E402
from matwm_fast import train  # noqa: E402
from matwm_fast.metrics import read_metrics  # noqa: E402

import support  # noqa: E402
from support import ROOT, subprocess_env  # noqa: E402

SMOKE = ["--preset", "smoke", "--scenario", "cooperative_pong", "--device", "cpu", "--log-every", "5"]
AGENTS = ["paddle_0", "paddle_1"]

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf_")} for r in rows]


def train_inprocess(run_dir: Path, *flags: str, **kw) -> int:
    return support.train_inprocess(SMOKE, run_dir, *flags, **kw)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """``python -m matwm_fast.train`` for real: 60 smoke steps of Cooperative Pong, evaluated at 60."""
    d = tmp_path_factory.mktemp("pong") / "run"
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.train", *SMOKE, "--steps", "60", "--eval-every", "60",
                           "--eval-episodes", "1", "--max-cycles", "100", "--run-dir", str(d)],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "agents ['paddle_0', 'paddle_1']" in proc.stdout and "env.scenario = cooperative_pong" in proc.stdout
    return d


def test_cli_trains_on_uint8_frames(cli_run):
    rows = read_metrics(cli_run)
    warm = [r for r in rows if r.get("warm") and "shared_wm_total_loss" in r]
    assert warm and all(np.isfinite(r["shared_wm_total_loss"]) for r in warm)
    last = warm[-1]
    # smoke: 4 sequences in all (2 per paddle); 6 imagined trajectories × 3 steps per paddle
    assert last["wm_sequences"] == 4 and last["wm_sequences_per_agent"] == 2 and last["imagined_steps"] == 2 * 6 * 3
    assert all(f"{a}_actor_loss" in last for a in AGENTS)
    evals = [r for r in rows if "eval_return_mean" in r]
    assert [r["env_step"] for r in evals] == [60]
    # the world-model probe on held-out random episodes (matwm_fast/wm_probe.py), frames as vectors
    assert {"eval_wm_reward_r2", "eval_paddle_0_wm_reward_r2", "eval_wm_effect_corr"} <= set(evals[0])
    state = ck.load(ck.resolve(cli_run))["trainer"]
    assert state["replay"]["obs"].dtype == torch.uint8 and state["replay"]["obs"].shape[2:] == (3, 64, 64)
    assert state["queues"]["obs"].dtype == torch.uint8 and state["obs"].dtype == torch.uint8
    assert set(state["env"]) == {"episode_seed", "actions", "seeds", "obs", "needs_reset"}  # data, not a game
    assert json.loads((cli_run / "config.json").read_text())["env"]["max_cycles"] == 100


@pytest.mark.parametrize("scenario,args,agents", [
    ("pistonball", ["--scenario-arg", "n_pistons=4", "--wm.batch-size", "4"], 4),
    ("knights_archers_zombies", [], 4),
])
def test_the_other_games_train_at_the_smoke_preset(tmp_path, scenario, args, agents):
    """Pistonball (4 pistons, a sequence each: the presets' 20 would need a longer warm-up) and KAZ: warm-up,
    then world-model and actor-critic updates on their frames."""
    d = tmp_path / "run"
    assert train.main(["--preset", "smoke", "--scenario", scenario, *args, "--device", "cpu", "--steps", "45",
                       "--log-every", "5", "--run-dir", str(d)]) == 0
    rows = read_metrics(d)
    warm = [r for r in rows if "shared_wm_total_loss" in r]
    assert [r["env_step"] for r in warm] == [40, 45] and all(np.isfinite(r["shared_wm_total_loss"]) for r in warm)
    assert warm[-1]["imagined_steps"] == agents * 6 * 3


def test_resume_is_exact(tmp_path, capsys):
    """Interrupted at 53 (mid log interval, mid-episode in an episode whose seed the env drew: 20-step
    episodes) and resumed: the rows of an uninterrupted run."""
    flags = ("--steps", "60", "--max-cycles", "20")
    base = tmp_path / "base"
    assert train_inprocess(base, *flags) == 0
    run = tmp_path / "run"
    assert train_inprocess(run, *flags, stop_at=53) == 128 + signal.SIGTERM
    env = ck.load(run / "checkpoints" / "step_000000053.pt")["trainer"]["env"]
    assert env["actions"].shape[0] > 0 and env["episode_seed"] != 0  # mid-episode, a drawn seed: replayed on resume
    assert train.main(["--resume", str(run), "--steps", "60"]) == 0
    assert "resumed from step 53" in capsys.readouterr().out
    rows, want = read_metrics(run), read_metrics(base)
    assert [r["env_step"] for r in rows] == [r["env_step"] for r in want]
    assert comparable(rows) == comparable(want)  # bit-exact


def test_eval_gif_shows_the_game_beside_the_agents_frames(cli_run, tmp_path):
    gif = tmp_path / "pong.gif"
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.eval", str(cli_run), "--episodes", "1", "--video", str(gif),
                           "--device", "cpu"], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "paddle_0" in proc.stdout and f"wrote {gif}" in proc.stdout
    import imageio.v2 as imageio

    frames = imageio.mimread(gif)
    # Pong's 280 × 480 screen scaled to 256 rows, a gap, and the two paddles' 64 × 64 frames at 2×
    assert frames[0].shape[:2] == (256, round(480 * 256 / 280) + 4 + 2 * 128 + 4)
    assert len({f.tobytes() for f in frames}) > 1


def test_image_phases_are_capture_ready():
    """The uint8 path inside the graphed phases (staged frames, the replay's uint8 gathers, the
    context queue) is capture-ready: traced on the CPU over episode ends and a full queue."""
    from dataclasses import replace

    from capture import CaptureCheck
    from matwm_fast.config import preset
    from matwm_fast.trainer import build

    c = preset("smoke", "cooperative_pong")
    cfg = replace(c, env=replace(c.env, max_cycles=5), train=replace(c.train, act_context=3, agent_every=2))
    tr = build(cfg, device="cpu", backend="graphs")
    assert tr.wm.image and tr.wm.obs_shape == tuple(tr.spec.obs_shape) == (3, 64, 64)
    while not tr.warm:
        tr.env_step()
    assert tr.inputs.obs.device.dtype == torch.uint8 and tr.replay.obs.dtype == torch.uint8
    with CaptureCheck(tr) as check:
        for _ in range(10):
            tr.train_step()
    check.assert_ready()
