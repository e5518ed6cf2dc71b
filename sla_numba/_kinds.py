"""Which array library an argument comes from, without importing any of them.

The API accepts numpy arrays, torch tensors and CuPy arrays. torch and CuPy are
optional: we look them up in ``sys.modules`` (an object of theirs can only
exist if the library was imported already), so the numpy path never imports them.
"""

import sys

import numpy as np


def array_kind(x):
    """'numpy', 'torch' or 'cupy'; None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    return None


def is_on_gpu(x, kind):
    """True when the array lives in GPU memory."""
    if kind == "torch":
        return x.device.type == "cuda"
    return kind == "cupy"


def device_of(x, kind):
    """A printable device name for error messages."""
    if kind == "torch":
        return str(x.device)
    if kind == "cupy":
        return f"cuda:{x.device.id}"
    return "cpu"


def dtype_name(x, kind):
    """'float32', 'bfloat16', ... for numpy, torch and CuPy alike."""
    if kind == "torch":
        return str(x.dtype).replace("torch.", "")
    return np.dtype(x.dtype).name


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
