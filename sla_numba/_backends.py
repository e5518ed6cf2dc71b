"""Loading a backend package and the dtype its kernels compute in.

Imported by :mod:`sla_numba.api` and :mod:`sla_numba.torch_ops`; it imports
neither, so the modules form a line: api -> torch_ops -> _backends -> cpu | gpu.
"""

import importlib

import numpy as np


def load_backend(name):
    """Import ``sla_numba.cpu`` or ``sla_numba.gpu``; a clear error if it cannot be used."""
    if name == "gpu":
        from ._gpu_check import NO_NUMBA_CUDA, numba_cuda_installed

        if not numba_cuda_installed():
            raise RuntimeError(f"backend='gpu' is not available: {NO_NUMBA_CUDA}")
    try:
        return importlib.import_module(f"sla_numba.{name}")
    except ImportError as err:
        raise RuntimeError(
            f"backend={name!r} is not available: {err}. The gpu backend needs "
            "numba-cuda with its CUDA libraries: pip install 'sla-numba[cuda]'"
        ) from err


def compute_dtype(dtype_str):
    """Kernels compute in float64 for float64 input, float32 for everything else."""
    return np.float64 if dtype_str == "float64" else np.float32
