"""Sparse-branch forward on tensor cores (fp16 / bf16, compute capability >= 8.0).

Computes, for every (b, h) and query block i, FlashAttention-2 over the
critical key blocks listed in ``lut[b, h, i, :counts[b, h, i]]`` only::

    O_s[r] = sum_c softmax_c(scale * q_r . k_c) v_c      lse[r] = log sum_c exp(scale * q_r . k_c)

Work decomposition
------------------
One CTA = one query block of ``block_q`` rows = ``NW`` warps x ``16*MT`` rows
(``block_q = 128``: 4 warps x 32 rows, two m16 tiles a warp that share every
K/V fragment load; ``block_q = 64``: 4 warps x 16 rows). Grid = (Mq, B*H).

Pipeline (shared memory holds Q [block_q x D], one K and one V tile [block_k x D],
rows padded to D + 8 halves so ``ldmatrix`` is bank-conflict free)::

    cp.async Q, K[lut[0]]
    for each critical key block kb:
        wait; barrier                  # K[kb] landed; everyone finished P.V of the last block
        cp.async V[kb]                 # overlaps with S and the softmax below
        S = Q K^T      (ldmatrix Q, ldmatrix K, mma)    -- 16*MT x block_k per warp, fp32
        mask keys >= Nk to -inf (tail block only)
        online softmax in registers, base 2: m, l per row; P = 2^(S*c - m), c = scale*log2(e)
        wait; barrier                  # V[kb] landed; everyone finished reading K
        cp.async K[next]               # overlaps with P.V
        O += P V       (P packed from the S accumulators, ldmatrix.trans V, mma)
    O /= l; lse = (m + log2 l) * ln 2  # natural log, as the backward and the API expect

(A two-stage K/V ring that fetches tile j+2 during tile j was tried: 157 TFLOP/s on
the H200 against 149-186 for this one in other runs, with 255 registers; not kept.)

Registers per lane (``g = lane >> 2``, ``t = lane & 3``, see ``_mma``): for m-tile
``mt`` the lane owns rows ``g`` and ``g + 8``; ``s_mt_n_e`` holds S columns
``8n + 2t + (e & 1)`` of row ``g + 8*(e >> 1)``; ``o_mt_d_e`` likewise for O
columns ``8d + 2t + (e & 1)``. Row max and row sum are reduced across the
four lanes of a quad with ``shfl_xor`` 1 and 2; the sum only once, at the end.

Outputs
-------
``o_s`` float32 (B, H, Nq, D) and ``lse`` float32 (B, H, Nq), the backend
contract's compute dtype (the API casts O back to the input dtype). A query
block with ``counts == 0`` gets ``o_s = 0`` and ``lse = LSE_EMPTY``. Keys past
Nk are zero-filled in shared memory and masked to -inf; query rows past Nq are
computed on zeros and never written.
"""
import math

import numpy as np

from ..._params import LSE_EMPTY
from . import build as _tc_build
from .ptx import LOG2E, SIMULATED

#: Head dims the generator supports (registers bound it above; multiples of 16).
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)


def tile_config(block_q):
    """(warps, m-tiles per warp) for a query block of ``block_q`` rows, or None."""
    return {16: (1, 1), 32: (1, 2), 64: (4, 1), 128: (4, 2)}.get(block_q)


def _device_ok(device):
    """A CUDA device of compute capability >= 8.0 (always True under the simulator)."""
    if SIMULATED:
        return True
    try:
        from numba import cuda
        if not cuda.is_available():
            return False
        if device is None:
            cc = cuda.get_current_device().compute_capability
        else:
            idx = device if isinstance(device, int) else (getattr(device, "index", None) or 0)
            cc = cuda.gpus[idx].compute_capability
        return tuple(cc) >= (8, 0)
    except Exception:  # noqa: BLE001 - no driver or no such device: no tensor cores
        return False


def _dtype_name(dtype):
    """'float16', 'bfloat16', 'float32', ... for numpy / torch / CuPy dtypes or names."""
    name = str(dtype).replace("torch.", "")
    if name in ("float16", "bfloat16", "float32", "float64"):
        return name
    try:
        return np.dtype(dtype).name
    except TypeError:
        return name


def tc_unsupported_reason(dtype, head_dim, block_q, block_k, device=None):
    """None when the tensor-core sparse kernels handle this configuration, else why not."""
    name = _dtype_name(dtype)
    if name not in ("float16", "bfloat16"):
        return f"dtype {name} (tensor cores need float16 or bfloat16 inputs)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (supported: {', '.join(map(str, HEAD_DIMS))})"
    if tile_config(block_q) is None:
        return f"block_q {block_q} (supported: 16, 32, 64, 128)"
    if block_k not in (16, 32, 64):
        return f"block_k {block_k} (supported: 16, 32, 64)"
    if not _device_ok(device):
        return "no CUDA device of compute capability >= 8.0"
    return None


def tc_supported(dtype, head_dim, block_q, block_k, device=None):
    """True when the tensor-core sparse kernels handle this configuration.

    dtype: 'float16' / 'bfloat16' (or torch / numpy dtypes of those names);
    head_dim % 16 == 0 and <= 128; block_q in {64, 128} (16, 32 too: tests);
    block_k in {16, 32, 64}; a CUDA device of compute capability >= 8.0
    (``device``: None for the current one, an int or a torch.device).
    Anything else belongs to the SIMT path (see :func:`tc_unsupported_reason`).
    """
    return tc_unsupported_reason(dtype, head_dim, block_q, block_k, device) is None


# ---------------------------------------------------------------------------
# Code generation
# ---------------------------------------------------------------------------

def _load_tile_lines(ind, dst, src, base, row0, nrows, nvalid, D, SD, NT):
    """Lines that cp.async an [nrows x D] tile (zero-filling rows >= nvalid)."""
    cpr = D // 8
    return [
        f"{ind}for idx in range(tid, {nrows * cpr}, {NT}):",
        f"{ind}    rr = idx // {cpr}",
        f"{ind}    cc = (idx - rr * {cpr}) * 8",
        f"{ind}    ok = rr < {nvalid}",
        f"{ind}    gr = {row0} + (rr if ok else 0)",
        f"{ind}    cp_async16(smem, {dst} + rr * {SD} + cc, {src}, {base} + gr * {D} + cc, 16 if ok else 0)",
    ]


def _forward_source_v1(D, block_k, block_q, kind):
    """The first version (kept selectable: ``SLA_TC_VARIANT=v1``)."""
    NW, MT = tile_config(block_q)
    BK, BQ, NT = block_k, block_q, NW * 32
    SD = D + 8                       # padded row stride, in halves
    QOFF, KOFF, VOFF = 0, BQ * SD, (BQ + BK) * SD
    KS, NTILE, DTILE, PK = D // 16, BK // 8, D // 8, BK // 16
    mma = "mma_" + kind
    pack = "pack_%sx2" % kind
    L = []
    e = L.append
    e('"""Generated by sla_numba.gpu.tc.forward.forward_source(D=%d, block_k=%d, block_q=%d, %r).'
      % (D, BK, BQ, kind))
    e('Do not edit: see forward_tc for the algorithm and the register naming."""')
    e("import math")
    e("import numpy as np")
    e("from numba import cuda, int16")
    e("from sla_numba.gpu.tc.ptx import (%s, %s, ldmatrix_x4, ldmatrix_x4_trans, cp_async16,"
      % (mma, pack))
    e("    cp_async_commit, cp_async_wait_all, exp2, shfl_xor)")
    e("ZERO = np.float32(0.0)")
    e("ONE = np.float32(1.0)")
    e("NEG_INF = np.float32(-np.inf)")
    e("LSE_EMPTY = np.float32(%r)" % LSE_EMPTY)
    e("LN2 = np.float32(%r)" % math.log(2.0))
    e("SMEM_BYTES = %d" % ((BQ + 2 * BK) * SD * 2))
    e("THREADS = %d" % NT)
    e("")
    e("")
    e(_tc_build.jit_decorator())
    e("def sla_fwd_tc(q, k, v, lut, counts, o, lse, nq, nk, mq, n_lut, c2):")
    I = "    "
    e(I + _tc_build.smem_decl())
    e(I + "tid = cuda.threadIdx.x")
    e(I + "lane = tid & 31")
    e(I + "warp = tid >> 5")
    e(I + "g = lane >> 2")
    e(I + "t = lane & 3")
    e(I + "qb = cuda.blockIdx.x")
    e(I + "bh = cuda.blockIdx.y")
    e(I + "row0 = qb * %d" % BQ)
    e(I + "q_base = bh * nq * %d" % D)
    e(I + "kv_base = bh * nk * %d" % D)
    e(I + "cnt = counts[bh * mq + qb]")
    e(I + "if cnt == 0:")
    e(I + "    for idx in range(tid, %d, %d):" % (BQ * D, NT))
    e(I + "        r = row0 + idx // %d" % D)
    e(I + "        if r < nq:")
    e(I + "            o[q_base + r * %d + idx %% %d] = ZERO" % (D, D))
    e(I + "    for idx in range(tid, %d, %d):" % (BQ, NT))
    e(I + "        if row0 + idx < nq:")
    e(I + "            lse[bh * nq + row0 + idx] = LSE_EMPTY")
    e(I + "    return")
    e(I + "lut_base = (bh * mq + qb) * n_lut")
    e(I + "kb = lut[lut_base]")
    e(I + "# stage Q and the first K tile")
    L.extend(_load_tile_lines(I, QOFF, "q", "q_base", "row0", BQ, "nq - row0", D, SD, NT))
    L.extend(_load_tile_lines(I, KOFF, "k", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK,
                              D, SD, NT))
    e(I + "cp_async_commit()")
    e(I + "# per-lane ldmatrix row offsets (see _mma): Q as A, K as B (non-trans), V as B (trans)")
    e(I + "qa = (warp * %d + ((lane >> 3) & 1) * 8 + (lane & 7)) * %d + (lane >> 4) * 8"
      % (16 * MT, SD))
    e(I + "kbo = %d + ((lane >> 4) * 8 + (lane & 7)) * %d + ((lane >> 3) & 1) * 8" % (KOFF, SD))
    e(I + "vo = %d + (((lane >> 3) & 1) * 8 + (lane & 7)) * %d + (lane >> 4) * 8" % (VOFF, SD))
    for mt in range(MT):
        for r in range(2):
            e(I + f"m_{mt}_{r} = NEG_INF")
            e(I + f"l_{mt}_{r} = ZERO")
        for d in range(DTILE):
            e(I + " = ".join(f"o_{mt}_{d}_{x}" for x in range(4)) + " = ZERO")
    e(I + "for it in range(cnt):")
    J = I * 2
    e(J + "cp_async_wait_all()")
    e(J + "cuda.syncthreads()")
    L.extend(_load_tile_lines(J, VOFF, "v", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK,
                              D, SD, NT))
    e(J + "cp_async_commit()")
    e(J + "# S = Q K^T")
    for ks in range(KS):
        for mt in range(MT):
            e(J + f"qa{mt}_0, qa{mt}_1, qa{mt}_2, qa{mt}_3 = ldmatrix_x4(smem, qa + {mt * 16 * SD + ks * 16})")
        for np_ in range(PK):
            e(J + f"kf0, kf1, kf2, kf3 = ldmatrix_x4(smem, kbo + {np_ * 16 * SD + ks * 16})")
            for mt in range(MT):
                for h, (b0, b1) in enumerate((("kf0", "kf1"), ("kf2", "kf3"))):
                    n = 2 * np_ + h
                    acc = [f"s_{mt}_{n}_{x}" for x in range(4)]
                    cin = ", ".join(acc) if ks else "ZERO, ZERO, ZERO, ZERO"
                    e(J + f"{', '.join(acc)} = {mma}(qa{mt}_0, qa{mt}_1, qa{mt}_2, qa{mt}_3, {b0}, {b1}, {cin})")
    e(J + "nvalid = nk - kb * %d" % BK)
    e(J + "if nvalid < %d:" % BK)
    e(J + "    c0 = 2 * t")
    for n in range(NTILE):
        for odd in range(2):
            e(J + f"    if c0 + {8 * n + odd} >= nvalid:")
            e(J + "        " + " = ".join(f"s_{mt}_{n}_{x}" for mt in range(MT) for x in (odd, odd + 2))
              + " = NEG_INF")
    e(J + "# online softmax (base 2)")
    for mt in range(MT):
        for r in range(2):
            vals = [f"s_{mt}_{n}_{2 * r + x}" for n in range(NTILE) for x in range(2)]
            e(J + f"mx = {vals[0]}")
            for vv in vals[1:]:
                e(J + f"mx = mx if mx > {vv} else {vv}")
            e(J + "sh = shfl_xor(mx, 1)")
            e(J + "mx = mx if mx > sh else sh")
            e(J + "sh = shfl_xor(mx, 2)")
            e(J + "mx = mx if mx > sh else sh")
            e(J + "mx = mx * c2")
            e(J + f"mn = m_{mt}_{r} if m_{mt}_{r} > mx else mx")
            e(J + f"al = exp2(m_{mt}_{r} - mn)")
            e(J + f"m_{mt}_{r} = mn")
            for vv in vals:
                e(J + f"{vv} = exp2({vv} * c2 - mn)")
            e(J + f"l_{mt}_{r} = l_{mt}_{r} * al + (" + " + ".join(vals) + ")")
            for d in range(DTILE):
                for x in range(2):
                    e(J + f"o_{mt}_{d}_{2 * r + x} *= al")
    e(J + "cp_async_wait_all()")
    e(J + "cuda.syncthreads()")
    e(J + "if it + 1 < cnt:")
    e(J + "    kb = lut[lut_base + it + 1]")
    L.extend(_load_tile_lines(J + I, KOFF, "k", "kv_base", "kb * %d" % BK, BK,
                              "nk - kb * %d" % BK, D, SD, NT))
    e(J + "    cp_async_commit()")
    e(J + "# O += P V")
    for kk in range(PK):
        for mt in range(MT):
            a, b = 2 * kk, 2 * kk + 1
            e(J + f"pa{mt}_0 = {pack}(s_{mt}_{a}_0, s_{mt}_{a}_1)")
            e(J + f"pa{mt}_1 = {pack}(s_{mt}_{a}_2, s_{mt}_{a}_3)")
            e(J + f"pa{mt}_2 = {pack}(s_{mt}_{b}_0, s_{mt}_{b}_1)")
            e(J + f"pa{mt}_3 = {pack}(s_{mt}_{b}_2, s_{mt}_{b}_3)")
        for dp in range(D // 16):
            e(J + f"vf0, vf1, vf2, vf3 = ldmatrix_x4_trans(smem, vo + {kk * 16 * SD + dp * 16})")
            for mt in range(MT):
                for h, (b0, b1) in enumerate((("vf0", "vf1"), ("vf2", "vf3"))):
                    d = 2 * dp + h
                    acc = ", ".join(f"o_{mt}_{d}_{x}" for x in range(4))
                    e(J + f"{acc} = {mma}(pa{mt}_0, pa{mt}_1, pa{mt}_2, pa{mt}_3, {b0}, {b1}, {acc})")
    e(I + "# epilogue: finish the row sums, normalise, write O and lse")
    for mt in range(MT):
        for r in range(2):
            e(I + f"lt = l_{mt}_{r} + shfl_xor(l_{mt}_{r}, 1)")
            e(I + "lt = lt + shfl_xor(lt, 2)")
            e(I + "inv = ONE / lt")
            e(I + f"row = row0 + warp * {16 * MT} + {mt * 16 + 8 * r} + g")
            e(I + "if row < nq:")
            e(I + "    ob = q_base + row * %d + 2 * t" % D)
            for d in range(DTILE):
                e(I + f"    o[ob + {8 * d}] = o_{mt}_{d}_{2 * r} * inv")
                e(I + f"    o[ob + {8 * d + 1}] = o_{mt}_{d}_{2 * r + 1} * inv")
            e(I + "    if t == 0:")
            e(I + f"        lse[bh * nq + row] = (m_{mt}_{r} + math.log2(lt)) * LN2")
    return "\n".join(L) + "\n"


def _fast_load_ok(nrows, D, NT):
    cpr = D // 8
    return NT % cpr == 0 and nrows % (NT // cpr) == 0


def load_prelude_lines(ind, D, SD, NT):
    """Per-thread coordinates of the straight-line tile loads (see ``tile_load_lines``)."""
    cpr = D // 8
    return [
        f"{ind}ldr = tid // {cpr}",
        f"{ind}ldc = (tid % {cpr}) * 8",
        f"{ind}lds = sa + (ldr * {SD} + ldc) * 2",
        f"{ind}ldg = ldr * {D} + ldc",
    ]


def tile_load_lines(ind, dst, src, base, row0, nrows, nvalid, D, SD, NT):
    """cp.async an [nrows x D] tile at element offset ``dst`` of smem.

    Full tiles (``nvalid >= nrows``, every tile but a sequence's last): straight-line
    copies, addresses precomputed per thread (``load_prelude_lines``), shared offsets
    folded into the instruction. Partial tiles: the zero-filling loop of v1.
    """
    slow = _load_tile_lines(ind + "    ", dst, src, base, row0, nrows, nvalid, D, SD, NT)
    if not _fast_load_ok(nrows, D, NT):
        return [f"{ind}if True:"] + slow
    rpp = NT // (D // 8)
    out = [f"{ind}if {nvalid} >= {nrows}:",
           f"{ind}    gb = {base} + ({row0}) * {D} + ldg"]
    for p in range(nrows // rpp):
        out.append(f"{ind}    cp_async16i(smem, lds, {(dst + p * rpp * SD) * 2}, {src}, gb + {p * rpp * D})")
    out.append(f"{ind}else:")
    return out + slow


def _tree(op, vals):
    """Balanced reduction expression lines: returns (lines, result) using temporaries."""
    vals = list(vals)
    while len(vals) > 1:
        nxt = []
        for i in range(0, len(vals) - 1, 2):
            nxt.append(op(vals[i], vals[i + 1]))
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def forward_source(D, block_k, block_q, kind, variant=None):
    """Generated kernel source; ``variant`` 'v2' (default) or 'v1' (the first version)."""
    variant = variant or kernel_variant()
    if variant == "v1":
        return _forward_source_v1(D, block_k, block_q, kind)
    NW, MT = tile_config(block_q)
    BK, BQ, NT = block_k, block_q, NW * 32
    SD = D + 8                       # padded row stride, in halves
    QOFF, KOFF, VOFF = 0, BQ * SD, (BQ + BK) * SD
    KS, NTILE, DTILE, PK = D // 16, BK // 8, D // 8, BK // 16
    mma = "mma_" + kind
    pack = "pack_%sx2" % kind
    L = []
    e = L.append
    e('"""Generated by sla_numba.gpu.tc.forward.forward_source(D=%d, block_k=%d, block_q=%d, %r), v2.'
      % (D, BK, BQ, kind))
    e('Do not edit: see forward_tc for the algorithm and the register naming."""')
    e("import math")
    e("import numpy as np")
    e("from numba import cuda, int16")
    e("from sla_numba.gpu.tc.ptx import (%s, %s, ldsm_x4, ldsm_x4_trans, cp_async16, cp_async16i,"
      % (mma, pack))
    e("    smem_addr, fmax, cp_async_commit, cp_async_wait_all, exp2, shfl_xor)")
    e("ZERO = np.float32(0.0)")
    e("ONE = np.float32(1.0)")
    e("NEG_INF = np.float32(-np.inf)")
    e("LSE_EMPTY = np.float32(%r)" % LSE_EMPTY)
    e("LN2 = np.float32(%r)" % math.log(2.0))
    e("SMEM_BYTES = %d" % ((BQ + 2 * BK) * SD * 2))
    e("THREADS = %d" % NT)
    e("")
    e("")
    e(_tc_build.jit_decorator())
    e("def sla_fwd_tc(q, k, v, lut, counts, o, lse, nq, nk, mq, n_lut, c2):")
    I = "    "
    e(I + _tc_build.smem_decl())
    e(I + "tid = cuda.threadIdx.x")
    e(I + "lane = tid & 31")
    e(I + "warp = tid >> 5")
    e(I + "g = lane >> 2")
    e(I + "t = lane & 3")
    e(I + "qb = cuda.blockIdx.x")
    e(I + "bh = cuda.blockIdx.y")
    e(I + "row0 = qb * %d" % BQ)
    e(I + "q_base = bh * nq * %d" % D)
    e(I + "kv_base = bh * nk * %d" % D)
    e(I + "cnt = counts[bh * mq + qb]")
    e(I + "if cnt == 0:")
    e(I + "    for idx in range(tid, %d, %d):" % (BQ * D, NT))
    e(I + "        r = row0 + idx // %d" % D)
    e(I + "        if r < nq:")
    e(I + "            o[q_base + r * %d + idx %% %d] = ZERO" % (D, D))
    e(I + "    for idx in range(tid, %d, %d):" % (BQ, NT))
    e(I + "        if row0 + idx < nq:")
    e(I + "            lse[bh * nq + row0 + idx] = LSE_EMPTY")
    e(I + "    return")
    e(I + "sa = smem_addr(smem)")
    L.extend(load_prelude_lines(I, D, SD, NT))
    e(I + "lut_base = (bh * mq + qb) * n_lut")
    e(I + "kb = lut[lut_base]")
    e(I + "# stage Q and the first K tile")
    L.extend(tile_load_lines(I, QOFF, "q", "q_base", "row0", BQ, "nq - row0", D, SD, NT))
    L.extend(tile_load_lines(I, KOFF, "k", "kv_base", "kb * %d" % BK, BK, "nk - kb * %d" % BK,
                             D, SD, NT))
    e(I + "cp_async_commit()")
    e(I + "# per-lane ldmatrix byte addresses (see _mma): Q as A, K as B (non-trans), V as B (trans)")
    e(I + "qa = sa + ((warp * %d + ((lane >> 3) & 1) * 8 + (lane & 7)) * %d + (lane >> 4) * 8) * 2"
      % (16 * MT, SD))
    e(I + "kbo = sa + (%d + ((lane >> 4) * 8 + (lane & 7)) * %d + ((lane >> 3) & 1) * 8) * 2" % (KOFF, SD))
    e(I + "vo = sa + (%d + (((lane >> 3) & 1) * 8 + (lane & 7)) * %d + (lane >> 4) * 8) * 2" % (VOFF, SD))
    for mt in range(MT):
        for r in range(2):
            e(I + f"m_{mt}_{r} = NEG_INF")
            e(I + f"l_{mt}_{r} = ZERO")
        for d in range(DTILE):
            e(I + " = ".join(f"o_{mt}_{d}_{x}" for x in range(4)) + " = ZERO")
    e(I + "for it in range(cnt):")
    J = I * 2
    e(J + "cp_async_wait_all()")
    e(J + "cuda.syncthreads()")
    e(J + "nvalid = nk - kb * %d" % BK)
    L.extend(tile_load_lines(J, VOFF, "v", "kv_base", "kb * %d" % BK, BK, "nvalid", D, SD, NT))
    e(J + "cp_async_commit()")
    e(J + "# S = Q K^T")
    for ks in range(KS):
        for mt in range(MT):
            e(J + f"qa{mt}_0, qa{mt}_1, qa{mt}_2, qa{mt}_3 = ldsm_x4(smem, qa, {(mt * 16 * SD + ks * 16) * 2})")
        for np_ in range(PK):
            e(J + f"kf0, kf1, kf2, kf3 = ldsm_x4(smem, kbo, {(np_ * 16 * SD + ks * 16) * 2})")
            for mt in range(MT):
                for h, (b0, b1) in enumerate((("kf0", "kf1"), ("kf2", "kf3"))):
                    n = 2 * np_ + h
                    acc = [f"s_{mt}_{n}_{x}" for x in range(4)]
                    cin = ", ".join(acc) if ks else "ZERO, ZERO, ZERO, ZERO"
                    e(J + f"{', '.join(acc)} = {mma}(qa{mt}_0, qa{mt}_1, qa{mt}_2, qa{mt}_3, {b0}, {b1}, {cin})")
    e(J + "if nvalid < %d:  # the sequence's last, partial key block only" % BK)
    e(J + "    c0 = 2 * t")
    for n in range(NTILE):
        for odd in range(2):
            e(J + f"    if c0 + {8 * n + odd} >= nvalid:")
            e(J + "        " + " = ".join(f"s_{mt}_{n}_{x}" for mt in range(MT) for x in (odd, odd + 2))
              + " = NEG_INF")
    e(J + "# online softmax (base 2); row max and sum as balanced trees")
    for mt in range(MT):
        for r in range(2):
            vals = [f"s_{mt}_{n}_{2 * r + x}" for n in range(NTILE) for x in range(2)]
            tmp = [0]

            def fm(a, b):
                tmp[0] += 1
                name = f"mx{tmp[0]}"
                e(J + f"{name} = fmax({a}, {b})")
                return name
            mx = _tree(fm, vals)
            e(J + f"mx = fmax({mx}, shfl_xor({mx}, 1))")
            e(J + "mx = fmax(mx, shfl_xor(mx, 2))")
            e(J + f"mn = fmax(m_{mt}_{r}, mx * c2)")
            e(J + f"al = exp2(m_{mt}_{r} - mn)")
            e(J + f"m_{mt}_{r} = mn")
            for vv in vals:
                e(J + f"{vv} = exp2({vv} * c2 - mn)")
            tmp[0] = 0

            def fa(a, b):
                tmp[0] += 1
                name = f"sm{tmp[0]}"
                e(J + f"{name} = {a} + {b}")
                return name
            sm = _tree(fa, vals)
            e(J + f"l_{mt}_{r} = l_{mt}_{r} * al + {sm}")
            for d in range(DTILE):
                for x in range(2):
                    e(J + f"o_{mt}_{d}_{2 * r + x} *= al")
    e(J + "cp_async_wait_all()")
    e(J + "cuda.syncthreads()")
    e(J + "if it + 1 < cnt:")
    e(J + "    kb = lut[lut_base + it + 1]")
    L.extend(tile_load_lines(J + I, KOFF, "k", "kv_base", "kb * %d" % BK, BK,
                             "nk - kb * %d" % BK, D, SD, NT))
    e(J + "    cp_async_commit()")
    e(J + "# O += P V")
    for kk in range(PK):
        for mt in range(MT):
            a, b = 2 * kk, 2 * kk + 1
            e(J + f"pa{mt}_0 = {pack}(s_{mt}_{a}_0, s_{mt}_{a}_1)")
            e(J + f"pa{mt}_1 = {pack}(s_{mt}_{a}_2, s_{mt}_{a}_3)")
            e(J + f"pa{mt}_2 = {pack}(s_{mt}_{b}_0, s_{mt}_{b}_1)")
            e(J + f"pa{mt}_3 = {pack}(s_{mt}_{b}_2, s_{mt}_{b}_3)")
        for dp in range(D // 16):
            e(J + f"vf0, vf1, vf2, vf3 = ldsm_x4_trans(smem, vo, {(kk * 16 * SD + dp * 16) * 2})")
            for mt in range(MT):
                for h, (b0, b1) in enumerate((("vf0", "vf1"), ("vf2", "vf3"))):
                    d = 2 * dp + h
                    acc = ", ".join(f"o_{mt}_{d}_{x}" for x in range(4))
                    e(J + f"{acc} = {mma}(pa{mt}_0, pa{mt}_1, pa{mt}_2, pa{mt}_3, {b0}, {b1}, {acc})")
    e(I + "# epilogue: finish the row sums, normalise, write O and lse")
    for mt in range(MT):
        for r in range(2):
            e(I + f"lt = l_{mt}_{r} + shfl_xor(l_{mt}_{r}, 1)")
            e(I + "lt = lt + shfl_xor(lt, 2)")
            e(I + "inv = ONE / lt")
            e(I + f"row = row0 + warp * {16 * MT} + {mt * 16 + 8 * r} + g")
            e(I + "if row < nq:")
            e(I + "    ob = q_base + row * %d + 2 * t" % D)
            for d in range(DTILE):
                e(I + f"    o[ob + {8 * d}] = o_{mt}_{d}_{2 * r} * inv")
                e(I + f"    o[ob + {8 * d + 1}] = o_{mt}_{d}_{2 * r + 1} * inv")
            e(I + "    if t == 0:")
            e(I + f"        lse[bh * nq + row] = (m_{mt}_{r} + math.log2(lt)) * LN2")
    return "\n".join(L) + "\n"


def kernel_variant():
    """'v2' (default) or 'v1' (``SLA_TC_VARIANT=v1``: the first version, for comparisons)."""
    import os
    v = os.environ.get("SLA_TC_VARIANT", "v2")
    return v if v in ("v1", "v2") else "v2"


_kernels = {}


def get_forward_kernel(D, block_k, block_q, kind):
    """The compiled-on-demand kernel module for one configuration."""
    key = (D, block_k, block_q, kind, kernel_variant())
    mod = _kernels.get(key)
    if mod is None:
        _tc_build.ensure_numpy_compat()
        mod = _tc_build.load_generated("fwd_d%d_k%d_q%d_%s_%s" % key, forward_source(*key))
        _kernels[key] = mod
    return mod


def launch_sparse_forward(kind, q, k, v, lut, counts, o, lse, B, H, Nq, Nk, D,
                          block_q, block_k, scale, stream):
    """Launch the forward kernel on flat device arrays (the GPU backend's entry).

    q, k, v: flat int16 bits (B*H*N*D) of fp16 / bf16 ('f16' / 'bf16' = ``kind``);
    lut: flat int32 of a (B, H, Mq, n) LUT (``n = lut.size // (B*H*Mq)``), counts:
    flat int32 (B*H*Mq); o, lse: flat float32 outputs. Numba device arrays (any
    ``__cuda_array_interface__`` views), launched on ``stream``; no host sync.
    """
    mq = -(-Nq // block_q)
    n_lut = int(lut.size) // max(1, B * H * mq)
    mod = get_forward_kernel(D, block_k, block_q, kind)
    if n_lut == 0:
        lut = counts
    args = (q, k, v, lut, counts, o, lse, Nq, Nk, mq, max(n_lut, 1),
            np.float32(scale * LOG2E))
    _tc_build.launch(mod.sla_fwd_tc, (mq, B * H), mod.THREADS, mod.SMEM_BYTES, stream, args)


def sparse_forward_tc(q, k, v, lut, counts, block_q, block_k, scale):
    """Sparse (critical-block) attention forward on tensor cores.

    Parameters
    ----------
    q : (B, H, Nq, D) fp16/bf16;  k, v : (B, H, Nk, D), same dtype and device.
        torch CUDA tensors, CuPy arrays or Numba device arrays (numpy / torch CPU
        under the simulator). Need not be contiguous (copied if not).
    lut : int32 (B, H, Mq, n) — critical key-block indices per query block,
        ascending; only the first ``counts[b, h, i]`` entries are read.
    counts : int32 (B, H, Mq), 0 <= counts <= n.
    block_q, block_k, scale : see :func:`tc_supported`; scale > 0.

    Returns
    -------
    (o_s, lse): float32 (B, H, Nq, D) and float32 (B, H, Nq), natural-log lse;
    rows of query blocks with ``counts == 0``: o_s = 0, lse = LSE_EMPTY.
    Launched on torch's (CuPy's) current stream; no synchronisation.
    """
    kind = _tc_build.half_kind(q)
    B, H, Nq, D = (int(s) for s in q.shape)
    Nk = int(k.shape[2])
    mq = -(-Nq // block_q)
    n_lut = int(lut.shape[-1])
    ad = _tc_build.ArrayAdapter(q)
    mod = get_forward_kernel(D, block_k, block_q, kind)
    o = ad.empty((B, H, Nq, D), np.float32)
    lse = ad.empty((B, H, Nq), np.float32)
    args = (ad.bits(q), ad.bits(k), ad.bits(v), ad.flat(lut, np.int32), ad.flat(counts, np.int32),
            o, lse, Nq, Nk, mq, max(n_lut, 1), np.float32(scale * LOG2E))
    if n_lut == 0:  # no LUT columns at all: every row is empty
        args = args[:3] + (ad.flat(counts, np.int32),) * 2 + args[5:]
    _tc_build.launch(mod.sla_fwd_tc, (mq, B * H), mod.THREADS, mod.SMEM_BYTES, ad.stream(), args)
    return ad.wrap(o, (B, H, Nq, D)), ad.wrap(lse, (B, H, Nq))
