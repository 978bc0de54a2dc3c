"""``run.rollout_graph``: what compiling imagination costs, whole rollout against one step.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) OMP_NUM_THREADS=1 python bench/rollout_graph_ab.py whole
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) OMP_NUM_THREADS=1 python bench/rollout_graph_ab.py step
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) OMP_NUM_THREADS=1 python bench/rollout_graph_ab.py whole,step

For each mode (``compile`` backend, ``--preset``, default ``cpu``, on simple_tag): the seconds of
the first rollout (compilation, from the empty Inductor cache the command line gives it) and,
when two modes are given, the median of 15 alternated rounds of 5 steady rollouts each.  One JSON
line.  Results: ``bench/results/cpu-rollout-graph.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from matwm_fast.config import preset
from matwm_fast.trainer import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modes", help="comma-separated: whole, step")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in ("whole", "step")]
    if bad:
        p.error(f"modes {bad}: valid: whole, step")
    trainers, out = {}, {"preset": args.preset, "device": args.device, "torch": torch.__version__}
    for m in modes:
        tr = build(preset(args.preset, "simple_tag"), device=args.device, backend="compile", rollout_graph=m,
                   threads=1)
        while not tr.warm:
            tr.env_step()
        ctx = tr.replay.sample_contexts(tr.cfg.ac.imag_batch, tr.cfg.ac.context_len)
        t0 = time.perf_counter()
        tr.imagine(ctx)
        out[f"{m}_compile_s"] = round(time.perf_counter() - t0, 1)
        tr.imagine(ctx)
        trainers[m] = (tr, ctx)
    if len(modes) > 1:
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                tr, ctx = trainers[m]
                t0 = time.perf_counter()
                for _ in range(5):
                    tr.imagine(ctx)
                if tr.device.type == "cuda":
                    torch.cuda.synchronize()
                times[m].append((time.perf_counter() - t0) / 5 * 1e3)
        out |= {f"{m}_rollout_ms_median": round(statistics.median(v), 2) for m, v in times.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
