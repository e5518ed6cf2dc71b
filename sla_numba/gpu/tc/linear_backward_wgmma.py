"""The linear branch's gradients on Hopper warpgroup MMA (``wgmma``; compute capability 9.0).

The same two operations, arguments and precision as ``dkdv_linear`` and ``dq_linear``
of ``tc/linear_backward.py`` (read that module first). dk / dv: per key block j of 64
rows c, given ``dH_j`` (D x D fp32) and ``dZ_j`` (D) from the column sums::

    dφ(k_c)  = v_c · dH_jᵀ − dZ_j          (pass 1: 64 x D x D)
    dk[c]   += J_φ(k_c)ᵀ dφ(k_c)           (chain rule through the feature map)
    dv[c]   += φ(k_c) · dH_j               (pass 2: 64 x D x D)

but both products are ``wgmma.mma_async`` instructions of one warpgroup
(``tc/wgmma.py``) reading every operand from shared memory. Opt-in:
``SLA_NUMBA_LINEAR_GRAD=wgmma`` (``config.py``) on a GPU of compute capability 9.0,
fp16 / bf16 inputs, D in {64, 128}, block 64 (:func:`wgmma_unsupported_reason`), a
16-byte aligned state; anything else keeps the pipelined mma.sync kernels. ``dq_linear``
is below ("dq_linear").

Why
---
The mma.sync kernels run each product as warps of m16n8k16 tiles fed by ``ldmatrix``,
with the D x D state staged HK columns (rows) at a time, one barrier a chunk. Here the
whole of dH_j sits in shared memory once, in the layout both products read without a
copy, and one m64nDk16 instruction does what 4 warps x D/8 mma.sync did.

Work decomposition and shared memory
------------------------------------
One CTA = one key block of 64 rows = one warpgroup (4 warps, 128 threads) = the M of
one ``m64nDk16``; grid (Mk, H, B) as for the mma.sync kernel. Tiles (bf16 bits,
128-byte swizzle, column chunks of 64 values, 1024-aligned; ``tc/wgmma.py``)::

    V hi = φ hi | V lo = φ lo | dH hi | dH lo | fp32: (mx, 1/Σ) per row, dZ     (share, default)
    V hi | (V lo: fp16 only) | φ hi | φ lo | dH hi | dH lo | fp32 ...           (share=False)

V and φ are 64 x D, stored as D/64 chunks of 64 rows x 128 bytes ([c][e]: K-major
for A). dH_j is D x D stored [d][e] as D/64 chunks of D rows x 128 bytes. Read with
the row index d as N and e as k, that is B of pass 1 K-major (``v · dH_jᵀ``: element
(n = d, k = e)); read with d as k and e as N, it is B of pass 2 MN-major (``φ · dH_j``,
``imm-trans-b = 1``, LBO = the distance of two column chunks, D·128 bytes). So one
copy of dH_j serves both passes (D = 128: 32 + 64 KiB + 2 KiB = 98 KiB, two CTAs an
SM; with ``share=False`` and bf16 114 KiB, one CTA an SM).

Precision (as the mma.sync kernel): fp32 values split into bf16 ``hi`` + ``lo``;
pass 1 = ``v·dHhiᵀ + v·dHloᵀ`` for bf16 v (exact), plus ``vlo·dHhiᵀ`` for fp16 v
(split too); pass 2 = ``φhi·dHhi + φlo·dHhi + φhi·dHlo``. Every wgmma is bf16 x bf16
-> fp32. Inside a wgmma the hardware sums in its own order, and the products are
summed in another order than the mma.sync kernel's: results agree with it to fp32
rounding, not bit for bit.

Steps of one CTA (``tid`` 0..127, ``w = tid >> 5``, ``g = lane >> 2``, ``t = lane & 3``)
------------------------------------------------------------------------------------
0. The first ``PF`` 16-byte loads of dH_j are issued (``ldg_v4_f32``) before anything
   else: in flight during step 1.
1. Rows (as the mma.sync kernel): lane pair ``r = tid >> 1`` loads k_r, computes φ
   (softmax stats over the pair by ``shfl_xor``), stores v (bits, or hi / lo) and,
   unless ``share``, φ hi / lo at their swizzled places; (mx, 1/Σ) per row and dZ_j into the fp32 area.
   Rows past the sequence: zeros.
2. dH_j: D·D/4 quads, ``PF`` a thread in flight at a time, split into hi / lo and stored
   swizzled. ``fence.proxy.async`` (generic-proxy stores, async-proxy readers), barrier.
3. Pass 1: D/16 k-steps x 2 (3) wgmma into ``acc`` (64 x D fp32: D/2 registers a
   thread, ``acc[n, e]`` = row ``16w + g + 8(e >> 1)``, column ``8n + 2t + (e & 1)``:
   the m16n8 C layout of warp w, so the mma.sync kernel's epilogue helpers apply
   unchanged), one commit, ``wait_group 0``. Epilogue: − dZ_j, the chain rule (softmax's
   φ·dφ summed over the quad by two ``shfl_xor``), ``dk += `` (one writer per element).
   ``share``: barrier (every warp is past its wait: V is read no more), φ of the rows
   computed again from k (the same values: the stats of step 1) and stored into V's
   tiles, ``fence.proxy.async``, barrier.
4. Pass 2: D/16 k-steps x 3 wgmma into the same registers, wait, ``dv +=``.

dq_linear (``make_dq_linear_wgmma``)
------------------------------------
Per query block i (64 rows r; module doc of ``tc/linear_backward.py``)::

    dφ(q_r) = (dO_l[r] · H_iᵀ − δl_r Z_i) / den_r;  dq[r] += J_φ(q_r)ᵀ dφ(q_r)    (pass 1)
    QO_i = Σ_r ĉ_rᵀ dO_l[r]  (D x D),  QD_i = Σ_r ĉ_r δl_r                      (pass 2)

Tiles: dO_l hi (| lo: unless bf16 bits) | H_i hi | H_i lo | fp32 rows (mx, 1/Σ, 1/den,
δl) and Z_i, with ĉ hi / lo written into H_i's tiles after pass 1 (``share``, default:
φ computed again from q, · the row's 1/den; D = 128, bf16 dO_l: 80 KiB + 2.5 KiB, two
CTAs an SM), or in tiles of their own after dO_l's, written in step 1 (``share=False``:
112 KiB + 2.5 KiB, one CTA an SM).
Step 1 as the mma.sync kernel's phase 0 (den, δl by the lane pair), stored swizzled;
step 2 stages H_i as dk / dv stage dH_j. Pass 1 is dk's pass 1 with A = dO_l and
B = H_i (K-major), then − δl Z_i, · 1/den, the chain rule, ``dq +=``. Pass 2 has M = D
(d1), k = the 64 rows, N = D (e): A = ĉᵀ is the stored [r][d1] tile read *MN-major*
(``imm-trans-a = 1``: a row of the tile is one k, the 64 M values of one column chunk
contiguous; the m64 tile ``mt`` starts at chunk ``mt``), B = dO_l [r][e] MN-major too
(LBO = the chunk distance). D/64 m-tiles one after the other into the same 64 x D
accumulators, each written to qstate (fp32, or bf16 bits when ``q_bf16``: the
rounding of the mma.sync kernel) as row ``64mt + 16w + g (+8)``. QD_i: a SIMT loop
over the ĉ tiles (thread per d1). Products: ``dOhi·Hhi + dOhi·Hlo (+ dOlo·Hhi)``,
``ĉhi·dOhi + ĉlo·dOhi (+ ĉhi·dOlo)``. A block without marginal partners writes a zero
qstate row and leaves dq alone.

Variants (``make_dkdv_linear_wgmma``; ``tools/sweep_linear_backward_wgmma.py`` times
them on the H200; the defaults are guesses until it has run): ``pf`` 16-byte loads of
dH_j in flight a thread (8 / 16; 16 is 64 registers, free before pass 1), ``share``
(φ in V's tiles: two CTAs an SM at D = 128, for one more barrier and φ computed twice).
``make_dq_linear_wgmma`` has the same two (``share``: ĉ in H_i's tiles, below).

Blocks with no marginal partner (``n_marg <= 0``) return at once, as in the mma.sync
kernel. Under the CUDA simulator the wgmma twins (``tc/wgmma.py``) run the same code
(slowly: 128 Python threads a CTA).

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``; relu, so dk = v·dHᵀ = D where k > 0)::

    import numpy as np
    from sla_numba.gpu.tc.linear_backward_wgmma import launch_dkdv_linear_wgmma
    B, H, N, D = 1, 1, 64, 64
    one = (np.ones((B, H, N, D), np.float32).view(np.int32) >> 16).astype(np.int16)
    dh = np.zeros((B, H, 1, D * D + D), np.float32); dh[..., :D * D] = 1.0
    dk = np.zeros((B, H, N, D), np.float32); dv = np.zeros_like(dk)
    launch_dkdv_linear_wgmma("bf16", one, one, dh, np.ones((B, H, 1), np.int32), dk, dv,
                             B, H, N, D, 64, 2, 0)
    assert (dk == D).all() and (dv == D).all()
"""

import functools

import numpy as np
from numba import cuda, float32, int16, int32, int64

from .. import _compat
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, dtype_name, flat, size
from .forward_wgmma import wgmma_device_ok
from .linear import _DEV, FASTMATH, ONE, ZERO, ZI, _in_f32, _load_phi_row, _split_pair, u64
from .linear_backward import LinearGradKernel, _add_rows, _blocks_of, _chain, _check_common
from .ptx import SIMULATED, ldg_v4_f32, pack_bf16x2, shfl_xor, smem_addr
from .states import _high16, _low16
from .tiles import SMEM_ALIGN
from .wgmma import desc_hi, fence_proxy_async, make_wgmma_ss, wg_commit, wg_fence, wg_wait

#: The one key-block size (= wgmma's M) and the head dims (acc: D/2 fp32 a thread).
BLOCK = 64
HEAD_DIMS = (64, 128)
THREADS = 128
#: 16-byte loads of dH_j a thread keeps in flight (registers: 4 each) when not given.
PF_DEFAULT = 16
#: φ's tiles share V's shared memory (written after pass 1) when not given: 98 KiB at
#: D = 128 instead of 114 (bf16), so two CTAs fit an SM (module doc, "Variants").
SHARE_DEFAULT = True
#: Descriptor fields: K-major operands SBO 1024 (8 rows; LBO unused: 16); dH_j read
#: MN-major: LBO = the distance of two 64-column chunks (D rows x 128 bytes), SBO 1024.
K_LBO, SBO = 16, 1024


def wgmma_unsupported_reason(kind, D, block, device=None):
    """None when the wgmma kernel takes this configuration, else why not (a sentence)."""
    if kind not in ("bf16", "f16"):
        return f"kind {kind!r} (needs 'bf16' or 'f16')"
    if int(D) not in HEAD_DIMS:
        return f"head_dim {D} (supported: 64, 128)"
    if int(block) != BLOCK:
        return f"block {block} (supported: 64)"
    if not wgmma_device_ok(device):
        return "no CUDA device of compute capability 9.0 (wgmma is Hopper's)"
    return None


def smem_layout(D, kind, share=SHARE_DEFAULT):
    """Byte offsets (from the 1024-aligned base) of the tiles and the fp32 area, and the
    dynamic shared-memory bytes to ask for (+1024 for the alignment). ``share``: φ hi /
    lo take V hi / lo's places (both kinds get a lo tile)."""
    ta = BLOCK * D * 2  # a 64-row tile: D/64 chunks of 8 KiB
    tx = D * D * 2  # dH_j: D/64 chunks of D rows x 128 bytes
    vh = 0
    vl = ta
    if share:
        ph, pl = vh, vl
        xh = 2 * ta
    else:
        ph = vl + (ta if kind == "f16" else 0)  # bf16 v is exact: no lo tile
        pl = ph + ta
        xh = pl + ta
    xl = xh + tx
    f32 = xl + tx
    nbytes = f32 + (2 * BLOCK + D) * 4 + 1024
    return dict(vh=vh, vl=vl, ph=ph, pl=pl, xh=xh, xl=xl, f32=f32, bytes=nbytes)


@_compat.device(**_DEV)
def _sw(r, c, CB):
    """Byte offset of the 16-bit element (row r, column c) of a swizzled tile whose
    64-column chunks are CB bytes apart (``tc/wgmma.py``, ``sw128_offset``)."""
    return (c >> 6) * CB + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4) + 2 * (c & 7)


@_compat.device(**_DEV)
def _put_phi(smem32, xs, o4, r, li, ok, C, CA, PH, PL):
    """φ of this lane's C values of row r (``xs``), split into hi / lo, at their swizzled
    places in the φ tiles (byte offsets PH / PL from the base, ``o4`` = the base as an
    int32 index); zeros for a row past the sequence (not ``ok``)."""
    for c2 in range(C // 2):
        s4 = o4 + (_sw(r, li * C + 2 * c2, CA) >> 2)
        p, pl = _split_pair(xs[2 * c2], xs[2 * c2 + 1])
        smem32[s4 + (PH >> 2)] = p if ok else ZI
        smem32[s4 + (PL >> 2)] = pl if ok else ZI


@functools.cache
@kernel_factory
def make_dkdv_linear_wgmma(kind, D, pf=PF_DEFAULT, share=SHARE_DEFAULT):
    """Build ``dkdv_linear_wgmma(k, v, dh, n_marg, dk, dv, H, Nk, Mk, fm)`` (module doc;
    the arguments of ``tc/linear_backward.py``'s ``dkdv_linear``). Grid (Mk, H, B), 128
    threads. ``pf``: 16-byte loads of dH_j in flight a thread (a power of two);
    ``share``: φ written into V's tiles after pass 1 (module doc, "Variants"). Returns a
    ``LinearGradKernel``."""
    if kind not in ("bf16", "f16") or D not in HEAD_DIMS:
        raise ValueError(f"wgmma dk / dv: kind {kind!r}, D = {D} unsupported")
    NT = THREADS
    QPT = D * D // 4 // NT  # quads of dH_j a thread
    PF = min(int(pf), QPT)
    if PF <= 0 or QPT % PF:
        raise ValueError(f"wgmma dk / dv: pf = {pf} must divide {QPT}")
    C = D // 2  # values of a row a lane holds in step 1
    Q4 = D // 4  # quads of a row of dH_j
    NN = D // 8  # n8 tiles of the accumulator
    NACC = D // 2  # accumulator registers a thread
    KS = D // 16
    IN_F16 = kind == "f16"
    V_SPLIT = IN_F16
    SHARE = bool(share)
    lay = smem_layout(D, kind, SHARE)
    VH, VL, PH, PL, XH, XL, F32 = (lay[x] for x in ("vh", "vl", "ph", "pl", "xh", "xl", "f32"))
    ZOFF = F32 + 2 * BLOCK * 4  # bytes: dZ_j after the row stats
    SMEM = lay["bytes"]
    CA = BLOCK * 128  # chunk distance of a 64-row tile
    CX = D * 128  # of dH_j
    HI_K = np.int64(desc_hi(K_LBO, SBO))
    HI_T = np.int64(desc_hi(CX, SBO))
    W = D * D + D
    mm_k = make_wgmma_ss("bf16", D)  # B K-major (pass 1)
    mm_t = make_wgmma_ss("bf16", D, trans_b=1)  # B MN-major (pass 2)

    @_compat.device(**_DEV)
    def dsc(addr, hi):
        return int64((addr & 0x3FFFF) >> 4) | hi

    @_compat.kernel(fastmath=FASTMATH)
    def dkdv_linear_wgmma(k, v, dh, n_marg, dk, dv, H, Nk, Mk, fm):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        smemf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)
        xs = cuda.local.array(C, float32)
        acc = cuda.local.array((NN, 4), float32)
        pf = cuda.local.array((PF, 4), float32)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        j = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        c0 = j * BLOCK
        nrows = min(Nk - c0, BLOCK)
        ob = (bh * Nk + c0) * D
        sb = (bh * Mk + j) * W
        if n_marg[u64(bh * Mk + j)] <= 0:  # no query block takes j as marginal
            return
        sa = smem_addr(smem)
        base = int32((sa + 1023) & ~1023)  # shared address of the tiles (1024-aligned)
        o4 = (base - sa) >> 2  # ... as an index of smem32 / smemf

        # --- 0. the first PF quads of dH_j: in flight during step 1
        for u in range(PF):
            x = tid + u * NT
            rr = x // Q4
            a0, a1, a2, a3 = ldg_v4_f32(dh, int64(sb + rr * D + (x - rr * Q4) * 4))
            pf[u, 0], pf[u, 1], pf[u, 2], pf[u, 3] = a0, a1, a2, a3

        # --- 1. rows: φ(k_r) hi / lo, v_r (bits, or hi / lo for fp16), stats, dZ_j
        r = tid >> 1
        li = tid & 1
        ok = r < nrows
        gk = ob + (r if ok else 0) * D + li * C  # rows past the end read row 0, unused
        mx, inv = _load_phi_row(xs, k, gk, ok, C, fm, IN_F16)
        if li == 0:
            smemf[o4 + (F32 >> 2) + 2 * r] = mx
            smemf[o4 + (F32 >> 2) + 2 * r + 1] = inv
        if not SHARE:
            _put_phi(smem32, xs, o4, r, li, ok, C, CA, PH, PL)
        # v in a loop of its own (with φ's, LLVM leaves the fp16 loop rolled and xs in
        # local memory: tools/check_tc_ptx.py --only linear_grad_wgmma)
        for c2 in range(C // 2):
            s4 = o4 + (_sw(r, li * C + 2 * c2, CA) >> 2)
            g = gk + 2 * c2
            if V_SPLIT:
                p, pl = _split_pair(
                    _in_f32(int32(v[u64(g)]), True), _in_f32(int32(v[u64(g + 1)]), True)
                )
                smem32[s4 + (VL >> 2)] = pl if ok else ZI
            else:
                p = (int32(v[u64(g)]) & 0xFFFF) | (int32(v[u64(g + 1)]) << 16)
            smem32[s4 + (VH >> 2)] = p if ok else ZI
        for x in range(tid, D, NT):
            smemf[o4 + (ZOFF >> 2) + x] = dh[u64(sb + D * D + x)]

        # --- 2. dH_j -> hi / lo tiles [d][e], PF quads a thread in flight
        _stage_state(smem32, pf, dh, sb, o4, XH, XL, D, Q4, CX, QPT, PF, tid, NT)
        fence_proxy_async()  # generic-proxy stores -> visible to wgmma (async proxy)
        cuda.syncthreads()

        # --- 3. pass 1: dφ(k) = v · dH_jᵀ − dZ_j (A = v [c][e], B = dH_j [d][e] K-major)
        wg_fence(acc, NACC)
        for ks in range(KS):
            ka = (ks >> 2) * CA + (ks & 3) * 32
            kx = (ks >> 2) * CX + (ks & 3) * 32
            sd = 0 if ks == 0 else 1  # the first wgmma overwrites acc
            mm_k(smem, acc, dsc(base + VH + ka, HI_K), dsc(base + XH + kx, HI_K), sd)
            mm_k(smem, acc, dsc(base + VH + ka, HI_K), dsc(base + XL + kx, HI_K), 1)
            if V_SPLIT:
                mm_k(smem, acc, dsc(base + VL + ka, HI_K), dsc(base + XH + kx, HI_K), 1)
        wg_commit()
        wg_wait(acc, NACC, 0)
        t = lane & 3
        ra = warp * 16 + (lane >> 2)
        for n in range(NN):
            for x in range(2):
                zc = smemf[o4 + (ZOFF >> 2) + 8 * n + 2 * t + x]
                acc[n, x] = acc[n, x] - zc
                acc[n, 2 + x] = acc[n, 2 + x] - zc
        ok0 = ra < nrows
        ok1 = ra + 8 < nrows
        ka_ = ob + ra * D + 2 * t
        f0 = o4 + (F32 >> 2) + 2 * ra
        f1 = f0 + 16
        mx0, iv0, mx1, iv1 = smemf[f0], smemf[f0 + 1], smemf[f1], smemf[f1 + 1]
        _chain(acc, k, ka_, D * 8, mx0, iv0, mx1, iv1, ok0, ok1, fm, IN_F16, NN)
        _add_rows(dk, ka_, acc, D, ok0, ok1, NN)
        if SHARE:  # φ into V's tiles, now that every warp's pass-1 wgmma are done
            cuda.syncthreads()
            _load_phi_row(xs, k, gk, ok, C, fm, IN_F16)
            _put_phi(smem32, xs, o4, r, li, ok, C, CA, PH, PL)
            fence_proxy_async()
            cuda.syncthreads()

        # --- 4. pass 2: dv += φ(K) · dH_j (A = φ [c][d] K-major, B = dH_j [d][e] MN-major)
        wg_fence(acc, NACC)
        for ks in range(KS):
            ka = (ks >> 2) * CA + (ks & 3) * 32
            kt = ks * 2048  # 16 rows of dH_j
            sd = 0 if ks == 0 else 1
            mm_t(smem, acc, dsc(base + PH + ka, HI_K), dsc(base + XH + kt, HI_T), sd)
            mm_t(smem, acc, dsc(base + PL + ka, HI_K), dsc(base + XH + kt, HI_T), 1)
            mm_t(smem, acc, dsc(base + PH + ka, HI_K), dsc(base + XL + kt, HI_T), 1)
        wg_commit()
        wg_wait(acc, NACC, 0)
        _add_rows(dv, ka_, acc, D, ok0, ok1, NN)

    return LinearGradKernel(dkdv_linear_wgmma, SMEM, NT)


@functools.cache
@kernel_factory
def make_dq_linear_wgmma(kind, D, l_half, q_bf16=False, pf=PF_DEFAULT, share=SHARE_DEFAULT):
    """Build ``dq_linear_wgmma(q, o_l, do_l, lstate, n_marg, dq, qstate, H, Nq, Mq, fm,
    eps)`` (module doc, "dq_linear"; the arguments of ``tc/linear_backward.py``'s
    ``dq_linear``). Grid (Mq, H, B), 128 threads. ``l_half``: o_l / do_l int16 bits of
    ``kind`` (else fp32); ``q_bf16``: qstate int16, each value rounded to bf16; ``pf``:
    16-byte loads of H_i in flight a thread; ``share``: ĉ written into H_i's tiles after
    pass 1 (module doc). Returns a ``LinearGradKernel``."""
    if kind not in ("bf16", "f16") or D not in HEAD_DIMS:
        raise ValueError(f"wgmma dq: kind {kind!r}, D = {D} unsupported")
    NT = THREADS
    QPT = D * D // 4 // NT
    PF = min(int(pf), QPT)
    if PF <= 0 or QPT % PF:
        raise ValueError(f"wgmma dq: pf = {pf} must divide {QPT}")
    C = D // 2
    Q4 = D // 4
    NN = D // 8
    NACC = D // 2
    KS = D // 16
    IN_F16 = kind == "f16"
    L_HALF = bool(l_half)
    DO_SPLIT = not (L_HALF and kind == "bf16")  # bf16 dO_l is exact: one term
    Q16 = bool(q_bf16)
    QZERO = int16(0) if Q16 else float32(0.0)
    SHARE = bool(share)
    ta = BLOCK * D * 2
    DOH = 0
    DOL = ta
    if SHARE:  # ĉ hi / lo inside H_i's tiles (H_i is D x D >= 64 x D: 2 tiles fit)
        XH = DOL + (ta if DO_SPLIT else 0)
        CH, CL = XH, XH + ta
    else:
        CH = DOL + (ta if DO_SPLIT else 0)
        CL = CH + ta
        XH = CL + ta
    XL = XH + D * D * 2
    F32 = XL + D * D * 2  # bytes: rows [64][4] (mx, 1/Σ, 1/den, δl), then Z [D]
    ZOFF = F32 + 4 * BLOCK * 4
    SMEM = ZOFF + D * 4 + 1024
    CA = BLOCK * 128
    CX = D * 128
    HI_K = np.int64(desc_hi(K_LBO, SBO))
    HI_M = np.int64(desc_hi(CA, SBO))  # ĉ and dO_l read MN-major (pass 2)
    W = D * D + D
    mm_k = make_wgmma_ss("bf16", D)  # pass 1: A, B K-major
    mm_tt = make_wgmma_ss("bf16", D, trans_b=1, trans_a=1)  # pass 2: A = ĉᵀ and B = dO_l MN-major

    @_compat.device(**_DEV)
    def dsc(addr, hi):
        return int64((addr & 0x3FFFF) >> 4) | hi

    @_compat.kernel(fastmath=FASTMATH)
    def dq_linear_wgmma(q, o_l, do_l, lstate, n_marg, dq, qstate, H, Nq, Mq, fm, eps):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        smemf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)
        xs = cuda.local.array(C, float32)
        acc = cuda.local.array((NN, 4), float32)
        pf = cuda.local.array((PF, 4), float32)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        r0 = i * BLOCK
        nrows = min(Nq - r0, BLOCK)
        ob = (bh * Nq + r0) * D
        sb = (bh * Mq + i) * W
        if n_marg[u64(bh * Mq + i)] <= 0:  # no marginal key block: no linear gradient
            for x in range(tid, W, NT):
                qstate[u64(sb + x)] = QZERO
            return
        sa = smem_addr(smem)
        base = int32((sa + 1023) & ~1023)
        o4 = (base - sa) >> 2

        # --- 0. the first PF quads of H_i: in flight during step 1
        for u in range(PF):
            x = tid + u * NT
            rr = x // Q4
            a0, a1, a2, a3 = ldg_v4_f32(lstate, int64(sb + rr * D + (x - rr * Q4) * 4))
            pf[u, 0], pf[u, 1], pf[u, 2], pf[u, 3] = a0, a1, a2, a3

        # --- 1. rows: φ(q_r), den_r, δl_r; ĉ hi / lo and dO_l into swizzled tiles
        r = tid >> 1
        li = tid & 1
        ok = r < nrows
        gq = ob + (r if ok else 0) * D + li * C
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
        fr = o4 + (F32 >> 2) + 4 * r
        if li == 0:
            smemf[fr] = mx
            smemf[fr + 1] = inv
            smemf[fr + 2] = inv_den
            smemf[fr + 3] = dl
        if not SHARE:
            _put_c(smem32, xs, inv_den, o4, r, li, ok, C, CA, CH, CL)
        for c2 in range(C // 2):
            s4 = o4 + (_sw(r, li * C + 2 * c2, CA) >> 2)
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
            smem32[s4 + (DOH >> 2)] = p if ok else ZI
            if DO_SPLIT:
                smem32[s4 + (DOL >> 2)] = pl if ok else ZI
        for x in range(tid, D, NT):
            smemf[o4 + (ZOFF >> 2) + x] = lstate[u64(sb + D * D + x)]

        # --- 2. H_i -> hi / lo tiles [d][e]
        _stage_state(smem32, pf, lstate, sb, o4, XH, XL, D, Q4, CX, QPT, PF, tid, NT)
        fence_proxy_async()
        cuda.syncthreads()

        # --- 3. pass 1: dφ(q) = (dO_l · H_iᵀ − δl Z_i) / den; chain rule; dq +=
        wg_fence(acc, NACC)
        for ks in range(KS):
            ka = (ks >> 2) * CA + (ks & 3) * 32
            kx = (ks >> 2) * CX + (ks & 3) * 32
            sd = 0 if ks == 0 else 1
            mm_k(smem, acc, dsc(base + DOH + ka, HI_K), dsc(base + XH + kx, HI_K), sd)
            mm_k(smem, acc, dsc(base + DOH + ka, HI_K), dsc(base + XL + kx, HI_K), 1)
            if DO_SPLIT:
                mm_k(smem, acc, dsc(base + DOL + ka, HI_K), dsc(base + XH + kx, HI_K), 1)
        wg_commit()
        wg_wait(acc, NACC, 0)
        t = lane & 3
        g8 = lane >> 2
        ra = warp * 16 + g8
        f0 = o4 + (F32 >> 2) + 4 * ra
        f1 = f0 + 32
        for n in range(NN):
            for x in range(2):
                zc = smemf[o4 + (ZOFF >> 2) + 8 * n + 2 * t + x]
                acc[n, x] = (acc[n, x] - smemf[f0 + 3] * zc) * smemf[f0 + 2]
                acc[n, 2 + x] = (acc[n, 2 + x] - smemf[f1 + 3] * zc) * smemf[f1 + 2]
        ok0 = ra < nrows
        ok1 = ra + 8 < nrows
        qa = ob + ra * D + 2 * t
        mx0, iv0, mx1, iv1 = smemf[f0], smemf[f0 + 1], smemf[f1], smemf[f1 + 1]
        _chain(acc, q, qa, D * 8, mx0, iv0, mx1, iv1, ok0, ok1, fm, IN_F16, NN)
        _add_rows(dq, qa, acc, D, ok0, ok1, NN)
        if SHARE:  # ĉ into H_i's tiles, now that every warp's pass-1 wgmma are done
            cuda.syncthreads()
            _load_phi_row(xs, q, gq, ok, C, fm, IN_F16)
            _put_c(smem32, xs, smemf[fr + 2], o4, r, li, ok, C, CA, CH, CL)
            fence_proxy_async()
            cuda.syncthreads()

        # --- 4. pass 2: QO_i = ĉᵀ · dO_l, one m64 tile of d1 at a time (k = the rows)
        for mt in range(D // 64):
            wg_fence(acc, NACC)
            for ks in range(BLOCK // 16):
                am = mt * CA + ks * 2048  # rows 16ks.. of ĉ's column chunk mt
                bk = ks * 2048
                sd = 0 if ks == 0 else 1
                mm_tt(smem, acc, dsc(base + CH + am, HI_M), dsc(base + DOH + bk, HI_M), sd)
                mm_tt(smem, acc, dsc(base + CL + am, HI_M), dsc(base + DOH + bk, HI_M), 1)
                if DO_SPLIT:
                    mm_tt(smem, acc, dsc(base + CH + am, HI_M), dsc(base + DOL + bk, HI_M), 1)
            wg_commit()
            wg_wait(acc, NACC, 0)
            so = sb + (mt * 64 + ra) * D + 2 * t
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
        o2 = (base - sa) >> 1
        for d1 in range(tid, D, NT):
            s = ZERO
            for rr in range(BLOCK):
                at = o2 + (_sw(rr, d1, CA) >> 1)
                cv = _in_f32(int32(smem[at + (CH >> 1)]), False)
                cv += _in_f32(int32(smem[at + (CL >> 1)]), False)
                s += cv * smemf[o4 + (F32 >> 2) + 4 * rr + 3]
            if Q16:
                qstate[u64(sb + D * D + d1)] = _low16(pack_bf16x2(s, s))
            else:
                qstate[u64(sb + D * D + d1)] = s

    return LinearGradKernel(dq_linear_wgmma, SMEM, NT)


@_compat.device(**_DEV)
def _put_c(smem32, xs, inv_den, o4, r, li, ok, C, CA, CH, CL):
    """ĉ = φ / den of this lane's C values of row r (``xs`` = φ), split into hi / lo, at
    their swizzled places in the ĉ tiles (byte offsets CH / CL); zeros past the sequence."""
    for c2 in range(C // 2):
        s4 = o4 + (_sw(r, li * C + 2 * c2, CA) >> 2)
        p, pl = _split_pair(xs[2 * c2] * inv_den, xs[2 * c2 + 1] * inv_den)
        smem32[s4 + (CH >> 2)] = p if ok else ZI
        smem32[s4 + (CL >> 2)] = pl if ok else ZI


@_compat.device(**_DEV)
def _stage_state(smem32, pf, src, sb, o4, XH, XL, D, Q4, CX, QPT, PF, tid, NT):
    """The D x D fp32 state at ``src[sb:]`` into the swizzled bf16 hi / lo tiles [d][e]
    (byte offsets XH / XL from the base), PF 16-byte loads a thread in flight at a time;
    ``pf`` holds the first PF (issued by the caller) on entry."""
    for rnd in range(QPT // PF):
        if rnd > 0:
            for u in range(PF):
                x = tid + (rnd * PF + u) * NT
                rr = x // Q4
                a0, a1, a2, a3 = ldg_v4_f32(src, int64(sb + rr * D + (x - rr * Q4) * 4))
                pf[u, 0], pf[u, 1], pf[u, 2], pf[u, 3] = a0, a1, a2, a3
        for u in range(PF):
            x = tid + (rnd * PF + u) * NT
            rr = x // Q4
            cc = (x - rr * Q4) * 4
            s4 = o4 + (_sw(rr, cc, CX) >> 2)
            p0, l0 = _split_pair(pf[u, 0], pf[u, 1])
            p1, l1 = _split_pair(pf[u, 2], pf[u, 3])
            smem32[s4 + (XH >> 2)] = p0
            smem32[s4 + (XH >> 2) + 1] = p1
            smem32[s4 + (XL >> 2)] = l0
            smem32[s4 + (XL >> 2) + 1] = l1


def use_wgmma(kind, D, block, state):
    """Whether a dk / dv launch takes the wgmma kernel: ``SLA_NUMBA_LINEAR_GRAD=wgmma``,
    a configuration it takes (:func:`wgmma_unsupported_reason`) and a 16-byte aligned
    state (its 16-byte loads)."""
    from ... import config

    if config.linear_grad_kernel() != "wgmma":
        return False
    if wgmma_unsupported_reason(kind, D, block) is not None:
        return False
    addr = address(state)
    return addr is not None and addr % 16 == 0


def launch_dkdv_linear_wgmma(
    kind, k_bits, v_bits, dh, n_marg, dk, dv, B, H, Nk, D, block_k, fm, stream, pf=PF_DEFAULT,
    share=SHARE_DEFAULT,
):  # fmt: skip
    """``launch_dkdv_linear_tc`` (``tc/linear_backward.py``, same arguments) on the wgmma
    kernel: add the linear branch's dk, dv into ``dk``, ``dv``. A ValueError for a
    configuration it does not take (:func:`wgmma_unsupported_reason`). ``pf``, ``share``:
    the kernel variant (:func:`make_dkdv_linear_wgmma`)."""
    who = "launch_dkdv_linear_wgmma"
    B, H, Nk, D, block_k, fm = (int(x) for x in (B, H, Nk, D, block_k, fm))
    _check_common(who, kind, D, block_k, fm, B, H)
    reason = wgmma_unsupported_reason(kind, D, block_k)
    if reason is not None:
        raise ValueError(f"{who}: the wgmma kernel does not take {reason}")
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
    addr = address(dh)
    if not SIMULATED and (addr is None or addr % 16):
        raise ValueError(f"{who}: dh must start on a 16-byte boundary")
    kern = make_dkdv_linear_wgmma(kind, D, int(pf), bool(share))
    args = (flat(k_bits), flat(v_bits), flat(dh), flat(n_marg), flat(dk), flat(dv), H, Nk, Mk, fm)
    _tc_build.launch(kern.kernel, (nblk, H, B), kern.threads, kern.smem_bytes, stream, args)


def launch_dq_linear_wgmma(
    kind, q_bits, o_l, do_l, lstate, n_marg, dq, qstate, B, H, Nq, D, block_q, fm, eps, stream,
    pf=PF_DEFAULT, share=SHARE_DEFAULT,
):  # fmt: skip
    """``launch_dq_linear_tc`` (``tc/linear_backward.py``, same arguments and checks) on
    the wgmma kernel: add the linear branch's dq into ``dq``, write QO_i / QD_i into
    ``qstate``. A ValueError for a configuration it does not take. ``pf``, ``share``:
    the kernel variant (:func:`make_dq_linear_wgmma`)."""
    from .linear_backward import launch_dq_linear_tc

    who = "launch_dq_linear_wgmma"
    reason = wgmma_unsupported_reason(kind, D, block_q)
    if reason is not None:
        raise ValueError(f"{who}: the wgmma kernel does not take {reason}")
    addr = address(lstate)
    if not SIMULATED and (addr is None or addr % 16):
        raise ValueError(f"{who}: lstate must start on a 16-byte boundary")
    launch_dq_linear_tc(
        kind, q_bits, o_l, do_l, lstate, n_marg, dq, qstate, B, H, Nq, D, block_q, fm, eps,
        stream, pipeline="wgmma", wgmma={"pf": int(pf), "share": bool(share)},
    )  # fmt: skip
