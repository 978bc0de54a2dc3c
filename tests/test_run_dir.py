"""One run directory, one run: the lock, fresh runs refused where a run is, resume only into the
run a checkpoint belongs to; what a killed run leaves behind (temporary files, torn metric lines)
is cleaned up and the run resumes exactly; a full disk and a SIGTERM during evaluation end
cleanly, saying how to go on."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matwm_fast import checkpoint as ck
from matwm_fast.metrics import read_metrics, repair

from support import ROOT, subprocess_env

ENV = subprocess_env()
SMOKE = ["--preset", "smoke", "--device", "cpu", "--log-every", "5"]


def cli(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matwm_fast.train", *args], capture_output=True, text=True,
                          env=kw.get("env", ENV), cwd=ROOT, timeout=timeout, preexec_fn=kw.get("preexec_fn"))


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf_")} for r in rows]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("done") / "run"
    proc = cli(*SMOKE, "--steps", "60", "--checkpoint-every", "50", "--run-dir", str(d))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return d


def test_a_directory_in_use_is_refused_naming_the_holder(done_run):
    rd = ck.RunDir(done_run)
    rd.lock()
    try:
        proc = cli("--resume", str(done_run), "--steps", "70")
    finally:
        rd.unlock()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run directory {done_run} is in use by process {os.getpid()}" in proc.stderr
    assert max(r["env_step"] for r in read_metrics(done_run)) == 60  # untouched


def test_a_fresh_run_where_a_run_is_is_refused(done_run, tmp_path):
    before = (done_run / "metrics.jsonl").read_bytes()
    proc = cli(*SMOKE, "--steps", "20", "--run-dir", str(done_run))
    assert proc.returncode == 2
    assert (f"{done_run} already holds a run; continue it with --resume {done_run}, start elsewhere with a new "
            "--run-dir, or replace it with --overwrite") in proc.stderr
    assert (done_run / "metrics.jsonl").read_bytes() == before
    # --overwrite replaces it: a copy, so the module's run stays for the other tests
    copy = tmp_path / "copy"
    shutil.copytree(done_run, copy)
    (copy / "notes.txt").write_text("mine")  # not a file of the run: left alone
    proc = cli(*SMOKE, "--steps", "20", "--run-dir", str(copy), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(r["env_step"] for r in read_metrics(copy)) == 20
    assert sorted(p.name for p in (copy / "checkpoints").glob("step_*")) == ["step_000000020.pt"]
    assert (copy / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_checkpoint_of_another_run(done_run, tmp_path):
    other = tmp_path / "other"
    assert cli(*SMOKE, "--steps", "50", "--seed", "1", "--run-dir", str(other)).returncode == 0
    shutil.copy(done_run / "checkpoints" / "step_000000060.pt", other / "checkpoints" / "step_000000060.pt")
    (other / "checkpoints" / "latest").write_text("step_000000060.pt")
    proc = cli("--resume", str(other), "--steps", "70")
    assert proc.returncode == 2
    assert f"the checkpoint does not belong to {other} (its config.json differs: train.seed: checkpoint 0 vs " \
           "this run 1)" in proc.stderr


def test_temporary_files_and_torn_lines_are_cleaned_up_and_the_run_resumes_exactly(done_run, tmp_path):
    baseline = tmp_path / "baseline"
    assert cli(*SMOKE, "--steps", "70", "--run-dir", str(baseline)).returncode == 0
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    # what a power cut leaves: an unfinished checkpoint write and half-written metric lines
    (run / "checkpoints" / ".step_000000065.pt.tmp4242").write_bytes(b"\0" * 100)
    (run / ".config.json.tmp4242").write_text("{")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"env_step": 65, "shared_wm_tot')
    with open(run / "metrics.csv", "a") as f:
        f.write("65,True,1.2")
    proc = cli("--resume", str(run), "--steps", "70")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed .step_000000065.pt.tmp4242, left by an interrupted write" in proc.stdout
    assert "dropped a torn last line" in proc.stderr  # a warning, once per file
    assert not list(run.rglob(".*tmp*"))
    rows = [r for r in read_metrics(run) if r["env_step"] != 60 or "eval_return_mean" in r]
    want = [r for r in read_metrics(baseline) if r["env_step"] != 60]
    assert comparable([r for r in rows if r["env_step"] != 60]) == comparable(want)
    import csv

    with open(run / "metrics.csv", newline="") as f:
        steps = [int(r["env_step"]) for r in csv.DictReader(f)]
    assert steps == [r["env_step"] for r in read_metrics(run)]  # the CSV holds the same rows


def test_readers_skip_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"env_step": 5, "x": 1}\n{"env_step": 10, "x"')
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_metrics(tmp_path) == [{"env_step": 5, "x": 1}]
    assert repair(tmp_path) == [f"{tmp_path / 'metrics.jsonl'}: dropped a torn last line (20 bytes)"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"env_step": 5, "x": 1}\n'
    (tmp_path / "metrics.jsonl").write_text('{"env_step": 5}\nnot json\n{"env_step": 15}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path)


def test_an_archived_run_reads_the_rows_it_wrote(tmp_path):
    from matwm_fast.tools.sweep_results import read_rows

    rows = [{"env_step": 100, "eval_return_mean": -20.5}, {"env_step": 200, "x": [1, 2]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path) == rows
    (tmp_path / "metrics.jsonl.gz").write_bytes(gzip.compress((tmp_path / "metrics.jsonl").read_bytes()))
    (tmp_path / "metrics.jsonl").unlink()
    assert read_metrics(tmp_path) == read_rows(tmp_path) == rows
    (tmp_path / "metrics.jsonl.gz").unlink()
    assert read_rows(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)


def test_a_full_disk_ends_with_one_line_and_the_way_back(tmp_path):
    """Checkpoints grow with the replay; a file-size limit the step-20 file fits under and the
    step-40 file does not stands for a disk that fills up between the two."""
    import resource

    run = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))  # step 20: ~270 kB; 40: ~640 kB (Adam moments)

    proc = cli(*SMOKE, "--steps", "60", "--checkpoint-every", "20", "--run-dir", str(run), preexec_fn=limit)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "writing the run failed at env step 40 (File too large" in err[0]
    good = run / "checkpoints" / "step_000000020.pt"
    assert f"Last good checkpoint: {good} (resume with: python -m matwm_fast.train --resume {run})" in err[0]
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the failed write left nothing behind
    assert cli("--resume", str(run), "--steps", "45").returncode == 0  # and the way back works


def test_sigterm_during_evaluation_exits_quickly_and_resumes_exactly(tmp_path):
    # 100 episodes: seconds of evaluation, so the SIGTERM half a second in lands inside it
    flags = [*SMOKE, "--steps", "50", "--eval-every", "40", "--eval-episodes", "100"]
    baseline = tmp_path / "baseline"
    assert cli(*flags, "--run-dir", str(baseline), timeout=600).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "matwm_fast.train", *flags, "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the row of step 40 is written just before its evaluation
        rows = (run / "metrics.jsonl").read_text().split("\n")[:-1] if (run / "metrics.jsonl").exists() else []
        if any(json.loads(r)["env_step"] == 40 for r in rows):
            break
        time.sleep(0.01)
    time.sleep(0.5)  # well inside the 100-episode evaluation
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert time.monotonic() - t0 < 5.0
    assert not any("eval_return_mean" in r for r in read_metrics(run))  # the cut evaluation left no row
    res = cli("--resume", str(run), timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert comparable(read_metrics(run)) == comparable(read_metrics(baseline))  # the evaluation ran on resume
