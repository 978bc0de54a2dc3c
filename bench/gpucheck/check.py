"""One command that proves and times the fast path on a lent GPU: ``python -m bench.gpucheck``.

    python -m bench.gpucheck --out DIR --commit SHA       # on a lent GPU (bench/README.md)
    python -m bench.gpucheck --out DIR --rehearse         # the same stages on the CPU (CI)

A GPU is lent rarely and briefly, so nothing here may need debugging there: the stages run in
order, each in subprocesses under its own time cap, and the results (``results.json`` and
``summary.md``) are written to ``--out`` before and after every stage (and after every part of
one), so a run cut short still returns what it measured.  A stage that fails or runs out of time
never stops the next one.

1. ``env``      GPU name, SMs, memory, driver, torch/triton/CUDA versions, commit, tools present;
2. ``graphs``   the first stage, the figures the check exists for, within two minutes of a cold
                machine: one eager step of the paper preset under ``set_sync_debug_mode`` (where
                it syncs), one under ``torch.profiler`` (kernels and kernel time per phase), then
                the ``graphs`` backend with the reference and with the Triton kernels — capture
                time from a cold process, replayed steps against eager ones alternated, and
                equality (:mod:`bench.gpucheck.first`);
3. ``tests``    the kernel tests natively on CUDA and the ``gpu``-marked tests but Inductor's;
4. ``train``    ``python -m matwm_fast.train --preset paper --backend graphs``: finite losses, the
                16 / 36,864 budget counters in every update row, a checkpoint that loads;
5. ``ncu``      Nsight Compute on the first imagination kernels of one eager step (the kernels
                a graph replays, launched one by one);
6. ``inductor`` last, with the time left: ``cudagraphs`` and ``compile`` profiled, then the
                Inductor ``gpu`` tests.

This module is the runner (plan, clock, subprocesses, results, CLI); what each stage runs and how
it judges the outcome is :mod:`bench.gpucheck.stages`, ``summary.md`` is :mod:`bench.gpucheck.summary`.

Caps (seconds, :data:`GPU_CAPS`): 500 in all, so a whole run fits a 540-second device call.  A
stage's deadline is the sum of the caps up to it: it may use what earlier stages left unused,
never what later ones are owed.  The two checks before (bench/results/gpu/) spent every compiled
stage compiling, 70–200 s per graph set: Inductor now comes last and nothing before it compiles
with it.  ``--compile-cache DIR`` carries what one check compiled (Inductor's cache, Triton's JIT
cache) to the next check on the same GPU kind (:mod:`bench.gpucheck.compile_cache`).

``--rehearse`` runs the same stages on the CPU at the ``smoke`` preset, with Triton in its
interpreter, the graphs as plain calls, a few steps each, an eager stand-in for Inductor's
variants and ``cudagraphs`` replaced by a check that it is refused clearly;
``tests/gpucheck/test_gpucheck.py`` runs it in CI so this harness cannot rot between GPUs.
Exit status: 0 every stage passed (or was skipped), 1 one failed or ran out of time, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from matwm_fast.cli import Parser, fail

from . import compile_cache
from .stages import RUNNERS
from .summary import cache_note, summary

ROOT = Path(__file__).resolve().parents[2]  # the checkout: stages run its tests and modules
STAGES = ("env", "graphs", "tests", "train", "image", "ncu", "inductor")
# the first two stages within two minutes of a cold machine; Inductor gets what is left of 500 s
GPU_CAPS = {"env": 10, "graphs": 110, "tests": 100, "train": 60, "image": 60, "ncu": 40, "inductor": 120}
# the CPU rehearsal's caps only catch a hang
REHEARSAL_CAPS = {"env": 60, "graphs": 240, "tests": 120, "train": 120, "image": 120, "ncu": 120, "inductor": 120}
LOG_TAIL = 1 << 20  # bytes of each command's output kept in log.txt
# what a check writes to --out, with the compile cache's archive (a device call returns at most 8 files)
OUTPUTS = ("results.json", "summary.md", "log.txt", "train_metrics.jsonl", "ncu.txt", "imagine.ncu-rep")


@dataclass
class Plan:
    """What the stages run: the GPU check, or its CPU rehearsal."""

    rehearse: bool
    preset: str
    device: str
    parts: tuple[tuple[str, str | None, float], ...]  # graphs: (part, kernels, share of the stage's cap)
    graph_steps: int  # graphs: timed steps of each trainer
    graph_warmup: int  # training steps before timing: the capture happens in them
    test_runs: dict[str, list[str]]  # tests: pytest selections
    train_steps: int
    log_every: int
    inductor: tuple[tuple[str, float], ...]  # inductor: (variant, share of the stage's cap)
    refused: tuple[str, ...]  # inductor: variants that must be refused with a clear error
    inductor_steps: int
    inductor_tests: list[str]
    first_flags: tuple[str, ...] = ()  # graphs: config flags of its processes only
    # the kernels a graph replays are the eager step's own: launched one by one, Nsight Compute's
    # NVTX filter sees each of them
    ncu_variant: str = "eager"
    ncu_launches: int = 20
    caps: dict = field(default_factory=dict)

    def args(self) -> list[str]:
        """Flags every profile/train/first-stage subprocess gets."""
        return ["--preset", self.preset, "--scenario", "simple_tag", "--device", self.device] + (
            ["--threads", "1"] if self.rehearse else [])  # a shared 2-core CPU: one thread waits least


# the probe (syncs, kernels) first; Triton's part last and largest: its JIT runs cold in it
PARTS = (("probe", None, 25), ("graphs", "ref", 35), ("graphs", "triton", 50))


def plan(rehearse: bool) -> Plan:
    if rehearse:  # every stage's code once, at the fewest steps that exercise it
        return Plan(True, "smoke", "cpu", PARTS, graph_steps=1, graph_warmup=0,
                    test_runs={"kernels": ["tests/kernels/test_dispatch.py", "-k", "allowed_names or default_is_ref"],
                               "gpu": ["tests/test_gpu.py", "-m", "gpu and not inductor"]},
                    train_steps=50, log_every=5,
                    inductor=(("eager:ref", 1),),  # a stand-in: a cold CPU compile takes minutes
                    refused=("cudagraphs",), inductor_steps=1, inductor_tests=[], caps=dict(REHEARSAL_CAPS),
                    # one imagined row per agent: Triton's interpreter pays per program, 5x less than 6 rows
                    first_flags=("--ac.imag-batch", "1"))
    return Plan(False, "paper", "cuda", PARTS, graph_steps=20, graph_warmup=3,
                test_runs={"kernels": ["tests/kernels"],
                           # a module that fails to import must not keep the others' gpu tests from running
                           "gpu": ["tests", "-m", "gpu and not inductor", "--continue-on-collection-errors"]},
                train_steps=1200, log_every=50,
                inductor=(("cudagraphs", 100), ("compile", 90)), refused=(), inductor_steps=20,
                inductor_tests=["tests", "-m", "gpu and inductor", "--continue-on-collection-errors"],
                caps=dict(GPU_CAPS))


# ----------------------------------------------------------------------------------- the runner
class Check:
    """Runs the stages against a shared clock and keeps ``results.json``/``summary.md`` current."""

    def __init__(self, p: Plan, out: Path, work: Path, stages: list[str], commit: str | None, threads: int,
                 cache: Path | None = None, kind: str = "cpu"):
        self.p, self.out, self.work, self.commit, self.threads, self.kind = p, out, work, commit, threads, kind
        self.t0, self.deadline = time.perf_counter(), 0.0
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
        self.archive = compile_cache.archive_name(kind)
        self.cache = None if cache is None else cache / self.archive  # this kind's, restored and replaced
        if cache is not None:  # caches of this check's own, restored from and packed to an archive
            self.env |= {"TORCHINDUCTOR_CACHE_DIR": str(self.work / "cache" / "inductor"),
                         "TRITON_CACHE_DIR": str(self.work / "cache" / "triton")}
        if p.rehearse:  # Triton in its interpreter; one OpenMP thread on a shared CPU
            self.env |= {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        else:  # natively on CUDA, whatever the caller's shell says
            self.env.pop("TRITON_INTERPRET", None)
        self.results = {"tool": "bench.gpucheck", "mode": "rehearsal" if p.rehearse else "gpu", "kind": kind,
                        "command": "python -m bench.gpucheck " + " ".join(sys.argv[1:]),
                        "started": _now(), "finished": False, "budget_s": sum(p.caps[s] for s in stages),
                        "stages": {s: {"status": "pending", "cap_s": p.caps[s]} for s in stages}}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cache is not None and self.cache.exists() and self.cache.resolve() == (out / self.archive).resolve():
            self.cache = self.cache.replace(self.work / self.archive)  # the last check's, about to be replaced
        for name in OUTPUTS + (self.archive,):  # nothing of an earlier check may pass for this one's
            (self.out / name).unlink(missing_ok=True)
        (self.out / "log.txt").write_text("")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, until: float | None = None) -> float:
        return (self.deadline if until is None else until) - self.elapsed()

    def save(self) -> None:
        self.results |= {"updated": _now(), "elapsed_s": round(self.elapsed(), 1)}
        for name, text in (("results.json", json.dumps(self.results, indent=2, default=str) + "\n"),
                           ("summary.md", summary(self.results))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)  # a reader never sees half a file

    def inductor_env(self) -> dict:
        """Inductor keeps its Triton kernels in its own cache (bundled into its FX-graph entries,
        not packed twice), not in the JIT cache the other stages share."""
        return {k: v for k, v in self.env.items() if k != "TRITON_CACHE_DIR"}

    def restore_cache(self) -> None:
        """Unpack this kind's archive (what an earlier check compiled); a bad archive costs only
        its graphs: the check goes on cold rather than lose a lent GPU's minutes."""
        root = self.work / "cache"
        try:
            rec = compile_cache.restore(self.cache, root)
        except compile_cache.CacheError as e:
            shutil.rmtree(root, ignore_errors=True)
            rec = {"restored": False, "note": f"refused, compiling cold: {e}"}
        self.results["compile_cache"] = {"archive": str(self.cache), "restore": rec}
        print(f"[gpucheck] compile cache: {cache_note(self.results['compile_cache'])}", flush=True)
        self.save()

    def pack_cache(self) -> None:
        """Everything compiled so far, to ``--out`` for the next check (also after an interrupt)."""
        t0 = time.perf_counter()
        rec = compile_cache.pack(self.work / "cache", self.out / self.archive,
                                 skip=() if self.p.rehearse else compile_cache.bundled_skip())
        self.results["compile_cache"]["pack"] = rec | {"seconds": round(time.perf_counter() - t0, 1),
                                                       "archive": self.archive}
        print(f"[gpucheck] compile cache: {cache_note(self.results['compile_cache'])}", flush=True)
        self.save()

    def stage(self, name: str, fn) -> None:
        rec = self.results["stages"][name]
        self.deadline += self.p.caps[name]
        rec |= {"status": "running", "started_s": round(self.elapsed(), 1), "deadline_s": round(self.deadline, 1)}
        self.save()
        print(f"[gpucheck] {name}: up to {self.left():.0f} s", flush=True)
        t0 = time.perf_counter()
        try:
            status, note, result = fn(self, rec)
        except Interrupted:
            rec |= {"status": "interrupted", "seconds": round(time.perf_counter() - t0, 1)}
            self.save()
            raise
        except Exception as e:  # a bug of this script must not cost the stages after it
            status, note, result = "failed", f"{type(e).__name__}: {e}", {"traceback": traceback.format_exc()}
        rec |= {"status": status, "seconds": round(time.perf_counter() - t0, 1), "note": note, "result": result}
        self.save()
        print(f"[gpucheck] {name}: {status} in {rec['seconds']:.0f} s{': ' + note if note else ''}", flush=True)

    def sh(self, name: str, cmd: list[str], until: float | None = None,
           env: dict | None = None) -> tuple[int | None, float, str]:
        """Run ``cmd`` from the checkout until the deadline: (exit status or None when stopped at the
        cap, seconds, its output).  Its own process group, so a stop reaches its children too."""
        log, t0 = self.work / "logs" / f"{name}.log", time.perf_counter()
        if self.left(until) <= 0:
            return None, 0.0, "not started: no time left before the cap"
        with open(log, "wb") as f:
            # its own process group (not session: whatever ends this process's session ends it too)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    process_group=0)
            try:
                rc = proc.wait(timeout=self.left(until))
            except subprocess.TimeoutExpired:
                rc = None
                _stop(proc)
            except BaseException:  # this process is being stopped (Interrupted): its child goes first
                _stop(proc)
                raise
        text = log.read_bytes()[-LOG_TAIL:].decode(errors="replace")
        with open(self.out / "log.txt", "a") as f:
            f.write(f"\n===== {name}: {' '.join(cmd)}\n===== exit {rc}, {time.perf_counter() - t0:.1f} s\n{text}")
        return rc, time.perf_counter() - t0, text


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's group (train checkpoints on it), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class Interrupted(Exception):
    """SIGTERM/SIGINT to the check (the device call's time limit): stop, keep what was measured."""


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where results.json, summary.md, log.txt, train_metrics.jsonl (and ncu.txt) are written")
    p.add_argument("--rehearse", action="store_true", help="the same stages on the CPU at the smoke preset (CI)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                   help=f"stages to run, always in this order: {', '.join(STAGES)} (default: all)")
    p.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time cap (repeatable), e.g. --cap inductor=400")
    p.add_argument("--work", type=Path, default=None, metavar="DIR",
                   help="training run, logs, traces, Nsight report (default: a temporary directory, removed at the end)")
    p.add_argument("--commit", default=None,
                   help="the commit under test, recorded when the checkout has no .git (the device machine's copy)")
    p.add_argument("--compile-threads", type=int, default=os.cpu_count() or 1,
                   help="Inductor's compile threads (default: the machine's cores)")
    p.add_argument("--compile-cache", type=Path, default=None, metavar="DIR",
                   help=f"a folder of earlier checks' archives, one per GPU kind ({compile_cache.PREFIX}KIND.tar.gz): "
                        "this GPU's is restored into the check's own Inductor and Triton caches (absent: a cold "
                        "start), which are packed to --out under the same name at the end (default: the usual "
                        "caches, nothing packed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        fail(f"--stages {' '.join(bad)}: unknown; valid: {', '.join(STAGES)}")
    p = plan(args.rehearse)
    for item in args.cap:
        name, _, secs = item.partition("=")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if name not in STAGES or not 0 < value < math.inf:
            fail(f"--cap {item!r}: must be STAGE=SECONDS with STAGE one of {', '.join(STAGES)} and SECONDS > 0")
        p.caps[name] = value
    if args.compile_threads < 1:
        fail(f"--compile-threads {args.compile_threads}: must be >= 1")
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            fail("no CUDA device here; valid here: --rehearse (the same stages on the CPU at the smoke preset)")
    if args.compile_cache is not None and args.compile_cache.exists() and not args.compile_cache.is_dir():
        fail(f"--compile-cache {args.compile_cache}: not a folder; expected the folder of earlier checks' "
             f"{compile_cache.PREFIX}KIND.tar.gz archives")
    stages = [s for s in STAGES if s in args.stages]
    work = args.work or Path(tempfile.mkdtemp(prefix="gpucheck-"))
    kind = "cpu" if args.rehearse else compile_cache.this_kind()
    c = Check(p, args.out, work, stages, args.commit, args.compile_threads, args.compile_cache, kind)

    def interrupt(signum, _frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        c.save()
        if c.cache is not None:
            c.restore_cache()
        for s in stages:
            c.stage(s, RUNNERS[s])
        c.results["finished"] = True
        c.save()
    except Interrupted as e:
        print(f"[gpucheck] interrupted by signal {e}: results so far in {args.out}", file=sys.stderr)
        code = 128 + int(e.args[0])
    finally:
        if c.cache is not None and "compile_cache" in c.results:
            c.pack_cache()
        for s, h in old.items():
            signal.signal(s, h)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(c.results))
    if code:
        return code
    return 0 if all(r["status"] in ("ok", "skipped") for r in c.results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
