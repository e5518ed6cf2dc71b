r"""Plumbing shared by the tensor-core kernels: launching and array views.

The kernels themselves are ordinary ``@cuda.jit`` closures made by factories
(``forward.make_sparse_forward``, ``backward.make_sparse_dq`` / ``make_sparse_dkv``,
``states.make_states_kernel``, ``marginal.make_marginal_kernel``,
``linear.make_linear_kernel``): constants come from the closure, accumulators are
``cuda.local.array``\ s indexed by constant-trip loops that LLVM unrolls into registers.
Numba's disk cache keeps them between processes (the intrinsics in ``ptx.py`` have
fixed ids, so a closure's cache key is the same in every process).

Arrays
------
Kernels take flat 1-D arrays: fp16/bf16 tensors as raw ``int16`` bits, fp32
and int32 as they are. :class:`ArrayAdapter` turns torch CUDA tensors, CuPy
arrays or Numba device arrays (and, under the simulator, numpy arrays or torch
CPU tensors) into such views, allocates outputs with the same library and
hands back the stream to launch on (torch's / CuPy's current stream).
"""

import functools
import math

import numpy as np

from ...testing import poisoning
from .. import _launcher
from .ptx import SIMULATED


def launch(kernel, grid, block, smem_bytes, stream, args):
    """Launch ``kernel`` with ``smem_bytes`` of dynamic shared memory on ``stream``
    (``gpu/_launcher.py``: direct launch, opt-in above 48 KiB)."""
    _launcher.launch(kernel, grid, block, 0 if SIMULATED else stream, args, smem_bytes)


def device_ok(device=None):
    """A CUDA device of compute capability >= 8.0 (always True under the simulator).

    ``device``: None (the current device), an index or a ``torch.device``. The answer
    for an index is kept: asking Numba costs tens of µs, and a call asks every time.
    """
    if SIMULATED:
        return True
    try:
        from numba import cuda

        if device is None:
            if not cuda.is_available():
                return False
            cc = uniform_cc()
            if cc is not None:  # every GPU alike: no need to ask which one is current
                return cc >= (8, 0)
            idx = cuda.get_current_device().id
        else:
            idx = device if isinstance(device, int) else (getattr(device, "index", None) or 0)
        return _index_ok(int(idx))
    except Exception:  # noqa: BLE001 - no driver or no such device: no tensor cores
        return False


@functools.cache
def uniform_cc():
    """The compute capability every visible GPU shares, or None when they differ (or
    there is none). Asked once a process: the usual machine has one kind of GPU, and
    then a launch need not look up the current device (a few Numba context lookups,
    ~10 µs each, several times a call)."""
    from numba import cuda

    if not cuda.is_available():
        return None
    ccs = {tuple(g.compute_capability) for g in cuda.gpus}
    return ccs.pop() if len(ccs) == 1 else None


@functools.cache
def _index_ok(idx):
    from numba import cuda

    if not cuda.is_available():
        return False
    return tuple(cuda.gpus[idx].compute_capability) >= (8, 0)


# ---------------------------------------------------------------------------
# Arrays of several libraries
# ---------------------------------------------------------------------------


def flat(x):
    """A flat (1-D) view of a C-contiguous array of any supported library (no copy:
    writes through it reach ``x``)."""
    return x if x.ndim == 1 else x.reshape(int(math.prod(x.shape)))


def int32_pairs(x):
    """The flat int32 view of a C-contiguous int16 array (pairs of 16-bit values) of
    any supported library; its size must be even."""
    x = flat(x)
    if _lib(x) == "torch":
        import torch

        return x.view(torch.int32)
    return x.view(np.int32)


def size(x):
    """Number of elements of an array of any supported library."""
    return int(math.prod(x.shape))


def address(x):
    """The address of an array's first element (device or host), or None if unknown:
    the kernels that load 16 bytes at a time (or ``cp.async`` 8 / 16) check alignment."""
    for attr in ("__cuda_array_interface__", "__array_interface__"):
        iface = getattr(x, attr, None)
        if iface is not None:
            return int(iface["data"][0])
    ptr = getattr(x, "data_ptr", None)  # torch CPU tensors under the simulator
    return int(ptr()) if callable(ptr) else None


def dtype_name(x):
    """The dtype's name without a library prefix ('float32', 'int16', 'bfloat16', ...)."""
    return _name_of(x.dtype)


@functools.lru_cache(maxsize=64)
def _name_of(dtype):
    # kept per dtype: str() of a numpy dtype costs ~3 µs (numpy builds the name in
    # Python), and a call's launchers ask ~15 times
    return str(dtype).replace("torch.", "")


def _lib(x):
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    if isinstance(x, np.ndarray):
        return "numpy"
    return "numba"


def half_kind(x):
    """'bf16' or 'f16' for a 16-bit float array of any supported library, else None."""
    name = str(x.dtype).replace("torch.", "")
    if name == "bfloat16":
        return "bf16"
    if name == "float16":
        return "f16"
    return None


class ArrayAdapter:
    """Views and allocations in the library of a reference array ``like``."""

    def __init__(self, like):
        self.lib = _lib(like)
        self.like = like
        if SIMULATED and self.lib == "torch" and like.device.type == "cuda":  # pragma: no cover
            raise ValueError("CUDA tensors cannot be used under the CUDA simulator")

    def stream(self):
        if SIMULATED:
            return 0
        from numba import cuda

        if self.lib == "torch":
            import torch

            return cuda.external_stream(torch.cuda.current_stream(self.like.device).cuda_stream)
        if self.lib == "cupy":
            import cupy

            return cuda.external_stream(cupy.cuda.get_current_stream().ptr)
        return 0

    def _flat(self, x):
        if self.lib == "torch":
            x = x.contiguous().reshape(-1)
            return x if not SIMULATED else x.numpy()
        if self.lib == "cupy":
            import cupy

            return cupy.ascontiguousarray(x).ravel()
        if self.lib == "numpy":
            return np.ascontiguousarray(x).reshape(-1)
        return x.reshape(x.size) if x.ndim != 1 else x

    def bits(self, x):
        """fp16/bf16 array -> flat int16 view of its bits."""
        if self.lib == "torch":
            import torch

            x = x.contiguous().view(torch.int16).reshape(-1)
            return x if not SIMULATED else x.numpy()
        if self.lib == "cupy":
            import cupy

            return cupy.ascontiguousarray(x).view(cupy.int16).ravel()
        if self.lib == "numpy":
            return np.ascontiguousarray(x).view(np.int16).reshape(-1)
        return self._flat(x).view(np.int16)

    def flat(self, x, dtype):
        """Flat contiguous view/copy with numpy dtype ``dtype`` (float32 / int32)."""
        if self.lib == "torch":
            import torch

            tdt = {np.float32: torch.float32, np.int32: torch.int32}[dtype]
            return self._flat(x.to(tdt))
        if self.lib == "cupy":
            return self._flat(x.astype(dtype, copy=False))
        if self.lib == "numpy":
            return self._flat(np.asarray(x, dtype=dtype))
        return self._flat(x)

    def empty(self, shape, dtype):
        """Flat output buffer of ``prod(shape)`` elements (NaN-filled when poisoning)."""
        n = int(math.prod(shape))
        fill = np.nan if np.dtype(dtype).kind == "f" else 0
        if self.lib == "torch":
            import torch

            tdt = {np.float32: torch.float32, np.int32: torch.int32}[dtype]
            dev = self.like.device
            out = (
                torch.full((n,), fill, dtype=tdt, device=dev)
                if poisoning()
                else torch.empty((n,), dtype=tdt, device=dev)
            )
            return out if not SIMULATED else out.numpy()
        if self.lib == "cupy":
            import cupy

            return cupy.full((n,), fill, dtype=dtype) if poisoning() else cupy.empty((n,), dtype)
        if self.lib == "numpy":
            return np.full((n,), fill, dtype=dtype) if poisoning() else np.empty((n,), dtype)
        from numba import cuda

        if poisoning():
            return cuda.to_device(np.full((n,), fill, dtype=dtype))
        return cuda.device_array((n,), dtype)

    def wrap(self, flat, shape):
        """Reshape a flat output; torch CPU tensors again under the simulator."""
        if self.lib == "torch" and SIMULATED:
            import torch

            return torch.from_numpy(flat).reshape(shape)
        return flat.reshape(shape)
