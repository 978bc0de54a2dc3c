"""Guarded Triton import shared by every op file.

The model must import `kernels` on machines without Triton (macOS, CPU-only
CI, a broken install), so nothing here may raise at import time.  When Triton
is missing we export stand-ins:

* `tl` is an object whose attributes are placeholders, so kernel signatures such
  as `BLOCK: tl.constexpr` still evaluate when the `def` statement runs;
* `jit` returns a `_MissingKernel` that raises if anyone tries to launch it.

Every op validates its `impl` first (`kernels.dispatch.check_impl`), which
refuses `impl='triton'` where Triton cannot run, before any kernel could be
launched (and the runtime refuses `--kernels triton` there before a model is
built), so the stand-ins are never called in practice; they only keep the
module importable.
"""

from __future__ import annotations

import os

try:  # pragma: no cover - which branch runs depends on the machine
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_VERSION = getattr(triton, "__version__", "unknown")
    TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising anything else
    triton = None
    HAS_TRITON = False
    TRITON_VERSION = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _Placeholder:
        """Stands in for `tl.constexpr`, `tl.float32`, ... in signatures."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __repr__(self) -> str:
            return f"<triton missing: tl.{self._name}>"

    class _MissingLanguage:
        def __getattr__(self, name: str) -> _Placeholder:
            return _Placeholder(name)

    tl = _MissingLanguage()

# Triton decides interpreter-vs-compiled when `@triton.jit` runs (i.e. when the
# op modules are imported), so we read the variable once, at the same moment.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _MissingKernel:
    """Returned by `jit` when Triton is absent; launching it is an error."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __getitem__(self, grid):
        raise RuntimeError(
            f"Triton kernel {self.__name__} cannot run: triton is not importable "
            f"({TRITON_IMPORT_ERROR}). Use impl='ref'."
        )


def jit(fn):
    """`triton.jit` when Triton is importable, else a non-launchable stand-in."""
    if HAS_TRITON:
        return triton.jit(fn)
    return _MissingKernel(fn.__name__)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block shapes must be powers of 2."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
