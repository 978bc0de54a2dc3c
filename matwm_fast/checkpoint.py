"""Checkpoint files and run directories: file I/O only, and nothing a reader opens can run code.

A checkpoint is the trainer's ``state_dict()`` plus the run's bookkeeping (``extra``), a tree of
plain values: numbers, strings, lists, tuples, dicts and tensors.  File format 2:

    MAGIC (8 bytes) | sha256 of the rest (32) | header length (8, little-endian) | header | data

The header is JSON: the tree, with each tensor replaced by ``{"__tensor__": i}``, and a table of
the tensors' dtype, shape and byte range inside ``data``.  Reading parses JSON and copies bytes
into tensors of allowed dtypes — there is no pickle anywhere, so a crafted file can at worst be
refused.  Format 1 (a pickled ``torch.save``) is refused by name: reading it would mean
unpickling it.  Files are written to a temporary name, fsynced and renamed (atomic on POSIX);
a truncated or corrupted file fails its checksum and is refused.

A run directory holds one run: ``config.json``, ``metrics.jsonl``/``.csv``, ``checkpoints/``.
:class:`RunDir` takes an exclusive lock on it for the life of the process (a second trainer,
resume or sweep into it is refused, naming the holder's pid), refuses a fresh run where a run
already is, and on resume removes what a killed run left behind (rows logged after its last
checkpoint, checkpoints of an abandoned future, temporary files of an interrupted write).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

MAGIC = b"MATWMCK2"
OLD_MAGIC = {b"MATWMCK1": 1}  # format 1: a pickled payload, never read
FORMAT = 2
_HASH, _LEN = 32, 8
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used: missing, corrupt, foreign, in use."""


# ----------------------------------------------------------------------------- tree <-> bytes
def _encode(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(tree, list):
        return [_encode(x, tensors) for x in tree]
    if isinstance(tree, tuple):
        return {"__tuple__": [_encode(x, tensors) for x in tree]}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: _encode(v, tensors) for k, v in tree.items()}
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k in tree):
            raise TypeError(f"checkpoint dict keys must be plain values, got {[type(k).__name__ for k in tree]}")
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in tree.items()]}
    raise TypeError(f"a checkpoint holds only data; got a {type(tree).__name__}")


def _decode(node: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(x, tensors) for x in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, x), = node.items()
        if tag == "__tensor__":
            return tensors[x]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in x)
        if tag == "__dict__":
            return {k: _decode(v, tensors) for k, v in x}
    return {k: _decode(v, tensors) for k, v in node.items()}


def dumps(tree: Any) -> bytes:
    """A tree of plain values and tensors → file bytes (format 2)."""
    tensors: list[torch.Tensor] = []
    header = {"format": FORMAT, "tree": _encode(tree, tensors), "tensors": []}
    chunks, offset = [], 0
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header["tensors"].append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                  "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    body = len(head).to_bytes(_LEN, "little") + head + b"".join(chunks)
    return MAGIC + hashlib.sha256(body).digest() + body


def loads(data: bytes, name: str = "checkpoint") -> Any:
    """File bytes → the tree; CheckpointError (saying what is wrong) for anything else."""
    magic = data[: len(MAGIC)]
    if magic in OLD_MAGIC:
        raise CheckpointError(
            f"{name} is in checkpoint format {OLD_MAGIC[magic]} (a pickled file, written by matwm_fast 0.1); "
            f"this version reads format {FORMAT} only, which holds data alone: opening a format-1 file would "
            "mean unpickling it, and unpickling can run code. Retrain, or resume it with matwm_fast 0.1")
    if len(data) < len(MAGIC) + _HASH + _LEN or magic != MAGIC:
        raise CheckpointError(f"{name} is not a matwm_fast checkpoint (bad header; truncated or another format)")
    digest, body = data[len(MAGIC): len(MAGIC) + _HASH], data[len(MAGIC) + _HASH:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{name} is corrupt or truncated (checksum mismatch); refusing to load it")
    try:
        n = int.from_bytes(body[:_LEN], "little")
        header = json.loads(body[_LEN: _LEN + n])
        blob = memoryview(body)[_LEN + n:]
        tensors = []
        for t in header["tensors"]:
            dtype, shape, off, nb = _DTYPES[t["dtype"]], [int(s) for s in t["shape"]], int(t["offset"]), int(t["nbytes"])
            if off < 0 or off + nb > len(blob) or nb != torch.Size(shape).numel() * dtype.itemsize:
                raise ValueError(f"tensor bytes [{off}, {off + nb}) do not fit")
            raw = bytearray(blob[off: off + nb])
            tensors.append(torch.frombuffer(raw, dtype=dtype).reshape(shape) if nb else torch.empty(shape, dtype=dtype))
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}")
        return _decode(header["tree"], tensors)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{name} passed its checksum but is malformed ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- files
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


def save(path: Path | str, tree: Any) -> None:
    _atomic_write(Path(path), dumps(tree))


def load(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        st = loads(path.read_bytes(), str(path))
    except CheckpointError as e:
        raise CheckpointError(str(e) + _others(path)) from None
    if not isinstance(st, dict) or "trainer" not in st:
        raise CheckpointError(f"{path} holds no trainer state")
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


def step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


class CheckpointDir:
    """``RUN_DIR/checkpoints/step_XXXXXXXXX.pt`` plus ``latest`` naming the newest good one."""

    def __init__(self, run_dir: Path | str, keep: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def write(self, step: int, tree: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:09d}.pt"
        save(path, tree)
        # the pointer moves only after the file is complete, and pruning only after the pointer
        self.point_to(path)
        for old in sorted(self.dir.glob("step_*.pt"))[: -max(self.keep, 1)]:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def point_to(self, path: Path) -> None:
        """Make ``path`` (a file in this directory) the ``latest`` checkpoint."""
        _atomic_write(self.dir / "latest", Path(path).name.encode())

    def latest(self) -> Path:
        ptr = self.dir / "latest"
        if ptr.exists():
            path = self.dir / ptr.read_text().strip()
            if not path.is_file():
                raise CheckpointError(f"{ptr} names {path.name}, which is missing" + _others(path))
            return path
        # no pointer (e.g. copied by hand): the newest step file, if any
        ckpts = sorted(self.dir.glob("step_*.pt"))
        if not ckpts:
            raise CheckpointError(f"no checkpoint in {self.dir} (is {self.dir.parent} a matwm_fast run directory?)")
        return ckpts[-1]

    def latest_or_none(self) -> Path | None:
        try:
            return self.latest()
        except CheckpointError:
            return None


# ----------------------------------------------------------------------------- locks
class LockHeld(CheckpointError):
    """The lock file is held by another process (``holder``: its pid as written in the file)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by process {holder}")
        self.path, self.holder = path, holder


def lock_file(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` (created if missing), with this process's pid written in
    it for the next one to name; returns the descriptor (the lock lasts until it is closed or the
    process dies, so a killed holder never leaves a stale lock).  :class:`LockHeld` if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise LockHeld(Path(path), holder) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def unlock_file(fd: int) -> None:
    os.close(fd)  # closing the descriptor releases the flock


def lock_holder(path: Path) -> str | None:
    """The pid written in lock file ``path`` while some process holds it; None when it is free
    (or missing).  Checked by taking the lock for an instant (nothing is written), so a process
    locking it in that instant is refused: for a waiter, not for polling a run that is starting."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- run directories
class RunDir:
    """One run's directory, locked by this process while it trains."""

    RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "checkpoints", "tb")

    def __init__(self, path: Path | str, keep: int = 2):
        self.path = Path(path)
        self.checkpoints = CheckpointDir(self.path, keep)
        self._lock_fd: int | None = None

    def holds_run(self) -> bool:
        return any((self.path / f).exists() for f in self.RUN_FILES)

    def open(self, fresh: bool, overwrite: bool = False) -> None:
        """Claim the directory for this process, before the first step: a fresh run is refused
        where a run already is (unless ``overwrite``, which deletes that run's files: config,
        metrics, checkpoints, TensorBoard events), the directory is locked, and a probe write
        checks now, not at the first checkpoint, that it and ``checkpoints/`` can be written."""
        if fresh and self.holds_run() and not overwrite:
            raise CheckpointError(
                f"{self.path} already holds a run; continue it with --resume {self.path}, start elsewhere "
                "with a new --run-dir, or replace it with --overwrite")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"run directory {self.path} cannot be created ({e.strerror or e})") from None
        self.lock()
        try:
            if fresh:
                for name in self.RUN_FILES:
                    p = self.path / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            for d in (self.path, self.checkpoints.dir):
                d.mkdir(exist_ok=True)
                probe = d / f".probe{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as e:
            self.unlock()
            raise CheckpointError(f"run directory {self.path} is not writable: {e.filename}: "
                                  f"{e.strerror or e}") from None

    def lock(self) -> None:
        """Hold an exclusive lock on the directory until this process exits (or :meth:`unlock`)."""
        try:
            self._lock_fd = lock_file(self.path / ".lock")
        except LockHeld as e:
            raise CheckpointError(f"run directory {self.path} is in use by process {e.holder} "
                                  "(another training, resume or sweep); wait for it or choose another --run-dir") from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            unlock_file(self._lock_fd)
            self._lock_fd = None

    def clean_temporary(self) -> list[Path]:
        """Remove the temporary files of writes a killed process never finished."""
        found = [p for d in (self.path, self.checkpoints.dir) if d.is_dir() for p in d.glob(".*.tmp*")]
        for p in found:
            p.unlink(missing_ok=True)
        return found

    def abandon_after(self, step: int) -> list[Path]:
        """Resuming from ``step``: checkpoints after it belong to an abandoned future.  They are
        renamed ``*.abandoned`` (kept, out of the way of pruning and ``latest``)."""
        later = [p for p in self.checkpoints.dir.glob("step_*.pt") if step_of(p) > step]
        for p in later:
            p.rename(p.with_name(p.name + ".abandoned"))
        here = self.checkpoints.dir / f"step_{step:09d}.pt"
        if later and here.exists():
            self.checkpoints.point_to(here)
        return later

    def write_config(self, config: dict) -> None:
        _atomic_write(self.path / "config.json", (json.dumps(config, indent=2) + "\n").encode())

    def read_config(self) -> dict | None:
        f = self.path / "config.json"
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f} is not valid JSON ({e})") from e
