"""MLP read-outs for ``bench/experiments/diagnose.py``: what a small supervised net can read from
the data or from a trained world model's own states, as the reference its heads are held against.

- :func:`fit_mlp` — a 2-hidden-layer MLP regressing a target on features, scored on held-out rows,
  optionally early-stopped on the last rows of its fit (later episodes), for read-outs that would
  otherwise memorise;
- :func:`model_features` — a world model's teacher-forced features per step that happened: the
  latent with the action, its decoding (vectors), the sequence model's h_t (the reward head's
  input), the reward head's own prediction, and which step ended an episode early;
- :func:`state_probe` — the reward read from h_t and from (z_t, a_t) on held-out episodes, beside
  the reward head (``diagnose model --probe``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from matwm_fast.losses import symlog
from matwm_fast.vision import ConvEncoder
from matwm_fast.wm_probe import agent_rows, r2_score, teacher_forced_pass
from matwm_fast.world_model import WorldModel

Tensor = torch.Tensor


Rows = Callable[[Tensor], tuple[Tensor, ...]]
"""Row indices (B,) → the read-out's inputs for those rows."""


def fit_readout(net: nn.Module, rows: Rows, y: Tensor, test: Rows, y_test: Tensor, updates: int, lr: float = 1e-3,
                batch: int = 384, seed: int = 0, select: float = 0.0, check_every: int = 0, chunk: int = 0) -> dict:
    """Fit ``net`` (inputs → (B,)) to y (S,) with Adam on the squared error, ``batch`` of the S rows
    drawn per update → R² on its fitted rows and on the held-out ones (``test``, y_test), and
    ``pred_heldout`` its predictions there.  With ``select`` > 0 that fraction of the rows, the last
    ones (later episodes), is kept out of the fit and picks the check (every ``check_every``
    updates, default :data:`CHECK_EVERY`, and the last) with the least error on it: early
    stopping, for a read-out that memorises.  ``chunk`` > 0 predicts that many rows at a time."""
    check_every = check_every or CHECK_EVERY
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    cut = y.shape[0] - int(select * y.shape[0])
    val = torch.arange(cut, y.shape[0])  # (V,)

    @torch.no_grad()
    def predict(fn: Rows, idx: Tensor) -> Tensor:
        step = chunk or max(len(idx), 1)
        return torch.cat([net(*fn(idx[i:i + step])) for i in range(0, len(idx), step)])  # (len(idx),)

    best, best_state = float("inf"), None
    for u in range(1, updates + 1):
        idx = torch.randint(0, cut, (batch,), generator=gen)  # (B,)
        loss = (net(*rows(idx)) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if select and (u % check_every == 0 or u == updates):
            err = float((predict(rows, val) - y[val]).pow(2).mean())
            if err < best:
                best, best_state = err, {k: v.clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    pred = predict(test, torch.arange(y_test.shape[0])).numpy()  # (S_test,)
    fitted = predict(rows, torch.arange(cut)).numpy()  # (cut,)
    return {"r2_train": float(r2_score(fitted, y[:cut].numpy())),
            "r2_heldout": float(r2_score(pred, y_test.numpy())), "pred_heldout": pred}


def mlp(d_in: int, width: int) -> nn.Module:
    """Two SiLU hidden layers → one output per row, (B, F) → (B,)."""
    return nn.Sequential(nn.Linear(d_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, 1), nn.Flatten(0))


def fit_mlp(x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, updates: int, width: int = 256, lr: float = 1e-3,
            batch: int = 384, seed: int = 0, select: float = 0.0, check_every: int = 0) -> dict:
    """:func:`fit_readout` of a :func:`mlp` regressing y (S,) on features x (S, F)."""
    torch.manual_seed(seed)
    return fit_readout(mlp(x.shape[1], width), lambda i: (x[i],), y, lambda i: (x_test[i],), y_test, updates, lr,
                       batch, seed, select, check_every)


class FrameReadout(nn.Module):
    """The last two frames (B, 2, C, H, W) uint8 and a one-hot a_t (B, A) → r_t (B,): the world
    model's own encoder architecture (:class:`~matwm_fast.vision.ConvEncoder` at the run's channels
    and stages) on the frames stacked as 2·C channels, then an :func:`mlp` with the action."""

    def __init__(self, shape: tuple[int, int, int], channels: int, stages: int, n_actions: int, width: int = 256):
        super().__init__()
        self.enc = ConvEncoder((2 * shape[0], *shape[1:]), channels, stages, width)
        self.head = mlp(width + n_actions, width)

    def forward(self, frames: Tensor, act: Tensor) -> Tensor:
        return self.head(torch.cat([self.enc(frames.flatten(1, 2)), act], -1))  # (B,)


def frame_rows(feat: dict[str, Tensor]) -> Rows:
    """Rows of :func:`model_features` → (the previous and this frame (B, 2, C, H, W), a_t (B, A));
    an episode's first step pairs with a black frame."""
    frames, prev, act = feat["obs"], feat["prev"], feat["act"]

    def rows(i: Tensor) -> tuple[Tensor, Tensor]:
        before = frames[prev[i].clamp_min(0)] * (prev[i] >= 0).view(-1, 1, 1, 1).to(frames.dtype)  # (B, C, H, W)
        return torch.stack([before, frames[i]], 1), act[i]

    return rows


FRAME_UPDATES = 4000
"""Updates of the frame read-out (``model --probe``): a convolution per row costs ~100× an MLP's."""
FRAME_BATCH = 128
"""Rows per update of the frame read-out."""


CHECK_EVERY = 250
"""Updates between the checks of :func:`fit_mlp`'s early stopping."""
SELECT = 0.1
"""The fitted rows' last fraction that early-stops ``model --probe``'s read-outs."""


@torch.no_grad()
def model_features(wm: WorldModel, data: dict) -> dict[str, Tensor]:
    """What the reward head could read, per step that happened of every agent (rows in time order
    within each episode's agent): ``z`` the posterior's mode of o_t (K·C) with a one-hot a_t,
    ``xhat`` that latent decoded (symlog of the reconstructed o_t) with a_t (vectors only), ``h``
    the sequence model's output h_t (D) — the reward head's own input — the target ``r``, the
    reward head's own prediction ``head`` and ``end`` whether the step ended its episode early
    (E·N·T,) each; and for the observation read-out ``obs`` o_t (vector, or uint8 frame), ``act``
    the one-hot a_t and ``prev`` the row of the same agent's previous step (−1 at an episode's first)."""
    seen = []
    hook = wm.seq.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        recon, head, probs, _ = teacher_forced_pass(wm, data)  # (E·N, T, O) or None, (E·N, T), (E·N, T, K, C)
    finally:
        hook.remove()
    e, t, n = data["act"].shape
    valid = agent_rows(data, "valid")  # (E·N, T)
    end = np.zeros_like(valid)  # (E·N, T)
    ended = np.flatnonzero(np.repeat(data["ended"], n))  # rows whose episode ended early
    end[ended, valid[ended].sum(1) - 1] = True
    keep = torch.as_tensor(valid.reshape(-1))  # (E·N·T,)
    z = torch.nn.functional.one_hot(probs.argmax(-1), wm.C).float().flatten(-2)  # (E·N, T, K·C)
    act = torch.as_tensor(agent_rows(data, "act")).long()  # (E·N, T)
    a = torch.nn.functional.one_hot(act, wm.A).float()  # (E·N, T, A)
    out = {"z": torch.cat([z, a], -1),  # (E·N, T, K·C + A)
           "h": torch.cat(seen, 1).float().cpu(),  # (E·N, T, D)
           "r": torch.as_tensor(agent_rows(data, "rew")).float(),  # (E·N, T)
           "head": torch.as_tensor(head), "end": torch.as_tensor(end)}  # (E·N, T) each
    out["obs"], out["act"] = torch.as_tensor(agent_rows(data, "obs")), a  # (E·N, T, *obs), (E·N, T, A)
    if recon is not None:
        out["xhat"] = torch.cat([symlog(torch.as_tensor(recon).float()), a], -1)  # (E·N, T, O + A)
    feat = {k: v.reshape(e * n * t, *v.shape[2:])[keep] for k, v in out.items()}
    step = torch.as_tensor(np.tile(np.arange(t), e * n))[keep]  # (S,) each kept row's step in its episode
    feat["prev"] = torch.where(step > 0, torch.arange(len(step)) - 1, -1)  # (S,) kept rows are in time order
    return feat


def observation_probe(wm: WorldModel, mine: dict, held: dict, seed: int) -> dict:
    """The reward read from the data itself, (o_{t−1}, o_t, a_t) → r_t: the information a step and its
    predecessor hold, without the model — a :class:`FrameReadout` for frames, an :func:`mlp` on
    symlog features for vectors; fitted and early-stopped like the state read-outs."""
    torch.manual_seed(seed)
    if wm.image:
        net = FrameReadout(tuple(mine["obs"].shape[1:]), wm.cfg.cnn_channels, wm.cfg.cnn_stages, wm.A)
        return fit_readout(net, frame_rows(mine), mine["r"], frame_rows(held), held["r"], FRAME_UPDATES,
                           batch=FRAME_BATCH, seed=seed, select=SELECT, chunk=512)

    def pairs(f: dict) -> Tensor:
        before = f["obs"][f["prev"].clamp_min(0)] * (f["prev"] >= 0).unsqueeze(-1)  # (S, O)
        return torch.cat([symlog(before), symlog(f["obs"]), f["act"]], -1)  # (S, 2·O + A)

    x, x_test = pairs(mine), pairs(held)
    return fit_readout(mlp(x.shape[1], 256), lambda i: (x[i],), mine["r"], lambda i: (x_test[i],), held["r"],
                       len(mine["r"]), seed=seed, select=SELECT)


def state_probe(wm: WorldModel, fit_data: dict, test_data: dict, seed: int) -> dict:
    """Can the reward be read from the model's own states?  MLPs (:func:`fit_mlp`, an update per fitted
    row, early-stopped on the last :data:`SELECT` of them) from h_t and (z_t, a_t) fitted on
    ``fit_data`` and scored on ``test_data``, beside the reward head and a read-out of the data
    itself (:func:`observation_probe`): states that hold what the head misses point at the head;
    an observation that holds what the states miss points at the representation.  Where episodes
    ended early, also the mean prediction at the ending steps."""
    mine, held = model_features(wm, fit_data), model_features(wm, test_data)
    r, end = held["r"].numpy(), held["end"].numpy()  # (S,) each
    out = {"fit_steps": int(len(mine["r"])), "test_steps": int(len(r)),
           "head": {"r2_heldout": float(r2_score(held["head"].numpy(), r))}}
    if end.any():
        out["head"]["end_pred"] = float(held["head"].numpy()[end].mean())
    for name in ("h", "z", "obs"):
        fit = (observation_probe(wm, mine, held, seed) if name == "obs" else
               fit_mlp(mine[name], mine["r"], held[name], held["r"], len(mine["r"]), seed=seed, select=SELECT))
        out[name] = {"r2_train": fit["r2_train"], "r2_heldout": fit["r2_heldout"]}
        if end.any():
            out[name]["end_pred"] = float(fit["pred_heldout"][end].mean())
    return out
