"""``python -m matwm_fast.train`` — train MATWM on an MPE2 scenario.

    python -m matwm_fast.train --preset cpu --scenario simple_tag --steps 3000
    python -m matwm_fast.train --resume runs/simple_tag-cpu-s0
    python -m matwm_fast.train --init-from runs/tag-s0 --ac.lr 1e-4 --run-dir runs/tag-s0-lr1e-4

Prints the config and device, shows progress (env steps/s, imagined steps/s), writes
``metrics.jsonl``/``metrics.csv`` every ``--log-every`` steps and checkpoints atomically every
``--checkpoint-every`` steps, at the end, and on Ctrl-C/SIGTERM (a second Ctrl-C quits at once).
Exit status: 0 done, 2 bad arguments/config/checkpoint/run directory, 3 non-finite loss,
4 a failed write (disk full), 128+signal interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checkpoint as ck
from .cli import Parser, add_config_flags, apply_overrides, config_from_args, describe, fail, overrides
from .config import Config, check_fields, diff, load_config, resolve, with_fields
from .env import env_spec
from .metrics import MetricsWriter, Progress, RowLogger, repair, truncate_after
from .play import evaluate
from .protocol import training_eval_first
from .runtime import Runtime, resolve_runtime
from .trainer import Trainer, seed_everything
from .wm_probe import HeldOutProbe


def build_parser() -> Parser:
    p = Parser(prog="python -m matwm_fast.train", description=__doc__.split("\n\n")[0],
               formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=40), allow_abbrev=False)
    p.add_argument("--run-dir", default=None, help="where metrics and checkpoints go (default runs/<name>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR exactly (or from a checkpoint file RUN_DIR/checkpoints/step_*.pt); "
                            "only the run.* settings may change")
    start.add_argument("--init-from", default=None, metavar="CKPT",
                       help="start a new run (in --run-dir) from a checkpoint or run directory: weights, optimisers, "
                            "replay and env continue, and any setting may change (e.g. a lower --ac.lr after a NaN); "
                            "the changes are recorded in the new run's config.json")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --run-dir (its files are deleted)")
    add_config_flags(p)
    return p


@dataclass
class Session:
    """What main() resolved before anything was trained or written."""

    cfg: Config
    runtime: Runtime
    run_dir: ck.RunDir
    state: dict | None  # a checkpoint to continue from
    resume: bool  # continue the same run (vs a new one, fresh or --init-from)


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.env.scenario}-{cfg.preset}-s{cfg.train.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _config_for_resume(args, saved: Config) -> Config:
    """The checkpoint's config with the run.* flags given now; learned settings are refused."""
    # the scenario args are read against the checkpoint's scenario, then the flags set as given
    wanted = with_fields(apply_overrides(saved, {}, args.scenario_args), overrides(args))
    wanted = replace(wanted, preset=saved.preset if args.preset is None else args.preset)
    refused = [_refusal(k, a, b) for k, a, b in diff(saved, wanted, include_preset=True)]
    if refused:
        raise ValueError(f"cannot change {'; '.join(refused)} when resuming: the checkpoint was trained with its "
                         "values. Only run.* settings may change on resume; to continue with other settings start a "
                         "new run with --init-from")
    for k, a, b in diff(saved, wanted, sections=("run",)):
        print(f"resume: {k} = {b!r} (was {a!r})")
    return wanted


def _refusal(key: str, saved, requested) -> str:
    """A learned setting a resume may not change, named as the flag that asked for it."""
    if key == "env.kwargs":
        return f"--scenario-arg (checkpoint {dict(saved)}, requested {dict(requested)})"
    return f"{'--preset' if key == 'preset' else key} (checkpoint {saved!r}, requested {requested!r})"


def prepare(args) -> Session:
    """Config, runtime and run directory, all checked before anything is written."""
    state, resume = None, args.resume is not None
    if resume:
        path = ck.resolve(args.resume)
        run_dir = ck.run_dir_of(path) if Path(args.resume).is_file() else Path(args.resume)
        if args.run_dir is not None and Path(args.run_dir).resolve() != run_dir.resolve():
            raise ValueError(f"--run-dir {args.run_dir} conflicts with --resume {args.resume}: a resumed run "
                             f"continues in its own directory ({run_dir})")
        state = ck.load(path)
        cfg = _config_for_resume(args, load_config(state["trainer"]["config"]))
        print(f"resume: from {path} (env step {state['trainer']['step']})")
    elif args.init_from is not None:
        state = ck.load(ck.resolve(args.init_from))
        cfg = apply_overrides(load_config(state["trainer"]["config"]), overrides(args), args.scenario_args)
        if args.preset is not None:
            raise ValueError("--preset with --init-from: the settings start from the checkpoint's; change them with flags")
    else:
        cfg = config_from_args(args)
    check_fields(cfg)  # each value on its own, before an env is built from them
    cfg = resolve(cfg, env_spec(cfg.env).n_agents)
    runtime = resolve_runtime(cfg.run)
    rd = ck.RunDir(run_dir if resume else (args.run_dir or default_run_dir(cfg)), keep=cfg.run.keep_checkpoints)
    if resume:
        on_disk = rd.read_config()
        if on_disk is not None:
            changed = [f"{k}: checkpoint {a!r} vs this run {b!r}" for k, a, b in diff(cfg, load_config(on_disk))]
            if changed:
                raise ValueError(f"the checkpoint does not belong to {rd.path} (its config.json differs: "
                                 + "; ".join(changed) + ")")
    rd.open(fresh=not resume, overwrite=args.overwrite)  # from here on this process owns the directory
    return Session(cfg, runtime, rd, state, resume)


def run(tr: Trainer, rd: ck.RunDir, extra: dict | None = None) -> int:
    """Train ``tr`` to ``run.steps`` in ``rd``; ``extra`` is a resumed checkpoint's bookkeeping.

    Signals set a flag acted on at the next step boundary (and between evaluation episodes), so
    the checkpoint is always of a whole step.  Returns the exit status (module docstring).
    """
    rc = tr.cfg.run
    log = RowLogger(MetricsWriter(rd.path, purge_step=tr.step + 1 if extra is not None else None),
                    tr.spec.agents, tr.spec.teams)
    pending_eval = False
    if extra is not None:
        log.load_state_dict(extra["logger"], tr.device)
        pending_eval = bool(extra.get("pending_eval"))
    log.start(tr.step, tr.imagined_total)
    stop: dict = {"sig": None}

    def on_signal(signum, _frame):
        # only a second Ctrl-C quits at once (a person who will not wait): a SIGTERM after the
        # terminal's SIGINT is a supervisor (sweep, scheduler) relaying it, and must not cost the checkpoint
        if stop["sig"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if stop["sig"] is None:
            stop["sig"] = signum

    def save(pending: bool = False) -> Path:
        tr.check_finite()  # never write a checkpoint after a non-finite loss
        return rd.checkpoints.write(tr.step, {"trainer": tr.state_dict(),
                                              "extra": {"logger": log.state_dict(), "pending_eval": pending}})

    probe: list[HeldOutProbe] = []  # the world model's held-out scores, its episodes made at the first evaluation

    def evaluate_now() -> bool:
        """An evaluation row at this step; False when a signal cut it short (it reruns on resume)."""
        t0 = time.perf_counter()
        summary, _ = evaluate(tr.wm, tr.ac, tr.cfg.env, tr.cfg.train.act_context, rc.eval_episodes,
                              seed=training_eval_first(tr.step, rc.eval_episodes), device=tr.device,
                              should_stop=lambda: stop["sig"] is not None)  # its own episodes: matwm_fast/protocol.py
        if summary is None:
            return False
        t1 = time.perf_counter()
        if not probe:
            probe.append(HeldOutProbe(tr.cfg.env, tr.cfg.ac.context_len, tr.cfg.ac.horizon))
        # reward R² and action-effect correlation on held-out random-policy episodes (wm_probe.py)
        wm_scores = probe[0](tr.wm, tr.ac, should_stop=lambda: stop["sig"] is not None)
        if wm_scores is None:
            return False
        log.writer.write({"env_step": tr.step, **{f"eval_{k}": v for k, v in {**summary, **wm_scores}.items()},
                          "perf_eval_play_s": t1 - t0, "perf_eval_wm_probe_s": time.perf_counter() - t1})
        return True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if pending_eval:  # the checkpoint was written while its step's evaluation was cut short
            evaluate_now()
        with Progress(rc.steps, start=tr.step) as progress:  # the bar ends before any message below
            while tr.step < rc.steps and stop["sig"] is None:
                log.add(tr.train_step())
                progress.update(tr.step, tr.imagined_total - log.imagined0)
                if tr.step % rc.log_every == 0 or tr.step == rc.steps:
                    tr.check_finite()
                    progress.update(tr.step, tr.imagined_total - log.imagined0, force=True)
                    progress.restart(tr.step)
                    log.row(tr.step, tr.imagined_total, tr.warm, tr.episodes.finished,
                            on_grid=tr.step % rc.log_every == 0)
                done_eval = True
                if rc.eval_every and tr.step % rc.eval_every == 0 and tr.warm:
                    done_eval = evaluate_now()
                if (rc.checkpoint_every and tr.step % rc.checkpoint_every == 0) or stop["sig"] is not None:
                    save(pending=not done_eval)
        if stop["sig"] is not None:
            print(f"interrupted by signal {stop['sig']} at step {tr.step}; checkpoint "
                  f"{rd.checkpoints.latest()}\nresume with: python -m matwm_fast.train --resume {rd.path}", file=sys.stderr)
            return 128 + int(stop["sig"])
        path = save()
        print(f"done: {tr.step} env steps; checkpoint {path}")
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
        print(f"interrupted twice: quitting without a new checkpoint (newest: {_newest(rd)})", file=sys.stderr)
        return 130
    except FloatingPointError as e:
        print(f"error: {e}; stopping. Last good checkpoint: {_newest(rd, resume=True)}. To go on with other "
              f"settings (e.g. a lower --ac.lr or --wm.lr): python -m matwm_fast.train --init-from {rd.path} "
              f"--run-dir NEW_DIR --ac.lr ...", file=sys.stderr)
        return 3
    except OSError as e:  # a full disk, a vanished directory: no traceback, the way back instead
        print(f"error: writing the run failed at env step {tr.step} ({e.strerror or e}: {e.filename or rd.path}). "
              f"Last good checkpoint: {_newest(rd, resume=True)}", file=sys.stderr)
        return 4
    finally:
        log.writer.close()
        for s, h in old.items():
            signal.signal(s, h)


def _newest(rd: ck.RunDir, resume: bool = False) -> str:
    last = rd.checkpoints.latest_or_none()
    if last is None:
        return "none written yet (set --checkpoint-every to keep some)"
    return f"{last} (resume with: python -m matwm_fast.train --resume {rd.path})" if resume else str(last)


def start(s: Session) -> Trainer:
    """Threads, seeds, the trainer (restored from the checkpoint when there is one), the run
    directory made ready for it (what an interrupted run left behind removed) and its config.json."""
    # a second, idle-waiting OpenMP thread slows a step beside any other busy process
    # (bench/results/cpu-threads.md): run.threads defaults to 1
    if s.cfg.run.threads > 0:
        torch.set_num_threads(s.cfg.run.threads)
    seed_everything(s.cfg.train.seed)
    tr = Trainer(s.cfg, s.runtime)
    if s.state is not None:  # refuses a state that does not fit, saying what differs
        tr.load_state_dict(s.state["trainer"], same_config=s.resume)
    rd = s.run_dir
    if s.resume:
        for note in repair(rd.path):  # a power cut or full disk can leave half a line
            print(f"warning: {note}", file=sys.stderr)
        for p in rd.clean_temporary():
            print(f"resume: removed {p.name}, left by an interrupted write")
        dropped = truncate_after(rd.path, tr.step)  # rows a killed run logged past its checkpoint
        if dropped:
            print(f"resume: dropped {dropped} metric rows logged after env step {tr.step}")
        for p in rd.abandon_after(tr.step):
            print(f"resume: set aside {p.name} (after env step {tr.step}) as {p.name}.abandoned")
    rd.write_config({**s.cfg.to_dict(), "runtime": s.runtime.describe()})
    return tr


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = prepare(args)
    except (ValueError, ck.CheckpointError) as e:
        fail(str(e))
    rd = s.run_dir
    try:
        try:
            tr = start(s)
        except (ValueError, ck.CheckpointError) as e:
            fail(str(e))
        print(describe(s.cfg))
        rt = s.runtime.describe()
        print(f"device = {rt['device']} | torch {torch.__version__} | backend {rt['backend']} | kernels {rt['kernels']} | "
              f"amp {rt['amp']} | agents {list(tr.spec.agents)} | WM batch {s.cfg.wm.batch_size} × {s.cfg.wm.seq_len} "
              f"({s.cfg.wm.batch_per_agent} per agent) | imagination {s.cfg.ac.imag_batch} × {s.cfg.ac.horizon} per "
              f"agent = {tr.imagined_per_update} imagined steps per env step")
        print(f"run dir = {rd.path}")
        if s.resume:
            if tr.step >= s.cfg.run.steps:
                print(f"run already at env step {tr.step} (run.steps = {s.cfg.run.steps}); "
                      f"pass --steps N with N > {tr.step} to train further")
                return 0
            print(f"resumed from step {tr.step}")
        return run(tr, rd, s.state["extra"] if s.resume else None)
    finally:
        rd.unlock()  # the process may go on (tests, a notebook): the directory is free again


if __name__ == "__main__":
    sys.exit(main())
