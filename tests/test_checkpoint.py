"""Checkpoint files: exact env state, round trip, pruning, atomicity, and refusal of truncated,
corrupt, foreign or incompatible checkpoints with a message that says what is wrong."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from matwm_fast import checkpoint as ck
from matwm_fast.config import EnvConfig, preset
from matwm_fast.env import MultiAgentEnv, random_actions
from matwm_fast.trainer import Trainer

from support import ROOT, subprocess_env  # noqa: E402
ENV = subprocess_env()

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke trainer past warm-up (40 steps) with a few updates, and its run dir with 3 checkpoints."""
    run_dir = tmp_path_factory.mktemp("ckpt")
    cfg = preset("smoke")
    tr = Trainer(cfg, "cpu")
    cdir = ck.CheckpointDir(run_dir, keep=2)
    paths = []
    for stop in (42, 44, 46):
        while tr.step < stop:
            tr.train_step()
        paths.append(cdir.write(tr, {"imagined_total": tr.step}))
    return tr, run_dir, paths


@pytest.mark.parametrize("scenario", ["simple_tag", "simple_world_comm"])
def test_env_state_continues_exactly(scenario):
    """A resume restores into a *fresh* env (another seed): the world and its RNG must carry over."""
    a = MultiAgentEnv(EnvConfig(scenario=scenario, max_cycles=10), seed=0)
    rng = np.random.default_rng(0)
    for _ in range(7):
        a.step(random_actions(rng, a.spec))
    blob = a.get_state()
    b = MultiAgentEnv(EnvConfig(scenario=scenario, max_cycles=10), seed=123)  # another world
    b.set_state(blob)
    for _ in range(25):  # crosses episode ends: the env's own RNG must match too
        act = random_actions(rng, a.spec)
        oa, ra, ca, da = a.step(act)
        ob, rb, cb, db = b.step(act)
        assert np.array_equal(oa, ob) and np.array_equal(ra, rb) and np.array_equal(ca, cb) and da == db
        if da:
            assert np.array_equal(a.reset(), b.reset())


def test_round_trip_restores_everything(trained):
    tr, run_dir, paths = trained
    st = ck.load(ck.resolve(run_dir))
    assert st["step"] == 46 and st["extra"] == {"imagined_total": 46}
    fresh = Trainer(preset("smoke"), "cpu")
    ck.load_trainer_state(fresh, st)
    assert fresh.step == tr.step and fresh.first == tr.first and np.array_equal(fresh.obs, tr.obs)
    for x, y in [(fresh.wm, tr.wm), (fresh.ac, tr.ac)]:  # incl. slow critics and return scales
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert any("slow_critic" in k for k in fresh.ac.state_dict()) and "return_scale" in fresh.ac.state_dict()
    opt_x, opt_y = fresh.wm_opt.state_dict()["state"], tr.wm_opt.state_dict()["state"]
    assert all(torch.equal(opt_x[i]["exp_avg_sq"], opt_y[i]["exp_avg_sq"]) for i in opt_y)
    assert len(fresh.replay) == len(tr.replay) == 46
    assert torch.equal(fresh.replay.obs[:, :46], tr.replay.obs[:, :46])
    assert fresh.rng.bit_generator.state == tr.rng.bit_generator.state
    assert fresh.queues.count == tr.queues.count and torch.equal(fresh.queues.obs, tr.queues.obs)


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


def test_cli_refuses_truncated_checkpoint(tmp_path, trained):
    path = _damaged(tmp_path, trained[2][-1], "truncated")
    older = path.parent / "step_000000040.pt"
    older.write_bytes(trained[2][1].read_bytes())  # an intact older one: the message points at it
    proc = subprocess.run([sys.executable, "-m", "matwm_fast.train", "--resume", str(path.parent.parent)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert f"error: {path} is corrupt or truncated (checksum mismatch); refusing to load it" in proc.stderr
    assert "step_000000040.pt (pass one as --resume PATH)" in proc.stderr
    assert not (path.parent.parent / "metrics.jsonl").exists()  # refused before training started


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(ck.CheckpointError, match="neither a run directory nor a checkpoint file"):
        ck.resolve(tmp_path / "nope")
    with pytest.raises(ck.CheckpointError, match="no checkpoint in .*is .* a matwm_fast run directory"):
        ck.resolve(tmp_path)


def test_incompatible_checkpoint_is_refused(trained):
    st = ck.load(trained[2][-1])
    cfg = preset("smoke")
    other = Trainer(replace(cfg, wm=replace(cfg.wm, width=64)), "cpu")
    with pytest.raises(ck.CheckpointError, match=r"different config: wm\.width: checkpoint 32 vs requested 64"):
        ck.load_trainer_state(other, st)
    # only settings that do not change learning may differ
    ck.check_compatible(st, replace(cfg, train=replace(cfg.train, steps=999, eval_every=5)))
    # a config from another version of the code: unknown and missing fields are named
    bad = {**st, "config": copy.deepcopy(st["config"])}
    bad["config"]["wm"]["warp"] = 9
    del bad["config"]["ac"]["gamma"]
    with pytest.raises(ck.CheckpointError, match="unknown field wm.warp; missing field ac.gamma"):
        ck.saved_config(bad)
    # a missing run-time setting (added to the config later) takes its default instead
    older = {**st, "config": copy.deepcopy(st["config"])}
    del older["config"]["train"]["threads"]
    assert ck.saved_config(older).train.threads == 0
    # weights that do not fit the model its config builds
    shapes = {**st, "wm": {k: v[..., :1] if v.ndim else v for k, v in st["wm"].items()}}
    with pytest.raises(ck.CheckpointError, match="does not fit the model"):
        ck.load_trainer_state(Trainer(cfg, "cpu"), shapes)


def test_gpu_checkpoint_resumes_on_cpu(trained):
    """A ``cudagraphs`` run saves Adam ``capturable`` with tensor learning rates; resumed on the
    CPU (eager) those runtime settings must be the CPU trainer's, or Adam refuses to step."""
    st = ck.load(trained[2][-1])
    for key in ("wm_opt", "ac_opt"):
        st[key] = copy.deepcopy(st[key])
        for g in st[key]["param_groups"]:
            g["capturable"], g["lr"] = True, torch.tensor(float(g["lr"]))
    tr = Trainer(preset("smoke"), "cpu")
    ck.load_trainer_state(tr, st)
    for opt, lr in ((tr.wm_opt, 1e-3), (tr.ac_opt, 3e-4)):
        assert all(g["capturable"] is False and g["lr"] == lr and isinstance(g["lr"], float) for g in opt.param_groups)
    assert tr.train_step() is not None  # steps, from the restored Adam moments
