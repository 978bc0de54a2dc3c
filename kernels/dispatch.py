"""The single switch that picks an implementation for every op in `kernels`.

Valid names:

* ``'ref'``    - eager PyTorch reference (runs anywhere, traced by torch.compile);
* ``'triton'`` - the Triton kernels, wrapped as `torch.library` custom ops.  Needs
  Triton and a CUDA tensor, or ``TRITON_INTERPRET=1`` (Triton's numpy interpreter,
  used by the CPU tests) for CPU tensors;
* ``'auto'``   - ``'triton'`` when the input tensor is on CUDA and Triton is
  importable, otherwise ``'ref'``.  Never picks the (slow) interpreter.

The global default is ``'auto'``, or the value of the ``MATWM_KERNEL_IMPL``
environment variable when set.  Every public op takes ``impl=None`` meaning
"use the global switch"; a string there overrides it for that call.

`resolve_impl` only reads a module global and ``tensor.is_cuda``, so
TorchDynamo can trace it: the choice is baked into a compiled graph and guarded
on, and changing the switch later triggers a recompile instead of being ignored.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from ._triton_compat import HAS_TRITON, TRITON_IMPORT_ERROR, TRITON_INTERPRET

ALLOWED_IMPLS = ("ref", "triton", "auto")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in ALLOWED_IMPLS:
        raise ValueError(
            f"unknown kernel impl {name!r}; allowed values are "
            f"{', '.join(repr(n) for n in ALLOWED_IMPLS)}"
        )
    return name


def _triton_unavailable_message() -> str:
    return (
        "impl='triton' was requested but triton is not importable "
        f"({TRITON_IMPORT_ERROR}); allowed values are 'ref', 'triton', 'auto' - use "
        "'ref' (eager PyTorch) or 'auto' (falls back to 'ref' without triton)"
    )


_IMPL: str = _check_name(os.environ.get("MATWM_KERNEL_IMPL", "auto"))


def set_impl(name: str) -> None:
    """Set the global implementation ('ref', 'triton' or 'auto')."""
    global _IMPL
    name = _check_name(name)
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError(_triton_unavailable_message())
    _IMPL = name


def get_impl() -> str:
    """The global implementation name (one of ALLOWED_IMPLS)."""
    return _IMPL


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Temporarily set the global implementation; restores the old one on exit."""
    old = get_impl()
    set_impl(name)
    try:
        yield
    finally:
        set_impl(old)


def triton_available() -> bool:
    return HAS_TRITON


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """Concrete implementation ('ref' or 'triton') for an op whose main input is `tensor`."""
    name = _IMPL if impl is None else _check_name(impl)
    if name == "ref":
        return "ref"
    if name == "auto":
        return "triton" if (HAS_TRITON and tensor.is_cuda) else "ref"
    # explicit 'triton'
    if not HAS_TRITON:
        raise RuntimeError(_triton_unavailable_message())
    if not tensor.is_cuda and not TRITON_INTERPRET:
        raise RuntimeError(
            f"impl='triton' needs a CUDA tensor, got one on {tensor.device}; set "
            "TRITON_INTERPRET=1 before importing kernels to run Triton's CPU "
            "interpreter, or use impl='ref' / 'auto' (allowed: 'ref', 'triton', 'auto')"
        )
    return "triton"
