"""Would bf16 linear-branch states keep the GPU suite's accuracy rule? A CPU emulation.

Usage:  PYTHONPATH=. python tools/states_precision.py [--n 4096] [--heads 2] [--d 128 64]

The tensor-core path keeps the per-key-block states ``h_j = φ(K_j)ᵀ V_j``, ``z_j`` in fp32
and reads them as two bf16 products (hi + lo) in the marginal sums: issue 10 asks whether
bf16 states (one product, half the bytes) would still meet the rule of the GPU suite
(``tests/gpu/test_paths.py``): the output's error against float64 at most 2x the error
of the same SLA computed by torch in bf16 (``sla_reference`` on bf16 tensors).

This emulates the kernels' arithmetic in float64 with explicit roundings, per variant:
states rounded to fp32 (today) or to bf16 (the proposal), then the marginal sums and O_l
in fp32, the outputs rounded to bf16 and added in bf16 as the torch path does
(``o = o_s + o_l``, optionally through a projection ``w`` as the suite's test does).
O_s is exact (float64, rounded to bf16): only the linear branch's precision varies.
bf16 inputs (random normal), block map from ``classify_reference`` (topk / skip).
Prints the relative error (Frobenius) of o and of o_l for each variant and for torch bf16.
It is an emulation, not the kernels: the GPU suite decides (see the note of issue 10).
"""

import argparse

import torch

from sla_numba import _params
from sla_numba.reference import classify_reference, feature_map_fn, sla_reference


def bf16(x):
    return x.to(torch.float32).to(torch.bfloat16).to(torch.float64)


def f32(x):
    return x.to(torch.float32).to(torch.float64)


def rel(a, ref):
    return ((a - ref).norm() / ref.norm()).item()


def linear_branch(q, k, v, bm, blk, phi, state_round, eps=_params.EPS):
    """O_l of the kernels with the states rounded by ``state_round`` (float64 result)."""
    B, H, N, D = q.shape
    M = N // blk
    fq = f32(phi(q))  # φ in fp32
    fk = f32(phi(k))
    kb = fk.reshape(B, H, M, blk, D)
    vb = v.reshape(B, H, M, blk, D)
    h = state_round(f32(torch.einsum("bhjrd,bhjre->bhjde", kb, vb)))  # (B, H, M, D, D)
    z = state_round(f32(kb.sum(dim=3)))  # (B, H, M, D)
    marg = (bm == 0).to(torch.float64)  # (B, H, Mq, Mk)
    hi = f32(torch.einsum("bhij,bhjde->bhide", marg, h))  # H_i, summed in fp32
    zi = f32(torch.einsum("bhij,bhjd->bhid", marg, z))
    qb = fq.reshape(B, H, M, blk, D)
    num = torch.einsum("bhird,bhide->bhire", qb, hi)
    den = torch.einsum("bhird,bhid->bhir", qb, zi)[..., None] + eps
    return f32(num / den).reshape(B, H, N, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--d", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--skip", type=float, default=0.10)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    blk, N = args.block, args.n
    assert N % blk == 0, "--n a multiple of --block"
    phi = feature_map_fn("softmax")
    print(f"N={N} H={args.heads} block={blk} topk={args.topk} skip={args.skip}, softmax φ")
    for D in args.d:
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            q, k, v = (
                bf16(torch.randn(1, args.heads, N, D, generator=g, dtype=torch.float64))
                for _ in range(3)
            )
            w = 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
            bm = classify_reference(q, k, topk=args.topk, skip=args.skip, block_q=blk, block_k=blk)
            _, o_s, o_l = sla_reference(q, k, v, bm, block_q=blk, block_k=blk)
            mine = linear_branch(q, k, v, bm, blk, phi, lambda x: x)
            assert rel(mine, o_l) < 1e-5, "the emulation's O_l must match the reference"
            t_bf = [x.to(torch.bfloat16) for x in (q, k, v)]
            _, ts, tl = sla_reference(*t_bf, bm, block_q=blk, block_k=blk)
            ts, tl = ts.double(), tl.double()
            for proj in (None, w):

                def out(a_s, a_l, low, proj=proj):
                    if proj is None:
                        return low(low(a_s) + low(a_l))
                    return low(low(a_s) + low(low(a_l) @ low(proj).T))

                exact = out(o_s, o_l, lambda x: x)
                e_torch = rel(out(ts, tl, bf16), exact)
                row = [f"D={D} seed={seed} proj={'w' if proj is not None else '-'}:"]
                row.append(f"torch bf16 {e_torch:.2e}")
                for name, rnd in (("fp32 states", f32), ("bf16 states", bf16)):
                    ol = linear_branch(q, k, v, bm, blk, phi, rnd)
                    e = rel(out(bf16(o_s), ol, bf16), exact)
                    row.append(
                        f"{name} {e:.2e} ({e / e_torch:.2f}x torch; o_l alone {rel(ol, o_l):.1e})"
                    )
                print("  ".join(row))


if __name__ == "__main__":
    main()
