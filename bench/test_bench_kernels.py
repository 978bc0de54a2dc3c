"""Benchmarks of the `matwm_fast.kernels` ops: eager reference vs torch.compile(reference) vs Triton.

    python -m pytest bench/test_bench_kernels.py --benchmark-only -q

Shapes: the imagination shapes (B=3072 rows, H=8, D=64, L=20; K=C=32;
M=3072*12 two-hot rows of NB=255 bins) when CUDA is available or
MATWM_BENCH_FULL=1, otherwise small CPU shapes that finish in seconds.
Triton is benchmarked only on CUDA (the CPU interpreter is a correctness tool,
its timings mean nothing).  Every timed call synchronises the device, and each
case is warmed up (JIT / torch.compile) before timing.  device, versions, impl,
dtype and shape go into benchmark.extra_info for the JSON report.
"""

from __future__ import annotations

import os

import pytest
import torch

from matwm_fast import kernels

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FULL = CUDA or os.environ.get("MATWM_BENCH_FULL", "0") == "1"
# bf16 is what imagination runs in on the GPU; on CPU bf16 matmuls are slow
# emulation and not what the CPU path would use, so benchmark fp32 there.
DTYPE = torch.bfloat16 if CUDA else torch.float32
IMPLS = ["ref", "compiled_ref", "triton"]
WARMUP_CALLS = 3

SHAPES = {
    "decode_attention": dict(B=3072, H=8, L=20, D=64) if FULL else dict(B=64, H=8, L=20, D=64),
    "sample_latent": dict(B=3072, K=32, C=32) if FULL else dict(B=64, K=32, C=32),
    "twohot_ce": dict(M=3072 * 12, NB=255) if FULL else dict(M=768, NB=255),
    # the actor-critic update's per-agent LayerNorms: N agents × B·(H+1) rows of the MLP width
    "layer_norm": dict(N=4, M=768 * 13, D=512) if FULL else dict(N=4, M=64, D=512),
    "sample_action": dict(N=4, B=768, A=5) if FULL else dict(N=4, B=64, A=5),
}


# ----------------------------------------------------------------------------- #
# Helpers                                                                        #
# ----------------------------------------------------------------------------- #
def _skip_unavailable(impl: str) -> None:
    if impl != "triton":
        return
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not importable")
    if not CUDA:
        pytest.skip("triton is benchmarked on CUDA only (the CPU interpreter is not a performance path)")
    if kernels.TRITON_INTERPRET:
        pytest.skip("TRITON_INTERPRET is set: timings would be of the interpreter")


def _run_benchmark(benchmark, bench, op: str, impl: str, fn) -> None:
    for _ in range(WARMUP_CALLS):  # JIT compile / torch.compile / autotune caches
        fn()
    benchmark.extra_info.update(
        device=bench.device_name(),
        torch=torch.__version__,
        triton=kernels.TRITON_VERSION,
        impl=impl,
        op=op,
        dtype=str(DTYPE).replace("torch.", ""),
        shape=SHAPES[op],
    )
    benchmark(fn)


def _maybe_compile(fn, impl: str):
    return torch.compile(fn, dynamic=False) if impl == "compiled_ref" else fn


# ----------------------------------------------------------------------------- #
# decode_attention (imagination, no grad)                                        #
# ----------------------------------------------------------------------------- #
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_decode_attention(benchmark, bench, impl):
    _skip_unavailable(impl)
    s = SHAPES["decode_attention"]
    B, H, L, D = s["B"], s["H"], s["L"], s["D"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g).to(DEVICE, DTYPE)  # (B, H, D)
    k = torch.randn(B, H, L, D, generator=g).to(DEVICE, DTYPE)  # (B, H, L, D)
    v = torch.randn(B, H, L, D, generator=g).to(DEVICE, DTYPE)  # (B, H, L, D)
    kv_start = torch.randint(0, L // 2, (B,), generator=g).to(DEVICE)  # (B,)
    kv_len = torch.tensor(L, device=DEVICE)

    if impl == "triton":
        op = lambda *a: kernels.decode_attention(*a, impl="triton")  # noqa: E731
    else:
        op = _maybe_compile(kernels.decode_attention_ref, impl)

    def fn():
        with torch.no_grad():
            out = op(q, k, v, kv_start, kv_len)
        bench.sync()
        return out

    _run_benchmark(benchmark, bench, "decode_attention", impl, fn)


# ----------------------------------------------------------------------------- #
# sample_latent (imagination: forward, fresh noise every call)                   #
# ----------------------------------------------------------------------------- #
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_sample_latent(benchmark, bench, impl):
    _skip_unavailable(impl)
    s = SHAPES["sample_latent"]
    logits = torch.randn(s["B"], s["K"], s["C"], generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)
    seed = torch.tensor(1234, device=DEVICE)
    offset = torch.zeros((), dtype=torch.int64, device=DEVICE)
    step = logits.numel()

    if impl == "triton":

        def op(x):
            out = kernels.sample_latent(x, 0.01, seed=seed, offset=offset, impl="triton")
            offset.add_(step)  # fresh Philox counters next call, as the model does
            return out

    else:
        op = _maybe_compile(lambda x: kernels.sample_latent_ref(x, 0.01), impl)

    def fn():
        with torch.no_grad():
            out = op(logits)
        bench.sync()
        return out

    _run_benchmark(benchmark, bench, "sample_latent", impl, fn)


# ----------------------------------------------------------------------------- #
# twohot_ce (training: forward + backward)                                       #
# ----------------------------------------------------------------------------- #
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_twohot_ce(benchmark, bench, impl):
    _skip_unavailable(impl)
    s = SHAPES["twohot_ce"]
    M, NB = s["M"], s["NB"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(M, NB, generator=g).to(DEVICE, DTYPE).requires_grad_(True)  # (M, NB)
    target = (10 * torch.randn(M, generator=g)).to(DEVICE)  # (M,)
    bins = torch.linspace(-20.0, 20.0, NB, device=DEVICE)  # (NB,)

    if impl == "triton":
        op = lambda *a: kernels.twohot_ce(*a, impl="triton")  # noqa: E731
    else:
        op = _maybe_compile(kernels.twohot_ce_ref, impl)

    def fn():
        logits.grad = None
        loss = op(logits, target, bins)
        loss.mean().backward()
        bench.sync()
        return loss

    _run_benchmark(benchmark, bench, "twohot_ce", impl, fn)


# ----------------------------------------------------------------------------- #
# layer_norm (training: per-agent weights, SiLU, forward + backward)             #
# ----------------------------------------------------------------------------- #
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_layer_norm(benchmark, bench, impl):
    _skip_unavailable(impl)
    s = SHAPES["layer_norm"]
    N, M, D = s["N"], s["M"], s["D"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, M, D, generator=g).to(DEVICE, DTYPE).requires_grad_(True)  # (N, M, D)
    w = (1 + 0.1 * torch.randn(N, 1, D, generator=g)).to(DEVICE).requires_grad_(True)  # (N, 1, D) float32
    b = (0.1 * torch.randn(N, 1, D, generator=g)).to(DEVICE).requires_grad_(True)  # (N, 1, D)

    if impl == "triton":
        op = lambda *a: kernels.layer_norm(*a, act="silu", impl="triton")  # noqa: E731
    else:
        op = _maybe_compile(lambda *a: kernels.layer_norm_ref(*a, act="silu"), impl)

    def fn():
        x.grad = w.grad = b.grad = None
        y = op(x, w, b)
        y.float().square().mean().backward()
        bench.sync()
        return y

    _run_benchmark(benchmark, bench, "layer_norm", impl, fn)


# ----------------------------------------------------------------------------- #
# sample_action (imagination: forward, fresh noise every call)                   #
# ----------------------------------------------------------------------------- #
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_sample_action(benchmark, bench, impl):
    _skip_unavailable(impl)
    s = SHAPES["sample_action"]
    N, B, A = s["N"], s["B"], s["A"]
    logits = torch.randn(N, B, A, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE)  # (N, B, A)
    invalid = torch.zeros(N, A, dtype=torch.bool, device=DEVICE)  # (N, A)
    invalid[-1, -1] = True
    seed = torch.tensor(1234, device=DEVICE)
    offset = torch.zeros((), dtype=torch.int64, device=DEVICE)

    if impl == "triton":

        def op(x):
            out = kernels.sample_action(x, invalid, seed=seed, offset=offset, impl="triton")
            offset.add_(logits.numel())  # fresh Philox counters next call
            return out

    else:
        op = _maybe_compile(lambda x: kernels.sample_action_ref(x, invalid), impl)

    def fn():
        with torch.no_grad():
            out = op(logits)
        bench.sync()
        return out

    _run_benchmark(benchmark, bench, "sample_action", impl, fn)
