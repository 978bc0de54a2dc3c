"""``python -m matwm_fast.eval RUN_DIR`` — evaluate a trained policy, optionally record a video.

    python -m matwm_fast.eval runs/simple_tag-cpu-s0 --episodes 50
    python -m matwm_fast.eval runs/simple_tag-cpu-s0 --sample --video tag.gif

Loads the latest checkpoint of RUN_DIR (or the checkpoint file given), rebuilds the world model
and the actors from the config saved in it, plays ``--episodes`` episodes of a fresh env and
prints the mean ± std of episode returns per agent, per team and overall.  The same numbers go to
``RUN_DIR/eval_step_<step>.json`` (``_sample``/``_random`` suffix for those policies).  Episode e
plays ``reset(seed=--seed + e)``, or with ``--split tuning|report`` the evaluation protocol's
episodes of the run's training seed (:mod:`matwm_fast.protocol`, the sweep's matchup episodes).
For an image scenario (Butterfly) each video frame shows the game beside the 64 × 64 frames the
agents see, the world model's input.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from . import checkpoint as ck
from .cli import Parser, fail
from .env import EnvSpec
from .metrics import EpisodeSummary, summarise_returns
from .play import play, report, write_video
from .policy import Policy
from .protocol import SPLITS, check_minimums, episode_block
from .runtime import resolve_device

VIDEO_EXTS = (".gif", ".mp4")


def build_parser() -> Parser:
    p = Parser(prog="python -m matwm_fast.eval", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("run", metavar="RUN_DIR", help="a training run directory, or one of its checkpoint files")
    p.add_argument("--episodes", type=int, default=50, help="episodes to play (default 50, the paper's protocol)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="mode", action="store_const", const="greedy",
                      help="act with each actor's most likely action (default)")
    mode.add_argument("--sample", dest="mode", action="store_const", const="sample",
                      help="sample actions from the actors, as in training")
    mode.add_argument("--random", dest="mode", action="store_const", const="random",
                      help="uniformly random actions: the baseline a policy should beat")
    p.set_defaults(mode="greedy")
    p.add_argument("--video", metavar="FILE", default=None,
                   help="record episodes to FILE (.gif, or .mp4 with imageio-ffmpeg); for image scenarios the game "
                        "beside the frames the agents see")
    p.add_argument("--video-episodes", type=int, default=1, help="episodes to record with --video (default 1)")
    p.add_argument("--fps", type=int, default=10, help="frames per second of the video (default 10)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--seed", type=int, default=None,
                       help="seed of the evaluation envs and sampling: episode e plays reset(seed=SEED + e) (default 0)")
    where.add_argument("--split", choices=list(SPLITS), default=None,
                       help="play the protocol's episodes of the run's training seed instead (matwm_fast/protocol.py): "
                            "tuning (seed s: 20,000 + s·episodes + e) or report (seed s: 2,000,000 + (s-100)·10,000 + e; "
                            "at least 50 episodes); refused when the run's seed is not one of the split's")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: acting is a batch of N rows, and on a busy machine a "
                        "second thread only waits: a 100-episode evaluation took seconds on one thread and had not "
                        "finished after 10 minutes on two; 0 = torch's default)")
    p.add_argument("--out", metavar="FILE.json", default=None,
                   help="where to write the results (default RUN_DIR/eval_step_<step>.json)")
    return p


def _check_output(what: str, f: Path) -> None:
    """Refuse, before any episode is played, an output path that cannot be written."""
    if f.is_dir():
        raise ValueError(f"{what} {f}: is a directory; give a file name")
    parent = f.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {f}: {parent} is not a writable directory")


def _has_mp4_writer() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("imageio_ffmpeg", "av"))


def table(summary: EpisodeSummary, spec: EnvSpec) -> str:
    """The summary as an aligned text table: one row per agent, per team, and all agents."""
    rows = [(name, v.mean, v.std) for name, v in summary.agents.items()]
    rows += [(f"team {t} (mean of {len(spec.teams[t])})", v.mean, v.std) for t, v in summary.teams.items()]
    rows.append(("all agents (mean)", summary.all.mean, summary.all.std))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'who':<{w}}  {'mean':>10}  {'std':>9}", "-" * (w + 23)]
    lines += [f"{n:<{w}}  {m:>10.3f}  {s:>9.3f}" for n, m, s in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.episodes < 1:
            raise ValueError(f"--episodes {args.episodes}: need at least 1")
        if args.threads < 0:
            raise ValueError(f"--threads {args.threads}: need 0 (torch's default) or more")
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        if args.video is not None and not args.video.lower().endswith(VIDEO_EXTS):
            raise ValueError(f"--video {args.video!r}: the file name must end in {' or '.join(VIDEO_EXTS)}")
        if args.video is not None and args.video.lower().endswith(".mp4") and not _has_mp4_writer():
            # refuse before playing 50 episodes, not after
            raise ValueError(f"--video {args.video!r}: writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                             "or use a .gif file name")
        if args.fps < 1:
            raise ValueError(f"--fps {args.fps}: need at least 1 frame per second")
        if args.video_episodes < 1:
            raise ValueError(f"--video-episodes {args.video_episodes}: need at least 1")
        for what, f in (("--out", args.out), ("--video", args.video)):
            if f is not None:
                _check_output(what, Path(f))
        device = resolve_device(args.device)
        pol = Policy(args.run, device)
        if args.split is not None:  # the protocol's episodes of this run's seed (refused for another split's seed)
            check_minimums(args.split, None, args.episodes)
            where = episode_block(args.split, pol.cfg.train.seed, args.episodes)
        else:
            seed = 0 if args.seed is None else args.seed
            where = {"split": None, "episodes": args.episodes, "seed": seed,
                     "episode_seeds": [seed, seed + args.episodes - 1]}
    except (ValueError, RuntimeError) as e:  # bad arguments, missing or corrupt checkpoints
        fail(str(e))
    args.seed = where["seed"]
    cfg, path, step = pol.cfg, pol.path, pol.step
    run_dir = ck.run_dir_of(path)
    n_video = min(args.video_episodes, args.episodes) if args.video else 0
    returns, frames, spec = play(pol.wm, pol.ac, cfg.env, cfg.train.act_context, args.episodes, args.seed, device,
                                 greedy=args.mode == "greedy", random_policy=args.mode == "random",
                                 capture_frames=n_video)  # returns (E, N)
    print(f"{cfg.env.scenario}: {args.mode} policy of {path} (env step {step}), "
          f"{args.episodes} episodes, seed {args.seed}" + (f" ({args.split} episodes)" if args.split else ""))
    print(table(summarise_returns(returns, spec.agents, spec.teams), spec))
    out = Path(args.out) if args.out else run_dir / f"eval_step_{step}{'' if args.mode == 'greedy' else '_' + args.mode}.json"
    result = {
        "run_dir": str(run_dir), "checkpoint": str(path), "env_step": step, "scenario": cfg.env.scenario,
        "policy": args.mode, "episodes": args.episodes, "seed": args.seed, "evaluation": where,
        **report(returns, spec),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if args.video:
        try:
            write_video(frames, args.video, fps=args.fps)
        except (ValueError, RuntimeError) as e:
            fail(str(e))
        print(f"wrote {args.video} ({len(frames)} frames, {n_video} episode{'s' * (n_video > 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
