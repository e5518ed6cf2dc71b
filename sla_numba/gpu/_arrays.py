"""Array kinds the GPU backend accepts, and where its buffers come from.

A backend call sees one *kind* of array for all its arguments and returns the
same kind:

| input kind                    | how kernels see it                 | outputs / workspaces     | stream                       |
|-------------------------------|------------------------------------|--------------------------|------------------------------|
| torch CUDA tensor             | ``DeviceView`` (pointer, no copy)  | ``torch.empty`` (caching allocator) | ``torch.cuda.current_stream()`` |
| CuPy array                    | ``DeviceView`` (pointer, no copy)  | ``cupy.empty`` (memory pool) | CuPy's current stream      |
| numba device array            | itself                             | ``cuda.device_array``    | default stream               |
| numpy array (CI, simulator)   | ``cuda.to_device`` copy            | ``cuda.device_array``, copied back with ``copy_to_host`` | default stream |

On the torch and CuPy paths nothing synchronises with the host: views are plain
pointers (a non-contiguous input is first copied by its library, on the current
stream) and every kernel is launched on the caller's current stream,
so ordering against the producer of the inputs and the consumer of the outputs is
the stream's. torch ``bfloat16`` has no CUDA array interface: bf16 tensors are
viewed as int16 bit patterns and the kernels widen them (``_compat.to_f32``).

Outputs honour :func:`sla_numba.testing.poisoning`: NaN for floats, 99 for the
int8 map, so an element a kernel forgets to write fails the tests.
CuPy is imported only when a CuPy array is passed (``type(x).__module__``).
"""

import math

import numpy as np

from .. import _arrays as _host_arrays
from ..testing import poisoning
from ._compat import cuda


def array_kind(x):
    """'torch', 'cupy', 'numba' or 'numpy' (anything else: TypeError)."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    if isinstance(x, np.ndarray):
        return "numpy"
    if hasattr(x, "__cuda_array_interface__") or hasattr(x, "copy_to_host"):
        return "numba"
    raise TypeError(f"sla_numba.gpu: unsupported array type {type(x).__name__}")


_TORCH_DTYPES = {}  # torch dtype -> numpy dtype (or "bfloat16"), filled on first use
_TORCH_OF = {}  # numpy dtype -> torch dtype of the buffers DeviceCall allocates


def _torch_np_dtype(t):
    """The numpy dtype of a torch tensor, or the string 'bfloat16' (KeyError for
    dtypes the kernels never take). A table built once: a call asks ~10 times."""
    if not _TORCH_DTYPES:
        import torch

        _TORCH_DTYPES.update(
            {
                torch.float32: np.dtype(np.float32),
                torch.float16: np.dtype(np.float16),
                torch.float64: np.dtype(np.float64),
                torch.int8: np.dtype(np.int8),
                torch.int16: np.dtype(np.int16),
                torch.int32: np.dtype(np.int32),
                torch.int64: np.dtype(np.int64),
                torch.uint8: np.dtype(np.uint8),
                torch.bfloat16: "bfloat16",
            }
        )
    return _TORCH_DTYPES[t.dtype]


class DeviceView:
    """A C-contiguous device array as a kernel sees it: address, shape, dtype.

    What the backend hands to :func:`._launcher.launch` instead of a Numba device
    array on a real GPU. Making one is a few attribute reads (``cuda.as_cuda_array``
    of a torch tensor costs ~20 µs on the H200 host, BENCHMARKS.md); ``owner`` keeps
    the memory alive (the torch tensor, CuPy array or Numba array it views).

    It supports what the orchestrators do to their arrays: ``shape``, ``dtype``,
    ``ndim``, ``size``, ``reshape`` (any shape of the same size), ``view`` (a dtype of
    the same item size), ``x[i]`` (sub-array ``i`` of the first axis), and it exports
    ``__cuda_array_interface__`` so that Numba's dispatcher takes it too.

    >>> import numpy as np
    >>> x = DeviceView(4096, (2, 3, 4), np.float32, owner=None)
    >>> x[1].ptr - x.ptr, x[1].shape, x.reshape(24).shape, x.view(np.int32).dtype
    (48, (3, 4), (24,), dtype('int32'))
    """

    __slots__ = ("ptr", "shape", "dtype", "owner", "_strides")

    def __init__(self, ptr, shape, dtype, owner):
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.owner = owner
        self._strides = None  # computed on first use (a view is packed for ~3 launches)

    def _derive(self, ptr, shape, dtype):
        """A view of the same owner: ``shape`` a tuple of ints and ``dtype`` a numpy
        dtype, already checked by the caller (``reshape``, ``view``, ``[i]``); skips
        ``__init__``'s conversions (a call derives ~30 views: flat ones, int16 bits)."""
        out = DeviceView.__new__(DeviceView)
        out.ptr, out.shape, out.dtype, out.owner, out._strides = ptr, shape, dtype, self.owner, None
        return out

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def strides(self):
        """C-order strides in bytes."""
        if self._strides is None:
            out, step = [], self.dtype.itemsize
            for s in reversed(self.shape):
                out.append(step)
                step *= s
            self._strides = tuple(reversed(out))
        return self._strides

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape a view of shape {self.shape} to {shape}")
        return self._derive(self.ptr, shape, self.dtype)

    def view(self, dtype):
        """The same bytes as ``dtype``; with another item size the last axis is
        rescaled (as numpy does), which needs its byte length to divide evenly."""
        dtype = np.dtype(dtype)
        if dtype.itemsize == self.dtype.itemsize:
            return self._derive(self.ptr, self.shape, dtype)
        last = self.shape[-1] * self.dtype.itemsize if self.shape else 0
        if not self.shape or last % dtype.itemsize:
            raise ValueError(f"view {self.dtype} {self.shape} as {dtype}: sizes do not divide")
        return self._derive(self.ptr, self.shape[:-1] + (last // dtype.itemsize,), dtype)

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)) or not 0 <= i < self.shape[0]:
            raise IndexError(f"DeviceView[{i!r}]: an int index in [0, {self.shape[0]})")
        step = self.strides[0] if self.ndim else 0
        return self._derive(self.ptr + int(i) * step, self.shape[1:], self.dtype)

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "strides": None,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "version": 3,
        }

    def __repr__(self):
        return f"DeviceView(0x{self.ptr:x}, shape={self.shape}, dtype={self.dtype})"


def device_view(x):
    """A :class:`DeviceView` of a C-contiguous torch CUDA tensor, CuPy array or Numba
    device array, or None when ``x`` is none of these or not C-contiguous."""
    if isinstance(x, DeviceView):
        return x
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        if not x.is_cuda or not x.is_contiguous():
            return None
        try:
            dt = _torch_np_dtype(x)
        except KeyError:
            return None
        if dt == "bfloat16":
            dt = np.dtype(np.int16)
        return DeviceView(x.data_ptr(), x.shape, dt, x)
    if mod == "cupy":
        if not x.flags.c_contiguous:
            return None
        return DeviceView(x.data.ptr, x.shape, x.dtype, x)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None or cai.get("mask") is not None:
        return None
    view = DeviceView(cai["data"][0], cai["shape"], np.dtype(cai["typestr"]), x)
    if cai.get("strides") is not None and view.size > 1:
        if tuple(cai["strides"]) != view.strides:
            return None
    return view


class DeviceCall:
    """Everything one backend call needs to know about its arrays.

    ``DeviceCall(q)`` inspects the first input; then
    - ``dev(x)``: the numba device view of an input of the same kind;
    - ``output(shape, dtype)`` / ``workspace(shape, dtype)``: a new buffer, as
      ``(handle, device_view)``; the handle is what ``result`` returns;
    - ``stream``: the stream every kernel of the call is launched on;
    - ``result(handle)``: the handle as the caller's kind (numpy: copied back).
    """

    def __init__(self, like):
        self.kind = array_kind(like)
        self._torch_device = None
        if self.kind == "torch":
            import torch

            self._torch = torch
            self._torch_device = like.device
            ptr = torch.cuda.current_stream(like.device).cuda_stream
            self.device_index = like.device.index or 0
            self.stream = _stream_from_ptr(ptr, self.device_index)
        elif self.kind == "cupy":
            import cupy

            self._cupy = cupy
            self.device_index = like.device.id
            self.stream = _stream_from_ptr(cupy.cuda.get_current_stream().ptr, self.device_index)
        else:
            self.device_index = None
            self.stream = 0

    # -- inputs -----------------------------------------------------------
    def in_dtype(self, x):
        """numpy dtype of an input, or the string 'bfloat16'."""
        if self.kind == "torch":
            return _torch_np_dtype(x)
        return np.dtype(x.dtype)

    def dev(self, x):
        """The device view of an input: a :class:`DeviceView` for torch and CuPy (a
        non-contiguous input is copied to a contiguous one first, on the stream),
        Numba device arrays as they are, numpy arrays copied to the device."""
        if self.kind == "torch":
            x = x.detach()
            return device_view(x if x.is_contiguous() else x.contiguous())
        if self.kind == "cupy":
            return device_view(self._cupy.ascontiguousarray(x))
        if self.kind == "numpy":
            return cuda.to_device(np.ascontiguousarray(x))
        return x

    # -- new buffers ------------------------------------------------------
    def output(self, shape, dtype):
        return self._new(shape, dtype, poison=poisoning())

    def workspace(self, shape, dtype):
        # poisoned in tests too: a kernel reading a workspace element no kernel wrote
        # must fail every time, not only when uninitialised memory happens to be NaN
        return self._new(shape, dtype, poison=poisoning())

    def _new(self, shape, dtype, poison):
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        fill = _host_arrays.poison_value(dtype)
        if self.kind == "torch":
            torch = self._torch
            tdt = _TORCH_OF.get(dtype)
            if tdt is None:  # (np.dtype.name costs ~3 µs; a call allocates ~10 buffers)
                tdt = _TORCH_OF[dtype] = getattr(torch, dtype.name)
            if poison:
                h = torch.full(shape, fill, dtype=tdt, device=self._torch_device)
            else:
                h = torch.empty(shape, dtype=tdt, device=self._torch_device)
            return h, DeviceView(h.data_ptr(), shape, dtype, h)
        if self.kind == "cupy":
            cp = self._cupy
            h = cp.full(shape, fill, dtype=dtype) if poison else cp.empty(shape, dtype=dtype)
            return h, DeviceView(h.data.ptr, shape, dtype, h)
        if poison:
            d = cuda.to_device(np.full(shape, fill, dtype=dtype))
        else:
            d = cuda.device_array(shape, dtype=dtype)
        return d, d

    def output_like(self, x, shape):
        """A new output of ``x``'s own dtype (an fp16 / bf16 input: the tensor-core
        kernels write 16-bit outputs, ``gpu.forward(half_out=True)``), as
        ``(handle, device_view)``; a bf16 tensor's view is its int16 bits."""
        shape = tuple(int(s) for s in shape)
        if self.kind == "torch":
            torch = self._torch
            dev = self._torch_device
            if poisoning():
                h = torch.full(shape, float("nan"), dtype=x.dtype, device=dev)
            else:
                h = torch.empty(shape, dtype=x.dtype, device=dev)
            return h, device_view(h)
        return self._new(shape, x.dtype, poison=poisoning())

    def result(self, handle):
        if self.kind == "numpy":
            return handle.copy_to_host()
        return handle

    def result_like(self, handle, x):
        """:meth:`result`, converted to ``x``'s dtype (rounded to nearest even) if it
        is not already in it."""
        out = self.result(handle)
        if self.kind == "torch":
            return out.to(x.dtype)
        return out if out.dtype == x.dtype else out.astype(x.dtype)

    # -- device selection -------------------------------------------------
    def device_context(self):
        """Context manager making the inputs' GPU the current device.

        torch / CuPy inputs: their library's device guard (a few µs; Numba's
        ``cuda.gpus[i]`` pushes and pops its context, and Numba then looks its context
        up again, uncached, several times a call). The launcher compiles and loads
        kernels under Numba's own context (``_launcher._compile``)."""
        if self.device_index is None:
            return _nullcontext()
        if self.kind == "torch":
            return self._torch.cuda.device(self.device_index)
        if self.kind == "cupy":
            return self._cupy.cuda.Device(self.device_index)
        return cuda.gpus[self.device_index]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_streams = {}  # (device index, handle) -> numba stream
_stream_devices = {}  # id(numba stream) -> device index, for the streams of _streams


def _stream_from_ptr(ptr, device_index):
    """A numba stream object for a raw CUDA stream handle (0: the legacy default
    stream), kept per (device, handle): making one costs ~8 µs, and a call needs one.
    :func:`stream_device` then names its device without asking the driver."""
    key = (device_index, ptr)
    stream = _streams.get(key)
    if stream is None:
        if len(_streams) > 64:
            _streams.clear()
            _stream_devices.clear()
        with cuda.gpus[device_index]:
            stream = cuda.external_stream(ptr) if ptr else cuda.legacy_default_stream()
        _streams[key] = stream
        _stream_devices[id(stream)] = device_index
    return stream


def stream_device(stream):
    """The device index of a stream made by a ``DeviceCall``, else None."""
    return _stream_devices.get(id(stream))
