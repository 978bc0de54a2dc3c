"""The caches carried from one GPU check to the next of its kind (``bench/gpucheck/compile_cache.py``):
what is packed comes back byte for byte, within its budget, oldest first; an archive that would
write outside its folder is refused whole; a restored cache is one Inductor hits (a real compile,
in fresh processes); the GPU check restores its own kind's archive from ``--compile-cache`` and
packs its caches to ``--out`` under the same name, and never another kind's."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bench.gpucheck import compile_cache as cc

from support import ROOT, subprocess_env


def tree(root: Path, files: dict[str, bytes]) -> None:
    for i, (name, data) in enumerate(files.items()):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))  # the order they were compiled in


ARCHIVE = cc.archive_name("cpu")


def test_one_archive_per_gpu_kind_named_by_the_device():
    assert cc.kind("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3" and cc.kind("NVIDIA H200") == "nvidia-h200"
    assert cc.archive_name(cc.kind("NVIDIA H200")) == "compile-cache-nvidia-h200.tar.gz"
    assert cc.kind("  ") == "unknown" and cc.this_kind() == ("cpu" if not torch.cuda.is_available() else cc.this_kind())


def test_a_packed_cache_restores_byte_for_byte(tmp_path):
    files = {"inductor/fxgraph/ab/entry": b"graph" * 100, "inductor/aotautograd/cd/entry": b"joint",
             "triton/K3/kernel.cubin": b"jit", "inductor/triton/0/k.cubin": b"bin",
             "inductor/fxgraph/ab/entry.lock": b""}
    tree(tmp_path / "a", files)
    rec = cc.pack(tmp_path / "a", tmp_path / ARCHIVE, skip=("inductor/triton",))
    assert rec["files"] == 3 and rec["left_out"] == 0 and rec["skipped"] == ["inductor/triton"]
    assert cc.restore(tmp_path / ARCHIVE, tmp_path / "b") == {"restored": True, "files": 3, "mib": rec["raw_mib"]}
    got = {str(p.relative_to(tmp_path / "b")): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    # Triton's own JIT cache is kept; Inductor's copy of its kernels (bundled in its entries) is not
    assert got == {k: v for k, v in files.items() if not k.startswith("inductor/triton") and not k.endswith(".lock")}


def test_over_its_budget_the_cache_keeps_what_was_compiled_first(tmp_path):
    rng = __import__("random").Random(0)
    files = {f"fxgraph/{i:02d}": rng.randbytes(100_000) for i in range(10)}  # incompressible
    tree(tmp_path / "a", files)
    rec = cc.pack(tmp_path / "a", tmp_path / ARCHIVE, budget=350_000)
    assert (tmp_path / ARCHIVE).stat().st_size <= 350_000
    assert 1 <= rec["files"] <= 3 and rec["left_out"] == 10 - rec["files"]
    with tarfile.open(tmp_path / ARCHIVE) as tar:
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
    cc.pack(tmp_path / "first", tmp_path / ARCHIVE)
    cc.restore(tmp_path / ARCHIVE, tmp_path / "second")
    warm = compile_in(tmp_path / "second")
    # forward and backward load (the AOTAutograd entry, or both graphs' FX entries): nothing lowered again
    assert warm["aot"].get("autograd_cache_hit", 0) >= 1 or warm["fx"].get("fxgraph_cache_hit", 0) >= 2, warm
    assert not warm["fx"].get("fxgraph_cache_miss"), warm


def gpucheck_env(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "out"
    cmd = [sys.executable, "-m", "bench.gpucheck", "--rehearse", "--stages", "env", "--out", str(out),
           "--work", str(tmp / "work"), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300), out


def test_the_check_restores_its_kinds_archive_and_packs_its_caches_to_out(tmp_path):
    tree(tmp_path / "earlier", {"inductor/fxgraph/xy/entry": b"compiled before", "triton/K/k.json": b"jit"})
    (tmp_path / "kept").mkdir()
    cc.pack(tmp_path / "earlier", tmp_path / "kept" / ARCHIVE)
    tree(tmp_path / "other", {"inductor/fxgraph/h100/entry": b"another GPU's"})
    cc.pack(tmp_path / "other", tmp_path / "kept" / cc.archive_name("nvidia-h100-80gb-hbm3"))
    proc, out = gpucheck_env(tmp_path, "--compile-cache", str(tmp_path / "kept"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rec = res["compile_cache"]
    assert rec["restore"]["files"] == 2 and rec["pack"]["files"] >= 2 and rec["pack"]["archive"] == ARCHIVE
    assert res["stages"]["env"]["result"]["inductor_cache"] == str(tmp_path / "work" / "cache" / "inductor")
    with tarfile.open(out / ARCHIVE) as tar:
        assert tar.extractfile("inductor/fxgraph/xy/entry").read() == b"compiled before"
        assert "inductor/fxgraph/h100/entry" not in tar.getnames()  # never another kind's
    assert "Compile cache: restored 2 files" in (out / "summary.md").read_text()
    # the folder given can be --out itself: its archive is read before it is replaced
    proc, out = gpucheck_env(tmp_path, "--compile-cache", str(out))
    assert proc.returncode == 0 and json.loads((out / "results.json").read_text())["compile_cache"]["restore"]["files"] == 2


def test_a_refused_archive_costs_only_its_graphs(tmp_path):
    (tmp_path / "kept").mkdir()
    evil_archive(tmp_path / "kept" / ARCHIVE, "parent")
    proc, out = gpucheck_env(tmp_path, "--compile-cache", str(tmp_path / "kept"))
    res = json.loads((out / "results.json").read_text())
    assert proc.returncode == 0 and res["stages"]["env"]["status"] == "ok"
    assert "refused, compiling cold" in res["compile_cache"]["restore"]["note"]
    assert not (tmp_path / "work" / "escaped").exists()


def test_a_file_given_as_the_folder_is_refused(tmp_path):
    (tmp_path / ARCHIVE).write_bytes(b"")
    proc, _ = gpucheck_env(tmp_path, "--compile-cache", str(tmp_path / ARCHIVE))
    assert proc.returncode == 2 and "--compile-cache" in proc.stderr and "not a folder" in proc.stderr


def test_the_device_scripts_helper_refuses_bad_input_and_bad_archives(tmp_path, capsys):
    assert cc.main(["unpack", "a", "b"]) == 2 and "usage" in capsys.readouterr().err
    evil_archive(tmp_path / cc.archive_name(cc.this_kind()), "link")  # the helper picks this machine's kind
    assert cc.main(["restore", str(tmp_path), str(tmp_path / "cache")]) == 2
    assert "refused" in capsys.readouterr().err
    tree(tmp_path / "c", {"triton/k": b"jit"})
    assert cc.main(["pack", str(tmp_path / "c"), str(tmp_path / "out")]) == 0
    assert cc.main(["restore", str(tmp_path / "out"), str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "triton" / "k").read_bytes() == b"jit"
