"""``python -m matwm_fast.train`` — train MATWM on an MPE2 scenario.

    python -m matwm_fast.train --preset cpu --scenario simple_tag --steps 3000
    python -m matwm_fast.train --resume runs/simple_tag-cpu-s0

Prints the resolved config and device, shows progress (env steps/s, imagined steps/s), writes
``metrics.jsonl``/``metrics.csv`` every ``--log-every`` steps and checkpoints atomically every
``--checkpoint-every`` steps, at the end, and on Ctrl-C/SIGTERM (a second Ctrl-C quits at once).
Exit status: 0 done, 2 bad arguments/config/checkpoint, 3 non-finite loss, 128+signal interrupted.
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
from .backends import kernel_impl
from .checkpoint import RESUMABLE
from .cli import Parser, add_config_flags, apply_overrides, config_from_args, describe, fail, overrides
from .config import Config
from .evaluate import evaluate
from .metrics import MetricAccumulator, MetricsWriter, Progress, truncate_after
from .trainer import Trainer, resolve_device

__all__ = ["RESUMABLE", "build_parser", "prepare", "run", "main"]


def build_parser() -> Parser:
    p = Parser(prog="python -m matwm_fast.train", description=__doc__.split("\n\n")[0],
               formatter_class=lambda prog: __import__("argparse").HelpFormatter(prog, max_help_position=40),
               allow_abbrev=False)
    p.add_argument("--run-dir", default=None, help="where metrics and checkpoints go (default runs/<name>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR exactly (or from a checkpoint file RUN_DIR/checkpoints/step_*.pt); "
                        f"only these may change: {', '.join(sorted(RESUMABLE))}")
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


def _get(cfg: Config, key: str):
    sec, name = key.split(".", 1)
    return getattr(getattr(cfg, sec), name)


def prepare(args) -> tuple[Config, Path, dict | None]:
    """Resolve config and run directory, from the preset and flags or from a checkpoint.

    On resume every flag given is either applied (the RESUMABLE ones; each change is printed) or,
    when it would change what the checkpoint was trained with, refused with the differing values.
    """
    if args.resume is None:
        cfg = config_from_args(args)
        return cfg, Path(args.run_dir) if args.run_dir else default_run_dir(cfg), None
    path = ck.resolve(args.resume)
    run_dir = ck.run_dir_of(path) if Path(args.resume).is_file() else Path(args.resume)
    if args.run_dir is not None and Path(args.run_dir).resolve() != run_dir.resolve():
        raise ValueError(f"--run-dir {args.run_dir} conflicts with --resume {args.resume}: a resumed run "
                         f"continues in its own directory ({run_dir})")
    state = ck.load(path)
    saved = ck.saved_config(state)
    over = overrides(args)
    refused = [f"{k} (checkpoint {_get(saved, k)!r}, requested {v!r})"
               for k, v in sorted(over.items()) if k not in RESUMABLE and v != _get(saved, k)]
    if args.preset is not None and args.preset != saved.preset:
        refused.append(f"--preset (checkpoint {saved.preset!r}, requested {args.preset!r})")
    if args.scenario_args:
        wanted = apply_overrides(saved, {}, args.scenario_args).env.kwargs
        if wanted != saved.env.kwargs:
            refused.append(f"--scenario-arg (checkpoint {dict(saved.env.kwargs)}, requested {dict(wanted)})")
    if refused:
        raise ValueError(f"cannot change {'; '.join(refused)} when resuming: the checkpoint was trained with "
                         f"its values. Changeable on resume: {', '.join(sorted(RESUMABLE))}")
    changed = {k: v for k, v in over.items() if v != _get(saved, k)}
    cfg = apply_overrides(saved, changed)
    for k, v in sorted(changed.items()):
        print(f"resume: {k} = {v!r} (was {_get(saved, k)!r})")
    print(f"resume: from {path} (env step {state['step']})")
    return cfg, run_dir, state


def _latest(ckpts: ck.CheckpointDir) -> str:
    try:
        return str(ckpts.latest())
    except ck.CheckpointError:
        return "none"


def run(tr: Trainer, run_dir: Path, extra: dict | None = None) -> int:
    """Train ``tr`` to ``train.steps``; ``extra`` is a restored checkpoint's ``extra`` when resuming.

    Signals set a flag that is acted on at the next step boundary, so the checkpoint is always of
    a whole step.  Returns the exit status (see the module docstring).
    """
    cfg = tr.cfg
    tc = cfg.train
    run_dir = Path(run_dir)
    ckpts = ck.CheckpointDir(run_dir, keep=tc.keep_checkpoints)
    acc = MetricAccumulator()
    imagined_total = 0
    if extra is not None:
        # rows past the checkpoint (a run killed without saving) would be logged twice
        dropped = truncate_after(run_dir, tr.step)
        if dropped:
            print(f"resume: dropped {dropped} metric rows logged after env step {tr.step}")
        # checkpoints past the resumed one (resuming from an older file) belong to an abandoned
        # future; set aside, not deleted, and out of the way of pruning and `latest`
        later = [p for p in ckpts.dir.glob("step_*.pt") if int(p.stem.split("_")[1]) > tr.step]
        for p in later:
            p.rename(p.with_name(p.name + ".abandoned"))
            print(f"resume: set aside {p.name} (after env step {tr.step}) as {p.name}.abandoned")
        if later and (ckpts.dir / f"step_{tr.step:09d}.pt").exists():
            ckpts.point_to(ckpts.dir / f"step_{tr.step:09d}.pt")
        acc.sums = {k: v.to(tr.device) for k, v in extra.get("acc_sums", {}).items()}
        acc.counts = dict(extra.get("acc_counts", {}))
        imagined_total = extra.get("imagined_total", 0)
        if tr.step >= tc.steps:
            print(f"run already at env step {tr.step} (train.steps = {tc.steps}); "
                  f"pass --steps N with N > {tr.step} to train further")
            return 0
    writer = MetricsWriter(run_dir, purge_step=tr.step + 1 if extra is not None else None)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    stop: dict = {"sig": None}

    def on_signal(signum, _frame):
        # only a second Ctrl-C quits at once (a person who will not wait): a SIGTERM after the
        # terminal's SIGINT is a supervisor (sweep, scheduler) relaying it, and must not cost the checkpoint
        if stop["sig"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if stop["sig"] is None:
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
                imagined_total += tr.imagined_per_update if tr.step % tc.agent_every == 0 else 0
            progress.update(tr.step, imagined_total - i_row)
            if tr.step % tc.log_every == 0 or tr.step == tc.steps:
                tr.check_finite()
                # a last step off the logging grid gets a row too, but the checkpoint keeps the
                # interval open, so a resume with more --steps logs exactly the uninterrupted rows
                off_grid = (dict(acc.sums), dict(acc.counts), list(tr.episodes.finished)) \
                    if tr.step % tc.log_every else None
                now = time.perf_counter()
                row = {"env_step": tr.step, "warm": tr.warm, **acc.mean(), **episode_row(tr),
                       "imagined_steps_total": imagined_total,
                       "perf_env_steps_per_s": (tr.step - s_row) / (now - t_row),
                       "perf_imagined_steps_per_s": (imagined_total - i_row) / (now - t_row)}
                writer.write(row)
                if off_grid is not None:
                    acc.sums, acc.counts, tr.episodes.finished = off_grid
                progress.update(tr.step, imagined_total - i_row, force=True)
                t_row, s_row, i_row = now, tr.step, imagined_total
                progress = Progress(tc.steps, start=tr.step)
            if tc.eval_every and tr.step % tc.eval_every == 0 and tr.warm:
                # evaluate() forks and reseeds torch's RNG: training continues as without it
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
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
        print(f"\ninterrupted twice: quitting without a new checkpoint (newest: {_latest(ckpts)})", file=sys.stderr)
        return 130
    except FloatingPointError as e:
        last = _latest(ckpts)
        if last != "none":
            last += f" (resume with: python -m matwm_fast.train --resume {run_dir})"
        else:
            last = "none written yet (set --checkpoint-every to keep some)"
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
        if cfg.train.threads > 0:  # on a shared CPU, idle-waiting OpenMP threads cost ~60× (README)
            torch.set_num_threads(cfg.train.threads)
        tr = Trainer(cfg, device)
        if state is not None:
            ck.load_trainer_state(tr, state)  # refuses a checkpoint that does not fit, saying what differs
    except (ValueError, RuntimeError) as e:  # bad flag values, configs, checkpoints (CheckpointError)
        fail(str(e))
    print(describe(cfg))
    print(f"device = {device} | torch {torch.__version__} | backend {tr.backend} | "
          f"kernels {kernels.resolve_impl(kernel_impl(cfg.train.kernels, tr.backend), torch.empty(0, device=device))} | "
          f"agents {list(tr.spec.agents)} | WM batch {cfg.wm.batch_size} × {cfg.wm.seq_len} "
          f"({tr.wm_per_agent} per agent) | imagination {tr.imag_batch} × {tr.horizon} per agent "
          f"= {tr.imagined_per_update} imagined steps per env step")
    print(f"run dir = {run_dir}")
    if state is not None:
        print(f"resumed from step {tr.step}")
    return run(tr, run_dir, state.get("extra", {}) if state is not None else None)


if __name__ == "__main__":
    sys.exit(main())
