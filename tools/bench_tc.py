"""Benchmark the tensor-core sparse kernels against dense torch SDPA (bf16) on one GPU.

Usage: PYTHONPATH=. python tools/bench_tc.py [--n 32768] [--heads 12] [--d 128]
                                             [--block-q 128] [--block-k 64] [--topk 0.05]
                                             [--variants v2,v1] [--loop 10]
Two timings per kernel: single launches between an event pair (includes the host's launch
overhead: Numba's argument handling can leave the GPU idle) and ``--loop`` back-to-back
launches between one event pair (the GPU's time per call). Each reported as min / median
over ``--reps`` repetitions. ``--variants`` times kernel generations side by side
(``SLA_TC_VARIANT``: v1 = the first version, v2 = current).
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


def timed_stats(fn, reps, loop):
    """(min, median) ms per call: single launches and ``loop`` launches per event pair."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    single, looped = [], []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        single.append(start.elapsed_time(end))
    for _ in range(reps):
        start.record()
        for _ in range(loop):
            fn()
        end.record()
        torch.cuda.synchronize()
        looped.append(start.elapsed_time(end) / loop)
    return (min(single), float(np.median(single))), (min(looped), float(np.median(looped)))


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
    ap.add_argument("--variants", default="")
    ap.add_argument("--loop", type=int, default=10)
    a = ap.parse_args()
    if a.variants:
        return compare(a)
    from sla_numba.gpu.tc import backward as backward_tc, forward as forward_tc

    B, H, N, D, bq, bk = 1, a.heads, a.n, a.d, a.block_q, a.block_k
    mq, mk = -(-N // bq), -(-N // bk)
    n_crit = min(mk, max(1, math.floor(a.topk * mk)))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    scores = torch.rand(B, H, mq, mk, device="cuda", generator=g)
    lut = torch.topk(scores, n_crit, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((B, H, mq), n_crit, dtype=torch.int32, device="cuda")
    rev, rcnt = backward_tc.reverse_index(lut, counts, mk)
    scale = D ** -0.5

    fwd = lambda: forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, scale)  # noqa: E731
    o, lse = fwd()
    delta = (o * do.float()).sum(-1)
    bwd = lambda: backward_tc.sparse_backward_tc(  # noqa: E731
        q, k, v, o, lse, do, lut, counts, rev, rcnt, bq, bk, scale, delta=delta)
    bwd()
    torch.cuda.synchronize()
    flops = 4.0 * B * H * N * (n_crit * bk) * D
    tf = timed(fwd, a.reps)
    tb = timed(bwd, a.reps)
    print(f"config B={B} H={H} N={N} D={D} block_q={bq} block_k={bk} n_crit={n_crit}/{mk}")
    print(f"sparse fwd  {tf:8.3f} ms  {flops / tf / 1e9:7.1f} TFLOP/s")
    print(f"sparse bwd  {tb:8.3f} ms  {2.5 * flops / tb / 1e9:7.1f} TFLOP/s (dq + dk/dv kernels)")
    fmod = forward_tc.get_forward_kernel(D, bk, bq, "bf16")
    kernels = [("fwd", fmod.sla_fwd_tc)]
    for which in backward_tc.KERNELS:
        mod = backward_tc.kernel_source_and_module(which, D, bk, bq, "bf16")[1]
        kernels.append((which, getattr(mod, backward_tc.KERNEL_NAMES[which])))
    for name, kern in kernels:
        for compiled in kern.overloads.values():
            print(f"  {name:4s} regs {compiled.regs_per_thread} "
                  f"local {compiled.local_mem_per_thread} B")
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


def compare(a):
    import os
    from sla_numba.gpu.tc import backward as backward_tc, forward as forward_tc
    B, H, N, D, bq, bk = 1, a.heads, a.n, a.d, a.block_q, a.block_k
    mq, mk = -(-N // bq), -(-N // bk)
    n_crit = min(mk, max(1, math.floor(a.topk * mk)))
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    scores = torch.rand(B, H, mq, mk, device="cuda", generator=g)
    lut = torch.topk(scores, n_crit, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((B, H, mq), n_crit, dtype=torch.int32, device="cuda")
    rev, rcnt = backward_tc.reverse_index(lut, counts, mk)
    scale = D ** -0.5
    flops = 4.0 * B * H * N * (n_crit * bk) * D
    print(f"config B={B} H={H} N={N} D={D} block_q={bq} block_k={bk} n_crit={n_crit}/{mk} "
          f"reps={a.reps} loop={a.loop}  [TFLOP/s from min / median ms]")
    ref = None
    for var in a.variants.split(","):
        os.environ["SLA_TC_VARIANT"] = var
        fwd = lambda: forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, scale)  # noqa: E731
        o, lse = fwd()
        delta = (o * do.float()).sum(-1)
        bwd = lambda: backward_tc.sparse_backward_tc(  # noqa: E731
            q, k, v, o, lse, do, lut, counts, rev, rcnt, bq, bk, scale, delta=delta)
        grads = bwd()
        torch.cuda.synchronize()
        outs = [o, lse, *grads]
        if ref is None:
            ref = outs
        else:
            diffs = [float((x - y).abs().max()) for x, y in zip(outs, ref)]
            print(f"  {var} vs {a.variants.split(',')[0]}: max |diff| o lse dq dk dv = "
                  + " ".join(f"{d:.2e}" for d in diffs))
        for name, fn, fl in (("fwd", fwd, flops), ("bwd", bwd, 2.5 * flops)):
            (s0, s1), (l0, l1) = timed_stats(fn, a.reps, a.loop)
            print(f"  {var} {name}: single {s0:7.3f}/{s1:7.3f} ms = {fl / s0 / 1e9:6.1f}/"
                  f"{fl / s1 / 1e9:6.1f} TFLOP/s | looped {l0:7.3f}/{l1:7.3f} ms = "
                  f"{fl / l0 / 1e9:6.1f}/{fl / l1 / 1e9:6.1f} TFLOP/s", flush=True)
        fmod = forward_tc.get_forward_kernel(D, bk, bq, "bf16")
        kernels = [("fwd", fmod.sla_fwd_tc)]
        for which in backward_tc.KERNELS:
            mod = backward_tc.kernel_source_and_module(which, D, bk, bq, "bf16")[1]
            kernels.append((which, getattr(mod, backward_tc.KERNEL_NAMES[which])))
        print("  " + var + " regs/local: " + ", ".join(
            f"{n} {c.regs_per_thread}/{c.local_mem_per_thread}B"
            for n, kern in kernels for c in kern.overloads.values()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
