"""Compile the tensor-core kernels into Numba's disk cache, in parallel (needs a GPU).

Usage: PYTHONPATH=. python tools/warm_tc_cache.py [D:block_q:block_k:kind ...]
Default: the configurations the tests and the benchmark use. Each kernel compiles
in its own process; later launches load the cubins from the cache. Run it twice:
the second run must say "(disk cache)" for every kernel.
"""

import multiprocessing as mp
import sys
import time

DEFAULT = ["128:128:64:bf16", "64:64:64:bf16", "128:64:64:f16", "128:64:64:bf16"]


def _compile(job):
    import numpy as np

    if not hasattr(np, "row_stack"):
        np.vstack = np.vstack
    from numba import float32, int16, int32, int64

    from sla_numba.gpu.tc import backward as backward_tc
    from sla_numba.gpu.tc import forward as forward_tc

    which, D, bq, bk, kind = job
    t0 = time.time()
    if which == "fwd":
        i16, i32, f32 = int16[::1], int32[::1], float32[::1]
        kern = forward_tc.make_sparse_forward(D, bk, bq, kind).kernel
        sig = (i16, i16, i16, i32, i32, f32, f32, int64, int64, int64, int64, float32)
    else:
        kern = backward_tc.make_sparse_backward(which, D, bk, bq, kind).kernel
        sig = backward_tc.signature(which)
    compiled = kern.compile(sig)
    compiled._codelibrary.get_cufunc()  # the cubin (ptxas) is part of the cost
    how = "disk cache" if sum(kern._cache_hits.values()) else "compiled"
    return (
        f"{which} D={D} bq={bq} bk={bk} {kind}: {time.time() - t0:.1f}s ({how}) "
        f"regs {compiled.regs_per_thread} local {compiled.local_mem_per_thread}"
    )


def main():
    specs = sys.argv[1:] or DEFAULT
    jobs = []
    for s in specs:
        D, bq, bk, kind = s.split(":")
        for which in ("fwd", "dq", "dkv"):
            jobs.append((which, int(D), int(bq), int(bk), kind))
    with mp.get_context("spawn").Pool(min(len(jobs), 16)) as pool:
        for line in pool.imap_unordered(_compile, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
