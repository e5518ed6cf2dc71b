"""Plumbing shared by the tensor-core kernels: code generation, caching, launching.

Why generated source
--------------------
A warp's accumulators (up to 2 m-tiles x 16 n-tiles x 4 fp32 for D = 128) must
live in registers. Numba has no ``#pragma unroll``; local arrays indexed in
loops end up in local memory as soon as LLVM declines to unroll. So the inner
tile loops are *written out* as straight-line code with one scalar per register
(``o_1_15_3``) by small Python generators in ``forward_tc`` / ``backward_tc``.
The outer loops (over LUT entries, over staging chunks) stay ordinary loops.

The generated text is written once to a per-user cache folder and imported as
a normal module, so ``@cuda.jit(cache=True)`` works (Numba's disk cache keys
on the source file) and tracebacks point at real lines. Nothing is compiled at
import time; a kernel compiles at its first launch (5-15 s), then loads from
the disk cache.

Arrays
------
Kernels take flat 1-D arrays: fp16/bf16 tensors as raw ``int16`` bits, fp32
and int32 as they are. :class:`ArrayAdapter` turns torch CUDA tensors, CuPy
arrays or Numba device arrays (and, under the simulator, numpy arrays or torch
CPU tensors) into such views, allocates outputs with the same library and
hands back the stream to launch on (torch's / CuPy's current stream).
"""
import hashlib
import importlib.util
import os
import sys
import tempfile

import numpy as np

from ... import config
from ...testing import poisoning
from .ptx import SIMULATED

#: Dynamic shared memory above this needs an explicit opt-in per kernel.
_DEFAULT_SMEM_LIMIT = 48 * 1024


def _cache_dir():
    path = os.path.join(config.cache_root(), "tc_kernels_sim" if SIMULATED else "tc_kernels")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".probe")
        with open(probe, "w"):
            pass
        return path
    except OSError:
        path = os.path.join(tempfile.gettempdir(), "sla_numba_tc_%d" % os.getuid())
        os.makedirs(path, exist_ok=True)
        return path


_modules = {}


def load_generated(stem, source):
    """Import generated ``source`` as a module (file written only when it changed)."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    name = "sla_numba_tc_%s_%s" % (stem, digest)
    mod = _modules.get(name)
    if mod is not None:
        return mod
    path = os.path.join(_cache_dir(), name + ".py")
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != source:
        tmp = path + ".%d.tmp" % os.getpid()
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _modules[name] = mod
    return mod


def jit_decorator():
    """The decorator line used by generated kernels."""
    if SIMULATED:
        return "@cuda.jit"
    # No nnan / ninf: masking relies on -inf.
    return "@cuda.jit(fastmath={'contract', 'arcp', 'afn', 'nsz'}, cache=True)"


def smem_decl(name="smem"):
    if SIMULATED:
        return "%s = cuda.shared.array(0, int16)" % name
    return "%s = cuda.shared.array(0, int16, alignment=16)" % name


_opted_in = set()

#: Tooling hook (tools/warm_tc.py): when a set of kernel names, ``launch`` only compiles
#: (filling the disk cache) the kernels named in it and launches nothing.
COMPILE_ONLY = None


def launch(kernel, grid, block, smem_bytes, stream, args):
    """Launch ``kernel`` with ``smem_bytes`` of dynamic shared memory on ``stream``."""
    if COMPILE_ONLY is not None:
        if not SIMULATED and kernel.__name__ in COMPILE_ONLY:
            kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
        return
    if SIMULATED:
        kernel[grid, block, 0, smem_bytes](*args)
        return
    from numba import cuda
    if smem_bytes > _DEFAULT_SMEM_LIMIT:
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        dev = cuda.get_current_device().id
        key = (id(kernel), argtypes, dev, smem_bytes)
        if key not in _opted_in:
            from numba.cuda.cudadrv.driver import binding, driver
            compiled = kernel.compile(argtypes)
            handle = compiled._codelibrary.get_cufunc().handle
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            driver.cuKernelSetAttribute(attr, int(smem_bytes), handle, dev)
            _opted_in.add(key)
    kernel[grid, block, stream, smem_bytes](*args)


def ensure_numpy_compat():
    """numpy 2.5 removed ``np.row_stack``, which numba-cuda 0.30 still references.

    Use the backend's shim when it exists; otherwise restore the alias here.
    """
    try:  # the SIMT backend's official shim, if present
        from .. import _compat  # noqa: F401
    except ImportError:
        pass
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


# ---------------------------------------------------------------------------
# Arrays of several libraries
# ---------------------------------------------------------------------------

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
        n = int(np.prod(shape))
        fill = np.nan if np.dtype(dtype).kind == "f" else 0
        if self.lib == "torch":
            import torch
            tdt = {np.float32: torch.float32, np.int32: torch.int32}[dtype]
            dev = self.like.device
            out = torch.full((n,), fill, dtype=tdt, device=dev) if poisoning() else \
                torch.empty((n,), dtype=tdt, device=dev)
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
