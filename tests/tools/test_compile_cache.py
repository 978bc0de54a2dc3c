"""Inductor's compile cache carried between GPU checks (``matwm_fast.tools.compile_cache``): what is
packed comes back byte for byte, within its budget, oldest first; an archive that would write
outside its folder is refused whole; a restored cache is one Inductor hits (a real compile, in
fresh processes); the GPU check restores ``--compile-cache`` and packs its own to ``--out``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from matwm_fast.tools import compile_cache as cc

from support import ROOT, subprocess_env


def tree(root: Path, files: dict[str, bytes]) -> None:
    for i, (name, data) in enumerate(files.items()):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))  # the order they were compiled in


def test_a_packed_cache_restores_byte_for_byte(tmp_path):
    files = {"fxgraph/ab/entry": b"graph" * 100, "aotautograd/cd/entry": b"joint", "zz/kernel.py": b"src",
             "triton/0/k.cubin": b"bin", "fxgraph/ab/entry.lock": b""}
    tree(tmp_path / "a", files)
    rec = cc.pack(tmp_path / "a", tmp_path / cc.ARCHIVE, skip=("triton",))
    assert rec["files"] == 3 and rec["left_out"] == 0 and rec["skipped"] == ["triton"]
    assert cc.restore(tmp_path / cc.ARCHIVE, tmp_path / "b") == {"restored": True, "files": 3, "mib": rec["raw_mib"]}
    got = {str(p.relative_to(tmp_path / "b")): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert got == {k: v for k, v in files.items() if not k.startswith("triton") and not k.endswith(".lock")}


def test_over_its_budget_the_cache_keeps_what_was_compiled_first(tmp_path):
    rng = __import__("random").Random(0)
    files = {f"fxgraph/{i:02d}": rng.randbytes(100_000) for i in range(10)}  # incompressible
    tree(tmp_path / "a", files)
    rec = cc.pack(tmp_path / "a", tmp_path / cc.ARCHIVE, budget=350_000)
    assert (tmp_path / cc.ARCHIVE).stat().st_size <= 350_000
    assert 1 <= rec["files"] <= 3 and rec["left_out"] == 10 - rec["files"]
    with tarfile.open(tmp_path / cc.ARCHIVE) as tar:
        assert tar.getnames() == [f"fxgraph/{i:02d}" for i in range(rec["files"])]  # the oldest
    assert cc.pack(tmp_path / "a", tmp_path / "none.tar.gz", budget=10)["files"] == 0  # nothing fits


def evil_archive(path: Path, kind: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fxgraph/fine")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo({"parent": "../escaped", "absolute": "/tmp/escaped", "link": "fxgraph/link"}[kind])
        if kind == "link":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            bad.size = 1
        tar.addfile(bad, io.BytesIO(b"x") if kind != "link" else None)


@pytest.mark.parametrize("kind", ["parent", "absolute", "link"])
def test_an_archive_that_writes_outside_its_folder_is_refused_whole(tmp_path, kind):
    evil_archive(tmp_path / "evil.tar.gz", kind)
    with pytest.raises(cc.CacheError, match="refused"):
        cc.restore(tmp_path / "evil.tar.gz", tmp_path / "cache")
    assert list((tmp_path / "cache").rglob("*")) == []  # not even the harmless member
    assert not (tmp_path / "escaped").exists()


def test_no_archive_is_a_cold_start_and_a_damaged_one_is_refused(tmp_path):
    assert cc.restore(tmp_path / "absent.tar.gz", tmp_path / "c")["restored"] is False
    (tmp_path / "bad.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(cc.CacheError, match="not a readable tar.gz"):
        cc.restore(tmp_path / "bad.tar.gz", tmp_path / "c")


COMPILE = """
import json, torch
from torch._dynamo.utils import counters
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
f = torch.compile(lambda x: net(x).square().mean(), fullgraph=True, dynamic=False)
f(torch.randn(4, 8)).backward()
print(json.dumps({"fx": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])}))
"""


def compile_in(cache_dir: Path) -> dict:
    env = {**subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_restored_cache_is_hit_by_a_fresh_process(tmp_path):
    cold = compile_in(tmp_path / "first")
    assert cold["fx"].get("fxgraph_cache_miss", 0) >= 2 and not cold["fx"].get("fxgraph_cache_hit")
    cc.pack(tmp_path / "first", tmp_path / cc.ARCHIVE)
    cc.restore(tmp_path / cc.ARCHIVE, tmp_path / "second")
    warm = compile_in(tmp_path / "second")
    # forward and backward load (the AOTAutograd entry, or both graphs' FX entries): nothing lowered again
    assert warm["aot"].get("autograd_cache_hit", 0) >= 1 or warm["fx"].get("fxgraph_cache_hit", 0) >= 2, warm
    assert not warm["fx"].get("fxgraph_cache_miss"), warm


def gpucheck_env(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "out"
    cmd = [sys.executable, "-m", "matwm_fast.gpucheck", "--rehearse", "--stages", "env", "--out", str(out),
           "--work", str(tmp / "work"), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300), out


def test_the_check_restores_its_archive_and_packs_its_cache_to_out(tmp_path):
    tree(tmp_path / "earlier", {"fxgraph/xy/entry": b"compiled before"})
    cc.pack(tmp_path / "earlier", tmp_path / "given.tar.gz")
    proc, out = gpucheck_env(tmp_path, "--compile-cache", str(tmp_path / "given.tar.gz"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rec = res["compile_cache"]
    assert rec["restore"]["files"] == 1 and rec["pack"]["files"] >= 1
    assert res["stages"]["env"]["result"]["inductor_cache"] == str(tmp_path / "work" / "inductor")
    with tarfile.open(out / cc.ARCHIVE) as tar:
        assert tar.extractfile("fxgraph/xy/entry").read() == b"compiled before"
    assert "Compile cache: restored 1 files" in (out / "summary.md").read_text()
    # the archive --out already holds can be the one given: read before it is replaced
    proc, out = gpucheck_env(tmp_path, "--compile-cache", str(out / cc.ARCHIVE))
    assert proc.returncode == 0 and json.loads((out / "results.json").read_text())["compile_cache"]["restore"]["files"] == 1


def test_a_refused_archive_costs_only_its_graphs(tmp_path):
    evil_archive(tmp_path / "evil.tar.gz", "parent")
    proc, out = gpucheck_env(tmp_path, "--compile-cache", str(tmp_path / "evil.tar.gz"))
    res = json.loads((out / "results.json").read_text())
    assert proc.returncode == 0 and res["stages"]["env"]["status"] == "ok"
    assert "refused, compiling cold" in res["compile_cache"]["restore"]["note"]
    assert not (tmp_path / "work" / "escaped").exists()


def test_a_folder_given_as_the_archive_is_refused(tmp_path):
    proc, _ = gpucheck_env(tmp_path, "--compile-cache", str(tmp_path))
    assert proc.returncode == 2 and "--compile-cache" in proc.stderr and "not a file" in proc.stderr
