"""Setup for the GPU-backend tests.

tests/conftest.py has already decided the simulator (``NUMBA_ENABLE_CUDASIM=1``
when torch sees no GPU) before Numba was imported. Here only one thing: under the
simulator every CUDA thread is a Python thread and ``syncthreads`` waits for all of
them, so a short GIL switch interval makes barriers ~10x cheaper (measured: 12 ms
-> 1 ms a barrier for 16 threads). Restored after the session.
"""
import os
import sys

import pytest


@pytest.fixture(autouse=True, scope="session")
def _fast_simulated_barriers():
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != "1":
        yield
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)
