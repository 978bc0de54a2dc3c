"""What a CUDA run decides by device type, applied to CPU tensors: the kernels a CUDA step
launches, counted on a machine without one.

Why: the launch budget (:mod:`matwm_fast.tools.launches`) costs the CUDA step on a CPU, and two of
torch's choices depend on the device type.

* **Autocast's cast policy.**  Under bf16 autocast CUDA runs LayerNorm, softmax, exp, log, sums,
  losses, ... in float32 (a cast in, and the next matmul casts back); the CPU policy leaves most
  of them in bf16.  At the paper structure the difference is hundreds of kernels per env step.
* **torch.optim's default implementation.**  An optimiser without ``foreach``/``fused`` runs the
  multi-tensor (``_foreach_*``) kernels on CUDA and a Python loop over the parameters on the CPU:
  ~10 kernels per parameter instead of ~10 in all.

Fake CUDA tensors cannot stand in on a CPU-only build of torch: their forward runs, but the
autograd engine needs the current stream of a CUDA accelerator for every backward
(``InputBuffer::add``: "Cannot access accelerator device when none is available").  So the tensors
stay on the CPU and, inside :func:`cuda_policy`, the CPU's choices are replaced by CUDA's.

How: a Python kernel on the ``AutocastCPU`` dispatch key for every op that CUDA's autocast
registers, doing what ``aten/src/ATen/autocast_mode.{h,cpp}`` does for ``AutocastCUDA``
(``cached_cast`` with its weight cache, the five policies below), and a plain pass-through for the
ops only the CPU policy casts; and the CPU listed among the devices whose optimisers default to
the foreach kernels.  The tables are torch 2.13's ``AT_FORALL_*`` lists;
``tests/tools/test_cuda_policy.py`` checks them against the ``AutocastCUDA`` registrations of the
installed build, so a torch upgrade that changes CUDA's policy fails a test instead of silently
costing the wrong casts.  Everything is undone on exit (``Library._destroy`` restores the CPU's
kernels), and the kernels act only where autocast is on.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Any, Callable
from unittest import mock

import torch

Tensor = torch.Tensor
KEY = "AutocastCPU"

# torch 2.13, ATen/autocast_mode.h and autocast_mode.cpp (AutocastCUDA): op → policy
LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "cudnn_convolution",
    "cudnn_convolution_transpose",
)
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d",
    "upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
    "scatter_add",
)
BANNED = ("binary_cross_entropy",)


def policy_table() -> dict[str, str]:
    """Every op CUDA's autocast registers ("name" or "name.overload") → its policy."""
    table = {op: "lower_precision_fp" for op in LOWER_PRECISION}
    table |= {op: "fp32" for op in FP32}
    table |= {op: "fp32_set_opt_dtype" for op in FP32_SET_OPT_DTYPE}
    table |= {op: "fp32_append_dtype" for op in FP32_APPEND_DTYPE}
    table |= {op: "promote" for op in PROMOTE}
    return table | {op: "banned" for op in BANNED}


def overload(name: str) -> torch._ops.OpOverload:
    """``"pow.Scalar"`` → ``torch.ops.aten.pow.Scalar`` (no overload name: ``.default``)."""
    op, _, over = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), over or "default")


# ----------------------------------------------------------------------------------- cached_cast
class _Casts:
    """``at::autocast::cached_cast`` for device CUDA, with CPU tensors in CUDA tensors' place.

    Casts of float32 leaf tensors that require grad (the weights) to the low-precision type are
    made once per outermost autocast region, as CUDA caches them; the cache empties when
    ``torch.clear_autocast_cache`` runs (the outermost ``autocast.__exit__`` calls it)."""

    def __init__(self):
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}  # id(weight) → (weight kept alive, its cast)

    @staticmethod
    def eligible(x: Any) -> bool:
        return isinstance(x, Tensor) and x.device.type == "cpu" and x.is_floating_point() and x.dtype != torch.float64

    def cast(self, x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self.cast(t, dtype) for t in x)
        if not self.eligible(x) or x.dtype == dtype:
            return x
        low = torch.get_autocast_dtype("cpu")
        cacheable = (dtype == low and x.dtype == torch.float32 and x.requires_grad and x.is_leaf
                     and not x._is_view() and torch.is_autocast_cache_enabled())
        if not cacheable:
            return x.to(dtype)
        hit = self.cache.get(id(x))
        if hit is None:
            hit = self.cache[id(x)] = (x, x.to(dtype))
        return hit[1]

    def widest(self, args: tuple) -> torch.dtype:
        """``promote_type``: float32 if any eligible tensor is float32, else the low precision."""
        flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))]
        kinds = {t.dtype for t in flat if self.eligible(t)}
        return torch.float32 if torch.float32 in kinds else torch.get_autocast_dtype("cpu")


def _below(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """``op`` called again with the autocast key excluded, as the C++ wrappers redispatch."""
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return op(*args, **kwargs)


def _kernel(name: str, policy: str | None, casts: _Casts) -> Callable:
    op = overload(name)
    if policy is None:  # only the CPU's policy casts it: on CUDA it falls through
        return lambda *args, **kwargs: _below(op, args, kwargs)
    if policy == "banned":
        def banned(*args, **kwargs):
            raise RuntimeError(f"aten::{name} is unsafe to autocast (CUDA's policy bans it)")
        return banned
    if policy in ("lower_precision_fp", "fp32"):
        def cast_all(*args, **kwargs):
            dtype = torch.get_autocast_dtype("cpu") if policy == "lower_precision_fp" else torch.float32
            return _below(op, casts.cast(args, dtype), {k: casts.cast(v, dtype) for k, v in kwargs.items()})
        return cast_all
    if policy == "promote":
        def promote(*args, **kwargs):
            dtype = casts.widest(args + tuple(kwargs.values()))
            return _below(op, casts.cast(args, dtype), {k: casts.cast(v, dtype) for k, v in kwargs.items()})
        return promote
    if policy == "fp32_set_opt_dtype":
        names = [a.name for a in op._schema.arguments]
        at = names.index("dtype")

        def set_dtype(*args, **kwargs):
            if casts.eligible(args[0]):  # the tensors stay as they are: only an unset dtype becomes float32
                if at < len(args):
                    args = args[:at] + (args[at] if args[at] is not None else torch.float32,) + args[at + 1:]
                elif kwargs.get("dtype") is None:
                    kwargs = kwargs | {"dtype": torch.float32}
            return _below(op, args, kwargs)
        return set_dtype
    if policy == "fp32_append_dtype":
        with_dtype = overload(FP32_APPEND_DTYPE[name])

        def append_dtype(*args, **kwargs):
            if casts.eligible(args[0]):
                return _below(with_dtype, args, kwargs | {"dtype": torch.float32})
            return _below(op, args, kwargs)
        return append_dtype
    raise ValueError(f"unknown autocast policy {policy!r} for aten::{name}")


def cpu_registrations() -> set[str]:
    """The aten ops the CPU's own autocast policy registers ("name" or "name.overload")."""
    return {r.removeprefix("aten::") for r in torch._C._dispatch_get_registrations_for_dispatch_key(KEY)
            if r.startswith("aten::")}


def cuda_registrations() -> set[str]:
    """The aten ops this build's ``AutocastCUDA`` registers: what :func:`policy_table` must list."""
    return {r.removeprefix("aten::") for r in torch._C._dispatch_get_registrations_for_dispatch_key("AutocastCUDA")
            if r.startswith("aten::")}


def _foreach_devices_with_cpu(defaults: Callable[[], list[str]]) -> Callable[[], list[str]]:
    return lambda: [*defaults(), "cpu"]


@contextlib.contextmanager
def cuda_policy():
    """Within: ``torch.autocast("cpu", ...)`` casts as ``torch.autocast("cuda", ...)`` would, and
    an optimiser left to choose runs the foreach kernels, as on CUDA."""
    casts = _Casts()
    table = policy_table()
    optim = importlib.import_module("torch.optim.optimizer")  # the module, not torch.optim.Optimizer
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - a scoped override, destroyed below
    clear = torch.clear_autocast_cache

    def clear_both() -> None:
        clear()
        casts.cache.clear()

    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel": intended
            warnings.simplefilter("ignore")
            for name in sorted(set(table) | cpu_registrations()):
                lib.impl(name, _kernel(name, table.get(name), casts), KEY)
        torch.clear_autocast_cache = clear_both
        devices = optim._get_foreach_kernels_supported_devices
        with mock.patch.object(optim, "_get_foreach_kernels_supported_devices", _foreach_devices_with_cpu(devices)):
            yield
    finally:
        torch.clear_autocast_cache = clear
        casts.cache.clear()
        lib._destroy()
