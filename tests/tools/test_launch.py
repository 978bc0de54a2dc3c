"""``matwm_fast.tools.launch``: how a sweep's trainings start and come back after a failure.

The Ray test runs a real sweep on a local Ray instance and kills, mid-trial, one trial's Ray
worker (its training is sent SIGTERM, checkpoints and exits; the task is rescheduled) and the
other trial's training process with SIGKILL (as the OOM killer would: rows logged after its last
checkpoint are dropped); both resume, and every run's metrics and the aggregated table equal
those of the same sweep under the local launcher.  It takes about 40 s on 2 shared cores (Ray's
start-up and stop 3–6 s of it, the rest the two sweeps' trainings), like the other end-to-end
tests, so it is not marked slow; without Ray it is skipped, saying which extra brings it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from matwm_fast import checkpoint as ck
from matwm_fast.metrics import read_metrics
from matwm_fast.tools import launch
from matwm_fast.tools import sweep as sw

from support import subprocess_env

HAS_RAY = importlib.util.find_spec("ray") is not None
STEPS, CKPT_EVERY = 300, 50
SWEEP = ["--env", "simple_tag", "--seeds", "0", "1", "--preset", "smoke", "--steps", str(STEPS), "--eval-every", "100",
         "--eval-episodes", "2", "--threads", "1", "--bootstrap-reps", "100"]  # the plumbing, not the statistics
TRAIN = ["--", "--max-cycles", "10", "--checkpoint-every", str(CKPT_EVERY), "--log-every", "10"]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf_")} for r in rows]


def latest_step(run: Path) -> int | None:
    ptr = run / "checkpoints" / "latest"
    try:
        return ck.step_of(Path(ptr.read_text().strip()))
    except (OSError, ValueError, IndexError):
        return None


def training_pid(run: Path) -> int | None:
    """The pid of the training in ``run`` now (None between attempts).  Read from the lock file,
    not by probing the lock: taking it even for an instant could make a starting training fail."""
    try:
        pid = int((run / ".lock").read_text().strip())
        alive = b"matwm_fast.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if alive else None


@pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (the optional extra: pip install -e '.[cluster]')")
def test_ray_sweep_resumes_killed_trials_and_equals_local(tmp_path):
    env = {**subprocess_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    log = open(tmp_path / "ray-sweep.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "matwm_fast.sweep", *SWEEP, "--out", str(ray_out), "--launcher", "ray",
                             "--cpus-per-trial", "1", "--max-retries", "2", *TRAIN],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    seed0, seed1 = ray_out / "simple_tag" / "seed0", ray_out / "simple_tag" / "seed1"
    killed: dict = {}
    try:
        while len(killed) < 2 and proc.poll() is None and time.perf_counter() - t0 < 240:
            step0, pid0 = latest_step(seed0), training_pid(seed0)
            if "worker" not in killed and step0 is not None and step0 < STEPS and pid0:
                # kill the Ray worker running seed 0's task; its training gets SIGTERM from the kernel
                worker = int(Path(f"/proc/{pid0}/stat").read_text().rsplit(")", 1)[1].split()[1])
                assert "ray" in Path(f"/proc/{worker}/cmdline").read_bytes().decode(errors="replace").lower()
                os.kill(worker, signal.SIGKILL)
                killed["worker"] = step0
            step1, pid1 = latest_step(seed1), training_pid(seed1)
            rows1 = read_metrics(seed1) if step1 is not None else []
            if ("training" not in killed and step1 is not None and pid1
                    and any(r["env_step"] > step1 for r in rows1) and max(r["env_step"] for r in rows1) < STEPS):
                os.kill(pid1, signal.SIGKILL)  # a row past the checkpoint exists: the resume must drop it
                killed["training"] = step1
            time.sleep(0.02)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    ray_wall = time.perf_counter() - t0
    out = (tmp_path / "ray-sweep.log").read_text()
    assert set(killed) == {"worker", "training"}, f"did not kill mid-trial: {killed}\n{out[-3000:]}"
    assert rc == 0, out[-3000:]

    # both trials were started again and resumed from a checkpoint before the end
    runs = {r["seed"]: r for r in json.loads((ray_out / "results.json").read_text())["runs"]}
    assert runs[0]["attempts"] == 2 and runs[1]["attempts"] == 2 and runs[0]["status"] == runs[1]["status"] == 0
    log0, log1 = (seed0 / "train.log").read_text(), (seed1 / "train.log").read_text()
    assert "interrupted by signal 15" in log0  # the orphaned training was told to stop, and checkpointed
    for text in (log0, log1):
        resumed = [int(line.split()[-1]) for line in text.splitlines() if line.startswith("resumed from step")]
        assert len(resumed) == 1 and CKPT_EVERY <= resumed[0] < STEPS, text[-2000:]
    assert "resume: dropped" in log1  # the rows seed 1 logged past its checkpoint

    # the same sweep under the local launcher: equal metrics, equal table
    t1 = time.perf_counter()
    local = subprocess.run([sys.executable, "-m", "matwm_fast.sweep", *SWEEP, "--out", str(local_out), "--jobs", "2",
                            *TRAIN], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    local_wall = time.perf_counter() - t1
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    for run in ("seed0", "seed1"):
        a, b = read_metrics(ray_out / "simple_tag" / run), read_metrics(local_out / "simple_tag" / run)
        assert max(r["env_step"] for r in a) == STEPS
        assert comparable(a) == comparable(b), run
    assert (ray_out / "results.md").read_text() == (local_out / "results.md").read_text()
    print(f"ray sweep (2 kills, 2 resumes) {ray_wall:.1f} s, local sweep {local_wall:.1f} s")


def trial(tmp_path: Path) -> launch.Trial:
    d = tmp_path / "run"
    return launch.Trial("simple_tag", 0, str(d), ("--preset", "smoke", "--run-dir", str(d)), ("--steps", "9"), 1)


def test_train_argv_starts_fresh_resumes_or_starts_over(tmp_path):
    t = trial(tmp_path)
    d = Path(t.run_dir)
    tail = lambda argv: argv[3:]  # noqa: E731 - after `python -m matwm_fast.train`
    assert tail(launch.train_argv(t)) == ["--preset", "smoke", "--run-dir", str(d)]
    # killed before its first checkpoint: nothing to continue, so the run is started over
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert tail(launch.train_argv(t)) == ["--preset", "smoke", "--run-dir", str(d), "--overwrite"]
    # a checkpoint: resumed, with the run settings only
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "step_000000005.pt").write_bytes(b"")
    assert tail(launch.train_argv(t)) == ["--resume", str(d), "--steps", "9"]
    # a pointer alone (its file lost) still means resume: train then names what is missing,
    # where starting over would delete the run
    (d / "checkpoints" / "step_000000005.pt").unlink()
    (d / "checkpoints" / "latest").write_text("step_000000005.pt")
    assert tail(launch.train_argv(t))[:2] == ["--resume", str(d)]


def test_a_retry_waits_for_the_lock_of_the_training_before_it(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    fd = ck.lock_file(d / ".lock")  # the previous attempt's training, still writing its checkpoint
    threading.Timer(0.6, ck.unlock_file, (fd,)).start()
    t0 = time.monotonic()
    launch.wait_for_lock(d, timeout_s=30)
    assert 0.5 < time.monotonic() - t0 < 10
    assert f"{d} is in use by process {os.getpid()}; waiting for it" in capsys.readouterr().out
    assert ck.lock_holder(d / ".lock") is None
    # a holder that never lets go: after the timeout train is left to refuse it, naming the holder
    fd = ck.lock_file(d / ".lock")
    try:
        t0 = time.monotonic()
        launch.wait_for_lock(d, timeout_s=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5
    finally:
        ck.unlock_file(fd)


@pytest.mark.parametrize("flags, message", [
    (["--launcher", "ray", "--jobs", "2"], "--jobs 2: only with --launcher local"),
    (["--address", "auto"], "--address: only with --launcher ray"),
    (["--cpus-per-trial", "2", "--max-retries", "1"], "--cpus-per-trial, --max-retries: only with --launcher ray"),
    (["--launcher", "ray", "--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5: must be 0, a fraction up to 1, or a whole"),
    (["--launcher", "ray", "--cpus-per-trial", "0"], "--cpus-per-trial 0: must be a number > 0"),
    (["--launcher", "ray", "--max-retries", "-1"], "--max-retries -1: must be a whole number >= 0"),
    (["--jobs", "0"], "--jobs 0: must be a whole number >= 1"),
    (["--launcher", "ray", "--address", "headnode"], "--address 'headnode': expected auto (the cluster this node"),
])
def test_launcher_flags_are_checked(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sw.main(["--env", "simple_tag", "--preset", "smoke", "--out", str(out), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_without_ray_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(SystemExit) as e:
        sw.main(["--env", "simple_tag", "--preset", "smoke", "--out", str(tmp_path / "out"), "--launcher", "ray"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --launcher ray needs Ray, an optional dependency: pip install -e '.[cluster]'" in err
    assert not (tmp_path / "out").exists()
