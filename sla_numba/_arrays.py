"""Allocation helpers that honour the test-time poisoning switch."""

import numpy as np

from .testing import poisoning

POISON_INT = 99  # not a valid block class


def poison_value(dtype):
    return np.nan if np.dtype(dtype).kind == "f" else POISON_INT


def np_empty(shape, dtype):
    """``np.empty``, or NaN/99-filled when poisoning is on (tests)."""
    if poisoning():
        return np.full(shape, poison_value(dtype), dtype=dtype)
    return np.empty(shape, dtype=dtype)
