"""Resuming reproduces the uninterrupted run: in-process (checkpoint mid-interval) and for real
(SIGTERM / SIGINT to a ``python -m matwm_fast.train`` subprocess), and resume-time overrides are
applied and reported or refused — never dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matwm_fast import train
from matwm_fast.metrics import read_metrics

import support

ROOT = Path(__file__).resolve().parents[1]
# one thread per process: the smoke model is tiny and the CPU is shared
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SMOKE = ["--preset", "smoke", "--device", "cpu", "--log-every", "5"]

pytestmark = pytest.mark.usefixtures("one_thread")

def comparable(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock timings (perf_*), the only figures allowed to differ."""
    return [{k: v for k, v in r.items() if not k.startswith("perf_")} for r in rows]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matwm_fast.train", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def train_inprocess(run_dir: Path, *flags: str, **kw) -> int:
    return support.train_inprocess(SMOKE, run_dir, *flags, **kw)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> list[dict]:
    """An uninterrupted 70-step smoke run, in this process."""
    d = tmp_path_factory.mktemp("baseline")
    assert train_inprocess(d, "--steps", "70") == 0
    return read_metrics(d)


def test_inprocess_resume_is_bit_exact(tmp_path, baseline, capsys):
    # stop at 53, mid log interval: the checkpoint must carry the unflushed metric sums too
    assert train_inprocess(tmp_path, "--steps", "70", stop_at=53) == 128 + signal.SIGTERM
    assert "interrupted by signal 15 at step 53" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_000000053.pt").exists()
    # a stale row past the checkpoint (as a SIGKILLed run leaves) must not survive the resume
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"env_step": 55, "stale": 1.0}) + "\n")
    assert train.main(["--resume", str(tmp_path), "--steps", "70"]) == 0
    out = capsys.readouterr().out
    assert "resume: train.steps = 70 (was 70)" not in out  # unchanged values are not "changes"
    assert "resumed from step 53" in out and "dropped 1 metric rows" in out
    rows = read_metrics(tmp_path)
    assert [r["env_step"] for r in rows] == [r["env_step"] for r in baseline]
    assert comparable(rows) == comparable(baseline)  # bit-exact: floats compared with ==


def test_resume_after_a_budget_off_the_logging_grid(tmp_path, baseline, capsys):
    """--steps 53 logs a last row at 53; resumed to 70, the rows at 55.. are the uninterrupted ones."""
    assert train_inprocess(tmp_path, "--steps", "53") == 0
    assert read_metrics(tmp_path)[-1]["env_step"] == 53
    assert train.main(["--resume", str(tmp_path), "--steps", "70"]) == 0
    rows = [r for r in read_metrics(tmp_path) if r["env_step"] != 53]
    assert comparable(rows) == comparable(baseline)


def test_resume_from_an_older_checkpoint_file(tmp_path, baseline, capsys):
    assert train_inprocess(tmp_path, "--steps", "60", "--checkpoint-every", "10", "--run.keep-checkpoints", "3") == 0
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == [f"step_0000000{s}.pt" for s in (40, 50, 60)]
    assert train.main(["--resume", str(ckpts / "step_000000050.pt"), "--steps", "70"]) == 0
    out = capsys.readouterr().out
    assert "set aside step_000000060.pt" in out and "dropped 2 metric rows" in out  # rows 55 and 60
    assert (ckpts / "step_000000060.pt.abandoned").exists() and (ckpts / "latest").read_text() == "step_000000070.pt"
    assert comparable(read_metrics(tmp_path)) == comparable(baseline)


def test_second_ctrl_c_quits_at_once(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    assert train_inprocess(tmp_path, "--steps", "70", "--checkpoint-every", "10", stop_at=43,
                           signals=(signal.SIGINT, signal.SIGINT)) == 130
    err = capsys.readouterr().err
    assert "interrupted twice: quitting without a new checkpoint" in err and "step_000000040.pt" in err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_sigterm_after_ctrl_c_still_checkpoints(tmp_path, capsys):
    """Ctrl-C reaches a sweep and its trainers; the sweep then SIGTERMs them: that must not abort the save."""
    assert train_inprocess(tmp_path, "--steps", "70", stop_at=43, signals=(signal.SIGINT, signal.SIGTERM)) == 130
    assert "interrupted by signal 2 at step 43" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000000043.pt"


def test_evaluation_during_training_does_not_change_training(tmp_path, baseline):
    assert train_inprocess(tmp_path, "--steps", "70", "--eval-every", "10", "--eval-episodes", "1") == 0
    rows = read_metrics(tmp_path)
    evals = [r for r in rows if "eval_return_mean" in r]
    # from warm-up's end (40) on, every 10 steps, into the same metrics stream
    assert [r["env_step"] for r in evals] == [40, 50, 60, 70]
    assert all(r["eval_episodes"] == 1 and "eval_team_adversary_return_mean" in r for r in evals)
    assert all("eval_wm_reward_r2" in r and "eval_wm_effect_corr" in r for r in evals)  # the world-model probe ran too
    assert comparable([r for r in rows if "eval_return_mean" not in r]) == comparable(baseline)


# ----------------------------------------------------------------------------------- subprocess
@pytest.fixture(scope="module")
def cli_baseline(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("cli_baseline")
    proc = cli(*SMOKE, "--steps", "120", "--run-dir", str(d))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_metrics(d)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_killed_run_resumes_exactly(tmp_path, cli_baseline, sig):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "matwm_fast.train", *SMOKE, "--steps", "120",
                             "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
    # signal once updates are running (warm-up ends at 40), so the checkpoint holds trained state
    while proc.poll() is None and time.monotonic() < deadline:
        complete = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # not a half-written last line
        if any(json.loads(line)["env_step"] >= 50 for line in complete):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted by signal {int(sig)}" in err and "resume with:" in err
    stopped = int(err.split(" at step ")[1].split(";")[0])
    assert 50 <= stopped < 120
    assert (run_dir / "checkpoints" / f"step_{stopped:09d}.pt").exists()

    res = cli("--resume", str(run_dir))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from step {stopped}" in res.stdout
    assert comparable(read_metrics(run_dir)) == comparable(cli_baseline)


def test_resume_overrides_applied_or_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_inprocess(run_dir, "--steps", "45") == 0
    capsys.readouterr()
    before = (run_dir / "checkpoints" / "latest").read_text()
    # the real CLI once; the other refusals in-process (same code path, no interpreter start-up)
    proc = cli("--resume", str(run_dir), "--wm.width", "64")
    assert proc.returncode == 2, proc.stdout[-500:]
    assert "cannot change wm.width (checkpoint 32, requested 64)" in proc.stderr, proc.stderr
    assert "Only run.* settings may change on resume" in proc.stderr and "--init-from" in proc.stderr
    for flags, named in [(["--scenario", "simple_spread"], "env.scenario (checkpoint 'simple_tag', requested 'simple_spread')"),
                         (["--preset", "cpu"], "--preset (checkpoint 'smoke', requested 'cpu')"),
                         (["--scenario-arg", "num_good=2"], "--scenario-arg (checkpoint {}, requested {'num_good': 2})"),
                         (["--run-dir", str(tmp_path / "elsewhere")], "conflicts with --resume")]:
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", str(run_dir), *flags])
        assert e.value.code == 2
        assert named in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "latest").read_text() == before  # nothing was trained or written

    # a resumable override is applied and said so; one equal to the saved value is a no-op
    proc = cli("--resume", str(run_dir), "--steps", "50", "--log-every", "5", "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resume: run.steps = 50 (was 45)" in proc.stdout
    assert "run.log_every" not in proc.stdout.split("preset =")[0] and "train.seed" not in proc.stdout.split("preset =")[0]
    assert read_metrics(run_dir)[-1]["env_step"] == 50
    assert json.loads((run_dir / "config.json").read_text())["run"]["steps"] == 50
    assert train.main(["--resume", str(run_dir)]) == 0
    assert "run already at env step 50" in capsys.readouterr().out
