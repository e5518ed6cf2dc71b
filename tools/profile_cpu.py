"""Per-stage CPU times of the Numba CPU kernels (forward and backward), one process.

    python tools/profile_cpu.py --threads 1 --rounds 3

Shape and sparsity as ``benchmarks/bench_cpu.py`` (B1 H4 N4096 D64 fp32, topk 0.05,
skip 0.10, block 64). Each stage is run in its own small ``prange`` harness over the
same blocks the kernel visits, so the stages add up to (about) the kernel. Reported:
process CPU time (all threads) per call, minimum of ``--calls`` calls, minimum over
``--rounds`` rounds; rounds interleave the stages, so a busy machine slows all alike.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import importlib  # noqa: E402

import numba  # noqa: E402
from numba import njit, prange  # noqa: E402

from sla_numba import cpu  # noqa: E402
from sla_numba._params import block_counts, n_blocks  # noqa: E402
from sla_numba.cpu import _common  # noqa: E402

# the modules (sla_numba.cpu re-exports functions of the same names)
fw = importlib.import_module("sla_numba.cpu.forward")
bw = importlib.import_module("sla_numba.cpu.backward")


@njit(parallel=True)
def _fwd_sparse(q, k, v, block_map, bq, bk, scale, o_s, lse):
    B, H, Nq, D = q.shape
    Mq, Mk = block_map.shape[2], block_map.shape[3]
    for t in prange(B * H * Mq):
        b, h, i = t // (H * Mq), (t // Mq) % H, t % Mq
        r0 = i * bq
        nr = min(bq, Nq - r0)
        blocks = np.empty(Mk, np.int64)
        n = _common.blocks_in_row(block_map, b, h, i, 1, blocks)
        fw._sparse_block(
            q[b, h], k[b, h], v[b, h], r0, nr, blocks, n, bk, scale, o_s[b, h], lse[b, h]
        )


@njit(parallel=True)
def _fwd_linear(q, block_map, bq, phi, eps, kv_h, kv_z, tot_h, tot_z, finite, o_l):
    B, H, Nq, D = q.shape
    Mq = block_map.shape[2]
    for t in prange(B * H * Mq):
        b, h, i = t // (H * Mq), (t // Mq) % H, t % Mq
        r0 = i * bq
        nr = min(bq, Nq - r0)
        kv = (kv_h[b, h], kv_z[b, h], tot_h[b, h], tot_z[b, h], finite[b, h])
        fw._linear_block(q[b, h], kv, block_map[b, h, i], r0, nr, phi, eps, o_l[b, h])


@njit(parallel=True)
def _sum_marginal_rows(block_map, kv_h, kv_z, tot_h, tot_z, finite):
    B, H, Mq, Mk = block_map.shape
    D = kv_z.shape[3]
    s = 0.0
    for t in prange(B * H * Mq):
        b, h, i = t // (H * Mq), (t // Mq) % H, t % Mq
        hs = np.empty((D, D), kv_h.dtype)
        zs = np.empty(D, kv_h.dtype)
        _common.sum_marginal(
            kv_h[b, h],
            kv_z[b, h],
            tot_h[b, h],
            tot_z[b, h],
            finite[b, h],
            block_map[b, h, i],
            hs,
            zs,
        )
        s += hs[0, 0]
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--only", default="", help="comma-separated substrings of stage names")
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    B, H, N, D, blk = 1, 4, args.n, 64, 64
    q, k, v, do = (rng.standard_normal((B, H, N, D), dtype=np.float32) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    n_crit, n_skip = block_counts(n_blocks(N, blk), 0.05, 0.10)
    bmap = cpu.classify(q, k, n_crit, n_skip, blk, blk, scale)
    phi, eps = 0, 1e-6
    f32 = np.float32
    o_s, o_l, lse = cpu.forward(q, k, v, bmap, blk, blk, scale, phi, eps)
    kv = _common.linear_states(k, v, blk, phi)
    tmp_o = np.empty_like(q)
    tmp_l = np.empty_like(lse)
    stages = {
        "fwd: linear_states": lambda: _common.linear_states(k, v, blk, phi),
        "fwd: sparse branch": lambda: _fwd_sparse(
            q, k, v, bmap, blk, blk, f32(scale), tmp_o, tmp_l
        ),
        "fwd: linear branch": lambda: _fwd_linear(q, bmap, blk, phi, f32(eps), *kv, tmp_o),
        "fwd: sum_marginal only": lambda: _sum_marginal_rows(bmap, *kv),
        "cpu.forward": lambda: cpu.forward(q, k, v, bmap, blk, blk, scale, phi, eps),
        "cpu.backward": lambda: cpu.backward(
            q, k, v, o_s, o_l, lse, do, do, bmap, blk, blk, scale, phi, eps
        ),
    }
    stages.update(backward_stages(q, k, v, o_s, o_l, lse, do, bmap, blk, scale, phi, eps))
    if args.only:
        stages = {n: f for n, f in stages.items() if any(w in n for w in args.only.split(","))}
    best = {name: math.inf for name in stages}
    wall = {name: math.inf for name in stages}
    for fn in stages.values():
        fn()  # compile / warm
    for _ in range(args.rounds):
        for name, fn in stages.items():
            for _ in range(args.calls):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                best[name] = min(best[name], time.process_time() - c0)
                wall[name] = min(wall[name], time.perf_counter() - w0)
    print(
        f"threads {args.threads}, load {os.getloadavg()[0]:.2f}; process CPU ms, min of "
        f"{args.rounds} x {args.calls} (min wall ms)"
    )
    for name, t in best.items():
        print(f"  {name:32s} {1e3 * t:8.2f}  ({1e3 * wall[name]:.2f})")


def backward_stages(q, k, v, o_s, o_l, lse, do, bmap, blk, scale, phi, eps):
    """The backward's kernels one by one, on the inputs ``cpu.backward`` builds."""
    B, H, Nq, D = q.shape
    Mq = bmap.shape[2]
    f32 = np.float32
    delta_s = np.empty((B, H, Nq), f32)
    delta_l = np.empty((B, H, Nq), f32)
    kv = _common.linear_states(k, v, blk, phi)
    crit_ptr, crit_idx = _common.column_index(bmap, 1)
    dq = np.empty_like(q)
    qo = np.empty((B, H, Mq, D, D), f32)
    qd = np.empty((B, H, Mq, D), f32)
    qt = np.empty((B, H, Mq, D, blk), f32)
    dot = np.empty((B, H, Mq, D, blk), f32)

    def dq_kernel():
        bw._dq_kernel(
            q,
            k,
            v,
            o_s,
            o_l,
            lse,
            do,
            do,
            delta_s,
            delta_l,
            bmap,
            bmap,
            blk,
            blk,
            scale,
            phi,
            eps,
            *kv,
            dq,
            qo,
            qd,
            qt,
            dot,
        )

    dq_kernel()
    tot_qo = np.empty((B, H, D, D), np.float64)
    tot_qd = np.empty((B, H, D), np.float64)
    fin = np.empty((B, H), np.bool_)
    _common.block_totals(qo, qd, tot_qo, tot_qd, fin)
    dk = np.empty_like(k)
    dv = np.empty_like(v)

    def dkdv_kernel():
        bw._dkdv_kernel(
            q,
            k,
            v,
            lse,
            do,
            delta_s,
            bmap,
            bmap,
            blk,
            blk,
            scale,
            phi,
            crit_ptr,
            crit_idx,
            qo,
            qd,
            tot_qo,
            tot_qd,
            fin,
            qt,
            dot,
            dk,
            dv,
        )

    return {
        "bwd: dq kernel": dq_kernel,
        "bwd: block_totals(qo)": lambda: _common.block_totals(qo, qd, tot_qo, tot_qd, fin),
        "bwd: dkdv kernel": dkdv_kernel,
        "bwd: dkdv sparse only": lambda: _dkdv_sparse(
            q, k, v, lse, do, qt, dot, delta_s, blk, f32(scale), crit_ptr, crit_idx, dk, dv
        ),
        "bwd: dkdv linear only": lambda: _dkdv_linear(
            k, v, bmap, blk, phi, qo, qd, tot_qo, tot_qd, fin, dk, dv
        ),
        "bwd: dq sparse only": lambda: _dq_sparse(
            qt, dot, k, v, lse, delta_s, bmap, blk, f32(scale), dq
        ),
        "bwd: dq linear only": lambda: _dq_linear(
            q, bmap, do, delta_l, blk, phi, f32(eps), *kv, dq, qo, qd
        ),
    }


@njit(parallel=True)
def _dkdv_sparse(q, k, v, lse, do, qt, dot, delta_s, blk, scale, crit_ptr, crit_idx, dk, dv):
    B, H, Nk, D = k.shape
    Mk = Nk // blk
    for t in prange(B * H * Mk):
        b, h, j = t // (H * Mk), (t // Mk) % H, t % Mk
        c0 = j * blk
        dkb = dk[b, h, c0 : c0 + blk]
        dvb = dv[b, h, c0 : c0 + blk]
        bw._sparse_dkdv_block(
            q[b, h],
            k[b, h],
            v[b, h],
            do[b, h],
            qt[b, h],
            dot[b, h],
            lse[b, h],
            delta_s[b, h],
            c0,
            blk,
            crit_idx[crit_ptr[t] : crit_ptr[t + 1]],
            blk,
            scale,
            dkb,
            dvb,
        )


@njit(parallel=True)
def _dkdv_linear(k, v, bmap, blk, phi, qo, qd, tot_qo, tot_qd, fin, dk, dv):
    B, H, Nk, D = k.shape
    Mk = Nk // blk
    for t in prange(B * H * Mk):
        b, h, j = t // (H * Mk), (t // Mk) % H, t % Mk
        c0 = j * blk
        dkb = dk[b, h, c0 : c0 + blk]
        dvb = dv[b, h, c0 : c0 + blk]
        qs = (qo[b, h], qd[b, h], tot_qo[b, h], tot_qd[b, h], fin[b, h])
        bw._linear_dkdv_block(k[b, h], v[b, h], qs, bmap[b, h, :, j], c0, blk, phi, dkb, dvb)


@njit(parallel=True)
def _dq_sparse(qt, dot, k, v, lse, delta_s, bmap, blk, scale, dq):
    B, H, Nq, D = k.shape
    Mq, Mk = bmap.shape[2], bmap.shape[3]
    for t in prange(B * H * Mq):
        b, h, i = t // (H * Mq), (t // Mq) % H, t % Mq
        r0 = i * blk
        blocks = np.empty(Mk, np.int64)
        n = _common.blocks_in_row(bmap, b, h, i, 1, blocks)
        bw._sparse_dq_block(
            qt[b, h, i],
            dot[b, h, i],
            k[b, h],
            v[b, h],
            lse[b, h],
            delta_s[b, h],
            r0,
            blk,
            blocks,
            n,
            blk,
            scale,
            dq[b, h, r0 : r0 + blk],
        )


@njit(parallel=True)
def _dq_linear(q, bmap, do, delta_l, blk, phi, eps, kv_h, kv_z, tot_h, tot_z, fin, dq, qo, qd):
    B, H, Nq, D = q.shape
    Mq = bmap.shape[2]
    for t in prange(B * H * Mq):
        b, h, i = t // (H * Mq), (t // Mq) % H, t % Mq
        r0 = i * blk
        kv = (kv_h[b, h], kv_z[b, h], tot_h[b, h], tot_z[b, h], fin[b, h])
        bw._linear_dq_block(
            q[b, h],
            kv,
            bmap[b, h, i],
            do[b, h],
            delta_l[b, h],
            r0,
            blk,
            phi,
            eps,
            dq[b, h, r0 : r0 + blk],
            qo[b, h, i],
            qd[b, h, i],
        )


if __name__ == "__main__":
    main()
