"""The installed package: one top-level name of our own.  The repository's top-level ``kernels/``
folder installs as ``matwm_fast.kernels`` (PyPI has an unrelated package called ``kernels``), and
the tools come along; a source checkout imports the same module names (matwm_fast/__init__.py)."""

import subprocess
import sys
import zipfile

import pytest

from support import ROOT


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
