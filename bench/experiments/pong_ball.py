"""``python bench/experiments/pong_ball.py`` — does the image world model see Cooperative Pong's ball?

The ball is the one thing a Pong policy must track, and at 64 × 64 it is about 2 × 2 pixels (a
10-pixel ball of the 480 × 280 screen, area-averaged: ~4.5 pixels at half intensity), beside two
paddles of 40–60 pixels.  A frame's reconstruction is a sum over 12,288 values, so a model can
reach a low loss while dropping the ball, and a latent without the ball gives the actor nothing to
act on: imagined rallies never end, so imagination never shows the −10 of a miss.

    python bench/experiments/pong_ball.py recon RUN_DIR [RUN_DIR ...]
    python bench/experiments/pong_ball.py autoencoder --channels 8 --updates 3000

``recon`` loads each run's latest checkpoint, encodes frames of the uniformly random policy
(``--episodes`` fresh episodes of up to ``--steps`` steps, from ``reset(seed=5,000 + e)``), decodes
the most likely latent, and reports per kind of pixel — ball, paddles, background — the squared
error and the fraction of the target's intensity the reconstruction recovers.

``autoencoder`` asks the same of the frames' encoder and decoder alone, offline: the preset's
encoder → categorical latent (straight-through draw) → decoder, trained on reconstruction only (no
KL, no dynamics: the paper's Eq. 3 pixel term, nothing else) on 3,000 random-policy steps of both
agents, batches of 384 frames (the ``cpu`` preset's 12 × 32 world-model batch), Adam at the preset's
world-model learning rate (or ``--lr``), bf16 autocast; every 250 updates the ball's recovered
fraction on a tenth as many held-out steps (300), and on as many frames it trained on (``ball_recovered_seen``: a ball
fitted there and not on new frames is memorised, not seen).
Each score also reads positions out of the latent: a ridge regression from the encoder's
probabilities to the ball's centre and to the paddles' rows, and a one-hidden-layer MLP
(``_mlp``) for what the latent holds only non-linearly, fitted on frames it trained on and
scored (R²) on the held-out ones (and, ``_seen``, on those it was fitted on) — whether the code
holds the ball though the decoder does not draw it; the paddles, which it draws, are the
read-out's yardstick.
``--channels`` sets ``wm.cnn_channels`` (the ``cpu`` preset's 8; the paper's 32).
``--resize max`` shrinks the game's frames by the maximum over each output pixel's source pixels
instead of STORM's area average, so the ball is drawn at full intensity (about 6 object pixels a
frame instead of 4.6 dimmer ones): does a ball that weighs about 4× more in the loss get into the latent?
``--object-weight W`` (outside the paper; the world model's ``wm.recon_object_weight``) weighs the
squared error of every pixel whose target shows an object (the ball's and the paddles') W times:
does a ball that costs W times more when dropped get into the latent, and can a read-out then find
it?  1, the default, is the paper's loss.
``--latent probs`` hands the decoder the encoder's (unimixed) probabilities instead of the one-hot
draw, in training and scoring alike: a continuous, deterministic bottleneck of the same width — is it
the categorical draw that keeps the ball out?

Pixels are told apart by position and brightness: a pixel whose summed RGB is above 0.3 is an
object; objects in the columns of the paddles (x ≤ 4, x ≥ 54 of 64) are paddles, the others the ball.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from matwm_fast import butterfly  # noqa: E402
from matwm_fast.checkpoint import CheckpointError  # noqa: E402
from matwm_fast.config import WorldModelConfig, preset, with_fields  # noqa: E402
from matwm_fast.env import MultiAgentEnv, env_spec  # noqa: E402
from matwm_fast.losses import pixel_reconstruction  # noqa: E402
from matwm_fast.policy import Policy, build_networks  # noqa: E402
from matwm_fast.wm_probe import r2_score  # noqa: E402

SCENARIO = "cooperative_pong"
# summed RGB in [0, 3] above which a pixel shows an object: the world model's level, so the masks
# scored here are the pixels --object-weight weighs
OBJECT = WorldModelConfig.recon_object_level
PADDLE_COLUMNS = (4, 54)  # x ≤ 4: the left paddle, x ≥ 54: the right one (64-pixel frames)
BATCH_FRAMES = 384  # the cpu preset's world-model batch, 12 sequences × 32 steps
EVERY = 250
# The position probe's ridge, per fitted frame: enough to keep the solve over the latent's K·C
# probabilities well posed when some classes are never used, too little to bias a read-out that is there.
RIDGE = 1e-4
PROBE_FRAMES = 6_000  # frames it trained on that fit the probe: all of the default 3,000 steps'
# The non-linear read-out: one hidden layer twice the cpu preset's actor width (128), full-batch AdamW, stopped
# on the last tenth of its own fit frames (so nothing is chosen on the frames it is scored on).
MLP_HIDDEN = 256
MLP_STEPS = 1_000
MLP_CHECK = 25
MLP_LR = 1e-3
MLP_DECAY = 0.1


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def random_frames(env: MultiAgentEnv, steps: int, first_seed: int, rng: np.random.Generator,
                  per_episode: int | None = None) -> torch.Tensor:
    """``steps`` joint steps of the uniformly random policy, episodes from ``reset(seed=first_seed + e)``:
    every agent's frame, (steps·N, 3, 64, 64) uint8."""
    out, e = [], 0
    while len(out) < steps:
        obs, done, t = env.reset(seed=first_seed + e), False, 0
        e += 1
        while not done and len(out) < steps and (per_episode is None or t < per_episode):
            out.append(obs.copy())  # (N, 3, 64, 64)
            obs, _, _, done = env.step(rng.integers(0, env.spec.n_actions, size=env.spec.n_agents))
            t += 1
    return torch.as_tensor(np.concatenate(out))


def resize_max(frame: np.ndarray, size: tuple[int, int] = butterfly.FRAME[1:]) -> np.ndarray:
    """``butterfly.resize``'s contract, (H, W, 3) uint8 → (3, h, w) uint8, but each output pixel the
    maximum of the source pixels it overlaps (those :func:`butterfly.resize` weighs above 0)."""
    iy, wy = butterfly._area_weights(frame.shape[0], size[0])
    ix, wx = butterfly._area_weights(frame.shape[1], size[1])
    iy, ix = np.where(wy > 0, iy, iy[:, :1]), np.where(wx > 0, ix, ix[:, :1])  # unused slots: a used pixel again
    rows = frame[iy].max(1)  # (h, W, 3)
    return np.ascontiguousarray(rows[:, ix].max(2).transpose(2, 0, 1))  # (3, h, w)


@contextlib.contextmanager
def frames_resized(mode: str):
    """The Butterfly env's preprocessing is STORM's area resize, fixed; ``max`` swaps it for
    :func:`resize_max` while the experiment collects its frames."""
    area = butterfly.resize
    butterfly.resize = resize_max if mode == "max" else area
    try:
        yield
    finally:
        butterfly.resize = area


def masks(frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """(F, 3, H, W) uint8 → {kind: (F, H, W) bool} for ball, paddles, background."""
    bright = frames.float().div(255).sum(1) > OBJECT  # (F, H, W)
    cols = torch.arange(frames.shape[-1])
    middle = (cols > PADDLE_COLUMNS[0]) & (cols < PADDLE_COLUMNS[1])  # (W,)
    return {"ball": bright & middle, "paddles": bright & ~middle, "background": ~bright}


@torch.no_grad()
def reconstruct(wm, frames: torch.Tensor, bf16: bool = False, latent: str = "sample") -> torch.Tensor:
    """Frames → the decoder's image of their most likely latent (``latent="probs"``: of their
    probabilities), float in [0, 1]."""
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        _, probs = wm.posterior(frames)  # (F, K, C)
        if latent == "probs":
            z = probs.flatten(-2)  # (F, K·C)
        else:
            z = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).flatten(-2).float()  # (F, K·C)
        return wm.decoder(z).float().clamp(0, 1)  # (F, 3, H, W)


def centres(frames: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(F, 3, H, W) uint8 → {object: (where, in view)}: the ball's centre (row, column) and the two
    paddles' centre rows, as fractions of the frame's side, (F, 2); and whether it is in view, (F,)."""
    m = masks(frames)
    h, w = frames.shape[-2:]
    rows = torch.arange(h, dtype=torch.float64) / h  # (H,)
    cols = torch.arange(w, dtype=torch.float64) / w  # (W,)
    left = torch.arange(w) <= PADDLE_COLUMNS[0]  # (W,)

    def centre(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = mask.sum((1, 2)).clamp(min=1)  # (F,)
        return (mask.sum(2) * rows).sum(1) / n, (mask.sum(1) * cols).sum(1) / n, mask.any(2).any(1)  # (F,) ×3

    ball_row, ball_col, ball_in = centre(m["ball"])
    left_row, _, left_in = centre(m["paddles"] & left)
    right_row, _, right_in = centre(m["paddles"] & ~left)
    return {"ball": (torch.stack([ball_row, ball_col], -1), ball_in),  # (F, 2), (F,)
            "paddles": (torch.stack([left_row, right_row], -1), left_in & right_in)}  # (F, 2), (F,)


def r2(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    """R² of a read-out's (F, 2) predictions, averaged over the coordinates; None for fewer than two
    rows (an object never in view) or a target that never moves (a paddle held still)."""
    if len(y) < 2:
        return None
    r = float(r2_score(pred.double().numpy(), y.double().numpy(), axis=0).mean())  # NaN where a coordinate never moves
    return None if math.isnan(r) else round(r, 3)


def ridge_fit(x_fit: torch.Tensor, y_fit: torch.Tensor, penalty: float = RIDGE):
    """A ridge regression of y on x (centred, so the bias is the mean): the fitted read-out, x → y."""
    x_fit, y_fit = x_fit.double(), y_fit.double()
    mx, my = x_fit.mean(0), y_fit.mean(0)  # (D,), (2,)
    a = x_fit - mx  # (F, D)
    gram = a.T @ a + penalty * a.shape[0] * torch.eye(a.shape[1], dtype=a.dtype)  # (D, D)
    w = torch.linalg.solve(gram, a.T @ (y_fit - my))  # (D, 2)
    return lambda x: (x.double() - mx) @ w + my  # (F', 2)


def mlp_fit(x_fit: torch.Tensor, y_fit: torch.Tensor, seed: int = 0):
    """:func:`ridge_fit`'s contract for a one-hidden-layer MLP (``MLP_HIDDEN`` ReLU units, full-batch
    AdamW at ``MLP_LR``, weight decay ``MLP_DECAY``, on the standardised target's squared error): a position the latent holds only
    non-linearly — as a combination of categories, say — which ridge misses.  The last tenth of the
    fit rows is kept back to stop it: the weights of the check (every ``MLP_CHECK`` of ``MLP_STEPS``
    steps, and the start, which predicts the mean) with the least error there, so nothing is chosen
    on the rows it is scored on.  The last tenth, not a random one: frames come in time order, and a
    frame's neighbours in the same episode would let a memorised position pass the check.  Its own
    generator seeds the weights, so it draws nothing from torch's."""
    g = torch.Generator().manual_seed(seed)
    n_val = max(1, len(x_fit) // 10)
    fit, val = torch.arange(len(x_fit) - n_val), torch.arange(len(x_fit) - n_val, len(x_fit))
    x_fit, y_fit = x_fit.float(), y_fit.float()
    mx = x_fit[fit].mean(0)  # (D,): probabilities are already on one scale; a class never used would not divide
    my, sy = y_fit[fit].mean(0), y_fit[fit].std(0).clamp(min=1e-6)  # (2,), (2,)
    d, o = x_fit.shape[1], y_fit.shape[1]
    w1 = (torch.randn(d, MLP_HIDDEN, generator=g) / math.sqrt(d)).requires_grad_()  # (D, H)
    w2 = torch.zeros(MLP_HIDDEN, o, requires_grad=True)  # (H, 2): it starts at the mean, R² 0, and may stop there
    b1, b2 = torch.zeros(MLP_HIDDEN, requires_grad=True), torch.zeros(o, requires_grad=True)  # (H,), (2,)
    params = [w1, b1, w2, b2]

    def net(x: torch.Tensor, p: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu((x.float() - mx) @ p[0] + p[1]) @ p[2] + p[3]  # (F, 2), in standard units

    target = (y_fit - my) / sy  # (F, 2)
    opt = torch.optim.AdamW(params, lr=MLP_LR, weight_decay=MLP_DECAY)
    with torch.no_grad():
        best = (net(x_fit[val], params) - target[val]).pow(2).mean().item()
    kept = [p.detach().clone() for p in params]
    with torch.enable_grad():
        for step in range(1, MLP_STEPS + 1):
            loss = (net(x_fit[fit], params) - target[fit]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % MLP_CHECK == 0:
                with torch.no_grad():
                    err = (net(x_fit[val], params) - target[val]).pow(2).mean().item()
                if err < best:
                    best, kept = err, [p.detach().clone() for p in params]

    @torch.no_grad()
    def read(x: torch.Tensor) -> torch.Tensor:
        return net(x, kept) * sy + my  # (F', 2)
    return read


def ridge_r2(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             penalty: float = RIDGE) -> float | None:
    """R² on the test rows of :func:`ridge_fit` fitted on the fit rows: 0 is the fit rows' mean, 1 a
    perfect read-out; None as :func:`r2` says, or with fewer than two rows to fit."""
    if min(len(x_fit), len(x_test)) < 2:
        return None
    return r2(ridge_fit(x_fit, y_fit, penalty)(x_test), y_test)


@torch.no_grad()
def probe(wm, fit: torch.Tensor, test: torch.Tensor, bf16: bool = False) -> dict[str, float | None]:
    """How well a read-out of the encoder's latent probabilities gives each object's position:
    ridge (linear) and :func:`mlp_fit` (non-linear) fitted on ``fit`` frames, R² on ``test`` frames,
    frames with the object in view only.  The paddles, which the decoder draws, say what a read-out
    of a position the latent holds scores; the ball is the question."""
    def feats(frames: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return wm.posterior(frames)[1].flatten(-2).float()  # (F, K·C)

    xf, xt = feats(fit), feats(test)  # (F, K·C), (F', K·C)
    cf, ct = centres(fit), centres(test)
    out = {}
    for k in ("ball", "paddles"):
        x, y = xf[cf[k][1]], cf[k][0][cf[k][1]]  # (F, K·C), (F, 2): the fit frames with it in view
        x_test, y_test = xt[ct[k][1]], ct[k][0][ct[k][1]]  # (F', K·C), (F', 2)
        for name, fitter in (("", ridge_fit), ("_mlp", mlp_fit)):
            read = fitter(x, y) if len(x) >= 2 else None
            out[f"{k}_position_r2{name}"] = r2(read(x_test), y_test) if read else None
            out[f"{k}_position_r2{name}_seen"] = r2(read(x), y) if read else None  # on its fit frames: what it could memorise
    return out


def scores(rec: torch.Tensor, frames: torch.Tensor) -> dict:
    target = frames.float() / 255  # (F, 3, H, W)
    err = (rec - target).pow(2).sum(1)  # (F, H, W)
    out = {}
    for kind, m in masks(frames).items():
        got, want = rec.sum(1)[m].sum().item(), target.sum(1)[m].sum().item()
        out[kind] = {"pixels_per_frame": round(m.sum().item() / frames.shape[0], 2),
                     "sq_error_per_pixel": round(err[m].mean().item(), 4),
                     # the background's few faint pixels make a ratio of noise: objects only
                     "recovered": round(got / want, 3) if kind != "background" and want > 0 else None}
    return out


def cmd_recon(args) -> int:
    torch.set_num_threads(args.threads)
    for run in args.runs:
        pol = Policy(run)
        if pol.cfg.env.scenario != SCENARIO:
            raise ValueError(f"{run}: a {pol.cfg.env.scenario} run; this probe is for {SCENARIO}")
        env = MultiAgentEnv(pol.cfg.env)
        frames = random_frames(env, args.episodes * args.steps, 5_000, np.random.default_rng(0), args.steps)
        res = {"run": str(run), "step": pol.step, "frames": int(frames.shape[0]),
               **scores(reconstruct(pol.wm, frames), frames)}
        print(json.dumps(res), flush=True)
    return 0


def cmd_autoencoder(args) -> int:
    torch.set_num_threads(args.threads)
    cfg = with_fields(preset(args.preset, SCENARIO), {"wm.cnn_channels": args.channels})
    spec = env_spec(cfg.env)
    torch.manual_seed(args.seed)
    wm, _ = build_networks(cfg, spec)
    env = MultiAgentEnv(cfg.env)
    rng = np.random.default_rng(args.seed)
    with frames_resized(args.resize):
        train, test = random_frames(env, args.data, 0, rng), random_frames(env, args.data // 10, 900_000, rng)
    ball_pixels = round(masks(test)["ball"].sum().item() / test.shape[0], 2)
    seen = train[:test.shape[0]]  # (F, 3, 64, 64) frames it trains on, as many as it holds out
    opt = torch.optim.Adam(wm.parameters(), lr=args.lr or cfg.wm.lr)
    wm.train()
    t0 = time.time()
    for u in range(1, args.updates + 1):
        x = train[torch.randint(0, train.shape[0], (args.batch,))]  # (B, 3, 64, 64)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
            z, probs = wm.posterior(x)  # (B, K·C), (B, K, C)
            if args.latent == "probs":
                z = probs.flatten(-2)  # (B, K·C)
            rec = wm.decoder(z)  # (B, 3, 64, 64)
        loss = pixel_reconstruction(rec[None], x[None], args.object_weight, OBJECT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if u % args.every == 0 or u == args.updates:
            ball = scores(reconstruct(wm, test, args.bf16, args.latent), test)["ball"]["recovered"]
            with torch.random.fork_rng():  # the batches stay those of a run that scores held-out frames only
                ball_seen = scores(reconstruct(wm, seen, args.bf16, args.latent), seen)["ball"]["recovered"]
                read_out = probe(wm, train[:PROBE_FRAMES], test, args.bf16)
            print(json.dumps({"channels": args.channels, "resize": args.resize, "latent": args.latent,
                              **({"object_weight": args.object_weight,  # and the paper's loss of the same batch
                                  "loss_unweighted": round(pixel_reconstruction(rec[None].detach(), x[None]).item(), 2)}
                                 if args.object_weight != 1 else {}),
                              "lr": opt.param_groups[0]["lr"], "ball_pixels": ball_pixels, "update": u,
                              "loss": round(loss.item(), 2), "ball_recovered": ball, "ball_recovered_seen": ball_seen,
                              **read_out,
                              "s": round(time.time() - t0)}),
                  flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/experiments/pong_ball.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", metavar="{recon,autoencoder}")
    sub.required = True
    r = sub.add_parser("recon", help="a trained world model's reconstruction of ball, paddles, background",
                       allow_abbrev=False)
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Cooperative Pong run directories (or checkpoints)")
    r.add_argument("--episodes", type=int, default=4, help="random-policy episodes (default 4)")
    r.add_argument("--steps", type=int, default=30, help="steps kept per episode (default 30)")
    a = sub.add_parser("autoencoder", help="the frames' autoencoder alone, offline", allow_abbrev=False)
    a.add_argument("--preset", default="cpu", help="whose encoder and decoder (default cpu)")
    a.add_argument("--channels", type=int, default=8, help="wm.cnn_channels (default 8, the cpu preset's)")
    a.add_argument("--updates", type=int, default=3000, help="gradient steps (default 3000)")
    a.add_argument("--data", type=int, default=3000, help="random-policy steps to train on (default 3000)")
    a.add_argument("--batch", type=int, default=BATCH_FRAMES, help=f"frames per batch (default {BATCH_FRAMES})")
    a.add_argument("--every", type=int, default=EVERY, help=f"updates between scores (default {EVERY})")
    a.add_argument("--seed", type=int, default=0, help="seeds the weights, the data and the batches (default 0)")
    a.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast")
    a.add_argument("--resize", choices=("area", "max"), default="area",
                   help="how the game's frames shrink to 64 x 64: area (STORM's, the env's) or max (default area)")
    a.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: the preset's wm.lr)")
    a.add_argument("--object-weight", type=float, default=1.0,
                   help="weight of the squared error on pixels that show an object (default 1, the paper's loss)")
    a.add_argument("--latent", choices=("sample", "probs"), default="sample",
                   help="what the decoder reads: the one-hot draw (the model's) or the probabilities (default sample)")
    for c in (r, a):
        c.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("threads", "episodes", "steps", "channels", "updates", "data", "batch", "every"):
            v = getattr(args, name, None)
            if v is not None and v < 1:
                raise ValueError(f"--{name} {v}: must be at least 1")
        if getattr(args, "lr", None) is not None and not 0 < args.lr < math.inf:
            raise ValueError(f"--lr {args.lr}: must be a finite number above 0")
        if args.cmd == "autoencoder" and not 1 <= args.object_weight < math.inf:
            raise ValueError(f"--object-weight {args.object_weight}: must be a finite number of at least 1")
        if args.cmd == "recon":
            for run in args.runs:
                if not Path(run).exists():
                    raise ValueError(f"{run}: no such run directory or checkpoint")
            return cmd_recon(args)
        if args.data < 10:
            raise ValueError(f"--data {args.data}: at least 10 steps (a tenth is held out)")
        return cmd_autoencoder(args)
    except (ValueError, CheckpointError) as e:  # a directory that is not a run: said, not a traceback
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
