"""How well the world model knows new layouts: its reward fit and its action effects on held-out
episodes — the scores of ``bench/experiments/diagnose.py model``, and the ``eval_wm_*`` columns of
a training-time evaluation.

Both are measured on episodes of the **uniformly random policy**, not of the policy being trained:
the same episodes at every evaluation of a run (and of every run), so a curve of these scores
moves only with the world model — not with the data its policy happens to visit — and a score is
comparable with ``diagnose``'s reports and the supervised references of
bench/results/learning/README.md (*Why simple_spread is slow*), all measured on random-policy data.
Their environment work (playing the episodes, branching the env) does not depend on the model,
so :class:`HeldOutProbe` does it once per process; each evaluation then costs a few batched passes
of the world model.

- **reward fit** (:func:`teacher_forced`, :func:`reward_fit`): a teacher-forced pass over whole
  random-policy episodes (cut into windows of the training sequence length, as training sees
  them); R² = 1 − MSE / Var of the reward head's prediction against the real reward, pooled over
  agents and per agent.  1 is perfect, 0 is predicting the mean.
- **action effects** (:func:`action_effects`, :func:`effect_scores`): from the env state after
  ``context`` random steps, every agent in turn holds each of its actions for ``horizon`` steps
  while the others replay one fixed random sequence.  The env is branched exactly
  (``get_state``/``set_state``) for the true returns, and the world model imagines the same
  action sequences from the same context (mean over ``samples`` latent draws).  What the actor
  learns from is the *difference* between actions, so the score is the correlation of the
  centred effects (each row minus its mean over actions), with the regret of acting on the
  model's best action and on the actor's greedy action.

Held-out episodes come from their own seeds (:data:`HELD_OUT_SEED`), disjoint from every other
kind of episode (:mod:`matwm_fast.protocol`).  The env side — the episodes, the branch points and
their true returns — is :mod:`matwm_fast.probe_episodes`.

**Episodes that end early** (Butterfly: a missed ball, dead knights) are scored alike, with three
differences: episodes are padded and only the steps that happened are scored; branch points are
taken shortly before a random episode's end, where the actions decide it (``near_end``, chosen
when any random episode ended before the time limit); and an imagined return stops after the step
the continuation head ends (c_t = 0, imagination's own c_t), as the env's branch stops at ``done``
— a held action that misses the ball is worth the miss, not the rally the model imagines past it.
A model that never predicts an end (MPE2, where episodes only truncate) sums exactly as before.
Frames are scored like vectors, except the reconstruction's R² per feature, which is for vectors
only (per pixel it says little; ``bench/experiments/pong_ball.py`` scores the objects in frames).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .acting import policy_step
from .config import EnvConfig
from .env import env_spec
from .imagination import outcomes
from .losses import symexp, twohot_decode
from .probe_episodes import HeldActionContexts, held_action_contexts, random_episodes
from .protocol import WORLD_MODEL_PROBE
from .transformer import segment_mask

Tensor = torch.Tensor

HELD_OUT_SEED = WORLD_MODEL_PROBE.lo
"""The training-time probe's episodes: ``reset(seed=HELD_OUT_SEED + e)`` for the teacher-forced
fit, ``HELD_OUT_SEED + 10_000 + c`` for the branch points (``diagnose model --seed`` S plays S + e
and S + 10,000 + c alike): the protocol's world-model range (:mod:`matwm_fast.protocol`), disjoint
from the training envs, the training-time evaluation, tuning and reporting episodes."""
EPISODES = 40
"""Random-policy episodes of the teacher-forced fit (``diagnose model --episodes``)."""
CONTEXTS = 20
"""Branch points of the held-action test (``diagnose model --contexts``): × agents rows."""
SAMPLES = 8
"""Latent draws averaged per imagined return (``diagnose model --samples``, whose default is 16): the
probe's cost is about proportional to it; 8 keeps it well below the evaluation's own episodes at
the ``cpu`` preset (docs/training.md, *Metrics*)."""
ROWS_PER_PASS = 2048
"""Imagined trajectories per batched pass: bounds the memory of a held-action imagination."""


# ----------------------------------------------------------------------------- scores
def r2_score(pred: np.ndarray, true: np.ndarray, axis=None) -> np.ndarray:
    """1 − MSE / Var(true): 1 is perfect, 0 is predicting the mean, < 0 is worse than the mean;
    NaN where the target is constant (MPE2's silent communication slots), where R² means nothing."""
    mse = ((pred - true) ** 2).mean(axis=axis)
    var = true.var(axis=axis)
    return np.where(var > 1e-12, 1.0 - mse / np.maximum(var, 1e-12), np.nan)


def effect_scores(true: np.ndarray, pred: np.ndarray, choice: np.ndarray | None = None) -> dict:
    """true, pred (X, A) returns per context and held action (NaN = action not available);
    choice (X,) the actor's action per context → correlation of centred effects, regrets."""
    valid = ~np.isnan(true)
    tc = true - np.nanmean(true, 1, keepdims=True)  # (X, A) effect of each action
    pc = pred - np.nanmean(np.where(valid, pred, np.nan), 1, keepdims=True)  # (X, A)
    best = np.nanmax(true, 1)  # (X,)
    rows = np.arange(true.shape[0])
    model_pick = np.nanargmax(np.where(valid, pred, np.nan), 1)  # (X,)
    out = {
        "contexts": int(true.shape[0]),
        "effect_corr": float(np.corrcoef(tc[valid], pc[valid])[0, 1]),
        "effect_std_true": float(np.nanstd(tc)),
        "effect_std_pred": float(np.nanstd(np.where(valid, pc, np.nan))),
        "level_corr": float(np.corrcoef(np.nanmean(true, 1), np.nanmean(np.where(valid, pred, np.nan), 1))[0, 1]),
        "best_action_agreement": float((np.nanargmax(true, 1) == model_pick).mean()),
        "regret_model_pick": float((best - true[rows, model_pick]).mean()),
        "regret_uniform_pick": float((best - np.nanmean(true, 1)).mean()),
    }
    if choice is not None:
        out["regret_actor_pick"] = float((best - true[rows, choice]).mean())
    return out


def happened(valid: np.ndarray | None, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The steps that happened of each (E·N, T, ...) array: all of them, as they are, when every
    step did (fixed-length episodes: the very reductions of before), else flattened to (M, ...)."""
    if valid is None or valid.all():
        return arrays
    return tuple(x[valid] for x in arrays)


def reward_fit(pred_rew: np.ndarray, rew: np.ndarray, n_agents: int, valid: np.ndarray | None = None) -> dict:
    """pred_rew, rew (E·N, T) predicted and real rewards, row e·N + i agent i's of episode e;
    valid (E·N, T) the steps that happened (None: all) → R² pooled over agents (``teacher_forced``'s
    ``reward_r2``) and per agent."""
    v = np.ones(rew.shape, bool) if valid is None else valid
    return {"reward_r2": float(r2_score(*happened(valid, pred_rew, rew))),
            "reward_r2_per_agent": [float(r2_score(*happened(v[i::n_agents], pred_rew[i::n_agents], rew[i::n_agents])))
                                    for i in range(n_agents)]}


def agent_rows(data: dict[str, np.ndarray], key: str) -> np.ndarray:
    """``data[key]`` (E, T, N, ...) or the step mask (E, T) → (E·N, T, ...), row e·N + i agent i's."""
    x = data[key]
    if x.ndim == 2:  # (E, T): the same for every agent
        n = data["act"].shape[2]
        return np.repeat(x, n, axis=0)  # (E·N, T)
    return np.moveaxis(x, 2, 1).reshape(x.shape[0] * x.shape[2], x.shape[1], *x.shape[3:])


# ----------------------------------------------------------------------------- model
def _device(wm) -> torch.device:
    return wm.bins.device


@torch.no_grad()
def teacher_forced_pass(wm, data: dict[str, np.ndarray]
                        ) -> tuple[np.ndarray | None, np.ndarray, Tensor, np.ndarray]:
    """A teacher-forced pass over episodes → reconstruction (E·N, T, O) in observation space (None
    for frames), predicted reward (E·N, T), posterior probabilities (E·N, T, K, C), predicted
    continuation c_t ∈ {0, 1} (E·N, T); row e·N + i is agent i of episode e.  Steps past an
    episode's end (``data["valid"]``) are computed on its padding and mean nothing: causal
    attention keeps them out of the steps before.

    Episodes are cut into windows of the training sequence length, each starting a segment, which
    is how the world model sees them in training (and keeps them within its positional range).
    """
    dev = _device(wm)
    obs = torch.as_tensor(agent_rows(data, "obs"))  # (E·N, T, O) or (E·N, T, C, H, W) uint8, on the host
    if not wm.image:
        obs = obs.float()
    act = torch.as_tensor(agent_rows(data, "act")).long().to(dev)  # (E·N, T)
    e, t, n = data["act"].shape
    agent = torch.arange(n, device=dev).repeat(e)  # (E·N,)
    window = min(wm.cfg.seq_len, t)
    recon, pred_rew, probs, cont = [], [], [], []
    for start in range(0, t, window):
        sl = slice(start, start + window)
        first = torch.zeros(act[:, sl].shape, dtype=torch.bool, device=dev)  # (E·N, W)
        first[:, 0] = True
        out = wm.observe(obs[:, sl].to(dev), act[:, sl], first, agent)
        if not wm.image:
            # the posterior's most likely latent, so the score is the latent's content, not its noise
            z_mode = torch.nn.functional.one_hot(out.post_probs.argmax(-1), wm.C).float().flatten(-2)  # (E·N, W, K·C)
            dec = wm.decoder(z_mode)  # (E·N, W, O): in symlog space when the model reconstructs symlog(obs)
            recon.append(symexp(dec) if wm.cfg.recon_symlog else dec)
        pred_rew.append(twohot_decode(out.reward_logits, wm.bins))  # (E·N, W)
        probs.append(out.post_probs)  # (E·N, W, K, C)
        cont.append(out.cont_logits > 0)  # (E·N, W): the Bernoulli mode, as imagination reads it
    rec = torch.cat(recon, 1).cpu().numpy() if recon else None
    return rec, torch.cat(pred_rew, 1).cpu().numpy(), torch.cat(probs, 1).cpu(), torch.cat(cont, 1).cpu().numpy()


def teacher_forced(wm, data: dict[str, np.ndarray]) -> dict:
    """Reconstruction R² per real feature (vectors; None for frames) and reward R² of a
    teacher-forced pass over episodes (:func:`teacher_forced_pass`), on the steps that happened."""
    recon, pred_rew, probs, cont = teacher_forced_pass(wm, data)
    valid = agent_rows(data, "valid")  # (E·N, T)
    rew = agent_rows(data, "rew")  # (E·N, T)
    p, r = happened(valid, pred_rew, rew)  # (E·N, T) each, or (M,)
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (E·N, T, K) nats per variable
    entropy = ent.mean() if valid.all() else ent[torch.as_tensor(valid)].mean()
    out = {"recon_r2_per_feature": None, "recon_r2_mean": None}
    if recon is not None:
        o = recon.shape[-1]
        rec, obs = happened(valid, recon, agent_rows(data, "obs").astype(np.float32))  # (…, O) each
        feats = r2_score(rec.reshape(-1, o), obs.reshape(-1, o), axis=0)  # (O,)
        # features some agent really has (not padding) and that vary (not a silent comm slot)
        real = wm.obs_mask.any(0).cpu().numpy() & np.isfinite(feats)  # (O,)
        out = {"recon_r2_per_feature": [float(x) if m else None for x, m in zip(feats, real)],
               "recon_r2_mean": float(feats[real].mean())}
    ended = np.repeat(data["ended"], data["act"].shape[2])  # (E·N,) rows whose episode ended early
    if ended.any():  # its last step: the one that ended it (a missed ball), and the steps before it
        last = valid.sum(1) - 1  # (E·N,)
        rows = np.flatnonzero(ended)
        before = valid.copy()
        before[rows, last[rows]] = False
        out["end"] = {"steps": int(len(rows)), "reward_true": float(rew[rows, last[rows]].mean()),
                      "reward_pred": float(pred_rew[rows, last[rows]].mean()),
                      "predicted_end": float((~cont[rows, last[rows]]).mean()),  # c_t = 0 where it ended
                      "reward_pred_elsewhere": float(pred_rew[before].mean()),
                      "predicted_end_elsewhere": float((~cont[before]).mean())}  # false alarms
    return {
        **out,
        "reward_r2": float(r2_score(p, r)),  # NaN if the scenario's reward never varied
        "reward_corr": float(np.corrcoef(p.ravel(), r.ravel())[0, 1]),
        "reward_bias": float((p - r).mean()),
        "reward_std": float(r.std()),
        "posterior_entropy": float(entropy),
        "posterior_entropy_max": float(np.log(wm.C)),
    }


@torch.no_grad()
def imagine_held_actions(wm, obs: Tensor, act: Tensor, agent: Tensor, held: Tensor, horizon: int,
                         u_ctx: Tensor, u_latent: Tensor) -> tuple[Tensor, Tensor]:
    """Open-loop imagination of R rows: context obs (R, L, *obs), act (R, L) of agents ``agent``
    (R,) (each context one segment from position 0), then ``held`` (R,) taken for ``horizon``
    steps → predicted rewards and continuations c_t ∈ {0, 1}, (R, H) each (imagination's
    :func:`~matwm_fast.imagination.outcomes`).

    Imagination's own steps with the actor replaced by the held action (and the teammate
    predictor, which no reward reads, left out): one causal pass over the context fills the
    key/value cache and gives h_0, z_0 is drawn from the prior on it; token t is (z_t, a_t), the
    reward of a_t is read from h_{t+1} and z_{t+1} is drawn from the prior on h_{t+1}, as in
    Algorithm 1.  The latent draws are given — u_ctx (R, L, K) of the context's posterior,
    u_latent (R, H, K) of z_0 … z_{H-1} — so a row is the same function of its draws whatever
    else is in the batch (tested against :func:`~matwm_fast.imagination.imagine` with an actor
    that always picks the held action).
    """
    r, ctx = act.shape
    dev = act.device
    first = torch.zeros(r, ctx, dtype=torch.bool, device=dev)  # (R, L)
    first[:, 0] = True
    mask, pos = segment_mask(first)  # (R, L, L), (R, L)
    cache = wm.seq.allocate_cache(r, ctx + horizon, dev, wm.param_dtype)
    z_ctx, _ = wm.posterior(obs, u_ctx)  # (R, L, K·C)
    h = wm.seq(wm.mix(z_ctx, agent, act), pos, mask, cache)[:, -1]  # (R, D) h_0
    z, _ = wm.prior(h, u_latent[:, 0])  # (R, K·C) z_0
    kv_start = torch.zeros(r, dtype=torch.long, device=dev)  # (R,) every context starts at slot 0
    hs = []
    for t in range(horizon):
        x = wm.mix(z, agent, held) + wm.seq.pos.weight[ctx + t]  # (R, D) token (z_t, a_t) at position L + t
        h = wm.seq.decode_embedded(x, cache, ctx + t, kv_start, torch.tensor(ctx + t + 1, device=dev),
                                   ctx + t + 1)  # (R, D) h_{t+1}
        hs.append(h)
        if t + 1 < horizon:
            z, _ = wm.prior(h, u_latent[:, t + 1])  # (R, K·C) z_{t+1}
    return outcomes(wm, torch.stack(hs, 1))  # (R, H) each


@torch.no_grad()
def imagined_held_returns(wm, ac, ctx: HeldActionContexts, samples: int,
                          should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The world model's returns of holding each action from each branch point, mean over
    ``samples`` latent draws → pred (C·N, A) (NaN: not the agent's action), and the actor's greedy
    action at each branch point, choice (C·N,).  None when ``should_stop`` says so.

    Draws from torch's generator, per branch point: the acting pass, then for every (agent, action)
    the context's posterior (S·L × K uniforms) and the H prior draws (S × K each) — the order in
    which a per-action rollout draws them, so the same seed gives the same returns.
    """
    dev = _device(wm)
    spec, big_l, h = ctx.spec, ctx.context, ctx.horizon
    n, c_count, k = spec.n_agents, ctx.obs.shape[0], wm.K
    pred = np.full(ctx.true.shape, np.nan)  # (X, A)
    choice = np.zeros(c_count * n, dtype=np.int64)  # (X,)
    count = torch.tensor(big_l, device=dev)  # () the whole context is this episode's
    cells, u_ctx, u_lat = [], [], []  # (context, agent, action) of each block of S imagined rows, and its draws
    for c in range(c_count):
        if should_stop is not None and should_stop():
            return None
        past_obs, past_act = ctx.past_obs[c].to(dev), ctx.past_act[c].to(dev)  # (N, L, O), (N, L)
        choice[c * n:(c + 1) * n] = policy_step(wm, ac, past_obs, past_act, count, ctx.obs[c].to(dev),
                                                greedy=True).cpu().numpy()
        for i in range(n):
            for a in range(spec.action_counts[i]):
                cells.append((c, i, a))
                u_ctx.append(torch.rand(samples * big_l, k, device=dev).view(samples, big_l, k))
                u_lat.append(torch.stack([torch.rand(samples, k, device=dev) for _ in range(h)], 1))  # (S, H, K)
    per_pass = max(1, ROWS_PER_PASS // samples)
    for start in range(0, len(cells), per_pass):
        if should_stop is not None and should_stop():
            return None
        block = cells[start:start + per_pass]
        cs = torch.tensor([c for c, _, _ in block], device=dev).repeat_interleave(samples)  # (R,)
        agent = torch.tensor([i for _, i, _ in block], device=dev).repeat_interleave(samples)  # (R,)
        held = torch.tensor([a for _, _, a in block], device=dev).repeat_interleave(samples)  # (R,)
        obs = ctx.past_obs.to(dev)[cs, agent]  # (R, L, *obs)
        if not wm.image:  # frames stay uint8: the encoder scales them
            obs = obs.to(wm.param_dtype)
        act = ctx.past_act.to(dev)[cs, agent]  # (R, L)
        rew, cont = imagine_held_actions(wm, obs, act, agent, held, h, torch.cat(u_ctx[start:start + per_pass]),
                                         torch.cat(u_lat[start:start + per_pass]))  # (R, H) each
        # r_t counts while every step before it continued (Π_{s<t} c_s), as the env's branch stops at done
        alive = torch.cat([torch.ones_like(cont[:, :1]), cont[:, :-1].cumprod(1)], 1)  # (R, H)
        means = (rew * alive).sum(1).view(len(block), samples).mean(1).cpu().numpy()  # (cells,)
        for (c, i, a), m in zip(block, means):
            pred[c * n + i, a] = m
    return pred, choice


def action_effects(wm, ac, env_cfg: EnvConfig, contexts: int, context_len: int, horizon: int, samples: int,
                   seed: int, near_end: bool = False) -> dict:
    """True vs imagined returns of holding each action, per context and agent (module doc;
    ``near_end``: branch points shortly before a random episode's end, :mod:`~matwm_fast.probe_episodes`):
    {"true": (X, A), "pred": (X, A), "choice": (X,), "to_end": (C,)}."""
    if not near_end and context_len + horizon > env_cfg.max_cycles:
        raise ValueError(f"context {context_len} + horizon {horizon} exceeds the episode length {env_cfg.max_cycles}")
    if context_len + horizon > wm.cfg.max_len:
        raise ValueError(f"context {context_len} + horizon {horizon} exceeds the transformer's max_len {wm.cfg.max_len}")
    ctx = held_action_contexts(env_cfg, contexts, context_len, horizon, seed, near_end=near_end)
    pred, choice = imagined_held_returns(wm, ac, ctx, samples)
    return {"true": ctx.true, "pred": pred, "choice": choice, "to_end": ctx.to_end}


# ----------------------------------------------------------------------------- the training-time probe
class HeldOutProbe:
    """The world model's reward fit and action effects on held-out random-policy episodes, for
    a training-time evaluation: what ``diagnose model --seed`` :data:`HELD_OUT_SEED` reports on
    the same model (sizes :data:`EPISODES`, :data:`CONTEXTS`, :data:`SAMPLES`; the context is the
    imagination's ``ac.context_len``, the horizon its ``ac.horizon``).

    The episodes and the branched env's true returns are made at the first call and kept.  Every
    call draws from its own generator state (torch's, forked and seeded with the probe's seed), so
    the caller's random streams are untouched — training runs the same with or without it — and a
    model scores the same whenever it is probed (a resumed run's rows equal the uninterrupted ones).
    """

    def __init__(self, env_cfg: EnvConfig, context_len: int, horizon: int, seed: int = HELD_OUT_SEED,
                 episodes: int = EPISODES, contexts: int = CONTEXTS, samples: int = SAMPLES):
        # a context and horizon the episode cannot hold (a short --max-cycles) shorten the horizon
        self.horizon = min(horizon, env_cfg.max_cycles - context_len)
        self.env_cfg, self.context_len, self.seed = env_cfg, context_len, seed
        self.episodes, self.contexts, self.samples = episodes, contexts, samples
        self.spec = env_spec(env_cfg)
        self._data: tuple[dict, HeldActionContexts | None] | None = None

    def _held_out(self, should_stop: Callable[[], bool] | None) -> tuple[dict, HeldActionContexts | None] | None:
        if self._data is None:
            data = random_episodes(self.env_cfg, self.episodes, self.seed)
            ctx = None
            if self.horizon >= 1:  # near the end where random play ends episodes early (module doc)
                ctx = held_action_contexts(self.env_cfg, self.contexts, self.context_len, self.horizon,
                                           self.seed + 10_000, should_stop, near_end=bool(data["ended"].any()))
                if ctx is None:
                    return None
            self._data = (data, ctx)
        return self._data

    @torch.no_grad()
    def __call__(self, wm, ac, should_stop: Callable[[], bool] | None = None) -> dict | None:
        """→ the flat ``wm_*`` scores (``<agent>_wm_reward_r2`` per agent), or None when
        ``should_stop`` (asked between the pieces of work) cut it short."""
        held = self._held_out(should_stop)
        if held is None or (should_stop is not None and should_stop()):
            return None
        data, ctx = held
        dev = _device(wm)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                np.errstate(invalid="ignore", divide="ignore"):  # a constant prediction has no correlation: NaN
            torch.manual_seed(self.seed)
            _, pred_rew, _, _ = teacher_forced_pass(wm, data)  # (E·N, T)
            fit = reward_fit(pred_rew, agent_rows(data, "rew"), data["rew"].shape[2], agent_rows(data, "valid"))
            out = {"wm_reward_r2": fit["reward_r2"]}
            out.update({f"{name}_wm_reward_r2": r2 for name, r2 in zip(self.spec.agents, fit["reward_r2_per_agent"])})
            corr = float("nan")
            if ctx is not None:
                imagined = imagined_held_returns(wm, ac, ctx, self.samples, should_stop)
                if imagined is None:
                    return None
                corr = effect_scores(ctx.true, imagined[0], imagined[1])["effect_corr"]
            out["wm_effect_corr"] = corr
        return out
