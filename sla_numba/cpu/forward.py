"""SLA forward on the CPU: a sparse (softmax) branch and a linear branch per query block.

Inputs: ``q`` (B, H, Nq, D), ``k``/``v`` (B, H, Nk, D), the int8 block map
(B, H, Mq, Mk). Outputs: ``o_s``, ``o_l`` (B, H, Nq, D) and ``lse`` (B, H, Nq),
all in the input dtype (float32 or float64, which is also the accumulation dtype).

Step by step
------------
0. Linear-branch states, once per call (``_common.linear_states``, parallel over
   (b, h, j)): ``h_j = φ(K_j)ᵀ V_j`` (D, D) and ``z_j = Σ_rows φ(K_j)`` (D) over the
   valid rows of key block j, and their float64 totals over j.
   Workspace O(B·H·Mk·D²).
1. One ``prange`` over every (b, h, query block i). For block i (rows r0..r0+nr):
2. Sparse branch (``_sparse_block``), FlashAttention-2 style over the critical
   key blocks C_i only, read from row i of the map in ascending order:
     S   = (scale·Q_i) K_cᵀ                      (nr, nk)
     m'  = max(m, rowmax S);  α = exp(m − m');  P = exp(S − m')
     l   = α·l + rowsum P;    O = α·O + P V_c;  m = m'
   finally ``O_s = O / l`` and ``lse = m + log l``. (The code keeps S and P
   transposed — queries along the contiguous axis — see ``_sparse_block``; O is
   built in place in the output rows.)
   A query block with no critical key block gets ``O_s = 0``, ``lse = LSE_EMPTY``.
3. Linear branch (``_linear_block``): with Mg_i the marginal key blocks of row i,
     H_i = Σ_{j∈Mg_i} h_j,  Z_i = Σ_{j∈Mg_i} z_j        (``_common.sum_marginal``)
     O_l[r] = φ(q_r) H_i / (φ(q_r)·Z_i + eps)
   and ``O_l = 0`` when Mg_i is empty.

How H_i is summed: with the default topk/skip about 55 of 64 blocks are
marginal, so "total − critical − negligible" reads 6x fewer D×D blocks than the
direct sum (which cost ~15 % of the forward). Cancellation is avoided by doing
it in float64 (the totals too) and rounding H_i once; when a row has more
non-marginal than marginal blocks, or when some block is inf/NaN (then the
totals are not finite), the marginal blocks are added directly instead, so an
inf in a critical block never leaks into O_l.

Every output element is written; memory is O(N·D + blocks·D²) — the largest
scratch is one (block_k, block_q) score tile per thread.
"""

import math

import numpy as np
from numba import njit, prange

from .._arrays import np_empty
from .._params import LSE_EMPTY
from ._common import (
    KERNEL_OPTIONS,
    blocks_in_row,
    column_max,
    fast_exp,
    feature_map_block_t,
    fill2d,
    gemm_set,
    gemm_tn_acc,
    gemm_tn_set,
    linear_map,
    linear_states,
    prefer_full_width,
    sum_marginal,
    transpose_block,
)


@njit(**KERNEL_OPTIONS)
def _sparse_block(qh, kh, vh, r0, nr, crit, n_crit, block_k, scale, o, lse):
    """Online softmax of query rows r0..r0+nr over the key blocks ``crit[:n_crit]``.

    qh: (Nq, D), kh/vh: (Nk, D) — one (b, h); o: (Nq, D) and lse: (Nq,) outputs.
    Tiles are held transposed, keys along rows and queries along the contiguous
    axis: ``Sᵀ = K_c (scale·Q_i)ᵀ`` needs no copy of K, and the per-query running
    max, sum and rescaling become element-wise loops over a contiguous row, which
    LLVM vectorises (a max *reduction* along a row would not vectorise without
    the ``nnan`` flag we deliberately leave out).
    """
    prefer_full_width()
    Nk, D = kh.shape
    dt = qh.dtype.type
    zero = dt(0)
    one = dt(1)
    ob = o[r0 : r0 + nr]
    if n_crit == 0:
        fill2d(ob, nr, D, zero)
        for r in range(nr):
            lse[r0 + r] = LSE_EMPTY
        return

    qst = np.empty((D, nr), qh.dtype)  # (scale·Q_i)ᵀ
    transpose_block(qh, r0, nr, D, scale, qst)
    st = np.empty((block_k, nr), qh.dtype)  # Sᵀ, then Pᵀ
    m = np.full(nr, -np.inf, qh.dtype)  # running max per query
    l = np.zeros(nr, qh.dtype)  # running sum of exp per query
    m_new = np.empty(nr, qh.dtype)
    alpha = np.empty(nr, qh.dtype)

    for n in range(n_crit):
        c0 = crit[n] * block_k
        nk = min(block_k, Nk - c0)
        gemm_set(kh[c0 : c0 + nk], qst, st, nk, nr, D)  # Sᵀ = K_c (scale·Q)ᵀ
        for r in range(nr):
            m_new[r] = m[r]
        column_max(st, nk, nr, m_new)  # m' = max(m, column max)
        for r in range(nr):  # α = exp(m − m'); 0 at first
            alpha[r] = fast_exp(m[r] - m_new[r])
            l[r] *= alpha[r]
            m[r] = m_new[r]
        for c in range(nk):  # Pᵀ = exp(Sᵀ − m'), l += Σ P
            sc = st[c]
            for r in range(nr):
                p = fast_exp(sc[r] - m[r])
                sc[r] = p
                l[r] += p
        # O ← α O + P V_c. O_i is built in place in the output rows. The first block
        # writes O = P V_c directly (the same bits as α·0 + P V_c: α is 0 there, or
        # NaN only where P is NaN too); later blocks skip the rows whose max did not
        # move (α = 1 exactly: multiplying by 1 changes nothing).
        if n == 0:
            gemm_tn_set(st, vh[c0 : c0 + nk], ob, nr, D, nk)
            continue
        for r in range(nr):
            a = alpha[r]
            if a != one:
                orow = ob[r]
                for d in range(D):
                    orow[d] *= a
        gemm_tn_acc(st, vh[c0 : c0 + nk], ob, nr, D, nk)

    for r in range(nr):  # O_s = O / l, lse = m + log l
        inv = one / l[r]
        orow = ob[r]
        for d in range(D):
            orow[d] *= inv
        lse[r0 + r] = m[r] + math.log(l[r])


@njit(**KERNEL_OPTIONS)
def _linear_block(qh, kv, classes, r0, nr, phi, eps, o):
    """Linear attention of query rows r0..r0+nr over the marginal key blocks of ``classes``.

    qh: (Nq, D) — one (b, h); kv: that (b, h)'s linear states (see
    ``_common.linear_states``); classes: (Mk,) int8, row i of the block map;
    o: (Nq, D) output.
    """
    prefer_full_width()
    kv_h, kv_z, tot_h, tot_z, finite = kv
    D = qh.shape[1]
    dt = qh.dtype.type
    zero = dt(0)
    one = dt(1)
    ob = o[r0 : r0 + nr]
    hs = np.empty((D, D), qh.dtype)  # H_i
    zs = np.empty(D, qh.dtype)  # Z_i
    if sum_marginal(kv_h, kv_z, tot_h, tot_z, finite, classes, hs, zs) == 0:
        fill2d(ob, nr, D, zero)
        return  # no marginal block: O_l = 0
    fqt = np.empty((D, nr), qh.dtype)  # φ(Q_i)ᵀ
    feature_map_block_t(qh, r0, nr, fqt, phi)
    gemm_tn_set(fqt, hs, ob, nr, D, D)  # numerator φ(Q_i) H_i
    den = np.zeros(nr, qh.dtype)  # φ(q_r)·Z_i, d in order
    for d in range(D):
        fd = fqt[d]
        zd = zs[d]
        for r in range(nr):
            den[r] += fd[r] * zd
    for r in range(nr):
        inv = one / (den[r] + eps)
        orow = ob[r]
        for d in range(D):
            orow[d] *= inv


@njit(parallel=True, **KERNEL_OPTIONS)
def _forward_kernel(
    q,
    k,
    v,
    block_map,
    linear_map,
    block_q,
    block_k,
    scale,
    phi,
    eps,
    kv_h,
    kv_z,
    tot_h,
    tot_z,
    finite,
    o_s,
    o_l,
    lse,
):
    B, H, Nq, D = q.shape
    Mq, Mk = block_map.shape[2], block_map.shape[3]
    dt = q.dtype.type
    sc = dt(scale)
    ep = dt(eps)
    for t in prange(B * H * Mq):
        prefer_full_width()  # the prange body is a function of its own
        b = t // (H * Mq)
        h = (t // Mq) % H
        i = t % Mq
        r0 = i * block_q
        nr = min(block_q, Nq - r0)
        blocks = np.empty(Mk, np.int64)
        n_crit = blocks_in_row(block_map, b, h, i, 1, blocks)
        _sparse_block(
            q[b, h], k[b, h], v[b, h], r0, nr, blocks, n_crit, block_k, sc, o_s[b, h], lse[b, h]
        )
        kv = (kv_h[b, h], kv_z[b, h], tot_h[b, h], tot_z[b, h], finite[b, h])
        _linear_block(q[b, h], kv, linear_map[b, h, i], r0, nr, phi, ep, o_l[b, h])


def forward(q, k, v, block_map, block_q, block_k, scale, feature_map, eps, linear_scope=0):
    """SLA forward: ``(o_s, o_l, lse)`` for q (B, H, Nq, D), k/v (B, H, Nk, D).

    ``block_map`` (B, H, Mq, Mk) int8 is the authority on which key blocks are
    critical (1), marginal (0) or negligible (−1) for each query block.
    ``linear_scope`` 1 ("global"): the linear branch takes every key block.
    """
    B, H, Nq, D = q.shape
    kv = linear_states(k, v, block_k, int(feature_map))
    o_s = np_empty((B, H, Nq, D), q.dtype)
    o_l = np_empty((B, H, Nq, D), q.dtype)
    lse = np_empty((B, H, Nq), q.dtype)
    _forward_kernel(
        q,
        k,
        v,
        block_map,
        linear_map(block_map, linear_scope),
        block_q,
        block_k,
        float(scale),
        int(feature_map),
        float(eps),
        *kv,
        o_s,
        o_l,
        lse,
    )
    return o_s, o_l, lse
