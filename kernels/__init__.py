"""Fused kernels for MATWM (installed as ``matwm_fast.kernels``): Triton beside eager references.

Each op has its reference ``<op>_ref`` in the same file, and the caller picks one per call:

    from matwm_fast import kernels
    kernels.decode_attention(q, k, v, kv_start, kv_len, impl="triton")   # or impl="ref"

The model makes that choice once, at construction (see ``kernels.dispatch``).  Importing this
package never requires Triton; ``impl='triton'`` without it raises a RuntimeError that says so.
The Triton paths are `torch.library` custom ops (namespace ``matwm``), so they are opaque nodes
under torch.compile(fullgraph=True) and safe inside CUDA graphs.
"""

from ._triton_compat import HAS_TRITON, TRITON_INTERPRET, TRITON_VERSION
from .decode_attention import decode_attention, decode_attention_ref
from .dispatch import IMPLS, check_impl, triton_runs_on, why_triton_cannot_run
from .layer_norm import layer_norm, layer_norm_ref
from .sample_action import sample_action, sample_action_ref
from .sample_latent import sample_latent, sample_latent_ref, straight_through
from .twohot_ce import twohot_ce, twohot_ce_ref, twohot_ref

__all__ = [
    "HAS_TRITON",
    "IMPLS",
    "TRITON_INTERPRET",
    "TRITON_VERSION",
    "check_impl",
    "decode_attention",
    "decode_attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "sample_action",
    "sample_action_ref",
    "sample_latent",
    "sample_latent_ref",
    "straight_through",
    "triton_runs_on",
    "twohot_ce",
    "twohot_ce_ref",
    "twohot_ref",
    "why_triton_cannot_run",
]
