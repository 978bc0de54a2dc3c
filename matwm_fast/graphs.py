"""CUDA graphs captured straight from the eager step functions: no Dynamo, no Inductor.

Eager, the paper step launches ~4,000 kernels per env step and pays ~14 µs of host time for
each (bench/results/gpu/): the GPU idles most of the step.  A CUDA graph records a phase's
kernels once and replays them with one launch.  Capturing the *eager* functions costs a few
warm-up calls and one recording pass — seconds, independent of the horizon — where Inductor
spent minutes per graph set on every new configuration.

:class:`Graph` wraps a zero-argument function of one phase (acting, the world-model update,
imagination, the actor-critic update).  On CUDA its first ``warmup`` calls run eagerly on a side
stream (Adam's lazy state, cuBLAS workspaces, Triton's JIT all happen there), the next call
records it into a ``torch.cuda.CUDAGraph`` and replays it, and every later call only replays.
On the CPU it is a plain call: CI runs the very functions the GPU replays.

What a captured function must obey (``tests/test_graphs.py`` traces two calls of every phase on
the CPU and fails on a breach, naming the call site):

* every tensor it reads lives at a fixed address: parameters, optimiser state, caches, replay
  storage, and host data only through :class:`Staged` buffers;
* no host synchronisation (``.item()``, ``nonzero``, boolean-mask indexing, ...) and no host
  data (``torch.tensor(...)``, ``from_numpy(...).to(device)``) inside it;
* the same ops with the same Python scalars on every call: a changing number is a device tensor;
* Adam ``fused`` and ``capturable``, gradients set to None before the capture so backward
  allocates them in the graph's pool and the clip and Adam of the same graph consume them;
* random numbers from the default CUDA generator, which the capture registers: each replay
  advances its Philox offset, so two replays draw different numbers.

Outputs are the graph's static tensors, overwritten by its next replay: read them (or enqueue
the work that reads them) before calling again.  After anything replaces a tensor a graph reads
(``load_state_dict`` of the trainer), :meth:`Graph.reset` makes the next call capture anew.
"""

from __future__ import annotations

import time
from typing import Callable, Generic, TypeVar

import numpy as np
import torch

Tensor = torch.Tensor
T = TypeVar("T")


class Staged:
    """A device buffer at a fixed address, filled from a pinned host buffer: the one way host
    data (numpy's sampled indices, the env's observation) enters a captured phase.

    ``put`` writes the host copy and enqueues a non-blocking copy to the device; before the host
    copy is written again it waits for the previous transfer to finish (an event, normally
    long complete), so a value is never overwritten while the DMA still reads it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=cuda)  # page-locked on CUDA: a true async copy
        self.device = torch.zeros(shape, dtype=dtype, device=device)
        self._host_np = self.host.numpy()
        self._copied = torch.cuda.Event() if cuda else None

    def put(self, values: np.ndarray | float | int) -> Tensor:
        if self._copied is not None:
            self._copied.synchronize()
        self._host_np[...] = values
        self.device.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return self.device


class Graph(Generic[T]):
    """``fn()`` replayed from a CUDA graph after ``warmup`` eager calls; a plain call on the CPU
    or with ``capture`` False (the other backends keep the same phases, uncaptured).

    ``capture_s`` is the host seconds the recording and the first replay took (None before),
    ``calls`` how often it ran in all."""

    def __init__(self, fn: Callable[[], T], device: torch.device | str, warmup: int = 2, name: str = "",
                 capture: bool = True):
        self.fn, self.device, self.warmup, self.name = fn, torch.device(device), warmup, name
        self.graphed = capture and self.device.type == "cuda"
        self.capture_s: float | None = None
        self.calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: T | None = None
        self._eager_calls = 0

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def reset(self) -> None:
        """Capture again at the next call (after a warm-up): the tensors it reads were replaced."""
        self._graph, self._out, self._eager_calls, self.capture_s = None, None, 0, None

    def __call__(self) -> T:
        self.calls += 1
        if not self.graphed:
            return self.fn()
        if self._graph is not None:
            self._graph.replay()
            return self._out  # type: ignore[return-value]
        if self._eager_calls < self.warmup:
            self._eager_calls += 1
            return self._side_stream_call()
        return self._capture()

    def _side_stream_call(self) -> T:
        """An eager call on a side stream, as torch's capture recipe asks of the warm-up: lazy
        initialisation (optimiser state, library handles) then happens off the capture stream."""
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = self.fn()
        main.wait_stream(side)
        return out

    def _capture(self) -> T:
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # a private memory pool per graph: outputs live until its next replay
                out = self.fn()
        except RuntimeError as e:  # a sync or host data in the phase: say which phase, and the way out
            raise RuntimeError(f"capturing the {self.name or 'step'} phase as a CUDA graph failed ({e}); "
                               "tests/test_graphs.py traces the phases on the CPU and names the call site; "
                               "--backend eager runs the same functions uncaptured") from e
        graph.replay()  # capturing records the kernels without running them: this call's work
        torch.cuda.synchronize(self.device)
        self._graph, self._out = graph, out
        self.capture_s = time.perf_counter() - t0
        return out
