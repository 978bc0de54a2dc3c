"""Inductor's compile cache carried from one lent GPU to the next.

A GPU is lent for 15 minutes and starts bare, and two checks in a row (2026-11-27 on an H100,
2026-11-28 on an H200) spent their compiled stages compiling: a cold compile of the training step
takes minutes there, as on the CPU (about 160 s at the ``smoke`` preset on 2 cores, nearly all of
it Inductor's lowering, code generation and kernel compilation, not Dynamo's tracing).  What one
check compiled is worth keeping for the next: :func:`pack` writes the check's Inductor cache
directory to one ``tar.gz`` that comes back with its results, and :func:`restore` unpacks it into
the next check's cache directory, where Inductor's FX-graph and AOTAutograd caches find it.  Graphs
that changed since miss and compile as before; the rest load in seconds.

The archive is the project's own output, carried by its own device command and never committed;
still an archive holding anything but relative files and folders (an absolute or ``..`` name, a
link, a device file) is refused whole before a byte is written, and what is written passes
tarfile's ``data`` filter.

Budget: a device call returns files of at most 16 MiB, and what travels to it (the tracked tree,
the wheels, this archive) is at most 64 MiB: :func:`pack` keeps the files compiled first (the
earliest stages' graphs, needed first next time) within ``budget`` bytes compressed.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

ARCHIVE = "compile-cache.tar.gz"  # its name in the check's --out
BUDGET = 15 * 2**20  # a device call returns files of at most 16 MiB


class CacheError(ValueError):
    """An archive that is not a plain tree of files."""


def restore(archive: Path, cache_dir: Path) -> dict:
    """Unpack ``archive`` into ``cache_dir``; what was restored (nothing when there is no archive)."""
    archive, cache_dir = Path(archive), Path(cache_dir)
    if not archive.exists():
        return {"restored": False, "note": f"{archive} not found: a cold start"}
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:  # refuse the whole archive before writing any of it
                # pack writes relative names of files and folders only: anything else is not ours
                if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                    raise CacheError(f"{archive}: {m.name!r} refused (only relative files and folders)")
                try:
                    tarfile.data_filter(m, str(cache_dir))
                except tarfile.FilterError as e:
                    raise CacheError(f"{archive}: {m.name!r} refused ({type(e).__name__})") from None
            tar.extractall(cache_dir, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CacheError(f"{archive}: not a readable tar.gz ({e})") from None
    files = [m for m in members if m.isfile()]
    return {"restored": True, "files": len(files), "mib": round(sum(m.size for m in files) / 2**20, 2)}


def cache_files(cache_dir: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """The cache's files, oldest first; top-level folders in ``skip`` and lock files left out."""
    cache_dir = Path(cache_dir)
    files = [p for p in cache_dir.rglob("*") if p.is_file() and not p.is_symlink()
             and p.relative_to(cache_dir).parts[0] not in skip and not p.name.endswith(".lock")]
    return sorted(files, key=lambda p: (p.stat().st_mtime, str(p)))


def _write(cache_dir: Path, files: list[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(cache_dir)), recursive=False)
    return buf.getvalue()


def pack(cache_dir: Path, archive: Path, budget: int = BUDGET, skip: tuple[str, ...] = ()) -> dict:
    """Write ``cache_dir``'s files to ``archive`` (tar.gz), the oldest first, as many as fit in
    ``budget`` bytes; what was packed and what was left out."""
    files = cache_files(cache_dir, skip)
    keep, data = len(files), _write(cache_dir, files)
    for _ in range(8):  # compressed size is known only after compressing: shrink until it fits
        if len(data) <= budget or keep == 0:
            break
        keep = min(keep - 1, int(keep * budget / len(data) * 0.95))
        data = _write(cache_dir, files[:max(keep, 0)])
    if len(data) > budget:
        keep, data = 0, _write(cache_dir, [])
    tmp = Path(archive).with_name(Path(archive).name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(archive)  # a reader never sees half an archive
    return {"files": keep, "left_out": len(files) - keep, "mib": round(len(data) / 2**20, 2),
            "raw_mib": round(sum(p.stat().st_size for p in files[:keep]) / 2**20, 2), "skipped": list(skip)}


def bundled_skip() -> tuple[str, ...]:
    """Inductor's own Triton cache folder is left out where its FX-graph cache entries carry the
    Triton kernels themselves (``bundle_triton_into_fx_graph_cache``): the same kernels twice."""
    import torch._inductor.config as cfg

    return ("triton",) if getattr(cfg, "bundle_triton_into_fx_graph_cache", False) else ()
