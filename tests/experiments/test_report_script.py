"""bench/experiments/report.sh: the protocol's reporting runs, one stage at a time.

Every command ``DRY=1 report.sh all`` prints is parsed by the tool it calls, as that tool would
before starting anything: the sweep's flags and its protocol checks (reporting seeds, minimums),
the train flags of each ablation resolved to the config they must switch off, tune.py's and the
heuristics' seeds.  So a renamed flag or a seed outside the reporting split fails here, not
hours into a run.  Nothing is trained.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from matwm_fast import protocol
from matwm_fast.tools import launch, sweep

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "experiments" / "report.sh"
sys.path.insert(0, str(ROOT / "bench" / "baselines"))
import heuristics  # noqa: E402
import model_free  # noqa: E402
import tune  # noqa: E402


def report(*args: str, dry: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"DRY": "1"} if dry else {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=60)


def commands(*args: str) -> list[list[str]]:
    r = report(*args)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def test_all_runs_every_stage_on_both_scenarios_and_ends_with_the_table():
    cmds = commands("all")
    sweeps = [c for c in cmds if c[:3] == ["python", "-m", "matwm_fast.sweep"]]
    tunes = [c for c in cmds if c[1:2] == ["bench/baselines/tune.py"]]
    variants = {(c[c.index("--env") + 1], Path(c[c.index("--out") + 1]).name) for c in sweeps}
    assert variants == {(e, v) for e in ("simple_spread", "simple_tag")
                        for v in ("cpu", "cpu-50k", "uniform", "noteam", "noscale")}
    assert {(c[c.index("--scenario") + 1], c[c.index("--algo") + 1], c[2]) for c in tunes} == {
        (e, a, cmd) for e in ("simple_spread", "simple_tag") for a in ("mappo", "ippo", "qmix")
        for cmd in ("run", "report")}
    assert cmds[-1] == ["python", "bench/learning_table.py"]


def test_every_sweep_passes_the_sweeps_own_checks_and_each_ablation_switches_its_part_off():
    switched_off = {"uniform": lambda c: c.replay.priority_decay == 1.0,
                    "noteam": lambda c: not c.wm.teammates,
                    "noscale": lambda c: not c.wm.action_scaling}
    results = set()
    for argv in (c[3:] for c in commands("all") if c[:3] == ["python", "-m", "matwm_fast.sweep"]):
        own, extra = sweep.split_argv(argv)
        args = sweep.build_parser().parse_args(own)
        launch.check_flags(args)
        sweep.check_protocol(args)  # reporting seeds, ≥ 5 seeds × 50 episodes
        assert args.split == "report"
        (env,) = args.env
        cfg = sweep.expected_config(sweep.fresh_args(args, env, args.seeds[0], extra))
        variant = Path(args.out).name
        for name, off in switched_off.items():  # the ablation's own part off, every other part on
            assert off(cfg) == (variant == name), (variant, name)
        # one results directory per variant and scenario: one sweep's table never overwrites another's
        assert Path(args.results).parts[-2:] == (variant, env)
        results.add(args.results)
        assert args.configs_tried == (1 if variant in switched_off else 30)
    assert len(results) == 10


def test_the_baselines_search_on_tuning_seeds_and_report_on_reporting_seeds():
    for argv in (c[2:] for c in commands("all") if c[1:2] == ["bench/baselines/tune.py"]):
        args = tune.build_parser().parse_args(argv)
        model_free.check_choices(args.scenario, args.algo)
        protocol.check_seeds("tuning" if args.cmd == "run" else "report", args.seeds)
    heur = [c for c in commands("all") if c[1:2] == ["bench/baselines/heuristics.py"]]
    assert [c[c.index("--scenario") + 1] for c in heur] == ["simple_spread", "simple_tag"]
    for c in heur:
        assert c[c.index("--split") + 1] == "report" and c[c.index("--scenario") + 1] in heuristics.POLICIES
        protocol.check_minimums("report", [int(s) for s in c[c.index("--seeds") + 1:]], 50)


def test_the_50k_stretch_copies_the_20k_runs_before_continuing_them(tmp_path):
    runs = tmp_path / "runs"
    (runs / "cpu" / "simple_tag" / "seed100").mkdir(parents=True)
    r = subprocess.run(["bash", str(SCRIPT), "cpu-50k", "simple_tag"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "DRY": "1", "RUNS": str(runs)}, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(x) for x in r.stdout.splitlines()]
    assert lines[0][:2] == ["mkdir", "-p"] and lines[1] == ["cp", "-r", str(runs / "cpu/simple_tag/seed100"),
                                                            str(runs / "cpu-50k/simple_tag/seed100")]
    assert lines[-1][:3] == ["python", "-m", "matwm_fast.sweep"] and "50000" in lines[-1]


def test_each_trained_seeds_record_is_archived_beside_its_table(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "noteam" / "simple_tag" / "seed102"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    r = subprocess.run(["bash", str(SCRIPT), "ablation", "noteam", "simple_tag"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "DRY": "1", "RUNS": str(runs)}, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(x) for x in r.stdout.splitlines()][1:]  # after the sweep: seed 102 only, the one with rows
    dst = "bench/results/learning/report/noteam/simple_tag/seed102"
    assert lines == [["mkdir", "-p", dst], ["cp", str(run / "config.json"), str(run / "matchups.json"), dst + "/"],
                     ["gzip", "-9", "-n", "-c", str(run / "metrics.jsonl"), ">", dst + "/metrics.jsonl.gz"]]


@pytest.mark.parametrize("args, named", [
    (("bogus",), "'bogus'"), (("ablation", "dropout", "simple_spread"), "'dropout'"),
    (("cpu",), "usage: report.sh cpu ENV"), (("cpu", "simple_tag", "simple_spread"), "got 'simple_tag simple_spread'"),
    (("baselines", "mappo"), "usage: report.sh baselines ALGO ENV"), (("baselines", "dqn", "simple_tag"), "'dqn'"),
    (("heuristics", "simple_tag"), "got 'simple_tag'"), (("table", "--fast"), "got '--fast'"),
    (("all", "simple_tag"), "got 'simple_tag'"), (("list", "x"), "got 'x'")])
def test_a_bad_stage_or_missing_argument_is_refused_with_status_2(args, named):
    r = report(*args)
    assert r.returncode == 2 and named in r.stderr and r.stdout == ""


def test_list_names_every_stage():
    r = report("list", dry=False)
    assert r.returncode == 0
    for stage in ("cpu ENV", "cpu-50k ENV", "ablation NAME ENV", "baselines ALGO ENV", "heuristics", "table", "all"):
        assert stage in r.stdout


def test_train_flags_reach_every_new_training_after_the_ablations_own():
    r = subprocess.run(["bash", str(SCRIPT), "ablation", "noscale", "simple_tag"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "DRY": "1", "TRAIN_FLAGS": "--backend compile"}, timeout=60)
    assert r.returncode == 0, r.stderr
    own, extra = sweep.split_argv(shlex.split(r.stdout)[3:])
    assert extra == ["--wm.action-scaling", "false", "--backend", "compile"]
    args = sweep.build_parser().parse_args(own)
    cfg = sweep.expected_config(sweep.fresh_args(args, "simple_tag", 100, extra))
    assert cfg.run.backend == "compile" and not cfg.wm.action_scaling


def test_the_scripts_algorithms_are_the_baselines_own():
    line = next(x for x in SCRIPT.read_text().splitlines() if x.startswith("ALGOS=("))
    assert tuple(line.split("(", 1)[1].split(")", 1)[0].split()) == model_free.ALGOS
