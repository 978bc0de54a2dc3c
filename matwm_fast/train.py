"""``python -m matwm_fast.train`` — train MATWM on an MPE2 scenario.

    python -m matwm_fast.train --preset cpu --scenario simple_tag --steps 3000
    python -m matwm_fast.train --resume runs/simple_tag-cpu-s0

Prints the resolved config and device, shows progress (env steps/s, imagined steps/s), writes
``metrics.jsonl``/``metrics.csv`` every ``--log-every`` steps and checkpoints atomically every
``--checkpoint-every`` steps, at the end, and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kernels

from . import checkpoint as ck
from .cli import Parser, add_config_flags, config_from_args, describe, fail, overrides, apply_overrides
from .config import Config
from .evaluate import evaluate
from .metrics import MetricAccumulator, MetricsWriter, Progress
from .trainer import Trainer, resolve_device

# settings that may change when a run resumes: they do not alter what has been learned
RESUMABLE = {"train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
             "train.eval_every", "train.eval_episodes", "train.device", "train.backend", "train.kernels",
             "train.amp"}


def build_parser() -> Parser:
    p = Parser(prog="python -m matwm_fast.train", description=__doc__.split("\n\n")[0],
               formatter_class=lambda prog: __import__("argparse").HelpFormatter(prog, max_help_position=40),
               allow_abbrev=False)
    p.add_argument("--run-dir", default=None, help="where metrics and checkpoints go (default runs/<name>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    add_config_flags(p)
    return p


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.env.scenario}-{cfg.preset}-s{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def episode_row(tr: Trainer) -> dict:
    """Mean returns of the episodes finished since the last row (per agent, per team, all)."""
    if not tr.episodes.finished:
        return {}
    r = np.stack(tr.episodes.finished)  # (E, N)
    tr.episodes.finished.clear()
    row = {"episodes": int(r.shape[0]), "episode_return": float(r.mean())}
    for i, name in enumerate(tr.spec.agents):
        row[f"{name}_episode_return"] = float(r[:, i].mean())
    for team, idx in tr.spec.teams.items():
        row[f"team_{team}_episode_return"] = float(r[:, idx].mean())
    return row


def prepare(args) -> tuple[Config, Path, dict | None]:
    """Resolve config and run directory, from the preset and flags or from a checkpoint."""
    if args.resume is None:
        cfg = config_from_args(args)
        return cfg, Path(args.run_dir) if args.run_dir else default_run_dir(cfg), None
    run_dir = Path(args.resume)
    state = ck.load(ck.CheckpointDir(run_dir).latest())
    saved = Config.from_dict(state["config"])
    over = overrides(args)
    refused = sorted(k for k, v in over.items() if k not in RESUMABLE and v != _get(saved, k))
    if args.preset is not None or args.scenario_args:
        refused.append("--preset/--scenario-arg")
    if refused:
        raise ValueError(f"cannot change {', '.join(refused)} when resuming (the checkpoint was trained with "
                         f"them); changeable on resume: {', '.join(sorted(RESUMABLE))}")
    changed = {k: v for k, v in over.items() if v != _get(saved, k)}
    cfg = apply_overrides(saved, changed)
    for k, v in changed.items():
        print(f"resume: {k} = {v} (was {_get(saved, k)})")
    return cfg, run_dir, state


def _get(cfg: Config, key: str):
    sec, name = key.split(".", 1)
    return getattr(getattr(cfg, sec), name)


def run(tr: Trainer, run_dir: Path, state: dict | None = None) -> int:
    cfg = tr.cfg
    tc = cfg.train
    ckpts = ck.CheckpointDir(run_dir, keep=tc.keep_checkpoints)
    writer = MetricsWriter(run_dir)
    acc = MetricAccumulator()
    imagined_total = 0
    if state is not None:
        ck.load_trainer_state(tr, state)
        extra = state.get("extra", {})
        acc.sums = {k: v.to(tr.device) for k, v in extra.get("acc_sums", {}).items()}
        acc.counts = dict(extra.get("acc_counts", {}))
        imagined_total = extra.get("imagined_total", 0)
        print(f"resumed from step {tr.step}")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    stop: dict = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def save() -> Path:
        tr.check_finite()  # never write a checkpoint after a non-finite loss
        return ckpts.write(tr, {"acc_sums": {k: v.cpu() for k, v in acc.sums.items()},
                                "acc_counts": dict(acc.counts), "imagined_total": imagined_total})

    progress = Progress(tc.steps, start=tr.step)
    t_row, s_row, i_row = time.perf_counter(), tr.step, imagined_total
    try:
        while tr.step < tc.steps:
            m = tr.train_step()
            if m is not None:
                acc.add(m)
                imagined_total += tr.imagined_per_update if "imagined_steps" in m else 0
            progress.update(tr.step, imagined_total - i_row)
            if tr.step % tc.log_every == 0 or tr.step == tc.steps:
                tr.check_finite()
                now = time.perf_counter()
                row = {"env_step": tr.step, "warm": tr.warm, **acc.mean(), **episode_row(tr),
                       "imagined_steps_total": imagined_total,
                       "perf_env_steps_per_s": (tr.step - s_row) / (now - t_row),
                       "perf_imagined_steps_per_s": (imagined_total - i_row) / (now - t_row)}
                writer.write(row)
                progress.update(tr.step, imagined_total - i_row, force=True)
                t_row, s_row, i_row = now, tr.step, imagined_total
                progress = Progress(tc.steps, start=tr.step)
            if tc.eval_every and tr.step % tc.eval_every == 0 and tr.warm:
                summary, _ = evaluate(tr.wm, tr.ac, cfg.env, tc.act_context, tc.eval_episodes,
                                      seed=10_000 + tr.step, device=tr.device)
                writer.write({"env_step": tr.step, **{f"eval_{k}": v for k, v in summary.items()}})
            if tc.checkpoint_every and tr.step % tc.checkpoint_every == 0:
                save()
            if stop["sig"] is not None:
                path = save()
                print(f"\ninterrupted by signal {stop['sig']} at step {tr.step}; checkpoint {path}\n"
                      f"resume with: python -m matwm_fast.train --resume {run_dir}", file=sys.stderr)
                return 128 + int(stop["sig"])
        path = save()
        progress.close()
        print(f"done: {tr.step} env steps; checkpoint {path}")
        return 0
    except FloatingPointError as e:
        try:
            last = ckpts.latest()
        except ck.CheckpointError:
            last = "none written yet"
        print(f"\nerror: {e}; stopping. Last good checkpoint: {last}", file=sys.stderr)
        return 3
    finally:
        writer.close()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, run_dir, state = prepare(args)
        device = resolve_device(cfg.train.device)
        kernels.set_impl(cfg.train.kernels)
        tr = Trainer(cfg, device)
        if state is not None:
            diff = ck.config_diff(Config.from_dict(state["config"]), cfg, ignore=RESUMABLE)
            if diff:
                raise ValueError("checkpoint config differs: " + "; ".join(diff))
    except (ValueError, RuntimeError) as e:  # bad flag values, configs, checkpoints
        fail(str(e))
    print(describe(cfg))
    print(f"device = {device} | torch {torch.__version__} | kernels {kernels.resolve_impl(None, torch.empty(0, device=device))} | "
          f"agents {list(tr.spec.agents)} | WM batch {cfg.wm.batch_size} × {cfg.wm.seq_len} "
          f"({tr.wm_per_agent} per agent) | imagination {tr.imag_batch} × {tr.horizon} per agent "
          f"= {tr.imagined_per_update} imagined steps per env step")
    print(f"run dir = {run_dir}")
    return run(tr, run_dir, state)


if __name__ == "__main__":
    sys.exit(main())
