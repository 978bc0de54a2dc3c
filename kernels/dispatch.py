"""Which implementation an op runs: chosen by the caller, per call, never by a global switch.

Every public op takes ``impl``:

* ``'ref'``    - the eager PyTorch reference (runs anywhere; what Inductor compiles);
* ``'triton'`` - the Triton kernel, wrapped as a `torch.library` custom op.  Needs Triton and a
  CUDA tensor, or ``TRITON_INTERPRET=1`` (Triton's numpy interpreter, used by the CPU tests).

The model decides once, at construction (``WorldModel(..., kernels=...)``, the entry point's
``--kernels`` resolved by :func:`matwm_fast.runtime.resolve_runtime`), and passes its choice to
every call, so a compiled graph sees a constant string and nothing can change underneath it.
"""

from __future__ import annotations

import torch

from ._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, TRITON_INTERPRET

IMPLS = ("ref", "triton")


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether ``impl='triton'`` can run on tensors of ``device`` in this process."""
    return HAS_TRITON and (torch.device(device).type == "cuda" or TRITON_INTERPRET)


def why_triton_cannot_run(device: torch.device | str) -> str:
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    return (f"Triton kernels need a CUDA device, and this one is {torch.device(device)} (the CPU runs them only "
            "in Triton's interpreter, TRITON_INTERPRET=1 set before import, which is for tests)")


def check_impl(impl: object, tensor: torch.Tensor) -> str:
    """``impl`` validated for an op whose main input is ``tensor``: 'ref' or 'triton'."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; allowed values are {', '.join(map(repr, IMPLS))}")
    if impl == "triton" and not triton_runs_on(tensor.device):
        raise RuntimeError(f"impl='triton' cannot run here: {why_triton_cannot_run(tensor.device)}; use impl='ref'")
    return impl
