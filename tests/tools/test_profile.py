"""The profiler (``python -m matwm_fast.profile``, ``matwm_fast.tools.profile``): a quick eager run
prints the tables and writes a JSON report with every phase; a phase's time is the time of the work
inside it; FLOP rates and fractions of the measured peak; the comparison's ratios; variants with a
kernel choice; refusal of impossible requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from matwm_fast import nvtx
from matwm_fast.tools import flops, profile
from matwm_fast import trainer as trainer_mod
from matwm_fast.config import preset

ROOT = Path(__file__).resolve().parents[2]  # the repository


@pytest.fixture(scope="module")
def quick(tmp_path_factory, one_thread):
    """One smoke-sized eager run with every output switched on (a few seconds on 2 cores)."""
    out = tmp_path_factory.mktemp("profile")
    argv = ["--preset", "smoke", "--backend", "eager", "--steps", "3", "--warmup-steps", "1", "--device", "cpu",
            "--json", str(out / "p.json"), "--markdown", str(out / "p.md"),
            "--torch-profiler", str(out / "trace"), "--nsys"]
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        assert profile.main(argv) == 0
    return out, buf.getvalue(), json.loads((out / "p.json").read_text())


def test_table_printed(quick):
    _, text, _ = quick
    assert "== backend eager: smoke preset" in text
    for p in profile.PHASES:
        assert f"\n{p} " in text
    assert "step (total)" in text and "imagined steps/s" in text and "env steps/s" in text
    assert "--nsys: no CUDA device" in text  # CPU: a clear message instead of a capture range


def test_json_report(quick):
    out, _, rep = quick
    for key in ("device", "device_name", "torch", "triton", "git_commit", "date", "preset", "command"):
        assert key in rep
    assert rep["preset"] == "smoke" and rep["device"] == "cpu"
    assert rep["budget"] == {"agents": 4, "wm_batch": 4, "wm_seq_len": 8, "imag_batch_per_agent": 6,
                             "horizon": 3, "imagined_per_update": 4 * 6 * 3}
    r = rep["backends"]["eager"]
    assert set(r["phases_ms"]) == set(profile.PHASES) == set(r["share"])
    # every phase of train_step was entered and timed (the trainer marks all of them)
    for p in nvtx.PHASES:
        assert r["phases_ms"][p] > 0, p
    # the marked phases are timed inside the step and account for most of it ("other" is the rest:
    # replay writes, bookkeeping)
    marked = sum(r["phases_ms"][p] for p in nvtx.PHASES)
    assert marked <= r["step_ms"] * (1 + 1e-9)
    assert 0 <= r["phases_ms"]["other"] < 0.5 * r["step_ms"]
    assert 0 < r["share"]["imagine"] < 1
    assert r["env_steps_per_s"] == pytest.approx(1e3 / r["step_ms"])
    assert r["imagined_steps_per_s"] == pytest.approx(72 * 1e3 / r["step_ms"])
    assert r["peak_memory_mib"] > 0 and r["steps"] == 3
    assert r["runtime"] == {"device": "cpu", "backend": "eager", "kernels": "ref", "amp": "fp32", "rollout_graph": "whole"}
    assert "backend eager" in (out / "p.md").read_text()
    assert (out / "trace" / "trace-eager.json").stat().st_size > 0


def test_global_state_restored(quick):
    # in-process runs must not leave NVTX on or the trainer's phase hook replaced
    assert not nvtx.enabled()
    assert trainer_mod.phase is nvtx.phase


def test_phase_times_follow_the_work(one_thread):
    """Slowing the imagination by a known sleep grows the imagine phase by that much and the step
    by the same, while every other phase (``other`` included) keeps its time: each phase is charged
    with the work done inside it, not with its neighbours'."""
    sleep_s, steps = 0.2, 4  # long against a loaded CPU's scheduling noise (tens of ms)
    run = profile.BackendRun(preset("smoke"), "eager", torch.device("cpu"), warmup_steps=1, log=lambda *a: None)

    def measure() -> dict:
        run.timer, run.step_s = profile.PhaseTimer(run.device), []
        profile.time_steps([run], steps, use_nsys=False)
        return run.summary((0.0, "unused"))

    base = measure()
    imagine = run.tr.imagine

    def slow_imagine(ctx, noise=None):  # what train_step calls inside its "imagine" phase
        time.sleep(sleep_s)
        return imagine(ctx, noise)

    run.tr.imagine = slow_imagine
    slow = measure()
    ms, slack = 1e3 * sleep_s, 0.25 * 1e3 * sleep_s  # slack: scheduling noise of a shared CPU
    d_imagine = slow["phases_ms"]["imagine"] - base["phases_ms"]["imagine"]
    assert slow["phases_ms"]["imagine"] >= ms  # a sleep lasts at least as long as asked
    assert ms - slack < d_imagine < ms + slack, (base["phases_ms"], slow["phases_ms"])
    assert slow["step_ms"] - base["step_ms"] == pytest.approx(d_imagine, abs=slack)
    for p in profile.PHASES:
        if p != "imagine":
            assert abs(slow["phases_ms"][p] - base["phases_ms"][p]) < slack, (p, base["phases_ms"], slow["phases_ms"])
    assert slow["share"]["imagine"] > base["share"]["imagine"]


def test_interleaved_run(tmp_path, capsys, one_thread):
    # --interleave alternates the backends' steps; with one backend it is the plain loop
    argv = ["--preset", "smoke", "--backend", "eager", "eager", "--steps", "2", "--warmup-steps", "0",
            "--device", "cpu", "--interleave", "--json", str(tmp_path / "p.json")]
    assert profile.main(argv) == 0
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["interleaved"] is True and list(rep["backends"]) == ["eager"]  # repeated name dropped
    assert len(rep["backends"]["eager"]["step_ms_each"]) == 2
    assert "interleaved with the other backends" in capsys.readouterr().out


def test_comparison_ratios():
    def fake(step_ms, imagine_ms):
        phases = {p: 1.0 for p in profile.PHASES} | {"imagine": imagine_ms}
        phases["other"] = step_ms - sum(v for k, v in phases.items() if k != "other")
        return {"steps": 5, "warmup_steps": 3, "warmup_s": 1.0, "step_ms": step_ms, "step_ms_median": step_ms,
                "step_ms_std": 0.0, "phases_ms": phases, "share": {p: v / step_ms for p, v in phases.items()},
                "env_steps_per_s": 1e3 / step_ms, "imagined_steps_per_s": 72e3 / step_ms,
                "imagine_phase_steps_per_s": 72e3 / imagine_ms, "peak_memory_mib": 1.0, "peak_memory_kind": "x"}

    rep = {"preset": "smoke", "device_name": "cpu", "budget": {"imagined_per_update": 72},
           "backends": {"eager": fake(40.0, 20.0), "compile": fake(20.0, 5.0)}}
    text = profile.format_tables(rep)
    assert "compile speed-up vs eager" in text
    comparison = text.split("== comparison")[1].splitlines()
    rows = {ln.split("  ")[0].strip(): ln.split() for ln in comparison[3:] if ln.strip()}  # after the rule
    assert rows["imagine"][-1] == "4.00x"  # 20 ms → 5 ms
    assert rows["step"][-1] == "2.00x" and rows["step"][1:3] == ["40.00", "20.00"]
    md = profile.format_tables(rep, markdown=True)
    assert "| phase | eager ms | compile ms | compile speed-up vs eager |" in md


def test_cli_refuses_cudagraphs_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.profile", "--device", "cpu", "--backend", "cudagraphs"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert "cudagraphs" in proc.stderr and "CUDA" in proc.stderr


def test_flop_rates_and_fractions_of_peak(quick):
    """Each phase's model FLOPs are the analytic count of the config that ran; its rate is those
    FLOPs over its time, and its fraction is that rate over the measured peak of its precision."""
    _, text, rep = quick
    from matwm_fast.config import resolve
    from matwm_fast.env import env_spec

    cfg = preset("smoke")
    spec = env_spec(cfg.env)
    assert rep["flops_per_step"] == pytest.approx(flops.step_flops(resolve(cfg, spec.n_agents), spec))
    peaks = rep["matmul_peak_flops_per_s"]
    assert set(peaks) == {"fp32", "bf16"} and all(v > 1e8 for v in peaks.values())
    r = rep["backends"]["eager"]
    assert set(r["flops_per_s"]) == {"act", "wm_update", "imagine", "ac_update"}  # env, replay: no model arithmetic
    for p, rate in r["flops_per_s"].items():
        assert rate == pytest.approx(rep["flops_per_step"][p] / (r["phases_ms"][p] / 1e3))
        assert r["phase_precision"][p] == "fp32"  # the smoke preset runs float32
        assert r["peak_fraction"][p] == pytest.approx(rate / peaks["fp32"])
        assert 0 < r["peak_fraction"][p] < 1
    assert "GFLOP/step" in text and "of peak" in text and "matmul peak fp32" in text


def test_variants_with_kernels(tmp_path, one_thread):
    """``BACKEND:KERNELS`` runs that backend on those kernels and reports under the variant's name."""
    argv = ["--preset", "smoke", "--backend", "eager:ref", "eager", "--kernels", "ref", "--steps", "1",
            "--warmup-steps", "0", "--device", "cpu", "--peak-seconds", "0", "--json", str(tmp_path / "p.json")]
    assert profile.main(argv) == 0
    rep = json.loads((tmp_path / "p.json").read_text())
    assert list(rep["backends"]) == ["eager:ref", "eager"]
    assert rep["backends"]["eager:ref"]["runtime"]["kernels"] == "ref"
    assert rep["backends"]["eager:ref"]["backend"] == "eager"
    # no peak measured: rates still, fractions not
    assert rep["matmul_peak_flops_per_s"] is None
    assert all(f is None for f in rep["backends"]["eager"]["peak_fraction"].values())
    assert profile.range_name("eager:triton") == "train_step_eager_triton"


@pytest.mark.parametrize("variant, says", [("fast", "valid: eager, graphs, compile, cudagraphs"),
                                           ("eager:fast", "must be one of ref, triton, auto"),
                                           ("eager:", "must be one of ref, triton, auto")])
def test_bad_variant_refused(variant, says, capsys):
    with pytest.raises(SystemExit) as e:
        profile.main(["--preset", "smoke", "--device", "cpu", "--backend", variant])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and repr(variant) in err and says in err
