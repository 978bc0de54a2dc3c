"""Shared fixtures and helpers of the benchmarks: ``pytest bench/ --benchmark-only``.

Sizes: the ``smoke`` preset by default on the CPU (the whole suite, torch.compile included, runs
in a few minutes on 2 cores), the ``paper`` preset when CUDA is available.  Environment:

* ``MATWM_BENCH_PRESET=paper|cpu|smoke``  force a preset;
* ``MATWM_BENCH_BACKENDS=eager,compile``  restrict the backends (default: eager, compile, and
  cudagraphs on CUDA);
* ``MATWM_BENCH_ROUNDS=N``               timed rounds per benchmark;
* ``MATWM_BENCH_THREADS=N``              torch CPU threads; default 1 without CUDA (0: torch's
  own choice).  On a CPU shared with other work one thread is by far the steadiest: with two, every
  OpenMP barrier waits for a descheduled thread (measured 68x slower: bench/results/cpu-threads-ab.md).

One warmed trainer per backend is built once per session (compilation and CUDA-graph capture
happen there, never inside a timed round) and shared by every benchmark of that backend.  Every
timed callable synchronises the device before returning, so the clock reads finished work.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `kernels` and `matwm_fast` without an installed package
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from matwm_fast.config import preset  # noqa: E402
from matwm_fast.imagination import Rollout  # noqa: E402
from matwm_fast.trainer import Trainer  # noqa: E402

CUDA = torch.cuda.is_available()
_THREADS = int(os.environ.get("MATWM_BENCH_THREADS", "0" if CUDA else "1"))
if _THREADS > 0:
    torch.set_num_threads(_THREADS)
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = os.environ.get("MATWM_BENCH_PRESET") or ("paper" if CUDA else "smoke")
BACKENDS = [b for b in os.environ.get("MATWM_BENCH_BACKENDS", "").split(",") if b] or (
    ["eager", "compile"] + (["cudagraphs"] if CUDA else []))
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


def bench_info(backend: str | None, cfg) -> dict:
    """What every benchmark records in ``extra_info`` (the JSON report keeps it)."""
    return {
        "device": device_name(), "torch": torch.__version__, "triton": kernels.TRITON_VERSION,
        "backend": backend, "preset": cfg.preset, "scenario": cfg.env.scenario,
        "kernels": kernels.resolve_impl(None, torch.empty(0, device=DEVICE)),
    }


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


def clone_rollout(roll: Rollout) -> Rollout:
    """A private copy: CUDA-graph outputs are overwritten by the graph's next replay."""
    return Rollout(*(t.clone() for t in (roll.states, roll.actions, roll.rewards, roll.continues)))


class WarmTrainer:
    """A trainer past replay warm-up and compilation, with a fixed batch and rollout to reuse."""

    def __init__(self, cfg, backend: str):
        cfg = replace(cfg, train=replace(cfg.train, backend=backend, device=str(DEVICE)))
        t0 = time.perf_counter()
        self.tr = tr = Trainer(cfg, DEVICE)
        while not tr.warm:  # random actions until replay.warmup transitions
            tr.env_step()
        for _ in range(TRAINER_WARMUP_STEPS):
            tr.train_step()
        sync()
        self.setup_s = time.perf_counter() - t0  # compilation included: reported, never timed
        # fixed inputs, sampled as train_step samples them; cloned out of any static buffer
        self.batch = tr.replay.sample_sequences(tr.wm_per_agent, cfg.wm.seq_len, cfg.replay.priority_decay)
        self.ctx = tr.replay.sample_contexts(tr.imag_batch, cfg.ac.context_len)
        self.roll = clone_rollout(tr.imagine(self.ctx))
        sync()


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
def warm_trainer(bench_cfg):
    """``warm_trainer(backend)`` → the session's :class:`WarmTrainer` of that backend (built once)."""
    cache: dict[str, WarmTrainer] = {}

    def get(backend: str) -> WarmTrainer:
        if backend not in cache:
            cache[backend] = WarmTrainer(bench_cfg, backend)
        return cache[backend]

    yield get
    cache.clear()
