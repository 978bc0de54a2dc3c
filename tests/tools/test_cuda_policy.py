"""CUDA's device-dependent choices on CPU tensors (``matwm_fast.tools.cuda_policy``): the cast
table is this build's ``AutocastCUDA`` registrations, each policy casts as CUDA's does (weights
cast once per autocast region), the optimiser default turns to the foreach kernels, and leaving
the context gives the CPU its own policy back."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from matwm_fast.tools import cuda_policy as cp


class Ops(TorchDispatchMode):
    """The aten ops dispatched, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def test_table_is_this_builds_cuda_policy():
    assert set(cp.policy_table()) == cp.cuda_registrations()
    assert cp.policy_table()["layer_norm"] == "fp32" and cp.policy_table()["linear"] == "lower_precision_fp"


def small_net(x: torch.Tensor, lin: torch.nn.Linear, ln: torch.nn.LayerNorm) -> dict[str, torch.Tensor]:
    h = lin(x)  # lower precision
    return {"linear": h, "layer_norm": ln(h), "softmax": h.softmax(-1), "sum": h.sum(), "exp": h.exp(),
            "addcmul": torch.addcmul(h, h, x), "second_linear": lin(x)}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return torch.randn(4, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)


def test_casts_as_cuda_does(net):
    x, lin, ln = net
    with cp.cuda_policy(), torch.autocast("cpu", dtype=torch.bfloat16), Ops() as ops:
        out = small_net(x, lin, ln)
    bf16, fp32 = torch.bfloat16, torch.float32
    want = {"linear": bf16, "layer_norm": fp32, "softmax": fp32, "sum": fp32, "exp": fp32,
            "addcmul": fp32, "second_linear": bf16}  # addcmul: promoted to the widest input
    assert {k: v.dtype for k, v in out.items()} == want
    # the weight and bias are cast once in the region, the input at each of the two calls
    assert ops.names[:3] == ["_to_copy"] * 3
    second = len(ops.names) - 1 - ops.names[::-1].index("addmm")
    assert ops.names[second - 2: second] == ["_to_copy", "t"]  # only x again, then the product


def test_the_cpu_policy_is_back_afterwards(net):
    x, lin, ln = net
    clear = torch.clear_autocast_cache
    with cp.cuda_policy():
        pass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = small_net(x, lin, ln)
    assert out["layer_norm"].dtype == torch.bfloat16 and out["softmax"].dtype == torch.bfloat16  # CPU's policy
    assert torch.clear_autocast_cache is clear


def test_gradients_flow_through_the_casts(net):
    x, lin, ln = net
    with cp.cuda_policy():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ln(lin(x)).float().pow(2).mean()
        loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all()


def test_optimisers_default_to_the_foreach_kernels():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for policy, expected in ((cp.cuda_policy, "_foreach_"), (None, "add_")):
        opt = torch.optim.Adam([p], lr=0.1)
        with (policy() if policy else torch.autograd.grad_mode.no_grad()), Ops() as ops:
            opt.step()
        assert any(n.startswith(expected) for n in ops.names), (policy, ops.names)
        if policy is None:
            assert not any(n.startswith("_foreach_") for n in ops.names)
