"""The linear branch's forward output on Hopper warpgroup MMA (``wgmma``; cc 9.0).

The same operation, arguments and output as ``tc/linear.py`` (read that one first)::

    O_l[r, :] = (φ(q_r) · H_i) / (φ(q_r) · Z_i + eps)     if n_marg[b, h, i] > 0
    O_l[r, :] = 0                                           otherwise

for the rows r of query block i, H_i and Z_i the fp32 row states ``lstate (B, H, Mq,
D·D + D)``. Opt-in: ``SLA_NUMBA_LINEAR=wgmma`` (``config.py``); it takes fp16 / bf16
q, block_q = 64 and D in {64, 128} on a GPU of compute capability 9.0 (and the
simulator); any other configuration runs the pipelined ``mma.sync`` kernel.

Why
---
The ``mma.sync`` kernels are latency-bound at the Wan2.1 sizes (``tc/linear.py``,
"The pipelined kernel": several times the time their bytes need). There the
products are 4 warps x (3·D/8 + 2) mma.sync a k-step, each fed by its own ldmatrix.
One ``wgmma.m64nDk16`` does what the 4 warps' D/8 mma.sync of one product do, reads
both operands from shared memory itself (no ldmatrix, no fragments in registers) and
runs asynchronously: the threads go on loading and converting the next chunk of H_i
while the tensor cores multiply the current one.

Work decomposition
------------------
One CTA = one query block of 64 rows = one warpgroup (128 threads) = the M of one
``m64nDk16``. Grid (ceil(Nq / 64), H, B), as ``tc/linear.py``.

1. φ rows, four lanes a row. Thread (warp w, g = lane >> 2, t = lane & 3) owns rows
   R0 = 16w + g and R1 = R0 + 8 of the block -- the rows its accumulator fragment
   holds -- and, of each, the D/4 columns 16ks + 2t, +1, +8, +9 (ks = 0 .. D/16 - 1).
   Softmax reduces its row max and Σ exp over the quad (``shfl_xor`` 1, 2). Rows past
   the sequence read nothing and store zeros.
2. φ is split into bf16 ``hi = bf16(φ)``, ``lo = bf16(φ - hi)`` (as ``tc/linear.py``)
   and stored K-major into two 64 x D tiles (A operands, 128-byte swizzle, like Q in
   ``tc/forward_wgmma.py``).
3. The denominator ``den = φ(q_r) · Z_i`` in fp32 on the CUDA cores, in the same
   threads: each thread multiplies its D/4 φ values of a row by Z_i's values (read
   from global memory, cached) and the quad sums them (``shfl_xor`` 1, 2). So every
   thread ends step 1 holding the denominators of exactly its accumulator rows; no Z
   columns in the product, no shared memory. (``tc/linear.py`` puts Z in 8 extra B
   columns with bf16 hi + lo splits; fp32 here is at least as exact.)
4. H_i in chunks of HK rows (d1): global -> registers (16-byte
   ``ld.global.nc.v4.f32``, ``tc/linear.py``'s ``_fetch_chunk``) -> bf16 hi / lo pairs
   (``_split_pair``) -> two swizzled MN-major tiles (B operands: a stored row is one k =
   d1, its D values e contiguous in column chunks of 64; read with ``imm-trans-b = 1``,
   LBO = the distance of two column chunks = HK·128 bytes, SBO = 1024) in one of
   ``STAGES`` chunk buffers.
5. Per k-step ks of a chunk, three ``wgmma.m64nDk16`` (A and B from shared memory)
   into one fp32 accumulator (D/2 registers a thread)::

       acc += φhi·Hhi;  acc += φlo·Hhi;  acc += φhi·Hlo     (φlo·Hlo, ~2^-16, dropped)

6. Epilogue: ``wait_group 0``; the thread's accumulator values of rows R0 / R1 times
   1 / (den + eps), straight to global memory (rows >= Nq not written).

Fragment ownership (``tc/wgmma.py``): ``acc[0, j, e]`` is O at row
``16w + g + 8·(e >> 1)``, column ``8j + 2t + (e & 1)``.

Shared memory (1024-aligned base; 16-bit values; 128-byte swizzle)::

    φ hi (64 x D, K-major) | φ lo | chunk buffer 0: H hi (HK x D, MN-major) | H lo | buffer 1 | ...

At D = 128: 16 + 16 KiB of φ and 8 KiB a chunk buffer at HK = 16 (16 KiB at HK = 32).

Pipeline (chunk kc, buffer kc % STAGES)::

    fetch chunk 0 -> registers; φ phase (step 1-3); zero acc; wgmma.fence
    for kc:
        split + store the registers -> buffer kc % STAGES
        fence.proxy.async; barrier          # chunk kc (and φ) visible to wgmma
        fetch chunk kc + 1 -> registers     # in flight during ...
        3·HK/16 wgmma on buffer kc % STAGES; commit
        wait_group STAGES - 2               # ... at most STAGES - 2 groups still run

Why that wait is enough: buffer kc % STAGES was last read by the wgmma of chunk
kc - STAGES; every thread waited for that group (end of iteration kc - 2) before the
barrier of iteration kc - 1, which comes before anyone's store of iteration kc.
STAGES = 2: the wgmma of chunk kc run during the global loads of chunk kc + 1, then
the threads wait; STAGES = 3: they also run while the threads split and store chunk
kc + 1.

The cp.async ring (``ring`` = R >= 3)
------------------------------------
The register path keeps one chunk (8 KiB at D = 128, HK = 16) of each CTA in flight:
three CTAs an SM hold 24 KiB, which may be too little to cover the latency of
global memory (the reason the mma.sync kernels are slow). The ring variant copies the
raw fp32 chunks with 16-byte ``cp.async`` (no registers) into R slots, R - 1 chunks
ahead, and each thread converts its own landed units into the bf16 buffer::

    cp.async chunks 0 .. R-2 -> slots (one commit group each); φ phase ...
    for kc:
        cp.async.wait_group R-2; barrier      # chunk kc landed; slot (kc-1) % R converted
        cp.async chunk kc+R-1 -> slot (kc-1) % R; commit
        convert slot kc % R -> buffer kc % STAGES (split, swizzle)
        fence.proxy.async; barrier
        3·HK/16 wgmma; commit; wait_group STAGES - 1

Two barriers a chunk, so the wgmma wait may leave one more group running
(STAGES - 1): buffer kc % STAGES was last read by group kc - STAGES, waited for at the
end of iteration kc - 1, before this iteration's first barrier. Shared memory at D =
128, HK = 16, STAGES = 2: 32 + 16 KiB + R x 8 KiB (R = 3: 73 KiB, three CTAs an SM,
48 KiB in flight; R = 4: 81 KiB, two CTAs). The copies need lstate 16-byte aligned
(else the register path runs). Which variant is fastest is for the H200 to say
(``tools/sweep_linear_wgmma.py``); ``HK_DEFAULT``, ``STAGES_DEFAULT``, ``RING_DEFAULT``.

Bits: the same operands as ``tc/linear.py`` (the same bf16 hi / lo values of φ and
H_i, the same three products, fp32 accumulation), but the tensor core's summation
order inside a wgmma is its own, the denominator is fp32 (not bf16 splits), and the
softmax sums over four lanes instead of two: the result agrees with the ``mma.sync``
kernel to fp32 rounding (~1e-6 relative), not bit for bit, and with float64 within
``tc/linear.py``'s bound (the tests assert 1e-4 relative).

Determinism: no atomics; every output is one fixed sequence of instructions.

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``; slowly: 128 Python threads a CTA)::

    import numpy as np
    from sla_numba.gpu.tc.linear_wgmma import launch_linear_forward_wgmma
    B, H, Nq, D, bq = 1, 1, 64, 64, 64
    q = (np.ones((B, H, Nq, D), np.float32).view(np.int32) >> 16).astype(np.int16)
    lstate = np.ones((B, H, 1, D * D + D), np.float32)
    o_l = np.empty((B, H, Nq, D), np.float32)
    launch_linear_forward_wgmma("bf16", q, lstate, np.ones((B, H, 1), np.int32),
                                o_l, B, H, Nq, D, bq, 2, 1e-6, 0)
    # relu(1) = 1: every output is D / (D + 1e-6) ~ 1.0
"""

import functools

import numpy as np
from numba import cuda, float32, int16, int32, uint64

from .. import _compat
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, flat
from .forward_wgmma import wgmma_device_ok
from .linear import _fetch_chunk, _in_f32, _split_pair, check_linear_args
from .ptx import (
    SIMULATED,
    cp_async_commit,
    cp_async_wait_group,
    cp_async_zfill,
    shfl_xor,
    smem_addr,
)
from .states import _feature_map
from .tiles import SMEM_ALIGN, TC_FASTMATH, make_pair_store, out_zero
from .wgmma import (
    CHUNK_COLS,
    desc_hi,
    fence_proxy_async,
    make_wgmma_ss,
    wg_commit,
    wg_fence,
    wg_wait,
)

#: The one query block size (= wgmma's M) and the head dims (acc = D/2 registers).
BLOCK = 64
HEAD_DIMS = (64, 128)
KINDS = ("bf16", "f16")
THREADS = 128
#: Defaults: rows of H_i a chunk, chunk buffers, the cp.async ring (0: none). H200,
#: session 9 (``tools/sweep_linear_wgmma.py``): hk 16 with 2 buffers 0.362 ms at the
#: Wan2.1 shape (3 buffers 0.396, hk 32 0.474, rings 3 / 4 0.398 / 0.449; the mma.sync
#: pipelined kernel 0.540), 0.142 ms at B2 H16 D64 (0.162 / 0.155 / 0.223 / 0.197; 0.201).
HK_DEFAULT = 16
STAGES_DEFAULT = 2
RING_DEFAULT = 0
#: Bytes of one 64-row column chunk of a K-major tile (64 rows x 128 bytes).
CHUNK_BYTES = BLOCK * 128
K_MAJOR_LBO, SBO = 16, 1024

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
ZI = np.int32(0)
u64 = uint64


def wgmma_linear_unsupported_reason(kind, D, block_q, device=None):
    """None when the wgmma kernel takes this configuration, else why not (a phrase)."""
    if kind not in KINDS:
        return f"dtype {kind} (needs float16 or bfloat16)"
    if int(D) not in HEAD_DIMS:
        return f"head_dim {D} (supported: 64, 128)"
    if int(block_q) != BLOCK:
        return f"block_q {block_q} (supported: 64)"
    if not wgmma_device_ok(device):
        return "no CUDA device of compute capability 9.0 (wgmma is Hopper's)"
    return None


def smem_layout(D, HK, stages, ring=0):
    """Byte offsets (from the 1024-aligned base) of the φ hi / lo tiles, chunk buffer
    0 (hi, then lo) and the raw fp32 ring (``ring`` slots of HK x D fp32; 0: none), the
    bytes of one tile of H, of one buffer and of one ring slot, and the dynamic shared
    bytes to ask for (+1024 for the alignment)."""
    a_tile = (D // CHUNK_COLS) * CHUNK_BYTES  # 64 rows x D, K-major
    h_tile = (D // CHUNK_COLS) * HK * 128  # HK rows x D, MN-major
    buf0 = 2 * a_tile
    raw0 = buf0 + stages * 2 * h_tile
    return dict(
        phi_hi=0,
        phi_lo=a_tile,
        buf0=buf0,
        h_tile=h_tile,
        buf=2 * h_tile,
        raw0=raw0,
        slot=HK * D * 4,
        bytes=raw0 + ring * HK * D * 4 + 1024,
    )


def a_offset(r, c):
    """Byte offset in a K-major 128-byte-swizzled 64 x D tile of element (row r,
    column c): column chunk c // 64, row r's 128 bytes, 16-byte piece swizzled."""
    cc = c % CHUNK_COLS
    return (c // CHUNK_COLS) * CHUNK_BYTES + r * 128 + (((cc >> 3) ^ (r & 7)) << 4) + (cc & 7) * 2


def b_offset(k, n, HK):
    """Byte offset in an MN-major 128-byte-swizzled HK x D tile of element (k = d1 row,
    n = e column): column chunk n // 64 (HK·128 bytes each), row k's 128 bytes."""
    cc = n % CHUNK_COLS
    return (n // CHUNK_COLS) * HK * 128 + k * 128 + (((cc >> 3) ^ (k & 7)) << 4) + (cc & 7) * 2


# Device helpers at module level (see tc/linear.py: not part of a kernel's closure).
_DEV = {} if SIMULATED else {"forceinline": True, "fastmath": TC_FASTMATH}


@_compat.device(**_DEV)
def _phi_quad_row(xs, q, ob, row, ok, t, D, KS, f16):
    """``xs[4ks + x]`` = the input (fp32) of row ``row`` at column
    16ks + 2t + (x & 1) + 8(x >> 1), from q at element ``ob`` (the block's first row);
    zeros when not ``ok`` (a row past the sequence: nothing is read)."""
    base = ob + row * D + 2 * t
    for ks in range(KS):
        for x in range(4):
            c = 16 * ks + (x & 1) + 8 * (x >> 1)
            xs[4 * ks + x] = _in_f32(int32(q[u64(base + c)]), f16) if ok else ZERO


@_compat.device(**_DEV)
def _store_phi_quad(smem32, xs, ok, row, t, off0, hi, lo, KS):
    """Split ``xs`` (one row's φ, quad layout) into bf16 hi / lo pairs and store them
    K-major swizzled into the φ hi / lo tiles (byte offsets ``hi`` / ``lo`` from the
    aligned base, which is ``off0`` bytes into the shared array); zeros when not
    ``ok``."""
    for ks in range(KS):
        for hf in range(2):  # columns 16ks + 2t (+1) and 16ks + 8 + 2t (+1)
            p, pl = _split_pair(xs[4 * ks + 2 * hf], xs[4 * ks + 2 * hf + 1])
            c = 16 * ks + 8 * hf + 2 * t
            cc = c & 63
            o = (c >> 6) * CHUNK_BYTES + row * 128 + (((cc >> 3) ^ (row & 7)) << 4) + (cc & 7) * 2
            smem32[(off0 + hi + o) >> 2] = p if ok else ZI
            smem32[(off0 + lo + o) >> 2] = pl if ok else ZI


@_compat.device(**_DEV)
def _den_part(xs, lstate, zb, t, KS):
    """This thread's part of φ(row) · Z: its D/4 columns (Z at ``lstate[zb:]``)."""
    s = ZERO
    for ks in range(KS):
        for x in range(4):
            c = 16 * ks + 2 * t + (x & 1) + 8 * (x >> 1)
            s += xs[4 * ks + x] * lstate[u64(zb + c)]
    return s


@_compat.device(**_DEV)
def _store_unit(smem32, x, v0, v1, v2, v3, off0, hi, lo, D, HK):
    """Unit x of a chunk (4 fp32 of chunk row x // (D/4), columns 4(x % (D/4)) ..) as
    bf16 hi / lo pairs into the MN-major tiles at byte offsets ``hi`` / ``lo`` (from the
    aligned base, ``off0`` bytes into the shared array)."""
    Q = D // 4
    k = x // Q
    n = (x - k * Q) * 4
    cc = n & 63
    o = (n >> 6) * (HK * 128) + k * 128 + (((cc >> 3) ^ (k & 7)) << 4) + (cc & 7) * 2
    p0, l0 = _split_pair(v0, v1)
    p1, l1 = _split_pair(v2, v3)
    s = (off0 + hi + o) >> 2
    smem32[s] = p0
    smem32[s + 1] = p1
    s = (off0 + lo + o) >> 2
    smem32[s] = l0
    smem32[s + 1] = l1


@_compat.device(**_DEV)
def _store_h_chunk(smem32, hv, off0, hi, lo, tid, NT, NV, TOT, D, HK):
    """The units of ``_fetch_chunk`` (registers ``hv``) into the chunk buffer."""
    for j in range(NV):
        x = tid + NT * j
        if x < TOT:
            _store_unit(smem32, x, hv[j, 0], hv[j, 1], hv[j, 2], hv[j, 3], off0, hi, lo, D, HK)


@_compat.device(**_DEV)
def _copy_raw_chunk(smem, ls16, slot, g, tid, NT, NV, TOT):
    """``cp.async`` of this thread's units of the chunk at fp32 element ``g`` of lstate
    (``ls16``: its int16 view) into the raw ring slot at shared address ``slot``."""
    for j in range(NV):
        x = tid + NT * j
        if x < TOT:
            cp_async_zfill(smem, slot + 16 * x, 16, ls16, 2 * (g + 4 * x), 16)


@_compat.device(**_DEV)
def _convert_raw_chunk(smem32, smemf, raw, off0, hi, lo, tid, NT, NV, TOT, D, HK):
    """This thread's units of the raw fp32 slot at byte offset ``raw`` into the chunk
    buffer (the same units it copied: its own copies, landed, are all it reads)."""
    for j in range(NV):
        x = tid + NT * j
        if x < TOT:
            f = (off0 + raw + 16 * x) >> 2
            _store_unit(
                smem32, x, smemf[f], smemf[f + 1], smemf[f + 2], smemf[f + 3],
                off0, hi, lo, D, HK,
            )  # fmt: skip


@functools.cache
@kernel_factory
def make_linear_forward_wgmma(
    kind, D, HK=HK_DEFAULT, stages=STAGES_DEFAULT, vec4=True, ring=0, out_kind="f32"
):
    """Build the wgmma linear-forward kernel (module doc) for ``kind`` 'bf16' / 'f16',
    head dim ``D`` (64 / 128), ``HK`` rows of H_i a chunk (16 or 32; 64 would need 255
    registers and a stack frame at D = 128), ``stages`` chunk buffers (2 or 3),
    ``vec4``: 16-byte loads of H_i (lstate 16-byte aligned) else scalar; ``ring`` 0:
    H_i through registers one chunk ahead, 3-5: through a ``cp.async`` ring of that
    many raw fp32 chunks, ``ring - 1`` ahead (module doc, "The cp.async ring"; needs
    ``vec4``). Returns a :class:`tiles.TCKernel`; launch grid (ceil(Nq/64), H, B), 128
    threads, arguments ``(q, lstate, ls16, n_marg, o_l, H, Nq, Mq, fm, eps)``: those of
    ``tc/linear.py``'s kernels plus ``ls16``, lstate's flat int16 view (the copies').
    ``out_kind`` "bf16" / "f16": o_l is the int32 pair view of a 16-bit output, rounded to
    nearest even (``tiles.make_pair_store``), as in ``tc/linear.py``."""
    from .tiles import TCKernel

    if kind not in KINDS or D not in HEAD_DIMS:
        raise ValueError(f"wgmma linear forward: kind={kind!r}, D={D} unsupported")
    if HK not in (16, 32) or D % HK:
        raise ValueError(f"wgmma linear forward: chunk of {HK} rows (16 or 32)")
    if stages not in (2, 3):
        raise ValueError(f"wgmma linear forward: stages={stages} (2 or 3)")
    if ring not in (0, 3, 4, 5) or (ring and not vec4):
        raise ValueError(f"wgmma linear forward: ring={ring} (0, or 3-5 with 16-byte loads)")
    NT = THREADS
    KS = D // 16  # k-steps (d1)
    KSC = HK // 16  # k-steps a chunk
    NC = D // HK  # chunks
    NO = D // 2  # accumulator registers a thread
    DT = D // 8  # n8 tiles of the accumulator
    C4 = D // 4  # φ values of a row a thread
    TOT = HK * D // 4  # 4-float units of a chunk
    NV = -(-TOT // NT)  # units a thread
    W = D * D + D
    RING = int(ring)
    WAIT = stages - 1 if RING else stages - 2  # (the ring: two barriers a chunk)
    CPW = max(RING - 2, 0)
    lay = smem_layout(D, HK, stages, RING)
    RAW0, SLOT = lay["raw0"], lay["slot"]
    PHI_HI, PHI_LO, BUF0 = lay["phi_hi"], lay["phi_lo"], lay["buf0"]
    HT, BUF = lay["h_tile"], lay["buf"]
    SMEM_BYTES = lay["bytes"]
    HI_A = np.int64(desc_hi(K_MAJOR_LBO, SBO))  # φ tiles: K-major
    HI_B = np.int64(desc_hi(HK * 128, SBO))  # H tiles: MN-major, LBO = column chunk
    IN_F16 = kind == "f16"
    VEC4 = bool(vec4)
    STG = int(stages)
    wgmma = make_wgmma_ss("bf16", D, 1)  # φ and H as bf16 hi / lo whatever q is
    store = make_pair_store(out_kind)  # o_l: fp32 or 16-bit pairs
    OPK = 1 if out_kind == "f32" else 2  # output values an element of o_l
    OZ = out_zero(out_kind)

    @_compat.kernel(fastmath=TC_FASTMATH)
    def linear_fwd_wgmma(q, lstate, ls16, n_marg, o_l, H, Nq, Mq, fm, eps):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        smemf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)
        xa = cuda.local.array(C4, float32)  # φ of row R0 (this thread's columns)
        xb = cuda.local.array(C4, float32)  # ... of row R1
        acc = cuda.local.array((1, DT, 4), float32)  # O (64 x D over the warpgroup)
        hv = cuda.local.array((NV, 4), float32)  # the next chunk of H_i (registers)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        g = lane >> 2
        t = lane & 3
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        r0 = i * BLOCK
        nrows = min(Nq - r0, BLOCK)
        ob = (bh * Nq + r0) * D  # the block's first output value (int64)
        if n_marg[u64(bh * Mq + i)] <= 0:  # no marginal key block: zeros
            for x in range(tid, nrows * D // OPK, NT):
                o_l[u64(ob // OPK + x)] = OZ
            return
        sb = (bh * Mq + i) * W  # lstate row (int64)
        sa = smem_addr(smem)
        sbase = int32((sa + 1023) & ~1023)  # 1024-aligned (swizzle atoms)
        off0 = sbase - sa  # its byte offset in the shared arrays
        # --- the first chunk(s) of H_i in flight during the φ phase
        if RING:
            for c in range(RING - 1):
                if c < NC:
                    _copy_raw_chunk(smem, ls16, sbase + RAW0 + c * SLOT, sb + c * (HK * D),
                                    tid, NT, NV, TOT)  # fmt: skip
                cp_async_commit()
        else:
            _fetch_chunk(hv, lstate, sb, tid, NT, NV, TOT, VEC4)
        # --- 1-3. φ of rows R0, R1 (quad layout), its hi / lo tiles, the denominators
        ra = warp * 16 + g
        oka = ra < nrows
        okb = ra + 8 < nrows
        _phi_quad_row(xa, q, ob, ra, oka, t, D, KS, IN_F16)
        _feature_map(xa, fm, C4, 2)
        _phi_quad_row(xb, q, ob, ra + 8, okb, t, D, KS, IN_F16)
        _feature_map(xb, fm, C4, 2)
        _store_phi_quad(smem32, xa, oka, ra, t, off0, PHI_HI, PHI_LO, KS)
        _store_phi_quad(smem32, xb, okb, ra + 8, t, off0, PHI_HI, PHI_LO, KS)
        zb = sb + D * D
        d0 = _den_part(xa, lstate, zb, t, KS)
        d1 = _den_part(xb, lstate, zb, t, KS)
        d0 += shfl_xor(d0, 1)
        d1 += shfl_xor(d1, 1)
        d0 += shfl_xor(d0, 2)
        d1 += shfl_xor(d1, 2)
        for j in range(DT):
            for e in range(4):
                acc[0, j, e] = ZERO
        wg_fence(acc, NO)
        for kc in range(NC):
            # --- 4. chunk kc (registers) -> buffer kc % STG (its last reader, the wgmma
            #        of chunk kc - STG, finished everywhere before the last barrier)
            hb = BUF0 + (kc % STG) * BUF
            if RING:  # chunk kc landed; its raw slot -> buffer kc % STG
                cp_async_wait_group(CPW)
                cuda.syncthreads()  # every copy landed; slot (kc - 1) % RING converted
                c = kc + RING - 1
                if c < NC:
                    _copy_raw_chunk(smem, ls16, sbase + RAW0 + (c % RING) * SLOT,
                                    sb + c * (HK * D), tid, NT, NV, TOT)  # fmt: skip
                cp_async_commit()
                raw = RAW0 + (kc % RING) * SLOT
                _convert_raw_chunk(smem32, smemf, raw, off0, hb, hb + HT, tid, NT, NV, TOT, D, HK)
            else:
                _store_h_chunk(smem32, hv, off0, hb, hb + HT, tid, NT, NV, TOT, D, HK)
            fence_proxy_async()  # generic-proxy stores -> visible to wgmma
            cuda.syncthreads()
            if not RING and kc + 1 < NC:  # chunk kc + 1 in flight during the wgmma of kc
                _fetch_chunk(hv, lstate, sb + (kc + 1) * (HK * D), tid, NT, NV, TOT, VEC4)
            # --- 5. φhi·Hhi + φlo·Hhi + φhi·Hlo for the chunk's k-steps
            for ksc in range(KSC):
                ks = kc * KSC + ksc
                ao = (ks >> 2) * CHUNK_BYTES + (ks & 3) * 32
                dah = (((sbase + PHI_HI + ao) & 0x3FFFF) >> 4) | HI_A
                dal = (((sbase + PHI_LO + ao) & 0x3FFFF) >> 4) | HI_A
                bo = hb + ksc * 2048
                dbh = (((sbase + bo) & 0x3FFFF) >> 4) | HI_B
                dbl = (((sbase + bo + HT) & 0x3FFFF) >> 4) | HI_B
                wgmma(smem, acc, dah, dbh, 1)
                wgmma(smem, acc, dal, dbh, 1)
                wgmma(smem, acc, dah, dbl, 1)
            wg_commit()
            wg_wait(acc, NO, WAIT)
        wg_wait(acc, NO, 0)
        # --- 6. epilogue: rows R0, R1 / their denominators
        inv0 = ONE / (d0 + eps)
        inv1 = ONE / (d1 + eps)
        oa = ob + ra * D + 2 * t
        if oka:
            for j in range(DT):
                store(o_l, oa + 8 * j, acc[0, j, 0] * inv0, acc[0, j, 1] * inv0)
        if okb:
            for j in range(DT):
                store(o_l, oa + 8 * D + 8 * j, acc[0, j, 2] * inv1, acc[0, j, 3] * inv1)

    return TCKernel(linear_fwd_wgmma, NT, SMEM_BYTES)


def launch_linear_forward_wgmma(
    kind,
    q_bits,
    lstate,
    n_marg,
    o_l,
    B,
    H,
    Nq,
    D,
    block_q,
    fm,
    eps,
    stream,
    hk=None,
    stages=None,
    ring=None,
):
    """``tc/linear.py``'s ``launch_linear_forward_tc`` (same arguments, checked there) on
    the wgmma kernel; ``hk`` / ``stages`` / ``ring`` None: ``HK_DEFAULT`` /
    ``STAGES_DEFAULT`` / ``RING_DEFAULT`` (the ring needs a 16-byte aligned lstate: the
    register path otherwise).
    A ValueError naming the reason for a configuration it does not take."""
    B, H, Nq, D, block_q, fm = (int(x) for x in (B, H, Nq, D, block_q, fm))
    why = wgmma_linear_unsupported_reason(kind, D, block_q)
    if why is not None:
        raise ValueError(f"launch_linear_forward_wgmma: the wgmma kernel does not take {why}")
    checked = check_linear_args("launch_linear_forward_wgmma", kind, q_bits, lstate, n_marg,
                                o_l, B, H, Nq, D, block_q, fm)  # fmt: skip
    if checked is None:  # nothing to compute
        return
    Mq, nblk, out_kind = checked
    addr = address(lstate)
    vec4 = addr is not None and addr % 16 == 0
    hk = HK_DEFAULT if hk is None else int(hk)
    st = STAGES_DEFAULT if stages is None else int(stages)
    rg = RING_DEFAULT if ring is None else int(ring)
    if not vec4:
        rg = 0
    kern = make_linear_forward_wgmma(kind, D, min(hk, D), st, vec4, rg, out_kind)
    _tc_build.launch(
        kern.kernel,
        (nblk, H, B),
        kern.threads,
        kern.smem_bytes,
        stream,
        (
            flat(q_bits),
            flat(lstate),
            _int16_view(lstate),
            flat(n_marg),
            flat(o_l),
            H,
            Nq,
            Mq,
            fm,
            np.float32(eps),
        ),
    )


def _int16_view(x):
    """The flat int16 view of an fp32 array of any supported library (cp.async copies
    16-bit elements; no copy)."""
    x = flat(x)
    if type(x).__module__.startswith("torch"):
        import torch

        return x.view(torch.int16)
    return x.view(np.int16)
