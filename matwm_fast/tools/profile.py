"""Where the time of one training env step goes, per backend: ``python -m matwm_fast.profile``.

    python -m matwm_fast.profile --preset cpu --backend eager compile --steps 20 --json out.json
    python -m matwm_fast.profile --preset paper --backend eager:ref eager:triton compile cudagraphs

A *variant* is a backend with an optional kernel choice, ``BACKEND[:KERNELS]`` (``eager:triton``:
the eager backend on the Triton kernels); without one the kernels are ``--kernels``'s (default
``auto``).  For each variant: build a Trainer, fill the replay past warm-up (random actions, as
the trainer does before ``warm``), run ``--warmup-steps`` training steps (torch.compile / CUDA-graph capture
happen here and are reported separately, never in the steady-state figures), then time ``--steps``
steady-state env steps.  Each phase of the step (the names of :mod:`matwm_fast.nvtx`: act, env,
replay_sample, wm_update, imagine, ac_update) is timed between two device synchronisations; the
syncs cost a little overlap on CUDA, which is acceptable for a profiler and what makes the phase
shares mean something.  ``other`` is the rest of the step (replay writes, bookkeeping).

Each phase's model FLOPs are counted analytically (:mod:`matwm_fast.tools.flops`), and the
device's own matmul peak is measured at start (a large fp32 and bf16 product): the tables give
the FLOP/s each phase achieves and its fraction of the peak of the precision it runs in.

After the timed steps, one more step per variant is counted by dispatch
(:mod:`matwm_fast.tools.launches`): its kernel launches per phase, the budget that CUDA graphs and
fusions are judged by (``--no-launches`` skips it; compiled and captured steps dispatch no aten
ops and are not counted).  ``--fake`` costs a step without running it: launches, bytes and FLOPs
per phase of the CUDA step under fake tensors, in seconds on any machine
(:mod:`matwm_fast.tools.budget`).

The phases are timed through the listener hook of :mod:`matwm_fast.nvtx` (the same ``phase``
marks that emit NVTX ranges), so the steps measured are exactly ``Trainer.train_step`` — no
copy of the training loop lives here to drift from the real one.

Backends run one after the other (one trainer alive at a time, so each peak memory is its own);
``--interleave`` builds them all first and alternates their timed steps, so that on a machine shared
with other work a burst of load slows every backend alike and the speed-ups stay fair.

``--torch-profiler DIR`` writes a chrome trace of a few extra steady steps per backend;
``--nsys`` brackets the steady steps with cudaProfilerStart/Stop and switches the NVTX ranges on,
for ``nsys profile --capture-range=cudaProfilerApi``.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from .. import config, kernels, nvtx
from ..cli import Parser, add_config_flags, config_from, describe, fail, overrides
from ..config import PRESETS
from ..runtime import resolve_backend, resolve_device, resolve_kernels
from . import budget, flops, launches
from . import report as report_
from .harness import SteadyTrainer, sync
from .report import giga

BACKENDS = config.BACKENDS
KERNELS = (*kernels.IMPLS, "auto")

PHASES = nvtx.PHASES + ("other",)


# ----------------------------------------------------------------------------------- phase timer
class PhaseTimer:
    """Times the trainer's phases while installed; each phase still emits its NVTX range."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)  # phase → summed seconds

    @contextlib.contextmanager
    def _phase(self, name: str):
        sync(self.device)  # work queued by the previous phase is not this one's
        t0 = time.perf_counter()
        try:
            with nvtx.nvtx_range(name):
                yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t0

    @contextlib.contextmanager
    def installed(self):
        nvtx.set_listener(self._phase)
        try:
            yield self
        finally:
            nvtx.set_listener(None)


# ----------------------------------------------------------------------------------- variants
def parse_variant(text: str) -> tuple[str, str | None]:
    """``BACKEND[:KERNELS]`` → (backend, kernels or None for ``--kernels``'s choice); a ValueError
    names what is allowed."""
    backend, _, kern = text.partition(":")
    if backend not in BACKENDS:
        raise ValueError(f"--backend {text!r}: valid: {', '.join(BACKENDS)}, each optionally with "
                         f":{', :'.join(KERNELS)} for the kernels (e.g. eager:triton)")
    if ":" in text and kern not in KERNELS:
        raise ValueError(f"--backend {text!r}: the kernels after ':' must be one of {', '.join(KERNELS)}")
    return backend, kern or None


def range_name(variant: str) -> str:
    """The NVTX range around a timed step: no '/' (Nsight Compute's --nvtx-include nests on it)
    and no ':' in it."""
    return "train_step_" + variant.replace(":", "_")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what it is): the CUDA allocator's peak, or on the CPU the process' peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    # ru_maxrss never decreases: later backends in one run include the earlier ones' peak
    return mib, "process peak RSS"


# ----------------------------------------------------------------------------------- one backend
class BackendRun:
    """One variant's trainer: built, replay filled, warmed up; then timed step by step."""

    def __init__(self, cfg, variant: str, device: torch.device, warmup_steps: int, log=print):
        self.backend, kern = parse_variant(variant)
        self.variant, self.device, self.warmup_steps = variant, device, warmup_steps
        w = SteadyTrainer.build(cfg, warmup_steps, backend=self.backend, device=str(device),
                                kernels=kern or cfg.run.kernels)
        self.tr, self.fill_s, self.warmup_s, self.cfg = w.tr, w.fill_s, w.warmup_s, w.tr.cfg
        self.first_step_s = w.first_step_s
        first = ", ".join(f"{k} {v:.1f}" for k, v in w.first_step_s.items())
        log(f"[{variant}] {self.tr.rt.describe()}: replay filled in {self.fill_s:.1f} s; {warmup_steps} warm-up "
            f"steps in {self.warmup_s:.1f} s (compilation included; the first step's phases, s: {first or '-'})")
        self.timer = PhaseTimer(device)
        self.step_s: list[float] = []
        self.launches: dict | None = None  # the counted step's ops per phase (launches.LaunchCounter)

    def timed_step(self, capture: bool) -> None:
        with self.timer.installed():
            sync(self.device)
            t0 = time.perf_counter()
            with (torch.cuda.nvtx.range(range_name(self.variant)) if capture else contextlib.nullcontext()):
                self.tr.train_step()
            sync(self.device)
            self.step_s.append(time.perf_counter() - t0)

    def count_launches(self, log=print) -> None:
        """Kernel launches of one more steady step, counted by dispatch (after the timed steps: the
        counter slows the host).  Only where the step dispatches its ops one by one."""
        if not launches.countable(self.backend, self.device):
            log(f"[{self.variant}] kernel launches not counted: a compiled or captured step dispatches no aten ops")
            return
        self.launches = launches.count_step(self.tr).report()
        self.launches["policy"] = self.device.type  # the device's own autocast policy and defaults: what ran
        log(f"[{self.variant}] {self.launches['step']['kernels']:,} kernel launches per env step "
            f"({self.launches['step']['dispatched']:,} ops dispatched)")

    def trace(self, trace_dir: Path, steps: int, log=print) -> None:
        """A torch.profiler chrome trace of a few more steps (after the timed ones: it slows them)."""
        trace_dir.mkdir(parents=True, exist_ok=True)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                self.tr.train_step()
            sync(self.device)
        tag = self.variant.replace(":", "-")
        path = trace_dir / f"trace-{tag}.json"
        prof.export_chrome_trace(str(path))
        sort = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        (trace_dir / f"ops-{tag}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
        log(f"[{self.variant}] torch.profiler chrome trace: {path} (chrome://tracing or ui.perfetto.dev)")

    def summary(self, mem: tuple[float, str], log=print, peaks: dict[str, float] | None = None) -> dict:
        tr, steps, step_s = self.tr, len(self.step_s), self.step_s
        tr.check_finite()
        mean = statistics.fmean(step_s)
        phase_ms = {p: 1e3 * self.timer.seconds.get(p, 0.0) / steps for p in nvtx.PHASES}
        phase_ms["other"] = max(0.0, 1e3 * mean - sum(phase_ms.values()))
        missing = [p for p in nvtx.PHASES if p not in self.timer.seconds]
        if missing:  # e.g. the trainer stopped marking a phase: say so rather than report 0 silently
            log(f"[{self.variant}] warning: phases never entered: {', '.join(missing)}")
        imag_ms = phase_ms["imagine"]
        budget = {"agents": tr.n, "wm_batch": self.cfg.wm.batch_size, "wm_seq_len": self.cfg.wm.seq_len,
                  "imag_batch_per_agent": self.cfg.ac.imag_batch, "horizon": self.cfg.ac.horizon,
                  "imagined_per_update": tr.imagined_per_update}  # SPEC §1 as this config sets it
        step_flops = flops.step_flops(self.cfg, tr.spec)
        return {
            "backend": self.backend, "runtime": tr.rt.describe(), "budget": budget,
            "steps": steps, "warmup_steps": self.warmup_steps,
            "fill_s": round(self.fill_s, 3), "warmup_s": round(self.warmup_s, 3), "first_step_s": self.first_step_s,
            "step_ms": 1e3 * mean, "step_ms_median": 1e3 * statistics.median(step_s),
            "step_ms_min": 1e3 * min(step_s), "step_ms_std": 1e3 * (statistics.stdev(step_s) if steps > 1 else 0.0),
            "step_ms_each": [round(1e3 * t, 3) for t in step_s],  # stalls of a shared machine show here
            "phases_ms": phase_ms,
            "share": {p: (v / (1e3 * mean) if mean > 0 else 0.0) for p, v in phase_ms.items()},
            "env_steps_per_s": 1.0 / mean,
            # imagined steps per second of whole training, and of the imagination phase alone
            "imagined_steps_per_s": tr.imagined_per_update / mean,
            "imagine_phase_steps_per_s": tr.imagined_per_update / (imag_ms / 1e3) if imag_ms > 0 else None,
            "peak_memory_mib": round(mem[0], 1), "peak_memory_kind": mem[1],
            "flops_per_step": step_flops,
            "launches": self.launches,
        } | flops.rates(step_flops, phase_ms, tr.rt.amp, peaks)


def time_steps(runs: list[BackendRun], steps: int, use_nsys: bool) -> None:
    """``steps`` timed steps of each run, round-robin (one run: just its steps), inside the nsys range."""
    device = runs[0].device
    capture = use_nsys and device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if capture:
        torch.cuda.cudart().cudaProfilerStart()
    try:
        for _ in range(steps):
            for r in runs:
                r.timed_step(capture)
    finally:
        if capture:
            torch.cuda.cudart().cudaProfilerStop()


def profile_backends(cfg, backends: list[str], device: torch.device, steps: int, warmup_steps: int,
                     trace_dir: Path | None = None, use_nsys: bool = False, interleave: bool = False,
                     log=print, peaks: dict[str, float] | None = None, count: bool = True) -> dict[str, dict]:
    """Per-variant figures (``backends``: variant names, ``BACKEND[:KERNELS]``).  Sequential by default: one trainer alive at a time, so each backend's
    peak memory is its own.  ``interleave``: all trainers built first, then their steps alternate,
    so a time-varying load (a shared machine) hits every backend alike and the ratios stay fair.
    ``count``: one more step per variant with its kernel launches counted (after the timed ones)."""
    out = {}
    if interleave:
        runs = [BackendRun(cfg, b, device, warmup_steps, log) for b in backends]
        time_steps(runs, steps, use_nsys)
        mem, kind = peak_memory(device)
        for r in runs:
            if count:
                r.count_launches(log)
            out[r.variant] = r.summary((mem, kind + ", all backends together (--interleave)"), log, peaks)
            if trace_dir is not None:
                r.trace(trace_dir, min(3, steps), log)
        return out
    for b in backends:
        r = BackendRun(cfg, b, device, warmup_steps, log)
        time_steps([r], steps, use_nsys)
        mem = peak_memory(device)
        if count:
            r.count_launches(log)
        out[b] = r.summary(mem, log, peaks)
        if trace_dir is not None:
            r.trace(trace_dir, min(3, steps), log)
        del r  # free this backend's trainer before the next one is measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------- reporting
def format_tables(report: dict, markdown: bool = False) -> str:
    """One table per backend, then the side-by-side comparison (plain text or markdown)."""
    def table(header, rows):
        return report_.table(header, rows, markdown)

    def kernels(r, p):  # the counted step's kernel launches in phase p ("step": all), "-" if not counted
        n = r.get("launches")
        return "-" if not n else f"{(n['step'] if p == 'step' else n['phases'][p])['kernels']:,}"

    out = []
    res = report["backends"]
    step_flops = report.get("flops_per_step", {})
    peaks = report.get("matmul_peak_flops_per_s") or {}
    for name, r in res.items():
        fr, frac, prec = r.get("flops_per_s", {}), r.get("peak_fraction", {}), r.get("phase_precision", {})
        rows = [[p, f"{r['phases_ms'][p]:.2f}", f"{100 * r['share'][p]:.1f}%",
                 giga(step_flops.get(p)), giga(fr.get(p)),
                 f"{100 * frac[p]:.1f}% {prec[p]}" if frac.get(p) is not None else "-", kernels(r, p)] for p in PHASES]
        total = sum(step_flops.values())
        rows.append(["step (total)", f"{r['step_ms']:.2f}", "100.0%", giga(total), giga(total / (r["step_ms"] / 1e3)),
                     "-", kernels(r, "step")])
        ips = r["imagine_phase_steps_per_s"]
        ips = f"{ips:,.0f}" if ips else "-"
        rt = r.get("runtime") or {}
        title = (f"backend {name}: {report['preset']} preset on {report['device_name']}, {r['steps']} steady steps"
                 + (f" (kernels {rt['kernels']}, amp {rt['amp']})" if rt else "")
                 + (", interleaved with the other backends" if report.get("interleaved") else ""))
        out += [f"### {title}" if markdown else f"== {title} ==", "",
                table(["phase", "ms/step", "share", "GFLOP/step", "GFLOP/s", "of peak", "kernels"], rows), "",
                f"env steps/s {r['env_steps_per_s']:.2f} | imagined steps/s {r['imagined_steps_per_s']:,.0f} "
                f"({report['budget']['imagined_per_update']:,} per env step) | imagination phase alone "
                f"{ips} steps/s | step median {r['step_ms_median']:.2f} ms, std {r['step_ms_std']:.2f} ms | "
                f"peak memory {r['peak_memory_mib']:,.0f} MiB ({r['peak_memory_kind']}) | warm-up "
                f"{r['warmup_s']:.1f} s for {r['warmup_steps']} steps (compilation included)"
                + (" | matmul peak " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()) if peaks else "")
                + (f" | kernels: launches of one more step, counted by dispatch "
                   f"({r['launches']['step']['dispatched']:,} ops dispatched, as the {r['launches']['policy']} "
                   "runs them)" if r.get("launches") else ""),
                ""]
    names = list(res)
    if len(names) > 1:
        base = names[0]
        header = ["phase"] + [f"{n} ms" for n in names] + [f"{n} speed-up vs {base}" for n in names[1:]]
        rows = []
        for p in PHASES + ("step",):
            ms = [res[n]["step_ms"] if p == "step" else res[n]["phases_ms"][p] for n in names]
            ratios = [f"{ms[0] / m:.2f}x" if m > 0 else "-" for m in ms[1:]]
            rows.append([p] + [f"{m:.2f}" for m in ms] + ratios)
        # the median resists the stalls of a shared machine better than the mean
        med = [res[n]["step_ms_median"] for n in names]
        rows.append(["step (median)"] + [f"{m:.2f}" for m in med] + [f"{med[0] / m:.2f}x" for m in med[1:]])
        rows.append(["kernel launches"] + [kernels(res[n], "step") for n in names] + [""] * (len(names) - 1))
        rows.append(["imagined steps/s"] + [f"{res[n]['imagined_steps_per_s']:,.0f}" for n in names]
                    + [f"{res[n]['imagined_steps_per_s'] / res[base]['imagined_steps_per_s']:.2f}x" for n in names[1:]])
        for p in ("imagine", "wm_update", "ac_update"):  # how far each variant is from the hardware
            frac = [res[n].get("peak_fraction", {}).get(p) for n in names]
            if any(f is not None for f in frac):
                rows.append([f"{p} % of peak"] + ["-" if f is None else f"{100 * f:.1f}%" for f in frac]
                            + [""] * (len(names) - 1))
        title = f"comparison (speed-up = {base} time / backend time; >1 is faster)"
        out += [f"### {title}" if markdown else f"== {title} ==", "", table(header, rows), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    # every config field stays a flag (--scenario, --seed, --wm.batch-size, ...); the profiler's own
    # --backend (several), --steps (steady steps) and --device replace the trainer's aliases
    p = Parser(prog="python -m matwm_fast.profile", description=__doc__.split("\n\n")[0],
               conflict_handler="resolve")
    add_config_flags(p)
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="sizes to profile (default: paper on CUDA, cpu otherwise)")
    p.add_argument("--backend", nargs="+", default=None, metavar="BACKEND[:KERNELS]",
                   help=f"variants to compare, first is the baseline: a backend ({', '.join(BACKENDS)}), optionally "
                        f"with the kernels after ':' ({', '.join(KERNELS)}; default --kernels), e.g. eager:ref "
                        "eager:triton compile (default: eager compile, + cudagraphs on CUDA)")
    p.add_argument("--steps", type=int, default=20, help="steady-state env steps timed per backend")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="training steps before timing (compilation, CUDA-graph capture; >= 3 for cudagraphs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 suffers least when other "
                        "processes compete for the cores (no OpenMP barrier waits on a descheduled thread)")
    p.add_argument("--torch-profiler", type=Path, default=None, metavar="DIR",
                   help="write a torch.profiler chrome trace of 3 extra steady steps per backend to DIR")
    p.add_argument("--nsys", action="store_true",
                   help="cudaProfilerStart/Stop around the steady steps and NVTX ranges on (for nsys)")
    p.add_argument("--interleave", action="store_true",
                   help="build every backend's trainer first, then alternate their timed steps: fair ratios "
                        "on a machine shared with other work (peak memory is then of all backends together)")
    p.add_argument("--peak-seconds", type=float, default=0.5,
                   help="seconds per precision spent measuring the device's matmul peak at start (0: skip it "
                        "and the fractions of peak)")
    p.add_argument("--no-launches", action="store_true",
                   help="skip the one extra step per variant whose kernel launches are counted by dispatch")
    p.add_argument("--fake", action="store_true",
                   help="instead of timing: cost one env step under fake tensors — kernel launches, bytes and "
                        "FLOPs per phase, in seconds, on any machine (python -m matwm_fast.profile --fake --help)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the figures as JSON")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the tables as markdown")
    return p


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Profile every requested backend; the report that --json writes."""
    try:
        device = resolve_device(args.device)
        name = args.preset or ("paper" if device.type == "cuda" else "cpu")
        cfg = config_from(name, overrides(args), args.scenario_args)
        backends = args.backend or (["eager", "compile"] + (["graphs", "cudagraphs"] if device.type == "cuda" else []))
        backends = list(dict.fromkeys(backends))  # a repeated name would overwrite its own figures
        for v in backends:  # refuse before any work: cudagraphs or Triton where they cannot run
            backend, kern = parse_variant(v)
            resolve_kernels(kern or cfg.run.kernels, device, resolve_backend(backend, device))
    except ValueError as e:
        fail(str(e))
    if args.nsys and device.type != "cuda":
        print("--nsys: no CUDA device, so no cudaProfilerStart/Stop capture range is opened; NVTX ranges "
              "are still emitted (through the nvtx package), but nsys's CUDA capture needs a GPU")
    report = report_.environment(device) | {"command": "python -m matwm_fast.profile " + " ".join(argv)}
    report |= {"preset": cfg.preset, "scenario": cfg.env.scenario, "config": describe(cfg).splitlines(),
               "backends": {}}
    peaks = None
    if args.peak_seconds > 0:  # before any trainer: the device to itself
        peaks = flops.measure_peaks(device, args.peak_seconds)
        print("matmul peak: " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()))
    report["matmul_peak_flops_per_s"] = peaks
    # restore the global switch afterwards: main() also runs in-process (tests)
    was_nvtx = nvtx.enabled()
    try:
        nvtx.enable(args.nsys or was_nvtx)
        res = profile_backends(cfg, backends, device, args.steps, args.warmup_steps, args.torch_profiler,
                               args.nsys, args.interleave, peaks=peaks, count=not args.no_launches)
    except ValueError as e:  # the config is refused when the trainer is built (validate)
        fail(str(e))
    finally:
        nvtx.enable(was_nvtx)
    for b, r in res.items():
        report["budget"] = r.pop("budget")  # the same for every variant,
        report["flops_per_step"] = r.pop("flops_per_step")  # as is the model's arithmetic
        report["backends"][b] = r
    report["interleaved"] = args.interleave
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--fake" in argv:  # the fake-tensor budget has flags of its own (several kernels and precisions)
        return budget.main([a for a in argv if a != "--fake"])
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        fail("--steps must be >= 1 and --warmup-steps >= 0")
    if not args.peak_seconds >= 0:
        fail(f"--peak-seconds {args.peak_seconds}: must be a number of seconds >= 0")
    if args.threads is not None:
        if args.threads < 1:
            fail("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    report = run(args, argv)
    print(format_tables(report))
    head = (f"Measured {report_.provenance(report)}; 1-min load average at start {report['load_avg_1m']}, a sign "
            f"of other processes sharing the cores.\n\nCommand: `{report['command']}`\n")
    report_.write(report, args.json, args.markdown, head + "\n" + format_tables(report, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
