"""How the GPU check's stages (``bench/gpucheck/stages.py``) judge what came back: the first
stage's records as a GPU would write them (all four graphs captured, a sync in a captured phase,
a replay that differs from eager), a training run's metric rows against its config and SPEC §1's
budget, pytest's JUnit report; and ``summary.md`` drawn from a GPU-shaped result.  The stages
themselves run in the rehearsal of ``test_gpucheck.py``, which can only write CPU-shaped records."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from bench.gpucheck import stages, summary
from bench.gpucheck.check import plan
from matwm_fast.config import preset, resolve

PHASES = ("act", "wm_update", "imagine", "ac_update")


def bench(step_ms: float, phase_ms: float) -> dict:
    return {"steps": 20, "step_ms": step_ms, "step_ms_median": step_ms, "step_ms_std": 0.1, "warmup_s": 1.0,
            "warmup_steps": 3, "env_steps_per_s": 1e3 / step_ms, "imagined_steps_per_s": 36_864e3 / step_ms,
            "imagine_phase_steps_per_s": None, "peak_memory_mib": 2000.0, "peak_memory_kind": "cuda",
            "phases_ms": dict.fromkeys(("act", "env", "replay_sample", "wm_update", "imagine", "ac_update", "other"),
                                       phase_ms),
            "share": dict.fromkeys(("act", "env", "replay_sample", "wm_update", "imagine", "ac_update", "other"),
                                   0.1),
            "runtime": {"kernels": "ref", "amp": "bf16"}}


def kernels(n: int) -> dict:
    ph = {p: {"kernels": n, "kernel_ms": 0.5, "memcpy": 0, "memset": 0, "cpu_ops": 2 * n, "wall_ms": 1.0}
          for p in PHASES}
    return {"phases": ph, "total": {"kernels": 4 * n, "kernel_ms": 2.0, "memcpy": 0, "memset": 0, "cpu_ops": 8 * n}}


GRAPHS_RECORD = {
    "part": "graphs", "kernels": "ref", "preset": "paper", "device": "cuda:0", "errors": [],
    "done": ["graphs_build", "eager_build", "timing", "equality", "profile_graphs", "finite"],
    "runtime": {"backend": "graphs", "kernels": "ref", "amp": "bf16"},
    "graphs_build": {"to_captured_s": 9.5, "graphs": {p: {"captured": True, "capture_s": 0.2, "calls": 3}
                                                      for p in PHASES}},
    "timing": {"steps": 20, "budget": {"imagined_per_update": 36_864}, "flops_per_step": {},
               "backends": {"eager:ref": bench(98.0, 15.0), "graphs:ref": bench(14.0, 2.0)},
               "whole_step_ms": {"eager:ref": 97.0, "graphs:ref": 12.5}},
    "equality": {"captured": True, "capture_s": 0.1, "replay_repeats": True, "replays_draw_differently": True,
                 "replay_vs_eager": {"ok": True, "action_mismatch": 0.001, "states_rel_err": 3e-3, "tolerance": 1e-2,
                                     "bitwise_equal": False}},
    "profile_graphs": kernels(600),
}
PROBE_RECORD = {
    "part": "probe", "done": ["build", "syncs", "sync_error_step", "profile"], "errors": [],
    "syncs": {"detector": "torch.cuda.set_sync_debug_mode", "phases": {
        "act": {"count": 1, "sites": {"matwm_fast/trainer.py:120 in choose_actions: ... [a synchronizing CUDA "
                                      "operation]": 1}}},
        "strict_phases": ["wm_update", "imagine", "ac_update"], "allowed": {"act": "the actions go to the CPU env"},
        "in_strict": 0, "raised": None},
    "sync_error_step": {"phases": {}, "in_strict": 0, "raised": None},
    "profile": kernels(1100),
}


def test_a_gpu_graphs_record_passes_and_each_breach_fails_naming_it():
    assert stages.judge_graphs(GRAPHS_RECORD, cuda=True) == (
        "ok", "14.00 ms/step vs eager:ref 98.00 (7.00x; whole steps 12.50 vs 97.00); captured in 9.5 s from a cold process")
    # on the CPU the same record is wrong: there the graphs must be plain calls
    assert "want all plain calls" in stages.judge_graphs(GRAPHS_RECORD, cuda=False)[1]
    for change, says in [
        (lambda r: r["graphs_build"]["graphs"]["imagine"].update(captured=False), "want all captured"),
        (lambda r: r["graphs_build"]["graphs"].pop("act"), "trainer graphs"),
        (lambda r: r["equality"]["replay_vs_eager"].update(ok=False, action_mismatch=0.2), "replay != eager: 20.00%"),
        (lambda r: r["equality"].update(replay_repeats=False), "two replays with fixed noise differ"),
        (lambda r: r["equality"].update(captured=False), "the equality check's own graphs not captured"),
        (lambda r: r["equality"].update(replays_draw_differently=False), "drew the same numbers"),
        (lambda r: (r["done"].remove("timing"), r["errors"].append({"piece": "timing", "error": "RuntimeError: boom"})),
         "not done: timing (timing: RuntimeError: boom)"),
    ]:
        r = copy.deepcopy(GRAPHS_RECORD)
        change(r)
        status, note = stages.judge_graphs(r, cuda=True)
        assert status == "failed" and says in note, note


def test_a_sync_in_a_captured_phase_fails_the_probe_on_a_gpu_only():
    assert stages.judge_probe(PROBE_RECORD, cuda=True)[0] == "ok"
    r = copy.deepcopy(PROBE_RECORD)
    r["syncs"]["phases"]["wm_update"] = {"count": 2, "sites": {"matwm_fast/losses.py:40 in f: x.item() [op]": 2}}
    r["syncs"]["in_strict"] = 2
    status, note = stages.judge_probe(r, cuda=True)
    assert status == "failed" and "matwm_fast/losses.py:40" in note
    assert stages.judge_probe(r, cuda=False)[0] == "ok"  # the CPU's stand-in detector is only reported
    r = copy.deepcopy(PROBE_RECORD)
    r["sync_error_step"]["raised"] = {"phase": "imagine", "message": "called a synchronizing CUDA operation",
                                      "site": ["matwm_fast/imagination.py:90 in imagine: ..."]}
    status, note = stages.judge_probe(r, cuda=True)
    assert status == "failed" and "imagination.py:90" in note
    r = copy.deepcopy(PROBE_RECORD)
    r["done"].remove("profile")
    assert stages.judge_probe(r, cuda=True) == ("failed", "not done: profile")


def test_the_summary_of_a_gpu_check(tmp_path):
    res = {"mode": "gpu", "kind": "nvidia-h100-80gb-hbm3", "command": "python -m bench.gpucheck", "started": "t",
           "finished": True, "budget_s": 500, "elapsed_s": 100,
           "stages": {"env": {"status": "ok", "cap_s": 10, "result": {"gpu": "NVIDIA H100 80GB HBM3"}},
                      "graphs": {"status": "ok", "cap_s": 110, "result": {"parts": {
                          "probe": {"status": "ok", "record": PROBE_RECORD},
                          "graphs:ref": {"status": "ok", "record": GRAPHS_RECORD},
                          "graphs:triton": {"status": "failed", "note": "replay != eager", "record": {
                              "errors": [{"piece": "graphs_build", "error": "RuntimeError: capture failed"}]},
                              "tail": "Traceback ..."}}}}}}
    text = summary.summary(res)
    assert text.startswith("# GPU check (gpu): NVIDIA H100 80GB HBM3")
    assert "| ref | 98.00 | 14.00 | 7.00x | 97.00 / 12.50 | 15.00 / 2.00 |" in text
    assert "act 0.20, wm_update 0.20" in text and "| 9.50 | ok: 0.10% actions" in text
    assert "| triton | - |" in text  # a part that never timed still has its row
    assert "set_sync_debug_mode" in text and "trainer.py:120" in text
    assert "| imagine | 1,100 | 0.50 | 2,200 | 600 | 0.50 | 1,200 |" in text  # eager vs replayed kernels
    assert "graphs backend eager:ref" not in text and "### backend graphs:ref" in text  # the profiler's tables


def test_check_rows_finds_what_is_wrong():
    from matwm_fast.env import env_spec

    cfg = preset("smoke")
    spec = env_spec(cfg.env)
    cfg = resolve(cfg, spec.n_agents)
    good = {"env_step": 50, "shared_wm_total_loss": 1.0, "wm_sequences": 4, "imagined_steps": 72}
    good |= {f"{a}_{k}_loss": 0.5 for a in spec.agents for k in ("actor", "critic")}
    assert stages.check_rows([good], cfg) == ({"wm_sequences": 4, "imagined_steps": 72}, [])
    nan = good | {"agent_0_critic_loss": float("nan")}
    missing = {k: v for k, v in good.items() if k != "adversary_1_actor_loss"}
    budget = good | {"imagined_steps": 18}
    _, problems = stages.check_rows([nan, missing, budget], cfg)
    assert len(problems) == 3
    assert "agent_0_critic_loss" in problems[0] and "adversary_1_actor_loss" in problems[1]
    assert "'imagined_steps': 18" in problems[2]
    assert stages.check_rows([], cfg)[1] == ["no row after warm-up"]
    # the paper preset on simple_tag must also meet SPEC §1's figures, whatever the config says
    paper = resolve(replace(preset("paper"), wm=replace(preset("paper").wm, batch_size=20)), spec.n_agents)
    _, problems = stages.check_rows([], paper)
    assert any("SPEC" in p for p in problems)
    _, problems = stages.check_rows([], resolve(preset("paper"), spec.n_agents))
    assert problems == ["no row after warm-up"]  # 16 sequences, 4 × 768 × 12 = 36,864: SPEC's


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="a" name="err"><error message="oops"/></testcase>'
                   '<testcase classname="b" name="s"><skipped message="needs a CUDA device"/></testcase>'
                   '</testsuite></testsuites>')
    r = stages.junit(xml)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 2, 1)
    assert [f["test"] for f in r["failures"]] == ["a::bad", "a::err"] and r["skips"] == {"needs a CUDA device": 1}
    assert stages.junit(tmp_path / "none.xml") == {}


def test_a_test_run_cut_at_its_cap_still_says_what_ran():
    text = ("============ test session starts ============\n"
            "tests/test_gpu.py::test_bf16_world_model_loss_close_to_fp32 PASSED        [ 33%]\n"
            "tests/test_gpu.py::test_triton_imagination_equals_reference_on_cuda FAILED [ 66%]\n"
            "tests/kernels/test_twohot_ce.py::test_backward ")
    r = stages.progress(text)
    assert (r["passed"], r["failed"], r["skipped"], r["partial"]) == (1, 1, 0, True)
    assert r["failures"] == [{"test": "tests/test_gpu.py::test_triton_imagination_equals_reference_on_cuda",
                              "message": "FAILED"}]
    assert r["cut_during"] == "tests/kernels/test_twohot_ce.py::test_backward"
    finished = stages.progress(text + "PASSED [100%]\nFAILED tests/test_gpu.py::x - boom\n")
    assert finished["passed"] == 2 and finished["cut_during"] is None  # the summary line is not a test


class FakeCheck:
    """Just what ``stage_tests`` uses of a Check: a plan, a work folder, ``sh`` and ``save``;
    ``sh`` writes the JUnit report that pytest would have written."""

    def __init__(self, tmp_path, rehearse: bool, reports: dict[str, str]):
        self.p, self.work, self.reports, self.env = plan(rehearse), tmp_path, reports, {}

    def sh(self, name, cmd, until=None, env=None):
        xml = next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]
        with open(xml, "w") as f:
            f.write(f"<testsuites><testsuite>{self.reports[name]}</testsuite></testsuites>")
        return 0, 0.1, ""

    def save(self):
        pass


PASSED = '<testcase classname="t" name="a"/>'
SKIPPED_GPU = '<testcase classname="t" name="g"><skipped message="needs a CUDA device"/></testcase>'
SKIPPED_TRITON = ('<testcase classname="k" name="t"><skipped message="Triton kernels need a CUDA device, and this '
                  'one is cpu"/></testcase>')


@pytest.mark.parametrize("reports", [
    {"tests-kernels": PASSED, "tests-gpu": SKIPPED_GPU},  # gpu tests skipped on a GPU
    {"tests-kernels": PASSED + SKIPPED_TRITON, "tests-gpu": PASSED},  # Triton not run natively
])
def test_on_a_gpu_skipped_gpu_or_triton_tests_fail_the_stage(tmp_path, reports):
    ok = {"tests-kernels": PASSED, "tests-gpu": PASSED}
    assert stages.stage_tests(FakeCheck(tmp_path, False, ok), {})[0] == "ok"
    status, _, result = stages.stage_tests(FakeCheck(tmp_path, False, reports), {})
    assert status == "failed" and "not_run" in result
    # in the rehearsal on the CPU those skips are what is expected
    status, note, _ = stages.stage_tests(FakeCheck(tmp_path, True, reports | {"tests-gpu": SKIPPED_GPU}), {})
    assert status == "ok" and "gpu: 0 passed, 0 failed, 1 skipped" in note


def test_the_gpu_tests_leave_inductor_to_the_last_stage():
    p = plan(rehearse=False)
    assert "gpu and not inductor" in p.test_runs["gpu"] and "gpu and inductor" in p.inductor_tests
