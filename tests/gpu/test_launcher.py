"""The direct kernel launcher (``gpu/_launcher.py``) and the device views it packs
(``gpu/_arrays.DeviceView``).

Without a GPU: a view's pointer arithmetic, its CUDA array interface, which inputs get
a view, and the argument list the launcher builds for a compiled kernel (Numba's ABI:
meminfo, parent, nitems, itemsize, data, shape, strides per array). On a GPU: the
backend's kernels really take the direct way, and give the same bits as Numba's
dispatcher (``SLA_NUMBA_LAUNCH=numba``), on a side stream, and a non-contiguous
input gives what its contiguous copy gives.
"""

import ctypes
import importlib

import numpy as np
import pytest
import torch
from numba import config

arrays = pytest.importorskip("sla_numba.gpu._arrays")
launcher = importlib.import_module("sla_numba.gpu._launcher")
gpu = importlib.import_module("sla_numba.gpu")
DeviceView = arrays.DeviceView
SIM = bool(config.ENABLE_CUDASIM)


def test_view_pointer_arithmetic_and_shapes():
    x = DeviceView(1 << 20, (2, 3, 5), np.float32, owner="keep")
    assert x.ndim == 3 and x.size == 30 and x.strides == (60, 20, 4)
    assert x[1].ptr == (1 << 20) + 60 and x[1].shape == (3, 5) and x[1].owner == "keep"
    assert x[1][2].ptr == (1 << 20) + 60 + 40 and x[1][2].shape == (5,)
    assert x.reshape(30).shape == (30,) and x.reshape((5, 6)).shape == (5, 6)
    assert x.reshape(6, 5).ptr == x.ptr
    assert x.view(np.int32).dtype == np.int32 and x.view(np.int32).ptr == x.ptr
    cai = x[1].__cuda_array_interface__
    assert cai["data"] == ((1 << 20) + 60, False) and cai["shape"] == (3, 5)
    assert np.dtype(cai["typestr"]) == np.float32 and cai["strides"] is None


@pytest.mark.parametrize(
    "bad",
    [lambda x: x.reshape(7), lambda x: x.view(np.float64), lambda x: x[2], lambda x: x[-1]],
)
def test_view_refuses_what_it_cannot_be(bad):
    x = DeviceView(4096, (2, 3), np.float32, owner=None)
    with pytest.raises((ValueError, IndexError)):
        bad(x)


class _CAI:
    """An object with a CUDA array interface (what a Numba device array exports)."""

    def __init__(self, shape, typestr, strides=None, ptr=8192):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "strides": strides,
            "data": (ptr, False),
            "version": 3,
        }


def test_device_view_of_array_interface_objects():
    v = arrays.device_view(_CAI((4, 6), "<f4"))
    assert v.ptr == 8192 and v.shape == (4, 6) and v.dtype == np.float32
    v = arrays.device_view(_CAI((4, 6), "<f4", strides=(24, 4)))  # C strides written out
    assert v is not None and v.strides == (24, 4)
    assert arrays.device_view(_CAI((4, 6), "<f4", strides=(4, 16))) is None  # F order
    assert arrays.device_view(np.zeros(3)) is None  # host memory is no device view
    assert arrays.device_view(torch.zeros(3)) is None  # nor a CPU tensor


@pytest.mark.parametrize(
    "np_dtype,torch_dtype",
    [
        (np.float32, torch.float32),
        (np.float64, torch.float64),
        (np.int8, torch.int8),
        (np.int16, torch.int16),
        (np.int32, torch.int32),
    ],
)
@pytest.mark.parametrize("poison", [False, True])
def test_torch_buffers_have_the_asked_dtype_and_view(np_dtype, torch_dtype, poison):
    """``DeviceCall``'s torch buffers (the numpy -> torch dtype table it keeps), made
    here on the CPU: the tensor's dtype and shape, and a view of its memory."""
    call = arrays.DeviceCall.__new__(arrays.DeviceCall)
    call.kind, call._torch, call._torch_device = "torch", torch, torch.device("cpu")
    for _ in range(2):  # the second time from the table
        h, view = call._new((2, 3), np_dtype, poison=poison)
        assert h.dtype == torch_dtype and tuple(h.shape) == (2, 3)
        assert view.ptr == h.data_ptr() and view.dtype == np.dtype(np_dtype) and view.owner is h
        if poison:
            fill = h.isnan().all() if h.is_floating_point() else (h == 99).all()
            assert bool(fill)


def test_torch_dtype_table():
    assert arrays._torch_np_dtype(torch.zeros(1, dtype=torch.bfloat16)) == "bfloat16"
    assert arrays._torch_np_dtype(torch.zeros(1, dtype=torch.float16)) == np.float16
    assert arrays._torch_np_dtype(torch.zeros(1, dtype=torch.int64)) == np.int64
    with pytest.raises(KeyError):
        arrays._torch_np_dtype(torch.zeros(1, dtype=torch.complex64))


class _Stream:
    handle = 0xABC000  # a non-default stream: its handle names its device


def _fake_compiled(monkeypatch, packers):
    compiled = launcher._Compiled(kernel=None, handle=None, packers=packers)
    monkeypatch.setattr(launcher, "_compile", lambda kernel, device, values: compiled)
    monkeypatch.setattr(launcher, "_compiled", {})
    # _Stream's handle is no driver's: asking the driver whether it captures would crash
    # on a GPU (it did, session 8), so these launches see a stream that does not capture
    monkeypatch.setattr(launcher, "capturing", lambda stream: False)
    return compiled


def test_argument_list_follows_numba_abi(monkeypatch):
    """Arrays expand to meminfo, parent, nitems, itemsize, data, shape..., strides...;
    scalars become the C type of their Numba type."""
    _fake_compiled(monkeypatch, ["array", ctypes.c_int64, ctypes.c_float, "array"])
    a = DeviceView(0x1000, (2, 3, 4), np.float32, None)
    b = DeviceView(0x2000, (5,), np.int16, None)
    compiled, kargs = launcher._direct_args(object(), _Stream(), (a, 7, np.float32(0.5), b))
    head = kargs[:11]
    assert head == [0, 0, 24, 4, 0x1000, 2, 3, 4, 48, 16, 4]
    assert isinstance(kargs[11], ctypes.c_int64) and kargs[11].value == 7
    assert isinstance(kargs[12], ctypes.c_float) and kargs[12].value == 0.5
    assert kargs[13:] == [0, 0, 5, 2, 0x2000, 5, 2]


def test_signature_cache_key_separates_dtypes_ranks_and_scalar_types(monkeypatch):
    seen = []

    def fake_compile(kernel, device, values):
        seen.append(values)
        return launcher._Compiled(
            None, None, ["array" if hasattr(v, "ptr") else int for v in values]
        )

    monkeypatch.setattr(launcher, "_compile", fake_compile)
    monkeypatch.setattr(launcher, "_compiled", {})
    monkeypatch.setattr(launcher, "capturing", lambda stream: False)  # (fake stream handle)
    k, s = object(), _Stream()
    f32 = DeviceView(0x1000, (8,), np.float32, None)
    launcher._direct_args(k, s, (f32, 1))
    launcher._direct_args(k, s, (DeviceView(0x9000, (9,), np.float32, None), 2))  # same key
    assert len(seen) == 1
    launcher._direct_args(k, s, (f32.view(np.int32), 1))  # dtype
    launcher._direct_args(k, s, (f32.reshape(2, 4), 1))  # rank
    launcher._direct_args(k, s, (f32, np.int32(1)))  # scalar type
    launcher._direct_args(k, s, (f32, 1.0))
    assert len(seen) == 5


def test_unsupported_argument_falls_back_to_the_dispatcher(monkeypatch):
    _fake_compiled(monkeypatch, ["array"])
    assert launcher._direct_args(object(), _Stream(), (np.zeros(4, np.float32),)) is None
    assert launcher._direct_args(object(), _Stream(), ("text",)) is None


# ---------------------------------------------------------------------------
# CUDA graphs: a kernel not loaded yet cannot be loaded during stream capture
# ---------------------------------------------------------------------------


def _count_capture_queries(monkeypatch, answer):
    asked = []

    def fake_capturing(stream):
        asked.append(stream)
        return answer

    monkeypatch.setattr(launcher, "capturing", fake_capturing)
    return asked


def test_capture_of_a_kernel_not_loaded_is_a_clear_error(monkeypatch):
    compiled = _fake_compiled(monkeypatch, ["array"])
    asked = _count_capture_queries(monkeypatch, True)
    x = DeviceView(0x1000, (8,), np.float32, None)

    def my_kernel():
        pass

    with pytest.raises(launcher.CaptureError, match="my_kernel.*capturing a CUDA graph.*warm-up"):
        launcher._direct_args(my_kernel, _Stream(), (x,))
    assert launcher._compiled == {} and len(asked) == 1  # nothing loaded during capture
    # loaded before the capture: the launch is packed, and the driver is not asked
    asked.clear()
    monkeypatch.setattr(launcher, "capturing", lambda s: False)
    launcher._direct_args(my_kernel, _Stream(), (x,))
    asked = _count_capture_queries(monkeypatch, True)
    got, _ = launcher._direct_args(my_kernel, _Stream(), (x,))
    assert got is compiled and asked == []


def test_capture_error_comes_before_strict_modes_missing(monkeypatch):
    """Inside the strict run of :func:`_precompile.run_ahead` a capture must not be
    answered with ``Missing`` (which would start a dry run and compiles)."""
    _fake_compiled(monkeypatch, ["array"])
    _count_capture_queries(monkeypatch, True)
    with launcher.strict(), pytest.raises(launcher.CaptureError):
        launcher._direct_args(object(), _Stream(), (DeviceView(0x1000, (8,), np.float32, None),))


class _FakeDriver:
    """``cuda.bindings.driver`` with a scripted ``cuStreamIsCapturing``."""

    def __init__(self, answer):
        from cuda.bindings import driver as real

        self.CUresult = real.CUresult
        self.answer = answer
        self.asked = []

    def cuStreamIsCapturing(self, handle):
        self.asked.append(handle)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    "answer,expected",
    [
        (("CUDA_SUCCESS", 1), True),  # active capture
        (("CUDA_SUCCESS", 2), True),  # invalidated capture: still no loading
        (("CUDA_SUCCESS", 0), False),
        (("CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", 0), True),  # legacy stream, blocking capture
        (("CUDA_ERROR_INVALID_VALUE", 0), False),
        (RuntimeError("no driver"), False),
    ],
)
def test_capturing_reads_the_drivers_answer(monkeypatch, answer, expected):
    bindings = pytest.importorskip("cuda.bindings")
    fake = _FakeDriver(answer)
    if isinstance(answer, tuple):
        fake.answer = (getattr(fake.CUresult, answer[0]), answer[1])
    monkeypatch.setattr(bindings, "driver", fake, raising=False)
    monkeypatch.setattr(launcher, "SIMULATOR", False)
    assert launcher.capturing(_Stream()) is expected
    assert fake.asked == [_Stream.handle]


def test_capturing_is_false_under_the_simulator(monkeypatch):
    monkeypatch.setattr(launcher, "SIMULATOR", True)
    assert launcher.capturing(_Stream()) is False


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------


def _has_cuda():
    return not SIM and torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")


def _run(q, k, v, do, blk):
    D = q.shape[-1]
    bm = gpu.classify(q, k, 2, 1, blk, blk, D**-0.5)
    f = gpu.forward(q, k, v, bm, blk, blk, D**-0.5, 0, 1e-6)
    g = gpu.backward(q, k, v, *f, do, do, bm, blk, blk, D**-0.5, 0, 1e-6)
    return (bm, *f, *g)


@needs_cuda
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 64)])
def test_direct_launch_equals_dispatcher_bitwise(monkeypatch, dtype, D):
    B, H, N, blk = 1, 2, 300, 64
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", generator=g).to(dtype) for _ in range(4))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    monkeypatch.setenv("SLA_NUMBA_LAUNCH", "numba")
    before = dict(launcher.counts)
    with torch.cuda.stream(side):
        ref = _run(q, k, v, do, blk)
    assert (
        launcher.counts["direct"] == before["direct"] and launcher.counts["numba"] > before["numba"]
    )
    monkeypatch.setenv("SLA_NUMBA_LAUNCH", "direct")
    before = dict(launcher.counts)
    with torch.cuda.stream(side):
        got = _run(q, k, v, do, blk)
    assert launcher.counts["numba"] == before["numba"] and launcher.counts["direct"] >= 8
    side.synchronize()
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@needs_cuda
def test_non_contiguous_input_is_copied_and_agrees():
    B, H, N, D, blk = 1, 2, 200, 64, 64
    g = torch.Generator(device="cuda").manual_seed(12)
    q = torch.randn(B, N, H, D, device="cuda", generator=g).to(torch.float16).transpose(1, 2)
    k, v = (torch.randn(B, H, N, D, device="cuda", generator=g).to(torch.float16) for _ in range(2))
    assert not q.is_contiguous()
    bm = gpu.classify(q, k, 2, 1, blk, blk, D**-0.5)
    assert torch.equal(bm, gpu.classify(q.contiguous(), k, 2, 1, blk, blk, D**-0.5))
    before = dict(launcher.counts)
    a = gpu.forward(q, k, v, bm, blk, blk, D**-0.5, 0, 1e-6)
    assert launcher.counts["numba"] == before["numba"]
    b = gpu.forward(q.contiguous(), k, v, bm, blk, blk, D**-0.5, 0, 1e-6)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
