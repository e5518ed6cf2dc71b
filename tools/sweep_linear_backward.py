"""The linear branch's gradient kernels (``gpu/tc/linear_backward.py``) on the GPU:
register-staged against pipelined, same bits, and the cuBLAS floor.

Usage (on a GPU):  PYTHONPATH=. python tools/sweep_linear_backward.py [--reps 20]
                   [--hk 32 16] [--fm 0] [--bh 12] [--blocks 512] [--d 128]

At the Wan2.1 shape's sizes (B*H = 12, N = 512 blocks of 64 rows minus 8 (a tail),
D = 128, bf16 q / k / v and bf16 o_l / do_l, fp32 states, ~2 % of the blocks without
marginal partners): median time of one ``launch_dq_linear_tc`` and one
``launch_dkdv_linear_tc`` for the register kernel (``SLA_NUMBA_LINEAR_GRAD=registers``,
the chunk size of the library default) and for the pipelined kernel at each ``--hk``
(columns / rows of the D x D state a chunk); each output (dq, qstate, dk, dv, from the
same random base: the kernels add) compared bit for bit with the register kernel's.
Beside them: the bytes each kernel must move at least (inputs, the state, dq / dk / dv
read and written) as an effective bandwidth, and the cuBLAS floor of the same products
(``torch.bmm`` per block: dq's dO_l·H_iᵀ and ĉᵀ·dO_l, dk / dv's v·dH_jᵀ and φ(K)·dH_j),
in fp32 with TF32 (it reads the fp32 states, as the kernels do) and in bf16 (states
converted beforehand: half the state bytes), measured in the same run. Exit status 1 when any bits differ.
Whole run: < 60 s on an H200 with a warm kernel cache (cold: + ~10 s per kernel).
"""

import argparse
import sys
import time

import torch
from cuda_timing import cuda_time

from sla_numba.gpu.tc import linear_backward as lb

EPS = 1e-6


def bits(x):
    return x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bh", type=int, default=12)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--fm", type=int, default=0, help="feature map: 0 softmax, 1 elu+1, 2 relu")
    ap.add_argument("--hk", type=int, nargs="*", default=[32, 16], help="pipelined chunk sizes")
    args = ap.parse_args()
    t_start = time.time()
    B, H, D, blk, fm = 1, args.bh, args.d, args.block, args.fm
    M = args.blocks
    N = M * blk - 8
    W = D * D + D
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g) * scale

    def half_bits(x):
        return x.to(torch.bfloat16).view(torch.int16)

    q, k, v = (half_bits(randn(B, H, N, D, scale=1.5)) for _ in range(3))
    o_l, do_l = half_bits(randn(B, H, N, D)), half_bits(randn(B, H, N, D))
    lstate = randn(B, H, M, W, scale=0.3)
    lstate[..., D * D :] = torch.rand(B, H, M, D, device=dev, generator=g) * 4 + 1  # Z > 0
    dh = randn(B, H, M, W, scale=0.3)
    n_marg = torch.randint(1, 4, (B, H, M), device=dev, generator=g, dtype=torch.int32)
    n_marg[torch.rand(B, H, M, device=dev, generator=g) < 0.02] = 0
    dq0, dk0, dv0 = (randn(B, H, N, D) for _ in range(3))

    def run_dq(pipe, hk, dq, qstate):
        lb.launch_dq_linear_tc(
            "bf16", q, o_l, do_l, lstate, n_marg, dq, qstate, B, H, N, D, blk, fm, EPS, 0,
            hk=hk, pipeline=pipe,
        )  # fmt: skip

    def run_dkdv(pipe, hk, dk, dv):
        lb.launch_dkdv_linear_tc(
            "bf16", k, v, dh, n_marg, dk, dv, B, H, N, D, blk, fm, 0, hk=hk, pipeline=pipe
        )

    # minimal traffic: q, o_l, do_l (2 B), dq read + written (8 B), H_i read, QO_i written
    n_el = B * H * N * D
    dq_bytes = n_el * (6 + 8) + 2 * B * H * M * W * 4
    kv_bytes = n_el * (4 + 16) + B * H * M * W * 4  # k, v; dk, dv read + written; dH_j
    variants = [("registers", False, None)] + [(f"pipelined hk={h}", True, h) for h in args.hk]
    ref = None
    mismatch = False
    print(
        f"B*H={B * H} N={N} ({M} blocks of {blk}) D={D} bf16, fm={fm}; "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    print(f"{'kernel':22s} {'dq ms':>8s} {'GB/s':>6s} {'dkdv ms':>8s} {'GB/s':>6s}  same bits")
    base = {}
    for name, pipe, hk in variants:
        dq, qs = dq0.clone(), torch.full_like(lstate, float("nan"))
        dk, dv = dk0.clone(), dv0.clone()
        run_dq(pipe, hk, dq, qs)
        run_dkdv(pipe, hk, dk, dv)
        torch.cuda.synchronize()
        outs = tuple(x.clone() for x in (dq, qs, dk, dv))  # the timing below adds on
        if ref is None:
            ref = outs
            same = "(reference)"
        else:
            same = all(torch.equal(bits(a), bits(b)) for a, b in zip(ref, outs))
            mismatch |= not same
            same = "yes" if same else "NO: " + ", ".join(
                n for n, a, b in zip(("dq", "qstate", "dk", "dv"), ref, outs)
                if not torch.equal(bits(a), bits(b))
            )  # fmt: skip
        t_dq = cuda_time(lambda: run_dq(pipe, hk, dq, qs), args.reps)
        t_kv = cuda_time(lambda: run_dkdv(pipe, hk, dk, dv), args.reps)
        base.setdefault("dq", t_dq)
        base.setdefault("kv", t_kv)
        print(
            f"{name:22s} {t_dq:8.3f} {dq_bytes / t_dq / 1e6:6.0f} {t_kv:8.3f} "
            f"{kv_bytes / t_kv / 1e6:6.0f}  {same}"
            + ("" if pipe is False else f"   ({base['dq'] / t_dq:.2f}x, {base['kv'] / t_kv:.2f}x)")
        )

    # cuBLAS floor: the two products of each kernel as batched GEMMs over the blocks
    nb = B * H * M
    Np = M * blk
    rows = lambda x: torch.nn.functional.pad(x.view(torch.bfloat16), (0, 0, 0, Np - N))  # noqa: E731
    dO = rows(do_l).reshape(nb, blk, D)
    vv = rows(v).reshape(nb, blk, D)
    Hs = lstate[..., : D * D].reshape(nb, D, D)
    dHs = dh[..., : D * D].reshape(nb, D, D)
    for label, dt in (("cuBLAS fp32 (TF32)", torch.float32), ("cuBLAS bf16", torch.bfloat16)):
        torch.backends.cuda.matmul.allow_tf32 = True
        a, x, hh, dd = dO.to(dt), vv.to(dt), Hs.to(dt), dHs.to(dt)
        c = a.clone()  # stands in for ĉ and φ(K) (same shape and type)
        t_dq = cuda_time(
            lambda: (torch.bmm(a, hh.transpose(1, 2)), torch.bmm(c.transpose(1, 2), a)), args.reps
        )  # noqa: E501
        t_kv = cuda_time(lambda: (torch.bmm(x, dd.transpose(1, 2)), torch.bmm(c, dd)), args.reps)
        print(f"{label:22s} {t_dq:8.3f} {'':6s} {t_kv:8.3f}")
    print(f"({time.time() - t_start:.0f} s)")
    if mismatch:
        sys.exit("the pipelined kernels' bits differ from the register kernels'")


if __name__ == "__main__":
    main()
