"""Can the gpu backend run here? One clear sentence when it cannot.

Numba reports a missing driver or device as a ``CudaSupportError`` with a long
traceback from deep inside its driver layer. The API asks :func:`gpu_problem`
first and raises a ``RuntimeError`` that says what is missing instead.
"""

import importlib.util
import os

NO_NUMBA_CUDA = (
    "numba-cuda is not installed (the gpu backend needs it: pip install 'sla-numba[cuda]')"
)


def numba_cuda_installed():
    """Whether the numba-cuda package is installed. numba itself still ships an old,
    deprecated ``numba.cuda`` that imports but is not what the kernels are written for,
    so we look for numba-cuda's own top-level package instead of importing numba.cuda."""
    return importlib.util.find_spec("numba_cuda") is not None


def _simulated():
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def gpu_problem():
    """None when the gpu backend can run (a usable CUDA device, or the CUDA
    simulator); otherwise a sentence saying why not."""
    if not numba_cuda_installed():
        return NO_NUMBA_CUDA
    from numba import cuda

    if _simulated():
        return None
    try:
        if cuda.is_available():
            return None
        # is_available() swallows the reason; the driver keeps it
        from numba.cuda.cudadrv import driver

        err = getattr(driver.driver, "initialization_error", None)
        if err is None:
            cuda.current_context()  # raises with the reason
            return None
        reason = str(err)
    except Exception as exc:  # noqa: BLE001 - every failure here means "no usable GPU"
        reason = str(exc)
    reason = " ".join(reason.split())[:200].rstrip(".")
    low = reason.lower()
    if "no cuda-capable device" in low or "no device" in low or "cuda_error_no_device" in low:
        what = "no CUDA device is visible"
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) is not None:
            what += f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    elif "driver" in low or "libcuda" in low or "not found" in low:
        what = "the CUDA driver (libcuda) cannot be loaded"
    else:
        what = "CUDA could not be initialised"
    return f"{what}: {reason}"


def require_gpu():
    """'cuda' when a device is usable, 'cpu' under the CUDA simulator; else RuntimeError."""
    problem = gpu_problem()
    if problem is not None:
        hint = "Use backend='cpu' (or 'auto')"
        if numba_cuda_installed():
            hint += (
                ", or run the GPU kernels in Numba's CUDA simulator with "
                "NUMBA_ENABLE_CUDASIM=1 set before numba is imported (slow; for tests)"
            )
        raise RuntimeError(f"backend='gpu' cannot run here: {problem}. {hint}")
    return "cpu" if _simulated() else "cuda"
