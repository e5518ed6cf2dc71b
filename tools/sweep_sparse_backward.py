"""The sparse branch's tensor-core backward kernels (``gpu/tc/backward.py``) on the GPU:
sync against pipelined (``SLA_NUMBA_SPARSE_BWD``), same bits, and their speed.

Usage (on a GPU):  PYTHONPATH=. python tools/sweep_sparse_backward.py [--reps 20]
                   [--shapes wan d64] [--topk 0.05] [--block-q 64] [--block-k 64]

Shapes: ``wan`` B=1 H=12 N=32760 D=128 (Wan2.1 1.3B's self-attention; N not a multiple
of the blocks: a tail), ``d64`` B=2 H=16 N=8192 D=64; bf16 q, k, v, dO. LUT: every query
block takes the ``floor(topk * Mk)`` key blocks of largest random score (ascending), as in
``tools/bench_tc.py``; the reverse index from ``backward.reverse_index``; lse and delta
from the tensor-core forward. For each variant, the median (``--reps``, CUDA events) of
one launch of the dQ kernel, of the dK/dV kernel, and of both. TFLOP/s count the work
done with the FlashAttention convention: the pair 2.5 x the forward's 4*B*H*Nq*keys*D
(keys = n_crit * block_k per query); dQ alone 3 of its products (S, dP, dQ: 1.5x),
dK/dV alone 4 (S^T, dP^T, dV, dK: 2x). dQ, dK, dV of every variant are compared bit for
bit with the sync kernels' (outputs NaN-filled before each first launch); a mismatch
prints a ``FAIL`` line and the exit status is 1.
Whole run: < 90 s on an H200 (ten kernels to compile on a cold Numba cache: the forward
and the four backward kernels per head dim; the timings take a few seconds).
"""

import argparse
import math
import sys
import time

import numpy as np

if not hasattr(np, "row_stack"):  # numpy 2.5 vs numba-cuda 0.30
    np.row_stack = np.vstack

import torch  # noqa: E402
from cuda_timing import cuda_time  # noqa: E402

from sla_numba.gpu.tc import backward as backward_tc  # noqa: E402
from sla_numba.gpu.tc import build as tc_build  # noqa: E402
from sla_numba.gpu.tc import forward as forward_tc  # noqa: E402
from sla_numba.gpu.tc.ptx import LOG2E  # noqa: E402

SHAPES = {"wan": (1, 12, 32760, 128), "d64": (2, 16, 8192, 64)}
VARIANTS = (("sync", False), ("pipelined", True))


def problem(B, H, N, D, bq, bk, topk, dev="cuda"):
    """Inputs on ``dev``: q, k, v, dO bf16; lut / counts, rev / rev_counts; lse, delta."""
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (
        torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    mq, mk = -(-N // bq), -(-N // bk)
    n_crit = min(mk, max(1, math.floor(topk * mk)))
    scores = torch.rand(B, H, mq, mk, device=dev, generator=g)
    lut = torch.topk(scores, n_crit, dim=-1).indices.sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((B, H, mq), n_crit, dtype=torch.int32, device=dev)
    rev, rcnt = backward_tc.reverse_index(lut, counts, mk)
    o, lse = forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, D**-0.5)
    delta = (o * do.float()).sum(-1).contiguous()
    return dict(q=q, k=k, v=v, do=do, lut=lut, counts=counts, rev=rev, rcnt=rcnt, lse=lse,
                delta=delta, n_crit=n_crit, mq=mq, mk=mk)  # fmt: skip


def launchers(p, B, H, N, D, bq, bk, pipe, outs):
    """(run_dq, run_dkv): one launch each of the variant's kernels, writing ``outs``."""
    ad = tc_build.ArrayAdapter(p["q"])
    bits = [ad.bits(p[n]) for n in ("q", "k", "v", "do")]
    lse, delta = ad.flat(p["lse"], np.float32), ad.flat(p["delta"], np.float32)
    lut, cnt = ad.flat(p["lut"], np.int32), ad.flat(p["counts"], np.int32)
    rev, rcnt = ad.flat(p["rev"], np.int32), ad.flat(p["rcnt"], np.int32)
    dq, dk, dv = (ad.flat(x, np.float32) for x in outs)
    scale = D**-0.5
    c2, sc = np.float32(scale * LOG2E), np.float32(scale)
    stream = ad.stream()
    kq = backward_tc.make_sparse_backward("dq", D, bk, bq, "bf16", pipe)
    kkv = backward_tc.make_sparse_backward("dkv", D, bk, bq, "bf16", pipe)
    n_lut, n_rev = int(p["lut"].shape[-1]), int(p["rev"].shape[-1])
    a_dq = (*bits, lse, delta, lut, cnt, dq, N, N, p["mq"], n_lut, c2, sc)
    a_kv = (*bits, lse, delta, rev, rcnt, dk, dv, N, N, p["mk"], n_rev, c2, sc)

    def run_dq():
        tc_build.launch(kq.kernel, (p["mq"], B * H), kq.threads, kq.smem_bytes, stream, a_dq)

    def run_dkv():
        tc_build.launch(kkv.kernel, (p["mk"], B * H), kkv.threads, kkv.smem_bytes, stream, a_kv)

    return run_dq, run_dkv


def sweep(shape, args):
    """Time and compare the variants at one shape; returns False on a mismatch."""
    B, H, N, D = SHAPES[shape]
    bq, bk = args.block_q, args.block_k
    p = problem(B, H, N, D, bq, bk, args.topk)
    fwd_flops = 4.0 * B * H * N * (p["n_crit"] * bk) * D
    print(
        f"\n{shape}: B={B} H={H} N={N} D={D} bf16, block_q={bq} block_k={bk}, "
        f"{p['n_crit']}/{p['mk']} critical key blocks a query block"
    )
    print(
        f"{'variant':10s} {'dq ms':>8s} {'TFLOP/s':>8s} {'dkv ms':>8s} {'TFLOP/s':>8s} "
        f"{'both ms':>8s} {'TFLOP/s':>8s}  same bits"
    )
    ref, base, ok = None, None, True
    for name, pipe in VARIANTS:
        outs = [torch.full((B, H, N, D), float("nan"), device="cuda") for _ in range(3)]
        run_dq, run_dkv = launchers(p, B, H, N, D, bq, bk, pipe, outs)
        run_dq()
        run_dkv()
        torch.cuda.synchronize()
        got = [x.clone() for x in outs]
        if ref is None:
            ref = got
            same = "(reference)" if all(torch.isfinite(x).all() for x in got) else "NaN left"
            ok &= same == "(reference)"
        else:
            bad = [n for n, a, b in zip(("dq", "dk", "dv"), ref, got, strict=True)
                   if not torch.equal(a.view(torch.int32), b.view(torch.int32))]  # fmt: skip
            same = "yes" if not bad else "NO: " + ", ".join(bad)
            ok &= not bad
        t_dq = cuda_time(run_dq, args.reps)
        t_kv = cuda_time(run_dkv, args.reps)
        t_all = cuda_time(lambda: (run_dq(), run_dkv()), args.reps)  # noqa: B023
        base = base or (t_dq, t_kv, t_all)
        ratio = "" if not pipe else (
            f"   ({base[0] / t_dq:.2f}x, {base[1] / t_kv:.2f}x, {base[2] / t_all:.2f}x)"
        )  # fmt: skip
        print(
            f"{name:10s} {t_dq:8.3f} {1.5 * fwd_flops / t_dq / 1e9:8.1f} "
            f"{t_kv:8.3f} {2.0 * fwd_flops / t_kv / 1e9:8.1f} "
            f"{t_all:8.3f} {2.5 * fwd_flops / t_all / 1e9:8.1f}  {same}{ratio}"
        )
        if not same.startswith(("yes", "(reference)")):
            print(f"FAIL {shape} {name}: {same} (against the sync kernels)")
    for which in backward_tc.KERNELS:
        for name, pipe in VARIANTS:
            kern = backward_tc.make_sparse_backward(which, D, bk, bq, "bf16", pipe).kernel
            for compiled in kern.overloads.values():
                print(
                    f"  {which:3s} {name:9s} regs {compiled.regs_per_thread} "
                    f"local {compiled.local_mem_per_thread} B"
                )
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--block-q", type=int, default=64)
    ap.add_argument("--block-k", type=int, default=64)
    args = ap.parse_args()
    t0 = time.time()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ok = True
    for shape in args.shapes:
        ok &= sweep(shape, args)
    print(f"({time.time() - t0:.0f} s)")
    if not ok:
        sys.exit("FAIL: the pipelined kernels' bits differ from the sync kernels' (above)")


if __name__ == "__main__":
    main()
