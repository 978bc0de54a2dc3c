"""Metric files and the progress display: CSV rows appended without rereading the file (rewritten
only when a row brings a new column), resume truncation of both files, and progress as a bar on a
terminal but plain lines in a log."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from matwm_fast import metrics
from matwm_fast.metrics import MetricsWriter, Progress, read_metrics, truncate_after


def csv_rows(run: Path) -> tuple[list[str], list[dict]]:
    with open(run / "metrics.csv", newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The metric files metrics.py opens for reading (its own ``open``: no other reader counted)."""
    seen: list[str] = []

    def counting_open(file, mode="r", *a, **kw):
        if "r" in mode and "+" not in mode:
            seen.append(Path(file).name)
        return open(file, mode, *a, **kw)

    monkeypatch.setattr(metrics, "open", counting_open, raising=False)
    return seen


def test_rows_are_appended_and_the_file_rewritten_only_for_a_new_column(tmp_path, reads):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 201):
        w.write({"env_step": step, "warm": True, "loss": step / 2} if step > 100 else {"env_step": step, "warm": False})
    w.write({"env_step": 200, "eval_return_mean": -3.5})  # an evaluation row: new columns, a missing one
    w.write({"env_step": 201, "warm": True, "loss": float("nan")})
    # rows 1..100 appended; the first row with "loss" and the evaluation row each reread the file once
    assert reads.count("metrics.csv") == 2
    cols, rows = csv_rows(tmp_path)
    assert cols == ["env_step", "warm", "loss", "eval_return_mean"]
    assert [int(r["env_step"]) for r in rows] == list(range(1, 201)) + [200, 201]
    assert rows[0] == {"env_step": "1", "warm": "False", "loss": "", "eval_return_mean": ""}
    assert rows[150]["loss"] == "75.5" and rows[200]["eval_return_mean"] == "-3.5" and rows[201]["loss"] == ""
    assert [r["env_step"] for r in read_metrics(tmp_path)] == [int(r["env_step"]) for r in rows]
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_reopened_writer_appends_under_the_header_on_disk(tmp_path, reads):
    """A resumed run: the header is read once (one line), and rows go on under it."""
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write({"env_step": 5, "a": 1.0})
    w.write({"env_step": 10, "a": 2.0, "b": 3.0})
    assert truncate_after(tmp_path, 5) == 1  # resume from 5: the row at 10 goes, its column stays
    reads.clear()
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write({"env_step": 10, "b": 4.0, "a": 5.0})
    assert reads == ["metrics.csv"]  # the header line, when the writer opened
    cols, rows = csv_rows(tmp_path)
    assert cols == ["env_step", "a", "b"] and rows == [{"env_step": "5", "a": "1.0", "b": ""},
                                                      {"env_step": "10", "a": "5.0", "b": "4.0"}]
    assert [json.loads(x)["env_step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log():
    log = io.StringIO()
    p = Progress(100, start=20, stream=log)
    for step in range(21, 60):
        p.update(step, imagined=(step - 20) * 36)  # not a logged row: nothing in a log
    assert log.getvalue() == ""
    p.update(60, imagined=40 * 36, force=True)
    p.close()
    (line,) = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and line.startswith(" 60% 60/100 env steps [")
    assert " env steps/s, " in line and line.endswith(" imagined steps/s]")

    tty = Terminal()
    with Progress(100, start=20, stream=tty) as p:
        p.update(60, imagined=40 * 36, force=True)
    out = tty.getvalue()
    assert "\r" in out and "60/100" in out and "env steps/s" in out and "imagined steps/s" in out
    assert out.endswith("\n")  # closed: what is printed next starts on a line of its own


def test_one_episode_summary_and_the_training_row_formatted_from_it():
    """Per agent, per team (each episode's mean over the members) and over all agents: mean, std
    (ddof 0) and count; the training row shows the means."""
    import numpy as np

    from matwm_fast.metrics import Stat, episode_row, summarise_returns

    returns = np.array([[1.0, 2.0, 6.0], [3.0, 0.0, 2.0]])  # (E, N)
    agents, teams = ("a_0", "a_1", "b_0"), {"a": [0, 1], "b": [2]}
    s = summarise_returns(returns, agents, teams)
    assert s.agents == {"a_0": Stat(2.0, 1.0, 2), "a_1": Stat(1.0, 1.0, 2), "b_0": Stat(4.0, 2.0, 2)}
    assert s.teams == {"a": Stat(1.5, 0.0, 2), "b": Stat(4.0, 2.0, 2)}
    assert s.all == Stat(7 / 3, pytest.approx(2 / 3), 2) and s.episodes == 2  # episode means 3 and 5/3
    assert episode_row(list(returns), agents, teams) == {
        "episodes": 2, "episode_return": 7 / 3, "a_0_episode_return": 2.0, "a_1_episode_return": 1.0,
        "b_0_episode_return": 4.0, "team_a_episode_return": 1.5, "team_b_episode_return": 4.0}
    assert episode_row([], agents, teams) == {}
