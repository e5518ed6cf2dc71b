"""Compatibility layer between the GPU kernels and the Numba CUDA versions we run on.

Three things live here so that no kernel module has to care about them:

1. The numpy 2.5 ``np.row_stack`` removal. numba-cuda 0.30.4 still registers an
   overload for ``np.row_stack`` while it sets up its CUDA target, so the first
   real CUDA compile dies with ``AttributeError: module 'numpy' has no attribute
   'row_stack'`` on numpy >= 2.5. ``ensure_numpy_aliases()`` restores the alias
   (it was always just ``np.vstack``) before numba.cuda compiles anything. It is
   called when ``sla_numba.gpu`` is imported, i.e. before any kernel is built.

2. Simulator versus real GPU. ``SIMULATOR`` is True when ``NUMBA_ENABLE_CUDASIM=1``
   was set before numba was imported. The simulator cannot run ``@intrinsic``
   functions or libdevice calls (libdevice silently returns NaN there), and rejects
   some decorator keywords; the helpers below pick a pure-Python twin instead.

3. Small device helpers that need the real compiler's help:
   - ``to_f32`` / ``to_f64``: read one input element into the compute dtype. bf16
     data reaches kernels as int16 bit patterns (torch's bf16 has no CUDA array
     interface, and numba-cuda's own bf16 -> f32 conversion is an out-of-line call
     through local memory); the bits are widened with one shift.
   - ``mul_rn`` / ``add_rn``: float64 multiply and add that the compiler must not
     fuse into an FMA. NVVM contracts ``a * b + c`` into ``fma.rn.f64`` even without
     fastmath (checked in PTX), and classification must give the CPU backend's bits.
"""

import hashlib
import sys
import threading

import numpy as np


# --- 1. numpy >= 2.5 removed np.row_stack; numba-cuda 0.30.4 still references it
# while registering its numpy overloads (numba_cuda/numba/cuda/np/arrayobj.py), so
# restore the alias before numba.cuda compiles. It is the same function as vstack.
def ensure_numpy_aliases():
    """Restore ``np.row_stack`` (= ``np.vstack``) when numpy no longer has it."""
    # Keep the NPY201 exemption: ruff's "fix" rewrites the alias into
    # ``np.vstack = np.vstack`` (it did once, and the GPU backend broke on numpy 2.5).
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


ensure_numpy_aliases()

import numba  # noqa: E402  (after the alias, on purpose)
from numba import cuda  # noqa: E402

from .. import config  # noqa: E402

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

with open(__file__, "rb") as _f:
    _SOURCE_HASH = hashlib.sha1(_f.read()).hexdigest()[:12]


#: Fast-math flags of the attention kernels: FMA contraction, approximate exp2 /
#: log2 and reciprocal (NVVM then also flushes fp32 denormals and uses approximate
#: division). No nnan / ninf: masking relies on -inf. Classification never uses it.
FASTMATH = {"contract", "afn", "arcp"}


def kernel(**options):
    """``cuda.jit`` for kernels and device functions, lazily compiled.

    Options the simulator rejects (``lineinfo``, ``max_registers``,
    ``launch_bounds``) and ``fastmath`` are dropped under the simulator.
    Kernels (not device functions) get ``cache=True``: compiled code is kept on
    disk (``NUMBA_CACHE_DIR`` or ``__pycache__``), per compute capability. The
    kernels are closures made by factories per tile configuration; Numba keys a
    closure's cache entry on a hash of its pickled closure variables (tile sizes,
    device functions by value), which is stable across processes once the
    intrinsics below have pinned uuids (see ``_pin_uuid``). ``SLA_NUMBA_NO_CACHE=1``
    turns it off.
    """
    if SIMULATOR:
        keep = {k: v for k, v in options.items() if k in ("device", "inline")}
        return cuda.jit(**keep)
    if not options.get("device") and config.disk_cache():
        options.setdefault("cache", True)
    return cuda.jit(**options)


def device(fn=None, **options):
    """Decorator for device functions (``@device`` or ``@device(...)``)."""
    deco = kernel(device=True, **options)
    return deco if fn is None else deco(fn)


# --- 2. The simulator's shared arrays, made thread-safe. Numba-cuda's simulator
# (0.30.4) keys each static ``cuda.shared.array`` by the (file, line) of the call and
# creates it on first use with a check-then-store that takes no lock. Every CUDA
# thread is a Python thread there, so two threads reaching the line together can each
# create their own array: the block then has no shared memory, and the kernel
# computes garbage now and then (this was the test suite's rare "failed on the first
# call, passed on re-run"). The replacement below does the same under a lock.
_SHARED_LOCK = threading.Lock()


def simulator_shared_array(self, shape, dtype, alignment=None, *, depth=1):
    """``FakeCUDAShared.array`` with its lookup-or-create under a lock (``depth``:
    how many frames up the kernel line that declares the array is)."""
    from numba.np import numpy_support

    if alignment is not None:
        raise RuntimeError("Array alignment is not supported in cudasim")
    if not isinstance(dtype, np.dtype) and not isinstance(dtype, type):
        dtype = numpy_support.as_dtype(dtype)
    dtype = np.dtype(dtype)
    if shape == 0:  # dynamic shared memory: views of one buffer made per launch
        count = self._dynshared_size // dtype.itemsize
        return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
    frame = sys._getframe(depth)
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with _SHARED_LOCK:
        res = self._allocations.get(caller)
        if res is None:
            res = self._allocations[caller] = np.empty(shape, dtype)
    return res


if SIMULATOR:
    from numba.cuda.simulator import kernelapi as _kernelapi

    #: numba-cuda's own version, kept for the test that shows its race
    UNLOCKED_SHARED_ARRAY = _kernelapi.FakeCUDAShared.array
    _kernelapi.FakeCUDAShared.array = simulator_shared_array

    def to_f32(x):
        return np.float32(x)

    def to_f64(x):
        return np.float64(x)

    def mul_rn(a, b):
        return a * b

    def add_rn(a, b):
        return a + b

else:
    from llvmlite import ir
    from numba.cuda import libdevice, types
    from numba.cuda.extending import intrinsic

    def _widen(context, builder, fromty, value, toty):
        if isinstance(fromty, types.Integer) and fromty.bitwidth == 16:
            # bf16 stored as int16 bits: the fp32 with the same top 16 bits.
            bits = builder.shl(builder.zext(value, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            f = builder.bitcast(bits, ir.FloatType())
            if toty == types.float64:
                f = builder.fpext(f, ir.DoubleType())
            return f
        return context.cast(builder, value, fromty, toty)

    def _check(x):
        ok = isinstance(x, types.Float) or (isinstance(x, types.Integer) and x.bitwidth == 16)
        if not ok:
            raise TypeError(f"to_f32/to_f64: unsupported element type {x}")

    @intrinsic
    def to_f32(typingctx, x):
        _check(x)

        def codegen(context, builder, sig, args):
            return _widen(context, builder, sig.args[0], args[0], types.float32)

        return types.float32(x), codegen

    @intrinsic
    def to_f64(typingctx, x):
        _check(x)

        def codegen(context, builder, sig, args):
            return _widen(context, builder, sig.args[0], args[0], types.float64)

        return types.float64(x), codegen

    def _pin_uuid(intr, name):
        """Give an ``@intrinsic`` a deterministic uuid (Numba draws a random one).

        Numba-cuda pickles closure variables to key the disk cache of closure
        kernels; an intrinsic pickles with its uuid, so a random one would give
        every process a new key (a cache that never hits and only grows). The
        uuid includes a hash of this file, so editing the codegen invalidates it.
        """
        try:
            intr._set_uuid(f"sla_numba._compat.{name}.{_SOURCE_HASH}")
        except Exception:  # noqa: BLE001 - private API; caching just misses then
            pass

    _pin_uuid(to_f32, "to_f32")
    _pin_uuid(to_f64, "to_f64")

    @cuda.jit(device=True)
    def mul_rn(a, b):
        return libdevice.dmul_rn(a, b)

    @cuda.jit(device=True)
    def add_rn(a, b):
        return libdevice.dadd_rn(a, b)


def to_acc_fn(acc_dtype):
    """The element reader for a compute dtype (np.float32 or np.float64)."""
    return to_f64 if np.dtype(acc_dtype) == np.float64 else to_f32
