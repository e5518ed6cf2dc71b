"""Kernel timing for the sweep tools (``tools/sweep_*.py``): CUDA events around each call.

Imported as a sibling module (the tools run as ``python tools/sweep_x.py``, which puts
``tools/`` on ``sys.path``). ``benchmarks/bench_gpu.py`` times whole calls by wall clock
instead (launches and host glue count there); these tools compare kernels, so the GPU
time between two events is what they want.
"""

import statistics

import torch


def cuda_time(fn, reps):
    """Median ms of ``fn()`` over ``reps`` calls, each between two CUDA events, after
    one untimed call (compile / first-touch)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)
