"""The GPU check (``python -m bench.gpucheck``, ``bench/gpucheck/``).

Its ``--rehearse`` run is the GPU check on the CPU — every stage's code at the smoke preset, a
step or two each, Triton in its interpreter, the graphs as plain calls — so the harness a rare,
short GPU lease depends on runs here on every commit.  One rehearsal is shared by the assertions
below (under a minute of one core).  A stub ``ncu`` on the PATH stands in for Nsight Compute: it runs
the profiled command as the real one would and records how it was called.  The rest: a stage cut
at its cap, the whole check stopped mid-stage, refusal of bad input, the device script.  What the
stages judge is ``test_gpustages.py``, what the first stage measures ``test_probes.py``."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpucheck import check, compile_cache, first

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
    return [sys.executable, "-m", "bench.gpucheck", "--out", str(out), "--work", str(work), "--rehearse", *extra]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One whole rehearsal, every stage, with a compile-cache folder that holds nothing yet."""
    tmp = tmp_path_factory.mktemp("gpucheck")
    out, work = tmp / "out", tmp / "work"
    cpu0 = children_cpu_s()
    proc = subprocess.run(gpucheck_cmd(out, work, "--compile-threads", "1", "--compile-cache", str(tmp / "kept")),
                          capture_output=True, text=True, cwd=ROOT, env=stub_ncu(tmp), timeout=600)
    return proc, out, json.loads((out / "results.json").read_text()), children_cpu_s() - cpu0


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished subprocesses and theirs."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def test_rehearsal_passes_every_stage(rehearsal):
    proc, out, res, _ = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert res["mode"] == "rehearsal" and res["finished"] is True and res["kind"] == "cpu"
    assert {s: r["status"] for s, r in res["stages"].items()} == dict.fromkeys(check.STAGES, "ok")
    assert res["elapsed_s"] <= res["budget_s"]
    # what comes back from a device call: at most 8 plain files, named in letters, digits, '.', '_', '-'
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(set(check.OUTPUTS) | {"compile-cache-cpu.tar.gz"}) and len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    summary = (out / "summary.md").read_text()
    for stage in check.STAGES:
        assert f"| {stage} | ok |" in summary
    assert "\n===== train:" in (out / "log.txt").read_text()  # every command's output, headed


def test_rehearsal_first_stage(rehearsal):
    """The probe's census and profile, and graphs against eager for both kernel choices: on the
    CPU the graphs are plain calls, so the replayed rollout is the eager one bit for bit."""
    _, out, res, _ = rehearsal
    parts = res["stages"]["graphs"]["result"]["parts"]
    assert list(parts) == ["probe", "graphs:ref", "graphs:triton"]
    assert all(p["status"] == "ok" and p["exit"] == 0 for p in parts.values())
    probe = parts["probe"]["record"]
    assert probe["syncs"]["detector"].startswith("dispatch mode") and probe["sync_error_step"]["raised"] is None
    phases = probe["profile"]["phases"]
    assert all(phases[p]["cpu_ops"] > 0 for p in ("act", "wm_update", "imagine", "ac_update"))
    for k in ("ref", "triton"):
        r = parts[f"graphs:{k}"]["record"]
        assert r["runtime"]["backend"] == "graphs" and r["runtime"]["kernels"] == k and not r["errors"]
        graphs = r["graphs_build"]["graphs"]
        assert sorted(graphs) == ["ac_update", "act", "imagine", "wm_update"]
        assert not any(g["captured"] for g in graphs.values())  # plain calls on the CPU
        assert list(r["timing"]["backends"]) == [f"eager:{k}", f"graphs:{k}"]
        assert all(b["steps"] == 1 and b["step_ms"] > 0 for b in r["timing"]["backends"].values())
        eq = r["equality"]
        assert eq["replay_vs_eager"]["bitwise_equal"] and eq["replay_repeats"] and eq["replays_draw_differently"]
        assert r["profile_graphs"]["phases"]["imagine"]["cpu_ops"] > 0
    summary = (out / "summary.md").read_text()
    assert "## graphs against eager" in summary and "| ref |" in summary and "| triton |" in summary
    assert "### Kernels per phase" in summary and "### Host syncs of one eager step" in summary


def test_rehearsal_env_and_tests(rehearsal):
    _, _, res, _ = rehearsal
    env = res["stages"]["env"]["result"]
    assert env["torch"] and env["packages"]["mpe2"] and env["triton_interpret"] is True
    tests = res["stages"]["tests"]["result"]
    assert tests["kernels"]["passed"] >= 1 and tests["kernels"]["failed"] == 0
    # on the CPU the gpu tests are collected and skipped, for the reason the conftest gives
    assert tests["gpu"]["passed"] == 0 and tests["gpu"]["skipped"] >= 2
    assert list(tests["gpu"]["skips"]) == ["needs a CUDA device"]


def test_rehearsal_training_run(rehearsal):
    _, out, res, _ = rehearsal
    train = res["stages"]["train"]["result"]
    assert train["budget"] == {"wm_sequences": 4, "imagined_steps": 4 * 6 * 3}  # the smoke preset's
    assert train["checkpoint"] == "step_000000050.pt" and train["update_rows"] >= 2
    assert train["runtime"]["backend"] == "graphs"
    rows = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_step"] == 50


def test_rehearsal_ncu_call(rehearsal):
    """ncu wraps the profiler on one steady eager step (the kernels the graphs replay), inside its
    NVTX ranges, clocks left alone."""
    _, out, res, _ = rehearsal
    ncu_args = json.loads((out / "imagine.ncu-rep").read_text())  # what the stub was called with
    assert ncu_args[ncu_args.index("--nvtx-include") + 1] == "train_step_eager/imagine/"
    assert ncu_args[ncu_args.index("--clock-control") + 1] == "none"
    assert ncu_args[ncu_args.index("--profile-from-start") + 1] == "off"
    cmd = res["stages"]["ncu"]["result"]["command"]
    assert "matwm_fast.profile" in cmd and "--nsys" in cmd and "--backend eager" in cmd
    assert "stub per-kernel summary" in (out / "ncu.txt").read_text()


def test_rehearsal_inductor_stage_and_compile_cache(rehearsal):
    """Inductor's stage runs its profile processes (an eager stand-in on the CPU) and the refusal
    of cudagraphs; the check packs its caches under its kind's name."""
    _, out, res, _ = rehearsal
    v = res["stages"]["inductor"]["result"]["variants"]
    assert v["eager:ref"]["status"] == "ok" and v["eager:ref"]["figures"]["step_ms"] > 0
    assert v["cudagraphs"]["status"] == "refused as expected" and v["cudagraphs"]["exit"] == 2
    assert "needs a CUDA device" in v["cudagraphs"]["message"]
    rec = res["compile_cache"]
    assert rec["restore"]["restored"] is False and rec["pack"]["archive"] == "compile-cache-cpu.tar.gz"
    assert (out / "compile-cache-cpu.tar.gz").is_file()


def test_rehearsal_stays_cheap(rehearsal):
    """The rehearsal is in every CI run: a minute and a half of it was too much.  Counted in CPU
    seconds, not on the wall clock, which under a parallel test run also counts the neighbours'."""
    *_, cpu_s = rehearsal
    assert 1 < cpu_s < 90, f"the rehearsal took {cpu_s:.0f} CPU seconds"


def test_stage_cut_at_its_cap_and_ncu_skipped_without_ncu(tmp_path):
    """A stage over its cap is stopped (its subprocesses too) and recorded as a timeout; the next
    stage still runs; the exit status says something failed."""
    env = {**subprocess_env(), "PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin"}
    out = tmp_path / "out"
    proc = subprocess.run(gpucheck_cmd(out, tmp_path / "work", "--stages", "graphs", "ncu", "--cap", "graphs=2"),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    res = json.loads((out / "results.json").read_text())
    graphs, ncu = res["stages"]["graphs"], res["stages"]["ncu"]
    assert graphs["status"] == "timeout" and graphs["seconds"] < 2 + 20  # cap, then SIGTERM's grace
    assert graphs["result"]["parts"]["probe"]["status"] == "timeout"
    assert ncu["status"] == "skipped" and "ncu not on PATH" in ncu["note"]
    assert list(res["stages"]) == ["graphs", "ncu"]


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # ended meanwhile
        return ""


def test_interrupted_check_keeps_what_it_measured(tmp_path):
    """SIGTERM (the device call's time limit) mid-stage: the child stops with it, and results.json
    holds the finished stages and marks the interrupted one."""
    out = tmp_path / "out"
    proc = subprocess.Popen(gpucheck_cmd(out, tmp_path / "work", "--stages", "env", "graphs"), cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.time() + 120
        while time.time() < t_end and not any((tmp_path / "work" / "logs").glob("graphs-*")):
            time.sleep(0.2)  # until the first stage has started its first process
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted" in err
    # the process it had started is gone with it (its command line names the work folder)
    mine = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path / "work") in _cmdline(p)]
    assert mine == []
    res = json.loads((out / "results.json").read_text())
    assert res["stages"]["env"]["status"] == "ok" and res["stages"]["graphs"]["status"] == "interrupted"
    assert res["finished"] is False and "not finished" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv, says", [
    (["--stages", "env", "gpu"], "--stages gpu: unknown; valid: env, graphs, tests, train, image, ncu, inductor"),
    (["--cap", "graphs"], "must be STAGE=SECONDS"),
    (["--cap", "fast=10"], "with STAGE one of env, graphs"),
    (["--cap", "graphs=-1"], "SECONDS > 0"),
    (["--compile-threads", "0"], "--compile-threads 0: must be >= 1"),
])
def test_bad_input_refused(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        check.main(["--out", str(tmp_path), "--rehearse", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err


@pytest.mark.parametrize("argv, says", [
    (["fast"], "part 'fast': unknown; valid: probe, graphs"),
    (["graphs", "--kernels", "auto"], "--kernels 'auto': the graphs part compares one kernel choice; valid: ref, triton"),
    (["graphs", "--steps", "0"], "--steps 0"),
    (["probe", "--device", "tpu"], "device 'tpu': unknown device; valid: auto, cpu, cuda"),
])
def test_the_first_stage_refuses_bad_input(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        first.main(["--preset", "smoke", "--device", "cpu", *argv, "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()  # refused before anything ran


def test_no_gpu_without_rehearse_is_refused(tmp_path):
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "bench.gpucheck", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "error: no CUDA device here" in proc.stderr and "--rehearse" in proc.stderr
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


def test_gpu_plan_fits_a_540_second_device_call():
    """The budget bench/README.md states: 500 s of caps; the first stage's figures within two
    minutes; the paper preset on CUDA, 20 replayed against 20 eager steps, both kernel choices;
    training on the graphs backend; Inductor last.  The rehearsal swaps cudagraphs for its refusal."""
    p = check.plan(rehearse=False)
    assert sum(p.caps.values()) == 500 and list(p.caps) == list(check.STAGES) and check.STAGES[-1] == "inductor"
    assert p.caps["env"] + p.caps["graphs"] <= 120
    assert [(part, k) for part, k, _ in p.parts] == [("probe", None), ("graphs", "ref"), ("graphs", "triton")]
    assert p.graph_steps == 20 and p.args()[:6] == ["--preset", "paper", "--scenario", "simple_tag", "--device", "cuda"]
    assert p.train_steps > 1000 and [v for v, _ in p.inductor] == ["cudagraphs", "compile"] and not p.refused
    r = check.plan(rehearse=True)
    assert "cudagraphs" not in dict(r.inductor) and r.refused == ("cudagraphs",) and r.preset == "smoke"


def test_the_library_never_imports_the_harness():
    """The installed package is the library: nothing under matwm_fast/ or kernels/ imports bench."""
    pattern = re.compile(r"^\s*(from|import)\s+bench\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for d in ("matwm_fast", "kernels") for p in (ROOT / d).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


# what travels to a lent GPU: the tracked tree plus the wheels the image lacks, 64 MiB in all (the
# device tool's limit).  The wheels are 16 MiB (pygame-ce 12 of them, bash ../shared/tools/
# device-wheels.sh, 2026-11-28); half the limit for the tree leaves 16 MiB for the compile-cache
# archives of two GPU kinds (8 MiB each, bench/gpucheck/compile_cache.py).  On 2026-11-28 a tree
# of 50 MiB (plain-text metric rows under bench/results) was refused with its wheels.
TREE_BUDGET_MIB = 32


def test_the_tree_that_travels_to_a_gpu_leaves_room_for_its_wheels():
    assert 2 * compile_cache.BUDGET <= 16 * 2**20
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
    assert (tmp_path / "out" / "compile-cache-cpu.tar.gz").is_file()  # comes back with the results
    assert (tmp_path / "machine" / "kept" / "compile-cache-cpu.tar.gz").is_file()  # and stays for a rerun


@pytest.mark.parametrize("args, says", [((), "usage"), (("spread", "soon"), "spread SECONDS"),
                                        (("rerun", "abc123"), "rerun SHA STAGE"), (("check",), "check SHA")])
def test_the_device_script_refuses_bad_input(tmp_path, args, says):
    proc = device_script(tmp_path, *args)
    assert proc.returncode == 2 and says in proc.stderr


def test_the_device_script_needs_the_device_tools_out(tmp_path):
    proc = device_script(tmp_path, "check", "abc123", out=False)
    assert proc.returncode != 0 and "$OUT" in proc.stderr


def test_the_device_script_trains_simple_spread_and_returns_its_rows(tmp_path):
    proc = device_script(tmp_path, "spread", "240", "--preset", "smoke", "--steps", "50", "--device", "cpu",
                         "--eval-every", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["compile-cache-cpu.tar.gz", "config.json", "metrics.jsonl",
                                                     "train.log"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["env"]["scenario"] == "simple_spread" and cfg["run"]["steps"] == 50
    assert cfg["runtime"]["backend"] == "graphs"
    assert "done: 50 env steps" in (out / "train.log").read_text()
