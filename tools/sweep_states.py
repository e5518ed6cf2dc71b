"""The tensor-core key-block states kernels (``gpu/tc/states.py``) on the GPU.

Usage (on a GPU):  PYTHONPATH=. python tools/sweep_states.py [--reps 20] [--fm 0] [--nper 1 4 8 16]

At the Wan2.1 shape's sizes (B*H = 12, Nk = 32760, D = 128, block_k = 64: Mk = 512 key
blocks, bf16 k and v): the median time of one ``launch_states_tc`` with the register
kernel (the default, ``SLA_NUMBA_STATES_KERNEL=registers``), the staged kernel
(``staged``: K and V by 16-byte cp.async, the result through shared memory) and the
pipelined kernel (``pipelined``: the same, ``--nper`` key blocks a CTA, the next block's
K and V in flight; default ``PIPE_BLOCKS``), for bf16
states (int16 bits: what ``SLA_NUMBA_STATES=auto`` gives bf16 inputs) and for fp32
states; each new kernel's output compared bit for bit with the register kernel's; the
effective bandwidth (k and v read, states written / time); and the cuBLAS floor of the
same product (``torch.bmm`` of φ(K_j)ᵀ (12·512, 128, 64) and V_j (12·512, 64, 128), bf16
out) measured in the same run. Under 60 s on an H200 (first run: the kernels compile, a
few seconds each).
"""

import argparse
import time

import numpy as np
import torch
from cuda_timing import cuda_time

from sla_numba.gpu._arrays import device_view
from sla_numba.gpu.tc import states as tcs


def main():
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bh", type=int, default=12)
    ap.add_argument("--nk", type=int, default=32760)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--bk", type=int, default=64)
    ap.add_argument("--fm", type=int, default=0, help="feature map: 0 softmax, 1 elu+1, 2 relu")
    ap.add_argument("--nper", type=int, nargs="*", default=[1, 4, 8, 16])
    args = ap.parse_args()
    BH, Nk, D, bk, fm = args.bh, args.nk, args.d, args.bk, args.fm
    Mk, W = -(-Nk // bk), D * D + D
    g = torch.Generator(device="cuda").manual_seed(0)
    k = (torch.randn(1, BH, Nk, D, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
    v = torch.randn(1, BH, Nk, D, device="cuda", generator=g).to(torch.bfloat16)
    kv = [device_view(x.view(torch.int16)) for x in (k, v)]
    print(f"B*H={BH} Nk={Nk} D={D} block_k={bk} (Mk={Mk}) fm={fm}")

    for dtype, esize in ((torch.int16, 2), (torch.float32, 4)):
        nbytes = 2 * BH * Nk * D * 2 + BH * Mk * W * esize
        name = "bf16 states" if dtype == torch.int16 else "fp32 states"
        outs = {}
        variants = [("registers", None), ("staged", None)]
        variants += [("pipelined", n) for n in args.nper]
        for variant, nper in variants:
            label = variant if nper is None else f"{variant} x{nper}"
            out = torch.full((1, BH, Mk, W), -1, dtype=dtype, device="cuda")
            view = device_view(out)

            def run(view=view, variant=variant, nper=nper):
                tcs.launch_states_tc(
                    "bf16", *kv, view, 1, BH, Nk, D, bk, fm, 0,
                    variant=variant, blocks_per_cta=nper,
                )  # fmt: skip

            try:
                ms = cuda_time(run, args.reps)
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile / fit
                print(f"{name} {label}: failed ({type(e).__name__}: {str(e)[:160]})")
                continue
            same = ""
            if "registers" in outs:
                ref = outs["registers"][0]
                eq = torch.equal(out.view(torch.int16), ref.view(torch.int16))
                same = ", same bits" if eq else ", DIFFERENT bits"
                same += f", {outs['registers'][1] / ms:.2f}x"
            outs[label] = (out, ms)
            print(f"{name} {label}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s{same}")
    # cuBLAS floor: the bf16 product φ(K_j)ᵀ · V_j of every block (one bmm, bf16 out)
    pad = Mk * bk - Nk
    kp = torch.nn.functional.pad(torch.relu(k[0]), (0, 0, 0, pad)).reshape(BH * Mk, bk, D)
    vp = torch.nn.functional.pad(v[0], (0, 0, 0, pad)).reshape(BH * Mk, bk, D)
    at = kp.transpose(1, 2)
    floor = cuda_time(lambda: torch.bmm(at, vp), args.reps)
    print(f"cuBLAS floor torch.bmm bf16 ({BH * Mk} x {D}x{bk} @ {bk}x{D}): {floor:.3f} ms")
    print(f"total {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
