"""``python -m matwm_fast.plot`` (``matwm_fast.tools.plot``): a valid PNG from real runs, seeds
grouped by config (median and spread; the run section never splits a group), eval rows preferred
to training episodes, per-team panels, the sweep's reference levels and markers, and clear errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from matwm_fast import train
from matwm_fast.tools import plot
from matwm_fast.config import preset

ROOT = Path(__file__).resolve().parents[2]  # the repository
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def fake_run(root: Path, name: str, values: list[float], seed: int = 0, lr: float = 1e-3,
             evals: list[float] | None = None, steps: list[int] = (10, 20, 30), **run) -> Path:
    """A run directory as train.py writes it, with chosen episode returns (and eval returns);
    ``run``: settings of the run section."""
    cfg = preset("smoke")
    cfg = replace(cfg, wm=replace(cfg.wm, lr=lr), train=replace(cfg.train, seed=seed), run=replace(cfg.run, **run))
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    rows = []
    for i, (s, v) in enumerate(zip(steps, values)):
        rows.append({"env_step": s, "episode_return": v, "team_adversary_episode_return": 2 * v,
                     "team_agent_episode_return": -v, "perf_env_steps_per_s": 1.0})
        if evals is not None:
            rows.append({"env_step": s, "eval_return_mean": evals[i], "eval_team_adversary_return_mean": evals[i],
                         "eval_team_agent_return_mean": -evals[i]})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_plot_real_run_writes_png(tmp_path):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path / "run"
        assert train.main(["--preset", "smoke", "--device", "cpu", "--steps", "50", "--log-every", "5",
                           "--run-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    out = tmp_path / "curve.png"
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.plot", str(run), "--out", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "episode_return: 1 run(s) in 1 group(s)" in proc.stdout and f"wrote {out}" in proc.stdout
    w, h = png_size(out)
    assert out.stat().st_size > 5000 and w == 3 * 550 and h == 400  # all agents + 2 team panels (simple_tag)
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (400, 1650) and img.std() > 0  # something is drawn
    # default output: next to the run
    assert plot.main([str(run), "--no-teams"]) == 0
    assert png_size(run / "learning_curve.png") == (550, 400)


def test_seeds_group_into_median_and_spread(tmp_path):
    a = fake_run(tmp_path, "a", [0, 10, 20], seed=0)
    b = fake_run(tmp_path, "b", [2, 14, 20], seed=1)
    # how a run ran (the run section) is no reason for another curve
    c = fake_run(tmp_path, "c", [4, 12, 50], seed=2, device="cuda", kernels="triton",
                 amp="bf16", log_every=7)
    other = fake_run(tmp_path, "d", [1, 1, 1], seed=0, lr=1e-2)
    groups = plot.group([plot.Run(p) for p in (a, b, c, other)])
    assert [(label, [r.path.name for r in m]) for label, m in groups] == [
        ("simple_tag (smoke) wm.lr=0.001", ["a", "b", "c"]), ("simple_tag (smoke) wm.lr=0.01", ["d"])]
    runs = groups[0][1]
    grid, med, lo, hi = plot.aggregate([r.series("episode_return") for r in runs], "minmax")
    assert grid.tolist() == [10, 20, 30]
    assert med.tolist() == [2, 12, 20] and lo.tolist() == [0, 10, 20] and hi.tolist() == [4, 14, 50]
    _, _, q1, q3 = plot.aggregate([r.series("episode_return") for r in runs], "iqr")
    assert q1.tolist() == [1, 11, 20] and q3.tolist() == [3, 13, 35]
    # runs logged at different steps: interpolated, each only within its own range
    grid, med, _, _ = plot.aggregate([(np.array([0.0, 20.0]), np.array([0.0, 20.0])),
                                      (np.array([10.0, 30.0]), np.array([30.0, 50.0]))], "minmax")
    assert grid.tolist() == [0, 10, 20, 30] and med.tolist() == [0, 20, 30, 50]
    out = tmp_path / "seeds.png"
    assert plot.main([str(a), str(b), str(c), str(other), "--out", str(out), "--band", "iqr"]) == 0
    assert png_size(out)[0] == 1650


def test_eval_rows_are_preferred(tmp_path, capsys):
    a = fake_run(tmp_path, "a", [0, 1, 2], evals=[5, 6, 7])
    b = fake_run(tmp_path, "b", [0, 1, 2], seed=1, evals=[5, 6, 9])
    runs = [plot.Run(a), plot.Run(b)]
    assert plot.choose_metric(runs, None) == "eval_return_mean"
    assert plot.teams_of(runs) == ["adversary", "agent"]
    # only when every run has them: mixing evaluations with training episodes would mislead
    runs.append(plot.Run(fake_run(tmp_path, "c", [0, 1, 2], seed=2)))
    assert plot.choose_metric(runs, None) == "episode_return"
    assert plot.main([str(a), str(b), "--metric", "team_agent_episode_return", "--out", str(tmp_path / "m.png")]) == 0
    assert png_size(tmp_path / "m.png")[0] == 550  # a single metric: one panel
    assert "team_agent_episode_return: 2 run(s) in 1 group(s)" in capsys.readouterr().out


def test_plot_errors(tmp_path, capsys):
    run = fake_run(tmp_path, "a", [0, 1, 2])
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.plot", str(run), "--metric", "retrun"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert f"error: no metric 'retrun' in {run}; valid metrics: episode_return, perf_env_steps_per_s" in proc.stderr
    for args, message in [([str(tmp_path / "nope")], "is not a directory"),
                          ([str(tmp_path)], "metrics.jsonl not found: is"),
                          ([str(run), "--out", "x.jpg"], "--out 'x.jpg': the image is a PNG")]:
        with pytest.raises(SystemExit) as e:
            plot.main(args)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_metric_sinks_jsonl_csv_tensorboard(tmp_path):
    """Every row to JSONL and CSV (columns: the union so far), TensorBoard when installed."""
    import csv
    import importlib.util

    from matwm_fast.metrics import MetricsWriter, read_metrics, truncate_after

    w = MetricsWriter(tmp_path)
    w.write({"env_step": 5, "a": 1.0})
    w.write({"env_step": 10, "a": 2.0, "b": float("nan")})  # a new column, a non-finite value
    w.write({"env_step": 15, "a": 3.0, "b": 4.0})
    w.close()
    assert read_metrics(tmp_path) == [{"env_step": 5, "a": 1.0}, {"env_step": 10, "a": 2.0, "b": None},
                                      {"env_step": 15, "a": 3.0, "b": 4.0}]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["env_step", "a", "b"]
    assert [(r["env_step"], r["a"], r["b"]) for r in rows] == [("5", "1.0", ""), ("10", "2.0", ""), ("15", "3.0", "4.0")]
    # what a resume does to rows logged after its checkpoint
    assert truncate_after(tmp_path, 10) == 1
    assert [r["env_step"] for r in read_metrics(tmp_path)] == [5, 10]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["env_step"] for r in csv.DictReader(f)] == ["5", "10"]
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    else:
        assert not (tmp_path / "tb").exists()  # silently JSONL/CSV only


def test_reference_levels_and_markers_are_drawn_on_their_panels(tmp_path):
    """What the sweep adds to the curves (the random policy's level, a final matchup's marker) is
    drawn by plot itself, on the panel it names, beside the median and its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [plot.Run(fake_run(tmp_path, f"s{i}", [0, 1, 2], seed=i, evals=ev)) for i, ev in enumerate([[1, 2, 3], [3, 6, 5]])]
    assert [(k, col) for k, _, col in plot.panels(runs, "eval_return_mean")] == [
        ("all", "eval_return_mean"), ("adversary", "eval_team_adversary_return_mean"),
        ("agent", "eval_team_agent_return_mean")]
    fig, ax = plt.subplots()
    plot.draw_panel(ax, plot.group(runs), "eval_return_mean", "minmax",
                    [plot.Level("random", -1.0, -2.0, 0.5), plot.Marker("trained vs random", 30, 4.0, 3.0, 7.0)])
    median, level = ax.lines[0], ax.lines[1]
    assert median.get_xdata().tolist() == [10, 20, 30] and median.get_ydata().tolist() == [2, 4, 4]
    assert level.get_label() == "random" and list(level.get_ydata()) == [-1.0, -1.0]
    bar = ax.containers[0]  # the marker: one point with its error bar from lo to hi
    assert bar.get_label() == "trained vs random" and bar.lines[0].get_xydata().tolist() == [[30.0, 4.0]]
    segment = bar.lines[2][0].get_segments()[0]
    assert segment[:, 1].tolist() == [3.0, 7.0]
    assert len(ax.collections) >= 2  # the min–max band and the level's shaded range
    plt.close(fig)
    out = tmp_path / "ref.png"
    assert plot.draw(runs, "eval_return_mean", out, extras={"agent": [plot.Level("random", 0, -1, 1)]}) == out
    assert png_size(out)[0] == 1650
    with pytest.raises(ValueError, match="no panel 'prey' to draw on; panels: all, adversary, agent"):
        plot.draw(runs, "eval_return_mean", tmp_path / "x.png", extras={"prey": []})


def test_a_title_wider_than_its_panel_wraps_inside_the_figure(tmp_path):
    """The sweep titles a one-panel figure with its scenario, seeds and band: longer than the
    panel's 5.5 inches at 10 pt, so unwrapped it ran off both edges of the PNG."""
    import matplotlib.pyplot as plt

    runs = [plot.Run(fake_run(tmp_path, f"s{i}", [0, 1, 2], seed=i, evals=[1, 2, 3])) for i in range(2)]
    title = "simple_spread: greedy evaluation return, median across 3 seeds, min–max shaded " * 2
    fig = plot.figure(runs, "eval_return_mean", teams=False, title=title)
    try:
        fig.canvas.draw()
        box, page = fig._suptitle.get_window_extent(fig.canvas.get_renderer()), fig.bbox
        assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)
        assert box.height > 2 * 10  # on more than one line (10 pt at 100 dpi is about 14 px)
        top_of_panel = fig.axes[0].get_window_extent().y1
        assert box.y0 >= top_of_panel - 1, "the wrapped title overlaps the panel"
    finally:
        plt.close(fig)
