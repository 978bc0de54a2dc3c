"""What the GPU check's first stage measures inside a step (``bench/gpucheck/probes.py``): kernels
attributed to phases from a profiler trace shaped as a GPU writes it (runtime, driver and graph
launches, backward's kernels launched from another thread), host syncs caught per phase with
their call site (the CPU's stand-in detector; on CUDA torch's own), and the comparison of two
rollouts."""

from __future__ import annotations

import math

import pytest
import torch

from bench.gpucheck import probes
from matwm_fast import nvtx
from matwm_fast.imagination import Rollout


def ev(cat, name, ts, dur=1.0, corr=None, tid=1):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_kernels_land_in_the_phase_that_launched_them():
    trace = {"traceEvents": [
        ev("user_annotation", "phase/act", 0, 10), ev("user_annotation", "phase/wm_update", 20, 30),
        ev("user_annotation", "phase/imagine", 60, 20),
        ev("cpu_op", "aten::mm", 1), ev("cuda_runtime", "cudaLaunchKernel", 2, corr=1),
        ev("cuda_runtime", "cudaLaunchKernel", 25, corr=2),
        ev("cuda_runtime", "cudaLaunchKernel", 30, corr=3, tid=7),  # backward, autograd's thread
        ev("cuda_driver", "cuLaunchKernelEx", 62, corr=4),  # a Triton kernel
        ev("cuda_runtime", "cudaGraphLaunch", 65, corr=5),  # one replay: several kernels, one launch
        ev("cuda_runtime", "cudaMemcpyAsync", 90, corr=6),  # after every phase
        ev("kernel", "gemm", 100, 5.0, corr=1), ev("kernel", "gemm_bwd", 110, 2.0, corr=2),
        ev("kernel", "reduce", 115, 3.0, corr=3), ev("kernel", "decode_attention", 120, 4.0, corr=4),
        ev("kernel", "graph_a", 130, 1.0, corr=5), ev("kernel", "graph_b", 131, 1.5, corr=5),
        ev("gpu_memcpy", "Memcpy DtoH", 140, 1.0, corr=6), ev("kernel", "lost", 150, 1.0, corr=99),
    ]}
    r = probes.phase_kernels(trace)
    ph = r["phases"]
    assert (ph["act"]["kernels"], ph["act"]["kernel_ms"], ph["act"]["cpu_ops"]) == (1, 0.005, 1)
    assert (ph["wm_update"]["kernels"], ph["wm_update"]["kernel_ms"]) == (2, 0.005)
    assert (ph["imagine"]["kernels"], ph["imagine"]["kernel_ms"]) == (3, 0.0065)
    assert ph[probes.OUTSIDE]["memcpy"] == 1 and ph["(launch not found)"]["kernels"] == 1
    assert ph["imagine"]["wall_ms"] == 0.02
    assert r["total"]["kernels"] == 7 and r["total"]["memcpy"] == 1
    assert probes.phase_kernels([]) == {"phases": {}, "total": dict.fromkeys(
        ("kernels", "kernel_ms", "memcpy", "memset", "cpu_ops"), 0)}  # a bare event list is read too


def step(x: torch.Tensor) -> None:
    """A step as the trainer marks it: one sync inside a captured phase, one in acting."""
    with nvtx.phase("act"):
        x.sum().item()
    with nvtx.phase("wm_update"):
        x.nonzero()
        x[x > 0].sum()  # boolean indexing: the output's size needs the device's answer
    with nvtx.phase("imagine"):
        x.exp()


def test_the_census_names_each_sync_with_its_phase_and_site():
    c = probes.SyncCensus(torch.device("cpu"))
    with c.installed():
        step(torch.randn(8))
    r = c.report()
    assert {p: v["count"] for p, v in r["phases"].items()} == {"act": 1, "wm_update": 2}
    assert r["in_strict"] == 2 and r["raised"] is None
    site = next(iter(r["phases"]["wm_update"]["sites"]))
    assert "test_probes.py" in site and "x.nonzero()" in site and "[aten.nonzero]" in site
    assert nvtx._LISTENER is None  # the trainer's phases are left unwrapped afterwards


def test_in_error_mode_a_sync_in_a_captured_phase_raises_and_says_where():
    c = probes.SyncCensus(torch.device("cpu"), error_in=probes.STRICT)
    with c.installed(), pytest.raises(RuntimeError, match="synchronizing"):
        step(torch.randn(8))
    assert c.raised["phase"] == "wm_update" and "nonzero" in c.raised["message"]
    assert [f["phase"] for f in c.found] == ["act"]  # acting's sync was only recorded


def rollout(seed: int = 0, rows: int = 40) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    return Rollout(torch.randn(2, rows, 4, 5, generator=g), torch.randint(0, 5, (2, rows, 3), generator=g),
                   torch.randn(2, rows, 3, generator=g), torch.ones(2, rows, 3))


def test_rollouts_compared_on_the_rows_whose_actions_agree():
    a = rollout()
    assert probes.compare_rollouts(a, rollout(), 1e-4)["bitwise_equal"] is True
    b = rollout()
    b.actions[0, 0, 1] = (b.actions[0, 0, 1] + 1) % 5  # a flipped near-tie: that row diverges after it
    b.states[0, 0] += 10.0
    b.states[1] *= 1 + 1e-3  # bf16-sized differences elsewhere
    r = probes.compare_rollouts(a, b, probes.tolerance("bf16"))
    assert r["ok"] and r["action_mismatch"] == pytest.approx(1 / 240) and r["rows_all_equal"] == 79 / 80
    assert 1e-4 < r["states_rel_err"] < 1e-3 and not r["bitwise_equal"]
    assert not probes.compare_rollouts(a, b, probes.tolerance("fp32"))["ok"]  # too far for float32
    b.states[1, 1, 0, 0] = math.nan
    assert not probes.compare_rollouts(a, b, probes.tolerance("bf16"))["ok"]
