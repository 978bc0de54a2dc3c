"""Time training steps of two (or more) checkouts of matwm_fast side by side, alternating.

    python bench/compare_commits.py --ref /tmp/old=728f7d3 --cur . --amp fp32 bf16 --steps 8 \\
        --json bench/results/cpu-paper-ab.json

Each variant runs in its own warm worker process (its checkout first on ``PYTHONPATH``, one torch
thread): it builds a ``paper``-preset trainer on simple_tag (eager, reference kernels), fills the
replay past warm-up, runs two untimed training steps, then waits.  The driver then asks the
workers for one timed step each, in turn, ``--steps`` times, so a burst of load on a shared
machine slows every variant alike and the ratios stay fair.  Per phase (the NVTX phase names)
times come from each checkout's own profiler hook.  Checkouts older than the redesign (no
``matwm_fast.steps``) are driven through their own API, which had no CPU precision switch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r'''
import json, sys, time, torch
torch.set_num_threads(1)
amp, preset_name = sys.argv[1], sys.argv[2]
import matwm_fast
try:
    from matwm_fast.config import preset
    from matwm_fast.trainer import build
    from matwm_fast.tools.profile import PhaseTimer
    tr = build(preset(preset_name), device="cpu", backend="eager", kernels="ref", amp=amp, threads=1)
except ImportError:  # before the redesign (728f7d3): Trainer(cfg, device), float32 on the CPU
    from dataclasses import replace
    import kernels
    from matwm_fast.config import preset
    from matwm_fast.profile import PhaseTimer
    from matwm_fast.trainer import Trainer
    kernels.set_impl("ref")
    cfg = preset(preset_name)
    cfg = replace(cfg, train=replace(cfg.train, backend="eager", device="cpu"))
    torch.manual_seed(cfg.train.seed)
    tr = Trainer(cfg, "cpu")
while not tr.warm:
    tr.env_step()
for _ in range(2):
    tr.train_step()
timer = PhaseTimer(torch.device("cpu"))
print(json.dumps({"ready": list(matwm_fast.__path__)[0]}), flush=True)  # old checkouts: a namespace package
for _ in sys.stdin:
    timer.seconds.clear()
    with timer.installed():
        t0 = time.perf_counter()
        tr.train_step()
        step = time.perf_counter() - t0
    tr.check_finite()
    print(json.dumps({"step": step, **timer.seconds}), flush=True)
'''


def start(name: str, checkout: Path, amp: str, preset: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, amp, preset], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=checkout)
    line = json.loads(proc.stdout.readline())
    if not line["ready"].startswith(str(checkout.resolve())):
        raise SystemExit(f"error: variant {name} imported {line['ready']}, not its checkout {checkout}")
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/compare_commits.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, metavar="DIR=LABEL", help="the baseline checkout and its label")
    p.add_argument("--cur", default=".", metavar="DIR", help="the checkout to compare (default .)")
    p.add_argument("--amp", nargs="+", default=["fp32"], choices=["fp32", "bf16"], help="precisions of --cur to time")
    p.add_argument("--ref-amp", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="precisions of --ref to time (bf16 only for a checkout with the run.amp switch)")
    p.add_argument("--preset", default="paper", choices=["paper", "cpu"])
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (default 8)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: need at least 1")
    ref_dir, _, ref_label = args.ref.partition("=")
    variants = {f"{ref_label or ref_dir} {amp}": (Path(ref_dir), amp) for amp in args.ref_amp}
    variants |= {f"current {amp}": (Path(args.cur), amp) for amp in args.amp}
    t0 = time.perf_counter()
    procs = {name: start(name, d, amp, args.preset) for name, (d, amp) in variants.items()}
    print(f"workers ready in {time.perf_counter() - t0:.0f} s", flush=True)
    times: dict[str, list[dict]] = {name: [] for name in procs}
    for i in range(args.steps):
        for name, proc in procs.items():  # one step of each, in turn
            proc.stdin.write("step\n")
            proc.stdin.flush()
            times[name].append(json.loads(proc.stdout.readline()))
        print(f"round {i + 1}: " + ", ".join(f"{n} {times[n][-1]['step']:.2f} s" for n in procs), flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    base = next(iter(times))
    phases = sorted({k for rows in times.values() for r in rows for k in r})
    report = {"preset": args.preset, "steps": args.steps, "variants": {n: str(d) for n, (d, _) in variants.items()},
              "load_avg_1m_after": round(os.getloadavg()[0], 2), "median_s": {}, "speedup_vs_" + base: {}}
    for name, rows in times.items():
        report["median_s"][name] = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in phases}
        report["speedup_vs_" + base][name] = report["median_s"][base]["step"] / report["median_s"][name]["step"]
    print(f"\nmedian seconds per env step ({args.preset} preset, eager, 1 thread); speed-up vs {base}:")
    names = list(times)
    print("phase".ljust(16) + "".join(n.rjust(22) for n in names))
    for k in phases:
        print(k.ljust(16) + "".join(f"{report['median_s'][n][k]:22.3f}" for n in names))
    print("speed-up".ljust(16) + "".join(f"{report['speedup_vs_' + base][n]:21.2f}x" for n in names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
