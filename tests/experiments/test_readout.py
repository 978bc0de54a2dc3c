"""bench/experiments/readout.py: the MLP read-out learns what is there, and its early stopping keeps
it from memorising what is not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "experiments"))
import readout  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def data(rows: int, target: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=g)  # (S, F)
    y = x[:, 0] * x[:, 1] + 0.5 * x[:, 2] if target == "signal" else torch.randn(rows, generator=g)  # (S,)
    return x, y


def test_reads_a_nonlinear_target_with_or_without_selection():
    (x, y), (xt, yt) = data(2000, "signal"), data(500, "signal", seed=1)
    for select in (0.0, 0.1):
        assert readout.fit_mlp(x, y, xt, yt, 1500, width=64, select=select)["r2_heldout"] > 0.9


def test_selection_stops_a_readout_that_memorises_noise():
    """Few rows of noise and many updates: the plain fit memorises (high R² on its rows, below 0
    held-out); the early-stopped one keeps near the mean on new rows."""
    (x, y), (xt, yt) = data(200, "noise"), data(500, "noise", seed=1)
    plain = readout.fit_mlp(x, y, xt, yt, 2000, width=128)
    stopped = readout.fit_mlp(x, y, xt, yt, 2000, width=128, select=0.2, check_every=5)
    assert plain["r2_train"] > 0.8 and plain["r2_heldout"] < -0.3
    assert stopped["r2_heldout"] > plain["r2_heldout"] + 0.2 and stopped["r2_heldout"] > -0.15
    assert stopped["pred_heldout"].shape == (500,)


def test_no_selection_fits_every_row():
    """select 0 is the fit wm-data's --probe always ran: all rows fitted, the same numbers for a seed."""
    (x, y), (xt, yt) = data(300, "signal"), data(100, "signal", seed=1)
    a = readout.fit_mlp(x, y, xt, yt, 50, width=16, seed=3)
    b = readout.fit_mlp(x, y, xt, yt, 50, width=16, seed=3, select=0.0)
    assert a["r2_train"] == b["r2_train"] and a["r2_heldout"] == b["r2_heldout"]


def test_frame_rows_pair_each_frame_with_the_one_before():
    frames = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()  # (S, C, H, W)
    feat = {"obs": frames, "prev": torch.tensor([-1, 0, 1, -1]), "act": torch.eye(2)[torch.tensor([0, 1, 0, 1])]}
    pair, act = readout.frame_rows(feat)(torch.tensor([0, 2, 3]))
    assert pair.shape == (3, 2, 3, 8, 8)
    assert pair[:, 0, 0, 0, 0].tolist() == [0, 1, 0] and pair[:, 1, 0, 0, 0].tolist() == [0, 2, 3]  # black before a first step
    assert act.tolist() == [[1, 0], [1, 0], [0, 1]]


def test_frame_readout_reads_motion_between_two_frames():
    """A target only the pair holds (how far a bright dot moved) is read on new rows."""
    g = torch.Generator().manual_seed(0)

    def dots(rows: int):
        pos = torch.randint(2, 14, (rows, 2), generator=g)  # (S, 2) the dot's column before and now
        frames = torch.zeros(2 * rows, 3, 16, 16, dtype=torch.uint8)  # rows 2s, 2s + 1: before, now
        frames[torch.arange(0, 2 * rows, 2), :, 8, pos[:, 0]] = 255
        frames[torch.arange(1, 2 * rows, 2), :, 8, pos[:, 1]] = 255
        prev = torch.arange(2 * rows) - 1
        prev[::2] = -1
        feat = {"obs": frames, "prev": prev, "act": torch.zeros(2 * rows, 3)}
        return feat, (pos[:, 1] - pos[:, 0]).float() / 4  # (S,) the motion

    (fit, y), (test, y_test) = dots(600), dots(200)
    torch.manual_seed(0)
    net = readout.FrameReadout((3, 16, 16), 4, 2, 3, width=64)
    nows = lambda f: (lambda i: readout.frame_rows(f)(2 * i + 1))  # noqa: E731  the "now" rows
    out = readout.fit_readout(net, nows(fit), y, nows(test), y_test, 600, lr=3e-3, batch=64, chunk=64)
    assert out["r2_heldout"] > 0.8
