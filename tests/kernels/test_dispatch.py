"""``kernels.dispatch``: the caller names the implementation on every call; nothing is global.

'auto' is the application's word (``matwm_fast.runtime.resolve_kernels``), not the kernels'.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from matwm_fast import kernels
from matwm_fast.kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]


def _small_inputs():
    q = torch.randn(2, 1, 4)  # (B, H, D)
    k = torch.randn(2, 1, 3, 4)  # (B, H, L, D)
    return q, k, k, torch.zeros(2, dtype=torch.long), torch.tensor(3)


def _calls(impl):
    """Every public op called once with ``impl`` on small CPU inputs."""
    return [
        lambda: kernels.decode_attention(*_small_inputs(), impl=impl),
        lambda: kernels.sample_latent(torch.randn(2, 3, 4), 0.01, impl=impl),
        lambda: kernels.twohot_ce(torch.randn(2, 5), torch.zeros(2), torch.linspace(-1, 1, 5), impl=impl),
        lambda: kernels.layer_norm(torch.randn(2, 5), torch.ones(5), torch.zeros(5), act="silu", impl=impl),
        lambda: kernels.sample_action(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool), impl=impl),
    ]


OPS = ["decode_attention", "sample_latent", "twohot_ce", "layer_norm", "sample_action"]


def test_allowed_names():
    assert kernels.IMPLS == dispatch.IMPLS == ("ref", "triton")


def test_no_global_switch():
    """The old switch and its environment variable are gone: nothing can change an op underneath a caller."""
    for name in ("set_impl", "get_impl", "use_impl", "resolve_impl", "triton_available", "ALLOWED_IMPLS"):
        assert not hasattr(kernels, name), name
        assert not hasattr(dispatch, name), name


@pytest.mark.parametrize("bad", ["auto", "cuda", "Triton", "", None, 3])
def test_bad_name_raises_value_error_listing_allowed(bad):
    with pytest.raises(ValueError) as err:
        kernels.check_impl(bad, torch.zeros(1))
    msg = str(err.value)
    assert "allowed values are 'ref', 'triton'" in msg, msg
    assert repr(bad) in msg  # names what it got
    assert "'auto'" not in msg.split("allowed values are")[1]  # 'auto' is not a kernel impl


@pytest.mark.parametrize("op", range(len(OPS)), ids=OPS)
@pytest.mark.parametrize("bad", ["fast", "auto", None])
def test_bad_name_per_call(op, bad):
    with pytest.raises(ValueError, match="allowed values are 'ref', 'triton'"):
        _calls(bad)[op]()


def test_check_impl_returns_valid_names():
    assert kernels.check_impl("ref", torch.zeros(1)) == "ref"
    if kernels.triton_runs_on("cpu"):  # the interpreter (the CPU tests' setup)
        assert kernels.check_impl("triton", torch.zeros(1)) == "triton"


def test_default_is_ref():
    """An op called without ``impl`` runs the reference (bit-identical), whatever the machine."""
    args = _small_inputs()
    torch.testing.assert_close(kernels.decode_attention(*args), kernels.decode_attention_ref(*args), rtol=0, atol=0)
    logits, noise = torch.randn(2, 3, 4), torch.rand(2, 3)
    for a, b in zip(kernels.sample_latent(logits, 0.01, noise=noise), kernels.sample_latent_ref(logits, 0.01, noise)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x, t, bins = torch.randn(2, 5), torch.zeros(2), torch.linspace(-1, 1, 5)
    torch.testing.assert_close(kernels.twohot_ce(x, t, bins), kernels.twohot_ce_ref(x, t, bins), rtol=0, atol=0)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    torch.testing.assert_close(kernels.layer_norm(x, w, b, act="silu"), kernels.layer_norm_ref(x, w, b, act="silu"),
                               rtol=0, atol=0)
    u, invalid = torch.rand(2, 3, 4), torch.tensor([[False, True, False, False], [False] * 4])
    logits = torch.randn(2, 3, 4)
    assert torch.equal(kernels.sample_action(logits, invalid, u), kernels.sample_action_ref(logits, invalid, u))


def test_triton_runs_on(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", False)
    assert dispatch.triton_runs_on("cuda") and dispatch.triton_runs_on(torch.device("cuda", 0))
    assert not dispatch.triton_runs_on("cpu")
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", True)
    assert dispatch.triton_runs_on("cpu")  # the interpreter
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    assert not dispatch.triton_runs_on("cuda") and not dispatch.triton_runs_on("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_cuda_when_importable():
    assert kernels.triton_runs_on("cuda") == kernels.HAS_TRITON
    t = torch.zeros(1, device="cuda")
    if kernels.HAS_TRITON:
        assert kernels.check_impl("triton", t) == "triton"
    else:
        with pytest.raises(RuntimeError, match="not importable"):
            kernels.check_impl("triton", t)


@pytest.mark.parametrize("op", range(len(OPS)), ids=OPS)
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, op):
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run here: .*CUDA device.*TRITON_INTERPRET=1.*use impl='ref'"):
        _calls("triton")[op]()
    assert "cpu" in dispatch.why_triton_cannot_run("cpu")
    _calls("ref")[op]()  # the reference still runs


@pytest.mark.parametrize("op", range(len(OPS)), ids=OPS)
def test_triton_without_triton_raises(monkeypatch, op):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run here: triton is not importable.*use impl='ref'"):
        _calls("triton")[op]()
    with pytest.raises(RuntimeError, match="not importable"):
        kernels.check_impl("triton", torch.zeros(1))
    _calls("ref")[op]()


def test_import_without_triton_subprocess():
    """``matwm_fast.kernels`` imports when triton cannot be imported at all (from a source checkout:
    ``PYTHONPATH`` = the repository root); 'ref' runs and 'triton' says why it cannot.  The old
    global default's variable ``MATWM_KERNEL_IMPL`` (read at import) is set and must change nothing."""
    code = """
import sys
sys.modules['triton'] = None            # makes `import triton` raise ImportError
sys.modules['triton.language'] = None
# an editable install maps matwm_fast.kernels itself; without its finder this is a bare checkout
sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]
import torch
from matwm_fast import kernels
assert kernels.__file__ == {init!r}, kernels.__file__
assert not kernels.HAS_TRITON and kernels.TRITON_VERSION is None
assert not kernels.triton_runs_on('cpu') and not kernels.triton_runs_on('cuda')
q = torch.randn(2, 1, 4); k = torch.randn(2, 1, 3, 4)
args = (q, k, k, torch.zeros(2, dtype=torch.long), torch.tensor(3))
assert kernels.decode_attention(*args).shape == (2, 1, 4)          # default: ref
assert kernels.decode_attention(*args, impl='ref').shape == (2, 1, 4)
kernels.sample_latent(torch.randn(2, 3, 4), 0.01, impl='ref')
kernels.twohot_ce(torch.randn(2, 5), torch.zeros(2), torch.linspace(-1, 1, 5), impl='ref')
calls = [lambda: kernels.decode_attention(*args, impl='triton'),
         lambda: kernels.sample_latent(torch.randn(2, 3, 4), 0.01, impl='triton'),
         lambda: kernels.twohot_ce(torch.randn(2, 5), torch.zeros(2), torch.linspace(-1, 1, 5), impl='triton')]
for call in calls:
    try:
        call()
    except RuntimeError as e:
        assert "not importable" in str(e) and "impl='ref'" in str(e), e
    else:
        raise AssertionError('impl=triton without triton did not raise')
assert 'kernels' not in sys.modules, 'a top-level kernels module was imported'
print('OK')
""".format(init=str(ROOT / "kernels" / "__init__.py"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["MATWM_KERNEL_IMPL"] = "triton"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
