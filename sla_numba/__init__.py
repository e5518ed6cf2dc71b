"""sla_numba: Sparse-Linear Attention (SLA) in Numba, for CPUs and CUDA GPUs.

Public API
----------
classify_blocks(q, k, ...)      -> BlockClassification (.map, .lut)
sla_attention(q, k, v, ...)     -> O  (numpy, torch or CuPy; torch is differentiable)
kernel_path(q, ...)             -> "cpu" | "gpu:simt" | "gpu:tc": which kernels run
warmup(head_dim, dtypes, ...)   -> compile the kernels ahead of time (first calls compile)
SparseLinearAttention(head_dim) -> torch.nn.Module with the learnable projection
sla_attention_ulysses(q, k, v, group=...)  -> SLA on a sequence split over ranks
UlyssesSparseLinearAttention(head_dim)     -> its nn.Module (sla_numba.distributed)
reference                       -> the dense float64 oracle (teaching code)

Shapes are (B, H, N, D) throughout. See docs/algorithm.md for the exact semantics.
"""

from ._warmup import warmup
from .api import BlockClassification, classify_blocks, kernel_path, sla_attention

__version__ = "0.1.0"

__all__ = [
    "BlockClassification",
    "classify_blocks",
    "kernel_path",
    "sla_attention",
    "warmup",
    "SparseLinearAttention",
    "reference",
    "__version__",
    "sla_attention_ulysses",
    "classify_blocks_ulysses",
    "UlyssesSparseLinearAttention",
]

#: Names loaded on first use from sla_numba.distributed (torch.distributed).
_DISTRIBUTED = ("sla_attention_ulysses", "classify_blocks_ulysses", "UlyssesSparseLinearAttention")


def __getattr__(name):
    # torch is optional: only importing the module (or the reference) loads it.
    if name == "SparseLinearAttention":
        from .modules import SparseLinearAttention

        return SparseLinearAttention
    if name in _DISTRIBUTED:
        from . import distributed

        return getattr(distributed, name)
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module 'sla_numba' has no attribute {name!r}")
