"""The checkpoint file format (3: a safetensors file, the tree and a checksum in its metadata): its
layout as other safetensors readers see it, every way a crafted or damaged file is refused with a
message saying what is wrong — and never by running it — and format-2 files (the hand-written codec
before safetensors) still read, a run resumed from one going on in format 3."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from matwm_fast import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")

W, B = "trainer/wm/enc.0.weight", "trainer/wm/enc.0.bias"
TREE = {
    "trainer": {
        "wm": {"enc.0.weight": torch.arange(12.0).reshape(3, 4), "enc.0.bias": torch.ones(4, dtype=torch.bfloat16)},
        "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2,), 0.5)}},
                "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0]}]},
        "rng": {"python": (3, (1, 2, 2**40), None), "torch": torch.arange(8, dtype=torch.uint8)},
        "step": 46, "first": False, "env": {"pos": [0.5, -1.0], "name": "simple_tag"},
        "empty": torch.zeros(0, 3, dtype=torch.int64), "mask": torch.tensor([True, False])},
    "extra": {"pending_eval": False, "logger": {"layouts": []}},
}


def same(a, b) -> bool:
    """Equal trees: the same types (tuples stay tuples), tensors of the same dtype, shape and values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def parts(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8: 8 + n]), blob[8 + n:]


def signed(header: dict, data: bytes) -> bytes:
    """A file of ``header`` and ``data`` whose checksum holds: what anyone crafting a file can write."""
    header = json.loads(json.dumps(header))
    header.setdefault("__metadata__", {})["sha256"] = "0" * 64
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = bytearray(len(head).to_bytes(8, "little") + head + data)
    at = out.index(b'"sha256":"' + b"0" * 64) + len('"sha256":"')
    out[at: at + 64] = hashlib.sha256(out).hexdigest().encode()
    return bytes(out)


def edited(fn) -> bytes:
    """The file of TREE with its header changed by ``fn`` (re-signed)."""
    header, data = parts(ck.dumps(TREE))
    fn(header, header["__metadata__"])
    return signed(header, data)


def tree_edited(fn) -> bytes:
    def edit(header, meta):
        tree = json.loads(meta["tree"])
        fn(tree)
        meta["tree"] = json.dumps(tree)
    return edited(edit)


def format2(tree) -> bytes:
    """Format 2 as written up to commit 347c188 (its ``checkpoint.dumps``, kept here to write test files)."""
    tensors: list[torch.Tensor] = []

    def enc(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return {"__tensor__": len(tensors) - 1}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"__dict__": [[k, enc(v)] for k, v in x.items()]}
        return x

    header = {"format": 2, "tree": enc(tree), "tensors": []}
    chunks, offset = [], 0
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header["tensors"].append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                  "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    body = len(head).to_bytes(8, "little") + head + b"".join(chunks)
    return b"MATWMCK2" + hashlib.sha256(body).digest() + body


# ----------------------------------------------------------------------------- the layout
def test_a_checkpoint_is_a_safetensors_file_with_its_tree_in_the_metadata(tmp_path):
    path = tmp_path / "step_000000046.pt"
    ck.save(path, TREE)
    with safe_open(path, "pt") as f:  # any safetensors reader: tensors named by their path in the tree
        assert set(f.keys()) == {W, B, "trainer/opt/state/0/step", "trainer/opt/state/0/exp_avg",
                                 "trainer/rng/torch", "trainer/empty", "trainer/mask"}
        assert torch.equal(f.get_tensor(W), TREE["trainer"]["wm"]["enc.0.weight"])
        meta = f.metadata()
    assert meta["format"] == "matwm_fast/3"
    assert json.loads(meta["tree"])["trainer"]["wm"]["enc.0.weight"] == {"__tensor__": W}
    # the checksum: sha256 of every byte of the file, its own 64 hex digits read as zeros
    blob = path.read_bytes()
    assert hashlib.sha256(blob.replace(meta["sha256"].encode(), b"0" * 64)).hexdigest() == meta["sha256"]
    assert same(ck.load(path), TREE)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # written atomically


def test_every_tensor_is_written_whatever_shares_its_memory():
    """Views of one buffer, a tensor twice, keys 0 and "0" of one dict: each comes back as itself."""
    buf = torch.arange(6.0)
    tree = {"a": buf[:3], "b": buf[3:], "c": [buf, buf], "d": {0: torch.ones(1), "0": torch.zeros(1)},
            "e": buf.reshape(2, 3).t()}
    back = ck.loads(ck.dumps(tree))
    assert same(back, {"a": buf[:3], "b": buf[3:], "c": [buf, buf], "d": {0: torch.ones(1), "0": torch.zeros(1)},
                       "e": buf.reshape(2, 3).t().contiguous()})
    back["c"][0][0] = 9  # each its own tensor, writable
    assert back["c"][1][0] == 0
    with pytest.raises(TypeError, match="checkpoint tensor x is torch.complex64; a checkpoint holds"):
        ck.dumps({"x": torch.zeros(2, dtype=torch.complex64)})


# ----------------------------------------------------------------------------- crafted files
def _extra_tensor() -> bytes:
    tensors = safetensors.torch.load(ck.dumps(TREE))
    tensors["payload"] = torch.frombuffer(bytearray(pickle.dumps(print)), dtype=torch.uint8)
    return _resave(tensors, parts(ck.dumps(TREE))[0]["__metadata__"])


def _resave(tensors: dict, meta: dict) -> bytes:
    header, data = parts(safetensors.torch.save(tensors, metadata=meta))
    return signed(header, data)


def _missing_tensor() -> bytes:
    tensors = safetensors.torch.load(ck.dumps(TREE))
    del tensors[B]
    return _resave(tensors, parts(ck.dumps(TREE))[0]["__metadata__"])


def _set(path: list, value):
    def fn(header, meta):
        node = header
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return fn


CRAFTED = {  # a file whose checksum holds (anyone can compute it) but whose content is wrong
    "dtype does not fit the bytes": (lambda: edited(_set([W, "dtype"], "F64")), r"malformed \(SafetensorError"),
    "shape does not fit the bytes": (lambda: edited(_set([W, "shape"], [4, 4])), r"malformed \(SafetensorError"),
    "bytes beyond the file": (lambda: edited(_set([W, "data_offsets"], [0, 10**9])), r"malformed \(SafetensorError"),
    "a dtype never written": (lambda: edited(_set([B, "dtype"], "U16")), r"dtypes a checkpoint never holds: \{'"
                              + B + "': 'U16'}"),
    "an unknown dtype": (lambda: edited(_set([B, "dtype"], "Q7")), "dtypes a checkpoint never holds"),
    "a tensor the tree never names": (_extra_tensor, r"it holds tensors its tree never names: \['payload'\]"),
    "a tensor the file lacks": (_missing_tensor, f"its tree names tensor '{B}', which the file does not hold"),
    "a tensor named twice": (lambda: tree_edited(lambda t: t["trainer"]["wm"].update(
                                 {"enc.0.bias": {"__tensor__": W}})),
                             f"names tensor '{W}', which the file does not hold \\(or names it twice\\)"),
    "a tensor named by a number": (lambda: tree_edited(lambda t: t["trainer"].update(step={"__tensor__": 0})),
                                   "its tree names tensor 0"),
    "a tree that is not JSON": (lambda: edited(_set(["__metadata__", "tree"], "{'trainer': 1")), "JSONDecodeError"),
    "a tag holding no list": (lambda: edited(_set(["__metadata__", "tree"], '{"trainer": {"__tuple__": 5}}')),
                              r"malformed \(TypeError"),
    "a tree nested past any limit": (lambda: edited(_set(["__metadata__", "tree"], "[" * 100_000 + "]" * 100_000)),
                                     r"malformed \(RecursionError"),
    "a header that is not an object": (lambda: (8).to_bytes(8, "little") + b"[1,2,3] ", "not a matwm_fast checkpoint"),
    "a header past the end": (lambda: (10**6).to_bytes(8, "little") + b"{}",
                              r"not a matwm_fast checkpoint \(bad header"),
    "another safetensors file": (lambda: safetensors.torch.save({"w": torch.ones(2)}),
                                 "is a safetensors file but not a matwm_fast checkpoint this version reads "
                                 r"\(metadata format None"),
    "a newer format": (lambda: edited(_set(["__metadata__", "format"], "matwm_fast/4")),
                       "metadata format 'matwm_fast/4'; it reads 'matwm_fast/3' and format 2"),
    # and files changed after they were written: the checksum no longer holds
    "no checksum": (lambda: _patched(b'"sha256":', b'"sha257":'), r"corrupt or truncated \(checksum mismatch\)"),
    "a changed tree": (lambda: _patched(b'step\\":46', b'step\\":47'), r"checksum mismatch"),
    "a changed shape": (lambda: _patched(b'"shape":[3,4]', b'"shape":[4,3]'), r"checksum mismatch"),
    "a changed tensor": (lambda: _patched(b"\x00\x00\x00\x00\x00\x00\x80?", b"\x00\x00\x00\x00\x00\x00\x80@"),
                         r"checksum mismatch"),
}


def _patched(old: bytes, new: bytes) -> bytes:
    """The file of TREE with one run of bytes replaced by another of the same length."""
    blob = ck.dumps(TREE)
    assert blob.count(old) == 1 and len(old) == len(new)
    return blob.replace(old, new)


def test_the_crafting_helpers_make_files_that_load():
    """So each refusal below is the defect's, not the helper's."""
    assert same(ck.loads(edited(lambda h, m: None)), TREE)
    assert same(ck.loads(tree_edited(lambda t: None)), TREE)
    meta = parts(ck.dumps(TREE))[0]["__metadata__"]
    assert same(ck.loads(_resave(safetensors.torch.load(ck.dumps(TREE)), meta)), TREE)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_file_is_refused_saying_what_is_wrong(tmp_path, case):
    make, message = CRAFTED[case]
    path = tmp_path / "run" / "checkpoints" / "step_000000046.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(make())
    with pytest.raises(ck.CheckpointError, match=message) as e:
        ck.load(ck.resolve(path.parent.parent))
    assert str(path) in str(e.value)


def test_damaged_files_are_refused():
    good = ck.dumps(TREE)
    header_end = 8 + int.from_bytes(good[:8], "little")
    for data, message in [(good[:-1], "checksum mismatch"), (good[: header_end + 4], "checksum mismatch"),
                          (good[:header_end - 3], "not a matwm_fast checkpoint"),
                          (good[:7], "not a matwm_fast checkpoint"),
                          (b"", "not a matwm_fast checkpoint"), (good + b"\0", "checksum mismatch")]:
        with pytest.raises(ck.CheckpointError, match=message):
            ck.loads(data)
    for at in (9, header_end - 20, header_end + 3, len(good) - 1):  # a flipped bit anywhere: header or data
        bad = bytearray(good)
        bad[at] ^= 0x04
        with pytest.raises(ck.CheckpointError, match="checksum mismatch|not a matwm_fast checkpoint|malformed"):
            ck.loads(bytes(bad))


class Evil:
    """Unpickling this creates ``marker``: the proof that opening a file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_disguised_as_a_checkpoint_is_never_opened(tmp_path):
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"trainer": Evil(marker)}, buf)
    for blob in (pickle.dumps({"trainer": Evil(marker)}), buf.getvalue()):
        with pytest.raises(ck.CheckpointError, match="not a matwm_fast checkpoint .*a zip or pickle is never opened"):
            ck.loads(blob, "step_000000046.pt")
    # a pickle where a tensor or the tree belongs is only bytes, or is refused
    tensors = {"trainer/x": torch.frombuffer(bytearray(pickle.dumps(Evil(marker))), dtype=torch.uint8)}
    meta = {"format": "matwm_fast/3", "tree": json.dumps({"trainer": {"x": {"__tensor__": "trainer/x"}}})}
    assert ck.loads(_resave(tensors, meta))["trainer"]["x"].dtype is torch.uint8
    with pytest.raises(ck.CheckpointError, match="malformed"):
        ck.loads(_resave({}, {"format": "matwm_fast/3", "tree": pickle.dumps(Evil(marker)).decode("latin-1")}))
    assert not marker.exists()


# ----------------------------------------------------------------------------- format 2
def test_format2_files_still_load_and_damaged_ones_are_refused():
    blob = format2(TREE)
    assert same(ck.loads(blob), TREE)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    for bad in (bytes(flipped), blob[: len(blob) // 2]):
        with pytest.raises(ck.CheckpointError, match=r"corrupt or truncated \(checksum mismatch\)"):
            ck.loads(bad)
    with pytest.raises(ck.CheckpointError, match="not a matwm_fast checkpoint"):
        ck.loads(blob[:20])


def test_a_run_resumes_from_a_format2_checkpoint_and_goes_on_in_format3(tmp_path, capsys):
    from matwm_fast import train
    from matwm_fast.config import preset
    from matwm_fast.trainer import build

    tr = build(preset("smoke"), device="cpu")
    while tr.step < 42:
        tr.train_step()
    state = {"trainer": tr.state_dict(), "extra": {"logger": {"layouts": []}, "pending_eval": False}}
    assert same(ck.loads(format2(state)), ck.loads(ck.dumps(state)))  # everything the next step needs, equal
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_000000042.pt").write_bytes(format2(state))
    assert train.main(["--resume", str(run), "--steps", "44", "--log-every", "2"]) == 0
    assert "resumed from step 42" in capsys.readouterr().out
    new = run / "checkpoints" / "step_000000044.pt"
    assert (run / "checkpoints" / "latest").read_text() == new.name and new.read_bytes()[:8] != b"MATWMCK2"
    assert ck.load(new)["trainer"]["step"] == 44
