"""Per-kernel GPU times of one SLA call, from torch's profiler (CUPTI sees Numba's kernels too).

Usage (on a GPU):  PYTHONPATH=. python tools/profile_gpu.py [--shape wan|b2] [--dtype bf16 fp32]

For each dtype: one warm-up call, then the forward and the forward+backward of
``sla_attention`` (backend="gpu", topk 0.05, skip 0.10, block 64) under
``torch.profiler``; prints every kernel's total GPU time (sorted) and the sum, next to
the wall time of the same call, so that host time (Python, launches) shows as the gap.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

SHAPES = {"wan": (1, 12, 32760, 128), "b2": (2, 16, 8192, 64)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="wan", choices=list(SHAPES))
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--topk", type=float, default=0.05)
    args = ap.parse_args()
    from sla_numba import sla_attention

    B, H, N, D = SHAPES[args.shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(B, H, N, D, device="cuda", generator=g) for _ in range(4)]
    for name in args.dtype:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        q, k, v, do = (x.to(dt) for x in base)

        def fwd():
            with torch.no_grad():
                return sla_attention(
                    q, k, v, topk=args.topk, skip=0.1, block_q=64, block_k=64, backend="gpu"
                )

        def fwd_bwd():
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            sla_attention(
                qq, kk, vv, topk=args.topk, skip=0.1, block_q=64, block_k=64, backend="gpu"
            ).backward(do)

        for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            rows = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    key = ev.name[:60]
                    n, us = rows.get(key, (0, 0.0))
                    rows[key] = (n + 1, us + ev.time_range.elapsed_us())
            total = sum(us for _, us in rows.values()) / 1e3
            print(
                f"\n== {args.shape} {name} {label}: wall {wall:.2f} ms, "
                f"kernels {total:.2f} ms (gap = host-bound time)"
            )
            for key, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
                print(f"  {us / 1e3:8.3f} ms  x{n:<3d} {key}")


if __name__ == "__main__":
    main()
