"""What the measuring tools (``profile``, its ``--fake`` budget, the GPU check) share to print and keep
a report: the machine, versions and commit it was measured on, aligned or markdown tables, FLOPs
in G, and the ``--json`` / ``--markdown`` files."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch

from .. import kernels


def table(header: list[str], rows: list[list], markdown: bool = False) -> str:
    """Rows under a header: markdown (numbers right-aligned), or plain columns aligned by width."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def giga(x: float | None) -> str:
    """FLOP or FLOP/s in G, three significant digits (a CPU smoke step's thousandths to a GPU paper
    step's thousands); ``-`` for none."""
    if not x:
        return "-"
    g = x / 1e9
    return f"{g:,.{max(0, 2 - math.floor(math.log10(abs(g))))}f}"


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it), or (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the model; platform gives only "x86_64"
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict:
    head, dirty = git_commit()
    return {
        "device": str(device), "device_name": device_name(device), "torch": torch.__version__,
        "triton": kernels.TRITON_VERSION, "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "torch_threads": torch.get_num_threads(),
        # the load before we start tells a reader whether the machine was shared
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": head, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def provenance(report: dict) -> str:
    """Where and from what a report was measured: date, machine, versions, commit (dirty or not)."""
    return (f"{report['date']} on {report['device_name']} (host {report['host']}), torch {report['torch']}, "
            f"triton {report['triton']}, commit {report['git_commit']}{' (dirty)' if report['git_dirty'] else ''}")


def write(report: dict, json_path: Path | None, markdown_path: Path | None, markdown: str) -> None:
    """``report`` as JSON and ``markdown`` (its tables with their provenance) to the paths given."""
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (markdown_path, markdown)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
