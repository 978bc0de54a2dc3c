"""``python bench/experiments/diagnose.py`` — is the world model the bottleneck, or the data, or the actor?

Three questions a researcher asks when a policy does not improve, each a subcommand:

    python bench/experiments/diagnose.py model runs/simple_spread-cpu-s0
    python bench/experiments/diagnose.py wm-data --scenario simple_spread --steps 3000 12000
    python bench/experiments/diagnose.py reward-data --scenario simple_spread --steps 3000 12000

``model`` loads a checkpoint and measures, on fresh episodes of the uniformly random policy (so
not on the data the model was trained on):

- **teacher-forced fit**: R² of the reconstruction per observation feature (which features the
  32×32 latent keeps) and R² of the predicted reward;
- **open-loop action effects**: from the env state after ``context`` random steps, every agent
  in turn holds each of its actions for ``horizon`` steps while the others replay one fixed random
  sequence.  The env is branched exactly (``get_state``/``set_state``) to get the true returns, and
  the world model imagines the same action sequences from the same context (mean over
  ``samples`` latent draws).  What the actor learns from is the *difference* between actions, so
  the score is the correlation of the centred effects (each row minus its mean over actions),
  with the regret of acting on the model's best action and on the actor's greedy action.

``wm-data`` trains the world model alone, offline, on ``--steps`` random-policy transitions
(uniform replay sampling, ``--updates`` steps each) and scores its reward head on held-out
episodes: the same question for the model itself, with the policy and its data drift removed.

``reward-data`` asks whether the reward is learnable at all from this much data: an MLP regresses
the reward on the next observation (the reward of every MPE2 scenario is a function of the world
state that observation shows) on ``--steps`` random-policy transitions, and reports R² on held-out
episodes.  A reward that a supervised net cannot generalise from the data cannot be expected of
the world model's reward head either.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the package beside it
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn as nn

from matwm_fast.acting import ContextQueues, policy_step
from matwm_fast.checkpoint import CheckpointError
from matwm_fast.cli import Parser, fail
from matwm_fast.config import PRESETS, Config, EnvConfig, preset, resolve
from matwm_fast.env import SCENARIOS, MultiAgentEnv, random_actions
from matwm_fast.imagination import ImagNoise
from matwm_fast import steps as step_fns  # not `steps`: world_model_data's argument of that name
from matwm_fast.losses import symexp, symlog, twohot_decode
from matwm_fast.replay import ReplayBuffer
from matwm_fast.transformer import segment_mask
from matwm_fast.world_model import WorldModel

Tensor = torch.Tensor


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


# ----------------------------------------------------------------------------- data
def random_episodes(env_cfg: EnvConfig, episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Play whole episodes with uniformly random actions → obs (E, T, N, O), act (E, T, N),
    rew (E, T, N), next_obs (E, T, N, O); every episode runs to the time limit (MPE2 has no
    termination in the discrete scenarios), so all have T = max_cycles steps."""
    env = MultiAgentEnv(env_cfg, seed=seed)
    rng = np.random.default_rng(seed)
    keys = ("obs", "act", "rew", "next_obs")
    eps: dict[str, list] = {k: [] for k in keys}
    for e in range(episodes):
        obs = env.reset(seed=seed + e)
        ep: dict[str, list] = {k: [] for k in keys}
        done = False
        while not done:
            act = random_actions(rng, env.spec)  # (N,)
            nxt, rew, _, done = env.step(act)
            for k, v in zip(keys, (obs, act, rew, nxt)):
                ep[k].append(v)
            obs = nxt
        if len(ep["act"]) != env_cfg.max_cycles:
            env.close()
            raise ValueError(f"an episode of {env_cfg.scenario} ended after {len(ep['act'])} of "
                             f"{env_cfg.max_cycles} steps; diagnose needs fixed-length episodes")
        for k in keys:
            eps[k].append(np.stack(ep[k]))
    env.close()
    return {k: np.stack(v) for k, v in eps.items()}


# ----------------------------------------------------------------------------- model
@torch.no_grad()
def teacher_forced(wm, data: dict[str, np.ndarray]) -> dict:
    """Reconstruction R² per real feature and reward R² of a teacher-forced pass over episodes.

    Episodes are cut into windows of the training sequence length, each starting a segment, which
    is how the world model sees them in training (and keeps them within its positional range).
    """
    e, t, n, o = data["obs"].shape
    obs = torch.as_tensor(data["obs"]).float().permute(0, 2, 1, 3).reshape(e * n, t, o)  # (E·N, T, O)
    act = torch.as_tensor(data["act"]).long().permute(0, 2, 1).reshape(e * n, t)  # (E·N, T)
    rew = data["rew"].transpose(0, 2, 1).reshape(e * n, t)  # (E·N, T)
    agent = torch.arange(n).repeat(e)  # (E·N,)
    window = min(wm.cfg.seq_len, t)
    recon, pred_rew, probs = [], [], []
    for start in range(0, t, window):
        sl = slice(start, start + window)
        first = torch.zeros(act[:, sl].shape, dtype=torch.bool)  # (E·N, W)
        first[:, 0] = True
        out = wm.observe(obs[:, sl], act[:, sl], first, agent)
        # the posterior's most likely latent, so the score is the latent's content, not its noise
        z_mode = torch.nn.functional.one_hot(out.post_probs.argmax(-1), wm.C).float().flatten(-2)  # (E·N, W, K·C)
        dec = wm.decoder(z_mode)  # (E·N, W, O): in symlog space when the model reconstructs symlog(obs)
        recon.append(symexp(dec) if wm.cfg.recon_symlog else dec)
        pred_rew.append(twohot_decode(out.reward_logits, wm.bins))  # (E·N, W)
        probs.append(out.post_probs)  # (E·N, W, K, C)
    recon = torch.cat(recon, 1).numpy()  # (E·N, T, O)
    pred_rew = torch.cat(pred_rew, 1).numpy()  # (E·N, T)
    probs = torch.cat(probs, 1)  # (E·N, T, K, C)
    feats = r2_score(recon.reshape(-1, o), obs.numpy().reshape(-1, o), axis=0)  # (O,)
    # features some agent really has (not padding) and that vary (not a silent comm slot)
    real = wm.obs_mask.any(0).numpy() & np.isfinite(feats)  # (O,)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()  # nats per latent variable
    return {
        "recon_r2_per_feature": [float(x) if m else None for x, m in zip(feats, real)],
        "recon_r2_mean": float(feats[real].mean()),
        "reward_r2": float(r2_score(pred_rew, rew)),  # NaN if the scenario's reward never varied
        "reward_corr": float(np.corrcoef(pred_rew.ravel(), rew.ravel())[0, 1]),
        "reward_bias": float((pred_rew - rew).mean()),
        "reward_std": float(rew.std()),
        "posterior_entropy": float(entropy),
        "posterior_entropy_max": float(np.log(wm.C)),
    }


@torch.no_grad()
def imagine_held_action(wm, obs: Tensor, act: Tensor, agent: int, action: int, horizon: int, samples: int,
                        noise: ImagNoise | None = None) -> Tensor:
    """Open-loop imagination: context obs (L, O), act (L,) of one agent, then ``action`` held for
    ``horizon`` steps → predicted rewards (samples, H).

    A full causal pass per step (no KV cache): slow but plainly the model's own definition, which
    is what a diagnostic should rest on.  Token t is (z_t, a_t); the reward of a_t is read from
    h_t and z_{t+1} is drawn from the prior on h_t, as in imagination (Algorithm 1).  ``noise``
    (``samples`` rows) fixes the latent draws, so this can be checked against :func:`imagine`.
    """
    ctx = obs.shape[0]
    ag = torch.full((samples,), agent, dtype=torch.long)  # (M,)
    z, _ = wm.posterior(obs[None].expand(samples, -1, -1), None if noise is None else noise.ctx)  # (M, L, K·C)
    acts = act[None].expand(samples, -1)  # (M, L)
    rewards = []
    for t in range(horizon + 1):
        first = torch.zeros(samples, ctx + t, dtype=torch.bool)  # (M, L+t)
        first[:, 0] = True
        mask, pos = segment_mask(first)
        h = wm.seq(wm.mix(z, ag, acts), pos, mask)[:, -1]  # (M, D)
        if t > 0:  # h now holds the last token's (z, held action): its reward
            rewards.append(twohot_decode(wm.heads(h)[0], wm.bins))
        if t == horizon:
            break
        z_next, _ = wm.prior(h, None if noise is None else noise.latent[:, t])  # (M, K·C)
        z = torch.cat([z, z_next[:, None]], 1)  # (M, L+t+1, K·C)
        acts = torch.cat([acts, torch.full((samples, 1), action, dtype=torch.long)], 1)  # (M, L+t+1)
    return torch.stack(rewards, 1)  # (M, H)


def true_held_returns(env: MultiAgentEnv, state: bytes, agent: int, actions: list[int],
                      mates: np.ndarray) -> np.ndarray:
    """Branch the env at ``state`` once per action: ``agent`` holds it while the others replay
    ``mates`` (H, N); → the agent's summed reward over the H steps, one per action."""
    out = []
    for a in actions:
        env.set_state(state)
        total = 0.0
        for step in mates:
            joint = step.copy()
            joint[agent] = a
            _, rew, _, done = env.step(joint)
            total += float(rew[agent])
            if done:
                break
        out.append(total)
    return np.array(out)


@torch.no_grad()
def action_effects(wm, ac, env_cfg: EnvConfig, contexts: int, context_len: int, horizon: int, samples: int,
                   seed: int) -> dict:
    """True vs imagined returns of holding each action, per context and agent (see module doc)."""
    if context_len + horizon > env_cfg.max_cycles:
        raise ValueError(f"context {context_len} + horizon {horizon} exceeds the episode length {env_cfg.max_cycles}")
    if context_len + horizon > wm.cfg.max_len:
        raise ValueError(f"context {context_len} + horizon {horizon} exceeds the transformer's max_len {wm.cfg.max_len}")
    env = MultiAgentEnv(env_cfg, seed=seed)
    spec = env.spec
    rng = np.random.default_rng(seed)
    n, a_max = spec.n_agents, spec.n_actions
    true = np.full((contexts * n, a_max), np.nan)  # (X, A)
    pred = np.full((contexts * n, a_max), np.nan)  # (X, A)
    choice = np.zeros(contexts * n, dtype=np.int64)  # (X,)
    queues = ContextQueues(n, spec.obs_dim, context_len, "cpu")
    for c in range(contexts):
        obs = env.reset(seed=seed + c)
        queues.reset()
        for _ in range(context_len):
            act = random_actions(rng, spec)
            queues.push(torch.as_tensor(obs), torch.as_tensor(act))
            obs, _, _, _ = env.step(act)
        state = env.get_state()
        mates = np.stack([random_actions(rng, spec) for _ in range(horizon)])  # (H, N)
        past_obs, past_act = queues.view()  # (N, L, O), (N, L)
        picks = policy_step(wm, ac, queues.obs, queues.act, queues.count_t, torch.as_tensor(obs), greedy=True).numpy()  # (N,)
        for i in range(n):
            row = c * n + i
            valid = list(range(spec.action_counts[i]))  # this agent's real actions
            true[row, valid] = true_held_returns(env, state, i, valid, mates)
            for a in valid:
                pred[row, a] = imagine_held_action(wm, past_obs[i].float(), past_act[i], i, a, horizon,
                                                   samples).sum(1).mean()
            choice[row] = picks[i]
    env.close()
    return {"true": true, "pred": pred, "choice": choice}


def diagnose_model(path: str, episodes: int, contexts: int, horizon: int, samples: int, seed: int) -> dict:
    from matwm_fast.policy import Policy

    pol = Policy(path, "cpu")
    cfg, wm, ac = pol.cfg, pol.wm, pol.ac
    torch.manual_seed(seed)  # the latent draws: the same report for the same seed
    data = random_episodes(cfg.env, episodes, seed)
    report = {"checkpoint": str(pol.path), "env_step": pol.step, "scenario": cfg.env.scenario,
              "episodes": episodes, "teacher_forced": teacher_forced(wm, data)}
    eff = action_effects(wm, ac, cfg.env, contexts, cfg.ac.context_len, horizon, samples, seed + 10_000)
    report["held_actions"] = {"horizon": horizon, "samples": samples,
                              **effect_scores(eff["true"], eff["pred"], eff["choice"])}
    return report


# ----------------------------------------------------------------------------- data learnability
def reward_regression(env_cfg: EnvConfig, steps: list[int], test_episodes: int, updates: int, width: int,
                      lr: float, batch: int, seed: int) -> list[dict]:
    """Held-out R² of an MLP regressing r_t on o_{t+1}, trained on each of ``steps`` transitions."""
    episodes = -(-max(steps) // env_cfg.max_cycles)
    train = random_episodes(env_cfg, episodes, seed)
    test = random_episodes(env_cfg, test_episodes, seed + 1_000_000)

    def flat(d, upto=None):
        x = d["next_obs"].reshape(-1, *d["next_obs"].shape[2:])  # (E·T, N, O) in time order
        y = d["rew"].reshape(-1, d["rew"].shape[-1])  # (E·T, N)
        if upto is not None:
            x, y = x[:upto], y[:upto]
        return (torch.as_tensor(x.reshape(-1, x.shape[-1])).float(),  # (S·N, O)
                torch.as_tensor(y.reshape(-1)).float())  # (S·N,)

    x_test, y_test = flat(test)
    rows = []
    for s in steps:
        x, y = flat(train, s)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(x.shape[1], width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                            nn.Linear(width, 1))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for _ in range(updates or s):
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            loss = (net(symlog(x[idx])).squeeze(-1) - y[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            r2_test = r2_score(net(symlog(x_test)).squeeze(-1).numpy(), y_test.numpy())
            r2_train = r2_score(net(symlog(x)).squeeze(-1).numpy(), y.numpy())
        rows.append({"steps": s, "episodes": -(-s // env_cfg.max_cycles), "updates": updates or s,
                     "r2_train": float(r2_train),
                     "r2_heldout": float(r2_test)})
    return rows


def world_model_data(cfg: Config, steps: list[int], updates: int, test_episodes: int, seed: int) -> list[dict]:
    """Held-out teacher-forced fit of a world model trained offline on each of ``steps`` random-policy
    transitions for ``updates`` Adam steps (the config's batch, learning rate and loss weights).

    Replay is sampled uniformly (decay 1): the recency weighting of Algorithm 2 exists for a moving
    policy, and here it would only hide the older half of the data the question is about.
    """
    t_len = cfg.env.max_cycles
    train = random_episodes(cfg.env, -(-max(steps) // t_len), seed)
    test = random_episodes(cfg.env, test_episodes, seed + 1_000_000)
    _, _, n, o = train["obs"].shape
    env = MultiAgentEnv(cfg.env, seed=seed)  # only for the spec the world model is sized by
    spec = env.spec
    env.close()
    cfg = resolve(cfg, n)
    wmc = cfg.wm
    rows = []
    for s in steps:
        episodes = -(-s // t_len)
        torch.manual_seed(seed)
        wm = WorldModel(wmc, spec)
        opt = torch.optim.Adam(wm.parameters(), lr=wmc.lr, eps=wmc.adam_eps)
        rb = ReplayBuffer(n, o, episodes * t_len, "cpu", seed=seed)
        ones = np.ones(n, np.float32)  # (N,) no terminations in fixed-length episodes
        for e in range(episodes):
            for t in range(t_len):
                rb.add(train["obs"][e, t], train["act"][e, t], train["rew"][e, t], ones, t == 0)
        for _ in range(updates):  # the trainer's own world-model step, fp32, reference kernels
            b = rb.sample_sequences(wmc.batch_per_agent, wmc.seq_len, 1.0)
            loss, _ = step_fns.wm_loss(wm, b.obs, b.act, b.rew, b.cont, b.first, b.team_act, b.agent, None, "ref")
            opt.zero_grad()
            loss.backward()
            step_fns.wm_opt_step(wm, opt, wmc.grad_clip)
        seen = {k: v[: min(episodes, test_episodes)] for k, v in train.items()}  # as many training episodes
        fit_test, fit_train = teacher_forced(wm, test), teacher_forced(wm, seen)
        rows.append({"steps": episodes * t_len, "episodes": episodes, "updates": updates,
                     "reward_r2_heldout": fit_test["reward_r2"], "reward_corr_heldout": fit_test["reward_corr"],
                     "reward_r2_train": fit_train["reward_r2"], "recon_r2_heldout": fit_test["recon_r2_mean"]})
    return rows


# ----------------------------------------------------------------------------- CLI
def build_parser() -> Parser:
    p = Parser(prog="python bench/experiments/diagnose.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
               usage="%(prog)s {model,wm-data,reward-data} ...   (see --help)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    m = sub.add_parser("model", help="world-model fit and open-loop action effects of a checkpoint",
                       allow_abbrev=False, usage="%(prog)s RUN_DIR [options]")
    m.add_argument("run", metavar="RUN_DIR", help="a training run directory, or one of its checkpoint files")
    m.add_argument("--episodes", type=int, default=40, help="random-policy episodes for the teacher-forced fit (default 40)")
    m.add_argument("--contexts", type=int, default=20, help="branch points for the held-action test (default 20)")
    m.add_argument("--horizon", type=int, default=8, help="steps each action is held (default 8)")
    m.add_argument("--samples", type=int, default=16, help="latent draws averaged per imagined return (default 16)")
    m.add_argument("--seed", type=int, default=0, help="seed of the diagnostic episodes (default 0)")
    m.add_argument("--out", metavar="FILE.json", default=None, help="also write the report here")
    w = data_parser(sub, "wm-data", "held-out reward fit of a world model trained offline on random data")
    w.add_argument("--preset", default="cpu", help=f"world-model config: {', '.join(PRESETS)} (default cpu)")
    w.add_argument("--updates", type=int, default=6000, help="world-model updates per fit (default 6000)")
    d = data_parser(sub, "reward-data", "held-out R² of a supervised reward regression on random data")
    d.add_argument("--updates", type=int, default=0,
                   help="Adam steps per fit (default 0: one per env step of the training set, the world model's budget)")
    d.add_argument("--width", type=int, default=256, help="MLP width (default 256)")
    d.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    d.add_argument("--batch", type=int, default=384,
                   help="batch size (default 384: the cpu preset's world-model batch when this was measured, "
                        "12 × 32 steps)")
    return p


def data_parser(sub, name: str, help: str) -> Parser:
    """A subcommand over random-policy data sets: the arguments ``wm-data`` and ``reward-data`` share."""
    p = sub.add_parser(name, help=help, allow_abbrev=False, usage="%(prog)s --scenario NAME --steps N [N ...] [options]")
    p.add_argument("--scenario", required=True, help=f"MPE2 scenario: {', '.join(SCENARIOS)}")
    p.add_argument("--steps", type=int, nargs="+", required=True,
                   help="training-set sizes in env steps (wm-data rounds them up to whole episodes)")
    p.add_argument("--test-episodes", type=int, default=40, help="held-out episodes (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the fitted model (default 0)")
    p.add_argument("--out", metavar="FILE.json", default=None, help="also write the rows here")
    return p


def check_data_args(args) -> None:
    """Refuse bad values of the shared data-set arguments, naming what is allowed."""
    if args.scenario not in SCENARIOS:
        fail(f"unknown scenario {args.scenario!r}; valid: {', '.join(SCENARIOS)}")
    if min(args.steps) < 1:
        fail(f"--steps must be ≥ 1, got {min(args.steps)}")
    if args.test_episodes < 1:
        fail(f"--test-episodes must be ≥ 1, got {args.test_episodes}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "model":
        for name in ("episodes", "contexts", "horizon", "samples"):
            if getattr(args, name) < 1:
                fail(f"--{name} must be ≥ 1, got {getattr(args, name)}")
        try:
            report = diagnose_model(args.run, args.episodes, args.contexts, args.horizon, args.samples, args.seed)
        except (ValueError, OSError, CheckpointError) as e:
            fail(str(e))
        tf, ha = report["teacher_forced"], report["held_actions"]
        print(f"{report['scenario']} @ env step {report['env_step']}: {args.episodes} random-policy episodes")
        print(f"  reconstruction R² (mean over real features) {tf['recon_r2_mean']:.3f}; per feature: "
              + " ".join("-" if x is None else f"{x:.2f}" for x in tf["recon_r2_per_feature"]))
        print(f"  reward R² {tf['reward_r2']:.3f} (corr {tf['reward_corr']:.3f}, bias {tf['reward_bias']:+.3f}, "
              f"reward std {tf['reward_std']:.3f}); posterior entropy {tf['posterior_entropy']:.2f} of "
              f"{tf['posterior_entropy_max']:.2f} nats per variable")
        print(f"  held actions ({ha['contexts']} agent-contexts × {ha['horizon']} steps): effect corr "
              f"{ha['effect_corr']:.3f} (effect std true {ha['effect_std_true']:.3f}, imagined "
              f"{ha['effect_std_pred']:.3f}); best-action agreement {ha['best_action_agreement']:.2f}")
        print(f"  regret of the model's best action {ha['regret_model_pick']:.3f}, of the actor's greedy action "
              f"{ha['regret_actor_pick']:.3f}, of a uniform pick {ha['regret_uniform_pick']:.3f}")
        result = report
    elif args.cmd == "wm-data":
        check_data_args(args)
        if args.preset not in PRESETS:
            fail(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
        if args.updates < 1:
            fail(f"--updates must be ≥ 1, got {args.updates}")
        cfg = preset(args.preset, args.scenario)
        try:
            result = world_model_data(cfg, sorted(args.steps), args.updates, args.test_episodes, args.seed)
        except ValueError as e:
            fail(str(e))
        print(f"{args.scenario}: `{args.preset}` world model trained offline on random-policy data, "
              f"{args.updates} updates each, {args.test_episodes} held-out episodes")
        for r in result:
            print(f"  {r['steps']:>7} steps ({r['episodes']} episodes): reward R² held-out "
                  f"{r['reward_r2_heldout']:.3f} (corr {r['reward_corr_heldout']:.3f}), on training episodes "
                  f"{r['reward_r2_train']:.3f}; reconstruction R² held-out {r['recon_r2_heldout']:.3f}")
    else:
        check_data_args(args)
        if args.updates < 0:
            fail(f"--updates must be ≥ 0 (0 = one per env step), got {args.updates}")
        env_cfg = replace(EnvConfig(), scenario=args.scenario)
        result = reward_regression(env_cfg, sorted(args.steps), args.test_episodes, args.updates, args.width,
                                   args.lr, args.batch, args.seed)
        print(f"{args.scenario}: MLP r_t ← o_(t+1), random policy, batch {args.batch}, "
              f"{args.test_episodes} held-out episodes")
        for r in result:
            print(f"  {r['steps']:>7} steps ({r['episodes']} episodes, {r['updates']} updates): held-out R² "
                  f"{r['r2_heldout']:.3f}, train R² {r['r2_train']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
