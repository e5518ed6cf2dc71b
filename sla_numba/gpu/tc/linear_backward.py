"""The linear branch's backward on tensor cores (fp16 / bf16 q, k, v; cc >= 8.0).

The forward's linear branch (``tc/linear.py``) is, per query block i and row r,
``O_l[r] = φ(q_r)·H_i / den_r`` with ``den_r = φ(q_r)·Z_i + eps`` and
``H_i = Σ_{j marginal} h_j``, ``h_j = φ(K_j)ᵀ V_j``, ``z_j = Σ_rows φ(K_j)``.
Its gradient needs five products, all GEMM-shaped, done here by two kernels:

``dq_linear`` — one CTA per (query block i, h, b), rows r of the block::

    δl_r     = O_l[r] · dO_l[r]                                      (SIMT, per row)
    ĉ_r      = φ(q_r) / den_r
    dφ(q_r)  = (dO_l[r] · H_iᵀ − δl_r Z_i) / den_r                  (pass 1: BQ x D x D)
    dq[r]   += J_φ(q_r)ᵀ dφ(q_r)                                     (chain rule, in place)
    QO_i     = Σ_r ĉ_rᵀ dO_l[r]         (D x D)                      (pass 2: D x BQ x D)
    QD_i     = Σ_r ĉ_r δl_r             (D)                          (SIMT)

``dkdv_linear`` — one CTA per (key block j, h, b), rows c of the block, given
``dH_j = Σ_{i: j marginal in row i} QO_i`` and ``dZ_j`` likewise from QD (the column
sums, ``tc/marginal.py``)::

    dφ(k_c)  = v_c · dH_jᵀ − dZ_j                                    (pass 1: BK x D x D)
    dk[c]   += J_φ(k_c)ᵀ dφ(k_c)
    dv[c]   += φ(k_c) · dH_j                                         (pass 2: BK x D x D)

The chain rule through φ (``simt/tiles.make_chain``): softmax over the head dim
``dx = φ ⊙ (dφ − φ·dφ)``; elu + 1 ``dx = dφ · (x > 0 ? 1 : eˣ)``; relu
``dx = dφ · (x > 0)``. Blocks without marginal partners (``n_marg <= 0``) have no
linear gradient: ``dq_linear`` writes a zero QO_i / QD_i row and leaves dq alone,
``dkdv_linear`` returns at once.

Both kernels *add* to dq / dk / dv (fp32), which the tensor-core sparse backward
(``tc/backward.py``) wrote first: one writer per element per kernel, in stream order,
no atomics, so the result is bitwise deterministic.

Precision: every product runs as ``mma.sync.m16n8k16.bf16`` with fp32 accumulation.
Operands that are fp32 values (φ, ĉ, H_i, dH_j, fp32 dO_l) are split into bf16
``hi = bf16(x)``, ``lo = bf16(x − hi)`` (16 significant bits); a product of two split
operands is ``hi·hi + lo·hi + hi·lo`` (the lo·lo term, ~2^-16 relative, dropped),
as in ``tc/linear.py``. Operands that are already bf16 values (bf16 v; bf16 dO_l)
are exact and take one term: two mma instead of three. fp16 values are not bf16
values, so they are split like fp32 (fp16's 11 bits fit in hi + lo exactly).

Layout of one kernel (NW = BQ / 16 warps, two lanes per row in the SIMT phases)
-------------------------------------------------------------------------------
0. Rows: lane pair (r = tid >> 1, half li = tid & 1) loads its D/2 values of q_r,
   computes φ (softmax row max / sum over the pair by ``shfl_xor``), den_r (Z_i from
   global), δl_r; writes ĉ hi / lo and dO_l hi / lo into shared tiles [r][d], and
   per row (mx, 1/Σ, 1/den, δl) into a small fp32 table. Rows past the sequence:
   zeros.
1. Pass 1, ``A · Xᵀ`` with X = H_i (D x D, fp32 in global memory): X is staged HK
   *columns* at a time (all D rows, hi / lo tiles [d1][e']); warp w owns rows
   16w .. 16w + 15 x all D output columns (D/8 n8 tiles, 4·D/8 fp32 accumulators a
   lane); A fragments by ``ldmatrix.x4`` from the row tile, B (= Xᵀ) by a
   non-transposed ``ldmatrix.x4`` of the [d1][e'] tile. The epilogue subtracts the
   rank-one term, scales by 1/den, applies the chain rule (softmax's φ·dφ is a sum
   over the 4 lanes of a quad, two ``shfl_xor``) and adds the result into dq.
2. Pass 2, ``ĉᵀ · dO_l`` (D x D): work item = one m16 tile of d1 x all D columns,
   items dealt to warps round-robin; A = ĉᵀ by ``ldmatrix.x4.trans`` of the [r][d1]
   tile, B = dO_l by ``ldmatrix.x4.trans`` of the [r][e] tile; k = the block's rows.
   QD by a SIMT loop over the tile (thread per d1).

``dkdv_linear`` has the same phase 0 (φ(k) hi / lo, v as bf16 or hi / lo, dZ_j),
pass 1 with X = dH_j (then dk), and pass 2 ``φ(K) · dH_j`` with dH_j staged HK *rows*
at a time (tiles [d1'][e], B by ``ldmatrix.x4.trans``), added into dv.

The pipelined kernels (``SLA_NUMBA_LINEAR_GRAD=pipelined``; ``pipelined=True``)
--------------------------------------------------------------------------------
Why. The register kernels above stage the D x D fp32 state (64 KiB at D = 128) with
scalar loads, then wait for them at a barrier before any warp runs an mma, and wait
again before the next chunk may overwrite the tile: every chunk pays a full global
memory latency with nothing else in flight (H200, Wan2.1 sizes: 1.8 ms for dq, 1.5 ms
for dk / dv, against ~0.2 ms for the same products in cuBLAS).

What. The same mma on the same shared tiles in the same order (same bits), but:

- the state reaches registers by 16-byte loads (``ptx.ldg_v4_f32``; Numba lowers
  ``arr[i]`` to 4-byte loads): thread tid holds quads tid, tid + NT, ... of a chunk
  (``prefetch_slots``: 8 quads, 32 registers, at D = 128, HK = 32, 128 threads);
- the chunk tiles are double-buffered; per chunk kc a thread issues the loads of
  chunk kc + 1, runs chunk kc's mma from buffer kc mod 2 (the loads are in flight
  meanwhile), splits chunk kc + 1 into hi / lo and stores it into the other buffer,
  then one barrier (``_times_xt_pipe`` / ``_times_x_pipe``)::

      pf = load(chunk 0)                    # issued before phase 0: in flight during it
      put(pf, buffer 0); syncthreads
      for kc: pf = load(chunk kc + 1); mma(buffer kc % 2); put(pf, buffer (kc+1) % 2); syncthreads

  (the store into buffer (kc + 1) mod 2 is safe: its last reader, chunk kc - 1, ended
  at the previous barrier);
- dk / dv: pass 1's D/HK column chunks and pass 2's row chunks are one stream: pass
  1's last iteration loads and stores pass 2's first chunk, into buffer (D/HK) mod 2.

Barriers: D/HK a pass instead of 2·D/HK. Cost: a second chunk buffer (shared memory
at D = 128, block 64, HK = 32: dq 109.5 KiB against 89.5, dk / dv 109 against 89;
still 2 CTAs an SM on sm_90) and up to 255 registers (no spill; ``tools/check_tc_ptx.py --only
linear_grad``). The state must start on a 16-byte boundary (W = D·D + D is a multiple
of 16, so every chunk row then is); the launchers send an unaligned one to the register
kernels. ``tools/sweep_linear_backward.py`` times both at the Wan2.1 sizes.

Inputs: q / k / v int16 bits of ``kind`` (B, H, N, D); o_l, do_l (B, H, Nq, D) either
both fp32 or both int16 bits of ``kind`` (``l_half``); lstate / qstate / dh fp32
(B, H, M, W), W = D*D + D, row = [vec(X) row-major X[d1, e], Z]; n_marg int32
(B, H, M) (``row_info[1]`` / ``col_info[1]``); dq / dk / dv fp32 (B, H, N, D). Flat
views are accepted. Under the CUDA simulator the ``ptx`` twins run the same code
(slowly: BQ = 16, tiny D).

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``)::

    import numpy as np
    from sla_numba.gpu.tc.linear_backward import launch_dkdv_linear_tc
    B, H, N, D, bk = 1, 1, 16, 16, 16
    one = (np.ones((B, H, N, D), np.float32).view(np.int32) >> 16).astype(np.int16)
    dh = np.zeros((B, H, 1, D * D + D), np.float32); dh[..., :D * D] = 1.0
    dk = np.zeros((B, H, N, D), np.float32); dv = np.zeros_like(dk)
    launch_dkdv_linear_tc("bf16", one, one, dh, np.ones((B, H, 1), np.int32), dk, dv,
                          B, H, N, D, bk, 2, 0)
    # relu: dv = φ(k)·dH = D everywhere; dk = v·dHᵀ = D everywhere (k > 0)
"""

import math
from collections import namedtuple

import numpy as np
from numba import cuda, float32, int16, int32, int64

from .. import _compat
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, dtype_name, flat, size

# The forward's linear kernel (tc/linear.py) is this module's twin: its constants,
# supported shapes and device helpers (input decoding, the bf16 hi / lo split, φ of a
# row loaded by a lane pair, staging rows of a D x D state) serve both.
from .linear import (
    _DEV,
    FASTMATH,
    KINDS,
    ONE,
    PAD,
    ZERO,
    ZI,
    _in_f32,
    _load_phi_row,
    _mma_tile,
    _split_pair,
    _stage_rows,
    chunk_rows,
    u64,
)
from .linear import linear_tc_supported as linear_grad_tc_supported  # same shapes
from .ptx import (
    SIMULATED,
    bf16_high_f32,
    bf16_low_f32,
    ldg_v4_f32,
    ldsm_x4,
    ldsm_x4_trans,
    pack_bf16x2,
    shfl_xor,
    smem_addr,
)
from .states import _high16, _low16
from .tiles import frag_rows_a, frag_rows_bt

#: A compiled kernel and its launch sizes.
LinearGradKernel = namedtuple("LinearGradKernel", "kernel smem_bytes threads")


# ---------------------------------------------------------------------------
# Device helpers (module level: not in the kernels' closures, see tc/linear.py)
# ---------------------------------------------------------------------------


@_compat.device(**_DEV)
def _phi_at(x, mx, inv, fm):
    """φ of one element x of a row whose softmax stats are (mx, inv)."""
    if fm == 0:
        return math.exp(x - mx) * inv
    if fm == 1:
        return x + ONE if x > ZERO else math.exp(x)
    return x if x > ZERO else ZERO


@_compat.device(**_DEV)
def _slope_at(x, fm):
    """dφ/dx of the element-wise maps (elu + 1, relu) at x."""
    if fm == 1:
        return ONE if x > ZERO else math.exp(x)
    return ONE if x > ZERO else ZERO


@_compat.device(**_DEV)
def _stage_cols(smem32, hi, lo, src, base, c0, D, HK, SWC, tid, NT):
    """Columns c0 .. c0 + HK of the D x D fp32 matrix at ``src[base:]`` (row-major)
    into the bf16 hi / lo tiles [d1][c'] at 16-bit offsets ``hi`` / ``lo`` (row
    stride SWC)."""
    half = HK // 2
    for x in range(tid, D * half, NT):
        d1 = x // half
        c = (x - d1 * half) * 2
        g = base + d1 * D + c0 + c
        p, q = _split_pair(src[u64(g)], src[u64(g + 1)])
        s = (d1 * SWC + c) >> 1
        smem32[s + (hi >> 1)] = p
        smem32[s + (lo >> 1)] = q


@_compat.device(**_DEV)
def _load_a2(af, smem, addr_hi, addr_lo, split):
    """A fragments of one 16 x 16 tile: af[0] from ``addr_hi``; af[1] from ``addr_lo``
    when ``split`` (non-transposed ldmatrix, row-major [m][k] tile)."""
    a0, a1, a2, a3 = ldsm_x4(smem, addr_hi, 0)
    af[0, 0], af[0, 1], af[0, 2], af[0, 3] = a0, a1, a2, a3
    if split:
        a0, a1, a2, a3 = ldsm_x4(smem, addr_lo, 0)
        af[1, 0], af[1, 1], af[1, 2], af[1, 3] = a0, a1, a2, a3


@_compat.device(**_DEV)
def _xt_chunk(acc, af, smem, a_hi, a_lo, a_split, a0, b_hi, b_lo, HK, SWC, NP):
    """One staged chunk of ``acc += A · Xᵀ`` for one warp: its HK/16 k-steps. A hi / lo
    fragments at byte addresses ``a_hi`` / ``a_lo`` plus ``a0`` (the chunk's first
    column), lo used only when ``a_split``; X's column chunk [d1][c'] (row stride SWC)
    at ``b_hi`` / ``b_lo`` (B = Xᵀ by a non-transposed ``ldmatrix``)."""
    for ks in range(HK // 16):
        _load_a2(af, smem, a_hi + a0 + ks * 32, a_lo + a0 + ks * 32, a_split)
        for p in range(NP):
            off = (p * 16 * SWC + ks * 16) * 2
            h0, h1, h2, h3 = ldsm_x4(smem, b_hi + off, 0)
            l0, l1, l2, l3 = ldsm_x4(smem, b_lo + off, 0)
            _mma_tile(acc, 2 * p, af, 0, h0, h1)
            _mma_tile(acc, 2 * p, af, 0, l0, l1)
            _mma_tile(acc, 2 * p + 1, af, 0, h2, h3)
            _mma_tile(acc, 2 * p + 1, af, 0, l2, l3)
            if a_split:
                _mma_tile(acc, 2 * p, af, 1, h0, h1)
                _mma_tile(acc, 2 * p + 1, af, 1, h2, h3)


@_compat.device(**_DEV)
def _x_chunk(acc, af, smem, a_hi, a_lo, a0, b_hi, b_lo, HK, SW, NP):
    """One staged chunk of ``acc += A · X`` for one warp: A split in hi / lo (as in
    :func:`_xt_chunk`), X's row chunk [d'][e] (row stride SW) at ``b_hi`` / ``b_lo``
    (B by ``ldmatrix.trans``)."""
    for ks in range(HK // 16):
        _load_a2(af, smem, a_hi + a0 + ks * 32, a_lo + a0 + ks * 32, True)
        for p in range(NP):
            off = (ks * 16 * SW + p * 16) * 2
            h0, h1, h2, h3 = ldsm_x4_trans(smem, b_hi + off, 0)
            l0, l1, l2, l3 = ldsm_x4_trans(smem, b_lo + off, 0)
            _mma_tile(acc, 2 * p, af, 0, h0, h1)
            _mma_tile(acc, 2 * p, af, 1, h0, h1)
            _mma_tile(acc, 2 * p, af, 0, l0, l1)
            _mma_tile(acc, 2 * p + 1, af, 0, h2, h3)
            _mma_tile(acc, 2 * p + 1, af, 1, h2, h3)
            _mma_tile(acc, 2 * p + 1, af, 0, l2, l3)


@_compat.device(**_DEV)
def _times_xt(acc, af, smem, smem32, src, base, a_hi, a_lo, a_split, busy, XH, XL, D, HK, SWC, NP, tid, NT):  # fmt: skip
    """``acc = A · Xᵀ`` for the warp's 16 rows of A (all D output columns, NP pairs of
    n8 tiles), X the D x D fp32 matrix at ``src[base:]``, staged HK *columns* at a time
    into the bf16 hi / lo tiles [d][c'] at 16-bit offsets XH / XL (row stride SWC) by
    all NT threads (two barriers a chunk; every thread must call this). A: row tile(s)
    in shared memory, lane addresses ``a_hi`` / ``a_lo`` (``frag_rows_a``), the lo
    part read only when ``a_split``. B = Xᵀ: non-transposed ldmatrix of the chunk
    (``frag_rows_bt``). Warps whose rows all lie past the block (not ``busy``) only
    stage."""
    for n in range(2 * NP):
        for e in range(4):
            acc[n, e] = ZERO
    sa = smem_addr(smem)
    b_hi = sa + (XH + frag_rows_bt(cuda.threadIdx.x & 31, SWC)) * 2
    b_lo = b_hi + (XL - XH) * 2
    for kc in range(D // HK):
        cuda.syncthreads()  # tiles written / previous chunk consumed
        _stage_cols(smem32, XH, XL, src, base, kc * HK, D, HK, SWC, tid, NT)
        cuda.syncthreads()
        if busy:
            _xt_chunk(acc, af, smem, a_hi, a_lo, a_split, kc * HK * 2, b_hi, b_lo, HK, SWC, NP)


@_compat.device(**_DEV)
def _times_x(acc, af, smem, smem32, src, base, a_hi, a_lo, busy, XH, XL, D, HK, SW, NP, tid, NT):  # fmt: skip
    """``acc = A · X`` likewise, X staged HK *rows* at a time (tiles [d'][e], row
    stride SW; B by ``ldmatrix.trans``, ``frag_rows_a``), A split in hi / lo."""
    for n in range(2 * NP):
        for e in range(4):
            acc[n, e] = ZERO
    sa = smem_addr(smem)
    b_hi = sa + (XH + frag_rows_a(cuda.threadIdx.x & 31, SW)) * 2
    b_lo = b_hi + (XL - XH) * 2
    for kc in range(D // HK):
        cuda.syncthreads()  # previous chunk consumed
        _stage_rows(smem32, XH, XL, src, base, kc * HK, D, HK, SW, tid, NT)
        cuda.syncthreads()
        if busy:
            _x_chunk(acc, af, smem, a_hi, a_lo, kc * HK * 2, b_hi, b_lo, HK, SW, NP)


# ---------------------------------------------------------------------------
# The pipelined state staging (module doc, "The pipelined kernels")
# ---------------------------------------------------------------------------


def prefetch_slots(D, HK, NT):
    """16-byte loads one thread holds per staged chunk (D x HK values = D·HK/4 quads
    over NT threads; the last slots of some threads may be empty)."""
    return -(-(D * HK // 4) // NT)


@_compat.device(**_DEV)
def _ldg_quads(pf, src, base, r0, c0, R, C, D, tid, NT, NPF):
    """This thread's quads of the R x C block at row r0, column c0 of the row-major
    fp32 matrix (D columns) at ``src[base:]``, one 16-byte load each: quad x (x = tid,
    tid + NT, ...) is row r0 + x // (C/4), columns c0 + 4·(x mod C/4) .. + 3. A chunk of
    HK columns of the D x D state: r0 = 0, R = D, C = HK; a chunk of HK rows: c0 = 0,
    R = HK, C = D."""
    q4 = C // 4
    for u in range(NPF):
        x = tid + u * NT
        if x < R * q4:
            rr = x // q4
            c = (x - rr * q4) * 4
            a0, a1, a2, a3 = ldg_v4_f32(src, int64(base + (r0 + rr) * D + c0 + c))
            pf[u, 0], pf[u, 1], pf[u, 2], pf[u, 3] = a0, a1, a2, a3


@_compat.device(**_DEV)
def _put_quads(smem32, hi, lo, pf, R, C, S, tid, NT, NPF):
    """The quads of :func:`_ldg_quads` (same R, C), split into bf16 hi / lo, into the
    tiles [r][c] at 16-bit offsets ``hi`` / ``lo``, row stride S: the same values at the
    same places as ``_stage_cols`` (R = D, C = HK, S = SWC) or ``_stage_rows`` (R = HK,
    C = D, S = SW)."""
    q4 = C // 4
    for u in range(NPF):
        x = tid + u * NT
        if x < R * q4:
            rr = x // q4
            c = (x - rr * q4) * 4
            p0, l0 = _split_pair(pf[u, 0], pf[u, 1])
            p1, l1 = _split_pair(pf[u, 2], pf[u, 3])
            s = (rr * S + c) >> 1
            smem32[s + (hi >> 1)] = p0
            smem32[s + (hi >> 1) + 1] = p1
            smem32[s + (lo >> 1)] = l0
            smem32[s + (lo >> 1) + 1] = l1


@_compat.device(**_DEV)
def _times_xt_pipe(acc, af, pf, smem, smem32, src, base, a_hi, a_lo, a_split, busy, XB, XS, D, HK, SWC, SW, NP, tid, NT, NPF, then_rows):  # fmt: skip
    """:func:`_times_xt` with the chunks of X double-buffered and loaded one chunk
    ahead. On entry ``pf`` holds chunk 0 (``_ldg_quads``, issued early by the caller) and
    buffer 0 is free. Buffer b: hi tile at 16-bit offset XB + 2b·XS, lo tile XS further.
    Per chunk kc: issue the 16-byte loads of chunk kc + 1, run chunk kc's mma (the same
    ones in the same order as ``_times_xt``), split and store chunk kc + 1 into the
    other buffer, one barrier. ``then_rows``: the chunk after the last is X's *row*
    chunk 0 (for :func:`_times_x_pipe`), left in buffer (D/HK) mod 2 behind a barrier."""
    for n in range(2 * NP):
        for e in range(4):
            acc[n, e] = ZERO
    sa = smem_addr(smem)
    lb_ = frag_rows_bt(cuda.threadIdx.x & 31, SWC)
    NC = D // HK
    _put_quads(smem32, XB, XB + XS, pf, D, HK, SWC, tid, NT, NPF)
    cuda.syncthreads()  # chunk 0 (and the caller's row tiles) written
    for kc in range(NC):
        cur = XB + (kc & 1) * 2 * XS
        nxt = XB + ((kc + 1) & 1) * 2 * XS
        if kc + 1 < NC:
            _ldg_quads(pf, src, base, 0, (kc + 1) * HK, D, HK, D, tid, NT, NPF)
        elif then_rows:
            _ldg_quads(pf, src, base, 0, 0, HK, D, D, tid, NT, NPF)
        if busy:
            b_hi = sa + (cur + lb_) * 2
            _xt_chunk(
                acc, af, smem, a_hi, a_lo, a_split, kc * HK * 2, b_hi, b_hi + XS * 2, HK, SWC, NP
            )
        if kc + 1 < NC:
            _put_quads(smem32, nxt, nxt + XS, pf, D, HK, SWC, tid, NT, NPF)
            cuda.syncthreads()  # chunk kc + 1 written, chunk kc consumed
        elif then_rows:
            _put_quads(smem32, nxt, nxt + XS, pf, HK, D, SW, tid, NT, NPF)
            cuda.syncthreads()


@_compat.device(**_DEV)
def _times_x_pipe(acc, af, pf, smem, smem32, src, base, a_hi, a_lo, busy, XB, XS, b0, D, HK, SW, NP, tid, NT, NPF):  # fmt: skip
    """:func:`_times_x` double-buffered: on entry buffer ``b0`` holds X's row chunk 0
    (left there by ``_times_xt_pipe(..., then_rows=True)``) and the other buffer is
    free. Same mma in the same order as ``_times_x``; one barrier per chunk but the
    last."""
    for n in range(2 * NP):
        for e in range(4):
            acc[n, e] = ZERO
    sa = smem_addr(smem)
    lb_ = frag_rows_a(cuda.threadIdx.x & 31, SW)
    NC = D // HK
    for kc in range(NC):
        cur = XB + ((b0 + kc) & 1) * 2 * XS
        nxt = XB + ((b0 + kc + 1) & 1) * 2 * XS
        if kc + 1 < NC:
            _ldg_quads(pf, src, base, (kc + 1) * HK, 0, HK, D, D, tid, NT, NPF)
        if busy:
            b_hi = sa + (cur + lb_) * 2
            _x_chunk(acc, af, smem, a_hi, a_lo, kc * HK * 2, b_hi, b_hi + XS * 2, HK, SW, NP)
        if kc + 1 < NC:
            _put_quads(smem32, nxt, nxt + XS, pf, HK, D, SW, tid, NT, NPF)
            cuda.syncthreads()


@_compat.device(**_DEV)
def _chain(acc, x, xa, row8, mx0, inv0, mx1, inv1, ok0, ok1, fm, f16, NN):
    """dφ -> dx in place for a lane's two rows of C fragments: row g (elements 0, 1
    of each n8 tile) and row g + 8 (elements 2, 3); ``x[xa + 8n + e]`` (int16 bits of
    the input, ``f16`` or bf16) is row g's input at the lane's column 8n + 2t + e,
    row g + 8's is ``row8`` (= 8·D) further. (mx, inv): the rows' softmax stats. Softmax's φ·dφ
    is summed over the quad's four lanes (all lanes must call this)."""
    if fm == 0:
        s0 = ZERO
        s1 = ZERO
        for n in range(NN):
            for e in range(2):
                x0 = _in_f32(int32(x[u64(xa + 8 * n + e)]), f16) if ok0 else ZERO
                x1 = _in_f32(int32(x[u64(xa + row8 + 8 * n + e)]), f16) if ok1 else ZERO
                s0 += acc[n, e] * _phi_at(x0, mx0, inv0, 0)
                s1 += acc[n, 2 + e] * _phi_at(x1, mx1, inv1, 0)
        s0 += shfl_xor(s0, 1)
        s1 += shfl_xor(s1, 1)
        s0 += shfl_xor(s0, 2)
        s1 += shfl_xor(s1, 2)
        for n in range(NN):
            for e in range(2):
                x0 = _in_f32(int32(x[u64(xa + 8 * n + e)]), f16) if ok0 else ZERO
                x1 = _in_f32(int32(x[u64(xa + row8 + 8 * n + e)]), f16) if ok1 else ZERO
                acc[n, e] = _phi_at(x0, mx0, inv0, 0) * (acc[n, e] - s0)
                acc[n, 2 + e] = _phi_at(x1, mx1, inv1, 0) * (acc[n, 2 + e] - s1)
    else:
        for n in range(NN):
            for e in range(2):
                x0 = _in_f32(int32(x[u64(xa + 8 * n + e)]), f16) if ok0 else ZERO
                x1 = _in_f32(int32(x[u64(xa + row8 + 8 * n + e)]), f16) if ok1 else ZERO
                acc[n, e] = acc[n, e] * _slope_at(x0, fm)
                acc[n, 2 + e] = acc[n, 2 + e] * _slope_at(x1, fm)


@_compat.device(**_DEV)
def _add_rows(out, oa, acc, D, ok0, ok1, NN):
    """``out[row g / g + 8, lane's columns] += acc`` (fp32, flat; ``oa`` = row g's
    element at the lane's first column, 2t)."""
    if ok0:
        for n in range(NN):
            for x in range(2):
                g = u64(oa + 8 * n + x)
                out[g] = out[g] + acc[n, x]
    if ok1:
        for n in range(NN):
            for x in range(2):
                g = u64(oa + 8 * D + 8 * n + x)
                out[g] = out[g] + acc[n, 2 + x]


@kernel_factory
def make_dq_linear_kernel(kind, D, BQ, HK, l_half, pipelined=False, q_bf16=False):
    """Build ``dq_linear(q, o_l, do_l, lstate, n_marg, dq, qstate, H, Nq, Mq, fm, eps)``
    (module doc). Grid (ceil(Nq/BQ), H, B), 2·BQ threads. ``l_half``: o_l / do_l are
    int16 bits of ``kind`` (else fp32). ``pipelined``: H_i's chunks double-buffered and
    loaded one ahead (module doc, "The pipelined kernels"; same bits; lstate must be
    16-byte aligned). ``q_bf16``: qstate is int16, each QO_i / QD_i value rounded to
    bf16 (nearest even) and its bits stored (``SLA_NUMBA_GRAD_STATES=bf16``). Returns a
    :class:`LinearGradKernel`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not linear_grad_tc_supported(D, BQ):
        raise ValueError(f"D = {D}, block_q = {BQ}: not supported")
    if HK % 16 or D % HK:
        raise ValueError(f"chunk of {HK} columns does not divide D = {D} in k16 steps")
    NW = BQ // 16
    NT = 32 * NW
    C = D // 2  # values of a row per lane (lane pairs)
    SW = D + PAD  # row tiles' stride (16-bit values)
    SWC = HK + PAD  # column-chunk tile stride
    IN_F16 = kind == "f16"
    L_HALF = bool(l_half)
    DO_SPLIT = not (L_HALF and kind == "bf16")  # bf16 dO_l is exact: one term
    # shared memory, 16-bit offsets: row tiles [BQ][SW], chunk tiles [D][SWC]
    DOH = 0
    DOL = BQ * SW
    CH = 2 * BQ * SW
    CL = 3 * BQ * SW
    XH = 4 * BQ * SW
    XL = XH + D * SWC
    PIPE = bool(pipelined)
    Q16 = bool(q_bf16)
    QZERO = int16(0) if Q16 else ZERO  # bf16 0.0 has all bits 0
    NPF = prefetch_slots(D, HK, NT)
    # pipelined: two buffers, each a hi and a lo tile of D * SWC (XH, XL = buffer 0's)
    # fp32 area (32-bit index): rows [BQ][4], then Z [D]
    F32 = (XL + (3 if PIPE else 1) * D * SWC) // 2
    ZOFF = F32 + 4 * BQ
    SMEM = (ZOFF + D) * 4
    NN = D // 8
    NP = D // 16
    W = D * D + D
    KS2 = BQ // 16  # pass-2 k-steps (the block's rows)
    ALIGNED = not SIMULATED

    @_compat.kernel(fastmath=FASTMATH)
    def dq_linear(q, o_l, do_l, lstate, n_marg, dq, qstate, H, Nq, Mq, fm, eps):
        if ALIGNED:
            smem = cuda.shared.array(0, int16, alignment=16)
            smem32 = cuda.shared.array(0, int32, alignment=16)
            smemf = cuda.shared.array(0, float32, alignment=16)
        else:
            smem = cuda.shared.array(0, int16)
            smem32 = cuda.shared.array(0, int32)
            smemf = cuda.shared.array(0, float32)
        xs = cuda.local.array(C, float32)
        acc = cuda.local.array((NN, 4), float32)
        af = cuda.local.array((2, 4), int32)
        pf = cuda.local.array((NPF, 4), float32)  # pipelined: a chunk in flight
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        r0 = i * BQ
        nrows = min(Nq - r0, BQ)
        ob = (bh * Nq + r0) * D  # first value of the block's rows (int64)
        sb = (bh * Mq + i) * W  # lstate / qstate row
        if n_marg[u64(bh * Mq + i)] <= 0:  # no marginal key block: no linear gradient
            for x in range(tid, W, NT):
                qstate[u64(sb + x)] = QZERO
            return
        if PIPE:  # H_i's first chunk: in flight during phase 0
            _ldg_quads(pf, lstate, sb, 0, 0, D, HK, D, tid, NT, NPF)

        # --- 0. rows: φ(q_r), den_r, δl_r; ĉ and dO_l into shared tiles
        r = tid >> 1
        li = tid & 1
        ok = r < nrows
        gq = ob + (r if ok else 0) * D + li * C  # rows past the end read row 0, unused
        mx, inv = _load_phi_row(xs, q, gq, ok, C, fm, IN_F16)
        den = ZERO
        dl = ZERO
        for c in range(C):
            den += xs[c] * lstate[u64(sb + D * D + li * C + c)]
            if ok:
                if L_HALF:
                    dl += _in_f32(int32(o_l[u64(gq + c)]), IN_F16) * _in_f32(
                        int32(do_l[u64(gq + c)]), IN_F16
                    )
                else:
                    dl += float32(o_l[u64(gq + c)]) * float32(do_l[u64(gq + c)])
        den += shfl_xor(den, 1)
        dl += shfl_xor(dl, 1)
        inv_den = ONE / (den + eps) if ok else ZERO
        if not ok:
            dl = ZERO
        if li == 0:
            smemf[F32 + 4 * r] = mx
            smemf[F32 + 4 * r + 1] = inv
            smemf[F32 + 4 * r + 2] = inv_den
            smemf[F32 + 4 * r + 3] = dl
        si = (r * SW + li * C) >> 1  # int32 index of the pair (r, li*C)
        for c2 in range(C // 2):
            p, pl = _split_pair(xs[2 * c2] * inv_den, xs[2 * c2 + 1] * inv_den)
            smem32[si + (CH >> 1) + c2] = p if ok else ZI
            smem32[si + (CL >> 1) + c2] = pl if ok else ZI
        for c2 in range(C // 2):
            g = gq + 2 * c2
            if L_HALF and not IN_F16:  # bf16 bits: copied as they are
                p = (int32(do_l[u64(g)]) & 0xFFFF) | (int32(do_l[u64(g + 1)]) << 16)
                pl = ZI
            elif L_HALF:
                p, pl = _split_pair(
                    _in_f32(int32(do_l[u64(g)]), IN_F16), _in_f32(int32(do_l[u64(g + 1)]), IN_F16)
                )
            else:
                p, pl = _split_pair(float32(do_l[u64(g)]), float32(do_l[u64(g + 1)]))
            smem32[si + (DOH >> 1) + c2] = p if ok else ZI
            if DO_SPLIT:
                smem32[si + (DOL >> 1) + c2] = pl if ok else ZI
        for x in range(tid, D, NT):
            smemf[ZOFF + x] = lstate[u64(sb + D * D + x)]

        # --- 1. dφ(q) = (dO_l · H_iᵀ − δl Z_i) / den, H_i staged HK columns at a time
        sa = smem_addr(smem)
        a_rows = sa + (warp * 16 * SW + frag_rows_a(lane, SW)) * 2
        busy = warp * 16 < nrows
        if PIPE:
            _times_xt_pipe(acc, af, pf, smem, smem32, lstate, sb, a_rows + DOH * 2,
                           a_rows + DOL * 2, DO_SPLIT, busy, XH, D * SWC, D, HK, SWC, SW, NP,
                           tid, NT, NPF, False)  # fmt: skip
        else:
            _times_xt(acc, af, smem, smem32, lstate, sb, a_rows + DOH * 2, a_rows + DOL * 2,
                      DO_SPLIT, busy, XH, XL, D, HK, SWC, NP, tid, NT)  # fmt: skip
        # epilogue: rows ra (elements 0, 1) and ra + 8 (2, 3); columns 8n + 2t + x
        t = lane & 3
        ra = warp * 16 + (lane >> 2)
        f0 = F32 + 4 * ra
        f1 = f0 + 32
        for n in range(NN):
            for x in range(2):
                zc = smemf[ZOFF + 8 * n + 2 * t + x]
                acc[n, x] = (acc[n, x] - smemf[f0 + 3] * zc) * smemf[f0 + 2]
                acc[n, 2 + x] = (acc[n, 2 + x] - smemf[f1 + 3] * zc) * smemf[f1 + 2]
        ok0 = ra < nrows
        ok1 = ra + 8 < nrows
        qa = ob + ra * D + 2 * t
        mx0, iv0, mx1, iv1 = smemf[f0], smemf[f0 + 1], smemf[f1], smemf[f1 + 1]
        _chain(acc, q, qa, D * 8, mx0, iv0, mx1, iv1, ok0, ok1, fm, IN_F16, NN)
        _add_rows(dq, qa, acc, D, ok0, ok1, NN)

        # --- 2. QO_i = ĉᵀ · dO_l (D x D): item = m16 tile mt of d1, all D columns
        a_t = sa + frag_rows_bt(lane, SW) * 2  # ĉᵀ by ldmatrix.trans of [r][d1]
        b_t = sa + frag_rows_a(lane, SW) * 2  # dO_l by ldmatrix.trans of [r][e]
        g8 = lane >> 2
        for mt in range(warp, D // 16, NW):
            for n in range(NN):
                for e in range(4):
                    acc[n, e] = ZERO
            for ks in range(KS2):
                ao = (ks * 16 * SW + mt * 16) * 2
                a0, a1, a2, a3 = ldsm_x4_trans(smem, a_t + CH * 2 + ao, 0)
                af[0, 0], af[0, 1], af[0, 2], af[0, 3] = a0, a1, a2, a3
                a0, a1, a2, a3 = ldsm_x4_trans(smem, a_t + CL * 2 + ao, 0)
                af[1, 0], af[1, 1], af[1, 2], af[1, 3] = a0, a1, a2, a3
                for p in range(NP):
                    bo = (ks * 16 * SW + p * 16) * 2
                    h0, h1, h2, h3 = ldsm_x4_trans(smem, b_t + DOH * 2 + bo, 0)
                    _mma_tile(acc, 2 * p, af, 0, h0, h1)
                    _mma_tile(acc, 2 * p, af, 1, h0, h1)
                    _mma_tile(acc, 2 * p + 1, af, 0, h2, h3)
                    _mma_tile(acc, 2 * p + 1, af, 1, h2, h3)
                    if DO_SPLIT:
                        l0, l1, l2, l3 = ldsm_x4_trans(smem, b_t + DOL * 2 + bo, 0)
                        _mma_tile(acc, 2 * p, af, 0, l0, l1)
                        _mma_tile(acc, 2 * p + 1, af, 0, l2, l3)
            so = sb + (mt * 16 + g8) * D + 2 * t
            for n in range(NN):
                if Q16:  # each pair rounded to bf16, stored as two 16-bit values
                    p = pack_bf16x2(acc[n, 0], acc[n, 1])
                    qstate[u64(so + 8 * n)] = _low16(p)
                    qstate[u64(so + 8 * n + 1)] = _high16(p)
                    p = pack_bf16x2(acc[n, 2], acc[n, 3])
                    qstate[u64(so + 8 * D + 8 * n)] = _low16(p)
                    qstate[u64(so + 8 * D + 8 * n + 1)] = _high16(p)
                else:
                    for x in range(2):
                        qstate[u64(so + 8 * n + x)] = acc[n, x]
                        qstate[u64(so + 8 * D + 8 * n + x)] = acc[n, 2 + x]
        # QD_i[d1] = Σ_r ĉ[r][d1] · δl_r (rows past the block: ĉ = 0, δl = 0)
        for d1 in range(tid, D, NT):
            s = ZERO
            for rr in range(BQ):
                pr = smem32[(rr * SW + (d1 & ~1) + CH) >> 1]
                pl = smem32[(rr * SW + (d1 & ~1) + CL) >> 1]
                if d1 & 1:
                    cv = bf16_high_f32(pr) + bf16_high_f32(pl)
                else:
                    cv = bf16_low_f32(pr) + bf16_low_f32(pl)
                s += cv * smemf[F32 + 4 * rr + 3]
            if Q16:
                qstate[u64(sb + D * D + d1)] = _low16(pack_bf16x2(s, s))
            else:
                qstate[u64(sb + D * D + d1)] = s

    return LinearGradKernel(dq_linear, SMEM, NT)


@kernel_factory
def make_dkdv_linear_kernel(kind, D, BK, HK, pipelined=False):
    """Build ``dkdv_linear(k, v, dh, n_marg, dk, dv, H, Nk, Mk, fm)`` (module doc).
    Grid (ceil(Nk/BK), H, B), 2·BK threads. ``pipelined``: dH_j's column and row chunks
    as one double-buffered stream loaded one chunk ahead (module doc, "The pipelined
    kernels"; same bits; dh must be 16-byte aligned). Returns a
    :class:`LinearGradKernel`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not linear_grad_tc_supported(D, BK):
        raise ValueError(f"D = {D}, block_k = {BK}: not supported")
    if HK % 16 or D % HK:
        raise ValueError(f"chunk of {HK} rows does not divide D = {D} in k16 steps")
    NW = BK // 16
    NT = 32 * NW
    C = D // 2
    SW = D + PAD
    SWC = HK + PAD
    IN_F16 = kind == "f16"
    V_SPLIT = IN_F16  # bf16 v is exact: one term
    # shared memory, 16-bit offsets: φ hi / lo and v hi / lo tiles [BK][SW]; the chunk
    # area holds either dH's column chunk [D][SWC] (pass 1) or its row chunk [HK][SW]
    PH = 0
    PL = BK * SW
    VH = 2 * BK * SW
    VL = 3 * BK * SW
    XH = 4 * BK * SW
    XSZ = max(D * SWC, HK * SW)
    XL = XH + XSZ
    PIPE = bool(pipelined)
    NPF = prefetch_slots(D, HK, NT)
    # pipelined: two buffers of a hi and a lo tile of XSZ each (XH, XL = buffer 0's)
    F32 = (XL + (3 if PIPE else 1) * XSZ) // 2  # fp32: rows [BK][2] (mx, inv), then dZ [D]
    ZOFF = F32 + 2 * BK
    SMEM = (ZOFF + D) * 4
    NN = D // 8
    NP = D // 16
    W = D * D + D
    ALIGNED = not SIMULATED

    @_compat.kernel(fastmath=FASTMATH)
    def dkdv_linear(k, v, dh, n_marg, dk, dv, H, Nk, Mk, fm):
        if ALIGNED:
            smem = cuda.shared.array(0, int16, alignment=16)
            smem32 = cuda.shared.array(0, int32, alignment=16)
            smemf = cuda.shared.array(0, float32, alignment=16)
        else:
            smem = cuda.shared.array(0, int16)
            smem32 = cuda.shared.array(0, int32)
            smemf = cuda.shared.array(0, float32)
        xs = cuda.local.array(C, float32)
        acc = cuda.local.array((NN, 4), float32)
        af = cuda.local.array((2, 4), int32)
        pf = cuda.local.array((NPF, 4), float32)  # pipelined: a chunk in flight
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        j = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        c0 = j * BK
        nrows = min(Nk - c0, BK)
        ob = (bh * Nk + c0) * D
        sb = (bh * Mk + j) * W
        if n_marg[u64(bh * Mk + j)] <= 0:  # no query block takes j as marginal
            return
        if PIPE:  # dH_j's first column chunk: in flight during phase 0
            _ldg_quads(pf, dh, sb, 0, 0, D, HK, D, tid, NT, NPF)

        # --- 0. rows: φ(k_c) hi / lo, v_c (bits, or hi / lo for fp16), dZ_j
        r = tid >> 1
        li = tid & 1
        ok = r < nrows
        gk = ob + (r if ok else 0) * D + li * C  # rows past the end read row 0, unused
        mx, inv = _load_phi_row(xs, k, gk, ok, C, fm, IN_F16)
        if li == 0:
            smemf[F32 + 2 * r] = mx
            smemf[F32 + 2 * r + 1] = inv
        si = (r * SW + li * C) >> 1
        for c2 in range(C // 2):
            p, pl = _split_pair(xs[2 * c2], xs[2 * c2 + 1])
            smem32[si + (PH >> 1) + c2] = p if ok else ZI
            smem32[si + (PL >> 1) + c2] = pl if ok else ZI
            g = gk + 2 * c2
            if V_SPLIT:
                p, pl = _split_pair(
                    _in_f32(int32(v[u64(g)]), True), _in_f32(int32(v[u64(g + 1)]), True)
                )
                smem32[si + (VL >> 1) + c2] = pl if ok else ZI
            else:
                p = (int32(v[u64(g)]) & 0xFFFF) | (int32(v[u64(g + 1)]) << 16)
            smem32[si + (VH >> 1) + c2] = p if ok else ZI
        for x in range(tid, D, NT):
            smemf[ZOFF + x] = dh[u64(sb + D * D + x)]

        # --- 1. dφ(k) = v · dH_jᵀ − dZ_j, dH_j staged HK columns at a time
        sa = smem_addr(smem)
        a_rows = sa + (warp * 16 * SW + frag_rows_a(lane, SW)) * 2
        busy = warp * 16 < nrows
        if PIPE:  # ... and leaves dH_j's row chunk 0 staged for pass 2
            _times_xt_pipe(acc, af, pf, smem, smem32, dh, sb, a_rows + VH * 2,
                           a_rows + VL * 2, V_SPLIT, busy, XH, XSZ, D, HK, SWC, SW, NP, tid,
                           NT, NPF, True)  # fmt: skip
        else:
            _times_xt(acc, af, smem, smem32, dh, sb, a_rows + VH * 2, a_rows + VL * 2,
                      V_SPLIT, busy, XH, XL, D, HK, SWC, NP, tid, NT)  # fmt: skip
        t = lane & 3
        ra = warp * 16 + (lane >> 2)
        for n in range(NN):
            for x in range(2):
                zc = smemf[ZOFF + 8 * n + 2 * t + x]
                acc[n, x] = acc[n, x] - zc
                acc[n, 2 + x] = acc[n, 2 + x] - zc
        ok0 = ra < nrows
        ok1 = ra + 8 < nrows
        ka = ob + ra * D + 2 * t
        f0 = F32 + 2 * ra
        f1 = f0 + 16
        mx0, iv0, mx1, iv1 = smemf[f0], smemf[f0 + 1], smemf[f1], smemf[f1 + 1]
        _chain(acc, k, ka, D * 8, mx0, iv0, mx1, iv1, ok0, ok1, fm, IN_F16, NN)
        _add_rows(dk, ka, acc, D, ok0, ok1, NN)

        # --- 2. dv += φ(K) · dH_j, dH_j staged HK rows at a time
        if PIPE:
            _times_x_pipe(acc, af, pf, smem, smem32, dh, sb, a_rows + PH * 2, a_rows + PL * 2,
                          busy, XH, XSZ, (D // HK) & 1, D, HK, SW, NP, tid, NT, NPF)  # fmt: skip
        else:
            _times_x(acc, af, smem, smem32, dh, sb, a_rows + PH * 2, a_rows + PL * 2, busy,
                     XH, XH + HK * SW, D, HK, SW, NP, tid, NT)  # fmt: skip
        _add_rows(dv, ka, acc, D, ok0, ok1, NN)

    return LinearGradKernel(dkdv_linear, SMEM, NT)


_kernels = {}

#: The pipelined kernels' chunk (columns / rows of the state) on the GPU when the caller
#: gives none; ``tools/sweep_linear_backward.py --hk`` times others (16 needs fewer
#: registers; 64 spills). The register kernels keep ``tc/linear.py``'s ``GPU_HK``.
PIPE_GPU_HK = 32


def _chunk(D, hk, pipelined):
    if hk is None and pipelined and not SIMULATED:
        hk = PIPE_GPU_HK
    return chunk_rows(D, hk)


def get_dq_linear_kernel(kind, D, BQ, l_half, hk=None, pipelined=False, q_bf16=False):
    """The dq kernel for (kind, D, BQ, l_half, chunk, pipelined, q_bf16), built once."""
    HK = _chunk(D, hk, pipelined)
    key = ("dq", kind, int(D), int(BQ), bool(l_half), HK, bool(pipelined), bool(q_bf16))
    if key not in _kernels:
        args = (kind, int(D), int(BQ), HK, bool(l_half))
        # keywords only where they differ from the defaults: the recipes of the kernels
        # made before the options existed stay the same
        kw = {k: True for k, v in (("pipelined", pipelined), ("q_bf16", q_bf16)) if v}
        _kernels[key] = make_dq_linear_kernel(*args, **kw)
    return _kernels[key]


def get_dkdv_linear_kernel(kind, D, BK, hk=None, pipelined=False):
    """The dk / dv kernel for (kind, D, BK, chunk, pipelined), built once."""
    HK = _chunk(D, hk, pipelined)
    key = ("dkdv", kind, int(D), int(BK), HK, bool(pipelined))
    if key not in _kernels:
        args = (kind, int(D), int(BK), HK)
        _kernels[key] = (
            make_dkdv_linear_kernel(*args, pipelined=True)
            if pipelined
            else (make_dkdv_linear_kernel(*args))
        )
    return _kernels[key]


def use_pipelined(pipeline, state):
    """Whether a launch takes the pipelined kernel: ``pipeline`` None follows
    ``SLA_NUMBA_LINEAR_GRAD`` (``config.linear_grad_kernel``), else its truth. The
    pipelined kernels read the state with 16-byte loads: a state whose first element is
    not 16-byte aligned (an offset view) takes the register kernel (same bits)."""
    if pipeline is None:
        from ... import config

        # 'wgmma' (tc/linear_backward_wgmma.py) covers dk / dv on Hopper only: whatever
        # it does not take runs on the pipelined kernels
        pipeline = config.linear_grad_kernel() in ("pipelined", "wgmma")
    if not pipeline:
        return False
    addr = address(state)
    return addr is not None and addr % 16 == 0


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------


def _wgmma_takes(kind, D, block, state):
    from .linear_backward_wgmma import use_wgmma

    return use_wgmma(kind, D, block, state)


def _check_common(who, kind, D, block, fm, B, H):
    if kind not in KINDS:
        raise ValueError(f"{who}: kind {kind!r}")
    if not linear_grad_tc_supported(D, block):
        raise ValueError(f"{who}: D = {D}, block = {block} not supported")
    if fm not in (0, 1, 2):
        raise ValueError(f"{who}: feature map code {fm}")
    if H > 65535 or B > 65535:
        raise ValueError(f"{who}: H or B too large for the grid")


def _blocks_of(who, state, B, H, W, need):
    if dtype_name(state) != "float32":
        raise TypeError(f"{who}: states must be float32")
    if size(state) % (B * H * W):
        raise ValueError(f"{who}: state size is not B*H*M*(D*D + D)")
    M = size(state) // (B * H * W)
    if M < need:
        raise ValueError(f"{who}: state has {M} blocks, {need} needed")
    return M


def launch_dq_linear_tc(
    kind,
    q_bits,
    o_l,
    do_l,
    lstate,
    n_marg,
    dq,
    qstate,
    B,
    H,
    Nq,
    D,
    block_q,
    fm,
    eps,
    stream,
    hk=None,
    pipeline=None,
    wgmma=None,
):
    """Add the linear branch's dq into ``dq`` and write QO_i / QD_i into ``qstate``.

    kind 'bf16' / 'f16'; q_bits int16 (B, H, Nq, D); o_l, do_l (B, H, Nq, D) both float32
    or both int16 bits of ``kind``; lstate (rows' H_i, Z_i) fp32 and qstate fp32 or int16
    (bf16 bits of each value) (B, H, Mq, D*D + D); n_marg int32 (B, H, Mq); dq fp32 (B, H, Nq, D), added to. Flat views
    accepted; Numba device arrays or torch / CuPy CUDA tensors (numpy under the
    simulator). ``hk``: columns of H_i staged at a time (tests). ``pipeline``: None
    follows ``SLA_NUMBA_LINEAR_GRAD``; True / False force the pipelined / register kernel
    (same bits; :func:`use_pipelined`); "wgmma" the Hopper kernel
    (``tc/linear_backward_wgmma.py``, whose ``launch_dq_linear_wgmma`` checks that it
    takes the configuration; ``wgmma``: its variant options, a dict). With neither ``hk``
    nor ``pipeline`` given,
    ``SLA_NUMBA_LINEAR_GRAD=wgmma`` sends a configuration it takes there (cc 9.0, D 64 /
    128, block 64, a 16-byte aligned lstate).
    """
    who = "launch_dq_linear_tc"
    B, H, Nq, D, block_q, fm = (int(x) for x in (B, H, Nq, D, block_q, fm))
    _check_common(who, kind, D, block_q, fm, B, H)
    nblk = -(-Nq // block_q)
    if nblk <= 0 or B * H == 0:
        return
    W = D * D + D
    Mq = _blocks_of(who, lstate, B, H, W, nblk)
    if size(qstate) != size(lstate) or dtype_name(qstate) not in ("float32", "int16"):
        raise ValueError(f"{who}: qstate must be float32 (or int16: bf16 bits) of lstate's size")
    q_bf16 = dtype_name(qstate) == "int16"
    l_types = {dtype_name(o_l), dtype_name(do_l)}
    if l_types == {"float32"}:
        l_half = False
    elif l_types == {"int16"}:
        l_half = True
    else:
        raise TypeError(f"{who}: o_l and do_l must both be float32 or both int16 bits")
    if dtype_name(dq) != "float32" or dtype_name(n_marg) != "int32":
        raise TypeError(f"{who}: dq must be float32 and n_marg int32")
    n = B * H * Nq * D
    if min(size(q_bits), size(o_l), size(do_l), size(dq)) < n:
        raise ValueError(f"{who}: q / o_l / do_l / dq smaller than B*H*Nq*D")
    if size(n_marg) < B * H * Mq:
        raise ValueError(f"{who}: n_marg smaller than B*H*Mq")
    if pipeline == "wgmma" or (pipeline is None and hk is None and _wgmma_takes(kind, D, block_q, lstate)):  # fmt: skip
        from .linear_backward_wgmma import make_dq_linear_wgmma  # SLA_NUMBA_LINEAR_GRAD=wgmma

        kern = make_dq_linear_wgmma(kind, D, l_half, q_bf16, **(wgmma or {}))
    else:
        pipe = use_pipelined(pipeline, lstate)
        kern = get_dq_linear_kernel(kind, D, block_q, l_half, hk, pipe, q_bf16)
    args = (
        flat(q_bits),
        flat(o_l),
        flat(do_l),
        flat(lstate),
        flat(n_marg),
        flat(dq),
        flat(qstate),
        H,
        Nq,
        Mq,
        fm,
        np.float32(eps),
    )
    _tc_build.launch(kern.kernel, (nblk, H, B), kern.threads, kern.smem_bytes, stream, args)


def launch_dkdv_linear_tc(
    kind, k_bits, v_bits, dh, n_marg, dk, dv, B, H, Nk, D, block_k, fm, stream, hk=None,
    pipeline=None,
):  # fmt: skip
    """Add the linear branch's dk, dv into ``dk``, ``dv``.

    kind 'bf16' / 'f16'; k_bits, v_bits int16 (B, H, Nk, D); dh fp32 (B, H, Mk, D*D + D)
    (rows [vec(dH_j), dZ_j]); n_marg int32 (B, H, Mk) (query blocks that take j as
    marginal); dk, dv fp32 (B, H, Nk, D), added to. Flat views accepted. ``hk``, and
    ``pipeline`` as in :func:`launch_dq_linear_tc`; with neither given,
    ``SLA_NUMBA_LINEAR_GRAD=wgmma`` sends a configuration the wgmma kernel takes there
    (``tc/linear_backward_wgmma.py``: cc 9.0, D 64 / 128, block 64, a 16-byte aligned
    dh).
    """
    who = "launch_dkdv_linear_tc"
    B, H, Nk, D, block_k, fm = (int(x) for x in (B, H, Nk, D, block_k, fm))
    _check_common(who, kind, D, block_k, fm, B, H)
    nblk = -(-Nk // block_k)
    if nblk <= 0 or B * H == 0:
        return
    Mk = _blocks_of(who, dh, B, H, D * D + D, nblk)
    if dtype_name(dk) != "float32" or dtype_name(dv) != "float32" or dtype_name(n_marg) != "int32":
        raise TypeError(f"{who}: dk, dv must be float32 and n_marg int32")
    n = B * H * Nk * D
    if min(size(k_bits), size(v_bits), size(dk), size(dv)) < n:
        raise ValueError(f"{who}: k / v / dk / dv smaller than B*H*Nk*D")
    if size(n_marg) < B * H * Mk:
        raise ValueError(f"{who}: n_marg smaller than B*H*Mk")
    if pipeline is None and hk is None and _wgmma_takes(kind, D, block_k, dh):
        from . import linear_backward_wgmma as _wg  # SLA_NUMBA_LINEAR_GRAD=wgmma

        _wg.launch_dkdv_linear_wgmma(
            kind, k_bits, v_bits, dh, n_marg, dk, dv, B, H, Nk, D, block_k, fm, stream
        )
        return
    kern = get_dkdv_linear_kernel(kind, D, block_k, hk, use_pipelined(pipeline, dh))
    args = (
        flat(k_bits),
        flat(v_bits),
        flat(dh),
        flat(n_marg),
        flat(dk),
        flat(dv),
        H,
        Nk,
        Mk,
        fm,
    )
    _tc_build.launch(kern.kernel, (nblk, H, B), kern.threads, kern.smem_bytes, stream, args)
