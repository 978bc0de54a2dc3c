"""The fake-tensor budget's command line (``python -m matwm_fast.profile --fake``,
``matwm_fast.tools.budget``): one variant per kernels × precision, tables and a JSON report with
the analytic FLOPs beside the counted ones, and bad values refused with exit status 2."""

from __future__ import annotations

import json

import pytest

from matwm_fast.tools import budget, launches, profile


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("budget")
    argv = ["--fake", "--preset", "smoke", "--kernels", "ref", "--amp", "bf16", "fp32", "--top", "2",
            "--json", str(out / "b.json"), "--markdown", str(out / "b.md")]
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        assert profile.main(argv) == 0  # --fake hands over to the budget
    return out, buf.getvalue(), json.loads((out / "b.json").read_text())


def test_report(smoke):
    out, text, rep = smoke
    assert list(rep["variants"]) == ["ref bf16", "ref fp32"]
    for key in ("device_name", "torch", "git_commit", "date", "command", "config", "budget", "analytic_flops"):
        assert key in rep
    assert rep["command"].startswith("python -m matwm_fast.profile --fake") and rep["policy"] == "cuda"
    bf16, fp32 = rep["variants"]["ref bf16"], rep["variants"]["ref fp32"]
    assert bf16["runtime"]["amp"] == "bf16" and fp32["runtime"]["amp"] == "fp32"
    assert bf16["step"]["kernels"] > fp32["step"]["kernels"]  # bf16 adds autocast's casts
    for p in ("act", "wm_update", "imagine", "ac_update"):  # the counted FLOPs are the analytic ones
        assert bf16["phases"][p]["flops"] == pytest.approx(rep["analytic_flops"][p], rel=0.01), p
        assert bf16["phases"][p]["top_kernels"], p
    assert "kernel launches per env step, by variant" in text and "flops.py GFLOP" in text
    md = (out / "b.md").read_text()
    assert rep["device_name"] in md and "not on the machine" in md and "| phase | ref bf16 | ref fp32 |" in md


def test_narrow_keeps_the_launches_and_fills_least(smoke):
    _, _, rep = smoke
    args = budget.build_parser().parse_args(["--preset", "smoke", "--narrow"])
    cfg = budget.config_of(args)
    assert cfg.replay.warmup == launches.least_warmup(cfg) and cfg.wm.width < 32
    args = budget.build_parser().parse_args(["--preset", "smoke", "--replay.warmup", "300"])
    assert budget.config_of(args).replay.warmup == 300  # the user's fill is kept


@pytest.mark.parametrize("argv, says", [
    (["--kernels", "fast"], "--kernels 'fast': valid: ref, triton"),
    (["--amp", "fp16"], "--amp 'fp16': valid: bf16, fp32"),
    (["--policy", "gpu"], "--policy 'gpu': valid: cuda, cpu"),
    (["--preset", "huge"], "--preset 'huge': valid: paper, cpu, smoke"),
    (["--backend", "compile"], "--backend 'compile'"),
    (["--top", "-1"], "--top -1: must be an integer >= 0"),
    (["--device", "cuda"], "--device 'cuda': fake tensors live on the CPU"),
    (["--wm.width", "0"], "--wm.width 0"),
])
def test_bad_values_refused(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        profile.main(["--fake", "--preset", "smoke", *argv] if "--preset" not in argv else ["--fake", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err
