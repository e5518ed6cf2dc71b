"""Does storing the backward's query-block states in bf16 cost gradient accuracy? (GPU)

Usage (on a GPU):  PYTHONPATH=. python tools/grad_states_precision.py [--shape wan] [--dtype bf16]

``SLA_NUMBA_GRAD_STATES`` chooses how the linear-gradient kernel stores QO_i = Σ_r ĉ_rᵀ dO_l[r]
and QD_i (fp32, or bf16 bits that the column sums read as one bf16 product). This runs,
on the same inputs and the same block map, one forward + backward of ``sla_attention``

* in fp32 on the SIMT path (``backend="gpu"`` with fp32 copies of the inputs): the
  reference, ~2^-24 relative arithmetic;
* in ``--dtype`` on the tensor-core path with ``SLA_NUMBA_GRAD_STATES=fp32`` and with
  ``=bf16``;

and prints each gradient's relative error (Frobenius) against the reference. Beside them,
the error of the reference itself rounded to ``--dtype`` (the least error any result in
that dtype can have). bf16 grad states keep the accuracy when their errors stay close to
the fp32-states errors (the output's own rounding dominates both). Shapes: "wan"
(B1 H12 N32760 D128) or "b2" (B2 H16 N8192 D64), topk 0.05, skip 0.10, block 64.
About 10 s on an H200 after compilation.
"""

import argparse
import os

import torch

import sla_numba
from sla_numba import config

SHAPES = {"wan": (1, 12, 32760, 128), "b2": (2, 16, 8192, 64)}


def rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


def fwd_bwd(q, k, v, do, bm):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = sla_numba.sla_attention(*leaves, block_map=bm, backend="gpu")
    o.backward(do)
    torch.cuda.synchronize()
    return [o.detach()] + [x.grad for x in leaves]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="wan")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = ap.parse_args()
    B, H, N, D = SHAPES[args.shape]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", generator=g).to(dtype) for _ in range(4))
    bm = sla_numba.classify_blocks(q, k, topk=0.05, skip=0.10, backend="gpu").map
    ref = fwd_bwd(*(x.float() for x in (q, k, v, do)), bm)
    runs = {}
    old = os.environ.get(config.GRAD_STATES_VAR)
    try:
        for mode in ("fp32", "bf16"):
            os.environ[config.GRAD_STATES_VAR] = mode
            runs[mode] = fwd_bwd(q, k, v, do, bm)
    finally:
        if old is None:
            os.environ.pop(config.GRAD_STATES_VAR, None)
        else:
            os.environ[config.GRAD_STATES_VAR] = old
    print(f"shape {args.shape} (B{B} H{H} N{N} D{D}) {args.dtype}, topk 0.05 skip 0.10:")
    print("  relative error vs the fp32 SIMT result   o          dq         dk         dv")
    floor = [rel(r.to(dtype), r) for r in ref]
    print("  reference rounded to %-19s" % args.dtype + "".join(f"{e:11.3e}" for e in floor))
    for mode, res in runs.items():
        errs = [rel(a, r) for a, r in zip(res, ref)]
        print(f"  tc, grad states {mode:<22}" + "".join(f"{e:11.3e}" for e in errs))
    same = all(torch.equal(a, b) for a, b in zip(runs["fp32"][:1], runs["bf16"][:1]))
    print(f"  forward outputs identical under both: {same}")


if __name__ == "__main__":
    main()
