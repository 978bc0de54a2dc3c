"""``python bench/experiments/diagnose.py`` — is the world model the bottleneck, or the data, or the actor?

Three questions a researcher asks when a policy does not improve, each a subcommand:

    python bench/experiments/diagnose.py model runs/simple_spread-cpu-s0
    python bench/experiments/diagnose.py wm-data --scenario simple_spread --steps 3000 12000
    python bench/experiments/diagnose.py wm-data --scenario simple_spread --steps 12000 --set wm.bins_low=-3 --set wm.bins_high=3
    python bench/experiments/diagnose.py wm-data --scenario simple_spread --steps 12000 --updates 12000 --eval-every 1500
    python bench/experiments/diagnose.py reward-data --scenario simple_spread --steps 3000 12000 [--inputs now]

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

On a scenario whose random episodes end early (Cooperative Pong: a missed ball) the branch points
are 1 … ``horizon`` steps before a random episode's end instead, imagined returns stop where the
continuation head ends them, and the teacher-forced report adds what the model predicts at the
step that ended each episode (``end``: the reward and the end itself, beside every other step);
``model`` takes image runs like vector ones (``wm-data`` and ``reward-data`` are for MPE2).
``model --probe N`` also reads the reward, on N more random episodes, from the model's h_t and
z_t and from the data itself (``readout.py``): whether the head, the states or the data lack it.

Both are computed by ``matwm_fast/wm_probe.py``, which a training run's evaluation also calls
(``--eval-every``): its ``eval_wm_reward_r2`` and ``eval_wm_effect_corr`` are this report's
``reward_r2`` and ``effect_corr`` with ``--seed 1000000000 --samples 8 --horizon`` the run's
``ac.horizon`` (8 at the ``cpu`` preset).

``wm-data`` trains the world model alone, offline, on ``--steps`` random-policy transitions
(uniform replay sampling, ``--updates`` steps each) and scores its reward head on held-out
episodes: the same question for the model itself, with the policy and its data drift removed.
``--set SECTION.FIELD=VALUE`` changes one config field from the preset's (the variants compared);
``--eval-every K`` scores the fit after every K updates too (whether it peaks and falls, or levels).

``reward-data`` asks whether the reward is learnable at all from this much data: an MLP regresses
the reward on the next observation (the reward of every MPE2 scenario is a function of the world
state that observation shows) on ``--steps`` random-policy transitions, and reports R² on held-out
episodes.  A reward that a supervised net cannot generalise from the data cannot be expected of
the world model's reward head either.  ``--inputs now`` regresses on the observation and one-hot
action of step t instead: exactly the information the world model's reward head has.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the package beside it
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

Tensor = torch.Tensor

from matwm_fast.checkpoint import CheckpointError
from matwm_fast.cli import Parser, fail
from matwm_fast.config import PRESETS, Config, EnvConfig, check_fields, preset, resolve, with_fields
from matwm_fast.env import SCENARIOS, MultiAgentEnv
from matwm_fast import steps as step_fns  # not `steps`: world_model_data's argument of that name
from matwm_fast.losses import symlog
from matwm_fast.replay import ReplayBuffer
from matwm_fast.probe_episodes import random_episodes
from matwm_fast.wm_probe import action_effects, effect_scores, teacher_forced
from readout import fit_mlp, model_features, state_probe
from matwm_fast.world_model import WorldModel


# ----------------------------------------------------------------------------- model
PROBE_SEEDS = 100_000
"""``model --probe``'s fitted episodes play ``reset(seed=SEED + PROBE_SEEDS + e)``: clear of the
report's episodes (SEED + e) and branch points (SEED + 10,000 + j)."""


def diagnose_model(path: str, episodes: int, contexts: int, horizon: int, samples: int, seed: int,
                   probe_episodes: int = 0) -> dict:
    from matwm_fast.policy import Policy

    pol = Policy(path, "cpu")
    cfg, wm, ac = pol.cfg, pol.wm, pol.ac
    torch.manual_seed(seed)  # the latent draws: the same report for the same seed
    data = random_episodes(cfg.env, episodes, seed)
    report = {"checkpoint": str(pol.path), "env_step": pol.step, "scenario": cfg.env.scenario,
              "episodes": episodes, "steps": int(data["valid"].sum()), "teacher_forced": teacher_forced(wm, data)}
    near_end = bool(data["ended"].any())  # branch where the actions decide an early end (wm_probe's doc)
    eff = action_effects(wm, ac, cfg.env, contexts, cfg.ac.context_len, horizon, samples, seed + 10_000, near_end)
    report["held_actions"] = {"horizon": horizon, "samples": samples, "near_end": near_end,
                              "to_end": eff["to_end"].tolist(), "true": eff["true"].tolist(),
                              "pred": eff["pred"].tolist(), **effect_scores(eff["true"], eff["pred"], eff["choice"])}
    if probe_episodes:  # last, so the numbers above are the same with or without it
        fit = random_episodes(cfg.env, probe_episodes, seed + PROBE_SEEDS)
        report["state_probe"] = {"episodes": probe_episodes, **state_probe(wm, fit, data, seed)}
    return report


# ----------------------------------------------------------------------------- data learnability
def reward_regression(env_cfg: EnvConfig, steps: list[int], test_episodes: int, updates: int, width: int,
                      lr: float, batch: int, seed: int, inputs: str = "next") -> list[dict]:
    """Held-out R² of an MLP regressing r_t on o_{t+1} (``inputs`` "next") or on o_t and a one-hot
    a_t ("now": what the world model's reward head has, its own action and no future), trained on
    each of ``steps`` transitions."""
    episodes = -(-max(steps) // env_cfg.max_cycles)
    train = random_episodes(env_cfg, episodes, seed)
    test = random_episodes(env_cfg, test_episodes, seed + 1_000_000)
    env = MultiAgentEnv(env_cfg, seed=seed)
    n_actions = env.spec.n_actions
    env.close()

    def features(d):
        if inputs == "next":
            return d["next_obs"]  # (E, T, N, O)
        act = np.eye(n_actions, dtype=np.float32)[d["act"]]  # (E, T, N, A)
        return np.concatenate([d["obs"], act], axis=-1)  # (E, T, N, O + A)

    def flat(d, upto=None):
        f = features(d)
        x = f.reshape(-1, *f.shape[2:])  # (E·T, N, F) in time order
        y = d["rew"].reshape(-1, d["rew"].shape[-1])  # (E·T, N)
        if upto is not None:
            x, y = x[:upto], y[:upto]
        return (torch.as_tensor(x.reshape(-1, x.shape[-1])).float(),  # (S·N, O)
                torch.as_tensor(y.reshape(-1)).float())  # (S·N,)

    x_test, y_test = flat(test)
    rows = []
    for s in steps:
        x, y = flat(train, s)
        fit = fit_mlp(symlog(x), y, symlog(x_test), y_test, updates or s, width, lr, batch, seed)
        rows.append({"steps": s, "episodes": -(-s // env_cfg.max_cycles), "updates": updates or s, "inputs": inputs,
                     "r2_train": fit["r2_train"], "r2_heldout": fit["r2_heldout"]})
    return rows


def world_model_data(cfg: Config, steps: list[int], updates: int, test_episodes: int, seed: int,
                     probe: bool = False, eval_every: int = 0) -> list[dict]:
    """Held-out teacher-forced fit of a world model trained offline on each of ``steps`` random-policy
    transitions for ``updates`` Adam steps (the config's batch, learning rate and loss weights).

    Replay is sampled uniformly (decay 1): the recency weighting of Algorithm 2 exists for a moving
    policy, and here it would only hide the older half of the data the question is about.  With
    ``probe``, MLPs regress the reward on the trained model's features (:func:`model_features`):
    where the information for a reward that generalises is lost, in the latent or after it.
    With ``eval_every`` K > 0 the fit is also scored after every K updates, a row each: whether the
    held-out fit peaks early and then falls as the model memorises its layouts (over-fitting, a
    matter of the replay ratio) or keeps rising (a matter of capacity or data).
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
        seen = {k: v[: min(episodes, test_episodes)] for k, v in train.items()}  # as many training episodes
        for u in range(1, updates + 1):  # the trainer's own world-model step, fp32, reference kernels
            b = rb.sample_sequences(wmc.batch_per_agent, wmc.seq_len, 1.0)
            loss, _ = step_fns.wm_loss(wm, b.obs, b.act, b.rew, b.cont, b.first, b.team_act, b.agent, None, "ref")
            opt.zero_grad()
            loss.backward()
            step_fns.wm_opt_step(wm, opt, wmc.grad_clip)
            if eval_every and u % eval_every == 0 and u < updates:
                rows.append(fit_row(wm, test, seen, episodes, t_len, u))
        row = fit_row(wm, test, seen, episodes, t_len, updates)
        if probe:  # MLPs on the frozen model's features, trained on all of this set's episodes
            mine = model_features(wm, {k: v[:episodes] for k, v in train.items()})
            held = model_features(wm, test)
            for name in ("z", "xhat", "h"):
                fit = fit_mlp(mine[name], mine["r"], held[name], held["r"], episodes * t_len, seed=seed)
                row |= {f"probe_{name}_r2_train": fit["r2_train"], f"probe_{name}_r2_heldout": fit["r2_heldout"]}
        rows.append(row)
    return rows


def fit_row(wm: WorldModel, test: dict, seen: dict, episodes: int, t_len: int, updates: int) -> dict:
    """One row of :func:`world_model_data`: the teacher-forced fit on held-out and on seen episodes.
    Torch's generator is left as it was, so scoring midway does not change the training that follows."""
    rng = torch.get_rng_state()
    fit_test, fit_train = teacher_forced(wm, test), teacher_forced(wm, seen)
    torch.set_rng_state(rng)
    return {"steps": episodes * t_len, "episodes": episodes, "updates": updates,
            "reward_r2_heldout": fit_test["reward_r2"], "reward_corr_heldout": fit_test["reward_corr"],
            "reward_r2_train": fit_train["reward_r2"], "recon_r2_heldout": fit_test["recon_r2_mean"]}


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
    m.add_argument("--probe", type=int, default=0, metavar="EPISODES",
                   help="also fit MLPs reading the reward from the model's h_t and z_t on this many more random "
                        "episodes, scored on the report's (default 0: no)")
    m.add_argument("--out", metavar="FILE.json", default=None, help="also write the report here")
    w = data_parser(sub, "wm-data", "held-out reward fit of a world model trained offline on random data")
    w.add_argument("--preset", default="cpu", help=f"world-model config: {', '.join(PRESETS)} (default cpu)")
    w.add_argument("--updates", type=int, default=6000, help="world-model updates per fit (default 6000)")
    w.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="also score the fit after every K updates, a row each (default 0: at the end only)")
    w.add_argument("--probe", action="store_true",
                   help="also fit MLPs from the trained model's latent z_t (with a_t) and from h_t to the reward")
    w.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="a config field changed from the preset's, e.g. wm.bins_low=-3 (repeatable): the "
                        "variants of the investigation")
    d = data_parser(sub, "reward-data", "held-out R² of a supervised reward regression on random data")
    d.add_argument("--updates", type=int, default=0,
                   help="Adam steps per fit (default 0: one per env step of the training set, the world model's budget)")
    d.add_argument("--width", type=int, default=256, help="MLP width (default 256)")
    d.add_argument("--inputs", choices=("next", "now"), default="next",
                   help="regress r_t on o_(t+1) (next, default) or on o_t and a_t (now: the world model's information)")
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


def parse_sets(pairs: list[str]) -> dict:
    """``["wm.bins_low=-3", ...]`` → ``{"wm.bins_low": -3}``: each a field of the config, its value
    a Python literal (ValueError naming a pair that is neither)."""
    fields = {f"{sec}.{f.name}" for sec in ("env", "wm", "ac", "replay", "train")
              for f in dataclasses.fields(getattr(Config(), sec))}
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {pair}: need SECTION.FIELD=VALUE with a field of the config "
                             "(env, wm, ac, replay, train), e.g. wm.bins_low=-3")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


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
        if args.probe < 0:
            fail(f"--probe must be ≥ 0 episodes (0 = no probe), got {args.probe}")
        try:
            report = diagnose_model(args.run, args.episodes, args.contexts, args.horizon, args.samples, args.seed,
                                    args.probe)
        except (ValueError, OSError, CheckpointError) as e:
            fail(str(e))
        tf, ha = report["teacher_forced"], report["held_actions"]
        print(f"{report['scenario']} @ env step {report['env_step']}: {args.episodes} random-policy episodes "
              f"({report['steps']} steps)")
        if tf["recon_r2_mean"] is not None:  # vectors: per feature (frames: bench/experiments/pong_ball.py)
            print(f"  reconstruction R² (mean over real features) {tf['recon_r2_mean']:.3f}; per feature: "
                  + " ".join("-" if x is None else f"{x:.2f}" for x in tf["recon_r2_per_feature"]))
        print(f"  reward R² {tf['reward_r2']:.3f} (corr {tf['reward_corr']:.3f}, bias {tf['reward_bias']:+.3f}, "
              f"reward std {tf['reward_std']:.3f}); posterior entropy {tf['posterior_entropy']:.2f} of "
              f"{tf['posterior_entropy_max']:.2f} nats per variable")
        if "end" in tf:  # episodes that ended early: the step that ended each, teacher-forced
            end = tf["end"]
            print(f"  at the {end['steps']} agent-steps that ended an episode: reward {end['reward_true']:.2f}, "
                  f"predicted {end['reward_pred']:.2f}, end predicted {end['predicted_end']:.0%}; elsewhere reward "
                  f"predicted {end['reward_pred_elsewhere']:.3f}, end predicted {end['predicted_end_elsewhere']:.1%}")
        where = " from 1 … horizon steps before a random episode's end" if ha["near_end"] else ""
        print(f"  held actions ({ha['contexts']} agent-contexts × {ha['horizon']} steps{where}): effect corr "
              f"{ha['effect_corr']:.3f} (effect std true {ha['effect_std_true']:.3f}, imagined "
              f"{ha['effect_std_pred']:.3f}); best-action agreement {ha['best_action_agreement']:.2f}")
        print(f"  regret of the model's best action {ha['regret_model_pick']:.3f}, of the actor's greedy action "
              f"{ha['regret_actor_pick']:.3f}, of a uniform pick {ha['regret_uniform_pick']:.3f}")
        if "state_probe" in report:
            sp = report["state_probe"]
            end = lambda d: f", at the ending steps {d['end_pred']:.2f}" if "end_pred" in d else ""  # noqa: E731
            print(f"  reward read from the model's states by an MLP ({sp['episodes']} more episodes, {sp['fit_steps']} "
                  f"agent-steps), held-out R²: from h_t {sp['h']['r2_heldout']:.3f}{end(sp['h'])}; from z_t, a_t "
                  f"{sp['z']['r2_heldout']:.3f}{end(sp['z'])}; the reward head {sp['head']['r2_heldout']:.3f}{end(sp['head'])}; "
                  f"from the data (o_t-1, o_t, a_t) {sp['obs']['r2_heldout']:.3f}{end(sp['obs'])}")
        result = report
    elif args.cmd == "wm-data":
        check_data_args(args)
        if args.preset not in PRESETS:
            fail(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
        if args.updates < 1:
            fail(f"--updates must be ≥ 1, got {args.updates}")
        if args.eval_every < 0:
            fail(f"--eval-every must be ≥ 0 (0 = at the end only), got {args.eval_every}")
        try:
            cfg = with_fields(preset(args.preset, args.scenario), parse_sets(args.sets))
            check_fields(cfg)
            result = world_model_data(cfg, sorted(args.steps), args.updates, args.test_episodes, args.seed,
                                      args.probe, args.eval_every)
        except ValueError as e:
            fail(str(e))
        print(f"{args.scenario}: `{args.preset}` world model{' with ' + ', '.join(args.sets) if args.sets else ''} "
              f"trained offline on random-policy data, {args.updates} updates each, {args.test_episodes} "
              f"held-out episodes")
        for r in result:
            r["set"] = list(args.sets)
        for r in result:
            print(f"  {r['steps']:>7} steps ({r['episodes']} episodes), {r['updates']} updates: reward R² held-out "
                  f"{r['reward_r2_heldout']:.3f} (corr {r['reward_corr_heldout']:.3f}), on training episodes "
                  f"{r['reward_r2_train']:.3f}; reconstruction R² held-out {r['recon_r2_heldout']:.3f}")
            if "probe_z_r2_heldout" in r:
                print(f"    MLP probes, held-out R² (training): from z_t, a_t {r['probe_z_r2_heldout']:.3f} "
                      f"({r['probe_z_r2_train']:.3f}); from decoded z_t, a_t {r['probe_xhat_r2_heldout']:.3f} "
                      f"({r['probe_xhat_r2_train']:.3f}); from h_t {r['probe_h_r2_heldout']:.3f} ({r['probe_h_r2_train']:.3f})")
    else:
        check_data_args(args)
        if args.updates < 0:
            fail(f"--updates must be ≥ 0 (0 = one per env step), got {args.updates}")
        env_cfg = replace(EnvConfig(), scenario=args.scenario)
        result = reward_regression(env_cfg, sorted(args.steps), args.test_episodes, args.updates, args.width,
                                   args.lr, args.batch, args.seed, args.inputs)
        print(f"{args.scenario}: MLP r_t ← {'o_(t+1)' if args.inputs == 'next' else 'o_t, a_t'}, random policy, batch {args.batch}, "
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
