"""The GPU check (``python -m matwm_fast.gpucheck``, ``matwm_fast.tools.gpucheck``).

Its ``--rehearse`` run is the GPU check on the CPU — the same stages and commands at the smoke
preset — so the script a rare, short GPU lease depends on is run here on every commit.  A stub
``ncu`` on the PATH stands in for Nsight Compute: it runs the profiled command as the real one
would and records how it was called.  The rest: a stage cut at its cap, the whole check stopped
mid-stage, refusal of bad input.  What the stages judge is ``test_gpustages.py``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matwm_fast.tools import compile_cache, gpucheck

from support import ROOT, subprocess_env

STUB_NCU = '''#!{python}
import json, pathlib, subprocess, sys
a = sys.argv[1:]
if "--import" in a:  # the summary of a report
    print("stub per-kernel summary of", a[a.index("--import") + 1])
    sys.exit(0)
app = a.index("-m") - 1  # ncu [options] python -m matwm_fast.profile ...
rc = subprocess.call(a[app:])
pathlib.Path(a[a.index("-o") + 1] + ".ncu-rep").write_text(json.dumps(a[:app]))
sys.exit(rc)
'''


def stub_ncu(tmp: Path) -> dict:
    """An environment whose PATH has the stub ``ncu`` first."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    ncu = bin_dir / "ncu"
    ncu.write_text(STUB_NCU.format(python=sys.executable))
    ncu.chmod(0o755)
    return {**subprocess_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def gpucheck_cmd(out: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "matwm_fast.gpucheck", "--out", str(out), "--work", str(work), "--rehearse", *extra]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One whole rehearsal, every stage (~1 min with a warm Inductor cache, ~2 without)."""
    tmp = tmp_path_factory.mktemp("gpucheck")
    out, work = tmp / "out", tmp / "work"
    proc = subprocess.run(gpucheck_cmd(out, work, "--compile-threads", "1"), capture_output=True, text=True,
                          cwd=ROOT, env=stub_ncu(tmp), timeout=1500)
    return proc, out, json.loads((out / "results.json").read_text())


def test_rehearsal_passes_every_stage(rehearsal):
    proc, out, res = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert res["mode"] == "rehearsal" and res["finished"] is True
    assert {s: r["status"] for s, r in res["stages"].items()} == dict.fromkeys(gpucheck.STAGES, "ok")
    assert res["elapsed_s"] <= res["budget_s"]
    # what comes back from a device call: at most 8 plain files, named in letters, digits, '.', '_', '-'
    files = sorted(p.name for p in out.iterdir())  # all but the compile cache, packed only when asked
    assert files == sorted(set(gpucheck.OUTPUTS) - {compile_cache.ARCHIVE}) and len(gpucheck.OUTPUTS) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    summary = (out / "summary.md").read_text()
    for stage in gpucheck.STAGES:
        assert f"| {stage} | ok |" in summary
    assert "\n===== train:" in (out / "log.txt").read_text()  # every command's output, headed


def test_rehearsal_env_and_tests(rehearsal):
    _, _, res = rehearsal
    env = res["stages"]["env"]["result"]
    assert env["torch"] and env["packages"]["mpe2"] and env["triton_interpret"] is True
    tests = res["stages"]["tests"]["result"]
    assert tests["kernels"]["passed"] > 50 and tests["kernels"]["failed"] == 0  # Triton vs reference, all ops
    # on the CPU the gpu tests are collected and skipped, for the reason the conftest gives
    assert tests["gpu"]["passed"] == 0 and tests["gpu"]["skipped"] >= 3
    assert list(tests["gpu"]["skips"]) == ["needs a CUDA device"]


def test_rehearsal_speed_variants(rehearsal):
    _, _, res = rehearsal
    speed = res["stages"]["speed"]["result"]
    v = speed["variants"]
    kernels = {name: r["figures"]["runtime"]["kernels"] for name, r in v.items() if "figures" in r}
    assert kernels == {"eager:ref": "ref", "eager:triton": "triton", "compile": "ref"}
    for name in kernels:
        f = v[name]["figures"]
        assert f["step_ms"] > 0 and f["imagined_steps_per_s"] > 0 and f["warmup_s"] >= 0
        # where the compilation went: every update phase of the first training step, timed
        assert {"wm_update", "imagine", "ac_update"} <= set(f["first_step_s"]) and f["first_step_s"]["imagine"] > 0
        assert 0 < f["peak_fraction"]["imagine"] < 1
    # the cudagraphs stage becomes a check that it is refused, clearly, before any work
    assert v["cudagraphs"]["status"] == "refused as expected" and v["cudagraphs"]["exit"] == 2
    assert "needs a CUDA device" in v["cudagraphs"]["message"]
    assert list(speed["report"]["backends"]) == ["eager:ref", "eager:triton", "compile"]
    assert "compile speed-up vs eager:ref" in speed["tables_md"]


def test_rehearsal_training_run(rehearsal):
    _, out, res = rehearsal
    train = res["stages"]["train"]["result"]
    assert train["budget"] == {"wm_sequences": 4, "imagined_steps": 4 * 6 * 3}  # the smoke preset's
    assert train["checkpoint"] == "step_000000060.pt" and train["update_rows"] >= 2
    assert train["runtime"]["backend"] == "eager"  # auto on the CPU
    rows = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_step"] == 60


def test_rehearsal_ncu_call(rehearsal):
    """ncu wraps the profiler on one steady step, inside its NVTX ranges, clocks left alone."""
    _, out, res = rehearsal
    ncu_args = json.loads((out / "imagine.ncu-rep").read_text())  # what the stub was called with
    assert ncu_args[ncu_args.index("--nvtx-include") + 1] == "train_step_compile/imagine/"
    assert ncu_args[ncu_args.index("--clock-control") + 1] == "none"
    assert ncu_args[ncu_args.index("--profile-from-start") + 1] == "off"
    cmd = res["stages"]["ncu"]["result"]["command"]
    assert "matwm_fast.profile" in cmd and "--nsys" in cmd and "--backend compile" in cmd
    assert "stub per-kernel summary" in (out / "ncu.txt").read_text()


def test_stage_cut_at_its_cap_and_ncu_skipped_without_ncu(tmp_path):
    """A stage over its cap is stopped (its subprocesses too) and recorded as a timeout; the next
    stage still runs; the exit status says something failed."""
    env = {**subprocess_env(), "PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin"}
    out = tmp_path / "out"
    proc = subprocess.run(gpucheck_cmd(out, tmp_path / "work", "--stages", "speed", "ncu", "--cap", "speed=4"),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    res = json.loads((out / "results.json").read_text())
    speed, ncu = res["stages"]["speed"], res["stages"]["ncu"]
    assert speed["status"] == "timeout" and speed["seconds"] < 4 + 20  # cap, then SIGTERM's grace
    assert speed["result"]["variants"]["eager:ref"]["status"] == "timeout"
    assert ncu["status"] == "skipped" and "ncu not on PATH" in ncu["note"]
    assert list(res["stages"]) == ["speed", "ncu"]


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # ended meanwhile
        return ""


def test_interrupted_check_keeps_what_it_measured(tmp_path):
    """SIGTERM (the device call's time limit) mid-stage: the child stops with it, and results.json
    holds the finished stages and marks the interrupted one."""
    out = tmp_path / "out"
    proc = subprocess.Popen(gpucheck_cmd(out, tmp_path / "work", "--stages", "env", "speed"), cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 120
        while time.time() < t_end and not any((tmp_path / "work" / "logs").glob("speed-*")):
            time.sleep(0.2)  # until the speed stage has started its first profile process
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted" in err
    # the profile process it had started is gone with it (its command line names the work folder)
    mine = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path / "work") in _cmdline(p)]
    assert mine == []
    res = json.loads((out / "results.json").read_text())
    assert res["stages"]["env"]["status"] == "ok" and res["stages"]["speed"]["status"] == "interrupted"
    assert res["finished"] is False and "not finished" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv, says", [
    (["--stages", "env", "gpu"], "--stages gpu: unknown; valid: env, tests, speed, train, ncu"),
    (["--cap", "speed"], "must be STAGE=SECONDS"),
    (["--cap", "fast=10"], "with STAGE one of env, tests"),
    (["--cap", "speed=-1"], "SECONDS > 0"),
    (["--compile-threads", "0"], "--compile-threads 0: must be >= 1"),
])
def test_bad_input_refused(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--out", str(tmp_path), "--rehearse", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err


def test_no_gpu_without_rehearse_is_refused(tmp_path):
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.gpucheck", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "error: no CUDA device here" in proc.stderr and "--rehearse" in proc.stderr
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


def test_gpu_plan_fits_a_540_second_device_call():
    """The budget bench/README.md and the README state: 500 s of caps, the paper preset on CUDA,
    the four speed variants with cudagraphs (whose graphs the train stage reuses) before compile;
    the rehearsal swaps cudagraphs for its refusal."""
    p = gpucheck.plan(rehearse=False)
    assert sum(p.caps.values()) == 500 and list(p.caps) == list(gpucheck.STAGES)
    assert [v for v, _ in p.variants] == ["eager:ref", "eager:triton", "cudagraphs", "compile"] and not p.refused
    assert p.args()[:6] == ["--preset", "paper", "--scenario", "simple_tag", "--device", "cuda"]
    assert p.train_steps == 1500
    r = gpucheck.plan(rehearse=True)
    assert "cudagraphs" not in dict(r.variants) and r.refused == ("cudagraphs",) and r.preset == "smoke"


# what travels to a lent GPU: the tracked tree plus the wheels the image lacks, 64 MiB in all (the
# device tool's limit).  The wheels are 16 MiB (pygame-ce 12 of them, bash ../shared/tools/
# device-wheels.sh, 2026-11-28); half the limit for the tree leaves 16 MiB for the check's compile
# cache (at most 15 MiB, tools/compile_cache.py).  On 2026-11-28
# a tree of 50 MiB (plain-text metric rows under bench/results) was refused with its wheels.
TREE_BUDGET_MIB = 32


def test_the_tree_that_travels_to_a_gpu_leaves_room_for_its_wheels():
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    sizes = {p: (ROOT / p).stat().st_size for p in proc.stdout.decode().split("\0") if p and (ROOT / p).is_file()}
    total = sum(sizes.values()) / 2**20
    largest = sorted(sizes, key=sizes.get)[-5:]
    assert total <= TREE_BUDGET_MIB, f"tracked files {total:.1f} MiB > {TREE_BUDGET_MIB} MiB; largest: {largest}"


def device_script(tmp: Path, *args: str, out: bool = True) -> subprocess.CompletedProcess:
    """``bench/gpu.sh`` as the device tool runs it: ``$OUT`` set, this interpreter as ``python3``."""
    env = {**subprocess_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GPU_SH_WORK": str(tmp / "machine")}
    if out:
        env["OUT"] = str(tmp / "out")
    return subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_device_script_runs_the_check_and_keeps_its_compile_cache(tmp_path):
    proc = device_script(tmp_path, "check", "abc123", "--rehearse", "--stages", "env")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["stages"]["env"]["status"] == "ok" and res["stages"]["env"]["result"]["commit_given"] == "abc123"
    assert (tmp_path / "out" / compile_cache.ARCHIVE).is_file()  # comes back with the results
    assert (tmp_path / "machine" / compile_cache.ARCHIVE).is_file()  # and stays for a rerun on this machine


@pytest.mark.parametrize("args, says", [((), "usage"), (("spread", "soon"), "spread SECONDS"),
                                        (("rerun", "abc123"), "rerun SHA STAGE"), (("check",), "check SHA")])
def test_the_device_script_refuses_bad_input(tmp_path, args, says):
    proc = device_script(tmp_path, *args)
    assert proc.returncode == 2 and says in proc.stderr


def test_the_device_script_needs_the_device_tools_out(tmp_path):
    proc = device_script(tmp_path, "check", "abc123", out=False)
    assert proc.returncode != 0 and "$OUT" in proc.stderr


def test_the_device_script_trains_simple_spread_and_returns_its_rows(tmp_path):
    proc = device_script(tmp_path, "spread", "240", "--preset", "smoke", "--steps", "60", "--device", "cpu",
                         "--eval-every", "30", "--eval-episodes", "2", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["compile-cache.tar.gz", "config.json", "metrics.jsonl", "train.log"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["env"]["scenario"] == "simple_spread" and cfg["run"]["steps"] == 60
    assert "done: 60 env steps" in (out / "train.log").read_text()
