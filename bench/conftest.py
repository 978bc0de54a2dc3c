"""Shared fixtures and helpers of the benchmarks: ``pytest bench/ --benchmark-only``.

Sizes: the ``smoke`` preset by default on the CPU (the whole suite runs in under a minute on 2
cores), the ``paper`` preset when CUDA is available.  Environment:

* ``MATWM_BENCH_PRESET=paper|cpu|smoke``  force a preset;
* ``MATWM_BENCH_BACKENDS=eager,compile``  choose the backends (default on CUDA: eager, graphs,
  compile, cudagraphs; on the CPU eager alone: ``graphs`` is eager's own calls there, and
  ``compile`` costs 1.5 minutes of cold Inductor compilation, so it is asked for by name);
* ``MATWM_BENCH_ROUNDS=N``               timed rounds per benchmark;
* ``MATWM_BENCH_THREADS=N``              torch CPU threads; default 1 without CUDA (0: torch's
  own choice).  On a CPU shared with other work one thread is by far the steadiest: with two, every
  OpenMP barrier waits for a descheduled thread (a cpu-preset step 2.5x slower beside one busy
  process, up to 4x: bench/results/cpu-threads.md).

One steady trainer per backend (:class:`BenchTrainer`) is built once per session (compilation and
CUDA-graph capture happen there, never inside a timed round) and shared by every benchmark of that
backend.  Every timed callable synchronises the device before returning, so the clock reads
finished work.
"""

from __future__ import annotations

import os
import platform
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `matwm_fast` (and its kernels) without an installed package
    sys.path.insert(0, str(ROOT))

from matwm_fast import kernels  # noqa: E402
from matwm_fast.config import preset  # noqa: E402
from matwm_fast.imagination import Rollout  # noqa: E402
from matwm_fast.replay import Batch  # noqa: E402
from matwm_fast.tools.harness import SteadyTrainer  # noqa: E402

CUDA = torch.cuda.is_available()
_THREADS = int(os.environ.get("MATWM_BENCH_THREADS", "0" if CUDA else "1"))
if _THREADS > 0:
    torch.set_num_threads(_THREADS)
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = os.environ.get("MATWM_BENCH_PRESET") or ("paper" if CUDA else "smoke")
BACKENDS = [b for b in os.environ.get("MATWM_BENCH_BACKENDS", "").split(",") if b] or (
    ["eager", "graphs", "compile", "cudagraphs"] if CUDA else ["eager"])
# few rounds at paper size on the CPU (~20 s per step); at small sizes a call takes milliseconds, so
# many rounds are cheap and average over the stalls of a shared machine
ROUNDS = int(os.environ.get("MATWM_BENCH_ROUNDS", "0")) or (
    3 if PRESET == "paper" and not CUDA else 20 if PRESET == "paper" else 30)
WARMUP_ROUNDS = 2
# training steps before any benchmark: compile every piece, capture CUDA graphs (needs >= 3)
TRAINER_WARMUP_STEPS = 3


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def bench_info(backend: str | None, cfg, tr=None) -> dict:
    """What every benchmark records in ``extra_info`` (the JSON report keeps it).  ``tr``: the
    trainer timed, whose resolved runtime (device, backend, kernels, amp) says what really ran."""
    info = {
        "device": device_name(), "torch": torch.__version__, "triton": kernels.TRITON_VERSION,
        "backend": backend, "preset": cfg.preset, "scenario": cfg.env.scenario,
    }
    if tr is not None:
        info["runtime"] = tr.rt.describe()  # {device, backend, kernels, amp}
    return info


def measure(benchmark, fn, info: dict, rates: dict[str, float] | None = None, rounds: int = ROUNDS):
    """Time ``fn`` (which must sync the device itself) and record ``rates`` as ``name → count / mean s``.

    pedantic: a fixed number of rounds of one call each, after ``WARMUP_ROUNDS`` untimed calls —
    pytest-benchmark's calibration would otherwise run seconds-long paper steps dozens of times.
    """
    benchmark.extra_info.update(info)
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    mean = stats.stats.mean if stats is not None else None
    median = stats.stats.median if stats is not None else None
    for name, count in (rates or {}).items():
        benchmark.extra_info[name] = count / mean if mean else None
        # the median shrugs off the stalls of a shared machine; the mean is the headline
        benchmark.extra_info[name + "_at_median"] = count / median if median else None
    if mean:
        benchmark.extra_info["mean_ms"] = 1e3 * mean
    return out


@dataclass
class BenchTrainer:
    """A session's steady trainer of one backend (:class:`matwm_fast.tools.harness.SteadyTrainer`,
    the harness ``profile`` times too) and the fixed inputs every round reuses."""

    harness: SteadyTrainer
    batch: Batch  # a world-model batch
    ctx: Batch  # imagination contexts
    roll: Rollout  # a private copy of one rollout

    @property
    def tr(self):
        return self.harness.tr

    def info(self) -> dict:
        """Setup times: reported, never timed."""
        return {"trainer_fill_s": round(self.harness.fill_s, 2), "trainer_warmup_s": round(self.harness.warmup_s, 2)}


def pytest_generate_tests(metafunc):
    # a test that takes ``backend`` runs once per backend benchmarked on this machine
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture(scope="session")
def bench():
    """The helpers above, for the test modules (``from conftest import`` would be fragile: tests/
    has a conftest module of the same name)."""
    return types.SimpleNamespace(sync=sync, device_name=device_name, measure=measure, info=bench_info, device=DEVICE, cuda=CUDA,
                                 backends=BACKENDS, preset=PRESET, rounds=ROUNDS)


@pytest.fixture(scope="session")
def bench_cfg():
    return preset(PRESET)


@pytest.fixture(scope="session")
def bench_trainer(bench_cfg):
    """``bench_trainer(backend)`` → the session's :class:`BenchTrainer` of that backend, built once
    on ``DEVICE`` (kernels and precision as the run section's ``auto`` resolves them there)."""
    cache: dict[str, BenchTrainer] = {}

    def get(backend: str) -> BenchTrainer:
        if backend not in cache:
            w = SteadyTrainer.build(bench_cfg, TRAINER_WARMUP_STEPS, backend=backend, device=str(DEVICE))
            cache[backend] = BenchTrainer(w, *w.fixed_inputs())
        return cache[backend]

    yield get
    cache.clear()
