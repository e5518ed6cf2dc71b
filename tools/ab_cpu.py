"""A/B timing of two versions of the CPU kernels in one process, call by call.

    cp -r <old checkout>/sla_numba /tmp/ab/sla_numba_before   # the old package, renamed
    PYTHONPATH=.:/tmp/ab python tools/ab_cpu.py --threads 1 --calls 30

On a shared machine the load changes from second to second; alternating the two
versions call by call in one process exposes both to the same load, which
separate runs do not. Shape as ``benchmarks/bench_cpu.py`` (B1 H4 N4096 D64 fp32,
topk 0.05, skip 0.10, block 64). Reported per kernel: the minimum and the median
process CPU time of a call (all threads) and of wall time, and the ratio old/new.
"""

import argparse
import importlib
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--old", default="sla_numba_before", help="importable name of the old package")
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    import numba

    numba.set_num_threads(args.threads)
    new = importlib.import_module("sla_numba.cpu")
    old = importlib.import_module(args.old + ".cpu")
    newc = importlib.import_module("sla_numba.cpu._common")
    oldc = importlib.import_module(args.old + ".cpu._common")
    from sla_numba._params import block_counts, n_blocks

    rng = np.random.default_rng(0)
    B, H, N, D, blk = 1, 4, args.n, 64, 64
    q, k, v, do = (rng.standard_normal((B, H, N, D), dtype=np.float32) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    n_crit, n_skip = block_counts(n_blocks(N, blk), 0.05, 0.10)
    bmap = new.classify(q, k, n_crit, n_skip, blk, blk, scale)
    outs = {}
    cases = {}
    for tag, cpu, com in (("old", old, oldc), ("new", new, newc)):
        outs[tag] = cpu.forward(q, k, v, bmap, blk, blk, scale, 0, 1e-6)
        o = outs[tag]
        cases[("linear_states", tag)] = lambda com=com: com.linear_states(k, v, blk, 0)
        cases[("cpu.forward", tag)] = lambda cpu=cpu: cpu.forward(
            q, k, v, bmap, blk, blk, scale, 0, 1e-6
        )
        cases[("cpu.backward", tag)] = lambda cpu=cpu, o=o: cpu.backward(
            q, k, v, *o, do, do, bmap, blk, blk, scale, 0, 1e-6
        )
    for fn in cases.values():
        fn()
    cpu_t = {c: [] for c in cases}
    wall_t = {c: [] for c in cases}
    load0 = os.getloadavg()
    for _ in range(args.calls):
        for c, fn in cases.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu_t[c].append(1e3 * (time.process_time() - c0))
            wall_t[c].append(1e3 * (time.perf_counter() - w0))
    load1 = os.getloadavg()
    print(
        f"threads {args.threads}, {args.calls} alternating calls each, load average "
        f"{load0[0]:.1f} -> {load1[0]:.1f}; ms: CPU min / median, wall min / median"
    )
    for name in ("linear_states", "cpu.forward", "cpu.backward"):
        row = []
        for tag in ("old", "new"):
            ct, wt = cpu_t[(name, tag)], wall_t[(name, tag)]
            row.append((min(ct), statistics.median(ct), min(wt), statistics.median(wt)))
        (a, b) = row
        print(
            f"  {name:14s} old {a[0]:7.2f} / {a[1]:7.2f}, {a[2]:7.2f} / {a[3]:7.2f}   "
            f"new {b[0]:7.2f} / {b[1]:7.2f}, {b[2]:7.2f} / {b[3]:7.2f}   "
            f"old/new CPU min {a[0] / b[0]:.2f}x median {a[1] / b[1]:.2f}x"
        )


if __name__ == "__main__":
    main()
