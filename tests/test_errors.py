"""Bad inputs are refused before training starts, with exit status 2 and a message naming the flag
and what is valid; a NaN/Inf loss stops the run naming the loss, the agent and the step, keeping
the last good checkpoint and saying how to go on."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matwm_fast import checkpoint as ck
from matwm_fast import train
from matwm_fast.config import RULES, SECTION_TYPES, flag, is_derived
from matwm_fast.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matwm_fast.train", "--device", "cpu", *args],
                          capture_output=True, text=True, env=env or ENV, cwd=ROOT, timeout=300)


BAD = [
    (["--preset", "smoke", "--scenario", "simple_tagg"],
     "--env.scenario 'simple_tagg': unknown scenario; valid scenarios: simple_tag, simple_spread, simple_adversary"),
    (["--preset", "fast"], "unknown preset 'fast'; valid presets: paper, cpu, smoke"),
    (["--preset", "smoke", "--wm.widht", "64"], "--wm.widht: did you mean --wm.width"),
    (["--preset", "smoke", "--device", "tpu"], "--run.device 'tpu': unknown device; valid: auto, cpu, cuda, cuda:N"),
    (["--preset", "smoke", "--scenario-arg", "num_goood=2"],
     "simple_tag has no parameter 'num_goood'; valid: num_good, num_adversaries"),
    (["--preset", "smoke", "--backend", "fast"], "--run.backend 'fast': valid: eager, graphs, compile, cudagraphs, auto"),
    # impossible configs: 2 world-model sequences leave one of 3 agents without one ...
    (["--preset", "smoke", "--scenario", "simple_spread", "--wm.batch-size", "2"],
     "wm.batch_size=2 is below the 3 agents of simple_spread: each agent needs at least one sequence; use 3 or more"),
    (["--preset", "smoke", "--threads", "-1"], "--run.threads -1: must be an integer ≥ 0"),
    # a setting of the pixel loss on a vector scenario would do nothing: said, not ignored
    (["--preset", "smoke", "--wm.recon-object-weight", "16"],
     "--wm.recon-object-weight 16: weighs pixels; simple_tag has vector observations (allowed there: 1)"),
    (["--preset", "smoke", "--wm.reward-weight", "-1"], "--wm.reward-weight -1.0: must be a number in [0, 1e+06]"),
    # ... and 40 context + 3 imagined steps do not fit the smoke transformer's 16 positions
    (["--preset", "smoke", "--ac.context-len", "40"],
     "ac.context_len + horizon + 1 = 40 + 3 + 1 exceeds wm.max_len=16; allowed: ac.context_len ≤ 12"),
    # a reviewer's probes of bad input, each once through the real CLI
    (["--preset", "smoke", "--log-every", "0"], "--run.log-every 0: must be an integer ≥ 1"),
    (["--preset", "smoke", "--train.wm-every", "0"], "--train.wm-every 0: must be an integer ≥ 1"),
    (["--preset", "smoke", "--ac.horizon", "-2"], "--ac.horizon -2: must be an integer ≥ 0"),
    (["--preset", "smoke", "--ac.imag-batch", "-3"], "--ac.imag-batch -3: must be an integer ≥ 0"),
    (["--preset", "smoke", "--train.act-context", "0"], "--train.act-context 0: must be an integer ≥ 1"),
    (["--preset", "smoke", "--eval-every", "10", "--eval-episodes", "0"], "--run.eval-episodes 0: must be an integer ≥ 1"),
    (["--preset", "smoke", "--steps", "-5"], "--run.steps -5: must be an integer ≥ 1"),
    (["--preset", "smoke", "--wm.width", "0"], "--wm.width 0: must be an integer ≥ 1"),
    (["--preset", "smoke", "--checkpoint-every", "-1"], "--run.checkpoint-every -1: must be an integer ≥ 0"),
    (["--preset", "smoke", "--ac.gamma", "2"], "--ac.gamma 2.0: must be a number in [0, 1]"),
    (["--preset", "smoke", "--seed", "-1"], "--train.seed -1: must be an integer in [0, 4294967295]"),
    (["--preset", "smoke", "--scenario-arg", "num_good=two"],
     "--scenario-arg num_good='two': simple_tag's num_good must be an integer ≥ 1"),
    (["--preset", "smoke", "--scenario-arg", "num_good=1.5"],
     "--scenario-arg num_good=1.5: simple_tag's num_good must be an integer ≥ 1"),
    (["--preset", "smoke", "--scenario-arg", "num_adversaries=-1"],
     "--scenario-arg num_adversaries=-1: simple_tag's num_adversaries must be an integer ≥ 1"),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict:
    """Every BAD command through the CLI's ``main`` in this process (25 interpreters importing torch
    cost half a minute; the real process's exit status is checked once, below):
    {index: (run_dir, exit status, stderr)}."""
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for i, (args, _) in enumerate(BAD):
        run_dir, err = root / f"run{i}", io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = train.main(["--device", "cpu", *args, "--run-dir", str(run_dir)])
            except SystemExit as e:
                code = e.code
        out[i] = run_dir, code, err.getvalue()
    return out


@pytest.mark.parametrize("i", range(len(BAD)), ids=[" ".join(a[2:] if len(a) > 2 else a) for a, _ in BAD])
def test_bad_input_is_refused_before_training(refusals, i):
    run_dir, code, stderr = refusals[i]
    assert code == 2, stderr[-1000:]
    assert BAD[i][1] in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not run_dir.exists()  # nothing was trained or written


def test_the_real_process_exits_2_naming_the_value(tmp_path):
    args, says = BAD[0]
    proc = cli(*args, "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- every field
def _invalid_probes() -> list[tuple[str, str]]:
    """(field, value) for every config field × {0, −1, nan, a wrong type} that the field's rule
    forbids; every field a flag sets has a rule."""
    probes = []
    for sec, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            key = f"{sec}.{f.name}"
            if f.name == "kwargs" or is_derived(f):
                continue
            assert key in RULES or key == "env.scenario", f"{key} has no validation rule"
            rule = RULES.get(key, ("choice",))
            for raw in ("0", "-1", "nan", "many"):
                if rule[0] == "int":
                    value = int(raw) if raw.lstrip("-").isdigit() else None  # None: argparse refuses the type
                    bad = value is None or value < rule[1] or (rule[2] is not None and value > rule[2])
                elif rule[0] == "float":
                    value = float(raw) if raw != "many" else None
                    lo, hi, lo_open, hi_open = rule[1:]
                    bad = value is None or math.isnan(value) or value < lo or value > hi or (
                        lo_open and value == lo) or (hi_open and value == hi)
                elif rule[0] == "bool":  # "0" reads as false; the others are not booleans
                    bad = raw != "0"
                else:  # names: scenario, device, backend, kernels, amp — no number is one of them
                    bad = raw != "many" or key != "env.scenario"
                if bad:
                    probes.append((key, raw))
    return probes


PROBES = _invalid_probes()


@pytest.mark.parametrize("key,raw", PROBES, ids=[f"{k}={v}" for k, v in PROBES])
def test_every_invalid_field_value_is_refused_naming_its_flag(tmp_path, capsys, key, raw):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--device", "cpu", flag(key), raw, "--run-dir", str(run_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag(key) in err or flag(key).replace("-", "_") in err or f"{key}=" in err, err
    assert not run_dir.exists()


def test_probes_cover_every_section():
    assert {k.split(".")[0] for k, _ in PROBES} == set(SECTION_TYPES) and len(PROBES) > 150


def test_triton_kernels_on_the_cpu_are_refused(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}  # the tests' interpreter is not a user's
    proc = cli("--preset", "smoke", "--kernels", "triton", "--run-dir", str(tmp_path / "run"), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--kernels 'triton': Triton kernels need a CUDA device" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path):
    proc = cli("--preset", "smoke", "--device", "cuda", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "device 'cuda' requested but CUDA is not available; valid here: auto, cpu" in proc.stderr


@pytest.mark.parametrize("where", ["under_a_file", "read_only_fs"])
def test_unwritable_run_directory_is_refused_before_the_first_step(tmp_path, where):
    # permission bits do not stop root (CI runs as root), so: a path through a regular file, and
    # one on a file system that refuses new entries
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        run_dir = tmp_path / "afile" / "run"
    else:
        run_dir = Path("/proc/matwm_fast_test_run")
    proc = cli("--preset", "smoke", "--run-dir", str(run_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"run directory {run_dir} cannot be created" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- NaN
def test_diverging_run_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A real divergence: actor-critic lr 1e30 blows up the actors right after warm-up (step 40)."""
    run_dir = tmp_path / "run"
    proc = cli("--preset", "smoke", "--ac.lr", "1e30", "--checkpoint-every", "20", "--run.keep-checkpoints", "3",
               "--run-dir", str(run_dir))
    assert proc.returncode == 3, proc.stderr[-2000:]
    m = re.search(r"error: non-finite actor-critic loss of (\w+) \(\1_actor_loss / \1_critic_loss\) "
                  r"at env step (\d+); stopping\. Last good checkpoint: (\S+)", proc.stderr)
    assert m, proc.stderr[-2000:]
    assert m[1] in ("adversary_0", "adversary_1", "adversary_2", "agent_0")
    assert 40 < int(m[2]) <= 60
    good = run_dir / "checkpoints" / "step_000000040.pt"
    assert m[3] == str(good) and ck.CheckpointDir(run_dir).latest() == good
    assert f"--init-from {run_dir}" in proc.stderr  # the way forward: a new run with other settings
    # nothing after the NaN
    assert sorted(p.name for p in good.parent.glob("step_*.pt")) == ["step_000000020.pt", good.name]
    st = ck.load(good)["trainer"]
    assert all(torch.isfinite(v).all() for v in st["ac"].values())
    # the way forward: a new run from an earlier checkpoint (step 40's weights already took one
    # step of lr 1e30), with a sane learning rate, recorded in the new run's config
    new = tmp_path / "new"
    proc = cli("--init-from", str(good.parent / "step_000000020.pt"), "--ac.lr", "3e-4", "--steps", "60",
               "--run-dir", str(new))
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    assert json.loads((new / "config.json").read_text())["ac"]["lr"] == 3e-4
    rows = read_metrics(new)
    assert rows[0]["env_step"] == 30 and rows[-1]["env_step"] == 60  # it goes on from step 20
    assert all(math.isfinite(r["agent_0_actor_loss"]) for r in rows if "agent_0_actor_loss" in r)


def test_nonfinite_world_model_loss_is_named(tmp_path, capsys, one_thread):
    """In-process: the world-model loss turns NaN at step 45 exactly; the message says which and when."""
    s = train.prepare(train.build_parser().parse_args(
        ["--preset", "smoke", "--checkpoint-every", "5", "--log-every", "5", "--run-dir", str(tmp_path)]))
    tr = train.start(s)
    update = tr.wm_update

    def nan_at_45(batch):
        m = update(batch)
        if tr.step == 45:
            m["total"] = m["total"] * float("nan")
        return m

    tr.wm_update = nan_at_45
    try:
        assert train.run(tr, s.run_dir) == 3
    finally:
        s.run_dir.unlock()
    err = capsys.readouterr().err
    good = tmp_path / "checkpoints" / "step_000000040.pt"
    assert (f"error: non-finite shared world-model loss (shared_wm_total_loss) at env step 45; stopping. "
            f"Last good checkpoint: {good}") in err
    assert ck.CheckpointDir(tmp_path).latest() == good
    assert max(r["env_step"] for r in read_metrics(tmp_path)) == 40  # the bad row is not logged


def test_presets_pass_their_own_rules():
    from matwm_fast.config import PRESETS, check_fields, preset

    for name in PRESETS:
        check_fields(preset(name))
