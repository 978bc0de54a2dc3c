"""Checkpoint files and run directories: file I/O only, and nothing a reader opens can run code.

A checkpoint is the trainer's ``state_dict()`` plus the run's bookkeeping (``extra``): a tree of
numbers, strings, lists, tuples, dicts and tensors.  Format 3 is a plain safetensors file, each
tensor named by its path in the tree (``trainer/wm/encoder.0.weight``), its metadata holding
``format`` (``matwm_fast/3``), the ``tree`` as JSON (tensors as ``{"__tensor__": name}``, tuples
and dicts with keys other than strings tagged) and ``sha256``: the digest of every byte of the file,
its own 64 hex digits read as zeros.  Reading parses JSON and copies bytes into tensors of allowed
dtypes, each named once by the tree — no pickle anywhere, so a crafted file can at worst be refused.
Format 2 (the hand-written codec before it) is still read, never written; format 1 (a pickled
``torch.save``) is refused by name: reading it would mean unpickling it.  Files are written to a
temporary name, fsynced and renamed (atomic on POSIX).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

FORMAT = 3
TAG = f"matwm_fast/{FORMAT}"  # the metadata's "format"
OLD_MAGIC = {b"MATWMCK1": 1, b"MATWMCK2": 2}  # format 1: a pickled payload, never read; 2: read only
# safetensors' names of the dtypes a checkpoint holds (the writer refuses others, the reader too)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
_DIGEST, _ZEROS = b'"sha256":"', b"0" * 64  # JSON escapes the quotes inside strings: the key occurs once
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used: missing, corrupt, foreign, in use."""


# ----------------------------------------------------------------------------- tree <-> JSON
def _encode(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """The tree as JSON data; its tensors go into ``tensors`` under their path in it."""
    at = lambda k: f"{path}/{k}" if path else str(k)  # noqa: E731
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, torch.Tensor):
        if tree.dtype not in _NAMES:
            raise TypeError(f"checkpoint tensor {path} is {tree.dtype}; a checkpoint holds {sorted(map(str, _NAMES))}")
        name = path
        while name in tensors:  # keys 0 and "0" of one dict: the same path
            name += "'"
        tensors[name] = tree
        return {"__tensor__": name}
    if isinstance(tree, list):
        return [_encode(x, tensors, at(i)) for i, x in enumerate(tree)]
    if isinstance(tree, tuple):
        return {"__tuple__": [_encode(x, tensors, at(i)) for i, x in enumerate(tree)]}
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: _encode(v, tensors, at(k)) for k, v in tree.items()}
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k in tree):
            raise TypeError(f"checkpoint dict keys must be plain values, got {[type(k).__name__ for k in tree]}")
        return {"__dict__": [[k, _encode(v, tensors, at(k))] for k, v in tree.items()]}
    raise TypeError(f"a checkpoint holds only data; got a {type(tree).__name__}")


def _decode(node: Any, tensor: Callable[[Any], torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(x, tensor) for x in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, x), = node.items()
        if tag == "__tensor__":
            return tensor(x)
        if tag == "__tuple__":
            return tuple(_decode(v, tensor) for v in x)
        if tag == "__dict__":
            return {k: _decode(v, tensor) for k, v in x}
    return {k: _decode(v, tensor) for k, v in node.items()}


# ----------------------------------------------------------------------------- tree <-> file
def _chunks(tree: Any) -> list:
    """The file's bytes, in three pieces around its digest (written without joining them)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": TAG, "sha256": _ZEROS.decode(),
            "tree": json.dumps(_encode(tree, tensors, ""), separators=(",", ":"))}
    flat, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        flat[name] = t.clone() if t.numel() and ptr in seen else t  # safetensors refuses shared memory
        seen.add(ptr)
    blob = memoryview(safetensors.torch.save(flat, metadata=meta))
    at = bytes(blob[: 8 + int.from_bytes(blob[:8], "little")]).index(_DIGEST + _ZEROS) + len(_DIGEST)
    return [blob[:at], hashlib.sha256(blob).hexdigest().encode(), blob[at + len(_ZEROS):]]


def dumps(tree: Any) -> bytes:
    """A tree of plain values and tensors → file bytes (format 3)."""
    return b"".join(_chunks(tree))


def loads(data: bytes, name: str = "checkpoint") -> Any:
    """File bytes → the tree; CheckpointError (saying what is wrong) for anything else."""
    magic = bytes(data[:8])
    if OLD_MAGIC.get(magic) == 2:
        return _loads_format2(data, name)
    if magic in OLD_MAGIC:
        raise CheckpointError(
            f"{name} is in checkpoint format 1 (a pickled file, written by matwm_fast 0.1); this version reads "
            f"formats 2 and {FORMAT} only, which hold data alone: opening a format-1 file would mean unpickling "
            "it, and unpickling can run code. Retrain, or resume it with matwm_fast 0.1")
    header = _header(data, name)
    try:
        odd = {k: v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] not in _DTYPES}
        if odd:
            raise ValueError(f"tensors of dtypes a checkpoint never holds: {odd}")
        tensors, named = safetensors.torch.load(bytes(data)), set()

        def tensor(key: Any) -> torch.Tensor:
            if not isinstance(key, str) or key not in tensors or key in named:
                raise ValueError(f"its tree names tensor {key!r}, which the file does not hold (or names it twice)")
            named.add(key)
            return tensors[key]

        tree = _decode(json.loads(header["__metadata__"]["tree"]), tensor)
        if len(named) != len(tensors):
            raise ValueError(f"it holds tensors its tree never names: {sorted(set(tensors) - named)[:5]}")
        return tree
    except _MALFORMED as e:
        raise CheckpointError(f"{name} passed its checksum but is malformed ({type(e).__name__}: {e})") from e


def _header(data: bytes, name: str) -> dict:
    """The safetensors header of a matwm_fast checkpoint whose checksum holds; else CheckpointError."""
    n, header = int.from_bytes(data[:8], "little"), None
    if len(data) >= 10 and n <= len(data) - 8 and data[8:9] == b"{":
        try:
            header = json.loads(bytes(data[8: 8 + n]))
        except (ValueError, RecursionError):
            pass
    if not isinstance(header, dict):
        pickled = bytes(data[:4]) == b"PK\x03\x04" or bytes(data[:1]) == b"\x80"  # torch.save's zip, a pickle
        raise CheckpointError(f"{name} is not a matwm_fast checkpoint (bad header; truncated or another format)"
                              + ("; a zip or pickle is never opened: unpickling can run code" if pickled else ""))
    meta = header.get("__metadata__")
    tag = meta.get("format") if isinstance(meta, dict) else None
    if tag != TAG:
        raise CheckpointError(f"{name} is a safetensors file but not a matwm_fast checkpoint this version reads "
                              f"(metadata format {tag!r}; it reads {TAG!r} and format 2)")
    digest = meta.get("sha256")  # of the whole file, the digest's own digits read as zeros
    key, head = _DIGEST + str(digest).encode() + b'"', bytes(data[8: 8 + n])
    if not (isinstance(digest, str) and len(digest) == len(_ZEROS) and head.count(key) == 1
            and _sha256(data, 8 + head.index(key) + len(_DIGEST)) == digest):
        raise CheckpointError(f"{name} is corrupt or truncated (checksum mismatch); refusing to load it")
    return header


def _sha256(data: bytes, at: int) -> str:
    """The sha256 of ``data`` with the 64 bytes at ``at`` (the digest's own place) read as zeros."""
    h = hashlib.sha256(memoryview(data)[:at])
    h.update(_ZEROS)
    h.update(memoryview(data)[at + len(_ZEROS):])
    return h.hexdigest()


def _loads_format2(data: bytes, name: str) -> Any:
    """Format 2, read only: MAGIC | sha256 of the rest | header length (8) | JSON header (the tree,
    tensors as ``{"__tensor__": i}``, and each tensor's dtype, shape and byte range) | raw bytes."""
    digest, body = data[8:40], data[40:]
    if len(data) < 48:
        raise CheckpointError(f"{name} is not a matwm_fast checkpoint (bad header; truncated or another format)")
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{name} is corrupt or truncated (checksum mismatch); refusing to load it")
    dtypes = {str(t).removeprefix("torch."): t for t in _DTYPES.values()}
    try:
        n = int.from_bytes(body[:8], "little")
        header, blob, tensors = json.loads(body[8: 8 + n]), memoryview(body)[8 + n:], []
        for t in header["tensors"]:
            dtype, shape, off, nb = dtypes[t["dtype"]], [int(s) for s in t["shape"]], int(t["offset"]), int(t["nbytes"])
            if off < 0 or off + nb > len(blob) or nb != torch.Size(shape).numel() * dtype.itemsize:
                raise ValueError(f"tensor bytes [{off}, {off + nb}) do not fit")
            raw = bytearray(blob[off: off + nb])
            tensors.append(torch.frombuffer(raw, dtype=dtype).reshape(shape) if nb else torch.empty(shape, dtype=dtype))
        if header.get("format") != 2:
            raise ValueError(f"format {header.get('format')!r}")
        return _decode(header["tree"], tensors.__getitem__)
    except _MALFORMED as e:
        raise CheckpointError(f"{name} passed its checksum but is malformed ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------- files
def _atomic_write(path: Path, data: bytes | list) -> None:
    """``data`` (bytes, or pieces of them) into ``path`` whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
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
    _atomic_write(Path(path), _chunks(tree))


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


def has_checkpoint(run_dir: Path | str) -> bool:
    """Whether the run has written a checkpoint (a step file or ``latest``), even a damaged one: the
    run is then resumed or evaluated, and the reader names what is wrong, never started over."""
    d = Path(run_dir) / "checkpoints"
    return (d / "latest").exists() or any(d.glob("step_*.pt"))


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
