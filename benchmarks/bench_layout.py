"""CPU: cost of layout="BNHD" (transposed views, copied once on the way in) against
contiguous (B, H, N, D) input, forward of the torch path, same run, interleaved.

    PYTHONPATH=. python benchmarks/bench_layout.py [--n 4096] [--reps 7]
"""

import argparse
import time

import torch

import sla_numba


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    B, H, N, D = 1, 4, a.n, 64
    torch.manual_seed(0)
    x = [torch.randn(B, N, H, D) for _ in range(3)]  # what a DiT's view gives
    bhnd = [t.transpose(1, 2).contiguous() for t in x]  # contiguous (B, H, N, D)
    kw = dict(topk=0.05, skip=0.10, backend="cpu")
    runs = {
        "BHND contiguous": lambda: sla_numba.sla_attention(*bhnd, **kw),
        "BNHD views": lambda: sla_numba.sla_attention(*x, layout="BNHD", **kw),
        "the copy alone": lambda: [t.transpose(1, 2).contiguous() for t in x],
    }
    for f in runs.values():
        f()  # compile / warm up
    times = {k: [] for k in runs}
    for _ in range(a.reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    base = min(times["BHND contiguous"])
    for k, ts in times.items():
        print(f"{k:16s} min {min(ts) * 1e3:8.2f} ms  ratio {min(ts) / base:.3f}")


if __name__ == "__main__":
    main()
