"""The swaps to maintained libraries, measured against the code they replaced.

    OMP_NUM_THREADS=1 python bench/checkpoint_format.py                 # cpu and paper presets
    OMP_NUM_THREADS=1 python bench/checkpoint_format.py --presets cpu --reps 3

* Checkpoints: format 2 (the hand-written codec, read from ``--old-commit``'s
  ``matwm_fast/checkpoint.py``) against format 3 (safetensors, this checkout): ``save`` (encode,
  write, fsync, rename) and ``load`` (read, checksum, decode) of the same trainer state, the codec
  alone in memory (``dumps``/``loads``), and the file's size.  The trainer is built as an entry
  point builds it (``trainer.build``, CPU, eager), its replay filled by ``--steps`` env steps, then
  one real update so both optimisers hold their moments.  Old and new alternate within each
  repetition, so a shared machine's load hits both.
* Metric rows: ``MetricsWriter.write`` of ``--rows`` rows as training writes them (the old writer
  rereads the CSV on every row; this one appends).
* Progress: the cost of one ``Progress.update`` per env step, in a log and on a terminal.

Medians of ``--reps``; one JSON object on stdout.  Results: ``bench/results/checkpoint-format.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from matwm_fast import checkpoint as ck
from matwm_fast import metrics
from matwm_fast.config import preset
from matwm_fast.trainer import build

ROOT = Path(__file__).resolve().parents[1]


def old_module(commit: str, path: str, name: str):
    """``path`` as it was at ``commit``, imported as module ``name`` (it imports no siblings)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], capture_output=True, text=True,
                         check=True).stdout
    f = Path(tempfile.mkdtemp()) / f"{name}.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def checkpoints(name: str, steps: int, reps: int, old, work: Path) -> dict:
    t0 = time.perf_counter()
    tr = build(preset(name, "simple_tag"), device="cpu", backend="eager")
    while tr.step < steps:
        tr.env_step()
    fill_s = time.perf_counter() - t0
    tr.train_step()  # one update: Adam moments in both optimisers, as in any checkpoint after warm-up
    tree = {"trainer": tr.state_dict(), "extra": {"logger": {"layouts": []}, "pending_eval": False}}
    paths = {"old": work / f"{name}_old.pt", "new": work / f"{name}_new.pt"}
    codecs = {"old": old, "new": ck}
    times: dict[str, list[float]] = {f"{k}_{op}": [] for k in codecs for op in ("save", "load", "dumps", "loads")}
    for rep in range(reps):
        order = ["old", "new"] if rep % 2 == 0 else ["new", "old"]
        for k in order:
            times[f"{k}_save"].append(timed(lambda: codecs[k].save(paths[k], tree)))
        for k in order:
            times[f"{k}_load"].append(timed(lambda: codecs[k].load(paths[k])))
        for k in order:  # the codec alone, in memory: no disk, no fsync
            blob = paths[k].read_bytes()
            times[f"{k}_dumps"].append(timed(lambda: codecs[k].dumps(tree)))
            times[f"{k}_loads"].append(timed(lambda: codecs[k].loads(blob)))
    ck.load(paths["old"])  # format 2 still reads
    n_tensors = sum(1 for _ in _tensors(tree))
    return {"env_steps": tr.step, "replay_size": len(tr.replay), "fill_s": round(fill_s, 1), "tensors": n_tensors,
            "tensor_mib": round(sum(t.numel() * t.element_size() for t in _tensors(tree)) / 2**20, 2),
            "size_old_bytes": paths["old"].stat().st_size, "size_new_bytes": paths["new"].stat().st_size,
            **{f"{k}_ms_median": round(1e3 * statistics.median(v), 1) for k, v in times.items()},
            **{f"{k}_ms_all": [round(1e3 * x, 1) for x in v] for k, v in times.items()}}


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def metric_rows(rows: int, reps: int, old, work: Path) -> dict:
    """Rows shaped like a 4-agent run's: ~60 columns, the update columns from row 6 on."""
    agents = ["adversary_0", "adversary_1", "adversary_2", "agent_0"]
    base = {"env_step": 0, "warm": False, "imagined_steps_total": 0, "perf_env_steps_per_s": 1.0,
            "perf_imagined_steps_per_s": 1.0, "episodes": 4, "episode_return": -1.5,
            **{f"{a}_episode_return": -1.5 for a in agents}}
    update = {"shared_wm_total_loss": 1.0, **{f"shared_wm_{k}": 0.5 for k in ("obs", "rew", "cont", "kl", "grad")},
              **{f"{a}_{m}": 0.25 for a in agents for m in ("actor_loss", "critic_loss", "entropy", "return_scale",
                                                            "actor_grad_norm", "critic_grad_norm", "value")}}
    out = {}
    for k, mod in (("old", old), ("new", metrics)):
        runs = []
        for rep in range(reps):
            d = work / f"rows_{k}_{rep}"
            w = mod.MetricsWriter(d, tensorboard=False)
            t0 = time.perf_counter()
            for i in range(1, rows + 1):
                w.write({**base, "env_step": 100 * i, **(update if i > 5 else {})})
            runs.append(time.perf_counter() - t0)
        out[f"{k}_s_median"] = round(statistics.median(runs), 3)
    out["rows"], out["columns"] = rows, len(base) + len(update)
    return out


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(updates: int, reps: int, old) -> dict:
    """Microseconds per update, one per env step with a logged row every 100, in a log and on a terminal."""
    out = {}
    for where, stream in (("log", io.StringIO), ("terminal", Terminal)):
        for k, mod in (("old", old), ("new", metrics)):
            runs = []
            for _ in range(reps):
                p = mod.Progress(updates, stream=stream())
                t0 = time.perf_counter()
                for i in range(updates):
                    p.update(i, 36 * i, force=i % 100 == 0)
                runs.append((time.perf_counter() - t0) / updates)
                p.close()
            out[f"{where}_{k}_us_per_update"] = round(1e6 * statistics.median(runs), 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    p.add_argument("--steps", type=int, default=3000, help="env steps filling the replay")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rows", type=int, default=2000, help="metric rows written (a 200k-step run at --log-every 100)")
    p.add_argument("--old-commit", default="347c188", help="the commit before the swaps")
    p.add_argument("--dir", type=Path, default=None, help="where the files are written (default: a temporary dir)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    old_ck = old_module(args.old_commit, "matwm_fast/checkpoint.py", "old_checkpoint")
    old_metrics = old_module(args.old_commit, "matwm_fast/metrics.py", "old_metrics")
    work = args.dir or Path(tempfile.mkdtemp(prefix="ckbench"))
    work.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = [ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")]
    out = {"machine": model[0] if model else "?",
           "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "old_commit": args.old_commit, "reps": args.reps, "load_avg_1min_start": os.getloadavg()[0]}
    import safetensors

    out["safetensors"] = safetensors.__version__
    for name in args.presets:
        out[name] = checkpoints(name, args.steps, args.reps, old_ck, work)
        print(f"{name}: {json.dumps(out[name])}", file=sys.stderr)
    out["metric_rows"] = metric_rows(args.rows, max(1, args.reps // 2), old_metrics, work)
    out["progress"] = progress(20_000, args.reps, old_metrics)
    out["load_avg_1min_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
