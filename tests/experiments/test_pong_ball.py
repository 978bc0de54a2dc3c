"""bench/experiments/pong_ball.py: the probe of whether Cooperative Pong's ball is in the image
world model's latent — its pixel masks, its scores, and both subcommands at the smoke preset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pymunk", reason="the Butterfly games need the [butterfly] extra")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "experiments"))

import pong_ball  # noqa: E402

from matwm_fast import train  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")]


def frame_with(ball: tuple[int, int], value: int = 255) -> torch.Tensor:
    """A 64 × 64 frame: paddles at both edges, a 2 × 2 ball at ``ball`` (row, column)."""
    f = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    f[..., 20:30, 0:2] = 255  # left paddle
    f[..., 25:40, 56:64] = 255  # right paddle
    r, c = ball
    f[..., r:r + 2, c:c + 2] = value
    return f


def test_the_masks_tell_ball_paddles_and_background_apart():
    m = pong_ball.masks(frame_with((10, 30)))
    assert m["ball"].sum() == 4 and m["paddles"].sum() == 20 + 120
    assert m["background"].sum() == 64 * 64 - 4 - 140
    assert not (m["ball"] & m["paddles"]).any()


def test_scores_measure_what_the_reconstruction_recovers():
    frames = frame_with((10, 30))
    target = frames.float() / 255
    s = pong_ball.scores(target.clone(), frames)  # a perfect reconstruction
    assert s["ball"]["recovered"] == 1.0 and s["paddles"]["recovered"] == 1.0 and s["ball"]["sq_error_per_pixel"] == 0
    assert s["background"]["recovered"] is None
    no_ball = target.clone()
    no_ball[..., 10:12, 30:32] = 0  # the ball dropped, everything else kept
    s = pong_ball.scores(no_ball, frames)
    assert s["ball"]["recovered"] == 0.0 and s["paddles"]["recovered"] == 1.0
    assert s["ball"]["sq_error_per_pixel"] == pytest.approx(3.0)  # three channels, each off by 1
    half = target.clone()
    half[..., 10:12, 30:32] = 0.5
    assert pong_ball.scores(half, frames)["ball"]["recovered"] == 0.5


def test_both_subcommands_run_at_the_smoke_preset(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--preset", "smoke", "--scenario", "cooperative_pong", "--device", "cpu", "--steps", "30",
                       "--max-cycles", "40", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert pong_ball.main(["recon", str(run), "--episodes", "2", "--steps", "5"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 30 and res["frames"] == 2 * 5 * 2  # 10 joint steps, both paddles' frames
    assert set(res) >= {"ball", "paddles", "background"} and res["paddles"]["pixels_per_frame"] > 0
    assert pong_ball.main(["autoencoder", "--preset", "smoke", "--updates", "2", "--every", "1", "--data", "20",
                           "--batch", "4", "--fp32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["update"] for r in rows] == [1, 2] and all(r["channels"] == 8 for r in rows)


@pytest.mark.parametrize("args, says", [
    (["recon", "no_such_run"], "no_such_run: no such run directory or checkpoint"),
    (["autoencoder", "--updates", "0"], "--updates 0: must be at least 1"),
    (["autoencoder", "--data", "5"], "--data 5: at least 10 steps"),
])
def test_bad_arguments_are_refused(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        pong_ball.main(args)
    assert e.value.code == 2 and f"error: {says}" in capsys.readouterr().err


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pong_ball.main(["recon", str(tmp_path)])
    assert e.value.code == 2 and f"error: no checkpoint in {tmp_path}" in capsys.readouterr().err
