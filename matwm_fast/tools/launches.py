"""Kernel launches of one training env step, counted by dispatch, per phase — and the fake-tensor
run that costs the paper-size CUDA step on any machine.

Eager on a GPU the step is host-bound: every dispatched op costs ~14 µs of host time on the H100,
far more than most of its kernels take (``docs/performance.md``, "Kernel launches").  The number of
kernels per env step is therefore the budget that fusions and CUDA graphs are judged by, and it
can be counted without a GPU.

**Counting.**  :class:`LaunchCounter` is a ``TorchDispatchMode``: it sees every aten op below
autograd and autocast — what the backend runs, the backward and autocast's casts included, a
``CompositeImplicit`` op such as ``linear`` as what it decomposes into.  The phases are those of
:mod:`matwm_fast.nvtx` (its listener hook, as the profiler's timer uses it); work outside every
phase is ``other`` (replay writes, staging, bookkeeping).  Each op is sorted by :func:`kind`:

* ``sync`` — a device-to-host read (``_local_scalar_dense``, what ``item()`` runs; ``equal``,
  ``is_nonzero``): a copy and a wait rather than a launch — and inside a CUDA graph, an error;
* ``view`` — its output aliases an input (the schema says so: ``view``, ``t``, ``transpose``,
  ``expand``, ``as_strided``, ``detach``, ``alias``, ``lift_fresh``, ...; and ``_unsafe_view``,
  an alias the schema does not annotate): no kernel;
* ``metadata`` — an op that returns no tensor and writes none (``promote_types``,
  ``result_type``, the profiler's ``record_function`` marks): host work, no kernel;
* ``allocation`` — uninitialised memory (``empty*``, ``new_empty*``, ``resize_``, ``set_``): an
  allocator call, no kernel;
* ``kernel`` — everything else, counted as **one launch each**: ``zeros``, ``fill_``, ``zero_``,
  copies and casts, random draws, a ``_foreach_*`` op, fused Adam, a ``torch.library`` custom op
  (``matwm::decode_attention``).  Approximations, stated: a ``_foreach_*`` or fused-Adam op
  launches one kernel per chunk of its tensor list on CUDA; an op implemented as a composite of
  kernels is seen once (out-of-place ``index_put``, ``slice_backward``,
  ``binary_cross_entropy_with_logits``, CUDA's ``sort`` and ``embedding_dense_backward``: a few
  per step); a custom op's wrapper may launch a copy for a non-contiguous input.  So the count is
  close to, and slightly under, what a CUDA profiler would list.

Beside the launches each phase gets **bytes** (per kernel op, the elements of its tensor inputs
and outputs times their element size; an indexed write such as the KV cache's ``index_put_``
counts the rows it writes, not the whole destination, and a gather the rows it reads — an
estimate of memory traffic, exact for element-wise ops, an upper bound for in-place ones) and
**FLOPs** (``torch.utils.flop_counter``'s formulas for the matrix products, plus the decode
attention custom op's two products: what :mod:`matwm_fast.tools.flops` counts analytically).

**The paper structure.**  The count does not depend on widths or batch sizes, only on layers,
horizon, context and sequence lengths: :func:`paper_structure` is the paper preset with every
width and batch narrowed, the config the counter, the fake run's tests and the ceiling test use
(``tests/tools/test_launches.py`` checks two narrowings give the same ops, op for op).

**Fake tensors.**  :func:`fake_budget` builds the trainer and runs a step under
``FakeTensorMode``: tensors with shapes, dtypes and devices but no data, so the paper-size step
costs seconds of host time and no memory.  The tensors live on the CPU — a CPU-only build of
torch cannot run the autograd engine over fake CUDA tensors (it asks the CUDA accelerator for
streams) — and CUDA's device-dependent choices are applied to them (its autocast cast policy,
torch.optim's foreach default: :mod:`matwm_fast.tools.cuda_policy`), so the kernels counted are
those of the CUDA step.  What still differs from a CUDA run: ``.to(device)`` and ``.cpu()`` of a
tensor already on the CPU dispatch nothing, where on CUDA each is a copy (a few per env step: the
replay's uploads in ``other``, the actions' download in ``act``), and any branch of torch's C++ on
the device type (none in the ops this model uses).  Reading a fake tensor on the host gives zeros
of its shape (the env steps with action 0): the step's shapes do not depend on the values.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from unittest import mock

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .. import kernels, nvtx
from ..config import Config, preset
from ..env import env_spec
from . import cuda_policy
from .harness import SteadyTrainer

PHASES = nvtx.PHASES + ("other",)
KINDS = ("kernel", "view", "metadata", "allocation", "sync")
POLICIES = ("cuda", "cpu")  # whose device-dependent choices (autocast policy, optimiser default) apply
DEVICE = torch.device("cpu")  # where fake tensors live (see the module docstring)
# the modules whose list of tensor types may take torch's foreach and fused optimiser paths
FOREACH_TYPE_LISTS = ("torch.optim.optimizer", "torch.utils._foreach_utils")

ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided",
                         "resize_", "set_"})
UNANNOTATED_VIEWS = frozenset({"_unsafe_view"})
SYNCS = frozenset({"_local_scalar_dense", "equal", "is_nonzero"})
TENSORLESS_KERNELS = frozenset({"_assert_async"})  # returns nothing, yet launches a check on the device
# ops that move only some rows of a tensor: their bytes are the rows moved, not the whole tensor
GATHERS = frozenset({"index", "gather", "index_select", "embedding", "take"})
INDEXED_WRITES = frozenset({"index_put_", "_index_put_impl_", "index_copy_", "index_add_", "index_fill_", "scatter_",
                            "scatter_add_", "scatter_reduce_", "masked_scatter_"})


@functools.cache
def kind(func: torch._ops.OpOverload) -> str:
    """The rule of the module docstring: ``sync``, ``view``, ``metadata``, ``allocation`` or ``kernel``."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    aten = func.namespace == "aten"
    if aten and name in SYNCS:
        return "sync"
    if aten and (func.is_view or name in UNANNOTATED_VIEWS):
        return "view"
    returns_tensor = any("Tensor" in str(r.type) for r in schema.returns)
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    if not returns_tensor and not writes and name not in TENSORLESS_KERNELS:
        return "metadata"
    if aten and name in ALLOCATIONS:
        return "allocation"
    return "kernel"


# ----------------------------------------------------------------------------------- bytes, FLOPs
def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def op_bytes(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out) -> int:
    """Memory traffic of one kernel op, as the module docstring states it."""
    name = func._schema.name.split("::")[-1]
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    if name in GATHERS:  # the index, and the gathered rows read then written
        return _nbytes(ins[1:]) + 2 * _nbytes(outs)
    if name in INDEXED_WRITES:  # the indices and the values read, as many bytes written
        values = [t for t in ins[1:] if t.dtype == ins[0].dtype]
        return _nbytes(t for t in ins[1:] if t.dtype != ins[0].dtype) + 2 * _nbytes(values)
    return _nbytes(ins) + _nbytes(outs)


def _decode_attention_flops(q, k_cache, *_, **__) -> int:
    """``matwm::decode_attention``: scores and weighted values over every cache slot (the Triton
    kernel's tile holds them all, the dead ones masked), all heads together."""
    b, h, slots, d = k_cache.shape
    return 2 * 2 * b * h * slots * d


def op_flops(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out) -> int:
    """FLOPs of one op: torch's formula for the matrix products (``torch.utils.flop_counter``, the
    convention :mod:`matwm_fast.tools.flops` follows) and the decode attention custom op's; zero
    for everything else."""
    if func._schema.name == "matwm::decode_attention":
        return _decode_attention_flops(*args, **kwargs)
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


# ----------------------------------------------------------------------------------- the counter
@dataclass
class Tally:
    """One phase's ops: how many of each kind, the bytes and FLOPs of its kernels, and which ops."""

    kernel: int = 0
    view: int = 0
    metadata: int = 0
    allocation: int = 0
    sync: int = 0
    bytes: int = 0
    flops: int = 0
    ops: Counter = field(default_factory=Counter)  # op → dispatches, every kind (the histogram)
    kernel_ops: Counter = field(default_factory=Counter)  # op → launches

    @property
    def dispatched(self) -> int:
        return self.kernel + self.view + self.metadata + self.allocation + self.sync

    def add(self, other: "Tally") -> None:
        for k in KINDS + ("bytes", "flops"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.ops.update(other.ops)
        self.kernel_ops.update(other.kernel_ops)

    def to_dict(self, top: int = 0) -> dict:
        """The counts; with ``top``, the ``top`` most launched kernel ops too."""
        d = {"dispatched": self.dispatched, "kernels": self.kernel, "views": self.view, "metadata": self.metadata,
             "allocations": self.allocation, "syncs": self.sync, "bytes": self.bytes, "flops": self.flops}
        return d | ({"top_kernels": dict(self.kernel_ops.most_common(top))} if top else {})


class LaunchCounter(TorchDispatchMode):
    """Tallies every aten (and custom) op dispatched while :meth:`counting`, by phase; with
    ``record``, also the sequence of (phase, op) in dispatch order."""

    def __init__(self, record: bool = False):
        super().__init__()
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.sequence: list[tuple[str, str]] | None = [] if record else None
        self._stack = ["other"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":  # a fake tensor asking for its device: no op of a real run
            return out
        t, k = self.tallies[self._stack[-1]], kind(func)
        setattr(t, k, getattr(t, k) + 1)
        t.ops[str(func)] += 1
        if self.sequence is not None:
            self.sequence.append((self._stack[-1], str(func)))
        if k == "kernel":
            t.kernel_ops[str(func)] += 1
            t.bytes += op_bytes(func, args, kwargs, out)
            t.flops += op_flops(func, args, kwargs, out)
        return out

    @contextlib.contextmanager
    def _phase(self, name: str):
        self._stack.append(name)
        try:
            with nvtx.nvtx_range(name):
                yield
        finally:
            self._stack.pop()

    @contextlib.contextmanager
    def counting(self):
        nvtx.set_listener(self._phase)
        try:
            with self:
                yield self
        finally:
            nvtx.set_listener(None)

    def step(self) -> Tally:
        """All phases together."""
        total = Tally()
        for t in self.tallies.values():
            total.add(t)
        return total

    def report(self, top: int = 0) -> dict:
        """``{"phases": {phase: counts}, "step": counts}`` (:meth:`Tally.to_dict`), every phase of
        :data:`PHASES` present."""
        return {"phases": {p: self.tallies[p].to_dict(top) for p in PHASES}, "step": self.step().to_dict(top)}


def count_step(tr, record: bool = False) -> LaunchCounter:
    """The ops of one ``tr.train_step()``, per phase (``record``: and in order)."""
    counter = LaunchCounter(record)
    with counter.counting():
        tr.train_step()
    return counter


def countable(backend: str, device: torch.device) -> bool:
    """Whether a step of this backend dispatches its ops one by one: eager, and ``graphs`` where
    it is a pass-through (the CPU).  Inductor's code and a replayed CUDA graph dispatch none."""
    return backend == "eager" or (backend == "graphs" and device.type != "cuda")


# ----------------------------------------------------------------------------------- the structure
def narrowed(cfg: Config, scale: int = 1) -> Config:
    """``cfg`` with every width and batch narrowed and every structural size kept (layers, heads,
    horizon, context, sequence lengths, the acting queue): the same ops, at a size that runs in
    milliseconds.  ``scale`` multiplies the widths and batches; every size stays ≥ 2, since a
    size-1 axis can turn a copy into a view."""
    n, s = env_spec(cfg.env).n_agents, 2 * scale
    wm, ac = cfg.wm, cfg.ac
    wm = replace(wm, latent_vars=s, latent_classes=s, mlp_width=s, width=wm.heads * s, head_width=s,
                 tp_width=wm.tp_heads * s, reward_bins=s, batch_size=n * s,  # s sequences per agent
                 cnn_channels=s)  # image observations: the conv stack's stages kept, its channels narrowed
    ac = replace(ac, mlp_width=s, imag_batch=s)
    cfg = replace(cfg, wm=wm, ac=ac)
    return least_fill(replace(cfg, replay=replace(cfg.replay, capacity=least_warmup(cfg))))


def paper_structure(scenario: str | None = None, scale: int = 1) -> Config:
    """The paper step's structure at narrow widths (:func:`narrowed` ``paper`` preset): the one
    config the launch counts, the fake run's checks and the launch ceiling are measured at."""
    return narrowed(preset("paper", scenario), scale)


def least_warmup(cfg: Config) -> int:
    """The smallest ``replay.warmup`` ``config.validate`` accepts for ``cfg``."""
    per_agent = cfg.wm.batch_size // env_spec(cfg.env).n_agents
    return max(2 * per_agent * cfg.wm.seq_len, cfg.ac.context_len)


def least_fill(cfg: Config) -> Config:
    """``cfg`` filling its replay only as far as it must before training: the fill is host work
    that shapes nothing in a training step, and under fake tensors it is most of the run."""
    return replace(cfg, replay=replace(cfg.replay, warmup=least_warmup(cfg)))


# ----------------------------------------------------------------------------------- fake tensors
def _host_zeros(self: FakeTensor, *args, **kwargs) -> np.ndarray:
    """A fake tensor read on the host: zeros of its shape (bf16, which numpy lacks, as float32),
    after the ``detach`` a real ``numpy()`` dispatches."""
    self.detach()
    name = str(self.dtype).removeprefix("torch.")
    return np.zeros(tuple(self.shape), dtype=np.float32 if name == "bfloat16" else np.dtype(name))


_module_to = torch.nn.Module.to


def _to_in_place(self: torch.nn.Module, *args, **kwargs):
    """``Module.to`` of a module whose fake parameters are already where asked: nothing to move
    (torch would swap each parameter for a copy of itself, which it refuses for a fake one)."""
    device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
    params = list(self.parameters())
    if dtype is None and params and all(isinstance(p, FakeTensor) and p.device == (device or p.device) for p in params):
        return self
    return _module_to(self, *args, **kwargs)


@contextlib.contextmanager
def fake_tensors(policy: str = "cuda"):
    """Within: every tensor made is a fake CPU tensor, and the step follows ``policy``'s
    device-dependent choices (``cuda``: :func:`cuda_policy.cuda_policy`; ``cpu``: the CPU's own).
    Scoped patches only: host reads give zeros; ``Module.to`` of a fake module already in place
    is a no-op; fake tensors take torch's foreach and fused optimiser paths as real ones do; the
    Triton kernels count as runnable (their fake implementations give the shapes; none runs)."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: valid: {', '.join(POLICIES)}")
    with contextlib.ExitStack() as stack:
        if policy == "cuda":
            stack.enter_context(cuda_policy.cuda_policy())
        for module in map(importlib.import_module, FOREACH_TYPE_LISTS):
            types = module._foreach_supported_types
            stack.enter_context(mock.patch.object(module, "_foreach_supported_types", [*types, FakeTensor]))
        stack.enter_context(mock.patch.object(FakeTensor, "numpy", _host_zeros, create=True))
        stack.enter_context(mock.patch.object(torch.nn.Module, "to", _to_in_place))
        stack.enter_context(mock.patch.object(kernels.dispatch, "TRITON_INTERPRET", True))
        stack.enter_context(warnings.catch_warnings())
        # a deep copy of a module (imagination's bf16 twins) asks each fake tensor for its data
        # pointer, which torch deprecates for fake tensors: harmless here, there is no data
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        yield stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))


def fake_budget(cfg: Config, kernels_impl: str = "ref", amp: str = "bf16", policy: str = "cuda", top: int = 0,
                backend: str = "eager") -> dict:
    """One steady env step of ``cfg`` (any size) under fake tensors: the counter's report
    (:meth:`LaunchCounter.report`) after a replay fill and one training step (Adam's state is
    made there), with what ran.  Raises ValueError for what cannot be counted."""
    if not countable(backend, DEVICE):
        raise ValueError(f"--backend {backend!r}: a fake step counts ops dispatched one by one; valid: eager, graphs")
    if kernels_impl == "triton" and not kernels.HAS_TRITON:
        raise ValueError(f"--kernels 'triton': {kernels.why_triton_cannot_run(DEVICE)}; valid here: ref")
    with fake_tensors(policy):
        w = SteadyTrainer.build(cfg, 1, device=str(DEVICE), backend=backend, kernels=kernels_impl, amp=amp)
        report = count_step(w.tr).report(top)
    return report | {"runtime": w.tr.rt.describe() | {"device": f"fake {DEVICE}", "policy": policy},
                     "fill_s": round(w.fill_s, 2), "warmup_s": round(w.warmup_s, 2)}
