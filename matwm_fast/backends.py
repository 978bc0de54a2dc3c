"""Backends for the step functions: ``eager`` (the reference), ``compile``, ``cudagraphs``, ``auto``.

The trainer's updates are built from pure pieces (see :class:`~matwm_fast.trainer.Trainer`):
``wm_loss`` (world-model forward + Eq. 3), ``wm_opt_step`` (clip + Adam), ``imagine`` (prefill
plus every decode step, sampling included), ``ac_loss`` (all agents' actor-critic forward +
Eqs. 10–13) and ``ac_opt_step`` (per-agent clip + Adam + slow-critic EMA + return scale).  A
backend wraps each piece; the backward pass between loss and optimiser step is autograd's, which
under torch.compile is the AOTAutograd-compiled backward graph.

* ``compile``: ``torch.compile(fullgraph=True)`` on each loss piece and on imagination — one
  graph per piece, a graph break is an error (the optimiser steps excepted, see below), shapes are static (positions and cache slots are device tensors), so
  nothing recompiles from one env step to the next.
* ``cudagraphs``: the same plus Inductor's CUDA-graph trees (``mode="reduce-overhead"``): each
  piece is captured once and replayed, inputs copied into static buffers, Adam ``capturable``
  with tensor learning rates, random numbers from Inductor's graph-safe Philox (fresh on every
  replay).
* ``auto``: ``cudagraphs`` on CUDA; ``eager`` on the CPU, where compiling costs more than it
  saves at our sizes (measured: see README, Performance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import kernels

BACKENDS = ("eager", "compile", "cudagraphs", "auto")


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "auto":
        return "cudagraphs" if device.type == "cuda" else "eager"
    if name == "cudagraphs" and device.type != "cuda":
        raise ValueError("backend 'cudagraphs' needs a CUDA device; on the CPU use eager or compile")
    return name


def kernel_impl(requested: str, backend: str) -> str:
    """The kernel implementation the step functions of ``backend`` run with.

    ``auto`` means the Triton kernels on CUDA under ``eager``, where each replaces a chain of
    separately launched ops; under ``compile``/``cudagraphs`` it means the reference ops, which
    Inductor fuses itself.  A Triton kernel should become the default there only once GPU timings
    show it beating Inductor's code for the same op (``bench/test_bench_kernels.py`` measures
    exactly that); none has been measured yet.  An explicit ``ref``/``triton`` is always obeyed.
    """
    if requested != "auto":
        return requested
    return "ref" if backend in ("compile", "cudagraphs") else "auto"


def _with_kernels(fn: Callable, impl: str) -> Callable:
    """Run ``fn`` under the kernel switch ``impl`` (a compiled graph guards on it: no recompiles)."""

    def run(*args, **kwargs):
        with kernels.use_impl(impl):
            return fn(*args, **kwargs)

    return run


@dataclass
class StepFunctions:
    """The five pure pieces of one training step, as the chosen backend runs them."""

    wm_loss: Callable
    wm_opt_step: Callable
    imagine: Callable
    ac_loss: Callable
    ac_opt_step: Callable
    backend: str = "eager"

    @staticmethod
    def build(tr, backend: str) -> "StepFunctions":
        pieces = dict(wm_loss=tr.wm_loss, wm_opt_step=tr.wm_opt_step, imagine=tr.imagine_rollout,
                      ac_loss=tr.ac_loss, ac_opt_step=tr.ac_opt_step)
        impl = kernel_impl(tr.cfg.train.kernels, backend)
        if backend == "eager":
            return StepFunctions(**{k: _with_kernels(f, impl) for k, f in pieces.items()}, backend=backend)
        mode = "reduce-overhead" if backend == "cudagraphs" else None
        # torch.optim's step() carries two deliberate graph breaks (around its no_grad switch,
        # pytorch#104053), so the optimiser pieces compile with fullgraph=False: the clip, the
        # Adam update, the EMA still become one graph between those breaks.  Every other piece
        # must trace whole.
        optim = {"wm_opt_step", "ac_opt_step"}
        compiled = {k: _with_kernels(torch.compile(f, fullgraph=k not in optim, mode=mode, dynamic=False), impl)
                    for k, f in pieces.items()}
        return StepFunctions(**compiled, backend=backend)
