"""Sparse-branch backward on tensor cores (fp16 / bf16, compute capability >= 8.0).

FlashAttention-2 backward restricted to the critical blocks, deterministic (no
atomics): every output element is owned by exactly one warp.

    delta_r = O_s[r] . dO[r]                  (fp32, computed by the caller's array library)
    P   = exp(scale q.k - lse) = 2^(q.k * c - lse*log2 e),   c = scale * log2 e
    dP  = dO V^T          dS = P * (dP - delta)
    dQ  = scale * dS K    dK = scale * dS^T Q    dV = P^T dO

Two kernels, plain ``@cuda.jit`` factories like the forward's (``tc/forward.py``;
fragment layouts and shared tiles in ``tc/tiles.py``):

``sla_bwd_dq_tc`` — one CTA per query block (``block_q / 16`` warps x 16 rows),
over its LUT. Shared memory: Q and dO [block_q x D] staged once, one K and one
V tile per critical block (``cp.async``). Per block: S = Q K^T and dP = dO V^T
(A fragments by ``ldmatrix`` of Q / dO rows, B by non-transposed ``ldmatrix``
of K / V rows), P and dS in registers, then dQ += dS K with dS packed straight
from the accumulators into A fragments and K read by ``ldmatrix.trans``.

``sla_bwd_dkv_tc`` — one CTA per key block (``block_k / 16`` warps x 16 key rows),
over the reverse index: the query blocks that mark this key block critical
(int32 (B, H, Mk, R), ascending, with counts (B, H, Mk)). Each query block is
walked in chunks of ``QC = min(block_q, 64)`` queries: Q, dO, lse*log2 e and
delta of the chunk are staged, then with the warp's key rows as the M side::

    S^T = K Q^T, P^T = 2^(S^T c - lse2[col]), dV += P^T dO,
    dP^T = V dO^T, dS^T = P^T * (dP^T - delta[col]), dK += dS^T Q

Two variants of each, one kernel body (``pipelined`` is a closure constant, the other
branch compiles away); ``launch_sparse_backward`` picks them by ``SLA_NUMBA_SPARSE_BWD``:

* ``sync`` (the default, the reference): one K / V stage (one query chunk). Per step::

      wait all; barrier      # this step's tiles landed
      math
      barrier                # everyone is done with them
      cp.async the next step's tiles into the same buffers

  No copy is in flight while the warps compute.
* ``pipelined``: two stages (twice the K / V, resp. Q / dO / lse / delta, shared memory).
  Per step::

      wait all; barrier      # this step's tiles landed, and everyone is done with
                             # the other stage (it held the previous step)
      cp.async the next step's tiles into the other stage; (dK/dV) load the next
      chunk's lse, delta into registers
      math on this stage
      (dK/dV) store those lse, delta into the other stage

  One barrier a step; at each wait exactly one group is in flight (this step's), so
  "wait all" (``cp.async.wait_group 0``) is the right count: waiting for fewer would let
  the math read a stage before it landed. Same products on the same values in the same
  order: the same bits as ``sync`` (tests/gpu/tc/test_tc_sparse_backward_pipelined.py,
  where the simulator lands each copy only at its wait, as late as a GPU may).
  The price is shared memory, and with it occupancy, at D = 128, blocks 64 x 64 on an
  H200 (228 KiB an SM): dQ 102 KiB a CTA instead of 68, so 2 CTAs an SM instead of 3
  (registers, 165, would allow 3); dK/dV 103 KiB instead of 68.5, still 2 CTAs (its
  254-255 registers allow no more). Whether the overlap pays for dQ's lost CTA is
  what ``tools/sweep_sparse_backward.py`` measures.

Padding and tails: keys past Nk are zero-filled and masked to -inf in the dQ
kernel (P = 0); queries past Nq get lse2 = +inf in the dK/dV kernel (P = 0) and
zero Q / dO. Rows past N are never written; a query (key) block with no LUT
(reverse) entry gets dQ (dK, dV) = 0.

Fragment ownership: warp ``w`` owns 16 M-side rows (query rows in dQ, key rows in
dK/dV), the lane rows ``g`` and ``g + 8`` of them (``g = lane >> 2``, ``t = lane & 3``);
``acc[0, n, e]`` is row ``g + 8*(e >> 1)``, column ``8n + 2t + (e & 1)`` of a 16 x 8*NTILE
accumulator; every accumulator is a ``cuda.local.array`` indexed by fully unrolled
loops (registers).

Outputs are float32 (the backend contract's compute dtype).
"""

import functools

import numpy as np
from numba import float32, int16, int32

from .._compat import cuda, device, kernel
from .._precompile import kernel_factory
from . import build as _tc_build
from .ptx import LOG2E, cp_async_commit, cp_async_wait_all, exp2, smem_addr
from .tiles import (
    NEG_INF,
    POS_INF,
    SMEM_ALIGN,
    TC_FASTMATH,
    ZERO,
    TCKernel,
    fill_rows,
    frag_rows_a,
    frag_rows_bt,
    make_mma,
    make_tile_loader,
    make_warp_gemm,
    smem_stride,
)

KERNELS = ("dq", "dkv")


@functools.cache
@kernel_factory
def make_sparse_dq(D, block_k, block_q, kind, pipelined=False):
    """The dQ kernel for one configuration, as a :class:`~.tiles.TCKernel`.

    Launch: grid ``(Mq, B*H)``; arguments ``(q, k, v, do, lse, delta, lut, counts, dq,
    nq, nk, mq, n_lut, c2, scale)``: q, do (B, H, Nq, D) and k, v (B, H, Nk, D) as
    flat int16 bits; lse, delta (B, H, Nq) flat float32; lut (B, H, Mq, n_lut),
    counts (B, H, Mq) flat int32; dq (B, H, Nq, D) flat float32 output.
    ``pipelined``: two K / V stages, the next block's copy in flight during this
    block's math (module docstring); same bits.
    """
    BQ, BK = block_q, block_k
    PIPE = bool(pipelined)
    NT = BQ // 16 * 32  # one warp per 16 query rows
    SD = smem_stride(D)
    QOFF, DOFF, KOFF, VOFF = 0, BQ * SD, 2 * BQ * SD, (2 * BQ + BK) * SD
    KV_STAGE = 2 * BK * SD  # halves of one stage (K and V tiles); stage 1 follows stage 0
    NKT = BK // 8  # n-tiles of S and dP (key columns)
    NDT = D // 8  # n-tiles of dQ (head-dim columns)
    PK = BK // 16  # k-steps of dQ += dS K
    SMEM_BYTES = (2 * BQ + 2 * BK * (2 if PIPE else 1)) * SD * 2
    load_q = make_tile_loader(D, BQ, NT, PIPE)
    load_kv = make_tile_loader(D, BK, NT, PIPE)
    _, pack_a = make_mma(kind)
    gemm_qk, _ = make_warp_gemm(kind, SD, NKT, D // 16, False)  # S = Q K^T, dP = dO V^T
    _, gemm_dsk = make_warp_gemm(kind, SD, NDT, PK, True)  # dQ += dS K
    log2e = np.float32(LOG2E)

    @kernel(fastmath=TC_FASTMATH)
    def sla_bwd_dq_tc(q, k, v, do, lse, delta, lut, counts, dq, nq, nk, mq, n_lut, c2, scale):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        s = cuda.local.array((1, NKT, 4), float32)  # S, then P, then dS
        dp = cuda.local.array((1, NKT, 4), float32)  # dP = dO V^T
        acc = cuda.local.array((1, NDT, 4), float32)  # dQ / scale
        af = cuda.local.array((1, 4), int32)  # A fragments read from smem
        ds = cuda.local.array((PK, 4), int32)  # dS packed as A fragments
        ls = cuda.local.array(2, float32)  # lse * log2(e) of rows g, g + 8
        dl = cuda.local.array(2, float32)  # delta of rows g, g + 8
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        g = lane >> 2
        t = lane & 3
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        row0 = qb * BQ
        q_base = bh * nq * D
        kv_base = bh * nk * D
        cnt = counts[bh * mq + qb]

        # A query block without critical key blocks: dQ = 0.
        if cnt == 0:
            fill_rows(dq, q_base, row0, BQ, nq, D, ZERO, tid, NT)
            return

        # Stage Q and dO once, K and V of the first critical block.
        sa = smem_addr(smem)
        lut_base = (bh * mq + qb) * n_lut
        kb = lut[lut_base]
        load_q(smem, sa, QOFF, q, q_base, row0, nq - row0, tid)
        load_q(smem, sa, DOFF, do, q_base, row0, nq - row0, tid)
        load_kv(smem, sa, KOFF, k, kv_base, kb * BK, nk - kb * BK, tid)
        load_kv(smem, sa, VOFF, v, kv_base, kb * BK, nk - kb * BK, tid)
        cp_async_commit()

        # Lane addresses: the warp's Q / dO rows (A), K / V rows as B of K^T / V^T,
        # K rows as B of K (transposed load).
        a_rows = int32(sa + (warp * 16 * SD + frag_rows_a(lane, SD)) * 2)
        bt_rows = int32(sa + frag_rows_bt(lane, SD) * 2)
        b_rows = int32(sa + frag_rows_a(lane, SD) * 2)
        for r in range(2):
            ra = row0 + warp * 16 + g + 8 * r
            ls[r] = lse[bh * nq + ra] * log2e if ra < nq else ZERO
            dl[r] = delta[bh * nq + ra] if ra < nq else ZERO
        for n in range(NDT):
            for e in range(4):
                acc[0, n, e] = ZERO

        for it in range(cnt):
            # The one group in flight (this block's K, V) lands; the barrier also says
            # everyone is done with the other stage (the previous block, pipelined).
            cp_async_wait_all()
            cuda.syncthreads()  # K, V of this block landed
            so = 0  # this block's stage (byte offset from stage 0)
            nvalid = nk - kb * BK
            if PIPE:
                so = (it & 1) * KV_STAGE * 2
                if it + 1 < cnt:  # the next block's K, V stream in during this one's math
                    kb = lut[lut_base + it + 1]
                    ko = KOFF + KV_STAGE - so // 2
                    load_kv(smem, sa, ko, k, kv_base, kb * BK, nk - kb * BK, tid)
                    load_kv(smem, sa, ko + BK * SD, v, kv_base, kb * BK, nk - kb * BK, tid)
                    cp_async_commit()

            # S = Q K^T and dP = dO V^T
            for n in range(NKT):
                for e in range(4):
                    s[0, n, e] = ZERO
                    dp[0, n, e] = ZERO
            gemm_qk(s, smem, a_rows + QOFF * 2, bt_rows + KOFF * 2 + so, af)
            gemm_qk(dp, smem, a_rows + DOFF * 2, bt_rows + VOFF * 2 + so, af)
            if nvalid < BK:  # keys past Nk: P = 0
                for n in range(NKT):
                    for odd in range(2):
                        if 8 * n + 2 * t + odd >= nvalid:
                            s[0, n, odd] = NEG_INF
                            s[0, n, odd + 2] = NEG_INF

            # P = 2^(S c2 - lse2), dS = P (dP - delta), packed as A fragments
            for n in range(NKT):
                for e in range(4):
                    p = exp2(s[0, n, e] * c2 - ls[e >> 1])
                    s[0, n, e] = p * (dp[0, n, e] - dl[e >> 1])
            for kk in range(PK):
                pack_a(ds, kk, s, 0, kk)

            # dQ += dS K
            gemm_dsk(acc, ds, smem, b_rows + KOFF * 2 + so)

            if not PIPE:
                cuda.syncthreads()  # everyone is done with K, V
            if not PIPE and it + 1 < cnt:
                kb = lut[lut_base + it + 1]
                load_kv(smem, sa, KOFF, k, kv_base, kb * BK, nk - kb * BK, tid)
                load_kv(smem, sa, VOFF, v, kv_base, kb * BK, nk - kb * BK, tid)
                cp_async_commit()

        for r in range(2):
            ra = row0 + warp * 16 + g + 8 * r
            if ra < nq:
                ob = q_base + ra * D + 2 * t
                for n in range(NDT):
                    dq[ob + 8 * n] = acc[0, n, 2 * r] * scale
                    dq[ob + 8 * n + 1] = acc[0, n, 2 * r + 1] * scale

    return TCKernel(sla_bwd_dq_tc, NT, SMEM_BYTES)


@functools.cache
@kernel_factory
def make_sparse_dkv(D, block_k, block_q, kind, pipelined=False):
    """The dK/dV kernel for one configuration, as a :class:`~.tiles.TCKernel`.

    Launch: grid ``(Mk, B*H)``; arguments ``(q, k, v, do, lse, delta, rev, rev_counts,
    dk, dv, nq, nk, mk, n_rev, c2, scale)``: as the dQ kernel's, with the reverse
    index rev (B, H, Mk, n_rev) / rev_counts (B, H, Mk) flat int32 and dk, dv
    (B, H, Nk, D) flat float32 outputs. ``pipelined``: two stages of the query
    chunk, the next chunk's copy in flight during this chunk's math; same bits.
    """
    BK, BQ = block_k, block_q
    PIPE = bool(pipelined)
    STAGES = 2 if PIPE else 1
    QC = min(BQ, 64)  # queries staged at a time
    CPB = BQ // QC  # chunks per query block
    NT = BK // 16 * 32  # one warp per 16 key rows
    SD = smem_stride(D)
    KOFF, VOFF, QOFF, DOFF = 0, BK * SD, 2 * BK * SD, (2 * BK + QC) * SD
    Q_STAGE = 2 * QC * SD  # halves of one stage's Q and dO tiles; stage 1 follows stage 0
    FOFF = (2 * BK + 2 * QC * STAGES) * SD // 2  # float32 index of lse2[QC], delta[QC]
    F_STAGE = 2 * QC  # floats of one stage's lse2 and delta
    LPT = -(-QC // NT)  # lse2 / delta values a thread stages per chunk
    NQT = QC // 8  # n-tiles of S^T and dP^T (query columns)
    NDT = D // 8  # n-tiles of dK, dV (head-dim columns)
    PK = QC // 16  # k-steps of dV += P^T dO, dK += dS^T Q
    SMEM_BYTES = (2 * BK + 2 * QC * STAGES) * SD * 2 + 2 * QC * 4 * STAGES
    load_kv = make_tile_loader(D, BK, NT, PIPE)
    load_q = make_tile_loader(D, QC, NT, PIPE)
    _, pack_a = make_mma(kind)
    gemm_kq, _ = make_warp_gemm(kind, SD, NQT, D // 16, False)  # S^T = K Q^T, dP^T = V dO^T
    _, gemm_pq = make_warp_gemm(kind, SD, NDT, PK, True)  # dV += P^T dO, dK += dS^T Q
    log2e = np.float32(LOG2E)

    @device(forceinline=True)
    def chunk_row0(rev, rev_base, c):
        """First query row of chunk ``c`` of the key block's walk."""
        return rev[rev_base + c // CPB] * BQ + (c % CPB) * QC

    @device(forceinline=True)
    def row_stats(lse, delta, bh, nq, r):
        """(lse2, delta) of query row ``r``: (+inf, 0) past Nq, so P = 0 there."""
        if r < nq:
            return lse[bh * nq + r] * log2e, delta[bh * nq + r]
        return POS_INF, ZERO

    @kernel(fastmath=TC_FASTMATH)
    def sla_bwd_dkv_tc(
        q, k, v, do, lse, delta, rev, rev_counts, dk, dv, nq, nk, mk, n_rev, c2, scale
    ):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)  # same memory, as fp32
        st = cuda.local.array((1, NQT, 4), float32)  # S^T, then P^T
        dpt = cuda.local.array((1, NQT, 4), float32)  # dP^T, then dS^T
        acc_k = cuda.local.array((1, NDT, 4), float32)  # dK / scale
        acc_v = cuda.local.array((1, NDT, 4), float32)  # dV
        af = cuda.local.array((1, 4), int32)  # A fragments read from smem
        pt = cuda.local.array((PK, 4), int32)  # P^T packed as A fragments
        dst = cuda.local.array((PK, 4), int32)  # dS^T packed as A fragments
        l2n = cuda.local.array(LPT, float32)  # (pipelined) the next chunk's lse2, delta,
        den = cuda.local.array(LPT, float32)  # held in registers during this chunk's math
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        t = lane & 3
        g = lane >> 2
        kb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        krow0 = kb * BK
        q_base = bh * nq * D
        kv_base = bh * nk * D
        rcnt = rev_counts[bh * mk + kb]

        # A key block no query block marks critical: dK = dV = 0.
        if rcnt == 0:
            for idx in range(tid, BK * D, NT):
                r = krow0 + idx // D
                if r < nk:
                    dk[kv_base + r * D + idx % D] = ZERO
                    dv[kv_base + r * D + idx % D] = ZERO
            return

        # Stage K, V once and the first query chunk (Q, dO, lse2, delta).
        sa = smem_addr(smem)
        rev_base = (bh * mk + kb) * n_rev
        load_kv(smem, sa, KOFF, k, kv_base, krow0, nk - krow0, tid)
        load_kv(smem, sa, VOFF, v, kv_base, krow0, nk - krow0, tid)
        q0 = rev[rev_base] * BQ
        load_q(smem, sa, QOFF, q, q_base, q0, nq - q0, tid)
        load_q(smem, sa, DOFF, do, q_base, q0, nq - q0, tid)
        for idx in range(tid, QC, NT):
            smf[FOFF + idx], smf[FOFF + QC + idx] = row_stats(lse, delta, bh, nq, q0 + idx)
        cp_async_commit()
        nchunks = rcnt * CPB
        q0_ahead = chunk_row0(rev, rev_base, 1) if PIPE and nchunks > 1 else 0  # (pipelined)

        # Lane addresses: the warp's K / V rows (A), Q / dO rows as B of Q^T / dO^T,
        # Q / dO rows as B of Q / dO (transposed load).
        a_rows = int32(sa + (warp * 16 * SD + frag_rows_a(lane, SD)) * 2)
        bt_rows = int32(sa + frag_rows_bt(lane, SD) * 2)
        b_rows = int32(sa + frag_rows_a(lane, SD) * 2)
        for n in range(NDT):
            for e in range(4):
                acc_k[0, n, e] = ZERO
                acc_v[0, n, e] = ZERO

        for ci in range(rcnt * CPB):
            # The one group in flight (this chunk's Q, dO) lands; the barrier also says
            # everyone is done with the other stage (the previous chunk, pipelined).
            cp_async_wait_all()
            cuda.syncthreads()  # the chunk landed
            so = 0  # this chunk's stage: byte offset of its Q / dO, float offset of lse2
            fo = 0
            if PIPE:
                so = (ci & 1) * Q_STAGE * 2
                fo = (ci & 1) * F_STAGE
                if ci + 1 < nchunks:  # the next chunk streams in during this one's math
                    q0 = q0_ahead
                    if ci + 2 < nchunks:  # read a step ahead: its latency hides under the math
                        q0_ahead = chunk_row0(rev, rev_base, ci + 2)
                    qo = QOFF + Q_STAGE - so // 2
                    load_q(smem, sa, qo, q, q_base, q0, nq - q0, tid)
                    load_q(smem, sa, qo + QC * SD, do, q_base, q0, nq - q0, tid)
                    cp_async_commit()
                    for u in range(LPT):  # loads issued now, stored after the math
                        l2n[u], den[u] = row_stats(lse, delta, bh, nq, q0 + tid + u * NT)

            # dP^T = V dO^T first, then S^T = K Q^T; P^T and dS^T in place and packed
            # before the two products that read them (fewer fp32 tiles live at once).
            for n in range(NQT):
                for e in range(4):
                    st[0, n, e] = ZERO
                    dpt[0, n, e] = ZERO
            gemm_kq(dpt, smem, a_rows + VOFF * 2, bt_rows + DOFF * 2 + so, af)
            gemm_kq(st, smem, a_rows + KOFF * 2, bt_rows + QOFF * 2 + so, af)
            # P^T = 2^(S^T c2 - lse2[col]), dS^T = P^T (dP^T - delta[col]); the lane's
            # columns are the chunk's queries 8n + 2t and 8n + 2t + 1
            for n in range(NQT):
                c = 8 * n + 2 * t
                l2_0 = smf[FOFF + fo + c]
                l2_1 = smf[FOFF + fo + c + 1]
                de_0 = smf[FOFF + fo + QC + c]
                de_1 = smf[FOFF + fo + QC + c + 1]
                for e in range(4):  # column c + (e & 1)
                    p = exp2(st[0, n, e] * c2 - (l2_1 if e & 1 else l2_0))
                    st[0, n, e] = p
                    dpt[0, n, e] = p * (dpt[0, n, e] - (de_1 if e & 1 else de_0))
            for kk in range(PK):
                pack_a(pt, kk, st, 0, kk)
            for kk in range(PK):
                pack_a(dst, kk, dpt, 0, kk)

            gemm_pq(acc_v, pt, smem, b_rows + DOFF * 2 + so)  # dV += P^T dO
            gemm_pq(acc_k, dst, smem, b_rows + QOFF * 2 + so)  # dK += dS^T Q

            if PIPE:  # the next chunk's lse2, delta into the other stage
                if ci + 1 < nchunks:
                    for u in range(LPT):
                        idx = tid + u * NT
                        if idx < QC:
                            smf[FOFF + F_STAGE - fo + idx] = l2n[u]
                            smf[FOFF + F_STAGE - fo + QC + idx] = den[u]
            else:
                cuda.syncthreads()  # everyone is done with the chunk
                if ci + 1 < rcnt * CPB:
                    q0 = chunk_row0(rev, rev_base, ci + 1)
                    load_q(smem, sa, QOFF, q, q_base, q0, nq - q0, tid)
                    load_q(smem, sa, DOFF, do, q_base, q0, nq - q0, tid)
                    for idx in range(tid, QC, NT):
                        smf[FOFF + idx], smf[FOFF + QC + idx] = row_stats(
                            lse, delta, bh, nq, q0 + idx
                        )
                    cp_async_commit()

        for r in range(2):
            ra = krow0 + warp * 16 + g + 8 * r
            if ra < nk:
                ob = kv_base + ra * D + 2 * t
                for n in range(NDT):
                    dk[ob + 8 * n] = acc_k[0, n, 2 * r] * scale
                    dk[ob + 8 * n + 1] = acc_k[0, n, 2 * r + 1] * scale
                    dv[ob + 8 * n] = acc_v[0, n, 2 * r]
                    dv[ob + 8 * n + 1] = acc_v[0, n, 2 * r + 1]

    return TCKernel(sla_bwd_dkv_tc, NT, SMEM_BYTES)


def make_sparse_backward(which, D, block_k, block_q, kind, pipelined=False):
    """The backward kernel ``which`` ('dq' or 'dkv') as a :class:`~.tiles.TCKernel`;
    ``pipelined``: the two-stage variant (same bits)."""
    # the keyword only when set: the recipes of the default kernels stay the same
    kw = {"pipelined": True} if pipelined else {}
    if which == "dq":
        return make_sparse_dq(D, block_k, block_q, kind, **kw)
    if which == "dkv":
        return make_sparse_dkv(D, block_k, block_q, kind, **kw)
    raise ValueError(f"which: 'dq' or 'dkv', not {which!r}")


def use_pipelined(pipeline=None):
    """Whether a launch takes the pipelined kernels: ``pipeline`` None follows
    ``SLA_NUMBA_SPARSE_BWD`` (``config.sparse_bwd_kernel``), else its truth."""
    if pipeline is None:
        from ... import config

        return config.sparse_bwd_kernel() == "pipelined"
    return bool(pipeline)


def signature(which):
    """Explicit argument types (for compile_ptx in tools/check_tc_ptx.py)."""
    from numba import float32, int16, int32, int64

    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    if which == "dq":
        return (
            i16,
            i16,
            i16,
            i16,
            f32,
            f32,
            i32,
            i32,
            f32,
            int64,
            int64,
            int64,
            int64,
            float32,
            float32,
        )
    return (
        i16,
        i16,
        i16,
        i16,
        f32,
        f32,
        i32,
        i32,
        f32,
        f32,
        int64,
        int64,
        int64,
        int64,
        float32,
        float32,
    )


def reverse_index(lut, counts, mk):
    """Reverse LUT: for each key block, the query blocks that mark it critical.

    lut int32 (B, H, Mq, n), counts int32 (B, H, Mq) -> (rev int32 (B, H, Mk, R),
    rev_counts int32 (B, H, Mk)), query-block indices ascending, R = max(1, max count).
    torch tensors (any device) or numpy arrays. Entries past a row's count are 0.
    """
    if type(lut).__module__.split(".")[0] == "torch":
        import torch

        B, H, mq, n = lut.shape
        valid = torch.arange(n, device=lut.device) < counts[..., None].to(torch.int64)
        idx = torch.where(valid, lut.to(torch.int64), torch.full_like(lut, mk, dtype=torch.int64))
        m = torch.zeros(B, H, mq, mk + 1, dtype=torch.bool, device=lut.device)
        m.scatter_(-1, idx, True)
        mt = m[..., :mk].transpose(-1, -2)
        rcnt = mt.sum(-1, dtype=torch.int32)
        R = max(1, int(rcnt.max()) if rcnt.numel() else 1)
        order = torch.argsort((~mt).to(torch.int8), dim=-1, stable=True)[..., :R]
        keep = torch.arange(R, device=lut.device) < rcnt[..., None]
        rev = torch.where(keep, order, torch.zeros_like(order)).to(torch.int32).contiguous()
        return rev, rcnt.contiguous()
    lut, counts = np.asarray(lut), np.asarray(counts)
    B, H, mq, n = lut.shape
    valid = np.arange(n) < counts[..., None]
    m = np.zeros((B, H, mq, mk + 1), dtype=bool)
    np.put_along_axis(m, np.where(valid, lut, mk).astype(np.int64), True, axis=-1)
    mt = np.swapaxes(m[..., :mk], -1, -2)
    rcnt = mt.sum(-1).astype(np.int32)
    R = max(1, int(rcnt.max()) if rcnt.size else 1)
    order = np.argsort(~mt, axis=-1, kind="stable")[..., :R]
    rev = np.where(np.arange(R) < rcnt[..., None], order, 0).astype(np.int32)
    return np.ascontiguousarray(rev), np.ascontiguousarray(rcnt)


def _delta(o_s, do):
    """delta = rowsum(O_s * dO) in fp32, with the arrays' own library."""
    lib = type(o_s).__module__.split(".")[0]
    if lib == "torch":
        import torch

        return (o_s.to(torch.float32) * do.to(torch.float32)).sum(-1)
    if lib in ("cupy", "numpy"):
        return (o_s.astype(np.float32) * do.astype(np.float32)).sum(-1)
    raise TypeError("pass delta explicitly for arrays other than torch / CuPy / numpy")


def launch_sparse_backward(
    kind,
    q,
    k,
    v,
    do,
    lse,
    delta,
    lut,
    counts,
    rev,
    rev_counts,
    dq,
    dk,
    dv,
    B,
    H,
    Nq,
    Nk,
    D,
    block_q,
    block_k,
    scale,
    stream,
    pipeline=None,
):
    """Launch dQ and dK/dV on flat device arrays (the GPU backend's entry).

    q, k, v, do: flat int16 bits of fp16 / bf16 (``kind`` 'f16' / 'bf16');
    lse, delta: flat float32 (B*H*Nq); lut (B, H, Mq, n) / counts (B, H, Mq) and
    rev (B, H, Mk, R) / rev_counts (B, H, Mk): flat int32; dq, dk, dv: flat float32
    outputs (overwritten). Numba device arrays, launched on ``stream``; no host sync.
    ``pipeline``: None follows ``SLA_NUMBA_SPARSE_BWD``; True / False force the
    pipelined / sync kernels (same bits; :func:`use_pipelined`).
    """
    pipe = use_pipelined(pipeline)
    mq, mk = -(-Nq // block_q), -(-Nk // block_k)
    n_lut = int(lut.size) // max(1, B * H * mq)
    n_rev = int(rev.size) // max(1, B * H * mk)
    c2, sc = np.float32(scale * LOG2E), np.float32(scale)
    if n_lut == 0:
        lut = counts
    kern = make_sparse_backward("dq", D, block_k, block_q, kind, pipe)
    _tc_build.launch(
        kern.kernel,
        (mq, B * H),
        kern.threads,
        kern.smem_bytes,
        stream,
        (q, k, v, do, lse, delta, lut, counts, dq, Nq, Nk, mq, max(n_lut, 1), c2, sc),
    )
    kern = make_sparse_backward("dkv", D, block_k, block_q, kind, pipe)
    _tc_build.launch(
        kern.kernel,
        (mk, B * H),
        kern.threads,
        kern.smem_bytes,
        stream,
        (q, k, v, do, lse, delta, rev, rev_counts, dk, dv, Nq, Nk, mk, max(n_rev, 1), c2, sc),
    )


def sparse_backward_tc(
    q,
    k,
    v,
    o_s,
    lse,
    do,
    lut,
    counts,
    rev,
    rev_counts,
    block_q,
    block_k,
    scale,
    delta=None,
    pipeline=None,
):
    """Sparse (critical-block) attention backward on tensor cores.

    Parameters
    ----------
    q : (B, H, Nq, D) fp16/bf16;  k, v : (B, H, Nk, D);  do : (B, H, Nq, D), same dtype.
    o_s : float32 (B, H, Nq, D), lse : float32 (B, H, Nq) -- from ``sparse_forward_tc``.
    lut, counts : the forward's critical LUT (B, H, Mq, n) and counts (B, H, Mq), int32.
    rev, rev_counts : reverse index, int32 (B, H, Mk, R) and (B, H, Mk): query blocks
        that mark each key block critical, ascending (see :func:`reverse_index`).
    block_q, block_k, scale : as in the forward (see ``forward_tc.tc_supported``).
    delta : optional float32 (B, H, Nq) = rowsum(o_s * do); computed here when None
        (torch / CuPy / numpy arrays only).
    pipeline : None follows ``SLA_NUMBA_SPARSE_BWD``; True / False force the pipelined /
        sync kernels (same bits).

    Returns
    -------
    (dq, dk, dv) float32, shapes of q, k, v. Deterministic: no atomics.
    """
    kind = _tc_build.half_kind(q)
    B, H, Nq, D = (int(s) for s in q.shape)
    Nk = int(k.shape[2])
    mq, mk = -(-Nq // block_q), -(-Nk // block_k)
    ad = _tc_build.ArrayAdapter(q)
    if delta is None:
        delta = _delta(o_s, do)
    c2, sc = np.float32(scale * LOG2E), np.float32(scale)
    qb, kb_, vb, dob = ad.bits(q), ad.bits(k), ad.bits(v), ad.bits(do)
    lse_f, delta_f = ad.flat(lse, np.float32), ad.flat(delta, np.float32)
    stream = ad.stream()

    pipe = use_pipelined(pipeline)
    dq = ad.empty((B, H, Nq, D), np.float32)
    kern = make_sparse_backward("dq", D, block_k, block_q, kind, pipe)
    lut_f, counts_f = ad.flat(lut, np.int32), ad.flat(counts, np.int32)
    n_lut = int(lut.shape[-1])
    if n_lut == 0:
        lut_f = counts_f
    _tc_build.launch(
        kern.kernel,
        (mq, B * H),
        kern.threads,
        kern.smem_bytes,
        stream,
        (qb, kb_, vb, dob, lse_f, delta_f, lut_f, counts_f, dq, Nq, Nk, mq, max(n_lut, 1), c2, sc),
    )

    dk = ad.empty((B, H, Nk, D), np.float32)
    dv = ad.empty((B, H, Nk, D), np.float32)
    kern = make_sparse_backward("dkv", D, block_k, block_q, kind, pipe)
    _tc_build.launch(
        kern.kernel,
        (mk, B * H),
        kern.threads,
        kern.smem_bytes,
        stream,
        (
            qb,
            kb_,
            vb,
            dob,
            lse_f,
            delta_f,
            ad.flat(rev, np.int32),
            ad.flat(rev_counts, np.int32),
            dk,
            dv,
            Nq,
            Nk,
            mk,
            int(rev.shape[-1]),
            c2,
            sc,
        ),
    )
    return (ad.wrap(dq, (B, H, Nq, D)), ad.wrap(dk, (B, H, Nk, D)), ad.wrap(dv, (B, H, Nk, D)))
