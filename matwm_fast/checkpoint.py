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

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import Config

MAGIC = b"MATWMCK1"
_HASH = 32


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another config."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def trainer_state(tr) -> dict:
    """Everything of a :class:`~matwm_fast.trainer.Trainer` the next step depends on."""
    return {
        "config": tr.cfg.to_dict(),
        "step": tr.step,
        "wm": tr.wm.state_dict(),
        "ac": tr.ac.state_dict(),
        "wm_opt": tr.wm_opt.state_dict(),
        "ac_opt": tr.ac_opt.state_dict(),
        "replay": tr.replay.state_dict(),
        "env": tr.env.get_state(),
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


def load_trainer_state(tr, st: dict) -> None:
    dev = tr.device
    tr.step = st["step"]
    tr.wm.load_state_dict(st["wm"])
    tr.ac.load_state_dict(st["ac"])
    tr.wm_opt.load_state_dict(st["wm_opt"])
    tr.ac_opt.load_state_dict(st["ac_opt"])
    tr.replay.load_state_dict(st["replay"])
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


def save(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    blob = buf.getvalue()
    _atomic_write(Path(path), MAGIC + hashlib.sha256(blob).digest() + blob)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if len(data) < len(MAGIC) + _HASH or data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a matwm_fast checkpoint (bad header; truncated or another format)")
    digest, blob = data[len(MAGIC): len(MAGIC) + _HASH], data[len(MAGIC) + _HASH:]
    if hashlib.sha256(blob).digest() != digest:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch); refusing to load it")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


class CheckpointDir:
    """``RUN_DIR/checkpoints/step_XXXXXXXX.pt`` plus ``latest`` naming the newest good one."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def write(self, tr, extra: dict | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{tr.step:09d}.pt"
        payload = trainer_state(tr)
        payload["extra"] = extra or {}
        save(path, payload)
        _atomic_write(self.dir / "latest", path.name.encode())
        self._prune(keep_name=path.name)
        return path

    def _prune(self, keep_name: str) -> None:
        ckpts = sorted(self.dir.glob("step_*.pt"))
        for old in ckpts[: max(0, len(ckpts) - max(self.keep, 1))]:
            if old.name != keep_name:
                old.unlink(missing_ok=True)

    def latest(self) -> Path:
        ptr = self.dir / "latest"
        if not ptr.exists():
            raise CheckpointError(f"no checkpoint in {self.dir} (no 'latest' file)")
        return self.dir / ptr.read_text().strip()


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
