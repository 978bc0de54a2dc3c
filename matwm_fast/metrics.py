"""Metric accumulation and sinks: JSONL always, CSV always, TensorBoard when installed.

Training steps hand in dicts of 0-dim tensors; they are summed on the device and read back
(one host sync) only when a row is written, every ``log_every`` env steps.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

Tensor = torch.Tensor


class MetricAccumulator:
    """Sums metric tensors across steps without host syncs; ``mean()`` reads them once."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        dev = self.sums[keys[0]].device
        vals = torch.stack([self.sums[k].to(dev) for k in keys]).cpu().tolist()  # one sync for all
        out = {k: v / self.counts[k] for k, v in zip(keys, vals)}
        self.sums.clear()
        self.counts.clear()
        return out


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if importable)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events logged after its checkpoint
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)
            except Exception:  # tensorboard not installed: JSONL/CSV still hold everything
                self._tb = None

    def write(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(row)
        if self._tb is not None:
            step = int(row.get("env_step", 0))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "env_step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def _write_csv(self, row: dict) -> None:
        # the CSV's columns are the union of all rows' keys; rewrite the header when new keys appear
        rows = []
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                rows = list(csv.DictReader(f))
        cols = list(dict.fromkeys([*(rows[0].keys() if rows else []), *row.keys()]))
        if rows and list(rows[0].keys()) == cols:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=cols).writerow(row)
            return
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows + [row]:
                w.writerow(r)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path | str) -> list[dict]:
    """All rows of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a matwm_fast run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(run_dir: Path | str, step: int) -> int:
    """Drop rows logged after env step ``step`` (from ``metrics.jsonl`` and ``metrics.csv``).

    A run killed without warning (SIGKILL, power loss) has logged rows past its last checkpoint;
    resuming from that checkpoint logs those steps again, so the stale rows go first.  Returns
    how many rows were dropped.
    """
    run_dir = Path(run_dir)
    jsonl, csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
    if not jsonl.exists():
        return 0
    lines = [ln for ln in jsonl.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("env_step", 0) <= step]
    if len(keep) == len(lines):
        return 0
    jsonl.write_text("".join(ln + "\n" for ln in keep))
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            cols, rows = reader.fieldnames or [], [r for r in reader if int(r.get("env_step") or 0) <= step]
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return len(lines) - len(keep)


class Progress:
    """A one-line progress bar on a terminal; one line per update elsewhere (logs, CI)."""

    def __init__(self, total: int, start: int = 0, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.t0, self.s0 = time.perf_counter(), start
        self.last = 0.0

    def update(self, step: int, imagined: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and self.tty and now - self.last < 0.5:
            return
        if not force and not self.tty:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = step / max(self.total, 1)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        msg = (f"[{bar}] {step}/{self.total} env steps | {(step - self.s0) / dt:7.2f} env steps/s | "
               f"{imagined / dt:10.0f} imagined steps/s")
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)
