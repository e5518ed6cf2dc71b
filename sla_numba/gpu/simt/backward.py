"""The SIMT backward kernels: ``dq`` per query block and ``dkdv`` per key block.

The orchestration (which launches, in which order) and the algorithm are in
``sla_numba/gpu/backward.py``; compiled with ``sparse=False`` (the tensor-core path)
these kernels add only the linear branch's terms, in place.
"""

import functools
import math

from .._compat import FASTMATH, SIMULATOR, cuda, kernel
from .._precompile import kernel_factory
from .states import make_state_fn, prep_one_pass, prep_smem, state_rows
from .tiles import LOG2E, make_chain, make_common, make_mm, smem_sizes


def dkdv_rows(tiles):
    """Key rows a dK/dV sub-tile: fewer than BK so that dK and dV fit in registers."""
    if SIMULATOR:
        return tiles.BK
    per_thread = 2 if tiles.DP > 64 else 4
    return min(tiles.BK, tiles.TR * per_thread)


@functools.cache
@kernel_factory
def make_dq(tiles, sparse=True):
    """The dQ kernel. ``sparse=False`` (tensor-core path): no sparse loop, no δs;
    the linear contribution is *added* to ``dq`` (which holds the tensor cores' dQ)."""
    T = tiles
    SPARSE = bool(sparse)
    TR, TC, NT = T.TR, T.TC, T.NT
    BQ, BK, DP, DC, KC = T.BQ, T.BK, T.DP, T.DC, T.KC
    RQ, RK, RD = BQ // TR, BK // TC, T.RD
    LDQ, LDK = BQ + 1, BK + 1
    acc_t = T.acc_dtype.type
    SA, SB, SP, SRED, SROW = smem_sizes(T)
    mm_s = make_mm(TR, TC, RQ, RK, T.acc)
    mm_o = make_mm(TR, TC, RQ, RD, T.acc)
    chain = make_chain(TR, TC, RQ, RD, T.acc)
    # QO_i in one pass over the block's rows where registers allow (the linear-only
    # kernel of the tensor-core path has them to spare; see make_state_fn)
    ONE = (not SPARSE) and prep_one_pass(T)
    state_block = make_state_fn(T, ONE)
    RQS = state_rows(T, ONE)
    if ONE:
        SA = max(SA, prep_smem(T))
    ops = make_common(NT, T.acc)
    (
        load_t,
        load_n,
        phi_value,
        phi_slope,
        row_stats,
        load_phi_t,
        load_phi_n,
        load_state,
        to_acc,
    ) = ops.functions()
    lanes_max, lanes_sum = ops.row_reducers()
    LQ = max(1, NT // BQ)  # lanes a query row in the δs / δl / den sums
    GQ = NT // LQ  # row slots a pass (see tiles.make_common)
    zero = acc_t(0.0)
    one = acc_t(1.0)
    log2e = acc_t(LOG2E)

    @kernel(fastmath=FASTMATH)
    def sla_dq(
        q4,
        k4,
        v4,
        o_s4,
        o_l4,
        lse3,
        do_s4,
        do_l4,
        lstate4,
        crit4,
        info,
        nq,
        nk,
        block_q,
        block_k,
        scale,
        fm,
        eps,
        dq4,
        w_inv_den3,
        w_dl3,
        w_ds3,
        qstate4,
    ):
        sa = cuda.shared.array(SA, acc_t)
        sb = cuda.shared.array(SB, acc_t)
        sp = cuda.shared.array(SP, acc_t)
        sred = cuda.shared.array(SRED, acc_t)
        srow = cuda.shared.array(SROW, acc_t)
        sz = cuda.shared.array(DP, acc_t)  # Z_i
        sx = cuda.shared.array(SROW, acc_t)  # per row: δs, δl, 1/den, lse·log2 e
        s = cuda.local.array((RQ, RK), acc_t)
        dp = cuda.local.array((RQ, RK), acc_t)
        acc = cuda.local.array((RQ, RD), acc_t)
        zacc = cuda.local.array(RQ, acc_t)
        sacc = cuda.local.array((RQS, RD), acc_t)  # QO_i pass (one-pass variant)
        szacc = cuda.local.array(RQS, acc_t)

        t = cuda.threadIdx.x
        tr = t // TC
        tc = t - tr * TC
        lane = t % LQ
        slot = t // LQ
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        D = q4.shape[3]
        # one head's views (see forward.py)
        q, k, v = q4[b, h], k4[b, h], v4[b, h]
        o_s, o_l, lse = o_s4[b, h], o_l4[b, h], lse3[b, h]
        do_s, do_l = do_s4[b, h], do_l4[b, h]
        hz, qstate = lstate4[b, h, i], qstate4[b, h]  # hz: [vec(H_i), Z_i]
        crit = crit4[b, h, i]
        dq = dq4[b, h]
        w_inv_den, w_dl, w_ds = w_inv_den3[b, h], w_dl3[b, h], w_ds3[b, h]
        qs = acc_t(scale * LOG2E)
        sc = acc_t(scale)
        eps_a = acc_t(eps)
        n_crit = info[0, b, h, i]
        n_marg = info[1, b, h, i]
        q0 = i * block_q
        q1 = min(q0 + block_q, nq)

        if n_marg > 0:
            load_state(sz, 0, DP, False, hz, DP * DP, 1, DP, DP, t)
        # linear-only (tensor-core path) without marginal blocks: dq is already final
        q_end = q1 if (SPARSE or n_marg > 0) else q0
        for r0 in range(q0, q_end, BQ):
            nr = min(BQ, q1 - r0)
            cuda.syncthreads()
            row_stats(srow, q, r0, nr, D, BQ, t, fm, sred)  # ends with a barrier
            # per row: δs, δl, den over D, each row split over LQ lanes like
            # row_stats (partials summed through sred; all threads take part)
            for rb in range(0, BQ, GQ):
                r = rb + slot
                live = slot < GQ and r < nr
                ds = zero
                dl = zero
                den = zero
                if live:
                    n_row = r0 + r
                    mx = srow[4 * r]
                    inv = srow[4 * r + 1]
                    for d in range(lane, D, LQ):
                        if SPARSE:
                            ds += to_acc(o_s[n_row, d]) * to_acc(do_s[n_row, d])
                        dl += to_acc(o_l[n_row, d]) * to_acc(do_l[n_row, d])
                        if n_marg > 0:
                            den += phi_value(to_acc(q[n_row, d]), mx, inv, fm) * sz[d]
                if SPARSE:
                    ds = lanes_sum(sred, ds, t, LQ)
                dl = lanes_sum(sred, dl, t, LQ)
                if n_marg > 0:  # uniform: one block, one n_marg
                    den = lanes_sum(sred, den, t, LQ)
                if lane == 0 and slot < GQ and r < BQ:
                    inv_den = zero
                    lse2 = zero
                    if live:
                        n_row = r0 + r
                        inv_den = one / (den + eps_a)
                        if SPARSE:
                            lse2 = to_acc(lse[n_row]) * log2e
                            w_ds[n_row] = ds
                        w_dl[n_row] = dl
                        w_inv_den[n_row] = inv_den
                    sx[4 * r] = ds
                    sx[4 * r + 1] = dl
                    sx[4 * r + 2] = inv_den
                    sx[4 * r + 3] = lse2
            for a in range(RQ):
                for n in range(RD):
                    acc[a, n] = zero
            # ---- a) linear branch: dφ(q) = (dO_l H_iᵀ − δl Z_i) / den, then through φ
            if n_marg > 0:
                for e0 in range(0, DP, DC):
                    cuda.syncthreads()
                    load_t(sa, 0, LDQ, do_l, r0, nr, e0, D, BQ, DC, t, one)
                    # B[e][d] = H_i[d][e0 + e]
                    load_state(sb, 0, DP + 1, True, hz, e0, DP, DC, DP, t)
                    cuda.syncthreads()
                    mm_o(acc, sa, 0, LDQ, sb, 0, DP + 1, DC, tr, tc)
                for a in range(RQ):
                    row = tr + TR * a
                    for n in range(RD):
                        col = tc + TC * n
                        acc[a, n] = (acc[a, n] - sx[4 * row + 1] * sz[col]) * sx[4 * row + 2]
                chain(acc, q, r0, nr, D, sred, srow, fm, tr, tc)
            # ---- b) sparse branch over the critical key blocks (SIMT path only)
            if SPARSE:
                for ci in range(n_crit):
                    j = crit[ci]
                    k0 = j * block_k
                    k1 = min(k0 + block_k, nk)
                    for c0 in range(k0, k1, BK):
                        nc = min(BK, k1 - c0)
                        for a in range(RQ):
                            for n in range(RK):
                                s[a, n] = zero
                                dp[a, n] = zero
                        for d0 in range(0, DP, DC):
                            cuda.syncthreads()
                            load_t(sa, 0, LDQ, q, r0, nr, d0, D, BQ, DC, t, qs)
                            load_t(sb, 0, LDK, k, c0, nc, d0, D, BK, DC, t, one)
                            cuda.syncthreads()
                            mm_s(s, sa, 0, LDQ, sb, 0, LDK, DC, tr, tc)
                        for d0 in range(0, DP, DC):
                            cuda.syncthreads()
                            load_t(sa, 0, LDQ, do_s, r0, nr, d0, D, BQ, DC, t, one)
                            load_t(sb, 0, LDK, v, c0, nc, d0, D, BK, DC, t, one)
                            cuda.syncthreads()
                            mm_s(dp, sa, 0, LDQ, sb, 0, LDK, DC, tr, tc)
                        # scale · dS, stored transposed for dQ += (scale·dS) K
                        for a in range(RQ):
                            row = tr + TR * a
                            for n in range(RK):
                                col = tc + TC * n
                                g = zero
                                if col < nc and row < nr:
                                    p = math.exp2(s[a, n] - sx[4 * row + 3])
                                    g = p * (dp[a, n] - sx[4 * row]) * sc
                                sp[col * LDQ + row] = g
                        for kc0 in range(0, nc, KC):
                            nkc = min(KC, nc - kc0)
                            cuda.syncthreads()
                            load_n(sb, 0, DP, k, c0 + kc0, nkc, 0, D, KC, DP, t, one)
                            cuda.syncthreads()
                            mm_o(acc, sp, kc0 * LDQ, LDQ, sb, 0, DP, nkc, tr, tc)
            for a in range(RQ):
                row = tr + TR * a
                if row < nr:
                    for n in range(RD):
                        col = tc + TC * n
                        if col < D:
                            if SPARSE:
                                dq[r0 + row, col] = acc[a, n]
                            else:
                                dq[r0 + row, col] += acc[a, n]
        # ---- c) QO_i, QD_i: the query block's linear state with ĉ = φ(q)/den
        cuda.syncthreads()
        if n_marg > 0:
            if ONE:
                state_block(
                    q,
                    do_l,
                    q0,
                    q1,
                    D,
                    fm,
                    w_inv_den,
                    w_dl,
                    1,
                    qstate,
                    i,
                    sa,
                    sb,
                    srow,
                    sred,
                    sacc,
                    szacc,
                    t,
                    tr,
                    tc,
                )
            else:
                state_block(
                    q,
                    do_l,
                    q0,
                    q1,
                    D,
                    fm,
                    w_inv_den,
                    w_dl,
                    1,
                    qstate,
                    i,
                    sa,
                    sb,
                    srow,
                    sred,
                    acc,
                    zacc,
                    t,
                    tr,
                    tc,
                )
        else:
            for e in range(t, qstate.shape[1], NT):
                qstate[i, e] = zero

    return sla_dq


@functools.cache
@kernel_factory
def make_dkdv(tiles, sparse=True):
    """The dK/dV kernel. ``sparse=False`` (tensor-core path): no sparse loop; the
    linear contributions are *added* to ``dk`` / ``dv`` (the tensor cores' dK, dV)."""
    T = tiles
    SPARSE = bool(sparse)
    TR, TC, NT = T.TR, T.TC, T.NT
    BQ, DP, DC, KC = T.BQ, T.DP, T.DC, T.KC
    BKD = dkdv_rows(T)
    RKD, RQC, RD = BKD // TR, BQ // TC, T.RD
    LDQ, LDKD = BQ + 1, BKD + 1
    acc_t = T.acc_dtype.type
    SA, SB, SP, SRED, SROW = smem_sizes(T)
    mm_st = make_mm(TR, TC, RKD, RQC, T.acc)  # Sᵀ, dPᵀ  (BKD x BQ)
    mm_o = make_mm(TR, TC, RKD, RD, T.acc)  # dK, dV   (BKD x DP)
    chain = make_chain(TR, TC, RKD, RD, T.acc)
    ops = make_common(NT, T.acc)
    (
        load_t,
        load_n,
        phi_value,
        phi_slope,
        row_stats,
        load_phi_t,
        load_phi_n,
        load_state,
        to_acc,
    ) = ops.functions()
    zero = acc_t(0.0)
    one = acc_t(1.0)
    log2e = acc_t(LOG2E)

    @kernel(fastmath=FASTMATH)
    def sla_dkdv(
        q4,
        k4,
        v4,
        lse3,
        do_s4,
        crit4,
        info,
        w_ds3,
        nq,
        nk,
        block_q,
        block_k,
        scale,
        fm,
        dk4,
        dv4,
        dh4,
    ):
        sa = cuda.shared.array(SA, acc_t)
        sb = cuda.shared.array(SB, acc_t)
        sp = cuda.shared.array(SP, acc_t)
        sred = cuda.shared.array(SRED, acc_t)
        srow = cuda.shared.array(SROW, acc_t)
        sx = cuda.shared.array(SROW, acc_t)  # per query row: δs, lse·log2 e
        s = cuda.local.array((RKD, RQC), acc_t)
        dp = cuda.local.array((RKD, RQC), acc_t)
        gk = cuda.local.array((RKD, RD), acc_t)
        gv = cuda.local.array((RKD, RD), acc_t)

        t = cuda.threadIdx.x
        tr = t // TC
        tc = t - tr * TC
        j = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        D = q4.shape[3]
        q, k, v = q4[b, h], k4[b, h], v4[b, h]
        lse, do_s, w_ds = lse3[b, h], do_s4[b, h], w_ds3[b, h]
        dh = dh4[b, h, j]  # [vec(dH_j), dZ_j]
        crit = crit4[b, h, j]
        dk, dv = dk4[b, h], dv4[b, h]
        qs = acc_t(scale * LOG2E)
        sc = acc_t(scale)
        n_crit = info[0, b, h, j]
        n_marg = info[1, b, h, j]
        k0 = j * block_k
        k1 = min(k0 + block_k, nk)

        # linear-only (tensor-core path) without marginal queries: dk, dv are final
        k_end = k1 if (SPARSE or n_marg > 0) else k0
        for c0 in range(k0, k_end, BKD):
            nc = min(BKD, k1 - c0)
            cuda.syncthreads()
            row_stats(srow, k, c0, nc, D, BKD, t, fm, sred)  # sred free: barrier above
            for a in range(RKD):
                for n in range(RD):
                    gk[a, n] = zero
                    gv[a, n] = zero
            # ---- linear branch
            if n_marg > 0:
                # dφ(k_c) = v_c dH_jᵀ − dZ_j :  A[e][c] = V[c][e],  B[e][d] = dH[d][e]
                for e0 in range(0, DP, DC):
                    cuda.syncthreads()
                    load_t(sa, 0, LDKD, v, c0, nc, e0, D, BKD, DC, t, one)
                    for e in range(t, DC * DP, NT):
                        d = e // DC
                        ee = e - d * DC
                        sb[ee * (DP + 1) + d] = dh[d * DP + e0 + ee]
                    cuda.syncthreads()
                    mm_o(gk, sa, 0, LDKD, sb, 0, DP + 1, DC, tr, tc)
                for a in range(RKD):
                    for n in range(RD):
                        gk[a, n] -= dh[DP * DP + tc + TC * n]
                chain(gk, k, c0, nc, D, sred, srow, fm, tr, tc)
                # dV[c] += φ(k_c) dH_j :  A[e][c] = φ(k_c)[e],  B[e][d] = dH[e][d]
                for e0 in range(0, DP, DC):
                    cuda.syncthreads()
                    load_phi_t(sa, 0, LDKD, k, c0, nc, e0, D, BKD, DC, t, srow, fm)
                    for e in range(t, DC * DP, NT):
                        ee = e // DP
                        d = e - ee * DP
                        sb[ee * DP + d] = dh[(e0 + ee) * DP + d]
                    cuda.syncthreads()
                    mm_o(gv, sa, 0, LDKD, sb, 0, DP, DC, tr, tc)
            # ---- sparse branch over the query blocks that mark j critical (SIMT path only)
            if SPARSE:
                for ci in range(n_crit):
                    i = crit[ci]
                    qa = i * block_q
                    qb = min(qa + block_q, nq)
                    for r0 in range(qa, qb, BQ):
                        nr = min(BQ, qb - r0)
                        cuda.syncthreads()
                        for r in range(t, BQ, NT):
                            ds = zero
                            lse2 = zero
                            if r < nr:
                                ds = w_ds[r0 + r]
                                lse2 = to_acc(lse[r0 + r]) * log2e
                            sx[2 * r] = ds
                            sx[2 * r + 1] = lse2
                        for a in range(RKD):
                            for n in range(RQC):
                                s[a, n] = zero
                                dp[a, n] = zero
                        for d0 in range(0, DP, DC):
                            cuda.syncthreads()
                            load_t(sa, 0, LDKD, k, c0, nc, d0, D, BKD, DC, t, qs)
                            load_t(sb, 0, LDQ, q, r0, nr, d0, D, BQ, DC, t, one)
                            cuda.syncthreads()
                            mm_st(s, sa, 0, LDKD, sb, 0, LDQ, DC, tr, tc)
                        for d0 in range(0, DP, DC):
                            cuda.syncthreads()
                            load_t(sa, 0, LDKD, v, c0, nc, d0, D, BKD, DC, t, one)
                            load_t(sb, 0, LDQ, do_s, r0, nr, d0, D, BQ, DC, t, one)
                            cuda.syncthreads()
                            mm_st(dp, sa, 0, LDKD, sb, 0, LDQ, DC, tr, tc)
                        # Pᵀ -> sp[r][c];  keep scale·dSᵀ in s
                        for a in range(RKD):
                            row = tr + TR * a
                            for n in range(RQC):
                                col = tc + TC * n
                                p = zero
                                g = zero
                                if col < nr and row < nc:
                                    p = math.exp2(s[a, n] - sx[2 * col + 1])
                                    g = p * (dp[a, n] - sx[2 * col]) * sc
                                sp[col * LDKD + row] = p
                                s[a, n] = g
                        for rc0 in range(0, nr, KC):
                            nrc = min(KC, nr - rc0)
                            cuda.syncthreads()
                            load_n(sb, 0, DP, do_s, r0 + rc0, nrc, 0, D, KC, DP, t, one)
                            cuda.syncthreads()
                            mm_o(gv, sp, rc0 * LDKD, LDKD, sb, 0, DP, nrc, tr, tc)
                        cuda.syncthreads()
                        for a in range(RKD):
                            row = tr + TR * a
                            for n in range(RQC):
                                sp[(tc + TC * n) * LDKD + row] = s[a, n]
                        for rc0 in range(0, nr, KC):
                            nrc = min(KC, nr - rc0)
                            cuda.syncthreads()
                            load_n(sb, 0, DP, q, r0 + rc0, nrc, 0, D, KC, DP, t, one)
                            cuda.syncthreads()
                            mm_o(gk, sp, rc0 * LDKD, LDKD, sb, 0, DP, nrc, tr, tc)
            for a in range(RKD):
                row = tr + TR * a
                if row < nc:
                    for n in range(RD):
                        col = tc + TC * n
                        if col < D:
                            if SPARSE:
                                dk[c0 + row, col] = gk[a, n]
                                dv[c0 + row, col] = gv[a, n]
                            else:
                                dk[c0 + row, col] += gk[a, n]
                                dv[c0 + row, col] += gv[a, n]

    return sla_dkdv
