"""The timing harness: :class:`SteadyTrainer`, a trainer past replay warm-up and compilation, the
one harness that ``profile``, the kernel-launch count, the GPU check and the benchmarks
(``bench/``) time.

Building it fills the replay with random actions (what the trainer does until
:attr:`~matwm_fast.trainer.Trainer.warm`), then runs a few training steps, where torch.compile
traces and CUDA graphs are captured; both are timed separately and never inside a measurement.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .. import nvtx
from ..config import Config
from ..imagination import Rollout
from ..replay import Batch
from ..trainer import Trainer, build


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SteadyTrainer:
    """A trainer in its steady state: every later ``train_step`` runs what a long training runs."""

    tr: Trainer
    fill_s: float  # seconds to fill the replay past warm-up
    warmup_s: float  # seconds of the warm-up training steps (compilation included)
    # seconds of each phase of the first training step: where compilation and capture went
    first_step_s: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def build(cfg: Config, warmup_steps: int = 3, **run) -> "SteadyTrainer":
        """``run``: settings of the ``run`` section (backend, device, kernels, amp, ...)."""
        t0 = time.perf_counter()
        tr = build(cfg, **run)
        while not tr.warm:  # random actions until every buffer holds replay.warmup transitions
            tr.env_step()
        fill_s = time.perf_counter() - t0
        t0, first = time.perf_counter(), {}
        for i in range(warmup_steps):  # compilation, CUDA-graph capture, allocator warm-up
            if i == 0:
                nvtx.set_listener(lambda name: _timed(name, first, tr.device))
            try:
                tr.train_step()
            finally:
                nvtx.set_listener(None)
        sync(tr.device)
        return SteadyTrainer(tr, fill_s, time.perf_counter() - t0, {k: round(v, 3) for k, v in first.items()})

    def fixed_inputs(self) -> tuple[Batch, Batch, Rollout]:
        """A world-model batch, imagination contexts and a private copy of one rollout, sampled
        as ``train_step`` samples them: inputs a benchmark reuses round after round."""
        tr, c = self.tr, self.tr.cfg
        batch = tr.replay.sample_sequences(c.wm.batch_per_agent, c.wm.seq_len, c.replay.priority_decay)
        ctx = tr.replay.sample_contexts(c.ac.imag_batch, c.ac.context_len)
        roll = tr.imagine(ctx)  # CUDA-graph outputs are overwritten by the next replay: clone
        roll = Rollout(*(t.clone() for t in (roll.states, roll.actions, roll.rewards, roll.continues)))
        sync(tr.device)
        return batch, ctx, roll


@contextlib.contextmanager
def _timed(name: str, into: dict[str, float], device: torch.device):
    """Host seconds of one phase, device work included (a sync at its end: warm-up only)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        into[name] = into.get(name, 0.0) + time.perf_counter() - t0
