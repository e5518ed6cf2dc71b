"""The tensor-core linear-branch forward kernels (``gpu/tc/linear.py``) on the GPU.

Usage (on a GPU):  PYTHONPATH=. python tools/sweep_linear.py [--reps 20] [--pipe 32,3 16,0 ...]

At the Wan2.1 shape's sizes (B*H = 12, Nq = 32760, D = 128, block_q = 64: Mq = 512 query
blocks, every block with marginal keys, bf16 q, fp32 states W = 128*128 + 128): the median
time of one ``launch_linear_forward_tc`` with the register-staged kernel (the default,
``SLA_NUMBA_LINEAR=registers``) and with the pipelined kernel for each ``--pipe
HK,MIN_CTAS`` (HK rows of H_i a chunk; MIN_CTAS the launch bound, 0 none), each output
compared bit for bit with the register kernel's; then both once more with lstate 4 bytes
past a 16-byte boundary (the pipelined kernel's scalar-load path); the effective
bandwidth of each (bytes read and written / time: H_i and Z_i fp32, q bf16, o_l fp32);
and the cuBLAS floor of the same product (``torch.bmm`` of φ(q) blocks (12·512, 64, 128)
and H_i (12·512, 128, 128), bf16) measured in the same run. Under 60 s on an H200
(first run: the kernels compile, a few seconds each).
"""

import argparse
import time

import numpy as np
import torch
from cuda_timing import cuda_time

from sla_numba.gpu._arrays import device_view
from sla_numba.gpu.tc import linear as tcl


def main():
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bh", type=int, default=12)
    ap.add_argument("--nq", type=int, default=32760)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--bq", type=int, default=64)
    ap.add_argument("--fm", type=int, default=0, help="feature map: 0 softmax, 1 elu+1, 2 relu")
    ap.add_argument(
        "--pipe",
        nargs="*",
        default=["32,3", "32,0", "16,0"],
        help="pipelined kernel configurations HK,MIN_CTAS_PER_SM (0: no launch bound) ...",
    )
    args = ap.parse_args()
    BH, Nq, D, bq, fm = args.bh, args.nq, args.d, args.bq, args.fm
    Mq, W = -(-Nq // bq), D * D + D
    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(1, BH, Nq, D, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
    qbits = q.view(torch.int16)
    # lstate inside a buffer with 4 spare floats: the aligned view starts at 0, the
    # misaligned one 4 bytes later (same values)
    buf = torch.empty(BH * Mq * W + 4, device="cuda")
    ls = torch.randn(1, BH, Mq, W, device="cuda", generator=g)
    ls[..., D * D :] = ls[..., D * D :].abs() * 8  # positive denominators
    n_marg = torch.ones(1, BH, Mq, dtype=torch.int32, device="cuda")
    nbytes = BH * Mq * W * 4 + BH * Nq * D * (2 + 4)
    print(
        f"B*H={BH} Nq={Nq} D={D} block_q={bq} (Mq={Mq}) fm={fm}: "
        f"{nbytes / 1e6:.0f} MB read + written a launch"
    )

    def measure(label, lstate, pipeline, hk=None, mb=None, ref=None):
        out = torch.full((1, BH, Nq, D), float("nan"), device="cuda")
        views = [device_view(x) for x in (qbits, lstate, n_marg, out)]

        def run():
            tcl.launch_linear_forward_tc(
                "bf16", *views, 1, BH, Nq, D, bq, fm, 1e-6, 0,
                hk=hk, pipeline=pipeline, min_blocks=mb,
            )  # fmt: skip

        try:
            ms = cuda_time(run, args.reps)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile / fit
            print(f"{label}: failed ({type(e).__name__}: {str(e)[:160]})")
            return None
        same = "" if ref is None else (
            ", same bits" if torch.equal(out.view(torch.int32), ref.view(torch.int32))
            else ", DIFFERENT bits"
        )  # fmt: skip
        print(f"{label}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s{same}")
        return out, ms

    for off in (0, 1):  # 16-byte aligned lstate, then 4 bytes off (scalar loads)
        lstate = buf[off : off + BH * Mq * W].view(1, BH, Mq, W)
        lstate.copy_(ls)
        tag = "" if off == 0 else " [lstate 4 bytes off 16]"
        base = measure(f"registers hk={tcl.GPU_HK}{tag}", lstate, False)
        if base is None:
            return
        specs = args.pipe if off == 0 else args.pipe[:1]
        for spec in specs:
            hk, mb = (int(x) for x in spec.split(","))
            rows = tcl.chunk_rows(D, hk)
            smem = tcl.pipelined_smem_bytes(D, bq, rows) / 1024
            measure(
                f"pipelined hk={rows} minCTA={mb or '-'} smem {smem:.1f} KiB{tag}",
                lstate,
                True,
                hk,
                mb,
                base[0],
            )
    # cuBLAS floor: the bf16 product φ(Q_i) · H_i of every block (one bmm)
    a = torch.relu(q).reshape(BH * Mq, bq, D) if Nq == Mq * bq else None
    if a is None:
        a = torch.zeros(BH * Mq * bq, D, dtype=torch.bfloat16, device="cuda")
        a.view(BH, Mq * bq, D)[:, :Nq] = torch.relu(q[0])
        a = a.view(BH * Mq, bq, D)
    h = ls[..., : D * D].reshape(BH * Mq, D, D).to(torch.bfloat16)
    floor = cuda_time(lambda: torch.bmm(a, h), args.reps)
    print(f"cuBLAS floor torch.bmm bf16 ({BH * Mq} x {bq}x{D} @ {D}x{D}): {floor:.3f} ms")
    print(f"total {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
