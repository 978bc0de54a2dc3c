"""What the first stage measures inside one training step: host syncs per phase, kernels per
phase, and whether a replayed rollout equals the eager one.

Each probe wraps the trainer's own phases through :func:`matwm_fast.nvtx.set_listener` (the marks
``Trainer.train_step`` already makes), so what is probed is the real step, not a copy of it.

* :class:`SyncCensus` — every host synchronisation of a step, with its phase and call site.  On
  CUDA it is torch's own detector, ``torch.cuda.set_sync_debug_mode``: ``warn`` to list every
  site, ``error`` inside the phases that a CUDA graph captures (:data:`STRICT`), where a sync
  would break the capture, so that one raises there.  On the CPU (the rehearsal) a dispatch mode
  stands in, flagging the ops that synchronise on any device (``nonzero``, ``item``, boolean
  indexing, ...): the same code path, a cruder detector.
* :func:`profile_step` — one step under ``torch.profiler``, each phase a ``record_function``;
  every GPU kernel is attributed to the phase whose range holds the host call that launched it
  (the runtime or driver event of the same correlation id: backward's kernels, launched from
  autograd's thread, land in their phase too).  Kernel count and kernel time summed per phase.
* :func:`compare_rollouts` — two rollouts of the same contexts and noise: the share of actions
  that differ (a near-tie may flip a rare Gumbel argmax) and the relative error of the states on
  the rows whose actions all agree.
"""

from __future__ import annotations

import contextlib
import json
import math
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from matwm_fast import nvtx

# the phases a CUDA graph captures whole: a host sync in them breaks the capture
STRICT = ("wm_update", "imagine", "ac_update")
# where a sync is inherent: the actions go to the host's env, and the env runs there
ALLOWED = {"act": "the actions go to the CPU env", "env": "the env steps on the host"}
OUTSIDE = "(outside any phase)"
ROOT = Path(__file__).resolve().parents[2]  # the checkout
OURS = (str(ROOT / "matwm_fast") + "/", str(ROOT / "kernels") + "/")  # the project's code, for call sites
# where a sync's caller is not: torch, the standard library, this file
NOT_A_SITE = (str(Path(torch.__file__).parent), str(Path(contextlib.__file__).parent), __file__)
PREFIX = "phase/"  # the profiler's range of a phase
# ops that wait for the device whatever it is (the CPU stand-in for set_sync_debug_mode)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
            "unique_dim", "equal", "is_nonzero")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def site(frames: list[traceback.FrameSummary], depth: int = 3) -> list[str]:
    """The innermost ``depth`` frames in the project's code (``matwm_fast/``, ``kernels/``), innermost
    first: where a sync was called from, ``path:line in function: code``.  Outside the project's
    code (a test), the innermost frame that is neither torch's, the standard library's nor this
    detector's."""
    ours = [f for f in frames if f.filename.startswith(OURS)]
    others = [f for f in frames if not f.filename.startswith(NOT_A_SITE)]
    picked = ours[-depth:][::-1] or others[-1:]
    return [f"{Path(f.filename).relative_to(ROOT) if f.filename.startswith(OURS) else f.filename}:{f.lineno} "
            f"in {f.name}: {(f.line or '').strip()}" for f in picked]


class _HostSyncOps(TorchDispatchMode):
    """The CPU's stand-in for ``set_sync_debug_mode``: calls back on ops that synchronise."""

    def __init__(self, on_sync):
        super().__init__()
        self.on_sync = on_sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()))
        if name in SYNC_OPS or bool_index or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor)
                                              and len(args) > 1 and isinstance(args[1], torch.Tensor)):
            self.on_sync(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class SyncCensus:
    """Host syncs of the steps run while :meth:`installed`: ``found`` lists (phase, op, call site).

    ``error_in``: phases in which a sync raises (``RuntimeError``, as ``set_sync_debug_mode("error")``
    does); elsewhere it is only recorded.  ``raised`` then holds the phase and site of the one that
    raised."""

    def __init__(self, device: torch.device, error_in: tuple[str, ...] = ()):
        self.device, self.error_in = device, set(error_in)
        self.found: list[dict] = []
        self.raised: dict | None = None
        self.phase = OUTSIDE
        self.detector = "torch.cuda.set_sync_debug_mode" if device.type == "cuda" else "dispatch mode (CPU stand-in)"

    def _record(self, op: str) -> None:
        self.found.append({"phase": self.phase, "op": op, "site": site(traceback.extract_stack()[:-2])})

    def _cpu_sync(self, op: str) -> None:
        if self.phase in self.error_in:
            raise RuntimeError(f"called a synchronizing operation ({op}) in phase {self.phase}")
        self._record(op)

    @contextlib.contextmanager
    def _phase(self, name: str):
        outer = self.phase
        self.phase = name
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode("error" if name in self.error_in else "warn")
        try:
            with nvtx.nvtx_range(name):
                yield
        except RuntimeError as e:
            if self.raised is None and "synchroniz" in str(e):
                self.raised = {"phase": name, "message": str(e).splitlines()[0][:300],
                               "site": site(traceback.extract_tb(e.__traceback__))}
            raise
        finally:
            self.phase = outer
            if cuda:
                torch.cuda.set_sync_debug_mode("error" if outer in self.error_in else "warn")

    @contextlib.contextmanager
    def installed(self):
        cuda = self.device.type == "cuda"
        old_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                self._record("a synchronizing CUDA operation")
            else:
                old_show(message, category, filename, lineno, file, line)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            nvtx.set_listener(self._phase)
            mode = _HostSyncOps(self._cpu_sync) if not cuda else contextlib.nullcontext()
            try:
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                with mode:
                    yield self
            finally:
                nvtx.set_listener(None)
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    def report(self) -> dict:
        """Per phase: how many syncs and their distinct sites; which are in strict phases."""
        phases: dict[str, dict] = {}
        for f in self.found:
            p = phases.setdefault(f["phase"], {"count": 0, "sites": {}})
            p["count"] += 1
            key = " <- ".join(f["site"][:2]) + f" [{f['op']}]"
            p["sites"][key] = p["sites"].get(key, 0) + 1
        strict = {p: r for p, r in phases.items() if p in STRICT}
        return {"detector": self.detector, "phases": phases, "strict_phases": list(STRICT),
                "allowed": ALLOWED, "in_strict": sum(r["count"] for r in strict.values()),
                "raised": self.raised}


# ----------------------------------------------------------------------------------- kernels per phase
def profile_step(tr, work: Path) -> dict:
    """One ``train_step`` under ``torch.profiler``: kernels (count, summed ms) per phase, plus the
    host ops dispatched in each; the chrome trace goes to ``work``."""
    cuda = tr.device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sync(tr.device)
    with torch.profiler.profile(activities=acts) as prof:
        nvtx.set_listener(lambda name: torch.profiler.record_function(PREFIX + name))
        try:
            tr.train_step()
            sync(tr.device)
        finally:
            nvtx.set_listener(None)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "trace.json"
    prof.export_chrome_trace(str(path))
    with open(path) as f:
        return phase_kernels(json.load(f))


def phase_kernels(trace: dict | list) -> dict:
    """Per phase of a chrome trace (``torch.profiler``'s export): GPU kernels (count, summed ms),
    memcpys and memsets, and host ops (``cpu_op`` events, nested ones included).  A kernel belongs
    to the phase whose range holds the launching call (same ``correlation`` id)."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    ranges = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"][len(PREFIX):]) for e in events
                    if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(PREFIX))

    def phase_at(ts) -> str:
        if ts is None:
            return "(launch not found)"
        inner = [r for r in ranges if r[0] <= ts <= r[1]]
        return min(inner, key=lambda r: r[1] - r[0])[2] if inner else OUTSIDE

    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in (e.get("args") or {})}
    out: dict[str, dict] = defaultdict(lambda: {"kernels": 0, "kernel_ms": 0.0, "memcpy": 0, "memset": 0,
                                                "cpu_ops": 0, "wall_ms": 0.0})
    for t0, t1, name in ranges:
        out[name]["wall_ms"] += (t1 - t0) / 1e3
    for e in events:
        cat = e.get("cat")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            rec = out[phase_at(launches.get((e.get("args") or {}).get("correlation")))]
            if cat == "kernel":
                rec["kernels"] += 1
                rec["kernel_ms"] += e.get("dur", 0) / 1e3
            else:
                rec["memcpy" if cat == "gpu_memcpy" else "memset"] += 1
        elif cat == "cpu_op":
            out[phase_at(e.get("ts"))]["cpu_ops"] += 1
    phases = {k: {**v, "kernel_ms": round(v["kernel_ms"], 4), "wall_ms": round(v["wall_ms"], 4)} for k, v in out.items()}
    total = {k: sum(p[k] for p in phases.values()) for k in ("kernels", "kernel_ms", "memcpy", "memset", "cpu_ops")}
    total["kernel_ms"] = round(total["kernel_ms"], 4)
    return {"phases": phases, "total": total}


# ----------------------------------------------------------------------------------- equality
def tolerance(amp: str) -> float:
    """Relative error allowed between two runs of the same kernels: bf16 operands land between
    1e-3 and 1e-2 (8 significant bits: a rounding of up to 2^-8 ≈ 4e-3 per operand), float32 far
    under 1e-3."""
    return 1e-2 if amp == "bf16" else 1e-4


def compare_rollouts(a, b, tol: float) -> dict:
    """``a`` against ``b`` (Rollouts of the same contexts and noise): the share of differing
    actions, and the states' and rewards' relative error on the rows whose actions all agree."""
    same_rows = (a.actions == b.actions).all(-1)  # (n, B)
    mismatch = float((a.actions != b.actions).double().mean())

    def rel(x, y) -> float:
        x, y = x[same_rows].double(), y[same_rows].double()
        if x.numel() == 0:
            return math.nan
        return float((x - y).norm() / y.norm().clamp_min(1e-30))

    finite = bool(torch.isfinite(a.states).all() and torch.isfinite(b.states).all())
    states, rewards = rel(a.states, b.states), rel(a.rewards, b.rewards)
    ok = finite and mismatch <= 0.01 and states <= tol and (math.isnan(rewards) or rewards <= tol)
    return {"ok": ok, "action_mismatch": mismatch, "rows_all_equal": float(same_rows.double().mean()),
            "states_rel_err": states, "rewards_rel_err": rewards, "tolerance": tol, "finite": finite,
            "bitwise_equal": bool(torch.equal(a.states, b.states) and torch.equal(a.actions, b.actions))}
