"""The cost of one training env step before a GPU measures it: ``python -m matwm_fast.profile --fake``.

    python -m matwm_fast.profile --fake                                  # the paper step, ref kernels, bf16
    python -m matwm_fast.profile --fake --kernels ref triton --amp bf16 fp32 --json out.json --markdown out.md
    python -m matwm_fast.profile --fake --ac.imag-batch 1024             # what a change costs
    python -m matwm_fast.profile --fake --narrow                         # the same counts in a second

For each variant (kernels × precision) it builds the trainer under fake tensors, fills the replay
only as far as training needs (unless ``--replay.warmup`` says otherwise), runs one training step
(Adam's state is made there), then counts one more, as :mod:`matwm_fast.tools.launches` says: per
phase the kernel launches, the ops that launch none, the bytes moved and the FLOPs, beside the
analytic FLOP count of :mod:`matwm_fast.tools.flops` (equal for the matrix products).  The step is
CUDA's: bf16 casts as CUDA's autocast does, optimisers take CUDA's defaults (``--policy cpu``: the
CPU's).  A fake step takes seconds at any size; ``--narrow`` narrows every width and batch
(:func:`~matwm_fast.tools.launches.narrowed`): the same launches, the bytes and FLOPs of the
narrow sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..cli import Parser, add_config_flags, config_from, describe, fail, overrides
from ..config import PRESETS, Config, resolve
from ..env import env_spec
from . import flops, launches
from . import report as report_
from .report import giga, table

KERNELS = ("ref", "triton")
AMPS = ("bf16", "fp32")
MIB = 2**20
COUNTS = ("dispatched", "kernels", "views", "metadata", "allocations", "syncs")  # the columns of ops
# below the markdown report's header: what its figures are
NOTES = """\
How it was counted: one steady env step (`Trainer.train_step`) under fake tensors, every aten op
dispatched below autograd and autocast seen once.  *kernels*: the ops that launch a GPU kernel,
one each (a `_foreach_*` or fused-Adam op, one kernel per chunk of its list on CUDA, a composite
such as `slice_backward`, and a Triton custom op count once: slightly under a CUDA profiler's
list); *views*, *metadata* (ops returning no tensor), *allocations* and *syncs* launch none.
*MiB moved*: the tensor inputs and outputs of every kernel op (a gather or an indexed write: the
rows it moves), an estimate.  *GFLOP*: the matrix products (torch's formulas), beside
`matwm_fast/tools/flops.py`'s analytic count.  Fake tensors live on the CPU, with CUDA's autocast
cast policy and torch.optim's CUDA defaults applied; a CUDA run also copies a few tensors between
host and device (`.to(device)`, `.cpu()`), no-ops on the CPU and not counted here.  The rules:
`matwm_fast/tools/launches.py`.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m matwm_fast.profile --fake", description=__doc__.split("\n\n")[0],
               conflict_handler="resolve")
    add_config_flags(p)  # every config field stays a flag; --kernels and --amp become lists here
    p.add_argument("--preset", default="paper", help=f"sizes to cost: {', '.join(PRESETS)} (default paper)")
    p.add_argument("--kernels", nargs="+", default=["ref"], metavar="KERNELS",
                   help=f"kernel implementations to cost, each one variant: {', '.join(KERNELS)} (default ref)")
    p.add_argument("--amp", nargs="+", default=["bf16"], metavar="AMP",
                   help=f"precisions to cost: {', '.join(AMPS)} (default bf16)")
    p.add_argument("--policy", default="cuda",
                   help=f"whose device-dependent choices the step follows (autocast's cast policy, torch.optim's "
                        f"default): {', '.join(launches.POLICIES)} (default cuda)")
    p.add_argument("--narrow", action="store_true",
                   help="narrow every width and batch: the same launches, counted in a second")
    p.add_argument("--top", type=int, default=0, help="also list each phase's N most launched kernel ops")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report as JSON")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the tables as markdown")
    return p


def check(args: argparse.Namespace) -> None:
    """Refuse bad values before any work, naming the value and what is allowed (exit 2)."""
    for name, given, allowed in (("--kernels", args.kernels, KERNELS), ("--amp", args.amp, AMPS),
                                 ("--policy", [args.policy], launches.POLICIES)):
        for v in given:
            if v not in allowed:
                fail(f"{name} {v!r}: valid: {', '.join(allowed)}")
    if args.preset not in PRESETS:
        fail(f"--preset {args.preset!r}: valid: {', '.join(PRESETS)}")
    if args.top < 0:
        fail(f"--top {args.top}: must be an integer >= 0")
    backend = getattr(args, "run.backend") or "eager"
    if not launches.countable(backend, launches.DEVICE):
        fail(f"--backend {backend!r}: a fake step counts the ops dispatched one by one; valid: eager, graphs")
    device = getattr(args, "run.device")
    if device not in (None, "auto", str(launches.DEVICE)):
        fail(f"--device {device!r}: fake tensors live on the CPU, with the CUDA step's choices (--policy cuda); "
             "valid: auto, cpu")


def config_of(args: argparse.Namespace) -> Config:
    """The preset and flags; the least replay fill unless ``--replay.warmup`` is given; narrowed."""
    over = {k: v for k, v in overrides(args).items() if k not in ("run.kernels", "run.amp")}
    cfg = config_from(args.preset, over, args.scenario_args)
    if args.narrow:
        cfg = launches.narrowed(cfg)
    return cfg if "replay.warmup" in over else launches.least_fill(cfg)


def run(args: argparse.Namespace, argv: list[str], log=print) -> dict:
    """Count every variant; the report that ``--json`` writes."""

    backend = getattr(args, "run.backend") or "eager"
    try:
        cfg = config_of(args)
        spec = env_spec(cfg.env)
        ran = resolve(replace(cfg, run=replace(cfg.run, backend=backend, device=str(launches.DEVICE))), spec.n_agents)
    except ValueError as e:
        fail(str(e))
    report = report_.environment(launches.DEVICE) | {"command": "python -m matwm_fast.profile --fake " + " ".join(argv)}
    report |= {"preset": cfg.preset, "scenario": cfg.env.scenario, "narrowed": args.narrow,
               "policy": args.policy, "config": describe(ran).splitlines(),
               "budget": {"agents": spec.n_agents, "wm_batch": ran.wm.batch_size, "wm_seq_len": ran.wm.seq_len,
                          "imag_batch_per_agent": ran.ac.imag_batch, "horizon": ran.ac.horizon,
                          "context_len": ran.ac.context_len, "act_context": ran.train.act_context},
               "analytic_flops": flops.step_flops(ran, spec), "variants": {}}
    for kern in dict.fromkeys(args.kernels):  # a repeated name would overwrite its own figures
        for amp in dict.fromkeys(args.amp):
            t0 = time.perf_counter()
            try:
                r = launches.fake_budget(cfg, kern, amp, args.policy, args.top, backend)
            except ValueError as e:
                fail(str(e))
            r["wall_s"] = round(time.perf_counter() - t0, 2)
            report["variants"][f"{kern} {amp}"] = r
            log(f"[{kern} {amp}] {r['step']['kernels']:,} kernel launches per env step "
                f"({r['step']['dispatched']:,} ops dispatched), counted in {r['wall_s']:.1f} s")
    return report


# ----------------------------------------------------------------------------------- tables
def format_report(report: dict, markdown: bool = False) -> str:
    """One table per variant, then the kernel launches of every variant side by side."""
    out, analytic = [], report["analytic_flops"]
    size = "narrowed widths and batches" if report["narrowed"] else f"{report['preset']} sizes"
    for name, r in report["variants"].items():
        rows = []
        for p in launches.PHASES + ("step",):
            t = r["step"] if p == "step" else r["phases"][p]
            want = sum(analytic.values()) if p == "step" else analytic.get(p, 0.0)
            rows.append([p] + [f"{t[k]:,}" for k in COUNTS] + [f"{t['bytes'] / MIB:,.1f}", giga(t["flops"]), giga(want)])
        title = (f"{name} ({r['runtime']['backend']}, as {report['policy']} runs it): one env step of "
                 f"the {report['preset']} preset on {report['scenario']}, {size}, fake tensors")
        out += [f"### {title}" if markdown else f"== {title} ==", "",
                table(["phase", *COUNTS, "MiB moved", "GFLOP", "flops.py GFLOP"], rows, markdown), ""]
        tops = [f"{'- ' if markdown else '  '}{p}: " + ", ".join(f"{op} {n}" for op, n in top.items())
                for p in launches.PHASES if (top := r["phases"][p].get("top_kernels"))]
        out += ["most launched kernel ops:", *([""] if markdown else []), *tops, ""] if tops else []
    names = list(report["variants"])
    if len(names) > 1:
        v = report["variants"]
        rows = [[p] + [f"{(v[n]['step'] if p == 'step' else v[n]['phases'][p])['kernels']:,}" for n in names]
                for p in launches.PHASES + ("step",)]
        title = "kernel launches per env step, by variant"
        out += [f"### {title}" if markdown else f"== {title} ==", "", table(["phase"] + names, rows, markdown), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    check(args)
    report = run(args, argv)
    print(format_report(report))
    head = (f"Counted {report_.provenance(report)}.  Launch counts depend on the code and torch's version, not on "
            f"the machine; bytes and FLOPs on the sizes.\n\nCommand: `{report['command']}`\n\n" + NOTES)
    report_.write(report, args.json, args.markdown, head + "\n" + format_report(report, markdown=True))
    return 0
