"""Sparse-branch backward on tensor cores (fp16 / bf16, compute capability >= 8.0).

FlashAttention-2 backward restricted to the critical blocks, deterministic (no
atomics): every output element is owned by exactly one warp.

    delta_r = O_s[r] . dO[r]                  (fp32, computed by the caller's array library)
    P   = exp(scale q.k - lse) = 2^(q.k * c - lse*log2 e),   c = scale * log2 e
    dP  = dO V^T          dS = P * (dP - delta)
    dQ  = scale * dS K    dK = scale * dS^T Q    dV = P^T dO

Two kernels (generated straight-line tile code, like ``forward_tc``):

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

Padding and tails: keys past Nk are zero-filled and masked to -inf in the dQ
kernel (P = 0); queries past Nq get lse2 = +inf in the dK/dV kernel (P = 0) and
zero Q / dO. Rows past N are never written; a query (key) block with no LUT
(reverse) entry gets dQ (dK, dV) = 0.

Outputs are float32 (the backend contract's compute dtype).
"""
import numpy as np

from . import build as _tc_build
from .ptx import LOG2E
from .forward import _load_tile_lines, kernel_variant, load_prelude_lines, tile_load_lines

#: Code style of the generator run in progress: 'v2' (immediate-offset ldmatrix,
#: straight-line tile loads, dK/dV with dP^T first) or 'v1' (the first version).
_STYLE = {"v2": True}


def _split_off(expr):
    """'1234 + var' / 'var' -> (var, 1234 / 0)."""
    parts = [x.strip() for x in expr.split("+")]
    const = sum(int(x) for x in parts if x.isdigit())
    names = [x for x in parts if not x.isdigit()]
    assert len(names) == 1, expr
    return names[0], const


def _ld(trans, expr, extra):
    """An ldmatrix call at element offset ``expr + extra``."""
    if not _STYLE["v2"]:
        fn = "ldmatrix_x4_trans" if trans else "ldmatrix_x4"
        return f"{fn}(smem, {expr} + {extra})"
    var, const = _split_off(expr)
    fn = "ldsm_x4_trans" if trans else "ldsm_x4"
    return f"{fn}(smem, {var}_b, {(const + extra) * 2})"


def _tile(ind, dst, src, base, row0, nrows, nvalid, D, SD, NT):
    if _STYLE["v2"]:
        return tile_load_lines(ind, dst, src, base, row0, nrows, nvalid, D, SD, NT)
    return _load_tile_lines(ind, dst, src, base, row0, nrows, nvalid, D, SD, NT)


def _byte_addrs(e, ind, names):
    if _STYLE["v2"]:
        for n in names:
            e(ind + f"{n}_b = sa + {n} * 2")

KERNELS = ("dq", "dkv")
KERNEL_NAMES = {"dq": "sla_bwd_dq_tc", "dkv": "sla_bwd_dkv_tc"}


def _lane_offsets(e, ind):
    """Per-lane ldmatrix row/column offsets (the two patterns of ``_mma``).

    ``p1``: rows ((lane>>3)&1)*8 + (lane&7), column (lane>>4)*8 -- A fragments of
    row-major tiles, and B fragments by ``ldmatrix.trans`` of [k x n] row-major tiles.
    ``p2``: rows (lane>>4)*8 + (lane&7), column ((lane>>3)&1)*8 -- B fragments of
    ``X^T`` by non-transposed ``ldmatrix`` of [n x k] row-major tiles.
    """
    e(ind + "p1r = ((lane >> 3) & 1) * 8 + (lane & 7)")
    e(ind + "p1c = (lane >> 4) * 8")
    e(ind + "p2r = (lane >> 4) * 8 + (lane & 7)")
    e(ind + "p2c = ((lane >> 3) & 1) * 8")


def _gemm(e, ind, mma, acc, n_tiles, k_steps, a_from, b_from, SD, zero_init):
    """Emit acc[16 x 8*n_tiles] (+)= A[16 x 16*k_steps] . B.

    acc(n) -> the 4 accumulator names of n-tile n.
    a_from: ("smem", offset_expr) -- ldmatrix of row-major A rows at offset + 16*ks;
            ("regs", fn) -- fn(ks) -> 4 names already packed.
    b_from: ("nk", offset_expr) -- B = X^T, X [n x k] row-major: ldmatrix at
                                   offset + np*16*SD + ks*16;
            ("kn", offset_expr) -- B = X, X [k x n] row-major: ldmatrix.trans at
                                   offset + ks*16*SD + np*16.
    """
    for ks in range(k_steps):
        if a_from[0] == "smem":
            e(ind + f"a0, a1, a2, a3 = {_ld(False, a_from[1], ks * 16)}")
            a = ("a0", "a1", "a2", "a3")
        else:
            a = a_from[1](ks)
        for np_ in range(n_tiles // 2):
            if b_from[0] == "nk":
                e(ind + f"b0, b1, b2, b3 = {_ld(False, b_from[1], np_ * 16 * SD + ks * 16)}")
            else:
                e(ind + f"b0, b1, b2, b3 = {_ld(True, b_from[1], ks * 16 * SD + np_ * 16)}")
            for h, (x, y) in enumerate((("b0", "b1"), ("b2", "b3"))):
                names = acc(2 * np_ + h)
                cin = "ZERO, ZERO, ZERO, ZERO" if (zero_init and ks == 0) else ", ".join(names)
                e(ind + f"{', '.join(names)} = {mma}({', '.join(a)}, {x}, {y}, {cin})")


def _pack_lines(e, ind, pack, src, dst, k_steps):
    """Pack fp32 C-layout tiles src(n) into A fragments dst_ks_0..3 (see _mma)."""
    for kk in range(k_steps):
        a, b = src(2 * kk), src(2 * kk + 1)
        e(ind + f"{dst}{kk}_0 = {pack}({a[0]}, {a[1]})")
        e(ind + f"{dst}{kk}_1 = {pack}({a[2]}, {a[3]})")
        e(ind + f"{dst}{kk}_2 = {pack}({b[0]}, {b[1]})")
        e(ind + f"{dst}{kk}_3 = {pack}({b[2]}, {b[3]})")


def _header(e, doc, kind):
    e('"""%s\nDo not edit: generated by sla_numba.gpu.tc.backward."""' % doc)
    e("import math")
    e("import numpy as np")
    e("from numba import cuda, int16, float32")
    e("from sla_numba.gpu.tc.ptx import (mma_%s, pack_%sx2, ldmatrix_x4, ldmatrix_x4_trans,"
      % (kind, kind))
    e("    cp_async16, cp_async_commit, cp_async_wait_all, exp2, smem_addr, ldsm_x4, ldsm_x4_trans,")
    e("    cp_async16i)")
    e("ZERO = np.float32(0.0)")
    e("NEG_INF = np.float32(-np.inf)")
    e("POS_INF = np.float32(np.inf)")
    e("LOG2E = np.float32(%r)" % LOG2E)


def _prelude(e, L, ind, D, SD, NT):
    if _STYLE["v2"]:
        e(ind + "sa = smem_addr(smem)")
        L.extend(load_prelude_lines(ind, D, SD, NT))


def dq_source(D, block_k, block_q, kind):
    BK, BQ = block_k, block_q
    NW, NT = BQ // 16, BQ // 16 * 32
    SD = D + 8
    QOFF, DOFF, KOFF, VOFF = 0, BQ * SD, 2 * BQ * SD, (2 * BQ + BK) * SD
    NKT, NDT = BK // 8, D // 8
    mma, pack = "mma_" + kind, "pack_%sx2" % kind
    L = []
    e = L.append
    _header(e, "dQ kernel: D=%d block_k=%d block_q=%d %s." % (D, BK, BQ, kind), kind)
    e("SMEM_BYTES = %d" % ((2 * BQ + 2 * BK) * SD * 2))
    e("THREADS = %d" % NT)
    e("")
    e("")
    e(_tc_build.jit_decorator())
    e("def sla_bwd_dq_tc(q, k, v, do, lse, delta, lut, counts, dq, nq, nk, mq, n_lut, c2, scale):")
    I, J = "    ", "        "
    e(I + _tc_build.smem_decl())
    for line in ("tid = cuda.threadIdx.x", "lane = tid & 31", "warp = tid >> 5", "g = lane >> 2",
                 "t = lane & 3", "qb = cuda.blockIdx.x", "bh = cuda.blockIdx.y",
                 "row0 = qb * %d" % BQ, "q_base = bh * nq * %d" % D,
                 "kv_base = bh * nk * %d" % D, "cnt = counts[bh * mq + qb]"):
        e(I + line)
    e(I + "if cnt == 0:")
    e(I + "    for idx in range(tid, %d, %d):" % (BQ * D, NT))
    e(I + "        r = row0 + idx // %d" % D)
    e(I + "        if r < nq:")
    e(I + "            dq[q_base + r * %d + idx %% %d] = ZERO" % (D, D))
    e(I + "    return")
    _prelude(e, L, I, D, SD, NT)
    e(I + "lut_base = (bh * mq + qb) * n_lut")
    e(I + "kb = lut[lut_base]")
    L.extend(_tile(I, QOFF, "q", "q_base", "row0", BQ, "nq - row0", D, SD, NT))
    L.extend(_tile(I, DOFF, "do", "q_base", "row0", BQ, "nq - row0", D, SD, NT))
    L.extend(_tile(I, KOFF, "k", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK, D, SD, NT))
    L.extend(_tile(I, VOFF, "v", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK, D, SD, NT))
    e(I + "cp_async_commit()")
    _lane_offsets(e, I)
    e(I + "aoff = (warp * 16 + p1r) * %d + p1c" % SD)
    e(I + "bn = p2r * %d + p2c" % SD)
    e(I + "bt = p1r * %d + p1c" % SD)
    _byte_addrs(e, I, ("aoff", "bn", "bt"))
    for r in range(2):
        e(I + f"ra = row0 + warp * 16 + g + {8 * r}")
        e(I + f"ls_{r} = lse[bh * nq + ra] * LOG2E if ra < nq else ZERO")
        e(I + f"dl_{r} = delta[bh * nq + ra] if ra < nq else ZERO")
    for d in range(NDT):
        e(I + " = ".join(f"q_{d}_{x}" for x in range(4)) + " = ZERO")
    e(I + "for it in range(cnt):")
    e(J + "cp_async_wait_all()")
    e(J + "cuda.syncthreads()")
    e(J + "# S = Q K^T, dP = dO V^T")
    _gemm(e, J, mma, lambda n: [f"s_{n}_{x}" for x in range(4)], NKT, D // 16,
          ("smem", "aoff"), ("nk", f"{KOFF} + bn"), SD, True)
    _gemm(e, J, mma, lambda n: [f"p_{n}_{x}" for x in range(4)], NKT, D // 16,
          ("smem", f"{DOFF} + aoff"), ("nk", f"{VOFF} + bn"), SD, True)
    e(J + "nvalid = nk - kb * %d" % BK)
    e(J + "if nvalid < %d:" % BK)
    e(J + "    c0 = 2 * t")
    for n in range(NKT):
        for odd in range(2):
            e(J + f"    if c0 + {8 * n + odd} >= nvalid:")
            e(J + f"        s_{n}_{odd} = s_{n}_{odd + 2} = NEG_INF")
    e(J + "# P = 2^(S c - lse2), dS = P (dP - delta)")
    for n in range(NKT):
        for x in range(4):
            r = x >> 1
            e(J + f"s_{n}_{x} = exp2(s_{n}_{x} * c2 - ls_{r})")
            e(J + f"s_{n}_{x} = s_{n}_{x} * (p_{n}_{x} - dl_{r})")
    _pack_lines(e, J, pack, lambda n: [f"s_{n}_{x}" for x in range(4)], "ds", BK // 16)
    e(J + "# dQ += dS K")
    _gemm(e, J, mma, lambda n: [f"q_{n}_{x}" for x in range(4)], NDT, BK // 16,
          ("regs", lambda kk: [f"ds{kk}_{x}" for x in range(4)]), ("kn", f"{KOFF} + bt"), SD, False)
    e(J + "cuda.syncthreads()")
    e(J + "if it + 1 < cnt:")
    e(J + "    kb = lut[lut_base + it + 1]")
    L.extend(_tile(J + I, KOFF, "k", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK, D, SD, NT))
    L.extend(_tile(J + I, VOFF, "v", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK, D, SD, NT))
    e(J + "    cp_async_commit()")
    for r in range(2):
        e(I + f"ra = row0 + warp * 16 + g + {8 * r}")
        e(I + "if ra < nq:")
        e(I + "    ob = q_base + ra * %d + 2 * t" % D)
        for d in range(NDT):
            e(I + f"    dq[ob + {8 * d}] = q_{d}_{2 * r} * scale")
            e(I + f"    dq[ob + {8 * d + 1}] = q_{d}_{2 * r + 1} * scale")
    return "\n".join(L) + "\n"


def dkv_source(D, block_k, block_q, kind):
    BK, BQ = block_k, block_q
    QC = min(BQ, 64)
    CPB = BQ // QC
    NT = BK // 16 * 32
    SD = D + 8
    KOFF, VOFF, QOFF, DOFF = 0, BK * SD, 2 * BK * SD, (2 * BK + QC) * SD
    FOFF = (2 * BK + 2 * QC) * SD // 2          # float32 index of lse2[QC], delta[QC]
    NQT, NDT = QC // 8, D // 8
    mma, pack = "mma_" + kind, "pack_%sx2" % kind
    L = []
    e = L.append
    _header(e, "dK/dV kernel: D=%d block_k=%d block_q=%d %s." % (D, BK, BQ, kind), kind)
    e("SMEM_BYTES = %d" % ((2 * BK + 2 * QC) * SD * 2 + 2 * QC * 4))
    e("THREADS = %d" % NT)
    e("")
    e("")
    e(_tc_build.jit_decorator())
    e("def sla_bwd_dkv_tc(q, k, v, do, lse, delta, rev, rev_counts, dk, dv, nq, nk, mk, n_rev, c2, scale):")
    I, J, K_ = "    ", "        ", "            "
    e(I + _tc_build.smem_decl())
    e(I + _tc_build.smem_decl("smf").replace("int16", "float32"))
    for line in ("tid = cuda.threadIdx.x", "lane = tid & 31", "warp = tid >> 5", "g = lane >> 2",
                 "t = lane & 3", "kb = cuda.blockIdx.x", "bh = cuda.blockIdx.y",
                 "krow0 = kb * %d" % BK, "q_base = bh * nq * %d" % D,
                 "kv_base = bh * nk * %d" % D, "rcnt = rev_counts[bh * mk + kb]"):
        e(I + line)
    e(I + "if rcnt == 0:")
    e(I + "    for idx in range(tid, %d, %d):" % (BK * D, NT))
    e(I + "        r = krow0 + idx // %d" % D)
    e(I + "        if r < nk:")
    e(I + "            dk[kv_base + r * %d + idx %% %d] = ZERO" % (D, D))
    e(I + "            dv[kv_base + r * %d + idx %% %d] = ZERO" % (D, D))
    e(I + "    return")
    _prelude(e, L, I, D, SD, NT)
    e(I + "rev_base = (bh * mk + kb) * n_rev")
    L.extend(_tile(I, KOFF, "k", "kv_base", "krow0", BK, "nk - krow0", D, SD, NT))
    L.extend(_tile(I, VOFF, "v", "kv_base", "krow0", BK, "nk - krow0", D, SD, NT))

    def stage_chunk(ind, ci):
        e(ind + f"q0 = rev[rev_base + {ci} // {CPB}] * {BQ} + ({ci} % {CPB}) * {QC}")
        L.extend(_tile(ind, QOFF, "q", "q_base", "q0", QC, "nq - q0", D, SD, NT))
        L.extend(_tile(ind, DOFF, "do", "q_base", "q0", QC, "nq - q0", D, SD, NT))
        e(ind + f"for idx in range(tid, {QC}, {NT}):")
        e(ind + "    r = q0 + idx")
        e(ind + "    if r < nq:")
        e(ind + f"        smf[{FOFF} + idx] = lse[bh * nq + r] * LOG2E")
        e(ind + f"        smf[{FOFF + QC} + idx] = delta[bh * nq + r]")
        e(ind + "    else:")
        e(ind + f"        smf[{FOFF} + idx] = POS_INF")
        e(ind + f"        smf[{FOFF + QC} + idx] = ZERO")
        e(ind + "cp_async_commit()")

    stage_chunk(I, "0")
    _lane_offsets(e, I)
    e(I + "aoff = (warp * 16 + p1r) * %d + p1c" % SD)
    e(I + "bn = p2r * %d + p2c" % SD)
    e(I + "bt = p1r * %d + p1c" % SD)
    _byte_addrs(e, I, ("aoff", "bn", "bt"))
    for d in range(NDT):
        e(I + " = ".join(f"k_{d}_{x}" for x in range(4)) + " = ZERO")
        e(I + " = ".join(f"v_{d}_{x}" for x in range(4)) + " = ZERO")
    e(I + "for ci in range(rcnt * %d):" % CPB)
    e(J + "cp_async_wait_all()")
    e(J + "cuda.syncthreads()")
    if not _STYLE["v2"]:
        e(J + "# S^T = K Q^T, P^T = 2^(S^T c - lse2[col])")
        _gemm(e, J, mma, lambda n: [f"s_{n}_{x}" for x in range(4)], NQT, D // 16,
              ("smem", f"{KOFF} + aoff"), ("nk", f"{QOFF} + bn"), SD, True)
        e(J + "c0 = 2 * t")
        for n in range(NQT):
            e(J + f"lsa = smf[{FOFF + 8 * n} + c0]")
            e(J + f"lsb = smf[{FOFF + 8 * n + 1} + c0]")
            for x in range(4):
                e(J + f"s_{n}_{x} = exp2(s_{n}_{x} * c2 - {'lsb' if x & 1 else 'lsa'})")
        _pack_lines(e, J, pack, lambda n: [f"s_{n}_{x}" for x in range(4)], "pt", QC // 16)
        e(J + "# dV += P^T dO")
        _gemm(e, J, mma, lambda n: [f"v_{n}_{x}" for x in range(4)], NDT, QC // 16,
              ("regs", lambda kk: [f"pt{kk}_{x}" for x in range(4)]), ("kn", f"{DOFF} + bt"), SD, False)
        e(J + "# dP^T = V dO^T, dS^T = P^T (dP^T - delta[col])")
        _gemm(e, J, mma, lambda n: [f"p_{n}_{x}" for x in range(4)], NQT, D // 16,
              ("smem", f"{VOFF} + aoff"), ("nk", f"{DOFF} + bn"), SD, True)
        for n in range(NQT):
            e(J + f"dla = smf[{FOFF + QC + 8 * n} + c0]")
            e(J + f"dlb = smf[{FOFF + QC + 8 * n + 1} + c0]")
            for x in range(4):
                e(J + f"s_{n}_{x} = s_{n}_{x} * (p_{n}_{x} - {'dlb' if x & 1 else 'dla'})")
        _pack_lines(e, J, pack, lambda n: [f"s_{n}_{x}" for x in range(4)], "dst", QC // 16)
        e(J + "# dK += dS^T Q")
    else:
        # v2: dP^T first, then S^T -> P^T and dS^T in place; both packed before the two
        # gemms that consume them, so fewer fp32 tiles are live at once.
        e(J + "# dP^T = V dO^T")
        _gemm(e, J, mma, lambda n: [f"p_{n}_{x}" for x in range(4)], NQT, D // 16,
              ("smem", f"{VOFF} + aoff"), ("nk", f"{DOFF} + bn"), SD, True)
        e(J + "# S^T = K Q^T, P^T = 2^(S^T c - lse2[col]), dS^T = P^T (dP^T - delta[col])")
        _gemm(e, J, mma, lambda n: [f"s_{n}_{x}" for x in range(4)], NQT, D // 16,
              ("smem", f"{KOFF} + aoff"), ("nk", f"{QOFF} + bn"), SD, True)
        e(J + "c0 = 2 * t")
        for n in range(NQT):
            e(J + f"lsa = smf[{FOFF + 8 * n} + c0]")
            e(J + f"lsb = smf[{FOFF + 8 * n + 1} + c0]")
            e(J + f"dla = smf[{FOFF + QC + 8 * n} + c0]")
            e(J + f"dlb = smf[{FOFF + QC + 8 * n + 1} + c0]")
            for x in range(4):
                e(J + f"s_{n}_{x} = exp2(s_{n}_{x} * c2 - {'lsb' if x & 1 else 'lsa'})")
                e(J + f"p_{n}_{x} = s_{n}_{x} * (p_{n}_{x} - {'dlb' if x & 1 else 'dla'})")
        _pack_lines(e, J, pack, lambda n: [f"s_{n}_{x}" for x in range(4)], "pt", QC // 16)
        _pack_lines(e, J, pack, lambda n: [f"p_{n}_{x}" for x in range(4)], "dst", QC // 16)
        e(J + "# dV += P^T dO")
        _gemm(e, J, mma, lambda n: [f"v_{n}_{x}" for x in range(4)], NDT, QC // 16,
              ("regs", lambda kk: [f"pt{kk}_{x}" for x in range(4)]), ("kn", f"{DOFF} + bt"), SD, False)
        e(J + "# dK += dS^T Q")
    _gemm(e, J, mma, lambda n: [f"k_{n}_{x}" for x in range(4)], NDT, QC // 16,
          ("regs", lambda kk: [f"dst{kk}_{x}" for x in range(4)]), ("kn", f"{QOFF} + bt"), SD, False)
    e(J + "cuda.syncthreads()")
    e(J + "if ci + 1 < rcnt * %d:" % CPB)
    stage_chunk(K_, "(ci + 1)")
    for r in range(2):
        e(I + f"ra = krow0 + warp * 16 + g + {8 * r}")
        e(I + "if ra < nk:")
        e(I + "    ob = kv_base + ra * %d + 2 * t" % D)
        for d in range(NDT):
            e(I + f"    dk[ob + {8 * d}] = k_{d}_{2 * r} * scale")
            e(I + f"    dk[ob + {8 * d + 1}] = k_{d}_{2 * r + 1} * scale")
            e(I + f"    dv[ob + {8 * d}] = v_{d}_{2 * r}")
            e(I + f"    dv[ob + {8 * d + 1}] = v_{d}_{2 * r + 1}")
    return "\n".join(L) + "\n"


_SOURCES = {"dq": dq_source, "dkv": dkv_source}
_kernels = {}


def kernel_source(which, D, block_k, block_q, kind, variant=None):
    """Generated source of one backward kernel; ``variant`` 'v2' (default) or 'v1'."""
    _STYLE["v2"] = (variant or kernel_variant()) != "v1"
    try:
        return _SOURCES[which](D, block_k, block_q, kind)
    finally:
        _STYLE["v2"] = True


def kernel_source_and_module(which, D, block_k, block_q, kind):
    """(generated source, imported module) of one backward kernel configuration."""
    key = (which, D, block_k, block_q, kind, kernel_variant())
    hit = _kernels.get(key)
    if hit is None:
        _tc_build.ensure_numpy_compat()
        src = kernel_source(*key)
        hit = (src, _tc_build.load_generated("bwd_%s_d%d_k%d_q%d_%s_%s" % key, src))
        _kernels[key] = hit
    return hit


def signature(which):
    """Explicit argument types (for compile_ptx in tools/check_tc_ptx.py)."""
    from numba import float32, int16, int32, int64
    i16, i32, f32 = int16[::1], int32[::1], float32[::1]
    if which == "dq":
        return (i16, i16, i16, i16, f32, f32, i32, i32, f32, int64, int64, int64, int64,
                float32, float32)
    return (i16, i16, i16, i16, f32, f32, i32, i32, f32, f32, int64, int64, int64, int64,
            float32, float32)


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


def launch_sparse_backward(kind, q, k, v, do, lse, delta, lut, counts, rev, rev_counts,
                           dq, dk, dv, B, H, Nq, Nk, D, block_q, block_k, scale, stream):
    """Launch dQ and dK/dV on flat device arrays (the GPU backend's entry).

    q, k, v, do: flat int16 bits of fp16 / bf16 (``kind`` 'f16' / 'bf16');
    lse, delta: flat float32 (B*H*Nq); lut (B, H, Mq, n) / counts (B, H, Mq) and
    rev (B, H, Mk, R) / rev_counts (B, H, Mk): flat int32; dq, dk, dv: flat float32
    outputs (overwritten). Numba device arrays, launched on ``stream``; no host sync.
    """
    mq, mk = -(-Nq // block_q), -(-Nk // block_k)
    n_lut = int(lut.size) // max(1, B * H * mq)
    n_rev = int(rev.size) // max(1, B * H * mk)
    c2, sc = np.float32(scale * LOG2E), np.float32(scale)
    if n_lut == 0:
        lut = counts
    _, mod = kernel_source_and_module("dq", D, block_k, block_q, kind)
    _tc_build.launch(mod.sla_bwd_dq_tc, (mq, B * H), mod.THREADS, mod.SMEM_BYTES, stream,
                     (q, k, v, do, lse, delta, lut, counts, dq,
                      Nq, Nk, mq, max(n_lut, 1), c2, sc))
    _, mod = kernel_source_and_module("dkv", D, block_k, block_q, kind)
    _tc_build.launch(mod.sla_bwd_dkv_tc, (mk, B * H), mod.THREADS, mod.SMEM_BYTES, stream,
                     (q, k, v, do, lse, delta, rev, rev_counts, dk, dv, Nq, Nk, mk,
                      max(n_rev, 1), c2, sc))


def sparse_backward_tc(q, k, v, o_s, lse, do, lut, counts, rev, rev_counts,
                       block_q, block_k, scale, delta=None):
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

    dq = ad.empty((B, H, Nq, D), np.float32)
    _, mod = kernel_source_and_module("dq", D, block_k, block_q, kind)
    lut_f, counts_f = ad.flat(lut, np.int32), ad.flat(counts, np.int32)
    n_lut = int(lut.shape[-1])
    if n_lut == 0:
        lut_f = counts_f
    _tc_build.launch(mod.sla_bwd_dq_tc, (mq, B * H), mod.THREADS, mod.SMEM_BYTES, stream,
                     (qb, kb_, vb, dob, lse_f, delta_f, lut_f, counts_f, dq,
                      Nq, Nk, mq, max(n_lut, 1), c2, sc))

    dk = ad.empty((B, H, Nk, D), np.float32)
    dv = ad.empty((B, H, Nk, D), np.float32)
    _, mod = kernel_source_and_module("dkv", D, block_k, block_q, kind)
    _tc_build.launch(mod.sla_bwd_dkv_tc, (mk, B * H), mod.THREADS, mod.SMEM_BYTES, stream,
                     (qb, kb_, vb, dob, lse_f, delta_f, ad.flat(rev, np.int32),
                      ad.flat(rev_counts, np.int32), dk, dv, Nq, Nk, mk,
                      int(rev.shape[-1]), c2, sc))
    return (ad.wrap(dq, (B, H, Nq, D)), ad.wrap(dk, (B, H, Nk, D)), ad.wrap(dv, (B, H, Nk, D)))
