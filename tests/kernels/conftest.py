"""Shared setup for the kernel tests.

Without a GPU the Triton kernels run under Triton's numpy interpreter, which
must be switched on *before* `triton.jit` decorates anything, i.e. before
`matwm_fast.kernels` is imported - hence the environment variable at the very top (the
repository's tests/conftest.py sets it too, for the same reason).  With a GPU we leave it
alone, so the compiled kernels are tested on CUDA tensors.

There is no global implementation switch: every test passes ``impl`` to every call.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from matwm_fast import kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton runs here if it is importable and either we have CUDA or the interpreter was
# enabled in time (it is not if something imported the kernels before this file, with
# TRITON_INTERPRET unset).
TRITON_RUNNABLE = kernels.triton_runs_on(DEVICE)
_WHY_NOT = "" if TRITON_RUNNABLE else kernels.why_triton_cannot_run(DEVICE)


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
