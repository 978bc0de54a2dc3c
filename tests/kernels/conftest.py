"""Shared setup for the kernel tests.

Without a GPU the Triton kernels run under Triton's numpy interpreter, which
must be switched on *before* `triton.jit` decorates anything, i.e. before
`kernels` is imported - hence the environment variable at the very top.  With
a GPU we leave it alone, so the compiled kernels are tested on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton runs here if it is importable and either we have CUDA or the
# interpreter was enabled in time (it is not if something imported `kernels`
# before this file, with TRITON_INTERPRET unset).
TRITON_RUNNABLE = kernels.HAS_TRITON and (DEVICE.type == "cuda" or kernels.TRITON_INTERPRET)
_WHY_NOT = (
    "triton is not importable"
    if not kernels.HAS_TRITON
    else "no CUDA and TRITON_INTERPRET was not set before kernels was imported"
)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=["ref", "triton"])
def impl(request) -> str:
    """Both implementations; the Triton one is skipped cleanly when it cannot run."""
    if request.param == "triton" and not TRITON_RUNNABLE:
        pytest.skip(_WHY_NOT)
    return request.param


@pytest.fixture
def needs_triton() -> None:
    if not TRITON_RUNNABLE:
        pytest.skip(_WHY_NOT)


@pytest.fixture(autouse=True)
def _restore_impl():
    """Tests may flip the global switch; put it back afterwards."""
    old = kernels.get_impl()
    yield
    kernels.dispatch._IMPL = old


def tolerances(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing a `dtype` result with a float64 reference.

    bf16/fp16 outputs carry half an ulp of rounding on top of fp32 accumulation,
    so two eps covers it (bf16: 2 * 2**-7 ~ 1.6e-2).  fp32 results differ from
    float64 by accumulated rounding over up to a few hundred terms, so we allow
    ~100 eps (~1.2e-5).
    """
    eps = torch.finfo(dtype).eps
    rtol = 2 * eps if dtype in (torch.bfloat16, torch.float16) else 100 * eps
    return {"rtol": rtol, "atol": rtol}


@pytest.fixture
def tol():
    return tolerances
