"""What one lent GPU compiled, carried to the next of its kind: one archive per GPU kind.

A GPU is lent for 15 minutes and starts bare.  The first two checks (an H100 on 2026-11-27, an
H200 on 2026-11-28) spent every Inductor stage compiling: a cold compile of the training step
takes minutes there, as on the CPU (about 160 s at the ``smoke`` preset on 2 cores, nearly all of
it Inductor's lowering, code generation and kernel compilation).  The ``graphs`` backend needs no
Inductor, but its Triton kernels are compiled by Triton's JIT on first use (4.4 s on the H100).
So a check compiles into a cache root of its own, ``inductor/`` (``TORCHINDUCTOR_CACHE_DIR``) and
``triton/`` (``TRITON_CACHE_DIR`` of the processes that run no Inductor), :func:`pack` writes it
to one ``tar.gz`` that comes back with the results, and :func:`restore` unpacks it before the next
check.  Graphs and kernels unchanged since load in seconds; changed ones compile as before.

**One archive per GPU kind** (:func:`archive_name`): Inductor's FX-graph and AOTAutograd cache
keys hold the GPU's name (``torch/_inductor/codecache.py``, ``CacheBase.get_system``), so an H100's
cache never hits on an H200.  The archive is named after the device's name, and a check restores
only its own kind's.

The archive is the project's own output, carried by its own device command and never committed;
still an archive holding anything but relative files and folders (an absolute or ``..`` name, a
link, a device file) is refused whole before a byte is written, and what is written passes
tarfile's ``data`` filter.

Budget: what travels to a device call (the tracked tree, the wheels, these archives) is at most
64 MiB; the tree is kept under 32 MiB and the wheels take 16, which leaves 16 MiB for the archives
of two kinds: :func:`pack` keeps the files compiled first (the earliest stages', needed first next
time) within :data:`BUDGET` bytes compressed.

    python -m bench.gpucheck.compile_cache restore DIR CACHE_ROOT   # DIR's archive of this GPU's kind
    python -m bench.gpucheck.compile_cache pack CACHE_ROOT DIR      # CACHE_ROOT to DIR's archive of this kind
"""

from __future__ import annotations

import io
import re
import sys
import tarfile
from pathlib import Path

PREFIX = "compile-cache-"  # an archive is PREFIX + kind + ".tar.gz"
BUDGET = 8 * 2**20  # per archive: two kinds' archives within the 16 MiB the tree and wheels leave


class CacheError(ValueError):
    """An archive that is not a plain tree of files."""


def kind(device_name: str) -> str:
    """The archive's kind from the device's name, in the letters a device call returns:
    ``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return slug or "unknown"


def this_kind() -> str:
    """This machine's kind: its first CUDA device's name, or ``cpu``."""
    import torch

    return kind(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"


def archive_name(kind_: str) -> str:
    return f"{PREFIX}{kind_}.tar.gz"


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
    """The cache's files, oldest first; folders in ``skip`` (relative paths) and lock files left out."""
    cache_dir = Path(cache_dir)
    skipped = [Path(s).parts for s in skip]

    def kept(p: Path) -> bool:
        parts = p.relative_to(cache_dir).parts
        return not any(parts[:len(s)] == s for s in skipped) and not p.name.endswith(".lock")

    files = [p for p in cache_dir.rglob("*") if p.is_file() and not p.is_symlink() and kept(p)]
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
    files = cache_files(cache_dir, skip) if Path(cache_dir).is_dir() else []
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
    """Inductor's own Triton folder is left out where its FX-graph cache entries carry the Triton
    kernels themselves (``bundle_triton_into_fx_graph_cache``): the same kernels twice."""
    import torch._inductor.config as cfg

    return ("inductor/triton",) if getattr(cfg, "bundle_triton_into_fx_graph_cache", False) else ()


def main(argv: list[str] | None = None) -> int:
    """``restore DIR CACHE_ROOT`` / ``pack CACHE_ROOT DIR``, for ``bench/gpu.sh``: this machine's
    kind picks the archive; exit 2 on bad input or a refused archive."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("restore", "pack"):
        print("usage: python -m bench.gpucheck.compile_cache restore DIR CACHE_ROOT | pack CACHE_ROOT DIR",
              file=sys.stderr)
        return 2
    name = archive_name(this_kind())
    if argv[0] == "restore":
        try:
            print(restore(Path(argv[1]) / name, Path(argv[2])))
        except CacheError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    print(pack(Path(argv[1]), out / name, skip=bundled_skip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
