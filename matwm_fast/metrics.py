"""Metric rows: accumulated on the device, written as JSONL and CSV (and TensorBoard when installed).

Training steps hand in dicts of tensors; :class:`RowLogger` sums them on the device and reads
them back (one host sync) only when a row is written, every ``run.log_every`` env steps.
:func:`summarise_returns` is the one summary of episode returns: the training row, the evaluation
(``play``) and ``eval``'s table each format it.

A power loss or a full disk can leave a torn last line in ``metrics.jsonl`` or ``metrics.csv``.
:func:`repair` drops it (with a warning) before anything appends to or reads the files, so a run
resumes exactly and ``plot``/``sweep`` read what was whole.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

Tensor = torch.Tensor
FILES = ("metrics.jsonl", "metrics.csv")
# a finished run's rows as archived with its results: gzip makes them ~5× smaller, byte for byte as written
ARCHIVED = "metrics.jsonl.gz"


# ----------------------------------------------------------------------------- files
def repair(run_dir: Path | str) -> list[str]:
    """Drop a torn last line of the metric files (one not ended by a newline, or a JSON line that
    does not parse); returns a note per file repaired."""
    notes = []
    for name in FILES:
        path = Path(run_dir) / name
        if not path.exists():
            continue
        data = path.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]  # everything up to the last complete line
        if name.endswith(".jsonl") and keep:
            last = keep[:-1].rsplit(b"\n", 1)[-1]
            try:
                json.loads(last)
            except ValueError:  # a newline landed but the line is garbage (e.g. zero-filled blocks)
                keep = keep[: len(keep) - len(last) - 1]
        if keep != data:
            path.write_bytes(keep)
            notes.append(f"{path}: dropped a torn last line ({len(data) - len(keep)} bytes)")
    return notes


def metrics_file(run_dir: Path | str) -> Path | None:
    """The run's rows: ``metrics.jsonl`` as training writes it, else an archived
    ``metrics.jsonl.gz``; None when there are neither."""
    for name in ("metrics.jsonl", ARCHIVED):
        if (path := Path(run_dir) / name).exists():
            return path
    return None


def read_metrics(run_dir: Path | str) -> list[dict]:
    """All whole rows of a run's ``metrics.jsonl`` (or its archived ``metrics.jsonl.gz``; a torn
    last line is skipped with a warning)."""
    path = metrics_file(run_dir)
    if path is None:
        raise FileNotFoundError(f"{Path(run_dir) / 'metrics.jsonl'} not found: is {run_dir} a matwm_fast run directory?")
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = data.decode(errors="replace").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i >= len(lines) - 2:  # the last line (possibly before a final newline): torn
                warnings.warn(f"{path}: skipped a torn last line", stacklevel=2)
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON (the file is damaged)") from None
    return rows


def truncate_after(run_dir: Path | str, step: int) -> int:
    """Drop rows logged after env step ``step`` from both files (a run killed without warning
    logged rows past its last checkpoint; resuming logs them again).  Returns how many."""
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
        _rewrite_csv(csv_path, cols, rows)
    return len(lines) - len(keep)


def _rewrite_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """``path`` replaced whole (a temporary file renamed over it: a crash leaves the old one)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed


def _csv_header(path: Path) -> list[str]:
    """The columns of the CSV at ``path`` (none when it is missing or empty)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard if importable).

    The CSV's columns are the union of all rows' keys, in order of first appearance.  Its header is
    read once, when the writer opens; a row within it is appended, and only a row bringing a new
    column (the first update, the first finished episode, the first evaluation: a few per run)
    rewrites the file under the grown header — writing a run's rows costs O(rows), not O(rows²).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        repair(self.run_dir)  # never append to a torn line
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self.columns = _csv_header(self.csv)
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
        new = [k for k in row if k not in self.columns]
        if not new:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
            return
        rows = []
        if self.columns:
            with open(self.csv, newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns = self.columns + new
        _rewrite_csv(self.csv, self.columns, rows + [row])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# ----------------------------------------------------------------------------- rows
class MetricAccumulator:
    """Sums metric tensors across steps without host syncs; ``mean()`` reads them once.

    A step's metrics (0-dim, or (N,) per agent) are flattened into one vector and added to the
    running sum of their *layout* (names and shapes; a run has one or two: steps with and without
    a world-model update, say) — two tensor ops per step, not three per metric.
    """

    def __init__(self) -> None:
        self.sums: dict[tuple, Tensor] = {}  # layout ((name, shape), ...) → summed flat values
        self.counts: dict[tuple, int] = {}

    def add(self, metrics: dict[str, Tensor]) -> None:
        layout = tuple((k, tuple(v.shape)) for k, v in metrics.items())
        flat = torch.cat([v.detach().reshape(-1).float() for v in metrics.values()])  # (M,)
        self.sums[layout] = self.sums[layout] + flat if layout in self.sums else flat
        self.counts[layout] = self.counts.get(layout, 0) + 1

    def mean(self) -> dict[str, list[float] | float]:
        """Per metric, its mean over the steps that produced it: a float, or a list for (N,)."""
        if not self.sums:
            return {}
        layouts = list(self.sums)
        dev = self.sums[layouts[0]].device
        values = torch.cat([self.sums[lay].to(dev) for lay in layouts]).cpu().tolist()  # one sync for all
        totals: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        vector: dict[str, bool] = {}
        i = 0
        for lay in layouts:
            for name, shape in lay:
                n = math.prod(shape)
                got, i = values[i:i + n], i + n
                totals[name] = [a + b for a, b in zip(totals[name], got)] if name in totals else got
                counts[name] = counts.get(name, 0) + self.counts[lay]
                vector[name] = len(shape) > 0
        return {k: [x / counts[k] for x in v] if vector[k] else v[0] / counts[k] for k, v in totals.items()}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def state_dict(self) -> dict:
        return {"layouts": [[list(map(list, lay)), self.sums[lay].cpu(), self.counts[lay]] for lay in self.sums]}

    def load_state_dict(self, sd: dict, device: torch.device) -> None:
        self.clear()
        for lay, total, count in sd["layouts"]:
            key = tuple((name, tuple(shape)) for name, shape in lay)
            self.sums[key], self.counts[key] = total.to(device), int(count)


class RowLogger:
    """A training run's rows: step metrics averaged over the interval, the episodes finished in
    it, budget totals and wall-clock throughput (``perf_*``, the only values that vary between
    identical runs)."""

    def __init__(self, writer: MetricsWriter, agents: tuple[str, ...], teams: dict[str, list[int]]):
        self.writer, self.agents, self.teams = writer, agents, teams
        self.acc = MetricAccumulator()
        self._mark(0, 0)

    def _mark(self, step: int, imagined: int) -> None:
        self.t0, self.step0, self.imagined0 = time.perf_counter(), step, imagined

    def add(self, metrics: dict[str, Tensor] | None) -> None:
        if metrics:
            self.acc.add(metrics)

    def row(self, step: int, imagined_total: int, warm: bool, finished: list[np.ndarray], on_grid: bool) -> dict:
        """Write the row of env step ``step``.  Off the logging grid (the last step of a run whose
        budget is not a multiple of ``log_every``) the interval stays open: its sums and episodes
        are kept, so a resume with a larger budget logs exactly the uninterrupted run's rows."""
        now = time.perf_counter()
        means = {}
        for k, v in self.acc.mean().items():  # per-agent metrics become <agent>_<metric>
            means.update({f"{a}_{k}": x for a, x in zip(self.agents, v)} if isinstance(v, list) else {k: v})
        row = {"env_step": step, "warm": warm, **means, **episode_row(finished, self.agents, self.teams),
               "imagined_steps_total": imagined_total,
               "perf_env_steps_per_s": (step - self.step0) / max(now - self.t0, 1e-9),
               "perf_imagined_steps_per_s": (imagined_total - self.imagined0) / max(now - self.t0, 1e-9)}
        self.writer.write(row)
        if on_grid:
            self.acc.clear()
            finished.clear()
        self._mark(step, imagined_total)
        return row

    def start(self, step: int, imagined_total: int) -> None:
        self._mark(step, imagined_total)

    def state_dict(self) -> dict:
        return self.acc.state_dict()

    def load_state_dict(self, sd: dict, device: torch.device) -> None:
        self.acc.load_state_dict(sd, device)


# ----------------------------------------------------------------------------- episode returns
@dataclass(frozen=True)
class Stat:
    """Mean and standard deviation (numpy's, ddof 0) of ``count`` values."""

    mean: float
    std: float
    count: int

    @staticmethod
    def of(values: np.ndarray) -> "Stat":
        return Stat(float(values.mean()), float(values.std()), int(values.size))


@dataclass(frozen=True)
class EpisodeSummary:
    """Episode returns per agent, per team and over all agents: the one summary that the training
    rows, the evaluation rows, ``eval``'s table and its JSON record each format their own way."""

    agents: dict[str, Stat]  # agent → its returns
    teams: dict[str, Stat]  # team → each episode's mean over the team's members
    all: Stat  # each episode's mean over all agents

    @property
    def episodes(self) -> int:
        return self.all.count


def summarise_returns(returns: np.ndarray, agents: tuple[str, ...], teams: dict[str, list[int]]) -> EpisodeSummary:
    """returns (E, N), E ≥ 1, agents in env order → :class:`EpisodeSummary`."""
    return EpisodeSummary({name: Stat.of(returns[:, i]) for i, name in enumerate(agents)},
                          {team: Stat.of(returns[:, idx].mean(1)) for team, idx in teams.items()},
                          Stat.of(returns.mean(1)))


def episode_row(finished: list[np.ndarray], agents: tuple[str, ...], teams: dict[str, list[int]]) -> dict:
    """Mean returns of the episodes finished in an interval (each (N,)): per agent, per team, all."""
    if not finished:
        return {}
    s = summarise_returns(np.stack(finished), agents, teams)
    return {"episodes": s.episodes, "episode_return": s.all.mean,
            **{f"{name}_episode_return": v.mean for name, v in s.agents.items()},
            **{f"team_{team}_episode_return": v.mean for team, v in s.teams.items()}}


# ----------------------------------------------------------------------------- progress
class Progress:
    """Training progress: env steps/s and imagined steps/s since the last logged row.

    On a terminal a tqdm bar (redrawn at most twice a second; its rate is tqdm's smoothed env
    steps/s); elsewhere — a log file, CI, a sweep's ``train.log`` — one plain line per logged row,
    since a bar redrawn with carriage returns would fill the log with them.  A context manager: the
    bar is closed before whatever the run prints last.
    """

    FORMAT = "{percentage:3.0f}% {n_fmt}/{total_fmt} env steps [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, total: int, start: int = 0, stream=None):
        self.total, self.stream = total, sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.start, self.t0, self.s0 = time.perf_counter(), time.perf_counter(), start
        try:  # a pseudo-terminal of unknown size reports 0 × 0, where tqdm would draw nothing
            sized = os.get_terminal_size(self.stream.fileno()).columns > 0
        except (OSError, ValueError, AttributeError):
            sized = False
        self.bar = tqdm(total=total, initial=start, unit=" env steps", file=self.stream, mininterval=0.5,
                        dynamic_ncols=sized, **({} if sized else {"ncols": 100, "nrows": 24}), disable=not self.tty)

    def update(self, step: int, imagined: int, force: bool = False) -> None:
        """At env step ``step``, ``imagined`` steps imagined since the last :meth:`restart`;
        ``force``: show it now (a logged row), which is all a non-terminal shows."""
        if not (self.tty or force):
            return
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        postfix = f"{imagined / dt:,.0f} imagined steps/s"
        if self.tty:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            if force:
                self.bar.refresh()
        elif force:
            line = tqdm.format_meter(step, self.total, now - self.start, unit=" env steps", postfix=postfix,
                                     rate=(step - self.s0) / dt, bar_format=self.FORMAT)
            print(line, file=self.stream, flush=True)

    def restart(self, step: int) -> None:
        self.t0, self.s0 = time.perf_counter(), step

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
