"""Checkpoints that survive crashes and resume exactly.

A checkpoint holds everything the next step depends on: world model, actors, critics, slow
critics, return scales, both optimisers, the replay buffers, the env (world state and its RNG),
every RNG (Python, numpy, torch, the trainer's and the replay's generators), the context queues,
episode counters, unflushed metric sums and the config.

File format: ``MAGIC | sha256(payload) | payload`` where payload is a ``torch.save`` blob.  It is
written to a temporary file in the same directory, fsynced, then renamed over the target (atomic
on POSIX), and ``latest`` is updated the same way — a crash mid-write leaves the previous
checkpoint intact, and a truncated or corrupted file fails its hash and is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import SECTION_TYPES, Config

MAGIC = b"MATWMCK1"
_HASH = 32
FORMAT = 1  # bump when the payload's layout changes

# settings that may change when a run resumes: they do not alter what has been learned
RESUMABLE = frozenset({"train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                       "train.eval_every", "train.eval_episodes", "train.device", "train.backend",
                       "train.kernels", "train.amp", "train.threads"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another config."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write itself failed
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------- trainer state
def trainer_state(tr) -> dict:
    """Everything of a :class:`~matwm_fast.trainer.Trainer` the next step depends on."""
    return {
        "format": FORMAT,
        "config": tr.cfg.to_dict(),
        "agents": list(tr.spec.agents),
        "step": tr.step,
        "wm": tr.wm.state_dict(),
        "ac": tr.ac.state_dict(),
        "wm_opt": tr.wm_opt.state_dict(),
        "ac_opt": tr.ac_opt.state_dict(),
        "replay": tr.replay.state_dict(),
        "env": tr.env.get_state(),  # world, its RNG and the wrappers' flags (not a plain pickle: EzPickle)
        "obs": tr.obs,
        "first": tr.first,
        "queues": (tr.queues.obs.cpu(), tr.queues.act.cpu(), tr.queues.count),
        "episodes": (tr.episodes.current.copy(), list(tr.episodes.finished)),
        "bad": (tr.bad_step.cpu(), tr.bad_which.cpu()),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "trainer": tr.rng.bit_generator.state,
        },
    }


def saved_config(st: dict) -> Config:
    """The checkpoint's config; refused when its fields are not this version's."""
    d = st.get("config")
    if not isinstance(d, dict):
        raise CheckpointError("checkpoint holds no config")
    problems = []
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    for sec, cls in SECTION_TYPES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        have, want = set(d.get(sec, {})), set(fields)
        problems += [f"unknown field {sec}.{k}" for k in sorted(have - want)]
        for k in sorted(want - have):
            # a field added later that only says how to run (not what is learned) takes its default
            if f"{sec}.{k}" in RESUMABLE:
                d.setdefault(sec, {})[k] = fields[k].default
            else:
                problems.append(f"missing field {sec}.{k}")
    if problems:
        raise CheckpointError("checkpoint was written by an incompatible version of matwm_fast: "
                              + "; ".join(problems))
    return Config.from_dict(d)


def check_compatible(st: dict, cfg: Config, ignore=RESUMABLE) -> None:
    """Refuse a checkpoint whose config differs from ``cfg`` in anything but ``ignore``."""
    diff = config_diff(saved_config(st), cfg, ignore=set(ignore))
    if diff:
        raise CheckpointError("checkpoint is from a different config: " + "; ".join(diff))


# how an optimiser runs, not what it learns: kept from the trainer's own optimiser on load
_RUNTIME_KEYS = ("capturable", "foreach", "fused", "differentiable", "lr")


def _load_optimizer(opt: torch.optim.Optimizer, sd: dict) -> None:
    """``opt.load_state_dict(sd)``, keeping ``opt``'s runtime settings.

    ``load_state_dict`` replaces every group setting with the saved one, but device and backend
    may change on resume: the ``cudagraphs`` backend runs Adam ``capturable`` with a float32
    device-tensor learning rate, eager on the CPU neither.  So those settings stay ``opt``'s —
    the learning rate included: it comes from the config, which a resume cannot change.  They go
    in before loading (Adam places its ``step`` counters as ``capturable`` wants) and the very
    objects are put back after (loading deep-copies groups; a CUDA graph may hold the lr tensor).
    """
    runtime = [{k: g[k] for k in _RUNTIME_KEYS if k in g} for g in opt.param_groups]
    groups = [{**saved, **cur} for saved, cur in zip(sd["param_groups"], runtime)]
    opt.load_state_dict({"state": sd["state"], "param_groups": groups})
    for g, cur in zip(opt.param_groups, runtime):
        g.update(cur)


def load_trainer_state(tr, st: dict) -> None:
    """Restore a trainer built from the checkpoint's config (``check_compatible`` first)."""
    check_compatible(st, tr.cfg)
    if st.get("agents", list(tr.spec.agents)) != list(tr.spec.agents):
        raise CheckpointError(f"checkpoint agents {st['agents']} differ from this env's {list(tr.spec.agents)}")
    dev = tr.device
    try:
        tr.wm.load_state_dict(st["wm"])
        tr.ac.load_state_dict(st["ac"])
        _load_optimizer(tr.wm_opt, st["wm_opt"])
        _load_optimizer(tr.ac_opt, st["ac_opt"])
        tr.replay.load_state_dict(st["replay"])
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or keys of another model
        raise CheckpointError(f"checkpoint does not fit the model built from its config: {e}") from e
    tr.step = st["step"]
    tr.env.set_state(st["env"])
    tr.obs, tr.first = st["obs"], st["first"]
    qo, qa, qc = st["queues"]
    tr.queues.obs, tr.queues.act, tr.queues.count = qo.to(dev), qa.to(dev), qc
    tr.episodes.current, tr.episodes.finished = st["episodes"][0].copy(), list(st["episodes"][1])
    tr.bad_step.copy_(st["bad"][0])
    tr.bad_which.copy_(st["bad"][1])
    rng = st["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    tr.rng.bit_generator.state = rng["trainer"]


# ----------------------------------------------------------------------------- files
def save(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    blob = buf.getvalue()
    _atomic_write(Path(path), MAGIC + hashlib.sha256(blob).digest() + blob)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if len(data) < len(MAGIC) + _HASH or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a matwm_fast checkpoint (bad header; truncated or another format)"
                              + _others(path))
    digest, blob = data[len(MAGIC): len(MAGIC) + _HASH], data[len(MAGIC) + _HASH:]
    if hashlib.sha256(blob).digest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch); refusing to load it"
                              + _others(path))
    try:
        st = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    except Exception as e:  # intact bytes this torch cannot read (e.g. written by a newer one)
        raise CheckpointError(f"{path} passed its checksum but cannot be read: {e}") from e
    if not isinstance(st, dict) or st.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {st.get('format') if isinstance(st, dict) else '?'}; "
                              f"this version reads format {FORMAT}")
    return st


def _others(path: Path) -> str:
    """A hint naming the other checkpoints next to a bad one (each can be resumed from by path)."""
    others = sorted(p.name for p in path.parent.glob("step_*.pt") if p.name != path.name)
    if not others:
        return ""
    return f"; other checkpoints in {path.parent}: {', '.join(others)} (pass one as --resume PATH)"


def resolve(path: Path | str) -> Path:
    """A run directory (→ its latest checkpoint) or a checkpoint file → the checkpoint file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint file")
    return CheckpointDir(path).latest()


def run_dir_of(ckpt: Path) -> Path:
    """``RUN_DIR/checkpoints/step_X.pt`` → ``RUN_DIR``."""
    return Path(ckpt).resolve().parent.parent


class CheckpointDir:
    """``RUN_DIR/checkpoints/step_XXXXXXXXX.pt`` plus ``latest`` naming the newest good one."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def write(self, tr, extra: dict | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{tr.step:09d}.pt"
        payload = trainer_state(tr)
        payload["extra"] = extra or {}
        save(path, payload)
        # the pointer moves only after the file is complete, and pruning only after the pointer
        self.point_to(path)
        self._prune(keep_name=path.name)
        return path

    def point_to(self, path: Path) -> None:
        """Make ``path`` (a file in this directory) the ``latest`` checkpoint."""
        _atomic_write(self.dir / "latest", Path(path).name.encode())

    def _prune(self, keep_name: str) -> None:
        ckpts = sorted(self.dir.glob("step_*.pt"))
        for old in ckpts[: max(0, len(ckpts) - max(self.keep, 1))]:
            if old.name != keep_name:
                old.unlink(missing_ok=True)

    def latest(self) -> Path:
        ptr = self.dir / "latest"
        if ptr.exists():
            path = self.dir / ptr.read_text().strip()
            if not path.exists():
                raise CheckpointError(f"{ptr} names {path.name}, which is missing" + _others(path))
            return path
        # no pointer (e.g. copied by hand): the newest step file, if any
        ckpts = sorted(self.dir.glob("step_*.pt"))
        if not ckpts:
            raise CheckpointError(f"no checkpoint in {self.dir} (is {self.dir.parent} a matwm_fast run directory?)")
        return ckpts[-1]


def config_diff(a: Config, b: Config, ignore: set[str]) -> list[str]:
    """Fields (``section.field``) where two configs differ, leaving out ``ignore``."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for sec in da:
        if not isinstance(da[sec], dict):
            continue
        for k in da[sec]:
            key = f"{sec}.{k}"
            va, vb = da[sec][k], db[sec].get(k)
            if isinstance(va, (list, tuple)):
                va, vb = [list(x) for x in va], [list(x) for x in (vb or [])]
            if key not in ignore and va != vb:
                out.append(f"{key}: checkpoint {va!r} vs requested {vb!r}")
    return out
