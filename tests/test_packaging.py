"""The installed package: one top-level name of our own.  The repository's top-level ``kernels/``
folder installs as ``matwm_fast.kernels`` (PyPI has an unrelated package called ``kernels``), and
the tools come along; a source checkout imports the same module names (matwm_fast/__init__.py).
The package is led by the algorithm: its core imports no tooling."""

import ast
import subprocess
import sys
import zipfile

import pytest

from support import ROOT

# The algorithm core: every module of the package and of kernels/, except the tooling (tools/) and
# the command names of the tools (``python -m matwm_fast.plot`` and the like, one line each).
COMMAND_SHIMS = {"plot", "profile", "sweep"}
# Tooling the core must not import: the tools, their command names, the checkout's bench/ and tests/.
TOOLING = ("matwm_fast.tools", *(f"matwm_fast.{m}" for m in sorted(COMMAND_SHIMS)), "bench", "tests", "support")
# core modules by name: the discovery below must find every one (a moved folder would check nothing)
NAMED_CORE = ("config", "env", "env_state", "replay", "nn", "transformer", "world_model", "actor_critic", "losses",
              "imagination", "acting", "steps", "runtime", "graphs", "trainer", "checkpoint", "metrics", "play",
              "cli", "nvtx")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("matwm_fast-*.whl")
    return zipfile.ZipFile(path).namelist()


def test_one_top_level_package(wheel):
    tops = {n.split("/")[0] for n in wheel if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"matwm_fast"}  # no top-level "kernels"


def test_kernels_and_tools_are_inside(wheel):
    for name in ("kernels/__init__.py", "kernels/decode_attention.py", "kernels/sample_latent.py",
                 "kernels/twohot_ce.py", "tools/sweep.py", "tools/profile.py", "steps.py"):
        assert f"matwm_fast/{name}" in wheel, name
    # the GPU check is the checkout's tooling (bench/gpucheck), not the library's
    assert not [n for n in wheel if "gpucheck" in n or "compile_cache" in n]


def test_checkout_imports_the_same_names():
    from matwm_fast import kernels

    assert kernels.__name__ == "matwm_fast.kernels"
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not kernels  # never the bare name


def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``: at any
    depth (a lazy import inside a function counts), relative ones resolved, ``from P import m``
    as ``P.m`` too (``m`` may be a submodule), and ``importlib.import_module("...")``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in
              ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def upward(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLING)


def core_modules() -> dict[str, tuple]:
    """``{short name: (path, package)}`` of every core module."""
    mods = {p.stem: (p, "matwm_fast") for p in (ROOT / "matwm_fast").glob("*.py") if p.stem not in COMMAND_SHIMS}
    mods |= {f"kernels.{p.stem}": (p, "matwm_fast.kernels") for p in (ROOT / "kernels").glob("*.py")}
    return mods


def test_import_parser_sees_every_form():
    """The check below would pass vacuously if the parser missed a form of import."""
    core = """
import bench.gpucheck
import numpy as np
from .tools.harness import SteadyTrainer
from . import config, tools
from .config import Config
def late():
    from matwm_fast import profile
    importlib.import_module("matwm_fast.tools.sweep")
"""
    names = {n for _, n in imported_names(core, "matwm_fast")}
    assert {n for n in names if upward(n)} == {
        "bench.gpucheck", "matwm_fast.tools.harness", "matwm_fast.tools.harness.SteadyTrainer", "matwm_fast.tools",
        "matwm_fast.profile", "matwm_fast.tools.sweep"}
    assert {"numpy", "matwm_fast.config", "matwm_fast.config.Config"} <= names - {n for n in names if upward(n)}
    kernel = "from ..tools import launches\nfrom .dispatch import check_impl\n"
    names = {n for _, n in imported_names(kernel, "matwm_fast.kernels")}
    assert names == {"matwm_fast.tools", "matwm_fast.tools.launches", "matwm_fast.kernels.dispatch",
                     "matwm_fast.kernels.dispatch.check_impl"}


def test_core_imports_no_tooling():
    """Nothing in the algorithm core (the package's modules and the kernels) imports
    ``matwm_fast.tools``, a tool's command name or the checkout's ``bench/`` / ``tests/``: the
    tooling depends on the algorithm, never the reverse."""
    mods = core_modules()
    assert set(NAMED_CORE) <= set(mods), set(NAMED_CORE) - set(mods)
    found = []
    for path, package in mods.values():
        bad = [(line, name) for line, name in imported_names(path.read_text(), package) if upward(name)]
        found += [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in bad  # outermost name only
                  if not any(ln == line and name.startswith(n + ".") for ln, n in bad)]
    assert not found, "the algorithm core imports tooling:\n" + "\n".join(found)
