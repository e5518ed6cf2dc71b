"""Benchmark the tensor-core sparse kernels against dense torch SDPA (bf16) on one GPU.

Usage: PYTHONPATH=. python tools/bench_tc.py [--n 32768] [--heads 12] [--d 128]
                                             [--block-q 128] [--block-k 64] [--topk 0.05]
Median over ``--reps`` single launches between an event pair. To compare two versions of
the kernels, see tools/compare_tc_kernels.py.
TFLOP/s counts the work actually done: forward 4*B*H*Nq*(n_crit*block_k)*D,
backward 2.5x that (FlashAttention convention); SDPA counts the dense 4*B*H*N*N*D.
"""

import argparse
import math
import sys

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack

import torch  # noqa: E402


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block-q", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=64)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-sdpa", action="store_true")
    a = ap.parse_args()
    from sla_numba.gpu.tc import backward as backward_tc
    from sla_numba.gpu.tc import forward as forward_tc

    B, H, N, D, bq, bk = 1, a.heads, a.n, a.d, a.block_q, a.block_k
    mq, mk = -(-N // bq), -(-N // bk)
    n_crit = min(mk, max(1, math.floor(a.topk * mk)))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    scores = torch.rand(B, H, mq, mk, device="cuda", generator=g)
    lut = torch.topk(scores, n_crit, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((B, H, mq), n_crit, dtype=torch.int32, device="cuda")
    rev, rcnt = backward_tc.reverse_index(lut, counts, mk)
    scale = D**-0.5

    fwd = lambda: forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, scale)  # noqa: E731
    o, lse = fwd()
    delta = (o * do.float()).sum(-1)
    bwd = lambda: backward_tc.sparse_backward_tc(  # noqa: E731
        q, k, v, o, lse, do, lut, counts, rev, rcnt, bq, bk, scale, delta=delta
    )
    bwd()
    torch.cuda.synchronize()
    flops = 4.0 * B * H * N * (n_crit * bk) * D
    tf = timed(fwd, a.reps)
    tb = timed(bwd, a.reps)
    print(f"config B={B} H={H} N={N} D={D} block_q={bq} block_k={bk} n_crit={n_crit}/{mk}")
    print(f"sparse fwd  {tf:8.3f} ms  {flops / tf / 1e9:7.1f} TFLOP/s")
    print(f"sparse bwd  {tb:8.3f} ms  {2.5 * flops / tb / 1e9:7.1f} TFLOP/s (dq + dk/dv kernels)")
    kernels = [("fwd", forward_tc.make_sparse_forward(D, bk, bq, "bf16").kernel)]
    for which in backward_tc.KERNELS:
        kernels.append((which, backward_tc.make_sparse_backward(which, D, bk, bq, "bf16").kernel))
    for name, kern in kernels:
        for compiled in kern.overloads.values():
            print(
                f"  {name:4s} regs {compiled.regs_per_thread} "
                f"local {compiled.local_mem_per_thread} B"
            )
    if a.no_sdpa:
        return
    dense = 4.0 * B * H * N * N * D
    sd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    ts = timed(sd, a.reps)
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def fb():
        out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)
        out.backward(do)

    tfb = timed(fb, max(3, a.reps // 2))
    print(f"SDPA dense fwd      {ts:8.3f} ms  {dense / ts / 1e9:7.1f} TFLOP/s")
    print(f"SDPA dense fwd+bwd  {tfb:8.3f} ms  {3.5 * dense / tfb / 1e9:7.1f} TFLOP/s")
    print(f"sparse fwd speedup vs dense SDPA {ts / tf:.1f}x, fwd+bwd {tfb / (tf + tb):.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
