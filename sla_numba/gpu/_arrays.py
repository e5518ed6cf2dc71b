"""Array kinds the GPU backend accepts, and where its buffers come from.

A backend call sees one *kind* of array for all its arguments and returns the
same kind:

| input kind                    | how kernels see it                 | outputs / workspaces     | stream                       |
|-------------------------------|------------------------------------|--------------------------|------------------------------|
| torch CUDA tensor             | ``cuda.as_cuda_array`` view (no copy) | ``torch.empty`` (caching allocator) | ``torch.cuda.current_stream()`` |
| CuPy array                    | ``cuda.as_cuda_array`` view        | ``cupy.empty`` (memory pool) | CuPy's current stream      |
| numba device array            | itself                             | ``cuda.device_array``    | default stream               |
| numpy array (CI, simulator)   | ``cuda.to_device`` copy            | ``cuda.device_array``, copied back with ``copy_to_host`` | default stream |

On the torch and CuPy paths nothing synchronises with the host: views are made
with ``sync=False`` and every kernel is launched on the caller's current stream,
so ordering against the producer of the inputs and the consumer of the outputs is
the stream's. torch ``bfloat16`` has no CUDA array interface: bf16 tensors are
viewed as int16 bit patterns and the kernels widen them (``_compat.to_f32``).

Outputs honour :func:`sla_numba.testing.poisoning`: NaN for floats, 99 for the
int8 map, so an element a kernel forgets to write fails the tests.
CuPy is imported only when a CuPy array is passed (``type(x).__module__``).
"""

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


def _torch_np_dtype(t):
    import torch

    table = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.float64: np.float64,
        torch.int8: np.int8,
        torch.int32: np.int32,
    }
    if t.dtype == torch.bfloat16:
        return "bfloat16"
    return np.dtype(table[t.dtype])


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
            self.stream = _stream_from_ptr(ptr)
        elif self.kind == "cupy":
            import cupy

            self._cupy = cupy
            self.device_index = like.device.id
            self.stream = _stream_from_ptr(cupy.cuda.get_current_stream().ptr)
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
        if self.kind == "torch":
            if x.dtype == self._torch.bfloat16:
                x = x.view(self._torch.int16)
            return cuda.as_cuda_array(x.detach(), sync=False)
        if self.kind == "cupy":
            return cuda.as_cuda_array(x, sync=False)
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
            tdt = getattr(torch, dtype.name)
            if poison:
                h = torch.full(shape, fill, dtype=tdt, device=self._torch_device)
            else:
                h = torch.empty(shape, dtype=tdt, device=self._torch_device)
            return h, cuda.as_cuda_array(h, sync=False)
        if self.kind == "cupy":
            cp = self._cupy
            h = cp.full(shape, fill, dtype=dtype) if poison else cp.empty(shape, dtype=dtype)
            return h, cuda.as_cuda_array(h, sync=False)
        if poison:
            d = cuda.to_device(np.full(shape, fill, dtype=dtype))
        else:
            d = cuda.device_array(shape, dtype=dtype)
        return d, d

    def result(self, handle):
        if self.kind == "numpy":
            return handle.copy_to_host()
        return handle

    # -- device selection -------------------------------------------------
    def device_context(self):
        """Context manager making the inputs' GPU numba's current device."""
        if self.device_index is None:
            return _nullcontext()
        return cuda.gpus[self.device_index]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _stream_from_ptr(ptr):
    """A numba stream object for a raw CUDA stream handle (0 = legacy default)."""
    if not ptr:
        return cuda.legacy_default_stream()
    return cuda.external_stream(ptr)
