"""Checkpoint files: exact env state, round trip, pruning, atomicity; refusal of truncated,
corrupt, foreign, incompatible and crafted checkpoints with a message that says what is wrong —
and no checkpoint, however crafted, runs code when opened, in any command.  The file format
itself, byte by byte: test_checkpoint_format.py."""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from matwm_fast import checkpoint as ck
from matwm_fast.config import EnvConfig, preset
from matwm_fast.env import SCENARIOS, MultiAgentEnv, random_actions
from matwm_fast.trainer import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke trainer past warm-up (40 steps) with a few updates, and its run dir with 3 checkpoints."""
    run_dir = tmp_path_factory.mktemp("ckpt")
    tr = build(preset("smoke"), device="cpu")
    cdir = ck.CheckpointDir(run_dir, keep=2)
    paths = []
    for stop in (42, 44, 46):
        while tr.step < stop:
            tr.train_step()
        paths.append(cdir.write(tr.step, {"trainer": tr.state_dict(), "extra": {"mark": tr.step}}))
    return tr, run_dir, paths


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_env_state_continues_exactly(scenario):
    """A resume restores into a *fresh* env (another seed): the world and its RNG must carry over."""
    a = MultiAgentEnv(EnvConfig(scenario=scenario, max_cycles=10), seed=0)
    rng = np.random.default_rng(0)
    for _ in range(7):
        a.step(random_actions(rng, a.spec))
    blob = ck.loads(ck.dumps(a.get_state()))  # through the file format: plain data only
    b = MultiAgentEnv(EnvConfig(scenario=scenario, max_cycles=10), seed=123)  # another world
    b.set_state(blob)
    for _ in range(25):  # crosses episode ends: the env's own RNG must match too
        act = random_actions(rng, a.spec)
        oa, ra, ca, da = a.step(act)
        ob, rb, cb, db = b.step(act)
        assert np.array_equal(oa, ob) and np.array_equal(ra, rb) and np.array_equal(ca, cb) and da == db
        if da:
            assert np.array_equal(a.reset(), b.reset())


def test_env_state_keeps_references_between_entities():
    """simple_reference's agents point at a goal agent and landmark: restored, they point at the
    restored env's own entities (not at copies)."""
    a = MultiAgentEnv(EnvConfig(scenario="simple_reference"), seed=0)
    b = MultiAgentEnv(EnvConfig(scenario="simple_reference"), seed=5)
    b.set_state(ck.loads(ck.dumps(a.get_state())))
    world_a, world_b = a.env.unwrapped.world, b.env.unwrapped.world
    for ag_a, ag_b in zip(world_a.agents, world_b.agents):
        assert any(ag_b.goal_b is lm for lm in world_b.landmarks)
        assert world_b.landmarks.index(ag_b.goal_b) == world_a.landmarks.index(ag_a.goal_b)
        assert world_b.agents.index(ag_b.goal_a) == world_a.agents.index(ag_a.goal_a)


def test_round_trip_restores_everything(trained):
    tr, run_dir, paths = trained
    st = ck.load(ck.resolve(run_dir))
    assert st["trainer"]["step"] == 46 and st["extra"] == {"mark": 46}
    fresh = build(preset("smoke"), device="cpu", steps=999)  # run settings may differ
    fresh.load_state_dict(st["trainer"])
    assert fresh.step == tr.step and fresh.first == tr.first and np.array_equal(fresh.obs, tr.obs)
    assert fresh.imagined_total == tr.imagined_total > 0
    for x, y in [(fresh.wm, tr.wm), (fresh.ac, tr.ac)]:  # incl. slow critics and return scales
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert any("slow_critic" in k for k in fresh.ac.state_dict()) and "return_scale" in fresh.ac.state_dict()
    opt_x, opt_y = fresh.wm_opt.state_dict(), tr.wm_opt.state_dict()
    assert all(torch.equal(opt_x["state"][i]["exp_avg_sq"], opt_y["state"][i]["exp_avg_sq"]) for i in opt_y["state"])
    assert opt_x["param_groups"][0]["betas"] == opt_y["param_groups"][0]["betas"]  # tuples stay tuples
    assert len(fresh.replay) == len(tr.replay) == 46
    assert torch.equal(fresh.replay.obs[:, :46], tr.replay.obs[:, :46])
    assert fresh.rng.bit_generator.state == tr.rng.bit_generator.state
    assert fresh.queues.count == tr.queues.count > 0 and torch.equal(fresh.queues.obs, tr.queues.obs)
    assert int(fresh.queues.count_t) == tr.queues.count  # what acting reads
    # the next step is the same step
    torch.manual_seed(7), np.random.seed(7)
    torch.set_rng_state(torch.get_rng_state())
    a = copy.deepcopy(tr.state_dict()["rng"])
    assert json.dumps(str(a["trainer"])) == json.dumps(str(fresh.state_dict()["rng"]["trainer"]))


def test_file_format_holds_only_data():
    tree = {"a": [1, 2.5, None, True, "x"], "t": (torch.arange(3), torch.ones(2, 2, dtype=torch.bfloat16)),
            "__odd": {3: torch.zeros(0), None: "none"}, "big": 2**80}
    back = ck.loads(ck.dumps(tree))
    assert back["a"] == tree["a"] and back["big"] == 2**80 and isinstance(back["t"], tuple)
    assert torch.equal(back["t"][0], tree["t"][0]) and back["t"][1].dtype is torch.bfloat16
    assert back["__odd"][3].shape == (0,) and back["__odd"][None] == "none"

    class Thing:
        pass

    with pytest.raises(TypeError, match="holds only data; got a Thing"):
        ck.dumps({"x": Thing()})


def test_keeps_last_k_and_writes_atomically(trained):
    _, run_dir, paths = trained
    d = run_dir / "checkpoints"
    assert sorted(p.name for p in d.glob("step_*.pt")) == [paths[1].name, paths[2].name]  # keep=2
    assert (d / "latest").read_text() == paths[2].name
    assert not [p for p in d.iterdir() if ".tmp" in p.name]  # the temporary files were renamed
    # without the pointer (say, copied by hand), the newest file is used
    ptr = (d / "latest").read_bytes()
    (d / "latest").unlink()
    try:
        assert ck.CheckpointDir(run_dir).latest() == paths[2]
    finally:
        (d / "latest").write_bytes(ptr)


def _damaged(tmp_path: Path, src: Path, how: str) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        data[len(data) // 2] ^= 0xFF
    elif how == "stub":
        data = data[:12]
    elif how == "foreign":
        data = b"PK\x03\x04" + data[4:]  # e.g. a plain torch.save zip
    dst = run / "checkpoints" / src.name
    dst.write_bytes(bytes(data))
    (run / "checkpoints" / "latest").write_text(src.name)
    return dst


@pytest.mark.parametrize("how,message", [
    ("truncated", "is corrupt or truncated (checksum mismatch)"),
    ("flipped", "is corrupt or truncated (checksum mismatch)"),
    ("stub", "is not a matwm_fast checkpoint"),
    ("foreign", "is not a matwm_fast checkpoint"),
])
def test_damaged_checkpoint_is_refused(tmp_path, trained, how, message):
    path = _damaged(tmp_path, trained[2][-1], how)
    with pytest.raises(ck.CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ck.load(ck.resolve(path.parent.parent))


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(ck.CheckpointError, match="neither a run directory nor a checkpoint file"):
        ck.resolve(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="no checkpoint in .*is .* a matwm_fast run directory"):
        ck.resolve(tmp_path)


def test_incompatible_checkpoint_is_refused(trained):
    st = ck.load(trained[2][-1])["trainer"]
    cfg = preset("smoke")
    other = build(replace(cfg, wm=replace(cfg.wm, width=64)), device="cpu")
    with pytest.raises(ValueError, match=r"different config: wm\.width: checkpoint 32 vs this run 64"):
        other.load_state_dict(st)
    # a config from another version of the code: unknown and missing fields are named
    bad = {**st, "config": copy.deepcopy(st["config"])}
    bad["config"]["wm"]["warp"] = 9
    del bad["config"]["ac"]["gamma"]
    with pytest.raises(ValueError, match="unknown field wm.warp; missing field ac.gamma"):
        build(cfg, device="cpu").load_state_dict(bad)
    # a missing run-time setting (added to the config later) takes its default instead
    from matwm_fast.config import RunConfig, load_config

    older = copy.deepcopy(st["config"])
    del older["run"]["threads"]
    assert load_config(older).run.threads == RunConfig().threads
    # weights that do not fit the model its config builds
    shapes = {**st, "wm": {k: v[..., :1] if v.ndim else v for k, v in st["wm"].items()}}
    with pytest.raises(ValueError, match="does not fit the model"):
        build(cfg, device="cpu").load_state_dict(shapes)


def test_gpu_checkpoint_resumes_on_cpu(trained):
    """A ``cudagraphs`` run saves Adam ``capturable`` with tensor learning rates; resumed on the
    CPU (eager) those runtime settings must be the CPU trainer's, or Adam refuses to step."""
    st = copy.deepcopy(ck.load(trained[2][-1])["trainer"])
    for key in ("wm_opt", "ac_opt"):
        for g in st[key]["param_groups"]:
            g["capturable"], g["lr"] = True, torch.tensor(float(g["lr"]))
    st = ck.loads(ck.dumps(st))  # and through the file
    tr = build(preset("smoke"), device="cpu")
    tr.load_state_dict(st)
    for opt, lr in ((tr.wm_opt, 1e-3), (tr.ac_opt, 3e-4)):
        assert all(g["capturable"] is False and g["lr"] == lr and isinstance(g["lr"], float) for g in opt.param_groups)
    assert tr.train_step() is not None  # steps, from the restored Adam moments


# ----------------------------------------------------------------------------- crafted files
class Evil:
    """Unpickling this creates MARKER: the proof that opening a file ran code."""

    marker = "MARKER"

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def format1_file(path: Path, payload: dict) -> Path:
    """A checkpoint in the old format 1: magic, sha256, a torch.save pickle."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    blob = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"MATWMCK1" + hashlib.sha256(blob).digest() + blob)
    (path.parent / "latest").write_text(path.name)
    return path


def crafted_runs(root: Path, marker: Path, trained) -> dict[str, Path]:
    """Run directories whose checkpoint would run ``touch marker`` if unpickled."""
    import pickle

    Evil.marker = str(marker)
    good = ck.load(trained[2][-1])
    out = {}
    out["payload"] = format1_file(root / "payload/checkpoints/step_000000046.pt", {"format": 1, "x": Evil()})
    out["env_state"] = format1_file(root / "env_state/checkpoints/step_000000046.pt",
                                    {"format": 1, "env": pickle.dumps(Evil()), "config": good["trainer"]["config"]})
    out["nested"] = format1_file(root / "nested/checkpoints/step_000000046.pt",
                                 {"format": 1, "wm_opt": {"state": {0: {"exp_avg": Evil()}}}})
    # a pickle in place of the file (as torch.save writes it): never opened
    p = root / "pickle/checkpoints/step_000000046.pt"
    p.parent.mkdir(parents=True)
    torch.save({"trainer": Evil()}, p)
    out["pickle"] = p
    # the current format cannot hold an object at all; a pickle smuggled in as bytes (a uint8
    # tensor) where the env state belongs is only data, and is refused when it does not fit
    st = copy.deepcopy(good)
    st["trainer"]["env"] = torch.frombuffer(bytearray(pickle.dumps(Evil())), dtype=torch.uint8)
    p = root / "bytes_env/checkpoints/step_000000046.pt"
    p.parent.mkdir(parents=True)
    ck.save(p, st)
    out["bytes_env"] = p
    return {k: v.parent.parent for k, v in out.items()}


def test_crafted_checkpoints_are_refused_and_never_run(tmp_path, trained):
    marker = tmp_path / "ran"
    runs = crafted_runs(tmp_path / "runs", marker, trained)
    for kind in ("payload", "env_state", "nested"):
        with pytest.raises(ck.CheckpointError, match="checkpoint format 1 .*unpickling can run code"):
            ck.load(ck.resolve(runs[kind]))
    with pytest.raises(ck.CheckpointError, match="not a matwm_fast checkpoint .*unpickling can run code"):
        ck.load(ck.resolve(runs["pickle"]))
    st = ck.load(ck.resolve(runs["bytes_env"]))
    with pytest.raises(ValueError, match="env state is malformed"):
        build(preset("smoke"), device="cpu").load_state_dict(st["trainer"])
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "resume", "init-from", "diagnose", "sweep"])
def test_every_command_refuses_crafted_checkpoints(tmp_path, trained, command):
    """Every command that opens checkpoints, as a user runs it: a format-1 file is refused by name
    and a pickle in place of the file as not a checkpoint (exit 2, no traceback); the file with a
    pickle where the env state belongs is refused by whatever reads the env state (resume,
    init-from) and is plain data to the rest.  Nothing ever creates the marker.  (The other
    format-1 files take the same path as ``payload``: test_crafted_checkpoints_are_refused_...)"""
    import shutil
    import subprocess
    import sys

    from support import ROOT, subprocess_env

    marker = tmp_path / "ran"
    runs = crafted_runs(tmp_path / "runs", marker, trained)
    for kind in ("payload", "pickle", "bytes_env"):
        run = runs[kind]
        if command == "sweep":  # the sweep reads OUT/<env>/seed<k>
            out = tmp_path / f"sweep_{kind}"
            shutil.copytree(run, out / "simple_tag" / "seed0")
            (out / "simple_tag" / "seed0" / "metrics.jsonl").write_text(
                json.dumps({"env_step": 46, "eval_return_mean": 0.0}) + "\n")
        argv = {"eval": ["-m", "matwm_fast.eval", str(run), "--episodes", "1"],
                "resume": ["-m", "matwm_fast.train", "--resume", str(run)],
                "init-from": ["-m", "matwm_fast.train", "--init-from", str(run), "--run-dir", str(tmp_path / f"new_{kind}")],
                "diagnose": [str(ROOT / "bench" / "experiments" / "diagnose.py"), "model", str(run), "--episodes", "1",
                             "--contexts", "1"],
                "sweep": ["-m", "matwm_fast.sweep", "--env", "simple_tag", "--seeds", "0", "--aggregate-only",
                          "--baseline-episodes", "1", "--out", str(tmp_path / f"sweep_{kind}")]}[command]
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=subprocess_env(),
                              cwd=tmp_path, timeout=300)
        assert "Traceback" not in proc.stderr, (command, kind, proc.stderr[-2000:])
        if kind != "bytes_env":
            refused = {"payload": "checkpoint format 1", "pickle": "is not a matwm_fast checkpoint"}[kind]
            assert proc.returncode == 2 and refused in proc.stderr, (command, kind, proc.stderr[-1000:])
        elif command in ("resume", "init-from"):
            assert proc.returncode == 2 and "env state is malformed" in proc.stderr, (command, proc.stderr[-1000:])
    assert not marker.exists()
