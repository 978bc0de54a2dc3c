"""``python -m matwm_fast.eval``: returns per agent and team to stdout and JSON, reproducible from
its seed, a GIF of an episode, and clear refusals of bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from matwm_fast import eval as ev
from matwm_fast import train

from support import ROOT, subprocess_env  # noqa: E402
ENV = subprocess_env()
AGENTS = ["adversary_0", "adversary_1", "adversary_2", "agent_0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("evalrun") / "run"
    assert train.main(["--preset", "smoke", "--device", "cpu", "--steps", "50", "--run-dir", str(d)]) == 0
    return d


def test_eval_writes_returns_json_and_gif(run_dir, tmp_path):
    gif = tmp_path / "episode.gif"
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.eval", str(run_dir), "--episodes", "3",
                           "--video", str(gif), "--seed", "7", "--device", "cpu"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for who in [*AGENTS, "team adversary (mean of 3)", "team agent (mean of 1)", "all agents (mean)"]:
        assert who in proc.stdout
    res = json.loads((run_dir / "eval_step_50.json").read_text())
    assert res["env_step"] == 50 and res["policy"] == "greedy" and res["seed"] == 7 and res["episodes"] == 3
    returns = np.array(res["returns"])  # (E, N)
    assert returns.shape == (3, 4)
    assert list(res["agents"]) == AGENTS and set(res["teams"]) == {"adversary", "agent"}
    assert res["teams"]["adversary"]["members"] == AGENTS[:3]
    for i, a in enumerate(AGENTS):
        assert res["agents"][a]["mean"] == pytest.approx(returns[:, i].mean(), abs=1e-5)
        assert res["agents"][a]["std"] == pytest.approx(returns[:, i].std(), abs=1e-5)
    assert res["teams"]["adversary"]["mean"] == pytest.approx(returns[:, :3].mean(), abs=1e-5)
    assert res["all"]["mean"] == pytest.approx(returns.mean(), abs=1e-5)
    # the GIF: a real one, one frame per step of the 25-step episode plus the last state
    assert f"wrote {gif} (26 frames, 1 episode)" in proc.stdout
    data = gif.read_bytes()
    assert data[:6] in (b"GIF87a", b"GIF89a") and len(data) > 1000
    import imageio.v2 as imageio

    frames = imageio.mimread(gif)
    assert 2 <= len(frames) <= 26 and frames[0].shape[:2] == (700, 700)  # the writer merges repeated frames
    assert len({f.tobytes() for f in frames}) > 1  # the agents move


def test_eval_modes_and_reproducibility(run_dir, tmp_path, capsys):
    outs = {}
    for mode in ("sample", "random"):
        out = tmp_path / f"{mode}.json"
        for k in range(2):  # twice: the seed alone decides the result
            assert ev.main([str(run_dir), "--episodes", "2", f"--{mode}", "--seed", "3", "--out", str(out)]) == 0
            outs[mode, k] = json.loads(out.read_text())["returns"]
    assert outs["sample", 0] == outs["sample", 1] and outs["random", 0] == outs["random", 1]
    assert ev.main([str(run_dir / "checkpoints" / "step_000000050.pt"), "--episodes", "1", "--sample"]) == 0
    assert (run_dir / "eval_step_50_sample.json").exists()  # default name, next to the run
    assert "sample policy of" in capsys.readouterr().out


def test_eval_plays_the_protocols_episodes_of_the_runs_seed(run_dir, tmp_path, monkeypatch, capsys):
    """--split: the episodes of the run's training seed in that split (matwm_fast/protocol.py), the
    sweep's matchup episodes; a run whose seed is not the split's is refused, naming it."""
    from matwm_fast.play import play

    out = tmp_path / "tuning.json"
    assert ev.main([str(run_dir), "--split", "tuning", "--episodes", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["evaluation"] == {"split": "tuning", "episodes": 2, "seed": 20_000, "episode_seeds": [20_000, 20_001]}
    pol = ev.Policy(run_dir, "cpu")
    returns, _, _ = play(pol.wm, pol.ac, pol.cfg.env, pol.cfg.train.act_context, 2, 20_000, "cpu")
    np.testing.assert_allclose(np.array(res["returns"]), returns, atol=1e-5)
    monkeypatch.setattr(ev, "play", lambda *a, **k: pytest.fail("episodes were played"))
    for args, message in [(["--split", "report", "--episodes", "50"],
                           "--split report: seed 0 not allowed (it is a tuning seed); report runs use seeds 100–199"),
                          (["--split", "report", "--episodes", "5"], "--split report: 5 episodes per seed; a report "
                                                                     "result needs at least 50"),
                          (["--split", "tuning", "--seed", "3"], "argument --seed: not allowed with argument --split")]:
        with pytest.raises(SystemExit) as e:
            ev.main([str(run_dir), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_table_and_the_records_format_one_summary():
    """``eval``'s table, the flat ``eval_*`` summary and the JSON record: the same numbers."""
    from matwm_fast.env import EnvSpec
    from matwm_fast.metrics import summarise_returns
    from matwm_fast.play import report, summarise

    spec = EnvSpec(agents=("a_0", "a_1", "b_0"), obs_sizes=(2, 2, 2), action_counts=(2, 2, 2))
    returns = np.array([[1.0, 2.0, 6.0], [3.0, 0.0, 2.0]])  # (E, N)
    flat, record = summarise(returns, spec), report(returns, spec)
    assert flat["episodes"] == 2 and record["summary"] == flat and record["returns"] == returns.tolist()
    assert flat["a_1_return_mean"] == record["agents"]["a_1"]["mean"] == 1.0
    assert flat["team_a_return_mean"] == record["teams"]["a"]["mean"] == 1.5
    assert record["teams"]["a"]["members"] == ["a_0", "a_1"]
    assert flat["return_std"] == record["all"]["std"] == pytest.approx(2 / 3)
    lines = ev.table(summarise_returns(returns, spec.agents, spec.teams), spec).splitlines()
    assert [line.split() for line in lines[2:]] == [
        ["a_0", "2.000", "1.000"], ["a_1", "1.000", "1.000"], ["b_0", "4.000", "2.000"],
        ["team", "a", "(mean", "of", "2)", "1.500", "0.000"], ["team", "b", "(mean", "of", "1)", "4.000", "2.000"],
        ["all", "agents", "(mean)", "2.333", "0.667"]]


def test_eval_records_the_checkpoint_it_evaluated(run_dir, tmp_path, monkeypatch):
    """Training may write a newer checkpoint while eval plays: the result names the one played."""
    import shutil

    ckpts = run_dir / "checkpoints"
    real_play = ev.play

    def play_while_training_writes(*a, **k):
        shutil.copy(ckpts / "step_000000050.pt", ckpts / "step_000000060.pt")
        (ckpts / "latest").write_text("step_000000060.pt")
        return real_play(*a, **k)

    monkeypatch.setattr(ev, "play", play_while_training_writes)
    try:
        assert ev.main([str(run_dir), "--episodes", "1", "--out", str(tmp_path / "r.json")]) == 0
    finally:
        (ckpts / "latest").write_text("step_000000050.pt")
        (ckpts / "step_000000060.pt").unlink()
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["checkpoint"] == str(ckpts / "step_000000050.pt") and res["env_step"] == 50


def test_eval_runs_on_one_thread_unless_told(run_dir, tmp_path):
    """On a busy shared CPU torch's idle-waiting second thread stalls acting's small batches: eval
    defaults to one thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ev.main([str(run_dir), "--episodes", "1", "--device", "cpu", "--out", str(tmp_path / "a.json")]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert ev.main([str(run_dir), "--episodes", "1", "--device", "cpu", "--threads", "0",
                        "--out", str(tmp_path / "b.json")]) == 0
        assert torch.get_num_threads() == 2  # 0 leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device 'tpu': unknown device; valid: auto, cpu, cuda, cuda:N"),
    (["--fps", "0"], "--fps 0: need at least 1 frame per second"),
    (["--video-episodes", "0"], "--video-episodes 0: need at least 1"),
    (["--video", "x.avi"], "--video 'x.avi': the file name must end in .gif or .mp4"),
    (["--episodes", "0"], "--episodes 0: need at least 1"),
    (["--threads", "-1"], "--threads -1: need 0 (torch's default) or more"),
])
def test_eval_bad_arguments(run_dir, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        ev.main([str(run_dir), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_bad_output_is_refused_before_playing(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "play", lambda *a, **k: pytest.fail("episodes were played"))
    (tmp_path / "afile").write_text("x")
    for args, message in [(["--out", str(tmp_path)], f"--out {tmp_path}: is a directory; give a file name"),
                          (["--out", str(tmp_path / "afile" / "r.json")], f"--out {tmp_path / 'afile' / 'r.json'}: "
                           f"{tmp_path / 'afile'} is not a writable directory"),
                          (["--video", str(tmp_path / "afile" / "v.gif")], "is not a writable directory")]:
        with pytest.raises(SystemExit) as e:
            ev.main([str(run_dir), *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_eval_bad_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.eval", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'missing'} is neither a run directory nor a checkpoint file" in proc.stderr
