"""Capture readiness, proven on the CPU: trace every call of the trainer's graphed phases and
name each thing a CUDA graph could not replay (matwm_fast/graphs.py lists the rules).

A CUDA graph replays the kernels of its capture with the arguments they had then.  So a phase is
capture-ready when every call dispatches the same ops with the same Python scalars, shapes and
strides, reads its persistent tensors at the same addresses, lets no host data in except through
staged buffers, and never waits for the device.  :class:`CaptureCheck` wraps each phase function
of a trainer in a ``TorchDispatchMode`` that records, per op: its name, its non-tensor arguments
and tensor metadata, and where each input tensor comes from —

* ``local``: made earlier in the same call (on a GPU: the graph's private pool);
* ``state``: reachable from the trainer (parameters, optimiser state, caches, replay storage,
  staged inputs, ...), identified by its storage address, which must not change between calls;
* ``output``: an output of another phase's latest call (on a GPU: that graph's static output);
* anything else is *foreign* — a tensor made outside the step's state, e.g. from numpy.

The first call of a phase is its reference (the capture); every later call must match it op for
op.  Each problem names the op and the line of matwm_fast (or kernels) that dispatched it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]
_OURS = (str(ROOT / "matwm_fast"), str(ROOT / "kernels"))

# ops that make the host wait for the device (``.item()``, ``bool(t)``, data-dependent shapes)
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.equal.default, aten.is_nonzero.default, aten.allclose.default,
            aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
# ops that turn a host value into a tensor inside the step (``torch.tensor(...)``, scalar setitem)
HOST_DATA_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.lift.default}


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def reachable_storages(root) -> set[int]:
    """Storage addresses of every tensor reachable from ``root`` through matwm_fast objects,
    modules, optimisers, dataclasses and containers: the state a captured phase may read."""
    seen, ptrs, stack = set(), set(), [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or o is None or isinstance(o, (str, int, float, bool, bytes)):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            ptrs.add(_storage(o))
            stack.append(o.grad)
        elif isinstance(o, torch.optim.Optimizer):
            stack += [o.state, o.param_groups]
        elif isinstance(o, dict):
            stack += list(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack += list(o)
        elif isinstance(o, torch.nn.Module) or type(o).__module__.startswith("matwm_fast"):
            stack += list(vars(o).values())
    ptrs.discard(0)  # empty storages
    return ptrs


def call_site() -> str:
    """The innermost line of the package (or its kernels) on the stack."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.startswith(_OURS):
            return f"{Path(f.f_code.co_filename).relative_to(ROOT)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return "<outside matwm_fast>"


def tensors_of(out) -> list[torch.Tensor]:
    """The tensors of a phase's output: tensors, dataclasses (Rollout), dicts, tuples."""
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in tensors_of(getattr(out, f.name))]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_of(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors_of(v)]
    return []


def _meta(x) -> object:
    """What a graph bakes in of an argument: a tensor's shape, stride and dtype; a value otherwise."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type)
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    return x


@dataclass
class Op:
    name: str
    meta: tuple  # every argument's _meta, in pytree order
    sources: tuple  # per tensor input: ("local",) | ("state", address) | ("output", phase, index)
    site: str


@dataclass
class Call:
    ops: list[Op] = field(default_factory=list)


class _Trace(TorchDispatchMode):
    """One call of one phase."""

    def __init__(self, check: "CaptureCheck", phase: str):
        super().__init__()
        self.check, self.phase, self.call = check, phase, Call()
        self.state = reachable_storages(check.trainer)
        self.local: set[int] = set()

    def source(self, t: torch.Tensor, op: str, site: str) -> tuple:
        ptr = _storage(t)
        if ptr in self.local or ptr == 0:
            return ("local",)
        if ptr in self.check.outputs:
            return ("output",) + self.check.outputs[ptr]
        if ptr in self.state:
            return ("state", ptr)
        self.check.problem(self.phase, f"a tensor from outside the trainer's state enters {op} at {site}"
                                       f" (shape {tuple(t.shape)}): stage host data through graphs.Staged")
        return ("foreign", ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function marks (Optimizer.step's): host-only
            return func(*args, **kwargs)
        name, site = str(func), call_site()
        if func in SYNC_OPS:
            self.check.problem(self.phase, f"host sync {name} at {site}")
        if func in HOST_DATA_OPS:
            self.check.problem(self.phase, f"host data becomes a tensor ({name}) at {site}")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.check.problem(self.phase, f"boolean-mask indexing ({name}: a data-dependent shape) at {site}")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.check.problem(self.phase, f"repeat_interleave with tensor repeats and no output_size at {site}")
        leaves = pytree.tree_leaves((args, kwargs))
        sources = tuple(self.source(x, name, site) for x in leaves if isinstance(x, torch.Tensor))
        out = func(*args, **kwargs)
        inputs = {_storage(x) for x in leaves if isinstance(x, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            # a fresh allocation is local, even where it reuses the memory of a tensor freed in
            # this call (last step's gradients); a view or an in-place result is its input's
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                self.local.add(_storage(t))
                self.state.discard(_storage(t))
                self.check.outputs.pop(_storage(t), None)
        self.call.ops.append(Op(name, tuple(_meta(x) for x in leaves), sources, site))
        return out


class CaptureCheck:
    """Traces every call of ``trainer.graphs``' phase functions while installed."""

    def __init__(self, trainer, warmup: int | None = None):
        """``warmup``: calls of each phase before the one that becomes its reference (the capture),
        by default the graphs' own: eager calls on a GPU, where lazy state may be created."""
        self.trainer = trainer
        self.warmup = {name: g.warmup if warmup is None else warmup for name, g in trainer.graphs.items()}
        self.reference: dict[str, Call] = {}  # phase → its first traced call
        self.calls: dict[str, int] = {}
        self.outputs: dict[int, tuple[str, int]] = {}  # storage → (phase, output index) of the latest calls
        self.problems: list[str] = []  # each once, in the order found
        self._saved = {}

    def problem(self, phase: str, text: str) -> None:
        if f"[{phase}] {text}" not in self.problems:
            self.problems.append(f"[{phase}] {text}")

    def __enter__(self) -> "CaptureCheck":
        for name, g in self.trainer.graphs.items():
            self._saved[name] = g.fn
            g.fn = self._traced(name, g.fn)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            self.trainer.graphs[name].fn = fn

    def _traced(self, phase: str, fn):
        def run():
            trace = _Trace(self, phase)
            with trace:
                out = fn()
            self._compare(phase, trace.call)
            for ptr in [p for p, (ph, _) in self.outputs.items() if ph == phase]:
                del self.outputs[ptr]
            self.outputs.update({_storage(t): (phase, i) for i, t in enumerate(tensors_of(out))})
            return out
        return run

    def _compare(self, phase: str, call: Call) -> None:
        self.calls[phase] = self.calls.get(phase, 0) + 1
        if self.calls[phase] <= self.warmup[phase]:
            return
        ref = self.reference.setdefault(phase, call)
        if ref is call:
            return
        for i, (a, b) in enumerate(zip(ref.ops, call.ops)):
            what = ("another op" if a.name != b.name else "other scalar arguments, shapes or strides"
                    if a.meta != b.meta else "a persistent tensor at another address" if a.sources != b.sources
                    else None)
            if what:
                self.problem(phase, f"a replay dispatches {what} at op {i}: {b.name} at {b.site}; the "
                                    f"capture had {a.name} at {a.site}")
                return
        if len(ref.ops) != len(call.ops):
            self.problem(phase, f"a replay dispatches {len(call.ops)} ops, the capture {len(ref.ops)}")

    def assert_ready(self, phases=None) -> None:
        missing = [p for p in (phases or self.trainer.graphs) if self.calls.get(p, 0) < self.warmup[p] + 2]
        assert not missing, f"phases replayed fewer than twice after their capture: {missing} (calls {self.calls})"
        assert not self.problems, "not capture-ready:\n" + "\n".join(self.problems)
