"""SLA backward on the CPU (SLA_SPEC §3): dQ per query block, dK/dV per key block.

Inputs: ``q`` (B, H, Nq, D), ``k``/``v`` (B, H, Nk, D), the forward's ``o_s``,
``o_l`` (B, H, Nq, D) and ``lse`` (B, H, Nq), the output gradients ``do_s`` (= dO)
and ``do_l`` (= dO·W), and the block map (B, H, Mq, Mk). Outputs ``dq``, ``dk``,
``dv`` shaped like q, k, v. No atomics: every output block is owned by one
``prange`` iteration, which makes the result deterministic.

Step by step
------------
0. Preparation (small, parallel):
   * ``h_j = φ(K_j)ᵀ V_j``, ``z_j = Σ φ(K_j)`` per key block and their totals
     (``_common.linear_states``, as in the forward);
   * reverse index (``_common.column_index``, CSR): for every key block, the query
     blocks that mark it critical.
1. dQ kernel, one iteration per (b, h, query block i), after
   ``δs_r = O_s[r]·dO_s[r]`` and ``δl_r = O_l[r]·dO_l[r]`` for its rows (δs is kept
   for step 2):
   sparse, over the critical key blocks c of row i (recomputing P from lse):
     S = (scale·Q_i) K_cᵀ,  P = exp(S − lse),  dP = dO_s V_cᵀ,
     dS = P ⊙ (dP − δs),    dQ_i += scale · dS K_c
   linear, with H_i, Z_i the sums over the marginal blocks of row i and
   ``den_r = φ(q_r)·Z_i + eps``, ``ĉ_r = φ(q_r) / den_r``:
     dφ(q_r) = (dO_l[r] H_iᵀ − δl_r Z_i) / den_r, chained through φ into dQ_i;
     QO_i = Σ_r ĉ_rᵀ dO_l[r]  (D, D),  QD_i = Σ_r ĉ_r δl_r  (D)   — saved for step 2.
   It also keeps (scale·Q_i)ᵀ and dO_iᵀ (D, block_q) per query block for step 2,
   which would otherwise transpose them again for every key block that Q_i marks
   critical (workspace: twice the size of q).
2. dK/dV kernel, one iteration per (b, h, key block j):
   sparse, over the query blocks i that mark j critical (reverse index):
     P = exp((scale·Q_i) K_jᵀ − lse_i),  dV_j += Pᵀ dO_s,i,
     dS = P ⊙ (dO_s,i V_jᵀ − δs),        dK_j += scale · dSᵀ Q_i
   linear, over the query blocks that mark j marginal (column j of the map):
     dH_j = Σ_i QO_i,  dZ_j = Σ_i QD_i    (``_common.sum_marginal``, like H_i),
     dφ(k_c) = v_c dH_jᵀ − dZ_j  (chained through φ into dK_j),  dV[c] += φ(k_c) dH_j.

The sparse part recomputes S and P in both kernels (as FlashAttention-2 does
without atomics): about twice the forward's matrix products, on few blocks. As in
the forward, score tiles are kept transposed (keys along rows, queries along the
contiguous axis), so every product is one ``gemm_acc`` and every element-wise
step runs along a contiguous row.

Precision note: for a row whose softmax has a single key, dS = P(dP − δs) is
exactly 0, but dP and δs are float32 sums taken in different orders, so the
computed dS is rounding noise (≈1e-7 relative) — the same effect, and the same
size, as in PyTorch's own flash-attention backward.
"""

import numpy as np
from numba import njit, prange

from .._arrays import np_empty
from ._common import (
    KERNEL_OPTIONS,
    add_transposed,
    block_totals,
    blocks_in_row,
    column_index,
    fast_exp,
    feature_map_block_t,
    feature_map_grad_acc,
    feature_map_grad_block_t,
    feature_map_row,
    fill2d,
    gemm_acc,
    gemm_set,
    gemm_tn_acc,
    gemm_tn_set,
    linear_map,
    linear_states,
    prefer_full_width,
    sum_marginal,
    transpose_block,
    transpose_into,
)


@njit(**KERNEL_OPTIONS)
def _row_dots(x, y, r0, nr, out):
    """``out[r] = x[r] · y[r]`` for rows r0..r0+nr of x, y (N, D); out (N,)."""
    prefer_full_width()
    D = x.shape[1]
    zero = x.dtype.type(0)
    for r in range(r0, r0 + nr):
        xr = x[r]
        yr = y[r]
        acc = zero
        for d in range(D):
            acc += xr[d] * yr[d]
        out[r] = acc


@njit(**KERNEL_OPTIONS)
def _rows_transposed(x, r0, nr, factor, out):
    """``out[:, :nr] = factor · x[r0:r0+nr].T`` for x (N, D), out (D, ≥nr)."""
    transpose_block(x, r0, nr, x.shape[1], factor, out)


# --------------------------------------------------------------------------- dQ
@njit(**KERNEL_OPTIONS)
def _sparse_dq_block(qst, dot, kh, vh, lse, delta_s, r0, nr, crit, n_crit, block_k, scale, dqb):
    """``dqb += scale · Σ_c dS_c K_c`` over the critical key blocks of one query block.

    qst = (scale·Q_i)ᵀ and dot = dO_iᵀ: (D, ≥nr), made once per query block by the
    caller (the dK/dV kernel reuses them). Tiles are transposed (keys along rows,
    queries contiguous), as in the forward:
    Sᵀ = K_c (scale·Q_i)ᵀ, dPᵀ = V_c dO_iᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − δs), dQ_i += (dSᵀ)ᵀ K_c.
    """
    prefer_full_width()
    Nk, D = kh.shape
    if n_crit == 0:
        return
    st = np.empty((block_k, nr), kh.dtype)  # Sᵀ
    dst = np.empty((block_k, nr), kh.dtype)  # dPᵀ, then dSᵀ
    acc = np.empty((nr, D), kh.dtype)  # Σ dS K_c, scaled at the end
    lr = lse[r0 : r0 + nr]
    dr = delta_s[r0 : r0 + nr]
    for n in range(n_crit):
        c0 = crit[n] * block_k
        nk = min(block_k, Nk - c0)
        gemm_set(kh[c0 : c0 + nk], qst, st, nk, nr, D)  # Sᵀ
        gemm_set(vh[c0 : c0 + nk], dot, dst, nk, nr, D)  # dPᵀ = V dOᵀ
        for c in range(nk):
            sc = st[c]
            dc = dst[c]
            for r in range(nr):
                p = fast_exp(sc[r] - lr[r])
                dc[r] = p * (dc[r] - dr[r])  # dSᵀ
        if n == 0:  # acc = dS K_c (the same bits as 0 + dS K_c)
            gemm_tn_set(dst, kh[c0 : c0 + nk], acc, nr, D, nk)
        else:  # acc += dS K_c
            gemm_tn_acc(dst, kh[c0 : c0 + nk], acc, nr, D, nk)
    for r in range(nr):
        dq_r = dqb[r]
        acc_r = acc[r]
        for d in range(D):
            dq_r[d] += scale * acc_r[d]


@njit(**KERNEL_OPTIONS)
def _linear_dq_block(qh, kv, classes, do_l, delta_l, r0, nr, phi, eps, dqb, qo, qd):
    """Linear-branch part of dQ for one query block; also writes QO_i (D, D) and QD_i (D).

    kv: this (b, h)'s linear states (``_common.linear_states``); classes: (Mk,) int8,
    row i of the block map. Per token r, with ĉ_r = φ(q_r) / den_r:
        g_r = (dO_l[r] H_iᵀ − δl_r Z_i) / den_r,   dq_r += (∂φ/∂q_r)ᵀ g_r,
        QO_i = Σ_r ĉ_rᵀ dO_l[r],   QD_i = Σ_r ĉ_r δl_r.
    Everything per token is held transposed (D, nr), tokens along the contiguous
    axis, so the element-wise steps and φ's chain rule vectorise over tokens
    (``_linear_dq_block_reference`` is the per-token form); gᵀ = H_i dO_lᵀ is one
    product, and dQ gets the result through one transposed add.
    """
    prefer_full_width()
    kv_h, kv_z, tot_h, tot_z, finite = kv
    D = qh.shape[1]
    dt = qh.dtype.type
    zero = dt(0)
    one = dt(1)
    hs = np.empty((D, D), qh.dtype)  # H_i
    zs = np.empty(D, qh.dtype)  # Z_i
    if sum_marginal(kv_h, kv_z, tot_h, tot_z, finite, classes, hs, zs) == 0:
        fill2d(qo, D, D, zero)
        for d in range(D):
            qd[d] = zero
        return  # no marginal block: no linear term
    fqt = np.empty((D, nr), qh.dtype)  # φ(Q_i)ᵀ
    feature_map_block_t(qh, r0, nr, fqt, phi)
    inv = np.zeros(nr, qh.dtype)  # den_r = φ(q_r)·Z_i + eps, d in order; then 1/den_r
    for d in range(D):
        fd = fqt[d]
        zd = zs[d]
        for r in range(nr):
            inv[r] += fd[r] * zd
    for r in range(nr):
        inv[r] = one / (inv[r] + eps)
    dl = delta_l[r0 : r0 + nr]
    dolt = np.empty((D, nr), qh.dtype)  # dO_lᵀ
    _rows_transposed(do_l, r0, nr, one, dolt)
    gt = np.empty((D, nr), qh.dtype)
    gemm_set(hs, dolt, gt, D, nr, D)  # gᵀ = H_i dO_lᵀ  (g_r = dO_l[r] H_iᵀ)
    chat_t = np.empty((D, nr), qh.dtype)  # ĉᵀ
    for d in range(D):
        gd = gt[d]
        fd = fqt[d]
        cd = chat_t[d]
        zd = zs[d]
        acc = zero
        for r in range(nr):
            gd[r] = (gd[r] - dl[r] * zd) * inv[r]  # dφ(q_r)
            c = fd[r] * inv[r]
            cd[r] = c
            acc += c * dl[r]
        qd[d] = acc
    feature_map_grad_block_t(fqt, gt, nr, phi)  # gᵀ ← (∂φ/∂q)ᵀ gᵀ
    add_transposed(gt, dqb, nr)
    gemm_set(chat_t, do_l[r0 : r0 + nr], qo, D, D, nr)  # QO_i = Σ_r ĉ_rᵀ dO_l[r]


@njit(**KERNEL_OPTIONS)
def _linear_dq_block_reference(qh, kv, classes, do_l, delta_l, r0, nr, phi, eps, dqb, qo, qd):
    """``_linear_dq_block`` token by token (the readable form; tests compare the two)."""
    kv_h, kv_z, tot_h, tot_z, finite = kv
    D = qh.shape[1]
    dt = qh.dtype.type
    zero = dt(0)
    one = dt(1)
    fill2d(qo, D, D, zero)
    for d in range(D):
        qd[d] = zero
    hs = np.empty((D, D), qh.dtype)  # H_i
    zs = np.empty(D, qh.dtype)  # Z_i
    if sum_marginal(kv_h, kv_z, tot_h, tot_z, finite, classes, hs, zs) == 0:
        return
    fq = np.empty(D, qh.dtype)  # φ(q_r)
    g = np.empty(D, qh.dtype)
    for r in range(nr):
        x = qh[r0 + r]
        feature_map_row(x, fq, phi)
        den = zero
        for d in range(D):
            den += fq[d] * zs[d]
        inv = one / (den + eps)
        dl = delta_l[r0 + r]
        dor = do_l[r0 + r]
        for d in range(D):
            acc = zero
            for e in range(D):
                acc += dor[e] * hs[d, e]
            g[d] = (acc - dl * zs[d]) * inv  # dφ(q_r)
        for d in range(D):
            c = fq[d] * inv
            qd[d] += c * dl
            for e in range(D):
                qo[d, e] += c * dor[e]
        feature_map_grad_acc(x, fq, g, dqb[r], phi)


@njit(parallel=True, **KERNEL_OPTIONS)
def _dq_kernel(
    q,
    k,
    v,
    o_s,
    o_l,
    lse,
    do_s,
    do_l,
    delta_s,
    delta_l,
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
    dq,
    qo,
    qd,
    qt,
    dot,
):
    B, H, Nq, D = q.shape
    Mq, Mk = block_map.shape[2], block_map.shape[3]
    dt = q.dtype.type
    sc = dt(scale)
    ep = dt(eps)
    zero = dt(0)
    for t in prange(B * H * Mq):
        prefer_full_width()  # the prange body is a function of its own
        b = t // (H * Mq)
        h = (t // Mq) % H
        i = t % Mq
        r0 = i * block_q
        nr = min(block_q, Nq - r0)
        _row_dots(o_s[b, h], do_s[b, h], r0, nr, delta_s[b, h])  # δs, also for dK/dV
        _row_dots(o_l[b, h], do_l[b, h], r0, nr, delta_l[b, h])  # δl
        dqb = dq[b, h, r0 : r0 + nr]
        fill2d(dqb, nr, D, zero)
        # (scale·Q_i)ᵀ and dO_iᵀ, kept for the dK/dV kernel (which would otherwise
        # transpose them again for every key block that Q_i marks critical)
        _rows_transposed(q[b, h], r0, nr, sc, qt[b, h, i])
        _rows_transposed(do_s[b, h], r0, nr, dt(1), dot[b, h, i])
        blocks = np.empty(Mk, np.int64)
        n_crit = blocks_in_row(block_map, b, h, i, 1, blocks)
        _sparse_dq_block(
            qt[b, h, i],
            dot[b, h, i],
            k[b, h],
            v[b, h],
            lse[b, h],
            delta_s[b, h],
            r0,
            nr,
            blocks,
            n_crit,
            block_k,
            sc,
            dqb,
        )
        kv = (kv_h[b, h], kv_z[b, h], tot_h[b, h], tot_z[b, h], finite[b, h])
        _linear_dq_block(
            q[b, h],
            kv,
            linear_map[b, h, i],
            do_l[b, h],
            delta_l[b, h],
            r0,
            nr,
            phi,
            ep,
            dqb,
            qo[b, h, i],
            qd[b, h, i],
        )


# --------------------------------------------------------------------------- dK, dV
@njit(**KERNEL_OPTIONS)
def _sparse_dkdv_block(
    qh, kh, vh, do_s, qt, dot, lse, delta_s, c0, nk, rows, block_q, scale, dkb, dvb
):
    """Sparse-branch dK_j, dV_j over the query blocks ``rows`` that mark key block j critical.

    qt, dot: (Mq, D, block_q), (scale·Q_i)ᵀ and dO_iᵀ per query block (made by the
    dQ kernel). Works on transposed tiles (keys along rows), so that every product
    is a plain ``gemm_acc``: Sᵀ = K_j (scale·Q_i)ᵀ, dPᵀ = V_j dO_iᵀ, dV_j += Pᵀ dO_i,
    dK_j += dSᵀ Q_i.
    """
    prefer_full_width()
    Nq, D = qh.shape
    if rows.shape[0] == 0:
        return
    kb = kh[c0 : c0 + nk]
    vb = vh[c0 : c0 + nk]
    st = np.empty((nk, block_q), qh.dtype)  # Sᵀ, then Pᵀ
    dpt = np.empty((nk, block_q), qh.dtype)  # dPᵀ, then dSᵀ
    acc = np.empty((nk, D), qh.dtype)  # Σ dSᵀ Q, scaled at the end
    for n in range(rows.shape[0]):
        i = rows[n]
        r0 = i * block_q
        nr = min(block_q, Nq - r0)
        qb = qh[r0 : r0 + nr]
        dob = do_s[r0 : r0 + nr]
        gemm_set(kb, qt[i], st, nk, nr, D)  # Sᵀ = K_j (scale·Q_i)ᵀ
        gemm_set(vb, dot[i], dpt, nk, nr, D)  # dPᵀ = V_j dO_iᵀ
        lr = lse[r0 : r0 + nr]
        dr = delta_s[r0 : r0 + nr]
        for c in range(nk):
            sc = st[c]
            dpc = dpt[c]
            for r in range(nr):
                p = fast_exp(sc[r] - lr[r])
                sc[r] = p
                dpc[r] = p * (dpc[r] - dr[r])  # dSᵀ
        gemm_acc(st, dob, dvb, nk, D, nr)  # dV += Pᵀ dO
        if n == 0:  # acc = dSᵀ Q (the same bits as 0 + dSᵀ Q)
            gemm_set(dpt, qb, acc, nk, D, nr)
        else:  # acc += dSᵀ Q
            gemm_acc(dpt, qb, acc, nk, D, nr)
    for c in range(nk):
        for d in range(D):
            dkb[c, d] += scale * acc[c, d]


@njit(**KERNEL_OPTIONS)
def _linear_dkdv_block(kh, vh, qstates, classes, c0, nk, phi, dkb, dvb):
    """Linear-branch dK_j, dV_j from the query blocks that mark key block j marginal.

    qstates: ``(qo, qd, tot_qo, tot_qd, finite)`` of this (b, h) — QO_i, QD_i per
    query block and their float64 totals; classes: (Mq,) int8, column j of the map.
    Per key c: dV[c] += φ(k_c) dH_j, dk_c += (∂φ/∂k_c)ᵀ (v_c dH_jᵀ − dZ_j). As in
    ``_linear_dq_block``, φ(K_j) and the chain rule are held transposed (keys along
    the contiguous axis, vectorised over keys); ``_linear_dkdv_block_reference`` is
    the per-key form.
    """
    prefer_full_width()
    qo, qd, tot_qo, tot_qd, finite = qstates
    D = kh.shape[1]
    dh = np.empty((D, D), kh.dtype)  # dH_j
    dz = np.empty(D, kh.dtype)  # dZ_j
    if sum_marginal(qo, qd, tot_qo, tot_qd, finite, classes, dh, dz) == 0:
        return
    yt = np.empty((D, nk), kh.dtype)  # φ(K_j)ᵀ
    feature_map_block_t(kh, c0, nk, yt, phi)
    gemm_tn_acc(yt, dh, dvb, nk, D, D)  # dV[c] += φ(k_c) dH_j
    vt = np.empty((D, nk), kh.dtype)  # V_jᵀ
    transpose_into(vh[c0 : c0 + nk], vt, nk, D)
    gt = np.empty((D, nk), kh.dtype)
    gemm_set(dh, vt, gt, D, nk, D)  # gᵀ = dH_j V_jᵀ  (g_c = v_c dH_jᵀ)
    for d in range(D):
        gd = gt[d]
        zd = dz[d]
        for c in range(nk):
            gd[c] -= zd  # dφ(k_c)
    feature_map_grad_block_t(yt, gt, nk, phi)
    add_transposed(gt, dkb, nk)


@njit(**KERNEL_OPTIONS)
def _linear_dkdv_block_reference(kh, vh, qstates, classes, c0, nk, phi, dkb, dvb):
    """``_linear_dkdv_block`` key by key (the readable form; tests compare the two)."""
    qo, qd, tot_qo, tot_qd, finite = qstates
    D = kh.shape[1]
    dh = np.empty((D, D), kh.dtype)  # dH_j
    dz = np.empty(D, kh.dtype)  # dZ_j
    if sum_marginal(qo, qd, tot_qo, tot_qd, finite, classes, dh, dz) == 0:
        return
    y = np.empty(D, kh.dtype)  # φ(k_c)
    g = np.empty(D, kh.dtype)
    zero = kh.dtype.type(0)
    for c in range(nk):
        feature_map_row(kh[c0 + c], y, phi)
        vc = vh[c0 + c]
        for d in range(D):
            acc = zero
            for e in range(D):
                acc += vc[e] * dh[d, e]
            g[d] = acc - dz[d]  # dφ(k_c)
        for d in range(D):
            for e in range(D):
                dvb[c, e] += y[d] * dh[d, e]
        feature_map_grad_acc(kh[c0 + c], y, g, dkb[c], phi)


@njit(parallel=True, **KERNEL_OPTIONS)
def _dkdv_kernel(
    q,
    k,
    v,
    lse,
    do_s,
    delta_s,
    block_map,
    linear_map,
    block_q,
    block_k,
    scale,
    phi,
    crit_ptr,
    crit_idx,
    qo,
    qd,
    tot_qo,
    tot_qd,
    finite,
    qt,
    dot,
    dk,
    dv,
):
    B, H, Nk, D = k.shape
    Mk = -(-Nk // block_k)
    dt = q.dtype.type
    sc = dt(scale)
    zero = dt(0)
    for t in prange(B * H * Mk):
        prefer_full_width()  # the prange body is a function of its own
        b = t // (H * Mk)
        h = (t // Mk) % H
        j = t % Mk
        c0 = j * block_k
        nk = min(block_k, Nk - c0)
        dkb = dk[b, h, c0 : c0 + nk]
        dvb = dv[b, h, c0 : c0 + nk]
        fill2d(dkb, nk, D, zero)
        fill2d(dvb, nk, D, zero)
        _sparse_dkdv_block(
            q[b, h],
            k[b, h],
            v[b, h],
            do_s[b, h],
            qt[b, h],
            dot[b, h],
            lse[b, h],
            delta_s[b, h],
            c0,
            nk,
            crit_idx[crit_ptr[t] : crit_ptr[t + 1]],
            block_q,
            sc,
            dkb,
            dvb,
        )
        qstates = (qo[b, h], qd[b, h], tot_qo[b, h], tot_qd[b, h], finite[b, h])
        _linear_dkdv_block(k[b, h], v[b, h], qstates, linear_map[b, h, :, j], c0, nk, phi, dkb, dvb)


def backward(
    q,
    k,
    v,
    o_s,
    o_l,
    lse,
    do_s,
    do_l,
    block_map,
    block_q,
    block_k,
    scale,
    feature_map,
    eps,
    linear_scope=0,
):
    """SLA backward: ``(dq, dk, dv)`` shaped like q (B, H, Nq, D), k and v (B, H, Nk, D).

    ``linear_scope`` 1 ("global"): the linear branch took every key block."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Mq = block_map.shape[2]
    dtype = q.dtype
    scale, phi, eps = float(scale), int(feature_map), float(eps)

    # 0. preparation
    delta_s = np_empty((B, H, Nq), dtype)
    delta_l = np_empty((B, H, Nq), dtype)
    kv = linear_states(k, v, block_k, phi)
    crit_ptr, crit_idx = column_index(block_map, 1)
    lin_map = linear_map(block_map, linear_scope)

    # 1. dQ (and the per-query-block linear terms QO_i, QD_i)
    dq = np_empty((B, H, Nq, D), dtype)
    qo = np_empty((B, H, Mq, D, D), dtype)
    qd = np_empty((B, H, Mq, D), dtype)
    qt = np_empty((B, H, Mq, D, block_q), dtype)  # (scale·Q_i)ᵀ per query block
    dot = np_empty((B, H, Mq, D, block_q), dtype)  # dO_sᵀ per query block
    _dq_kernel(
        q,
        k,
        v,
        o_s,
        o_l,
        lse,
        do_s,
        do_l,
        delta_s,
        delta_l,
        block_map,
        lin_map,
        block_q,
        block_k,
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

    # 2. dK, dV
    tot_qo = np.empty((B, H, D, D), np.float64)
    tot_qd = np.empty((B, H, D), np.float64)
    q_finite = np.empty((B, H), np.bool_)
    block_totals(qo, qd, tot_qo, tot_qd, q_finite)
    dk = np_empty((B, H, Nk, D), dtype)
    dv = np_empty((B, H, Nk, D), dtype)
    _dkdv_kernel(
        q,
        k,
        v,
        lse,
        do_s,
        delta_s,
        block_map,
        lin_map,
        block_q,
        block_k,
        scale,
        phi,
        crit_ptr,
        crit_idx,
        qo,
        qd,
        tot_qo,
        tot_qd,
        q_finite,
        qt,
        dot,
        dk,
        dv,
    )
    return dq, dk, dv
