"""The wgmma linear-branch forward (``gpu/tc/linear_wgmma.py``, ``SLA_NUMBA_LINEAR=wgmma``)
against the pipelined mma.sync kernel (the default) and the cuBLAS floor, on an H100 / H200.

Usage (on a GPU of compute capability 9.0):
    PYTHONPATH=. python tools/sweep_linear_wgmma.py [--reps 20] [--shapes wan b2]
        [--variants 16,3,0 16,2,0 32,2,0 16,2,3 16,2,4 32,2,3]

Shapes: ``wan`` B1 H12 Nq 32760 D128 (the Wan2.1 sizes: 512 query blocks a head), ``b2``
B2 H16 Nq 8192 D64; bf16 q, block_q 64, softmax feature map, every block with marginal
keys, fp32 states with positive denominators. For each shape, in one process:

1. the pipelined kernel (``launch_linear_forward_tc(pipeline=True)``) and each wgmma
   variant ``HK,STAGES,RING`` (rows of H_i a chunk, bf16 chunk buffers, raw fp32
   cp.async ring slots, 0: H_i through registers; ``linear_wgmma`` module doc) -- output compared with
   the pipelined kernel's (max abs difference, the same relative to max |O_l|, and how
   many bits are equal) and with a float64 torch reference (max error relative to
   max |O_l|); o_l starts NaN, so unwritten elements show as NaN (reported);
2. median ms of ``--reps`` launches between CUDA events (``tools/cuda_timing.py``), the
   effective bandwidth (H_i, Z_i fp32 read + q bf16 read + o_l fp32 written / time), the
   ratio to the pipelined kernel and to the floor;
3. the cuBLAS floor: ``torch.bmm`` of the bf16 product φ(Q_i) (B·H·Mq, 64, D) x H_i
   (B·H·Mq, D, D), same run.

A variant that fails to compile or launch is reported in one line and skipped. Under
150 s on an H200 including the compiles (a few seconds a kernel).
"""

import argparse
import time

import numpy as np
import torch
from cuda_timing import cuda_time

from sla_numba.gpu._arrays import device_view
from sla_numba.gpu.tc import linear as tcl
from sla_numba.gpu.tc import linear_wgmma as lw

SHAPES = {"wan": (1, 12, 32760, 128), "b2": (2, 16, 8192, 64)}
BQ, FM, EPS = 64, 0, 1e-6


def reference64(q, ls, B, H, Nq, D):
    """float64 O_l (B, H, Nq, D): softmax φ over the head dim, per query block of 64."""
    Mq = -(-Nq // BQ)
    p = torch.softmax(q.double(), dim=-1)
    pp = torch.zeros(B, H, Mq * BQ, D, dtype=torch.float64, device=q.device)
    pp[:, :, :Nq] = p
    pp = pp.view(B * H * Mq, BQ, D)
    ls64 = ls.double().view(B * H * Mq, D * D + D)
    num = torch.bmm(pp, ls64[:, : D * D].view(-1, D, D))
    den = torch.bmm(pp, ls64[:, D * D :].unsqueeze(-1)) + EPS
    return (num / den).view(B, H, Mq * BQ, D)[:, :, :Nq]


def sweep(name, variants, reps):
    B, H, Nq, D = SHAPES[name]
    Mq, W = -(-Nq // BQ), D * D + D
    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(B, H, Nq, D, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
    ls = torch.randn(B, H, Mq, W, device="cuda", generator=g)
    ls[..., D * D :] = ls[..., D * D :].abs() * 8  # positive denominators
    n_marg = torch.ones(B, H, Mq, dtype=torch.int32, device="cuda")
    nbytes = B * H * Mq * W * 4 + B * H * Nq * D * (2 + 4)
    views = [device_view(x) for x in (q.view(torch.int16), ls, n_marg)]
    ref64 = reference64(q, ls, B, H, Nq, D)
    scale = ref64.abs().max().item()
    print(
        f"\n== {name}: B{B} H{H} Nq{Nq} D{D} bf16 block_q {BQ} (Mq {Mq}); "
        f"{nbytes / 1e6:.0f} MB read + written a launch"
    )

    def launch(out, variant):
        ov = device_view(out)
        if variant is None:
            tcl.launch_linear_forward_tc(
                "bf16", *views, ov, B, H, Nq, D, BQ, FM, EPS, 0, pipeline=True
            )
        else:
            hk, st, ring = variant
            lw.launch_linear_forward_wgmma(
                "bf16", *views, ov, B, H, Nq, D, BQ, FM, EPS, 0, hk=hk, stages=st, ring=ring
            )

    rows = []
    base = None
    for variant in [None] + variants:
        label = "pipelined mma.sync" if variant is None else "wgmma hk=%d st=%d ring=%d" % variant
        out = torch.full((B, H, Nq, D), float("nan"), device="cuda")
        try:
            t0 = time.time()
            launch(out, variant)
            torch.cuda.synchronize()
            first = time.time() - t0
            nan = int(torch.isnan(out).sum().item())
            err64 = (out.double() - ref64).abs().max().item() / scale
            cmp = ""
            if base is not None:
                d = (out - base).abs().max().item()
                same = (out.view(torch.int32) == base.view(torch.int32)).double().mean().item()
                cmp = f"{d:.2e} ({d / scale:.1e} rel), {100 * same:.1f}% same bits"
            ms = cuda_time(lambda o=out, v=variant: launch(o, v), reps)
        except Exception as e:  # noqa: BLE001 - report, go on with the next variant
            print(f"{label}: failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        if variant is None:
            base = out
        rows.append((label, ms, nan, err64, cmp, first))
    a = torch.softmax(q.float(), -1).to(torch.bfloat16)
    a_pad = torch.zeros(B * H, Mq * BQ, D, dtype=torch.bfloat16, device="cuda")
    a_pad[:, :Nq] = a.view(B * H, Nq, D)
    a_pad = a_pad.view(B * H * Mq, BQ, D)
    hmat = ls[..., : D * D].reshape(B * H * Mq, D, D).to(torch.bfloat16)
    floor = cuda_time(lambda: torch.bmm(a_pad, hmat), reps)
    t_def = rows[0][1] if rows and rows[0][0].startswith("pipelined") else None
    print(
        f"{'kernel':26s} {'ms':>7s} {'TB/s':>6s} {'x default':>9s} {'x floor':>8s} "
        f"{'NaN':>4s} {'err/max|O| f64':>14s}  vs pipelined (max abs diff, same bits)  first call s"
    )
    for label, ms, nan, err64, cmp, first in rows:
        rd = f"{t_def / ms:9.2f}" if t_def else f"{'-':>9s}"
        print(
            f"{label:26s} {ms:7.3f} {nbytes / ms / 1e9:6.2f} {rd} {floor / ms:8.2f} "
            f"{nan:4d} {err64:14.2e}  {cmp or '-':40s} {first:6.1f}"
        )
    print(f"{'cuBLAS bmm bf16 floor':26s} {floor:7.3f}   ({B * H * Mq} x {BQ}x{D} @ {D}x{D})")
    print("(x default, x floor: time of the default / floor divided by this kernel's time)")


def main():
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", nargs="*", default=["wan", "b2"], choices=sorted(SHAPES))
    ap.add_argument(
        "--variants",
        nargs="*",
        default=["16,3,0", "16,2,0", "32,2,0", "16,2,3", "16,2,4", "32,2,3"],
        help="wgmma kernel configurations HK,STAGES,RING (RING 0: registers)",
    )
    args = ap.parse_args()
    variants = [tuple(int(x) for x in (v + ",0").split(",")[:3]) for v in args.variants]
    cc = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} cc {cc}; torch {torch.__version__}")
    if lw.wgmma_linear_unsupported_reason("bf16", 128, BQ) is not None:
        print("no wgmma here:", lw.wgmma_linear_unsupported_reason("bf16", 128, BQ))
    for name in args.shapes:
        try:
            sweep(name, variants, args.reps)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:300]})")
    print(f"total {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
