"""The CPU backend: SLA kernels written with Numba (``@njit(parallel=True)``).

Three functions, the backend contract of docs/internals.md:

* :func:`classify` (``classify.py``) — pooled block scores → int8 block map;
* :func:`forward` (``forward.py``) — sparse FlashAttention-style branch plus the
  linear branch, per query block;
* :func:`backward` (``backward.py``) — dQ per query block, dK/dV per key block
  (through a reverse index of the map), deterministic, no atomics.

Shared building blocks (small matrix products, feature maps, block lists, the
linear branch's per-key-block states) live in ``_common.py``; the register-tiled
micro-kernel under every matrix product in ``_simd.py``. Inputs are
C-contiguous numpy arrays, (B, H, N, D), float32 or float64; everything is computed
in the input dtype. Kernels are compiled on first use (tens of seconds) and cached
on disk (``cache=True``; ``NUMBA_CACHE_DIR`` moves the cache).

Note for developers: Numba's cache of a kernel is keyed on the kernel's own
source file only. After editing ``_common.py`` or ``_simd.py`` (the products'
micro-kernel), delete the cached ``*.nbi``/``*.nbc``
files (``__pycache__`` here, or ``NUMBA_CACHE_DIR``), or the kernels in
``forward.py``/``backward.py`` keep the old helpers.
"""

from .._threads import choose_threading_layer, serialized
from .backward import backward as _backward
from .classify import classify as _classify
from .forward import forward as _forward

# Fork- and thread-safety (see sla_numba/_threads.py): a fork-safe threading layer
# unless the user chose one, and one kernel call at a time across threads.
choose_threading_layer()
backward, classify, forward = serialized(_backward), serialized(_classify), serialized(_forward)

__all__ = ["classify", "forward", "backward"]
