"""NVTX ranges around the phases of a training step, for Nsight Systems; free when off.

``enable()`` switches them on (``python -m matwm_fast.profile --nsys`` does); otherwise
``phase(name)`` returns a shared no-op context, so the hot path pays one attribute read.
A profiler can also ``set_listener`` a hook that wraps every phase (``matwm_fast.profile`` times
the phases this way).
Ranges go through ``torch.cuda.nvtx`` on CUDA and the ``nvtx`` package elsewhere (when
installed), so ``nsys`` sees the same names with or without a GPU build of torch.
"""

from __future__ import annotations

import contextlib

_ENABLED = False
_NULL = contextlib.nullcontext()
_LISTENER = None  # a profiler's hook: name → context manager wrapped around each phase

PHASES = ("act", "env", "replay_sample", "wm_update", "imagine", "ac_update")


def enable(on: bool = True) -> None:
    global _ENABLED
    _ENABLED = on


def enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def _range(name: str):
    import torch

    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
        return
    try:
        import nvtx as _nvtx
    except ImportError:
        yield
        return
    with _nvtx.annotate(name, domain="matwm_fast"):
        yield


def set_listener(fn) -> None:
    """Install (or with None remove) a hook that wraps every phase, e.g. a per-phase timer."""
    global _LISTENER
    _LISTENER = fn


def nvtx_range(name: str):
    """The bare NVTX range of a phase (no listener), for hooks that add their own work around it."""
    return _range(name) if _ENABLED else _NULL


def phase(name: str):
    """A context manager marking ``name`` in the profile (a shared no-op when nothing listens)."""
    if _LISTENER is not None:
        return _LISTENER(name)
    return _range(name) if _ENABLED else _NULL
