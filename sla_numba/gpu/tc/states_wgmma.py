"""The linear branch's key-block states on Hopper warpgroup MMA (``wgmma``; cc 9.0).

The same result, layout and precision as ``tc/states.py`` (read its docstring first)::

    h_j[d, e] = Σ_r φ(k_r)[d] · v_r[e]        z_j[d] = Σ_r φ(k_r)[d]
    r in [j*64, min((j+1)*64, Nk))            (rows past Nk contribute nothing)
    state[b, h, j] = [h_j (row-major, D*D values), z_j (D values)]

but the product of a key block is a handful of ``wgmma.mma_async`` instructions of a
warpgroup (``tc/wgmma.py``) instead of many ``mma.sync`` of single warps fed by
``ldmatrix``. Opt-in: ``SLA_NUMBA_STATES_KERNEL=wgmma`` (``config.py``); it takes fp16
/ bf16 inputs, D in {64, 128}, block_k = 64, compute capability 9.0 exactly, bf16
states (int16 bits) and fp32 states; anything else runs the present choice
(``tc/states.launch_states_tc``).

The product as one GEMM per key block
-------------------------------------
``h_j = φ(K_j)ᵀ V_j`` is M = D (rows d), K = the block's 64 keys (c), N = D (columns
e). wgmma's M is 64, so D = 128 is two m64 tiles: one warpgroup each (a CTA has D/64
warpgroups, 128·D/64 threads). ``z_j = φ(K_j)ᵀ · 1`` rides along as 8 more columns of
B that hold ones: each warpgroup issues ``m64n(D+8)k16`` and the accumulator's columns
D .. D+7 all hold z (so z sums exactly the values h sums, as in ``tc/states.py``).

* A = φ(K)ᵀ (64 d x 16 c per k-step). φ is computed into shared memory with a row
  per key, ``[c][d]``: for A that is the *MN-major* layout (the 64 M values of one k
  index contiguous). wgmma reads it with ``imm-trans-a = 1`` (``make_wgmma_ss(...,
  trans_a=1)``): no transposed copy. Warpgroup w's A is column chunk w of the φ tile.
* B = V (16 c x (D+8) e): ``[c][e]`` is MN-major too (``imm-trans-b = 1``), as V in
  ``tc/forward_wgmma.py``. The ones are a third column chunk after V's (D/64 + 1
  chunks a V stage; only its 8 first columns are read), written once per kernel.
* Precision: φ (fp32) is split as in ``tc/states.py``, ``hi = half(φ)``, ``lo =
  half(φ - hi)``, two A tiles; per k-step the warpgroup issues hi·V then lo·V into the
  same fp32 accumulator (``split=False``: hi only). V is exact in its type.

Shared memory (bytes from a 1024-aligned base; tiles of 64 rows in 128-byte-swizzled
column chunks of 8 KiB, ``tc/wgmma.py``; DC = D/64 chunks a tile)::

    φ hi (DC chunks) | φ lo (DC) | K (DC) | V stage 0 (DC + ones) | V stage 1 (DC + ones)

97 KiB at D = 128 (two CTAs an SM), 57 KiB at D = 64.

Pipeline (a CTA does ``blocks_per_cta`` consecutive key blocks of one (b, h))::

    ones chunks; cp.async K_j0 -> K, V_j0 -> V stage 0
    for each block j (stage s):
        wait for its copies; barrier            # K_j, V_j landed; block j-1 fully done
        φ rows from the K tile -> φ hi / lo     # rows past Nk: zeros
        fence.proxy.async; barrier              # φ, V_j visible to wgmma; K tile free
        cp.async K_j+1 -> K, V_j+1 -> stage 1-s # land during the product and the stores
        wgmma: 4 k-steps x (hi, lo), one commit group, wait for it; barrier
        epilogue through shared memory (below)

φ rows (same operations on the same values as ``tc/states.py``, so the same φ hi / lo
bits): L = NT/64 adjacent threads a key row (4 at D = 128, 2 at D = 64), each owning
C = 32 consecutive columns, read from the swizzled K tile and written back at the same
places of the φ tiles; softmax's row max / sum by ``shfl_xor`` over the L lanes (the
shared ``states._feature_map``).

Fragment ownership (``tc/wgmma.py``): in warpgroup w, warp ww = (tid >> 5) & 3, lane
(g = lane >> 2, t = lane & 3), ``acc[0, n, x]`` is h at row d = 64w + 16ww + g +
8(x >> 1), column 8n + 2t + (x & 1); n = D/8 is the ones block: z at rows d (x = 0)
and d + 8 (x = 2).

Epilogue: a warp's 16 rows d of h_j are 16·D consecutive values of the state row, so
each warp stages its fragment in shared memory and copies it out with consecutive
lanes on consecutive 32-bit words (128-byte warp stores). The staging area of warp ww
is a quarter of its own warpgroup's φ chunks (hi chunk w for ww < 2, lo chunk w else;
4 KiB), free once the group's wgmma are done. bf16 states: all 16 rows in one pass
(packed pairs, nearest even as ``tc/states.py``); fp32 states: 8 rows a pass, two
passes. Inside a staged row the 32-bit word c sits at ``c ^ ((row & 7) << 2)``, so the
8 rows of a fragment store hit different banks. z: bf16 pairs are made with one
``shfl_xor`` (rows g, g + 1), fp32 z stored straight.

Registers (``tools/check_states_wgmma_ptx.py``, sm_90a): 127 at D = 128 (bf16 states;
128 fp32), 72 at D = 64, no spills, no ``.local``: two 256-thread CTAs an SM at D = 128
(shared memory allows two as well). The thread's indices are re-read through an opaque
``mov`` each block (as in ``tc/states.py``'s pipelined kernel): without it LLVM hoists
every address out of the block loop and ptxas took 168 registers (one CTA an SM). The
accumulators are zeroed before each block's first wgmma, which ignores them
(``scale_d = 0``): the race detector (``sla_numba.testing_race``) cannot follow the
wgmma twins' writes and would report a read before a write.

Open questions for the GPU (``tools/sweep_states_wgmma.py``): the best ``blocks_per_cta``;
whether the SIMT φ phase (not overlapped with the tensor cores inside a CTA, only across
the two CTAs of an SM) or the four barriers a block bound the time.

Bits: φ hi / lo are those of ``tc/states.py``; the sums are not in its order (a wgmma
adds its k16 step in the hardware's own order, and hi and lo are separate steps), so
results agree with the ``staged`` kernel to fp32 rounding (then bf16 rounding of the
states), not bit for bit. Bound against float64: that of ``tests/gpu/tc/test_tc_states.py``
(relative to Σ|φ||v|, <= 1e-4 with the split, before bf16 state rounding).

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``; slowly: 128 Python threads)::

    import numpy as np
    from sla_numba.gpu.tc.states_wgmma import launch_states_wgmma
    B, H, Nk, D = 1, 1, 64, 64
    ones = (np.ones((B, H, Nk, D), np.float32).view(np.int32) >> 16).astype(np.int16)
    state = np.empty((B, H, 1, D * D + D), np.float32)
    launch_states_wgmma("bf16", ones, ones, state, B, H, Nk, D, 64, 2, 0)
    # relu(1) = 1: h_j = 64 everywhere, z_j = 64
"""

import functools

import numpy as np
from numba import float32, int16, int32

from .._compat import cuda, kernel
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, flat, int32_pairs
from .forward_wgmma import CHUNK_BYTES, SBO, wgmma_device_ok
from .ptx import (
    cp_async_commit,
    cp_async_wait_group,
    cp_async_zfill,
    opaque_i32,
    pack_bf16x2,
    shfl_xor,
    smem_addr,
)
from .states import (
    ONES,
    StatesKernel,
    _bounds,
    _feature_map,
    _high16,
    _high_f32,
    _low16,
    _low_f32,
    _pack,
    check_states_args,
)
from .tiles import SMEM_ALIGN, TC_FASTMATH
from .wgmma import (
    CHUNK_COLS,
    desc_hi,
    fence_proxy_async,
    make_wgmma_ss,
    wg_commit,
    wg_fence,
    wg_wait,
)

#: The one key-block size (wgmma's k-extent of a block: 4 k-steps of 16 keys).
BLOCK = 64
HEAD_DIMS = (64, 128)
KINDS = ("bf16", "f16")
#: Key blocks a CTA handles by default (``blocks_per_cta``). H200, session 9
#: (``tools/sweep_states_wgmma.py``, bf16 states): 2 / 4 / 8 / 16 blocks 0.308 / 0.309 /
#: 0.313 / 0.318 ms at the Wan2.1 shape, 0.122 / 0.117 / 0.118 / 0.121 ms at B2 H16 D64.
PIPE_BLOCKS = 4
#: Descriptor fields of both operands (MN-major): LBO = the distance of two 64-column
#: chunks (V's D + 8 columns span chunks; φ's m64 tile is one chunk), SBO = 8 rows.
LBO = CHUNK_BYTES
#: Default launch bound by head dim (``make_states_wgmma(min_blocks=-1)``).
MIN_BLOCKS = {128: 2, 64: None}
ZI = np.int32(0)
ZERO = np.float32(0.0)


def wgmma_states_unsupported_reason(kind, D, block_k, device=None):
    """None when the wgmma states kernel takes this configuration, else why not."""
    if kind not in KINDS:
        return f"inputs {kind!r} (needs 'bf16' or 'f16')"
    if int(D) not in HEAD_DIMS:
        return f"head_dim {D} (supported: 64, 128)"
    if int(block_k) != BLOCK:
        return f"block_k {block_k} (supported: 64)"
    if not wgmma_device_ok(device):
        return "no CUDA device of compute capability 9.0 (wgmma is Hopper's)"
    return None


def smem_layout(D):
    """Byte offsets (from the 1024-aligned base) of φ hi, φ lo, the K tile, V stage 0
    and 1, and the dynamic shared memory to ask for (+1024 for the alignment)."""
    tile = (D // CHUNK_COLS) * CHUNK_BYTES
    vstage = tile + CHUNK_BYTES  # V's chunks and the ones chunk
    return dict(
        hi=0, lo=tile, k=2 * tile, v=(3 * tile, 3 * tile + vstage),
        bytes=3 * tile + 2 * vstage + 1024,
    )  # fmt: skip


@functools.cache
@kernel_factory
def make_states_wgmma(kind, D, split=True, out_bf16=True, min_blocks=-1, trans_a=True):
    """Build ``states_wgmma(k, v, state, H, Nk, Mk, fm, nper)`` (module docstring) as a
    ``(kernel, smem_bytes, threads)`` :class:`tc.states.StatesKernel`.

    k, v flat int16 bits (B, H, Nk, D) of ``kind``, 16-byte aligned; ``state`` flat
    int32 (pairs of bf16 bits) with ``out_bf16``, else flat fp32, (B, H, Mk, D*D + D).
    Grid (ceil(ceil(Nk / 64) / nper), H, B): CTA x does key blocks x·nper ..
    x·nper + nper - 1 (those below ceil(Nk / 64)). 128·D/64 threads.

    ``min_blocks``: the launch bound (CTAs an SM ptxas must fit in the register file;
    None: no bound; -1: :data:`MIN_BLOCKS` for this D). Unbounded, ptxas takes 168
    registers at D = 128 (``tools/check_states_wgmma_ptx.py``): one 256-thread CTA an SM;
    bounded to 2, 128 registers, two CTAs (97 KiB of shared memory each).

    ``trans_a``: True (the design above) stores φ a key a row and has wgmma read A = φᵀ
    MN-major; False stores φ transposed, a row d a row (``[d][c]``: A K-major, as Q and
    K in ``tc/forward_wgmma.py``), with 2-byte shared stores: the fallback should the
    hardware read the transposed A otherwise than the simulator twin (the sweep times
    and checks both).
    """
    if kind not in KINDS or D not in HEAD_DIMS:
        raise ValueError(f"wgmma states: kind={kind!r}, D={D} unsupported")
    BK = BLOCK
    DC = D // CHUNK_COLS  # column chunks of a tile = warpgroups
    NT = 128 * DC
    L = NT // BK  # threads a φ row
    C = D // L  # columns a thread of a φ row (32)
    LOG2L = L.bit_length() - 1
    PIECES = C // 8  # 16-byte pieces of a thread's φ slice
    RPP = NT // 8  # rows a copy pass (8 threads a 128-byte row)
    CPASS = BK // RPP
    N = D + 8  # wgmma's N: h's D columns and 8 columns of ones (z)
    NB = N // 8  # n8 blocks of the accumulator
    NACC = N // 2  # accumulator registers a thread
    PARTS = 2 if split else 1
    OUT_BF16 = bool(out_bf16)
    IS_F16 = kind == "f16"
    ONES_PAIR = ONES[kind]
    W = D * D + D
    SW = W // 2 if OUT_BF16 else W  # 32-bit words a state row
    HW = D // 2 if OUT_BF16 else D  # 32-bit words a row of h
    lay = smem_layout(D)
    HI, LO, KOFF, V0 = lay["hi"], lay["lo"], lay["k"], lay["v"][0]
    VSTAGE = lay["v"][1] - lay["v"][0]
    TILE = lay["lo"] - lay["hi"]
    SMEM_BYTES = lay["bytes"]
    HI_DESC = np.int64(desc_hi(LBO, SBO))
    TA = bool(trans_a)
    A_DESC = HI_DESC if TA else np.int64(desc_hi(16, SBO))  # K-major: LBO unused
    A_STEP = 2048 if TA else 32  # bytes from one k16 step of A to the next
    wgmma = make_wgmma_ss(kind, N, trans_b=1, trans_a=1 if TA else 0)  # B (and A if TA) MN-major
    if min_blocks == -1:
        min_blocks = MIN_BLOCKS.get(D)
    bounds, MINB = _bounds(NT, min_blocks)

    @cuda.jit(device=True, inline="always")
    def load_tile(smem, dst, src, gbase, nvalid, t_off, rr, ch):
        # this thread's 16-byte pieces of a 64-row tile (DC chunks): piece ch of rows
        # rr + RPP·p, at the swizzled place t_off (the same for every p: RPP % 8 == 0);
        # rows past nvalid zero-filled (their source address stays at the tile's start)
        for p in range(CPASS):
            r = rr + RPP * p
            ok = r < nvalid
            for dc in range(DC):
                cp_async_zfill(
                    smem,
                    dst + t_off + dc * CHUNK_BYTES + p * RPP * 128,
                    16,
                    src,
                    gbase + (r * D + dc * CHUNK_COLS + ch * 8 if ok else 0),
                    16 if ok else 0,
                )

    @kernel(fastmath=TC_FASTMATH, **bounds)
    def states_wgmma(k, v, state, H, Nk, Mk, fm, nper):
        _ = MINB  # the launch bound, in the disk-cache key
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        smemf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)
        acc = cuda.local.array((1, NB, 4), float32)  # h (and z in block D/8)
        xs = cuda.local.array(C, float32)  # a thread's slice of a φ row
        tid0 = int32(cuda.threadIdx.x)
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        j0 = cuda.blockIdx.x * nper
        jend = min(j0 + nper, (Nk + BK - 1) // BK)
        hb = (b * H + h) * Nk  # the head's first key row
        sa = smem_addr(smem)
        sbase = int32((sa + 1023) & ~1023)  # 1024-aligned (swizzle atoms)
        wbase = (sbase - sa) >> 2  # its index in 32-bit words
        # copies: thread (rr, ch) moves piece ch of rows rr + RPP·p (also in the loop)
        rr = tid0 >> 3
        ch = tid0 & 7
        t_off = rr * 128 + ((ch ^ (rr & 7)) << 4)

        # --- the ones columns of z (both V stages), once: piece 0 of every row
        if tid0 < BK:
            for s in range(2):
                at = wbase + ((V0 + s * VSTAGE + DC * CHUNK_BYTES + ((tid0 & 7) << 4)) >> 2)
                for q in range(4):
                    smem32[at + tid0 * 32 + q] = ONES_PAIR
        # --- the first block's K and V
        r0 = j0 * BK
        load_tile(smem, sbase + KOFF, k, (hb + r0) * D, Nk - r0, t_off, rr, ch)
        load_tile(smem, sbase + V0, v, (hb + r0) * D, Nk - r0, t_off, rr, ch)
        cp_async_commit()

        for j in range(j0, jend):
            # the thread's indices anew each block, through an opaque mov: otherwise
            # LLVM hoists every address out of the loop (register pressure, spills)
            tid = opaque_i32(tid0)
            lane = tid & 31
            wg = tid >> 7
            ww = (tid >> 5) & 3
            g = lane >> 2
            t = lane & 3
            rr = tid >> 3
            ch = tid & 7
            t_off = rr * 128 + ((ch ^ (rr & 7)) << 4)
            row = tid // L  # φ: thread (row, li) owns columns li·C .. li·C + C - 1
            li = tid - row * L
            st = (j - j0) & 1
            r0 = j * BK
            nrows = min(Nk - r0, BK)
            cp_async_wait_group(0)  # this thread's pieces of K_j, V_j have landed
            cuda.syncthreads()  # everyone's; block j - 1's stores are done

            # --- 1. φ rows: the K tile -> φ hi / lo (same places, swizzled)
            ok = row < nrows
            for pi in range(PIECES):
                col = li * C + 8 * pi
                off = (col // CHUNK_COLS) * CHUNK_BYTES + row * 128
                off += (((col % CHUNK_COLS) >> 3) ^ (row & 7)) << 4
                kw = wbase + ((KOFF + off) >> 2)
                for q in range(4):
                    p = smem32[kw + q]
                    xs[8 * pi + 2 * q] = _low_f32(p, IS_F16) if ok else ZERO
                    xs[8 * pi + 2 * q + 1] = _high_f32(p, IS_F16) if ok else ZERO
            _feature_map(xs, fm, C, LOG2L)  # every lane (shuffles), masked when stored
            for pi in range(PIECES):
                col = li * C + 8 * pi
                off = (col // CHUNK_COLS) * CHUNK_BYTES + row * 128
                off += (((col % CHUNK_COLS) >> 3) ^ (row & 7)) << 4
                for q in range(4):
                    x0 = xs[8 * pi + 2 * q]
                    x1 = xs[8 * pi + 2 * q + 1]
                    p = _pack(x0, x1, IS_F16) if ok else ZI
                    plo = ZI
                    if PARTS == 2:
                        lo0 = x0 - _low_f32(p, IS_F16)
                        lo1 = x1 - _high_f32(p, IS_F16)
                        plo = _pack(lo0, lo1, IS_F16) if ok else ZI
                    if TA:  # [c][d]: the pair at the K tile's place
                        smem32[wbase + ((HI + off) >> 2) + q] = p
                        if PARTS == 2:
                            smem32[wbase + ((LO + off) >> 2) + q] = plo
                    else:  # [d][c]: rows d = col + 2q, + 1; column c = row
                        d = col + 2 * q
                        cb = (row & 7) * 2
                        t0 = d * 128 + ((((row >> 3) ^ (d & 7)) << 4) + cb)
                        t1 = (d + 1) * 128 + ((((row >> 3) ^ ((d + 1) & 7)) << 4) + cb)
                        hb0 = 2 * wbase + ((HI + t0) >> 1)
                        hb1 = 2 * wbase + ((HI + t1) >> 1)
                        smem[hb0] = _low16(p)
                        smem[hb1] = _high16(p)
                        if PARTS == 2:
                            smem[hb0 + (TILE >> 1)] = _low16(plo)
                            smem[hb1 + (TILE >> 1)] = _high16(plo)
            fence_proxy_async()  # φ (and the landed V_j) visible to wgmma
            cuda.syncthreads()  # everyone's; the K tile is free

            # --- 2. the next block's K and V on their way
            if j + 1 < jend:
                rn = r0 + BK
                gn = (hb + rn) * D
                load_tile(smem, sbase + KOFF, k, gn, Nk - rn, t_off, rr, ch)
                load_tile(smem, sbase + V0 + (1 - st) * VSTAGE, v, gn, Nk - rn, t_off, rr, ch)
                cp_async_commit()

            # --- 3. the product: warpgroup wg's m64 tile, 4 k-steps x (hi, lo)
            vb = sbase + V0 + st * VSTAGE
            ab = sbase + HI + wg * CHUNK_BYTES  # (K-major: rows d 64wg.., 128 B a row)
            for n in range(NB):  # (the first wgmma ignores them: scale_d = 0; zeroed
                for x in range(4):  # so no register is read before a write, for the
                    acc[0, n, x] = ZERO  # race detector, whose twins it cannot follow)
            wg_fence(acc, NACC)
            for kk in range(BK // 16):
                db = (((vb + kk * 2048) & 0x3FFFF) >> 4) | HI_DESC
                for pt in range(PARTS):
                    da = (((ab + pt * TILE + kk * A_STEP) & 0x3FFFF) >> 4) | A_DESC
                    wgmma(smem, acc, da, db, 0 if kk == 0 and pt == 0 else 1)
            wg_commit()
            wg_wait(acc, NACC, 0)
            cuda.syncthreads()  # every warpgroup's wgmma done: φ chunks free for staging

            # --- 4. the epilogue: warp's 16 rows of h through its staging area
            d0 = wg * 64 + ww * 16  # the warp's first row d
            stw = wbase + ((HI + (ww >> 1) * TILE + wg * CHUNK_BYTES + (ww & 1) * 4096) >> 2)
            sb = ((b * H + h) * Mk + j) * SW  # the block's state row (32-bit words)
            ob = sb + d0 * HW  # the warp's first word of h
            sw = g << 2  # the XOR of a staged row g (and g + 8)
            if OUT_BF16:
                for n in range(D // 8):
                    c = (4 * n + t) ^ sw
                    smem32[stw + g * HW + c] = pack_bf16x2(acc[0, n, 0], acc[0, n, 1])
                    smem32[stw + (g + 8) * HW + c] = pack_bf16x2(acc[0, n, 2], acc[0, n, 3])
                # z: rows g, g + 1 packed by the even-g lanes
                za = acc[0, D // 8, 0]
                zb = acc[0, D // 8, 2]
                pa = shfl_xor(za, 4)
                pb = shfl_xor(zb, 4)
                if t == 0 and (g & 1) == 0:
                    zw = sb + D * HW + (d0 + g) // 2
                    state[zw] = pack_bf16x2(za, pa)
                    state[zw + 4] = pack_bf16x2(zb, pb)
                cuda.syncthreads()
                for i in range(16 * HW // 32):
                    q = lane + 32 * i
                    r = q // HW
                    c = q - r * HW
                    state[ob + q] = smem32[stw + r * HW + (c ^ ((r & 7) << 2))]
            else:
                if t == 0:
                    state[sb + D * HW + d0 + g] = acc[0, D // 8, 0]
                    state[sb + D * HW + d0 + g + 8] = acc[0, D // 8, 2]
                for hh in range(2):
                    if hh == 1:
                        cuda.syncthreads()  # pass 0 copied out
                    for n in range(D // 8):
                        c = (8 * n + 2 * t) ^ sw
                        smemf[stw + g * HW + c] = acc[0, n, 2 * hh]
                        smemf[stw + g * HW + c + 1] = acc[0, n, 2 * hh + 1]
                    cuda.syncthreads()
                    for i in range(8 * HW // 32):
                        q = lane + 32 * i
                        r = q // HW
                        c = q - r * HW
                        state[ob + 8 * hh * HW + q] = smemf[stw + r * HW + (c ^ ((r & 7) << 2))]

    return StatesKernel(states_wgmma, SMEM_BYTES, NT)


def launch_states_wgmma(
    kind, k_bits, v_bits, state, B, H, Nk, D, block_k, fm, stream, split=True,
    blocks_per_cta=None, trans_a=True,
):  # fmt: skip
    """``tc/states.launch_states_tc`` on the wgmma kernel (same arguments but tiles and
    variant): ``state[b, h, j] = [vec(h_j), z_j]`` for j < ceil(Nk / 64). An int16
    ``state`` receives bf16 bits, a float32 one fp32. k, v need 16-byte alignment and an
    int16 state 4-byte alignment (ValueError otherwise; the states launcher checks first
    and falls back). ``blocks_per_cta``: key blocks a CTA (default ``PIPE_BLOCKS``).
    ``trans_a``: φ's layout (:func:`make_states_wgmma`).
    A ValueError for a configuration the kernel does not take
    (:func:`wgmma_states_unsupported_reason`)."""
    B, H, Nk, D, block_k, fm = (int(x) for x in (B, H, Nk, D, block_k, fm))
    reason = wgmma_states_unsupported_reason(kind, D, block_k)
    if reason is not None:
        raise ValueError(f"launch_states_wgmma: the wgmma states kernel does not take {reason}")
    checked = check_states_args("launch_states_wgmma", k_bits, v_bits, state, B, H, Nk, D,
                                block_k, fm)  # fmt: skip
    if checked is None:  # nothing to compute
        return
    k, v, Mk, n_blocks, out_bf16 = checked
    if not aligned(k, v, state):
        raise ValueError("launch_states_wgmma: k, v need 16-byte alignment, state 4-byte")
    nper = PIPE_BLOCKS if blocks_per_cta is None else int(blocks_per_cta)
    if nper < 1:
        raise ValueError(f"launch_states_wgmma: blocks_per_cta = {nper}, must be >= 1")
    kern = make_states_wgmma(kind, D, bool(split), out_bf16, -1, bool(trans_a))
    out = int32_pairs(state) if out_bf16 else flat(state)
    grid = (-(-n_blocks // nper), H, B)
    args = (k, v, out, H, Nk, Mk, fm, nper)
    _tc_build.launch(kern.kernel, grid, kern.threads, kern.smem_bytes, stream, args)


def aligned(k, v, state):
    """k and v 16-byte aligned (cp.async), the state 4-byte aligned (32-bit stores)."""
    addrs = (address(k), address(v), address(state))
    return None not in addrs and addrs[0] % 16 == 0 and addrs[1] % 16 == 0 and addrs[2] % 4 == 0
