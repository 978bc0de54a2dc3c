"""How the GPU check's stages (``matwm_fast.tools.gpustages``) judge what came back: a training
run's metric rows against its config and SPEC §1's budget, pytest's JUnit report.  The stages
themselves run in the rehearsal of ``test_gpucheck.py``."""

from __future__ import annotations

from dataclasses import replace

from matwm_fast.config import preset, resolve
from matwm_fast.tools import gpustages


def test_check_rows_finds_what_is_wrong():
    from matwm_fast.env import env_spec

    cfg = preset("smoke")
    spec = env_spec(cfg.env)
    cfg = resolve(cfg, spec.n_agents)
    good = {"env_step": 50, "shared_wm_total_loss": 1.0, "wm_sequences": 4, "imagined_steps": 72}
    good |= {f"{a}_{k}_loss": 0.5 for a in spec.agents for k in ("actor", "critic")}
    assert gpustages.check_rows([good], cfg) == ({"wm_sequences": 4, "imagined_steps": 72}, [])
    nan = good | {"agent_0_critic_loss": float("nan")}
    missing = {k: v for k, v in good.items() if k != "adversary_1_actor_loss"}
    budget = good | {"imagined_steps": 18}
    _, problems = gpustages.check_rows([nan, missing, budget], cfg)
    assert len(problems) == 3
    assert "agent_0_critic_loss" in problems[0] and "adversary_1_actor_loss" in problems[1]
    assert "'imagined_steps': 18" in problems[2]
    assert gpustages.check_rows([], cfg)[1] == ["no row after warm-up"]
    # the paper preset on simple_tag must also meet SPEC §1's figures, whatever the config says
    paper = resolve(replace(preset("paper"), wm=replace(preset("paper").wm, batch_size=20)), spec.n_agents)
    _, problems = gpustages.check_rows([], paper)
    assert any("SPEC" in p for p in problems)
    _, problems = gpustages.check_rows([], resolve(preset("paper"), spec.n_agents))
    assert problems == ["no row after warm-up"]  # 16 sequences, 4 × 768 × 12 = 36,864: SPEC's


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="a" name="err"><error message="oops"/></testcase>'
                   '<testcase classname="b" name="s"><skipped message="needs a CUDA device"/></testcase>'
                   '</testsuite></testsuites>')
    r = gpustages.junit(xml)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 2, 1)
    assert [f["test"] for f in r["failures"]] == ["a::bad", "a::err"] and r["skips"] == {"needs a CUDA device": 1}
    assert gpustages.junit(tmp_path / "none.xml") == {}


def test_a_test_run_cut_at_its_cap_still_says_what_ran():
    text = ("============ test session starts ============\n"
            "tests/test_gpu.py::test_bf16_world_model_loss_close_to_fp32 PASSED        [ 33%]\n"
            "tests/test_gpu.py::test_triton_imagination_equals_reference_on_cuda FAILED [ 66%]\n"
            "tests/test_gpu.py::test_cudagraphs_steps_run_without_recompiling_and_with_fresh_noise ")
    r = gpustages.progress(text)
    assert (r["passed"], r["failed"], r["skipped"], r["partial"]) == (1, 1, 0, True)
    assert r["failures"] == [{"test": "tests/test_gpu.py::test_triton_imagination_equals_reference_on_cuda",
                              "message": "FAILED"}]
    assert r["cut_during"] == "tests/test_gpu.py::test_cudagraphs_steps_run_without_recompiling_and_with_fresh_noise"
    finished = gpustages.progress(text + "PASSED [100%]\nFAILED tests/test_gpu.py::x - boom\n")
    assert finished["passed"] == 2 and finished["cut_during"] is None  # the summary line is not a test


class FakeCheck:
    """Just what ``stage_tests`` uses of a Check: a plan, a work folder, ``sh`` and ``save``;
    ``sh`` writes the JUnit report that pytest would have written."""

    def __init__(self, tmp_path, rehearse: bool, reports: dict[str, str]):
        from matwm_fast.tools.gpucheck import plan

        self.p, self.work, self.reports, self.env = plan(rehearse), tmp_path, reports, {}

    def sh(self, name, cmd, until=None):
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


def test_on_a_gpu_skipped_gpu_or_triton_tests_fail_the_stage(tmp_path):
    ok = {"tests-kernels": PASSED, "tests-gpu": PASSED}
    assert gpustages.stage_tests(FakeCheck(tmp_path, False, ok), {})[0] == "ok"
    for reports in ({"tests-kernels": PASSED, "tests-gpu": SKIPPED_GPU},  # gpu tests skipped on a GPU
                    {"tests-kernels": PASSED + SKIPPED_TRITON, "tests-gpu": PASSED}):  # Triton not run natively
        status, _, result = gpustages.stage_tests(FakeCheck(tmp_path, False, reports), {})
        assert status == "failed" and "not_run" in result
    # in the rehearsal on the CPU those skips are what is expected
    status, note, _ = gpustages.stage_tests(FakeCheck(tmp_path, True, {"tests-kernels": PASSED + SKIPPED_TRITON,
                                                                      "tests-gpu": SKIPPED_GPU}), {})
    assert status == "ok" and "gpu: 0 passed, 0 failed, 1 skipped" in note
