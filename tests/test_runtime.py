"""How the step functions run, resolved once by rule: device, backend, kernels, precision, and
the optimiser that follows from them."""

import pytest
import torch

from matwm_fast import kernels, runtime
from matwm_fast.config import RunConfig


def test_backend_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_backend("auto", cpu) == "eager"
    assert runtime.resolve_backend("auto", cuda) == "cudagraphs"
    assert runtime.resolve_backend("graphs", cpu) == "graphs"  # a pass-through of the same phases on the CPU
    with pytest.raises(ValueError, match="needs a CUDA device"):
        runtime.resolve_backend("cudagraphs", cpu)


def test_kernel_choice_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(kernels, "triton_runs_on", lambda d: True)  # as with TRITON_INTERPRET=1 on a GPU box
    assert runtime.resolve_kernels("auto", cuda, "eager") == "triton"  # replaces chains of launches
    assert runtime.resolve_kernels("auto", cuda, "graphs") == "triton"  # fewer kernels in each graph
    assert runtime.resolve_kernels("auto", cuda, "compile") == "ref"  # Inductor fuses the reference
    assert runtime.resolve_kernels("auto", cuda, "cudagraphs") == "ref"
    assert runtime.resolve_kernels("auto", cpu, "eager") == "ref"  # never the CPU interpreter
    assert runtime.resolve_kernels("triton", cuda, "compile") == "triton"  # an explicit choice is obeyed
    monkeypatch.setattr(kernels, "triton_runs_on", lambda d: False)
    with pytest.raises(ValueError, match="--kernels 'triton': .*valid here: ref, auto"):
        runtime.resolve_kernels("triton", cpu, "eager")


def test_amp_rule():
    assert runtime.resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    assert runtime.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert runtime.resolve_amp("fp32", torch.device("cuda")) is None
    rt = runtime.resolve_runtime(RunConfig(device="cpu", amp="bf16"))
    assert rt.describe() == {"device": "cpu", "backend": "eager", "kernels": "ref", "amp": "bf16", "rollout_graph": "whole"}
    assert rt.cache_dtype is torch.bfloat16


def test_names_are_checked_once_by_the_config():
    """The choice lists live in the config's rules (and the kernels' own list); the runtime only
    resolves ``auto`` and refuses what this machine cannot run."""
    from matwm_fast.config import BACKENDS, RULES, check_fields, preset
    from dataclasses import replace

    assert RULES["run.backend"][1:] == (*BACKENDS, "auto") and RULES["run.kernels"][1:] == (*kernels.IMPLS, "auto")
    cfg = preset("smoke")
    with pytest.raises(ValueError, match="--run.backend 'jit': valid: eager, graphs, compile, cudagraphs, auto"):
        check_fields(replace(cfg, run=replace(cfg.run, backend="jit")))


@pytest.mark.parametrize("backend, fused", [("eager", True), ("graphs", True), ("compile", None)])
def test_adam_as_the_backend_runs_it(backend, fused):
    """Fused under the eager functions (no host step counters); capturable with a tensor learning
    rate only where a CUDA graph replays it."""
    rt = runtime.resolve_runtime(RunConfig(device="cpu", backend=backend))
    opt = runtime.adam([torch.nn.Parameter(torch.zeros(3))], 1e-3, 1e-8, rt)
    g = opt.param_groups[0]
    assert g["fused"] is fused and g["capturable"] is False and g["lr"] == 1e-3
    assert runtime.grads_to_none(rt) is (backend != "compile")
