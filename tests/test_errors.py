"""Bad inputs are refused before training starts, each with a message naming the bad value and
what is valid; a NaN/Inf loss stops the run naming the loss and step, keeping the last good
checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matwm_fast import checkpoint as ck
from matwm_fast import train
from matwm_fast.metrics import read_metrics
from matwm_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matwm_fast.train", "--device", "cpu", *args],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


BAD = [
    (["--preset", "smoke", "--scenario", "simple_tagg"],
     "unknown scenario 'simple_tagg'; valid scenarios: simple_tag, simple_spread, simple_adversary"),
    (["--preset", "fast"], "unknown preset 'fast'; valid presets: paper, cpu, smoke"),
    (["--preset", "smoke", "--wm.widht", "64"], "--wm.widht: did you mean --wm.width"),
    (["--preset", "smoke", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
    (["--preset", "smoke", "--scenario-arg", "num_goood=2"],
     "simple_tag has no parameter 'num_goood'; valid: num_good, num_adversaries"),
    (["--preset", "smoke", "--backend", "fast"], "train.backend='fast'; valid: eager, compile, cudagraphs, auto"),
    # impossible configs: 4 world-model sequences cannot be split over 3 agents ...
    (["--preset", "smoke", "--scenario", "simple_spread"],
     "wm.batch_size=4 is not divisible by the 3 agents of simple_spread; use a multiple of 3, e.g. 3 or 6"),
    # ... and 40 context + 3 imagined steps do not fit the smoke transformer's 16 positions
    (["--preset", "smoke", "--train.threads", "-1"], "train.threads=-1 must be ≥ 0"),
    (["--preset", "smoke", "--ac.context-len", "40"], "ac.context_len + horizon + 1 = 40 + 3 + 1 exceeds wm.max_len=16; allowed: ac.context_len ≤ 12"),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    """Every BAD command at once (each mostly waits on imports): {index: (run_dir, returncode, stderr)}."""
    root = tmp_path_factory.mktemp("bad")
    procs = {}
    for i, (args, _) in enumerate(BAD):
        run_dir = root / f"run{i}"
        procs[i] = run_dir, subprocess.Popen(
            [sys.executable, "-m", "matwm_fast.train", "--device", "cpu", *args, "--run-dir", str(run_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    out = {}
    for i, (d, p) in procs.items():
        _, err = p.communicate(timeout=300)
        out[i] = d, p.returncode, err
    return out


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(a[2:] if len(a) > 2 else a) for a, _ in BAD])
def test_bad_input_is_refused_before_training(refusals, i):
    run_dir, code, stderr = refusals[i]
    assert code == 2, stderr[-1000:]
    assert BAD[i][1] in stderr, stderr[-2000:]
    assert not run_dir.exists()  # nothing was trained or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path):
    proc = cli("--preset", "smoke", "--device", "cuda", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "device 'cuda' requested but CUDA is not available; valid here: auto, cpu" in proc.stderr


def test_diverging_run_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A real divergence: actor-critic lr 1e30 blows up the actors right after warm-up (step 40)."""
    run_dir = tmp_path / "run"
    proc = cli("--preset", "smoke", "--ac.lr", "1e30", "--checkpoint-every", "40", "--run-dir", str(run_dir))
    assert proc.returncode == 3, proc.stderr[-2000:]
    m = re.search(r"error: non-finite actor-critic loss \(<agent>_actor_loss / <agent>_critic_loss\) "
                  r"at env step (\d+); stopping\. Last good checkpoint: (\S+)", proc.stderr)
    assert m, proc.stderr[-2000:]
    assert 40 < int(m[1]) <= 60
    good = run_dir / "checkpoints" / "step_000000040.pt"
    assert m[2] == str(good) and ck.CheckpointDir(run_dir).latest() == good
    assert sorted(p.name for p in good.parent.glob("step_*.pt")) == [good.name]  # nothing after the NaN
    st = ck.load(good)
    assert all(torch.isfinite(v).all() for v in st["ac"].values())


def test_nonfinite_world_model_loss_is_named(tmp_path, capsys):
    """In-process: the world-model loss turns NaN at step 45 exactly; the message says which and when."""
    cfg, rd, _ = train.prepare(train.build_parser().parse_args(
        ["--preset", "smoke", "--checkpoint-every", "5", "--log-every", "5", "--run-dir", str(tmp_path)]))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = Trainer(cfg, "cpu")
        update = tr.wm_update

        def nan_at_45(batch):
            m = update(batch)
            if tr.step == 45:
                m["total"] = m["total"] * float("nan")
            return m

        tr.wm_update = nan_at_45
        assert train.run(tr, rd) == 3
    finally:
        torch.set_num_threads(torch_threads)
    err = capsys.readouterr().err
    good = tmp_path / "checkpoints" / "step_000000040.pt"
    assert (f"error: non-finite shared world-model loss (shared_wm_total_loss) at env step 45; stopping. "
            f"Last good checkpoint: {good}") in err
    assert ck.CheckpointDir(tmp_path).latest() == good
    assert max(r["env_step"] for r in read_metrics(tmp_path)) == 40  # the bad row is not logged
