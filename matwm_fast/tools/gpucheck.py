"""One command that proves and times the whole fast path on a GPU: ``python -m matwm_fast.gpucheck``.

    python -m matwm_fast.gpucheck --out DIR --commit SHA       # on a lent GPU (bench/README.md)
    python -m matwm_fast.gpucheck --out DIR --rehearse         # the same stages on the CPU (CI)

A GPU is lent rarely and briefly, so nothing here may need debugging there: the stages run in
order, each in subprocesses under its own time cap, and the results (``results.json`` and
``summary.md``) are written to ``--out`` before and after every stage (and after every speed
variant), so a run cut short still returns what it measured.  A stage that fails or runs out of
time never stops the next one.

1. ``env``    GPU name, SMs, memory, driver, torch/triton/CUDA versions, commit, tools present;
2. ``tests``  the kernel tests natively on CUDA (Triton against the reference for every op,
              forward and backward, fp32 and bf16; not the interpreter) and the ``gpu``-marked tests;
3. ``speed``  ``matwm_fast.profile`` at the ``paper`` preset on simple_tag for ``eager:ref``,
              ``eager:triton``, ``compile`` and ``cudagraphs``, one process each on the same warm
              machine: ms per env step and per phase, imagined steps/s, model FLOP/s and fraction
              of the measured matmul peak, peak GPU memory, warm-up (compilation) time;
4. ``train``  a real run, ``python -m matwm_fast.train --preset paper --backend auto`` for 1,500
              env steps (1,000 of them warm-up): finite losses, the 16 / 36,864 budget counters in
              every update row, a checkpoint that loads;
5. ``ncu``    Nsight Compute on the first imagination kernels of one ``compile`` step, inside the
              profiler's NVTX ranges; its per-kernel summary is kept (skipped where ``ncu`` is absent).

This module is the runner (plan, clock, subprocesses, results, CLI); what each stage runs and how
it judges the outcome is :mod:`matwm_fast.tools.gpustages`.

Caps (seconds, :data:`GPU_CAPS`): env 10, tests 140, speed 240, train 60, ncu 50 — 500 in all, so
a whole run fits a 540-second device call.  The first GPU run (bench/results/gpu/, 2026-11-27) spent
them on compilation: every compiled process ran out of time, so each cold compile is now paid once
(``cudagraphs`` then ``train``, ``compile`` then ``ncu`` share their Inductor graphs), the rollout
compiles per step on CUDA (``run.rollout_graph``), and ``cudagraphs`` goes before ``compile``.  A stage's deadline is the sum of the
caps up to it: it may use what earlier stages left unused, never what later ones are owed.  All
processes share Inductor's cache directory, so later stages reuse what earlier ones compiled, and
compile with as many threads as the machine has cores.

The second GPU run (an H200, 2026-11-28) ran out of time compiling in the same places, so
``--compile-cache FILE`` carries Inductor's cache from one lent GPU to the next
(:mod:`matwm_fast.tools.compile_cache`): restored before the stages, packed to ``--out`` after them.

``--rehearse`` runs the same stages on the CPU at the ``smoke`` preset, with the kernels in
Triton's interpreter and the ``cudagraphs`` variant replaced by a check that it is refused clearly;
``tests/tools/test_gpucheck.py`` runs it in CI so this script cannot rot between GPUs.
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

from ..cli import fail
from . import compile_cache
from .gpustages import RUNNERS

ROOT = Path(__file__).resolve().parents[2]  # the checkout: stages run its tests and modules
STAGES = ("env", "tests", "speed", "train", "ncu")
GPU_CAPS = {"env": 10, "tests": 140, "speed": 240, "train": 60, "ncu": 50}
# the CPU rehearsal's caps only catch a hang: a fresh Inductor cache costs ~100 s of compilation there
REHEARSAL_CAPS = {"env": 60, "tests": 300, "speed": 600, "train": 180, "ncu": 240}
LOG_TAIL = 1 << 20  # bytes of each command's output kept in log.txt
# what a check writes to --out (a device call returns at most 8 files)
OUTPUTS = ("results.json", "summary.md", "log.txt", "train_metrics.jsonl", "ncu.txt", "imagine.ncu-rep",
           compile_cache.ARCHIVE)


@dataclass
class Plan:
    """What the stages run: the GPU check, or its CPU rehearsal."""

    rehearse: bool
    preset: str
    device: str
    variants: tuple[tuple[str, float], ...]  # speed: (variant, share of the stage's cap)
    refused: tuple[str, ...]  # speed: variants that must be refused with a clear error
    speed_steps: int
    speed_warmup: int
    train_steps: int
    log_every: int
    ncu_variant: str = "compile"
    ncu_launches: int = 20
    caps: dict = field(default_factory=dict)

    def args(self) -> list[str]:
        """Flags every profile/train subprocess gets."""
        return ["--preset", self.preset, "--scenario", "simple_tag", "--device", self.device] + (
            ["--threads", "1"] if self.rehearse else [])  # a shared 2-core CPU: one thread waits least


def plan(rehearse: bool) -> Plan:
    if rehearse:
        return Plan(True, "smoke", "cpu", (("eager:ref", 1), ("eager:triton", 1), ("compile", 4)), ("cudagraphs",),
                    speed_steps=2, speed_warmup=1, train_steps=60, log_every=10, caps=dict(REHEARSAL_CAPS))
    # cudagraphs first: what training runs on CUDA, and the train stage reuses its compiled graphs
    return Plan(False, "paper", "cuda", (("eager:ref", 25), ("eager:triton", 25), ("cudagraphs", 100), ("compile", 90)),
                (), speed_steps=20, speed_warmup=3, train_steps=1500, log_every=100, caps=dict(GPU_CAPS))


# ----------------------------------------------------------------------------------- the runner
class Check:
    """Runs the stages against a shared clock and keeps ``results.json``/``summary.md`` current."""

    def __init__(self, p: Plan, out: Path, work: Path, stages: list[str], commit: str | None, threads: int,
                 cache: Path | None = None):
        self.p, self.out, self.work, self.commit, self.threads, self.cache = p, out, work, commit, threads, cache
        self.t0, self.deadline = time.perf_counter(), 0.0
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
        if cache is not None:  # a cache of this check's own, restored from and packed to an archive
            self.env["TORCHINDUCTOR_CACHE_DIR"] = str(self.work / "inductor")
        if p.rehearse:  # Triton in its interpreter; one OpenMP thread on a shared CPU
            self.env |= {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        else:  # natively on CUDA, whatever the caller's shell says
            self.env.pop("TRITON_INTERPRET", None)
        self.results = {"tool": "matwm_fast.gpucheck", "mode": "rehearsal" if p.rehearse else "gpu",
                        "command": "python -m matwm_fast.gpucheck " + " ".join(sys.argv[1:]),
                        "started": _now(), "finished": False, "budget_s": sum(p.caps[s] for s in stages),
                        "stages": {s: {"status": "pending", "cap_s": p.caps[s]} for s in stages}}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        if cache is not None and cache.exists() and cache.resolve() == (out / compile_cache.ARCHIVE).resolve():
            self.cache = cache.replace(self.work / compile_cache.ARCHIVE)  # the last check's, about to be replaced
        for name in OUTPUTS:  # nothing of an earlier check may pass for this one's
            (self.out / name).unlink(missing_ok=True)
        (self.out / "log.txt").write_text("")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, until: float | None = None) -> float:
        return (self.deadline if until is None else until) - self.elapsed()

    def save(self) -> None:
        self.results |= {"updated": _now(), "elapsed_s": round(self.elapsed(), 1)}
        for name, text in (("results.json", json.dumps(self.results, indent=2) + "\n"),
                           ("summary.md", summary(self.results))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)  # a reader never sees half a file

    def restore_cache(self) -> None:
        """Unpack ``--compile-cache`` (what an earlier check compiled); a bad archive costs only its
        graphs: the check goes on cold rather than lose a lent GPU's minutes."""
        cache_dir = Path(self.env["TORCHINDUCTOR_CACHE_DIR"])
        try:
            rec = compile_cache.restore(self.cache, cache_dir)
        except compile_cache.CacheError as e:
            shutil.rmtree(cache_dir, ignore_errors=True)
            rec = {"restored": False, "note": f"refused, compiling cold: {e}"}
        self.results["compile_cache"] = {"archive": str(self.cache), "restore": rec}
        print(f"[gpucheck] compile cache: {_cache_note(self.results['compile_cache'])}", flush=True)
        self.save()

    def pack_cache(self) -> None:
        """Everything compiled so far, to ``--out`` for the next check (also after an interrupt)."""
        t0 = time.perf_counter()
        rec = compile_cache.pack(Path(self.env["TORCHINDUCTOR_CACHE_DIR"]), self.out / compile_cache.ARCHIVE,
                                 skip=() if self.p.rehearse else compile_cache.bundled_skip())
        self.results["compile_cache"]["pack"] = rec | {"seconds": round(time.perf_counter() - t0, 1)}
        print(f"[gpucheck] compile cache: {_cache_note(self.results['compile_cache'])}", flush=True)
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

    def sh(self, name: str, cmd: list[str], until: float | None = None) -> tuple[int | None, float, str]:
        """Run ``cmd`` from the checkout until the deadline: (exit status or None when stopped at the
        cap, seconds, its output).  Its own process group, so a stop reaches its children too."""
        log, t0 = self.work / "logs" / f"{name}.log", time.perf_counter()
        if self.left(until) <= 0:
            return None, 0.0, "not started: no time left before the cap"
        with open(log, "wb") as f:
            # its own process group (not session: whatever ends this process's session ends it too)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, process_group=0)
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


def _cache_note(rec: dict) -> str:
    r, p = rec["restore"], rec.get("pack")
    note = (f"restored {r['files']} files ({r['mib']} MiB) from {rec['archive']}" if r["restored"] else r["note"])
    if p:
        note += (f"; packed {p['files']} files ({p['raw_mib']} MiB, {p['mib']} MiB compressed) to "
                 f"{compile_cache.ARCHIVE}" + (f", {p['left_out']} left out (over budget)" if p["left_out"] else ""))
    return note


class Interrupted(Exception):
    """SIGTERM/SIGINT to the check (the device call's time limit): stop, keep what was measured."""


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------- the summary
def summary(res: dict) -> str:
    """``summary.md``: what ran where, each stage's outcome, the speed table, what failed."""
    st = res["stages"]
    env = st.get("env", {}).get("result") or {}
    head = (f"Started {res['started']}, updated {res.get('updated')}: {res.get('elapsed_s')} s of a "
            f"{res['budget_s']} s budget{'' if res['finished'] else ' (**not finished**)'}.  "
            f"Commit {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}; torch {env.get('torch')}, "
            f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}; "
            f"{env.get('sms', '-')} SMs, {env.get('memory_gib', '-')} GiB; {env.get('cpu_cores')} CPU cores.")
    out = [f"# GPU check ({res['mode']}): {env.get('gpu') or env.get('device_name', '?')}", "", head, "",
           f"Command: `{res['command']}`", "", "| stage | status | seconds | cap | note |", "|---|---|---:|---:|---|"]
    out += [f"| {n} | {r['status']} | {r.get('seconds', '')} | {r['cap_s']} | {r.get('note') or ''} |"
            for n, r in st.items()]
    if res.get("compile_cache"):
        out += ["", f"Compile cache: {_cache_note(res['compile_cache'])}."]
    speed = (st.get("speed") or {}).get("result") or {}
    if speed.get("variants"):
        out += ["", "## Speed", "", "| variant | status | kernels | amp | ms/step | median | imagine ms | wm_update ms | "
                "ac_update ms | imagined steps/s | imagine % of peak | peak MiB | warm-up s | process s |",
                "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v, r in speed["variants"].items():
            f = r.get("figures")
            if not f:
                out.append(f"| {v} | {r['status']} | {r.get('message', '')} |" + " |" * 11)
                continue
            frac = (f.get("peak_fraction") or {}).get("imagine")
            out.append(f"| {v} | ok | {f['runtime']['kernels']} | {f['runtime']['amp']} | {f['step_ms']:.2f} | "
                       f"{f['step_ms_median']:.2f} | {f['phases_ms']['imagine']:.2f} | {f['phases_ms']['wm_update']:.2f} | "
                       f"{f['phases_ms']['ac_update']:.2f} | {f['imagined_steps_per_s']:,.0f} | "
                       f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {f['peak_memory_mib']:,.0f} | "
                       f"{f['warmup_s']:.1f} | {r['seconds']:.0f} |")
        firsts = [f"- `{v}`: " + ", ".join(f"{k} {x:.1f}" for k, x in r["figures"]["first_step_s"].items())
                  for v, r in speed["variants"].items() if (r.get("figures") or {}).get("first_step_s")]
        if firsts:
            out += ["", "Seconds of each phase of the first training step (compilation and capture):", ""] + firsts
        if speed.get("tables_md"):
            out += ["", "<details><summary>per-phase tables</summary>", "", speed["tables_md"], "</details>"]
    for name, r in st.items():  # what went wrong: failing tests, the end of each failed command's output
        if r["status"] in ("ok", "skipped", "pending"):
            continue
        res_ = r.get("result") or {}
        parts = [res_] + [x for x in (res_.get("variants") or res_).values() if isinstance(x, dict)]
        out += ["", f"## {name}: {r['status']}", ""] + [f"- `{f['test']}`: {f['message']}" for x in parts
                                                         for f in x.get("failures", [])]
        out += [f"```\n{x['tail'][-1500:]}\n```" for x in parts if x.get("tail")]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from ..cli import Parser

    p = Parser(prog="python -m matwm_fast.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where results.json, summary.md, log.txt, train_metrics.jsonl (and ncu.txt) are written")
    p.add_argument("--rehearse", action="store_true", help="the same stages on the CPU at the smoke preset (CI)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                   help=f"stages to run, always in this order: {', '.join(STAGES)} (default: all)")
    p.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time cap (repeatable), e.g. --cap speed=400")
    p.add_argument("--work", type=Path, default=None, metavar="DIR",
                   help="training run, logs, Nsight report (default: a temporary directory, removed at the end)")
    p.add_argument("--commit", default=None,
                   help="the commit under test, recorded when the checkout has no .git (the device machine's copy)")
    p.add_argument("--compile-threads", type=int, default=os.cpu_count() or 1,
                   help="Inductor's compile threads (default: the machine's cores)")
    p.add_argument("--compile-cache", type=Path, default=None, metavar="FILE.tar.gz",
                   help=f"an earlier check's {compile_cache.ARCHIVE}: restored into this check's own Inductor cache "
                        f"(absent: a cold start), which is packed to --out/{compile_cache.ARCHIVE} at the end "
                        "(default: Inductor's usual cache, nothing packed)")
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
    if args.compile_cache is not None and args.compile_cache.exists() and not args.compile_cache.is_file():
        fail(f"--compile-cache {args.compile_cache}: not a file; expected an earlier check's {compile_cache.ARCHIVE}")
    stages = [s for s in STAGES if s in args.stages]
    work = args.work or Path(tempfile.mkdtemp(prefix="gpucheck-"))
    c = Check(p, args.out, work, stages, args.commit, args.compile_threads, args.compile_cache)

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
