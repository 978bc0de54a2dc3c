"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    """Environment for a CLI subprocess: this checkout importable, one thread (tiny models)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_inprocess(base: list[str], run_dir: Path, *flags: str, stop_at: int | None = None,
                    signals: tuple = (signal.SIGTERM,)) -> int:
    """``python -m matwm_fast.train`` with ``base`` flags, in this process; ``stop_at`` sends this
    process ``signals`` right after that env step (handled by ``train.run`` at the step's boundary)."""
    from matwm_fast import train

    s = train.prepare(train.build_parser().parse_args([*base, "--run-dir", str(run_dir), *flags]))
    tr = train.start(s)
    if stop_at is not None:
        step = tr.train_step

        def step_then_signal():
            m = step()
            if tr.step == stop_at:
                for sig in signals:
                    signal.raise_signal(sig)
            return m

        tr.train_step = step_then_signal
    try:
        return train.run(tr, s.run_dir)
    finally:
        s.run_dir.unlock()
