"""Fused kernels for MATWM: Triton implementations with eager PyTorch references.

Every op dispatches on one switch (see `kernels.dispatch`):

    import kernels
    kernels.set_impl("ref")                 # or "triton" / "auto" (default)
    with kernels.use_impl("triton"): ...
    kernels.decode_attention(q, k, v, kv_start, kv_len, impl=None)

Importing this package never requires Triton; asking for impl='triton' without
it raises a RuntimeError that says so.  The Triton paths are registered as
`torch.library` custom ops (namespace ``matwm``), so they are opaque nodes
under torch.compile(fullgraph=True) and safe inside CUDA graphs.
"""

from ._triton_compat import HAS_TRITON, TRITON_INTERPRET, TRITON_VERSION
from .decode_attention import decode_attention, decode_attention_ref
from .dispatch import ALLOWED_IMPLS, get_impl, resolve_impl, set_impl, triton_available, use_impl
from .sample_latent import sample_latent, sample_latent_ref
from .twohot_ce import two_hot_ref, twohot_ce, twohot_ce_ref

__all__ = [
    "ALLOWED_IMPLS",
    "HAS_TRITON",
    "TRITON_INTERPRET",
    "TRITON_VERSION",
    "decode_attention",
    "decode_attention_ref",
    "get_impl",
    "resolve_impl",
    "sample_latent",
    "sample_latent_ref",
    "set_impl",
    "triton_available",
    "two_hot_ref",
    "twohot_ce",
    "twohot_ce_ref",
    "use_impl",
]
