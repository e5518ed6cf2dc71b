"""Threads and processes: which Numba threading layer the CPU kernels use, and one lock.

Numba runs a ``prange`` loop on a *threading layer*: TBB, OpenMP or its own
"workqueue". They differ in what survives:

=============  ===========================  =======================================
layer          fork() after first use        two Python threads calling at once
=============  ===========================  =======================================
tbb            safe                          safe
omp (GNU)      the child dies on first use   safe
workqueue      safe                          the process aborts
=============  ===========================  =======================================

On Linux, without TBB installed, Numba's default is GNU OpenMP: a
``multiprocessing`` child forked after the parent ran a kernel is killed
("fork() called from a process already using GNU OpenMP") and a ``Pool.map``
never returns. So, unless the user chose a layer (``NUMBA_THREADING_LAYER``), the
first import of the CPU backend asks Numba for its ``"forksafe"`` choice: TBB when
the ``tbb`` package is installed, else OpenMP when it is not GNU's, else workqueue.
Every CPU kernel call then holds :data:`KERNEL_LOCK`, so two threads never run
kernels at the same time (workqueue aborts on that; on the other layers two
concurrent calls would only oversubscribe the cores). The lock is re-created in a
forked child, in case the fork happened while another thread held it.

This has to happen before Numba starts its threads, i.e. before the first parallel
kernel of the process runs; if the program already ran Numba parallel code, the
layer it got stays (then ``sla_numba`` is as fork-safe as that layer).
"""

import functools
import os
import threading

KERNEL_LOCK = threading.RLock()


def _new_lock_in_child():
    global KERNEL_LOCK
    KERNEL_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def choose_threading_layer():
    """Ask Numba for a fork-safe threading layer unless the user chose one."""
    from numba import config

    if os.environ.get("NUMBA_THREADING_LAYER", "").strip():
        return config.THREADING_LAYER
    if config.THREADING_LAYER == "default":
        config.THREADING_LAYER = "forksafe"
    return config.THREADING_LAYER


def serialized(fn):
    """``fn`` (a CPU backend entry point) called under :data:`KERNEL_LOCK`."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with KERNEL_LOCK:
            return fn(*args, **kwargs)

    return call
