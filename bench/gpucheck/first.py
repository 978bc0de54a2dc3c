"""The GPU check's first stage, one part per process: ``python -m bench.gpucheck.first PART``.

    python -m bench.gpucheck.first probe  --json P.json [--preset paper --device cuda ...]
    python -m bench.gpucheck.first graphs --json G.json --kernels ref|triton [--steps 20 ...]

``probe``: an eager trainer (reference kernels), warmed up; one step under the sync census with
``warn`` everywhere (every host sync of the step, with its phase and call site), one with
``error`` inside the captured phases (``torch.cuda.set_sync_debug_mode``: the first sync there
raises, and where is recorded), and one under ``torch.profiler`` (kernel count and summed kernel
time per phase).

``graphs``: from a cold process, the ``graphs`` trainer first — the seconds from the interpreter's
start until its four phase graphs are captured, and each graph's capture — then an eager trainer
on the same kernels; ``--steps`` steps of each, alternated (a load that comes and goes hits both),
timed per phase between device synchronisations (:class:`matwm_fast.tools.profile.BackendRun`, the
profiler's own harness) and again as whole steps; then equality: a rollout with fixed contexts
and noise, captured in a graph of its own and replayed, against the eager call, and two replays
without fixed noise, which must draw different numbers; last, one replayed step under
``torch.profiler``.

Each part is its own process so that a capture that breaks the CUDA context costs only that part,
and so that the Triton part's capture time includes its cold JIT.  The record (``--json``) is
rewritten after every piece: a process stopped at the stage's cap still leaves what it measured.
On the CPU (the rehearsal) the graphs are plain calls, so the same code runs with nothing captured.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before torch is imported: what a cold process pays counts from here

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

PARTS = ("probe", "graphs")


class Record:
    """The part's figures, rewritten to ``path`` after every piece (atomically)."""

    def __init__(self, path: Path, **head):
        self.path, self.data = path, {**head, "done": [], "errors": []}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def piece(self, name: str, fn, keep=lambda x: x):
        """Run ``fn()`` and record ``keep(result)`` under ``name``; an exception is recorded, not
        raised (the next piece may still run).  Returns the result, or None after an exception."""
        t0 = time.perf_counter()
        try:
            out = fn()
            self.data[name] = keep(out)
            self.data["done"].append(name)
            return out
        except Exception as e:  # noqa: BLE001
            self.data["errors"].append({"piece": name, "error": f"{type(e).__name__}: {e}"[:2000],
                                        "traceback": traceback.format_exc()[-4000:]})
            return None
        finally:
            self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 3)
            self.save()


def probe(args, rec: Record) -> None:
    from matwm_fast.tools.harness import SteadyTrainer

    from .probes import STRICT, SyncCensus, profile_step

    w = rec.piece("build", lambda: SteadyTrainer.build(args.cfg, args.warmup_steps, backend="eager",
                                                        device=str(args.device), kernels="ref"),
                  keep=lambda w: {"fill_s": round(w.fill_s, 3), "warmup_s": round(w.warmup_s, 3)})
    if w is None:
        return
    tr = w.tr
    rec.data["runtime"] = tr.rt.describe()

    def census(error_in: tuple[str, ...]):
        c = SyncCensus(tr.device, error_in)
        with c.installed():
            try:
                tr.train_step()
            except RuntimeError:
                if c.raised is None:
                    raise
        tr.wm.eval()  # a step cut inside the world-model update leaves it in training mode
        return c.report()

    rec.piece("syncs", lambda: census(()))
    rec.piece("sync_error_step", lambda: census(STRICT))
    rec.piece("profile", lambda: profile_step(tr, args.work / "probe"))


def graphs(args, rec: Record) -> None:
    import torch

    from matwm_fast.graphs import Graph
    from matwm_fast.imagination import ImagNoise, Rollout
    from matwm_fast.tools.profile import BackendRun, peak_memory, sync, time_steps

    from .probes import compare_rollouts, profile_step, tolerance

    k = args.kernels
    run_g = rec.piece("graphs_build", lambda: BackendRun(args.cfg, f"graphs:{k}", args.device, args.warmup_steps),
                      keep=_build_figures)
    if run_g is None:
        return
    tr = run_g.tr
    rec.data["runtime"] = tr.rt.describe()
    run_e = rec.piece("eager_build", lambda: BackendRun(args.cfg, f"eager:{k}", args.device, args.warmup_steps),
                      keep=lambda r: {"fill_s": round(r.fill_s, 3), "warmup_s": round(r.warmup_s, 3)})
    if run_e is not None:
        runs = (run_e, run_g)

        def timing():
            time_steps(list(runs), args.steps, use_nsys=False)  # alternated, timed per phase
            mem = peak_memory(tr.device)
            out = {r.variant: r.summary(mem) for r in runs}
            shared = {k_: out[run_g.variant][k_] for k_ in ("budget", "flops_per_step")}
            for r in out.values():
                del r["budget"], r["flops_per_step"]
            whole = {r.variant: [] for r in runs}
            for _ in range(args.steps):  # whole steps, no sync between phases: what training sees
                for r in runs:
                    sync(tr.device)
                    t0 = time.perf_counter()
                    r.tr.train_step()
                    sync(tr.device)
                    whole[r.variant].append(1e3 * (time.perf_counter() - t0))
            return shared | {"steps": args.steps, "backends": out,
                             "whole_step_ms": {v: sorted(t)[len(t) // 2] for v, t in whole.items()},
                             "whole_step_ms_each": {v: [round(x, 3) for x in t] for v, t in whole.items()}}

        rec.piece("timing", timing)
        del run_e, runs  # its memory, before the equality check's graphs are captured

    c = tr.cfg
    tol = tolerance(tr.rt.describe()["amp"])

    def clone(r: Rollout) -> Rollout:
        return Rollout(*(t.clone() for t in (r.states, r.actions, r.rewards, r.continues)))

    def captured(g: Graph):
        """Call ``g`` through its eager warm-up calls until it has captured (and replayed once):
        on the CPU, where it is a plain call, once."""
        out = g()
        for _ in range(g.warmup if tr.device.type == "cuda" else 0):
            if g.captured:
                break
            out = g()
        return out

    def equality():
        ctx = tr.replay.sample_contexts(c.ac.imag_batch, c.ac.context_len)
        noise = ImagNoise.draw(tr.n * c.ac.imag_batch, c.ac.context_len, c.ac.horizon, tr.wm.K, tr.wm.A, tr.device)
        eager = clone(tr.imagine(ctx, noise))
        fixed = Graph(lambda: tr.imagine(ctx, noise), tr.device, name="check_fixed_noise")
        first = clone(captured(fixed))
        second = clone(fixed())  # a plain replay
        free = Graph(lambda: tr.imagine(ctx), tr.device, name="check_fresh_noise")
        a = captured(free).states.clone()
        b = free().states.clone()
        sync(tr.device)
        return {"captured": fixed.captured and free.captured, "capture_s": fixed.capture_s,
                "replay_vs_eager": compare_rollouts(first, eager, tol),
                "replay_repeats": bool(torch.equal(first.states, second.states)
                                       and torch.equal(first.actions, second.actions)),
                "replays_draw_differently": not torch.equal(a, b)}

    rec.piece("equality", equality)
    rec.piece("profile_graphs", lambda: profile_step(tr, args.work / f"graphs-{k}"))
    rec.piece("finite", lambda: tr.check_finite() or True)


def _build_figures(run) -> dict:
    """What the graphs trainer cost to build, warm up and capture, from the cold process's first
    line (``to_captured_s``), and each phase graph's capture."""
    return {"to_captured_s": round(time.perf_counter() - T0, 3), "fill_s": round(run.fill_s, 3),
            "warmup_s": round(run.warmup_s, 3), "warmup_steps": run.warmup_steps, "first_step_s": run.first_step_s,
            "graphs": {name: {"captured": g.captured, "capture_s": g.capture_s, "calls": getattr(g, "calls", None)}
                       for name, g in getattr(run.tr, "graphs", {}).items()}}


def build_parser():
    from matwm_fast.cli import Parser, add_config_flags

    # every config field is a flag (--ac.imag-batch, --scenario, --device, --kernels, ...), as in
    # the profiler; --steps is this script's own: timed steps, not the run's length
    p = Parser(prog="python -m bench.gpucheck.first", description=__doc__.split("\n\n")[0], conflict_handler="resolve")
    add_config_flags(p)
    p.add_argument("part", help=f"which part: {', '.join(PARTS)}")
    p.add_argument("--json", type=Path, required=True, metavar="FILE", help="the record, rewritten after every piece")
    p.add_argument("--work", type=Path, default=None, metavar="DIR", help="profiler traces (default: beside --json)")
    p.add_argument("--steps", type=int, default=20, help="graphs: timed steps of each trainer, alternated")
    p.add_argument("--warmup-steps", type=int, default=3, help="training steps before timing (the capture is in them)")
    return p


def main(argv: list[str] | None = None) -> int:
    from matwm_fast.cli import config_from, fail, overrides

    args = build_parser().parse_args(argv)
    if args.part not in PARTS:
        fail(f"part {args.part!r}: unknown; valid: {', '.join(PARTS)}")
    if args.steps < 1 or args.warmup_steps < 0:
        fail(f"--steps {args.steps} / --warmup-steps {args.warmup_steps}: must be >= 1 / >= 0")
    import torch

    from matwm_fast.config import resolve
    from matwm_fast.env import env_spec
    from matwm_fast.runtime import resolve_device

    try:
        cfg = config_from(args.preset or "paper", overrides(args), args.scenario_args)
        resolve(cfg, env_spec(cfg.env).n_agents)  # refused here, before any work, naming the flag
        args.device = resolve_device(cfg.run.device)
    except ValueError as e:
        fail(str(e))
    if args.part == "graphs" and cfg.run.kernels not in ("ref", "triton"):
        fail(f"--kernels {cfg.run.kernels!r}: the graphs part compares one kernel choice; valid: ref, triton")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    args.cfg, args.kernels = cfg, cfg.run.kernels
    args.work = args.work or args.json.parent / (args.json.stem + "-work")
    rec = Record(args.json, part=args.part, kernels=args.kernels if args.part == "graphs" else "ref",
                 preset=cfg.preset, scenario=cfg.env.scenario, device=str(args.device),
                 import_s=round(time.perf_counter() - T0, 3))
    (probe if args.part == "probe" else graphs)(args, rec)
    rec.data["process_s"] = round(time.perf_counter() - T0, 3)
    rec.save()
    return 1 if rec.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
