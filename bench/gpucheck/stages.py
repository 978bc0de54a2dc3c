"""The stages of the GPU check (:mod:`bench.gpucheck.check`): what each one runs, and how it
judges what came back.

Each stage is a function ``(check, record) → (status, note, result)``: ``status`` one of
:data:`STATUS_ORDER`, ``note`` a line for the summary table, ``result`` the figures kept in
``results.json``.  It runs its commands through :meth:`Check.sh` (the checkout's modules and tests, as
subprocesses under the stage's deadline) and may update ``record["result"]`` and call
``check.save()`` part-way, so a stage cut short still leaves what it finished.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from .probes import STRICT

if TYPE_CHECKING:
    from .check import Check

SPEC_BUDGET = {"wm_sequences": 16, "imagined_steps": 36_864}  # SPEC §1: paper preset, simple_tag

STATUS_ORDER = ("ok", "skipped", "timeout", "failed")
GRAPHS = ("act", "wm_update", "imagine", "ac_update")  # the trainer's phase graphs


def worst(*statuses: str) -> str:
    return max(statuses, key=STATUS_ORDER.index)


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def stage_env(c: Check, rec: dict):
    """The machine, the versions and the commit; fails without the PettingZoo stack or (on a GPU
    check) without CUDA, since nothing after it could run."""
    import torch

    from matwm_fast.tools.report import environment

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = environment(dev)
    if info["git_commit"] is None:  # the device machine gets the working tree without .git
        info["git_commit"] = c.commit
    info |= {"commit_given": c.commit, "cpu_cores": os.cpu_count(), "inductor_compile_threads": c.threads,
             "triton_interpret": c.env.get("TRITON_INTERPRET") == "1",  # as the stages' processes run
             "packages": _versions(), "ncu": shutil.which("ncu"), "kind": c.kind,
             "inductor_cache": c.env.get("TORCHINDUCTOR_CACHE_DIR")}
    if dev.type == "cuda":
        pr = torch.cuda.get_device_properties(dev)
        info |= {"gpu": pr.name, "sm": f"{pr.major}.{pr.minor}", "sms": pr.multi_processor_count,
                 "memory_gib": round(pr.total_memory / 2**30, 1), "l2_mib": getattr(pr, "L2_cache_size", 0) / 2**20,
                 "driver": _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])}
    if info["ncu"]:
        info["ncu_version"] = _first_line(["ncu", "--version"], last=True)
    missing = [k for k in ("pettingzoo", "mpe2") if info["packages"].get(k) is None]
    if missing:
        return "failed", f"not importable: {', '.join(missing)} (bench/README.md: the device wheels)", info
    if dev.type != "cuda" and not c.p.rehearse:
        return "failed", "no CUDA device", info
    return "ok", info.get("gpu", info["device_name"]), info


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch", "triton", "numpy", "pettingzoo", "mpe2", "gymnasium", "nvtx", "pytest", "pytest-benchmark"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _first_line(cmd: list[str], last: bool = False) -> str | None:
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return (lines[-1] if last else lines[0]) if lines else None


# ----------------------------------------------------------------------------------- graphs (first)
def stage_graphs(c: Check, rec: dict):
    """The first stage: the eager step's syncs and kernels (``probe``), then ``graphs`` against
    eager with each kernel choice, one process each (:mod:`bench.gpucheck.first`)."""
    start, total = c.elapsed(), sum(s for *_, s in c.p.parts)
    budget, share, parts, status = c.deadline - start, 0.0, {}, "ok"
    for part, kernels, s in c.p.parts:
        share += s
        name = part if kernels is None else f"{part}:{kernels}"
        out = c.work / "first" / (name.replace(":", "-") + ".json")
        cmd = _py("-m", "bench.gpucheck.first", part, "--json", str(out), *c.p.args(), *c.p.first_flags,
                  "--steps", str(c.p.graph_steps), "--warmup-steps", str(c.p.graph_warmup))
        rc, secs, text = c.sh(f"graphs-{name.replace(':', '-')}", cmd + (["--kernels", kernels] if kernels else []),
                              until=start + budget * share / total)
        r = json.loads(out.read_text()) if out.exists() else {}
        st, note = (judge_probe if part == "probe" else judge_graphs)(r, cuda=not c.p.rehearse)
        if rc is None:
            st, note = "timeout", f"cut at the cap after {', '.join(r.get('done', [])) or 'nothing'}; " + note
        elif rc != 0 and st == "ok":
            st, note = "failed", f"exited {rc}; " + note
        parts[name] = {"status": st, "note": note, "exit": rc, "seconds": round(secs, 1), "record": r}
        if st != "ok":
            parts[name]["tail"] = text[-3000:]
        status = worst(status, st)
        rec["result"] = {"parts": parts}
        c.save()
    return status, "; ".join(f"{n}: {p['note']}" for n, p in parts.items()), {"parts": parts}


def judge_probe(r: dict, cuda: bool) -> tuple[str, str]:
    """No host sync in the captured phases (on a GPU: on the CPU the stand-in detector is only
    reported), the error step ran through, and the profile came back."""
    missing = [p for p in ("syncs", "sync_error_step", "profile") if p not in r.get("done", [])]
    if missing:
        return "failed", f"not done: {', '.join(missing)}" + _first_error(r)
    syncs, raised = r["syncs"], r["sync_error_step"]["raised"]
    where = {p: v["count"] for p, v in syncs["phases"].items()}
    k = r["profile"]["total"]
    note = (f"syncs {where or 'none'}; kernels {k['kernels']:,} ({k['kernel_ms']:.1f} ms)" if cuda else
            f"syncs (CPU stand-in) {where or 'none'}; {k['cpu_ops']:,} host ops")
    if cuda and (syncs["in_strict"] or raised):
        at = raised["site"][0] if raised else next(s for p in STRICT if p in syncs["phases"]
                                                   for s in syncs["phases"][p]["sites"])
        return "failed", f"host sync in a captured phase at {at}; " + note
    return "ok", note


def judge_graphs(r: dict, cuda: bool) -> tuple[str, str]:
    """Every phase graph captured (on the CPU: none, they are plain calls), the timing done, the
    replayed rollout equal to eager and repeatable, two replays drawing differently, finite."""
    done = r.get("done", [])
    missing = [p for p in ("graphs_build", "timing", "equality", "finite") if p not in done]
    problems = [f"not done: {', '.join(missing)}" + _first_error(r)] if missing else []
    built = r.get("graphs_build") or {}
    captured = {n: g["captured"] for n, g in built.get("graphs", {}).items()}
    if built and sorted(captured) != sorted(GRAPHS):
        problems.append(f"trainer graphs {sorted(captured)}, want {list(GRAPHS)}")
    elif built and any(v != cuda for v in captured.values()):
        problems.append(f"captured {captured}: want all {'captured' if cuda else 'plain calls'}")
    eq = r.get("equality") or {}
    if eq:
        cmp = eq["replay_vs_eager"]
        if eq["captured"] != cuda:
            problems.append(f"the equality check's own graphs {'not ' if cuda else ''}captured")
        if not cmp["ok"]:
            problems.append(f"replay != eager: {cmp['action_mismatch']:.2%} actions differ, states rel. error "
                            f"{cmp['states_rel_err']:.2e} (tolerance {cmp['tolerance']:.0e})")
        if not eq["replay_repeats"]:
            problems.append("two replays with fixed noise differ")
        if not eq["replays_draw_differently"]:
            problems.append("two replays without fixed noise drew the same numbers")
    t = r.get("timing") or {}
    note = ""
    if t:
        (ve, e), (vg, g) = list(t["backends"].items())
        note = (f"{g['step_ms']:.2f} ms/step vs {ve} {e['step_ms']:.2f} ({e['step_ms'] / g['step_ms']:.2f}x; whole "
                f"steps {t['whole_step_ms'][vg]:.2f} vs {t['whole_step_ms'][ve]:.2f})")
    if built:
        note += f"; captured in {built['to_captured_s']:.1f} s from a cold process"
    return ("failed" if problems else "ok"), "; ".join(problems + [note.strip("; ")]).strip("; ")


def _first_error(r: dict) -> str:
    errs = r.get("errors") or []
    return f" ({errs[0]['piece']}: {errs[0]['error'].splitlines()[0][:200]})" if errs else ""


# ----------------------------------------------------------------------------------- tests
def stage_tests(c: Check, rec: dict):
    """The kernel tests, then the ``gpu``-marked tests but the Inductor ones; counts and failures
    from their JUnit XML."""
    result, status = {}, "ok"
    for name, sel in c.p.test_runs.items():
        result[name] = r = run_pytest(c, f"tests-{name}", sel)
        if r["exit"] != 0:
            status = worst(status, "timeout" if r["exit"] is None else "failed")
        rec["result"] = result
        c.save()
    if not c.p.rehearse:  # on a GPU the gpu tests and the Triton kernels must run, not skip
        triton_skipped = [why for why in result["kernels"].get("skips", {}) if "triton" in why.lower()]
        if not result["gpu"].get("passed") or triton_skipped:
            status = worst(status, "failed")
            result["not_run"] = {"gpu_tests_passed": result["gpu"].get("passed", 0), "triton_skips": triton_skipped}
    return status, _test_note(result), result


def run_pytest(c: Check, name: str, sel: list[str], env: dict | None = None) -> dict:
    xml = c.work / f"junit-{name}.xml"
    # -v: a line per finished test, so a run cut at its cap (no JUnit report) still says what ran
    rc, secs, text = c.sh(name, _py("-m", "pytest", *sel, "-v", "-p", "no:cacheprovider", "-rfEs",
                                    f"--junitxml={xml}"), env=env)
    r = (junit(xml) or progress(text)) | {"exit": rc, "seconds": round(secs, 1)}
    if rc != 0:
        r["tail"] = text[-3000:]
    return r


def _test_note(result: dict) -> str:
    return "; ".join(f"{k}: {v.get('passed', 0)} passed, {v.get('failed', 0)} failed, {v.get('skipped', 0)} skipped"
                     + (f" (cut during {v['cut_during']})" if v.get("cut_during") else "")
                     for k, v in result.items() if isinstance(v, dict) and "passed" in v)


_VERBOSE = re.compile(r"^(\S+::\S+)(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)?")


def progress(text: str) -> dict:
    """Counts from ``pytest -v``'s lines, for a run stopped before it wrote its JUnit report; the
    test it was in when stopped (named, without a result, on the last such line)."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": {}, "partial": True, "cut_during": None}
    for line in text.splitlines():
        m = _VERBOSE.match(line)
        if not m:
            continue
        test, result = m.groups()
        out["cut_during"] = None if result else test
        if result in ("PASSED", "XFAIL", "XPASS"):
            out["passed"] += 1
        elif result in ("FAILED", "ERROR"):
            out["failed"] += 1
            out["failures"].append({"test": test, "message": result})
        elif result == "SKIPPED":
            out["skipped"] += 1
    return out


def junit(path: Path) -> dict:
    """Counts and the failing tests of a pytest JUnit XML report ({} when there is none)."""
    if not path.exists():
        return {}
    cases = ET.parse(path).getroot().iter("testcase")
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": {}}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif case.find("skipped") is not None:
            out["skipped"] += 1
            why = (case.find("skipped").get("message") or "")[:200]
            out["skips"][why] = out["skips"].get(why, 0) + 1
        else:
            out["passed"] += 1
    return out


# ----------------------------------------------------------------------------------- train
def stage_train(c: Check, rec: dict):
    """A real training run through the CLI on the ``graphs`` backend, then its rows and checkpoint."""
    from matwm_fast import checkpoint as ck
    from matwm_fast.config import load_config
    from matwm_fast.metrics import read_metrics

    run_dir = c.work / "train"
    rc, secs, text = c.sh("train", _py("-m", "matwm_fast.train", *c.p.args(), "--backend", "graphs",
                                        "--steps", str(c.p.train_steps), "--log-every", str(c.p.log_every),
                                        "--checkpoint-every", "0", "--seed", "0", "--run-dir", str(run_dir),
                                        "--overwrite"))
    result: dict = {"exit": rc, "seconds": round(secs, 1), "tail": text[-2000:]}
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy(run_dir / "metrics.jsonl", c.out / "train_metrics.jsonl")
    if rc != 0:
        return ("timeout" if rc is None else "failed"), f"train exited {rc}", result
    saved = json.loads((run_dir / "config.json").read_text())
    rows = [r for r in read_metrics(run_dir) if "shared_wm_total_loss" in r]
    want, problems = check_rows(rows, load_config(saved))
    path = ck.resolve(run_dir)
    state = ck.load(path)  # checksum verified
    if state["trainer"]["step"] != c.p.train_steps:
        problems.append(f"checkpoint {path.name} at step {state['trainer']['step']}, want {c.p.train_steps}")
    last = rows[-1] if rows else {}
    result |= {"runtime": saved.get("runtime"), "budget": want, "update_rows": len(rows),
               "checkpoint": path.name, "checkpoint_mib": round(path.stat().st_size / 2**20, 1),
               "last_row": {k: v for k, v in last.items() if k.startswith(("perf_", "shared_wm_total", "env_step"))
                            or k.endswith(("_actor_loss", "_critic_loss"))}}
    if problems:
        return "failed", problems[0], result | {"problems": problems[:20]}
    return "ok", (f"{len(rows)} update rows finite, budget {want['wm_sequences']} / {want['imagined_steps']:,}, "
                  f"{path.name} loads; {last.get('perf_env_steps_per_s', 0):.1f} env steps/s at the end"), result


def check_rows(rows: list[dict], cfg) -> tuple[dict, list[str]]:
    """A run's update rows against its (resolved) config: every agent's losses and the world
    model's present and finite, the per-step budget counters as the config sets them — and, for
    the paper preset on simple_tag, as SPEC §1 sets them.  Returns (the budget, problems)."""
    from matwm_fast.env import env_spec

    spec = env_spec(cfg.env)
    want = {"wm_sequences": cfg.wm.batch_size * cfg.train.wm_updates,
            "imagined_steps": spec.n_agents * cfg.ac.imag_batch * cfg.ac.horizon}
    problems = [] if rows else ["no row after warm-up"]
    if cfg.preset == "paper" and cfg.env.scenario == "simple_tag" and want != SPEC_BUDGET:
        problems.append(f"budget {want} is not SPEC §1's {SPEC_BUDGET}")
    losses = ["shared_wm_total_loss"] + [f"{a}_{k}_loss" for a in spec.agents for k in ("actor", "critic")]
    for r in rows:
        bad = [k for k in losses if not (isinstance(r.get(k), (int, float)) and math.isfinite(r[k]))]
        off = {k: r.get(k) for k, v in want.items() if r.get(k) != v}
        if bad or off:
            problems.append(f"env step {r.get('env_step')}: losses missing or non-finite {bad}, budget {off} (want {want})")
    return want, problems


# ----------------------------------------------------------------------------------- image
IMAGE_SCENARIO = "cooperative_pong"  # the paper's image task with the fewest agents: its step is the frames'


def stage_image(c: Check, rec: dict):
    """The image world model's step (Cooperative Pong's 64×64 frames) per phase, eager against
    ``graphs``, with its kernel launches; skipped where the Butterfly games cannot be imported
    (their wheels: ``device-wheels.sh safetensors pymunk cffi``)."""
    import importlib.util

    missing = [m for m in ("pymunk", "pygame") if importlib.util.find_spec(m) is None]
    if missing:
        return "skipped", f"not importable: {', '.join(missing)} (bench/README.md: the device wheels)", {}
    out = c.work / "image.json"
    args = [a if a != "simple_tag" else IMAGE_SCENARIO for a in c.p.args()]
    rc, secs, text = c.sh("image", _py("-m", "matwm_fast.profile", *args, "--backend", "eager", "graphs",
                                        "--steps", str(c.p.graph_steps), "--warmup-steps", str(max(c.p.graph_warmup, 1)),
                                        "--peak-seconds", "0", "--json", str(out)))
    result: dict = {"exit": rc, "seconds": round(secs, 1), "scenario": IMAGE_SCENARIO, "tail": text[-2000:]}
    if rc != 0 or not out.exists():
        return ("timeout" if rc is None else "failed"), f"profile exited {rc}", result
    report = json.loads(out.read_text())
    result["variants"] = {name: {k: v.get(k) for k in ("step_ms_median", "phases_ms", "launches", "env_steps_per_s",
                                                      "warmup_s", "peak_memory_mib")}
                          for name, v in report["backends"].items()}
    steps = {name: v["step_ms_median"] for name, v in result["variants"].items()}
    return "ok", ", ".join(f"{k} {v:.1f} ms" for k, v in steps.items()) + " per env step", result


# ----------------------------------------------------------------------------------- ncu
def stage_ncu(c: Check, rec: dict):
    """Nsight Compute on the first kernels of the imagination phase of one steady step (the
    plan's variant: eager, whose kernels are the ones a graph replays)."""
    from matwm_fast.tools.profile import range_name

    ncu = shutil.which("ncu")
    if ncu is None:
        return "skipped", "ncu not on PATH", {}
    rep = c.work / "ncu" / "imagine"
    rep.parent.mkdir(exist_ok=True)
    v = c.p.ncu_variant
    app = _py("-m", "matwm_fast.profile", *c.p.args(), "--backend", v, "--steps", "1",
              "--warmup-steps", str(c.p.graph_warmup), "--nsys", "--peak-seconds", "0")
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--nvtx", "--nvtx-include",
           f"{range_name(v)}/imagine/", "--launch-count", str(c.p.ncu_launches), "-f", "-o", str(rep), *app]
    rc, secs, text = c.sh("ncu", cmd)
    result = {"exit": rc, "seconds": round(secs, 1), "command": " ".join(cmd)}
    if rc != 0 or not rep.with_suffix(".ncu-rep").exists():
        return ("timeout" if rc is None else "failed"), f"ncu exited {rc}", result | {"tail": text[-3000:]}
    rc2, _, summary_text = c.sh("ncu-summary", [ncu, "--import", str(rep.with_suffix(".ncu-rep")),
                                                "--print-summary", "per-kernel"])
    (c.out / "ncu.txt").write_text(summary_text)
    if rep.with_suffix(".ncu-rep").stat().st_size < 15 * 2**20:  # the device call returns files up to 16 MiB
        shutil.copy(rep.with_suffix(".ncu-rep"), c.out / "imagine.ncu-rep")
    return ("ok" if rc2 == 0 else "failed"), f"{c.p.ncu_launches} kernels of {range_name(v)}/imagine", result


# ----------------------------------------------------------------------------------- inductor (last)
def stage_inductor(c: Check, rec: dict):
    """Inductor's variants, last, with what time is left: one profile process per variant, then
    the refusals, then the Inductor ``gpu`` tests (CUDA-graph trees without recompiles)."""
    from matwm_fast.tools.profile import format_tables

    (c.work / "inductor").mkdir(exist_ok=True)
    variants, reports, status = {}, [], "ok"
    start, total = c.elapsed(), sum(s for _, s in c.p.inductor)
    share, budget = 0.0, c.deadline - start
    for v, s in c.p.inductor:
        share += s
        out = c.work / "inductor" / (v.replace(":", "-") + ".json")
        rc, secs, text = c.sh(f"inductor-{v.replace(':', '-')}", _py(
            "-m", "matwm_fast.profile", *c.p.args(), "--backend", v, "--steps", str(c.p.inductor_steps),
            "--warmup-steps", str(c.p.graph_warmup), "--peak-seconds", "0", "--json", str(out)),
            until=start + budget * share / total, env=c.inductor_env())
        r = {"exit": rc, "seconds": round(secs, 1)}
        if rc == 0 and out.exists():
            reports.append(json.loads(out.read_text()))
            r |= {"status": "ok", "figures": reports[-1]["backends"][v]}
        else:
            r |= {"status": "timeout" if rc is None else "failed", "tail": text[-3000:]}
            status = worst(status, r["status"])
        variants[v] = r
        rec["result"] = {"variants": variants}
        c.save()
    for v in c.p.refused:  # must be refused before any work, with the reason and the valid choices
        rc, secs, text = c.sh(f"inductor-{v}-refused", _py("-m", "matwm_fast.profile", *c.p.args(), "--backend", v))
        ok = rc == 2 and "error: " in text and repr(v) in text and "CUDA" in text
        variants[v] = {"status": "refused as expected" if ok else "timeout" if rc is None else "failed", "exit": rc,
                       "message": text.strip().splitlines()[-1] if text.strip() else ""}
        status = worst(status, "ok" if ok else variants[v]["status"])
    result = {"variants": variants}
    if reports:
        merged = reports[0] | {"backends": {k: b for r in reports for k, b in r["backends"].items()}}
        result |= {"report": merged, "tables_md": format_tables(merged, markdown=True)}
    if c.p.inductor_tests:
        result["tests"] = t = run_pytest(c, "inductor-tests", c.p.inductor_tests, env=c.inductor_env())
        if t["exit"] != 0:
            status = worst(status, "timeout" if t["exit"] is None else "failed")
    rec["result"] = result
    done = [v for v, r in variants.items() if r["status"] == "ok"]
    note = f"{len(done)}/{len(c.p.inductor)} variants timed" + (f", {', '.join(c.p.refused)} refused" if c.p.refused
                                                                  else "")
    return status, note + (f"; tests: {_test_note({'': result['tests']})[2:]}" if "tests" in result else ""), result


RUNNERS = {"env": stage_env, "graphs": stage_graphs, "tests": stage_tests, "train": stage_train, "image": stage_image,
           "ncu": stage_ncu,
           "inductor": stage_inductor}
