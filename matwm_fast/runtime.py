"""How the step functions run — device, backend, kernels, precision — resolved once per entry
point from the config's ``run`` section and the machine (:func:`resolve_runtime`), and what follows
from it for the optimisers and autocast.

The config has already checked every name against its choices (``config.RULES``); the functions
here only turn ``auto`` into a choice and refuse what this machine cannot run, naming the flag.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import kernels
from .config import RunConfig

EAGER_OPS = ("eager", "graphs")  # the backends that run the step functions as written

@dataclass(frozen=True)
class Runtime:
    """How the step functions run: resolved once from ``RunConfig`` and the machine."""

    device: torch.device
    backend: str  # eager | graphs | compile | cudagraphs
    kernels: str  # ref | triton: what every kernel call of the model runs
    amp: torch.dtype | None  # autocast dtype of the world model and imagination; None = float32
    rollout_graph: str = "whole"  # whole | step: what a compiled backend makes one graph of in imagination

    def describe(self) -> dict:
        """What ran, for config.json and logs."""
        return {"device": str(self.device), "backend": self.backend, "kernels": self.kernels,
                "amp": {None: "fp32", torch.bfloat16: "bf16"}[self.amp], "rollout_graph": self.rollout_graph}

    @property
    def cache_dtype(self) -> torch.dtype:
        """Imagination's key/value caches hold what autocast computes."""
        return self.amp or torch.float32


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must be a device torch accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: unknown device; valid: auto, cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: device '{name}' requested but CUDA is not available; valid here: auto, cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: unsupported device; valid: auto, cpu, cuda, cuda:N")
    return dev


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto``: Inductor's CUDA graphs on CUDA; eager on the CPU, where compiling costs more than
    it saves at our sizes (docs/performance.md).  ``graphs`` runs anywhere: on the CPU its phases
    are plain calls of the eager functions (what CI tests), on CUDA they are captured."""
    if name == "auto":
        return "cudagraphs" if device.type == "cuda" else "eager"
    if name == "cudagraphs" and device.type != "cuda":
        raise ValueError("--backend 'cudagraphs': needs a CUDA device; on the CPU use eager, graphs or compile")
    return name


def resolve_kernels(name: str, device: torch.device, backend: str) -> str:
    """``auto``: the Triton kernels under ``eager`` and ``graphs`` on CUDA, where each replaces a
    chain of separately launched ops; the reference ops under ``compile``/``cudagraphs``, which
    Inductor fuses itself, until a GPU measurement shows a kernel beating Inductor's code for its op."""
    if name == "auto":  # never Triton's CPU interpreter (a test tool): CUDA only
        as_written = backend in EAGER_OPS
        return "triton" if as_written and device.type == "cuda" and kernels.triton_runs_on(device) else "ref"
    if name == "triton" and not kernels.triton_runs_on(device):
        raise ValueError(f"--kernels 'triton': {kernels.why_triton_cannot_run(device)}; valid here: ref, auto")
    return name


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), read from torch's
    own CPU feature detection.  There bf16 matmuls run at several times the float32 rate: 4.7× on
    one thread of an AMD EPYC with AVX512-BF16 (465 vs 100 GFLOP/s, 3072×512 @ 512×2048), 4.3× on
    an Intel Xeon with AMX (365 vs 85, bench/results/cpu-profile-amx.md); without them bf16 is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, torch ≥ 2.3
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA, and on a CPU that has native bf16 matmuls (:func:`cpu_has_fast_bf16`);
    float32 elsewhere.  The choice is by feature, not a timing at start-up, so the same machine
    always makes the same choice (a resumed run continues in the precision it started in)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else None
    if name not in ("bf16", "fp32"):
        raise ValueError(f"--run.amp {name!r}: valid: auto, bf16, fp32")
    return torch.bfloat16 if name == "bf16" else None


def resolve_rollout_graph(name: str, device: torch.device) -> str:
    """``auto``: one graph per piece on CUDA, where the first GPU run (bench/results/gpu/) could
    not compile the unrolled rollout within minutes; the whole rollout on the CPU, where a 20k-step
    run amortises its compilation and saves H guard checks per env step."""
    if name == "auto":
        return "step" if device.type == "cuda" else "whole"
    if name not in ("whole", "step"):
        raise ValueError(f"--run.rollout-graph {name!r}: valid: whole, step, auto")
    return name


def resolve_runtime(run: RunConfig) -> Runtime:
    device = resolve_device(run.device)
    backend = resolve_backend(run.backend, device)
    return Runtime(device, backend, resolve_kernels(run.kernels, device, backend), resolve_amp(run.amp, device),
                   resolve_rollout_graph(run.rollout_graph, device))


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()



# ----------------------------------------------------------------------------- the optimisers
def eager_ops(rt: Runtime) -> bool:
    """Whether the step functions run as written (``eager``, and ``graphs``, which captures them)
    rather than as Inductor's code (``compile``, ``cudagraphs``)."""
    return rt.backend in EAGER_OPS


def grads_to_none(rt: Runtime) -> bool:
    """Whether each update sets the gradients to None so that backward allocates them afresh: no
    zero-fill kernels, and under ``graphs`` the captured backward allocates them in its graph's
    pool for the clip and Adam of the same graph.  Inductor's CUDA-graph trees instead need
    gradients allocated once outside them (:class:`~matwm_fast.trainer.Trainer`)."""
    return eager_ops(rt)


def adam(params, lr: float, eps: float, rt: Runtime) -> torch.optim.Adam:
    """Adam as the backend runs it.  Under the eager functions: ``fused`` (one kernel group per
    step, no host-side step counters or ``.item()``), and on CUDA under ``graphs`` also
    ``capturable`` with a device-tensor learning rate — a non-capturable Adam computes its bias
    corrections as host floats, which a graph would freeze at their capture-time values.  Under
    Inductor the multi-tensor Adam it traces (capturable, tensor learning rate, for ``cudagraphs``)."""
    capturable = rt.device.type == "cuda" and rt.backend in ("graphs", "cudagraphs")
    rate = torch.tensor(lr, device=rt.device) if capturable else lr
    return torch.optim.Adam(params, lr=rate, eps=eps, capturable=capturable, fused=eager_ops(rt) or None)
