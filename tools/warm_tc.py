"""Compile tensor-core kernel configurations in parallel processes (fills Numba's disk cache).

Usage: PYTHONPATH=. python tools/warm_tc.py D:BK:BQ:KIND [...]   (e.g. 128:64:128:bf16)
Each configuration's three kernels (forward, dQ, dK/dV) compile in separate processes, so a
later test or benchmark run loads them from the cache instead of compiling one by one.
"""

import subprocess
import sys
import time


def _one(D, bk, bq, kind, which):
    import numpy as np

    if not hasattr(np, "row_stack"):
        np.vstack = np.vstack
    import torch

    from sla_numba.gpu.tc import backward as backward_tc
    from sla_numba.gpu.tc import build as _tc_build
    from sla_numba.gpu.tc import forward as forward_tc

    dt = torch.bfloat16 if kind == "bf16" else torch.float16
    q = torch.zeros(1, 1, bq, D, dtype=dt, device="cuda")
    lut = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device="cuda")
    cnt = torch.ones(1, 1, 1, dtype=torch.int32, device="cuda")
    names = {"fwd": "sla_fwd_tc", "dq": "sla_bwd_dq_tc", "dkv": "sla_bwd_dkv_tc"}
    _tc_build.COMPILE_ONLY = {names[which]}
    if which == "fwd":
        forward_tc.sparse_forward_tc(q, q, q, lut, cnt, bq, bk, 0.1)
    else:
        o = torch.zeros(1, 1, bq, D, dtype=torch.float32, device="cuda")
        lse = torch.zeros(1, 1, bq, dtype=torch.float32, device="cuda")
        rev, rc = backward_tc.reverse_index(lut, cnt, -(-bq // bk))
        backward_tc.sparse_backward_tc(
            q, q, q, o, lse, q, lut, cnt, rev, rc, bq, bk, 0.1, delta=lse
        )


def main():
    if sys.argv[1] == "--one":
        D, bk, bq, kind, which = sys.argv[2:7]
        _one(int(D), int(bk), int(bq), kind, which)
        return
    t0 = time.time()
    procs = []
    for spec in sys.argv[1:]:
        for which in ("fwd", "dq", "dkv"):
            procs.append(
                (
                    spec,
                    which,
                    subprocess.Popen([sys.executable, __file__, "--one", *spec.split(":"), which]),
                )
            )
    bad = 0
    for spec, which, p in procs:
        bad += p.wait() != 0
        print(f"warm {spec} {which}: rc {p.returncode} at {time.time() - t0:.0f}s", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
