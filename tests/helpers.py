"""Shared test helpers: backend discovery, array conversion, error measures.

Imported by conftest.py (which sets up the CUDA simulator first) and by the tests.
"""

import importlib
import os

import numpy as np
import torch
from hypothesis import settings

# --------------------------------------------------------------------------- environment
#: Real CUDA device present (torch sees it). Without it, conftest turns the simulator on.
HAS_CUDA = torch.cuda.is_available()


def simulator_on():
    """True when Numba's CUDA simulator is in use (no real GPU: CI)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def tiny_under_sim():
    """True when GPU-backend tests must stay tiny (simulator: every thread is a Python thread)."""
    return simulator_on()


def cuda_compiler_available():
    """NVVM and NVRTC can be loaded (``pip install "numba-cuda[cu13]"``): real PTX can be
    compiled without a GPU. CI's venv has the bare numba-cuda (simulator only)."""
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
        load_nvidia_dynamic_lib("nvvm")
    except Exception:  # noqa: BLE001 - any failure: no compiler libraries
        return False
    return True


#: Skip mark for tests that compile real PTX (no GPU needed, but the CUDA compilers).
needs_cuda_compiler = None  # set below, once pytest is importable


def real_cuda_gpu():
    """A real CUDA GPU with compute capability >= 8.0 (the tensor-core path's minimum),
    not the simulator: torch sees it and conftest left the simulator off."""
    if simulator_on() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


#: Skip mark for tests of CUDA tensors on a real GPU (the reason of tests/gpu/tc's tests).
needs_real_gpu = None  # set below, once pytest is importable


def assert_tensor_core_path(dtype, head_dim, block_q, block_k):
    """On a real GPU: inputs of this kind take the tensor-core kernels (unless
    ``SLA_NUMBA_GPU_PATH`` forces a path on purpose)."""
    from sla_numba.gpu._path import env_path, select_path

    if env_path() == "auto":
        path = select_path(dtype, head_dim, block_q, block_k)
        assert path == "tc", f"{dtype}, D={head_dim}, blocks {block_q}/{block_k}: {path}"


def gpu_importable():
    """The gpu backend package imports and offers the three contract functions."""
    try:
        mod = importlib.import_module("sla_numba.gpu")
    except Exception:  # noqa: BLE001 - any failure means: no GPU backend to test
        return False
    return all(hasattr(mod, f) for f in ("classify", "forward", "backward"))


#: Backends to test: "cpu" always, "gpu" when its package imports (simulated without a GPU;
#: the API then accepts host arrays for backend="gpu" and copies them).
BACKENDS = ["cpu"] + (["gpu"] if gpu_importable() else [])

#: Examples per property for a GPU backend under the simulator.
SIM_EXAMPLES = 10


def for_backend(backend):
    """Settings decorator: few examples for a simulated GPU backend, else the profile's."""
    if backend == "gpu" and simulator_on():
        return settings(max_examples=SIM_EXAMPLES)
    return lambda f: f


def tiny(backend):
    """Whether this backend's property tests must draw simulator-sized shapes."""
    return backend == "gpu" and tiny_under_sim()


def torch_device(backend):
    """Where torch inputs for ``backend`` live: CUDA for gpu on a real GPU, else the CPU."""
    return "cuda" if backend == "gpu" and HAS_CUDA else "cpu"


def make(x, kind, backend, dtype=None, requires_grad=False):
    """An API input from numpy ``x``: a numpy array or a torch tensor on the backend's device.

    ``dtype``: a numpy dtype, or a torch dtype (torch kind only, e.g. torch.bfloat16).
    """
    if kind == "numpy":
        assert not requires_grad
        return np.ascontiguousarray(x, dtype=dtype or x.dtype)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if dtype is not None:
        t = t.to(
            dtype
            if isinstance(dtype, torch.dtype)
            else torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
        )
    t = t.to(torch_device(backend))
    return t.requires_grad_(requires_grad)


# --------------------------------------------------------------------------- conversion
def to_numpy(x):
    """numpy float64/int copy of a numpy array, torch tensor or (simulated) device array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.to(torch.float32)
        return x.numpy().copy()
    if hasattr(x, "copy_to_host"):
        return np.asarray(x.copy_to_host())
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # cupy
        return np.asarray(x.get())
    return np.array(x, copy=True)


def to_f64(x):
    return to_numpy(x).astype(np.float64)


# --------------------------------------------------------------------------- error measures
def rel_rms(actual, expected, floor=1e-2):
    """RMS(actual - expected) / max(RMS(expected), floor); NaN anywhere gives NaN.

    The floor keeps a near-zero expected tensor (cancellation, e.g. dq with D = 1)
    from turning rounding noise into a huge relative error; inputs are O(1).
    """
    a, e = to_f64(actual), to_f64(expected)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    if not a.size:
        return 0.0
    return np.sqrt(np.mean((a - e) ** 2)) / max(np.sqrt(np.mean(e**2)), floor)


def backend_err(actual, expected):
    """``rel_rms`` of a backend output that must be fully written (no NaN)."""
    a = np.asarray(actual, np.float64)
    assert not np.isnan(a).any(), "NaN in the backend's output (unwritten element?)"
    return rel_rms(a, expected)


def reference_grads(q, k, v, bm, bq, bk, scale, fm, do_s, do_l, linear_scope="marginal"):
    """dq, dk, dv (numpy, float64) of the dense reference for upstream grads do_s, do_l."""
    from sla_numba.reference import sla_reference

    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    _, o_s, o_l = sla_reference(
        tq,
        tk,
        tv,
        torch.from_numpy(bm),
        block_q=bq,
        block_k=bk,
        feature_map=fm,
        scale=scale,
        linear_scope=linear_scope,
    )
    loss = (o_s * torch.from_numpy(do_s.astype(np.float64))).sum() + (
        o_l * torch.from_numpy(do_l.astype(np.float64))
    ).sum()
    loss.backward()
    return tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()


def assert_close_rms(actual, expected, tol, name, floor=1e-2):
    """Relative-RMS check (see ``rel_rms``) that prints the error. NaN must match exactly."""
    a, e = to_f64(actual), to_f64(expected)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    assert np.array_equal(nan_a, nan_e), (
        f"{name}: NaN mismatch ({int(nan_a.sum())} NaN in actual, {int(nan_e.sum())} expected)"
    )
    ok = ~nan_e
    err = rel_rms(a[ok], e[ok], floor)
    print(f"{name}: rel-RMS error {err:.3e} (tol {tol:.1e})")
    maxabs = float(np.max(np.abs(a[ok] - e[ok]))) if ok.any() else 0.0
    assert err <= tol, f"{name}: rel-RMS error {err:.3e} > {tol:.1e} (max abs diff {maxabs:.3e})"


#: Tolerances (relative RMS) against the float64 reference.
TOL = {
    np.float64: 1e-9,
    np.float32: 1e-4,
    np.float16: 1e-3,
    "bfloat16": 8e-3,
}


def tol_for(dtype):
    if dtype == torch.bfloat16:
        return TOL["bfloat16"]
    if isinstance(dtype, torch.dtype):
        dtype = torch.empty((), dtype=dtype).numpy().dtype
    return TOL[np.dtype(dtype).type]


def _needs_cuda_compiler_mark():
    import pytest

    return pytest.mark.skipif(
        not cuda_compiler_available(),
        reason='compiles real PTX: needs NVVM/NVRTC (pip install "numba-cuda[cu13]")',
    )


needs_cuda_compiler = _needs_cuda_compiler_mark()


def _needs_real_gpu_mark():
    import pytest

    return pytest.mark.skipif(not real_cuda_gpu(), reason="needs a CUDA GPU with cc >= 8.0")


needs_real_gpu = _needs_real_gpu_mark()
