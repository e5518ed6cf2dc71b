"""The fused SIMT forward kernel: sparse FlashAttention over critical blocks + linear attention.

One CUDA block per (b, h, query block i), walking the block's rows in sub-tiles of
BQ rows (the orchestration is in ``sla_numba/gpu/forward.py``):

sparse branch (FlashAttention-2 over C_i only; fp32 accumulation)::

    m = -inf, l = 0, O = 0
    for j in C_i, for each key tile of BK rows of block j:
        S = (scale·log2 e) · Q Kᵀ              # d in chunks of DC through shared memory
        m' = max(m, rowmax S);  P = 2^(S - m')
        l = l·2^(m - m') + rowsum P;  O = O·2^(m - m') + P V;  m = m'
    O_s = O / l;   lse = ln 2 · (m + log2 l)   (natural log, for the backward)

A row with no critical block gets O_s = 0, lse = LSE_EMPTY.

linear branch::

    O_l = φ(Q) H_i / (φ(Q)·Z_i + eps)      (0 with no marginal block)

H_i (the row sums of ``simt/marginal.py`` or ``tc/marginal.py``) is staged DC rows
at a time through shared memory. The products all run through one register-tile
micro-kernel (``tiles.make_mm``).
"""

import functools
import math

import numpy as np

from ..._params import LSE_EMPTY
from .._compat import FASTMATH, cuda, kernel
from .._precompile import kernel_factory
from .tiles import LN2, LOG2E, make_common, make_mm, smem_sizes


@functools.cache
@kernel_factory
def make_forward_simt(tiles, sparse=True):
    """The fused forward kernel for one tile configuration.

    ``sparse=False`` (the tensor-core path): the sparse loops are compiled out and
    the kernel writes only ``o_l`` (``o_s`` and ``lse`` are left untouched)."""
    T = tiles
    SPARSE = bool(sparse)
    TR, TC, NT = T.TR, T.TC, T.NT
    BQ, BK, DP, DC, KC = T.BQ, T.BK, T.DP, T.DC, T.KC
    RQ, RK, RD = BQ // TR, BK // TC, T.RD
    LDQ = BQ + 1  # transposed tiles indexed by query row
    LDK = BK + 1  # transposed tiles indexed by key row
    acc_t = T.acc_dtype.type
    SA, SB, SP, SRED, SROW = smem_sizes(T)
    mm_s = make_mm(TR, TC, RQ, RK, T.acc)  # S  (BQ x BK)
    mm_o = make_mm(TR, TC, RQ, RD, T.acc)  # O  (BQ x DP)
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
    # the fused kernel (SPARSE) is at its register limit: one thread a row there
    row_stats_serial = ops.row_stats_serial
    zero = acc_t(0.0)
    one = acc_t(1.0)
    neg_inf = acc_t(-np.inf)
    ln2 = acc_t(LN2)
    lse_empty = acc_t(LSE_EMPTY)

    @kernel(fastmath=FASTMATH)
    def sla_forward(
        q4, k4, v4, lstate4, crit4, info, nq, nk, block_q, block_k, scale, fm, eps, o_s4, o_l4, lse3
    ):
        sa = cuda.shared.array(SA, acc_t)  # Qᵀ / φ(Q)ᵀ chunk   [d][row]
        sb = cuda.shared.array(SB, acc_t)  # Kᵀ chunk, V rows, H_i rows
        sp = cuda.shared.array(SP, acc_t)  # Pᵀ  [key][row]
        sred = cuda.shared.array(SRED, acc_t)  # per-row partials [row][tc]
        srow = cuda.shared.array(SROW, acc_t)  # φ row statistics
        sz = cuda.shared.array(DP, acc_t)  # Z_i chunk
        s = cuda.local.array((RQ, RK), acc_t)
        acc = cuda.local.array((RQ, RD), acc_t)
        m = cuda.local.array(RQ, acc_t)
        l = cuda.local.array(RQ, acc_t)
        dz = cuda.local.array(RQ, acc_t)

        t = cuda.threadIdx.x
        tr = t // TC
        tc = t - tr * TC
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        D = q4.shape[3]
        # one head's views (N, D): fewer shape/stride registers than 4-D indexing
        q = q4[b, h]
        k = k4[b, h]
        v = v4[b, h]
        hz = lstate4[b, h, i]  # this row's [vec(H_i), Z_i]
        crit = crit4[b, h, i]
        o_s = o_s4[b, h]
        o_l = o_l4[b, h]
        lse = lse3[b, h]
        qs = acc_t(scale * LOG2E)
        eps_a = acc_t(eps)
        n_crit = info[0, b, h, i]
        n_marg = info[1, b, h, i]
        q0 = i * block_q
        q1 = min(q0 + block_q, nq)

        for r0 in range(q0, q1, BQ):
            nr = min(BQ, q1 - r0)
            # ------------------------------------------------ sparse branch
            if SPARSE:
                for a in range(RQ):
                    m[a] = neg_inf
                    l[a] = zero
                    for n in range(RD):
                        acc[a, n] = zero
                for ci in range(n_crit):
                    j = crit[ci]
                    k0 = j * block_k
                    k1 = min(k0 + block_k, nk)
                    for c0 in range(k0, k1, BK):
                        nc = min(BK, k1 - c0)
                        for a in range(RQ):
                            for n in range(RK):
                                s[a, n] = zero
                        for d0 in range(0, DP, DC):
                            cuda.syncthreads()
                            load_t(sa, 0, LDQ, q, r0, nr, d0, D, BQ, DC, t, qs)
                            load_t(sb, 0, LDK, k, c0, nc, d0, D, BK, DC, t, one)
                            cuda.syncthreads()
                            mm_s(s, sa, 0, LDQ, sb, 0, LDK, DC, tr, tc)
                        # online softmax: row max across the TC threads of a row
                        for a in range(RQ):
                            mx = neg_inf
                            for n in range(RK):
                                if tc + TC * n < nc:
                                    mx = max(mx, s[a, n])
                            sred[(tr + TR * a) * TC + tc] = mx
                        cuda.syncthreads()
                        for a in range(RQ):
                            row = tr + TR * a
                            m_new = m[a]
                            for u in range(TC):
                                m_new = max(m_new, sred[row * TC + u])
                            alpha = math.exp2(m[a] - m_new)
                            m[a] = m_new
                            ls = zero
                            for n in range(RK):
                                col = tc + TC * n
                                p = zero
                                if col < nc:
                                    p = math.exp2(s[a, n] - m_new)
                                ls += p
                                sp[col * LDQ + row] = p
                            l[a] = l[a] * alpha + ls
                            for n in range(RD):
                                acc[a, n] *= alpha
                        # O += P V, V staged KC rows at a time
                        for kc0 in range(0, nc, KC):
                            nkc = min(KC, nc - kc0)
                            cuda.syncthreads()
                            load_n(sb, 0, DP, v, c0 + kc0, nkc, 0, D, KC, DP, t, one)
                            cuda.syncthreads()
                            mm_o(acc, sp, kc0 * LDQ, LDQ, sb, 0, DP, nkc, tr, tc)
                cuda.syncthreads()
                for a in range(RQ):
                    sred[(tr + TR * a) * TC + tc] = l[a]
                cuda.syncthreads()
                for a in range(RQ):
                    row = tr + TR * a
                    if row < nr:
                        n_row = r0 + row
                        if n_crit > 0:
                            lt = zero
                            for u in range(TC):
                                lt += sred[row * TC + u]
                            inv = one / lt
                            for n in range(RD):
                                col = tc + TC * n
                                if col < D:
                                    o_s[n_row, col] = acc[a, n] * inv
                            if tc == 0:
                                lse[n_row] = (m[a] + math.log2(lt)) * ln2
                        else:
                            for n in range(RD):
                                col = tc + TC * n
                                if col < D:
                                    o_s[n_row, col] = zero
                            if tc == 0:
                                lse[n_row] = lse_empty
            # ------------------------------------------------ linear branch
            if n_marg > 0:
                cuda.syncthreads()
                if SPARSE:
                    row_stats_serial(srow, q, r0, nr, D, BQ, t, fm)
                else:
                    row_stats(srow, q, r0, nr, D, BQ, t, fm, sred)  # sred free: barrier above
                for a in range(RQ):
                    dz[a] = zero
                    for n in range(RD):
                        acc[a, n] = zero
                for d0 in range(0, DP, DC):
                    cuda.syncthreads()
                    load_phi_t(sa, 0, LDQ, q, r0, nr, d0, D, BQ, DC, t, srow, fm)
                    load_state(sb, 0, DP, False, hz, d0 * DP, DC, DP, DP, t)
                    load_state(sz, 0, DC, False, hz, DP * DP + d0, 1, DC, DC, t)
                    cuda.syncthreads()
                    mm_o(acc, sa, 0, LDQ, sb, 0, DP, DC, tr, tc)
                    for a in range(RQ):
                        row = tr + TR * a
                        ds = zero
                        for dd in range(DC):
                            ds += sa[dd * LDQ + row] * sz[dd]
                        dz[a] += ds
                for a in range(RQ):
                    row = tr + TR * a
                    if row < nr:
                        inv = one / (dz[a] + eps_a)
                        for n in range(RD):
                            col = tc + TC * n
                            if col < D:
                                o_l[r0 + row, col] = acc[a, n] * inv
            else:
                for a in range(RQ):
                    row = tr + TR * a
                    if row < nr:
                        for n in range(RD):
                            col = tc + TC * n
                            if col < D:
                                o_l[r0 + row, col] = zero

    return sla_forward
