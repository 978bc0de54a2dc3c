import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]


def _small_inputs():
    q = torch.randn(2, 1, 4)  # (B, H, D)
    k = torch.randn(2, 1, 3, 4)  # (B, H, L, D)
    return q, k, k, torch.zeros(2, dtype=torch.long), torch.tensor(3)


def test_allowed_names():
    assert kernels.ALLOWED_IMPLS == ("ref", "triton", "auto")
    assert kernels.get_impl() in kernels.ALLOWED_IMPLS


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None, 3])
def test_bad_name_raises_value_error_listing_allowed(bad):
    with pytest.raises(ValueError) as err:
        kernels.set_impl(bad)
    for name in ("'ref'", "'triton'", "'auto'"):
        assert name in str(err.value)


def test_bad_name_per_call():
    with pytest.raises(ValueError, match="'ref', 'triton', 'auto'"):
        kernels.decode_attention(*_small_inputs(), impl="fast")
    with pytest.raises(ValueError, match="allowed values"):
        kernels.sample_latent(torch.randn(2, 3, 4), 0.01, impl="fast")
    with pytest.raises(ValueError, match="allowed values"):
        kernels.twohot_ce(torch.randn(2, 5), torch.zeros(2), torch.linspace(-1, 1, 5), impl="fast")


def test_set_get_and_context_manager_restores():
    kernels.set_impl("ref")
    assert kernels.get_impl() == "ref"
    with kernels.use_impl("auto"):
        assert kernels.get_impl() == "auto"
    assert kernels.get_impl() == "ref"
    with pytest.raises(KeyError):
        with kernels.use_impl("auto"):
            raise KeyError
    assert kernels.get_impl() == "ref"


def test_auto_on_cpu_is_ref():
    assert kernels.resolve_impl("auto", torch.zeros(1)) == "ref"
    kernels.set_impl("auto")
    assert kernels.resolve_impl(None, torch.zeros(1)) == "ref"
    assert kernels.resolve_impl("ref", torch.zeros(1)) == "ref"


def test_global_switch_is_used_when_impl_is_none():
    kernels.set_impl("ref")
    assert kernels.resolve_impl(None, torch.zeros(1)) == "ref"
    args = _small_inputs()
    torch.testing.assert_close(kernels.decode_attention(*args), kernels.decode_attention_ref(*args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_triton_when_available():
    expected = "triton" if kernels.HAS_TRITON else "ref"
    assert kernels.resolve_impl("auto", torch.zeros(1, device="cuda")) == expected


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve_impl("triton", torch.zeros(1))


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not importable.*'ref', 'triton', 'auto'"):
        kernels.resolve_impl("triton", torch.zeros(1))
    with pytest.raises(RuntimeError, match="not importable"):
        kernels.set_impl("triton")
    assert kernels.resolve_impl("auto", torch.zeros(1)) == "ref"


def test_import_without_triton_subprocess():
    """`import kernels` must work when triton cannot be imported at all."""
    code = """
import sys
sys.modules['triton'] = None            # makes `import triton` raise ImportError
sys.modules['triton.language'] = None
import torch, kernels
assert not kernels.HAS_TRITON
q = torch.randn(2, 1, 4); k = torch.randn(2, 1, 3, 4)
args = (q, k, k, torch.zeros(2, dtype=torch.long), torch.tensor(3))
assert kernels.decode_attention(*args).shape == (2, 1, 4)          # global 'auto' -> ref
kernels.sample_latent(torch.randn(2, 3, 4), 0.01, impl='auto')
kernels.twohot_ce(torch.randn(2, 5), torch.zeros(2), torch.linspace(-1, 1, 5), impl='ref')
try:
    kernels.decode_attention(*args, impl='triton')
except RuntimeError as e:
    assert "not importable" in str(e) and "'ref', 'triton', 'auto'" in str(e), e
else:
    raise AssertionError('impl=triton without triton did not raise')
print('OK')
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
