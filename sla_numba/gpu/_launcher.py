"""Launching a compiled kernel without Numba's dispatcher.

Every kernel of the GPU backend is launched through :func:`launch`. It does what
``kernel[grid, block, stream, smem](*args)`` does, in a fraction of the host time.

Why (measured on the H200's host, ``tools/host_overhead.py``, BENCHMARKS.md): one
launch of a kernel with 8 arrays and 2 ints costs **59 µs** through Numba's dispatcher
with Numba device arrays, **252 µs** with torch tensors (each goes through the CUDA
array interface and becomes a Numba device array), and **14 µs** when the compiled
kernel is handed to ``cuda.core.launch`` with its argument list built from pointers.
A forward is ~8 launches and a backward ~10: at the B2 shape (B2 H16 N8192 D64) the
whole forward was host-bound (3.4 ms of Python for 0.6 ms of kernels).

What the dispatcher does per launch, and what we keep of it:

1. *type the arguments* (``typeof`` on each) and pick the compiled overload for that
   signature, compiling it the first time. We do this once per signature: the cache
   key is the kernel, the device, and a cheap key per argument (dtype and rank of an
   array, Python type of a scalar).
2. *marshal the arguments*: a Numba array argument is a struct of ``meminfo``,
   ``parent``, ``nitems``, ``itemsize``, ``data``, ``shape[ndim]``, ``strides[ndim]``
   (``meminfo`` and ``parent`` are 0 on the device); a scalar is its C value. We build
   that list straight from :class:`~._arrays.DeviceView` pointers and shapes.
3. *launch*: ``cuda.core.launch(stream, LaunchConfig(grid, block, smem), kernel, *args)``.
   We keep the ``LaunchConfig`` and the ``cuda.core`` stream per value.

Where the direct launch cannot be used it falls back, per launch, to the dispatcher
(same kernel, same result): under the CUDA simulator; with ``SLA_NUMBA_LAUNCH=numba``;
for an argument that is not a C-contiguous device array or a plain scalar; on a Numba
CUDA without ``cuda.core`` launches (numba-cuda < 0.23). :data:`counts` says how many
launches took each way (tests check that the direct one is taken).

Two modes serve :mod:`._precompile` (compiling a call's kernels side by side the first
time): inside :func:`strict` a launch of a kernel this process has not loaded raises
:class:`Missing`; inside :func:`collecting` nothing is launched and each kernel not yet
loaded is recorded as a :class:`Job` (kernel, device, argument types), which
:func:`load` later loads (or compiles).

Kernels that ask for more than 48 KiB of dynamic shared memory need an opt-in per
compiled function and device (``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``);
:func:`launch` sets it on first use, for both ways of launching.

CUDA graphs: a launch of a kernel already loaded is one ``cuLaunchKernelEx`` on the
caller's stream, which stream capture records like any other launch. Loading a kernel
(compiling it, or reading Numba's disk cache and loading its module) is not allowed
while a stream captures. So where a kernel is not loaded yet, and only there (a warm
launch asks nothing), the launcher asks the driver whether the launch stream is
capturing (:func:`capturing`); if it is, :class:`CaptureError` says to run the call
once before capturing.
"""

import contextlib
import ctypes
import threading

import numpy as np

from .. import config
from ._arrays import DeviceView, device_view, stream_device
from ._compat import SIMULATOR, cuda

#: Dynamic shared memory above this needs an explicit opt-in per kernel.
DEFAULT_SMEM_LIMIT = 48 * 1024

#: Launches so far, by the way they took: {"direct": n, "numba": n}.
counts = {"direct": 0, "numba": 0}

try:  # numba-cuda >= 0.23 launches through cuda.core; so do we
    from cuda.core import LaunchConfig as _LaunchConfig
    from cuda.core import Stream as _CoreStream
    from cuda.core import launch as _core_launch
except ImportError:  # pragma: no cover - older numba-cuda
    _core_launch = None

_SCALARS = (int, float, bool, np.integer, np.floating, np.bool_)

# ctypes of the scalar kinds Numba's typeof gives (numba-cuda's _prepare_args does the
# same conversion, by name: c_int64, c_double, ...)
_CTYPES = {
    "int8": ctypes.c_int8,
    "int16": ctypes.c_int16,
    "int32": ctypes.c_int32,
    "int64": ctypes.c_int64,
    "uint8": ctypes.c_uint8,
    "uint16": ctypes.c_uint16,
    "uint32": ctypes.c_uint32,
    "uint64": ctypes.c_uint64,
    "float32": ctypes.c_float,
    "float64": ctypes.c_double,
}


class _Compiled:
    """One (kernel, device, signature): the cuda.core kernel and how to pack each
    argument (``"array"`` or a ctypes scalar type)."""

    __slots__ = ("kernel", "handle", "packers", "smem_opt_in")

    def __init__(self, kernel, handle, packers):
        self.kernel = kernel
        self.handle = handle
        self.packers = packers
        self.smem_opt_in = DEFAULT_SMEM_LIMIT


class Job:
    """A kernel a call will launch and this process has not loaded: what :func:`load`
    needs to load or compile it (``argtypes``: Numba's types of its arguments)."""

    __slots__ = ("key", "kernel", "device", "argtypes", "packers")

    def __init__(self, key, kernel, device, argtypes, packers):
        self.key, self.kernel, self.device = key, kernel, device
        self.argtypes, self.packers = argtypes, packers


class Missing(Exception):
    """Raised inside :func:`strict` by a launch of a kernel not loaded in this process."""


class CaptureError(RuntimeError):
    """A launch of a kernel not loaded in this process, on a stream that is capturing
    a CUDA graph (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``, ...):
    the kernel cannot be compiled or loaded during capture."""


def capturing(stream):
    """Whether ``stream`` (a Numba stream, or 0) is capturing a CUDA graph.

    One driver call (``cuStreamIsCapturing``), made only where a kernel must be loaded.
    The legacy default stream (0) answers "implicit capture" while another stream of
    the context captures in blocking mode: that counts as capturing too (a launch
    there would join, and break, that capture). No driver (the simulator): False.
    """
    if SIMULATOR:
        return False
    try:
        from cuda.bindings import driver as cu

        err, status = cu.cuStreamIsCapturing(_handle(stream))
    except Exception:  # noqa: BLE001 - no cuda.bindings or no driver: nothing captures
        return False
    if err == cu.CUresult.CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
        return True
    return err == cu.CUresult.CUDA_SUCCESS and int(status) != 0


def _not_warm(kernel, stream):
    """The :class:`CaptureError` of a launch of ``kernel`` not loaded in this process."""
    fn = getattr(kernel, "py_func", kernel)
    name = getattr(fn, "__qualname__", type(fn).__name__)
    return CaptureError(
        f"sla_numba: the GPU kernel {name!r} is not loaded in this process, and the "
        f"stream it is launched on (0x{_handle(stream):x}) is capturing a CUDA graph; a "
        "kernel cannot be compiled or loaded during capture. Run the same call (same "
        "shapes, dtypes and options) once before capturing, as a warm-up."
    )


_compiled = {}  # (dispatcher, device id, argument keys) -> _Compiled
_configs = {}  # (grid, block, smem) -> LaunchConfig
_core_streams = {}  # stream handle -> cuda.core Stream
_mode = threading.local()  # .strict: bool; .jobs: dict key -> Job while collecting


@contextlib.contextmanager
def strict():
    """Launches inside raise :class:`Missing` instead of loading a new kernel."""
    _mode.strict = True
    try:
        yield
    finally:
        _mode.strict = False


@contextlib.contextmanager
def collecting():
    """A dry run: launches inside run nothing; yields a dict, filled with one
    :class:`Job` per kernel (and signature) not yet loaded in this process."""
    jobs = _mode.jobs = {}
    try:
        yield jobs
    finally:
        _mode.jobs = None


def in_mode():
    """Whether this thread is inside :func:`strict` or :func:`collecting`."""
    return getattr(_mode, "strict", False) or getattr(_mode, "jobs", None) is not None


def direct_launches():
    """Whether launches go the direct way (not under the simulator, not with
    ``SLA_NUMBA_LAUNCH=numba``, numba-cuda with cuda.core launches)."""
    return not SIMULATOR and _core_launch is not None and config.launcher() == "direct"


def launch(kernel, grid, block, stream, args, smem=0):
    """Launch the ``@cuda.jit`` dispatcher ``kernel`` on ``stream``.

    Same meaning as ``kernel[grid, block, stream, smem](*args)``. ``stream`` is a Numba
    stream (``DeviceCall.stream``) or 0 for the default stream.
    """
    if SIMULATOR:
        kernel[grid, block, stream, smem](*args)
        return
    jobs = getattr(_mode, "jobs", None)
    if jobs is not None:  # a dry run (collecting): note the kernel, launch nothing
        _record(jobs, kernel, stream, args)
        return
    if direct_launches():
        packed = _direct_args(kernel, stream, args)
        if packed is not None:
            compiled, kargs = packed
            if smem > compiled.smem_opt_in:
                _opt_in(compiled, lambda: compiled.handle, smem)
                compiled.smem_opt_in = smem
            _core_launch(_core_stream(stream), _config(grid, block, smem), compiled.kernel, *kargs)
            counts["direct"] += 1
            return
    if capturing(stream):  # (the dispatcher's way is slow anyway: one driver call more)
        if tuple(kernel.typeof_pyval(a) for a in args) not in kernel.overloads:
            raise _not_warm(kernel, stream)
    if smem > DEFAULT_SMEM_LIMIT:
        argtypes = tuple(kernel.typeof_pyval(a) for a in args)
        _opt_in(
            (kernel, argtypes),
            lambda: kernel.compile(argtypes)._codelibrary.get_cufunc().handle,
            smem,
        )
    kernel[grid, block, stream, smem](*args)
    counts["numba"] += 1


def _key_and_values(kernel, stream, args):
    """(cache key, values) of a direct launch: device views and plain scalars; None
    when an argument is neither (the dispatcher takes that launch)."""
    keys = []
    values = []
    for a in args:
        if type(a) is DeviceView:  # most arguments: asked first
            keys.append((a.dtype, a.ndim))
            values.append(a)
            continue
        if isinstance(a, _SCALARS):
            keys.append(type(a))
            values.append(a)
            continue
        view = device_view(a)
        if view is None:
            return None
        keys.append((view.dtype, view.ndim))
        values.append(view)
    device = _device_of(stream)
    return (kernel, device, tuple(keys)), values


def _record(jobs, kernel, stream, args):
    """Collecting: note a kernel this process has not loaded (direct launches only;
    a launch the dispatcher takes compiles when the call runs for real)."""
    if not direct_launches():
        return
    kv = _key_and_values(kernel, stream, args)
    if kv is None or kv[0] in _compiled or kv[0] in jobs:
        return
    key, values = kv
    argtypes, packers = _argtypes(kernel, values)
    jobs[key] = Job(key, kernel, key[1], argtypes, packers)


def load(job):
    """Load ``job``'s kernel into this process (from Numba's disk cache, or compiling
    it), as the first launch would."""
    if job.key not in _compiled:
        _compiled[job.key] = _load(job.kernel, job.device, job.argtypes, job.packers)


def _direct_args(kernel, stream, args):
    """(compiled, argument list) for a direct launch, or None to use the dispatcher."""
    kv = _key_and_values(kernel, stream, args)
    if kv is None:
        return None
    key, values = kv
    compiled = _compiled.get(key)
    if compiled is None:
        if capturing(stream):
            raise _not_warm(kernel, stream)
        if getattr(_mode, "strict", False):
            raise Missing(kernel)
        compiled = _compiled[key] = _compile(kernel, key[1], values)
    kargs = []
    for pack, val in zip(compiled.packers, values):
        if pack == "array":
            kargs += (0, 0, val.size, val.dtype.itemsize, val.ptr)
            kargs += val.shape
            kargs += val.strides
        else:
            kargs.append(pack(val))
    return compiled, kargs


def _compile(kernel, device, values):
    """The :class:`_Compiled` of ``kernel`` for these argument values."""
    return _load(kernel, device, *_argtypes(kernel, values))


def _argtypes(kernel, values):
    """Type the arguments as Numba's dispatcher would; note how to pack each one."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    argtypes, packers = [], []
    for val in values:
        if isinstance(val, DeviceView):
            # a C-contiguous device array is typed layout 'C' (DeviceNDArray._numba_type_)
            argtypes.append(types.Array(numpy_support.from_dtype(val.dtype), val.ndim, "C"))
            packers.append("array")
            continue
        ty = kernel.typeof_pyval(val)
        argtypes.append(ty)
        if ty == types.boolean:
            packers.append(bool)
        elif str(ty) in _CTYPES:
            packers.append(_CTYPES[str(ty)])
        else:  # pragma: no cover - no kernel of ours takes other scalars
            raise TypeError(f"direct launch: unsupported scalar argument type {ty}")
    return tuple(argtypes), packers


def _load(kernel, device, argtypes, packers):
    """Compile (or load from the disk cache) the overload for ``argtypes`` and load its
    module, under Numba's context of ``device``."""
    with numba_context(device):
        cufunc = kernel.compile(argtypes)._codelibrary.get_cufunc()
    return _Compiled(cufunc.kernel, cufunc.handle, packers)


def numba_context(device):
    """Numba's context of ``device`` (an index) as a context manager; for any other
    device key (a stream handle), the current context as it is."""
    return cuda.gpus[device] if isinstance(device, int) else contextlib.nullcontext()


def _device_of(stream):
    """The device a launch on ``stream`` runs on: the one the ``DeviceCall`` made the
    stream for; else a non-default stream's handle (it belongs to one device); else
    the current device (asking Numba costs ~25 µs)."""
    dev = stream_device(stream)
    if dev is not None:
        return dev
    handle = _handle(stream)
    if handle > 2:  # 0, 1, 2: default, legacy default, per-thread default
        return ("stream", handle)
    return cuda.get_current_device().id


def _handle(stream):
    """The raw handle of a Numba stream (0 for the default stream, given as 0)."""
    return 0 if isinstance(stream, int) else int(stream.handle)


def _core_stream(stream):
    handle = _handle(stream)
    core = _core_streams.get(handle)
    if core is None:
        if len(_core_streams) > 64:
            _core_streams.clear()
        core = _core_streams[handle] = _CoreStream.from_handle(handle)
    return core


def _config(grid, block, smem):
    key = (grid, block, smem)
    cfg = _configs.get(key)
    if cfg is None:
        if len(_configs) > 4096:
            _configs.clear()
        cfg = _configs[key] = _LaunchConfig(grid=grid, block=block, shmem_size=smem)
    return cfg


_opted_in = set()


def _opt_in(fn_key, handle_of, smem):
    """Allow ``smem`` bytes of dynamic shared memory for the compiled function named by
    ``fn_key`` on the current device, once; ``handle_of()`` gives its handle (called,
    and for the dispatcher's way the overload looked up, only the first time)."""
    key = (fn_key, cuda.get_current_device().id, smem)
    if key in _opted_in:
        return
    from numba.cuda.cudadrv.driver import binding, driver

    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(smem), handle_of(), key[1])
    _opted_in.add(key)
