"""The GPU backend: SLA kernels written with Numba CUDA (``@cuda.jit``).

Three functions, the backend contract of docs/internals.md:

* :func:`classify` (``classify.py``) — pooled block scores → int8 block map,
  bit-identical to the CPU backend's (2 launches);
* :func:`forward` (``forward.py``) — linear states per key block, their sums over
  each row's marginal blocks (one matrix product, ``simt/marginal.py``), then one fused
  kernel per (b, h, query block): sparse FlashAttention over the critical blocks
  and the linear branch (3 launches);
* :func:`backward` (``backward.py``) — dQ per query block over its critical list,
  dK/dV per key block over a reverse index built on the GPU; deterministic, no
  atomics (5 launches: prep, row sums, dQ, column sums, dK/dV).

Kernel paths (``_path.py``): ``forward`` / ``backward`` take ``path="auto"``
(default) | ``"simt"`` | ``"tc"``. With ``"tc"`` the tensor-core kernels
(``tc/forward.py`` / ``tc/backward.py``: fp16 / bf16 ``mma.sync``) do the sparse
branch, ``tc/states.py`` / ``tc/marginal.py`` / ``tc/linear.py`` the linear branch's
states, their marginal sums and the forward's O_l, and SIMT kernels the backward's
linear terms; ``"auto"`` picks ``"tc"`` whenever
:func:`select_path` says so (fp16 / bf16, D a multiple of 16 up to 128, supported
block sizes, compute capability >= 8.0). ``SLA_NUMBA_GPU_PATH=simt|tc|auto``
overrides ``"auto"``; a forced ``"tc"`` on inputs it cannot take is a ``ValueError``.

CUDA graphs: on torch CUDA tensors every launch goes on torch's current stream and every
buffer comes from torch's allocator, so warm calls can be captured; a launch that would
have to load a kernel during capture raises :class:`CaptureError` (``_launcher.py``).

Inputs: torch CUDA tensors, CuPy arrays, numba device arrays or numpy arrays
(copied to the device and back: this is how CI runs the kernels under the CUDA
simulator). Outputs are the same kind as ``q`` (see ``_arrays.py``), in float32
(float64 for float64 input). Kernels compile lazily on first use, so importing
this package needs no GPU. Shared pieces: ``simt/tiles.py`` (tile configs, the
register-tile micro-kernel, loaders, feature maps), ``simt/states.py`` (block lists and
linear states), ``simt/marginal.py`` (sums of states over marginal blocks), ``_compat.py`` (numpy 2.5 / simulator / bf16 shims).
"""

from . import _compat  # noqa: F401  (restores np.row_stack before numba.cuda compiles)
from ._launcher import CaptureError
from ._path import ENV_VAR, PATHS, select_path
from .backward import backward
from .classify import classify
from .forward import forward

__all__ = ["classify", "forward", "backward", "select_path", "PATHS", "ENV_VAR", "CaptureError"]
