"""bench/experiments/pong_ball.py: the probe of whether Cooperative Pong's ball is in the image
world model's latent — its pixel masks, its scores, and both subcommands at the smoke preset."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pymunk", reason="the Butterfly games need the [butterfly] extra")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "experiments"))

import pong_ball  # noqa: E402

from matwm_fast import butterfly, train  # noqa: E402

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


def test_centres_find_the_ball_and_the_paddles_rows():
    frames = torch.cat([frame_with((10, 30)), frame_with((40, 7)), frame_with((0, 0), value=0)])  # (3, 3, 64, 64)
    c = pong_ball.centres(frames)
    where, seen = c["ball"]
    assert seen.tolist() == [True, True, False]
    torch.testing.assert_close(where[:2], torch.tensor([[10.5, 30.5], [40.5, 7.5]], dtype=torch.float64) / 64)
    rows, both = c["paddles"]
    assert both.all()  # frame_with draws the left paddle over rows 20-29, the right over 25-39
    torch.testing.assert_close(rows, torch.tensor([[24.5, 32.0]] * 3, dtype=torch.float64) / 64)


def test_ridge_r2_reads_a_linear_target_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 9, generator=g)  # (F, D)
    y = x @ torch.randn(9, 2, generator=g) + 3  # (F, 2)
    assert pong_ball.ridge_r2(x[:300], y[:300], x[300:], y[300:]) == pytest.approx(1.0, abs=1e-3)
    noise = torch.randn(400, 2, generator=g)  # (F, 2): nothing in x predicts it
    assert pong_ball.ridge_r2(x[:300], noise[:300], x[300:], noise[300:]) < 0.05
    half = y + torch.randn(400, 2, generator=g) * y.std(0)  # as much noise as signal: R² near 1/2
    assert 0.3 < pong_ball.ridge_r2(x[:300], half[:300], x[300:], half[300:]) < 0.7
    assert pong_ball.ridge_r2(x[:300], y[:300], x[:1], y[:1]) is None  # one frame in view: no R²
    still = torch.full((100, 2), 0.5)  # a paddle that never moves: R² means nothing
    assert pong_ball.ridge_r2(x[:300], y[:300], x[:100], still) is None


def categorical_codes(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` latents like the encoder's: 16 categoricals of 4 classes, one-hot, (F, 64); and the
    classes drawn, (F, 16)."""
    c = torch.randint(0, 4, (rows, 16), generator=torch.Generator().manual_seed(seed))  # (F, 16)
    return torch.nn.functional.one_hot(c, 4).flatten(1).float(), c


def test_the_mlp_read_out_finds_what_the_latent_holds_only_in_combination():
    x, c = categorical_codes(2000)
    y = torch.stack([c[:, 0] * c[:, 1], (c[:, 2] == c[:, 3]).long()], -1).float()  # (F, 2): interactions
    state = torch.get_rng_state()
    read = pong_ball.mlp_fit(x[:1500], y[:1500])
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: a run's batches are untouched
    ridge = pong_ball.ridge_r2(x[:1500], y[:1500], x[1500:], y[1500:])
    assert ridge < 0.45 and pong_ball.r2(read(x[1500:]), y[1500:]) > 0.7
    line = x[:, :8] @ torch.arange(8.0).reshape(8, 1).repeat(1, 2)  # (F, 2): what ridge reads
    read = pong_ball.mlp_fit(x[:1500], line[:1500])
    assert pong_ball.r2(read(x[1500:]), line[1500:]) > 0.95


def test_the_mlp_read_out_does_not_memorise_noise():
    x, _ = categorical_codes(2000, seed=1)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))  # (F, 2): nothing in x predicts it
    read = pong_ball.mlp_fit(x[:1500], noise[:1500])
    assert abs(pong_ball.r2(read(x[1500:]), noise[1500:])) < 0.05  # stopped on its own held-back tenth
    assert pong_ball.r2(read(x[:1500]), noise[:1500]) < 0.2  # so not fitted to its own rows either
    assert pong_ball.r2(read(x[:1]), noise[:1]) is None


@pytest.mark.parametrize("shape, size", [((37, 53, 3), (9, 7)), ((280, 480, 3), (64, 64)), ((16, 16, 3), (5, 16))])
def test_resize_max_is_the_maximum_over_each_output_pixels_source_pixels(shape, size):
    frame = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    want = np.zeros((3, *size), np.uint8)
    sy, sx = shape[0] / size[0], shape[1] / size[1]
    for d in range(size[0]):
        for e in range(size[1]):
            # the source pixels overlapping [d·sy, (d+1)·sy) × [e·sx, (e+1)·sx) by more than nothing
            ys = range(math.floor(d * sy), min(math.ceil((d + 1) * sy), shape[0]))
            xs = range(math.floor(e * sx), min(math.ceil((e + 1) * sx), shape[1]))
            want[:, d, e] = frame[ys.start:ys.stop, xs.start:xs.stop].max((0, 1))
    np.testing.assert_array_equal(pong_ball.resize_max(frame, size), want)
    turned = np.ascontiguousarray(frame.transpose(1, 0, 2)).transpose(1, 0, 2)  # pygame's layout: a transposed view
    np.testing.assert_array_equal(pong_ball.resize_max(turned, size), want)


def test_a_lone_bright_pixel_keeps_its_intensity_under_max_and_fades_under_area():
    frame = np.zeros((280, 480, 3), np.uint8)
    frame[141, 243] = 255
    assert pong_ball.resize_max(frame).max() == 255 and pong_ball.resize_max(frame).any(0).sum() == 1
    assert butterfly.resize(frame).max() < 10


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
    for r in rows:  # fitted on 40 frames: scores there; the 4 held-out ones may hold a paddle still (None)
        for read in ("", "_mlp"):
            assert all(-math.inf < r[f"{k}_position_r2{read}_seen"] <= 1 for k in ("ball", "paddles"))
            assert all(r[f"{k}_position_r2{read}"] is None or r[f"{k}_position_r2{read}"] <= 1
                       for k in ("ball", "paddles"))
    area = butterfly.resize
    assert pong_ball.main(["autoencoder", "--preset", "smoke", "--updates", "1", "--data", "20", "--batch", "4",
                           "--fp32", "--resize", "max"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["resize"] == "max" and rows[-1]["resize"] == "area" and butterfly.resize is area  # put back
    assert rows[-1]["latent"] == "sample" and rows[-1]["lr"] == 1e-3  # the smoke preset's wm.lr
    assert pong_ball.main(["autoencoder", "--preset", "smoke", "--updates", "1", "--data", "20", "--batch", "4",
                           "--fp32", "--latent", "probs", "--lr", "0.01"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["latent"] == "probs" and row["lr"] == 0.01 and "object_weight" not in row
    assert pong_ball.main(["autoencoder", "--preset", "smoke", "--updates", "1", "--data", "20", "--batch", "4",
                           "--fp32", "--object-weight", "16"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["object_weight"] == 16 and row["loss"] > row["loss_unweighted"] > 0


def test_latent_probs_decodes_the_probabilities_and_sample_the_most_likely_class():
    from matwm_fast.config import preset
    from matwm_fast.env import env_spec
    from matwm_fast.policy import build_networks

    cfg = preset("smoke", "cooperative_pong")
    torch.manual_seed(0)
    wm, _ = build_networks(cfg, env_spec(cfg.env))
    frames = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        _, probs = wm.posterior(frames)  # (F, K, C)
        mode = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).flatten(-2).float()  # (F, K·C)
        want_probs = wm.decoder(probs.flatten(-2)).clamp(0, 1)  # (F, 3, H, W)
        want_mode = wm.decoder(mode).clamp(0, 1)  # (F, 3, H, W)
    torch.testing.assert_close(pong_ball.reconstruct(wm, frames, latent="probs"), want_probs)
    torch.testing.assert_close(pong_ball.reconstruct(wm, frames), want_mode)
    assert not torch.allclose(want_probs, want_mode)


@pytest.mark.parametrize("args, says", [
    (["recon", "no_such_run"], "no_such_run: no such run directory or checkpoint"),
    (["autoencoder", "--updates", "0"], "--updates 0: must be at least 1"),
    (["autoencoder", "--data", "5"], "--data 5: at least 10 steps"),
    (["autoencoder", "--lr", "0"], "--lr 0.0: must be a finite number above 0"),
    (["autoencoder", "--lr", "inf"], "--lr inf: must be a finite number above 0"),
    (["autoencoder", "--lr", "nan"], "--lr nan: must be a finite number above 0"),
    (["autoencoder", "--latent", "mean"], "argument --latent: invalid choice: 'mean'"),
    (["autoencoder", "--object-weight", "0.5"], "--object-weight 0.5: must be a finite number of at least 1"),
    (["autoencoder", "--object-weight", "nan"], "--object-weight nan: must be a finite number of at least 1"),
])
def test_bad_arguments_are_refused(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        pong_ball.main(args)
    assert e.value.code == 2 and f"error: {says}" in capsys.readouterr().err


def test_a_directory_that_is_not_a_run_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pong_ball.main(["recon", str(tmp_path)])
    assert e.value.code == 2 and f"error: no checkpoint in {tmp_path}" in capsys.readouterr().err


def test_scoring_the_frames_it_trained_on_leaves_the_batches_as_they_were(monkeypatch, capsys):
    """The seen-frame score and the position read-out draw latents too; under their own RNG fork a
    run's batches (so its losses) are those of a run where neither draws anything."""
    argv = ["autoencoder", "--preset", "smoke", "--updates", "3", "--every", "1", "--data", "20", "--batch", "4",
            "--fp32"]

    def losses() -> list[float]:
        assert pong_ball.main(argv) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert all("ball_recovered_seen" in r for r in rows)
        return [r["loss"] for r in rows]

    real = losses()
    calls = []
    reconstruct = pong_ball.reconstruct

    def second_draws_nothing(wm, frames, *args):
        calls.append(1)
        return reconstruct(wm, frames, *args) if len(calls) % 2 else torch.zeros(frames.shape)

    monkeypatch.setattr(pong_ball, "reconstruct", second_draws_nothing)
    assert losses() == real and len(calls) == 6
    monkeypatch.setattr(pong_ball, "probe", lambda *a: {})  # no read-out, so no draws of its own
    assert losses() == real
