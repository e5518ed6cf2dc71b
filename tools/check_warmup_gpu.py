"""Does ``sla_numba warmup`` compile everything a real GPU call needs? (run on a GPU)

1. With an empty kernel cache (a fresh temporary NUMBA_CACHE_DIR / SLA_NUMBA_CACHE_DIR),
   run ``python -m sla_numba warmup --backend gpu`` for the given D and dtypes; time it.
2. In a *new* process sharing that cache, run the first forward + backward at the
   Wan2.1 attention shape (B=1, H=12, N=32760, D=128 by default) for each dtype; time
   each and collect the "compiling SLA kernels ..." lines from stderr.

Pass: step 2 prints no "compiling" line (everything came from the disk cache) and its
first calls take about what later calls take. Usage (H200):

    PYTHONPATH=. python tools/check_warmup_gpu.py                       # D=128, bf16 + fp32
    PYTHONPATH=. python tools/check_warmup_gpu.py --head-dim 64 --n 8192 --heads 16 --batch 2
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

FIRST_CALL = r"""
import sys, time, torch, sla_numba
B, H, N, D = {batch}, {heads}, {n}, {d}
for name in {dtypes!r}:
    dt = getattr(torch, name)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dt, requires_grad=True)
               for _ in range(3))
    for label in ("first", "second"):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        o = sla_numba.sla_attention(q, k, v, topk=0.05, skip=0.10, backend="gpu")
        torch.cuda.synchronize(); t1 = time.perf_counter()
        o.backward(torch.ones_like(o))
        torch.cuda.synchronize(); t2 = time.perf_counter()
        print(f"{{name}} {{label}} call: forward {{t1 - t0:.2f}} s, backward {{t2 - t1:.2f}} s, "
              f"path {{sla_numba.kernel_path(q)}}", flush=True)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--n", type=int, default=32760)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="sla_warmup_check_")
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, SLA_NUMBA_CACHE_DIR=cache)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    t0 = time.perf_counter()
    warm = subprocess.run(
        [
            sys.executable,
            "-m",
            "sla_numba",
            "warmup",
            "--backend",
            "gpu",
            "--head-dim",
            str(args.head_dim),
            "--dtype",
            *args.dtype,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    print(
        f"warmup: exit {warm.returncode}, {time.perf_counter() - t0:.1f} s wall "
        f"(process start included)\n{warm.stdout}{warm.stderr[-2000:]}"
    )
    if warm.returncode:
        sys.exit(1)
    code = FIRST_CALL.format(
        batch=args.batch, heads=args.heads, n=args.n, d=args.head_dim, dtypes=args.dtype
    )
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    print(first.stdout)
    compiles = [ln for ln in first.stderr.splitlines() if "compiling SLA kernels" in ln]
    print("compile lines in the new process:", compiles or "none")
    if first.returncode:
        print(first.stderr[-3000:])
    ok = first.returncode == 0 and not compiles
    print("PASS: warmup covered the real calls" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
