"""The linear branch's forward output on tensor cores (fp16 / bf16 q, cc >= 8.0).

For each (b, h, query block i) and rows r in [i*BQ, min((i+1)*BQ, Nq))::

    O_l[r, :] = (φ(q_r) · H_i) / (φ(q_r) · Z_i + eps)     if n_marg[b, h, i] > 0
    O_l[r, :] = 0                                           otherwise

Inputs: q (B, H, Nq, D) as int16 bits of bf16 or fp16; lstate fp32 (B, H, Mq, W),
W = D*D + D, row i = [vec(H_i) (row-major, H_i[d1, e]), Z_i] (``forward.row_states``);
n_marg int32 (B, H, Mq) (``row_info[1]`` of ``forward.launch_prep``); o_l fp32
(B, H, Nq, D). All flat views are accepted. Every ``o_l[b, h, r, :]`` with r < Nq is
written, nothing else. φ = feature map ``fm``: 0 softmax over the head dim, 1 elu + 1,
2 relu (``_tiles.make_common.phi_value``). Same result as the SIMT fused forward's
linear branch (``forward.make_forward_simt``, fp32).

Algorithm (one CTA per (i, h, b), grid (ceil(Nq/BQ), H, B); NW = BQ/16 warps)
--------------------------------------------------------------------------
0. ``n_marg[b, h, i] <= 0``: the CTA writes zeros to its rows and returns (uniform).
1. φ rows: two adjacent lanes per query row, each with D/2 consecutive columns
   (q decoded from the input's half type to fp32); softmax's row max and Σ exp are
   combined over the two lanes with one ``shfl_xor``. φ (fp32) is split into two
   **bf16** values ``hi = bf16(φ)``, ``lo = bf16(φ - hi)``, stored row-major
   [r][d1] in shared memory (rows >= nrows: zeros).
2. H_i is staged in chunks of HK rows (d1), also split into bf16 hi / lo tiles
   [d1][e]. The tile's padding columns carry the denominator: column D of the hi tile
   holds ``bf16(Z[d1])``, column D + 1 the bf16 of the remainder, columns D+2..D+7
   zeros. Two ``syncthreads`` per chunk.
3. Tensor cores, ``mma.sync.m16n8k16.bf16`` (fp32 accumulation). Warp w owns query
   rows 16w..16w+15 x all D output columns: D/8 n8 tiles (4·D/8 accumulators per
   lane, 64 at D = 128) plus one n8 "Z tile" (columns D..D+7). Per 16-wide k-step
   (d1): A = φ hi / lo with ``ldmatrix.x4`` from [r][d1]; B = H hi / lo with
   ``ldmatrix.x4.trans`` from [d1][e] (two n8 tiles a load); per tile

        acc += φhi·Hhi + φlo·Hhi + φhi·Hlo        (the φlo·Hlo term, ~2^-16, dropped)

   and for the Z tile ``z += φhi·Zt + φlo·Zt``. The k-steps of a chunk are unrolled
   loops (see below); warps whose rows all lie past the block's last row skip them.
4. Epilogue: den = Σ of the Z tile's columns of a row (lanes t = 0..3, two
   ``shfl_xor``) + eps; lane (g, t) stores rows g, g + 8 x columns 2t, 2t + 1 of each
   n8 tile, times 1 / den, straight to global memory.

Why bf16 for both kinds: ``mma`` needs A and B of one type, and H_i / Z_i are fp32
sums over many keys whose magnitude is not bounded by fp16's range (65504), and
fp16 lo parts of small φ values (softmax) would be subnormal. bf16 hi + lo holds
16 significant bits with fp32's range; the result's relative error is ~1e-5
(the dropped lo·lo term and the split remainders, each ~2^-17 relative).

Shared memory (16-bit values, rows padded to SW = D + 8 so the 8 rows of an
ldmatrix fall in different bank groups): [φ hi: BQ x SW][φ lo: BQ x SW]
[H hi: HK x SW][H lo: HK x SW]; 52 KiB at D = 128, BQ = 64, HK = 32.

Fragment ownership (``ptx`` doc; g = lane >> 2, t = lane & 3): lane (g, t) of warp w
holds ``acc[n] = O[16w + g, 8n + 2t : +2]`` (elements 0, 1) and row 16w + g + 8
(elements 2, 3); ``z`` likewise for the Z tile's columns.

How the kernel is written: ``make_linear_kernel`` is an ordinary ``@cuda.jit`` closure
factory. Sizes are closure constants; the φ values of a lane, the accumulators and the
A fragments are ``cuda.local.array`` indexed only by counters of constant-trip loops,
which LLVM unrolls completely, so they live in registers (``tools/check_tc_ptx.py``:
no ``.local``, mma / ldmatrix counts per chunk). The chunk loop and the staging loops
stay loops. ldmatrix addresses are one per-lane base plus compile-time constant byte
offsets (folded by ptxas into the instruction).

Determinism: no atomics; each output is one lane's fixed sequence of operations.
Under the CUDA simulator the ``ptx`` twins run the same function (slowly: tiny shapes,
BQ = 16, HK = 16).

The pipelined kernel (``SLA_NUMBA_LINEAR=pipelined``, the default)
-----------------------------------------------------------------
Why. On an H200 at the Wan2.1 sizes (B*H = 12, Nq = 32760, D = 128, block_q = 64) the
kernel above took 0.600 ms where its bytes (H_i fp32 406 MB, q 100 MB, o_l 200 MB) need
~0.15 ms at 4.8 TB/s and cuBLAS did the bf16 product in 0.098 ms (measured in the
session that asked for this kernel; ``tools/sweep_linear.py`` measures all three): it is
latency-bound,
like the marginal sum was (``marginal`` doc, "The pipelined kernel"). Each chunk is
loaded with 4-byte loads after a barrier, and the warps then wait for the slowest load
and meet at a second barrier before their mma: no load of this CTA is in flight while
its warps run their mma, and only the other CTAs of the SM (3, at 167 registers) hide it.

What. ``make_linear_kernel_pipelined(kind, D, BQ, HK, vec4, min_blocks)`` keeps the φ
phase, the fragments, the products and the epilogue above and changes how H_i reaches
shared memory:

- Each thread loads its units of 4 consecutive fp32 of a chunk (the chunk's HK·D values
  are contiguous in lstate: unit x of chunk kc starts at ``sb + kc·HK·D + 4x``; thread
  ``tid`` takes x = tid, tid + NT, ...) with one 16-byte ``ld.global.nc.v4.f32``
  (``ptx.ld_nc_v4_f32``), consecutive threads reading consecutive 16 bytes. That needs
  lstate 16-byte aligned (row starts then are: W = D(D+1) is a multiple of 4); the
  launcher checks the address and otherwise builds the same kernel with four 4-byte loads.
- The units of chunk kc + 1 (and its Z values) are loaded into registers right after the
  barrier of chunk kc, before the warps run the mma of chunk kc, so they are in flight
  during those mma; chunk 0 is loaded before the φ phase. At the top of iteration kc + 1
  they are split (``_split_pair``: the same hi / lo pairs as ``_stage_rows``) and stored
  into chunk buffer ``(kc + 1) & 1``.
- Two chunk buffers, one barrier a chunk. Iteration kc: store chunk kc into buffer
  kc & 1; ``syncthreads``; load chunk kc + 1; mma on buffer kc & 1. Buffer kc & 1 was
  last read by the mma of chunk kc - 2, which every warp finished before it reached
  the barrier of chunk kc - 1.
- Chunk and launch bound (``PIPE_HK``, ``pipe_min_blocks``): HK = 16 rows a chunk, no
  launch bound, the fastest of four configurations timed on the H200. At D = 128,
  block_q = 64, HK = 16 takes 128 registers and (2·BQ + 4·HK) x (D + 8) bf16 = 52.2 KiB
  of shared memory: 4 CTAs an SM; HK = 32 takes 215 registers unbounded (2 CTAs an SM),
  168 without spills bounded to 3 CTAs, 69.6 KiB (``tools/check_tc_ptx.py --only linear``).

Same bits: the mma sequence of every accumulator, its operands and the epilogue are
those of the kernel above for the same HK (``tests/gpu/tc/test_tc_linear_pipelined.py``
compares the bits, ``tools/sweep_linear.py`` times both at the Wan sizes); the chunk
size only changes which barrier a k-step follows, not the k-steps' order, so any HK
gives the same bits.

On Hopper (compute capability 9.0) ``SLA_NUMBA_LINEAR=wgmma`` runs the same operation
on warpgroup MMA instead (``tc/linear_wgmma.py``; block_q 64, D 64 / 128).

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``)::

    import numpy as np
    from sla_numba.gpu.tc.linear import launch_linear_forward_tc
    B, H, Nq, D, bq = 1, 1, 16, 16, 16
    q = np.ones((B, H, Nq, D), np.float32).view(np.int32) >> 16   # bf16 1.0 bits
    lstate = np.ones((B, H, 1, D * D + D), np.float32)
    o_l = np.empty((B, H, Nq, D), np.float32)
    launch_linear_forward_tc("bf16", q.astype(np.int16), lstate, np.ones((B, H, 1), np.int32),
                             o_l, B, H, Nq, D, bq, 2, 1e-6, 0)
    # relu(1) = 1: every output is D / (D + 1e-6) ~ 1.0
"""

import functools
from collections import namedtuple

import numpy as np
from numba import cuda, float32, int16, int32, uint64

from ... import config
from .. import _compat
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, dtype_name, flat, size
from .ptx import (
    SIMULATED,
    bf16_high_f32,
    bf16_low_f32,
    f16_low_f32,
    ld_nc_v4_f32,
    ldsm_x4,
    ldsm_x4_trans,
    mma_bf16,
    pack_bf16x2,
    shfl_xor,
    smem_addr,
)
from .states import _feature_map
from .tiles import make_pair_store, out_kind_of, out_zero

KINDS = ("bf16", "f16")
BLOCKS = (16, 32, 64, 128)
PAD = 8
GPU_HK = 32
SIM_HK = 16

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
ZI = np.int32(0)
u64 = uint64  # unsigned indices: no wraparound checks
#: Fast-math of the kernel (no nnan / ninf). Device helpers are inlined.
FASTMATH = {"contract", "arcp", "afn", "nsz"}
_DEV = {} if SIMULATED else {"forceinline": True, "fastmath": FASTMATH}


def linear_tc_supported(D, block_q):
    """D a multiple of 16 up to 128, block_q in {16, 32, 64, 128}."""
    D, block_q = int(D), int(block_q)
    return 16 <= D <= 128 and D % 16 == 0 and block_q in BLOCKS


def chunk_rows(D, hk=None):
    """Rows of H_i staged at a time: a multiple of 16 dividing D."""
    hk = (SIM_HK if SIMULATED else GPU_HK) if hk is None else int(hk)
    hk = min(hk, D)
    while D % hk:
        hk -= 16
    return hk


def ops_per_chunk(D, HK):
    """(mma, ldmatrix) one warp issues per staged chunk of H_i (HK/16 k-steps of
    3·D/8 + 2 mma and 2 + D/8 + 1 ldmatrix); ``tools/check_tc_ptx.py`` counts them."""
    ks = HK // 16
    return ks * (3 * (D // 8) + 2), ks * (2 + D // 8 + 1)


#: The compiled kernel of one configuration and its launch sizes.
LinearKernel = namedtuple("LinearKernel", "kernel smem_bytes threads")


# Device helpers live at module level, not in the factory: the kernel reaches them as
# globals, so they are not part of its closure, whose pickle keys Numba's disk cache
# (a pickled device function would carry the intrinsics' per-process random uuids, and
# the cache would never hit). ``f16`` is a constant once inlined: one branch remains.


@_compat.device(**_DEV)
def _in_f32(bits, f16):
    """fp32 of one input value (its 16 bits in the low half of an int32)."""
    if f16:
        return f16_low_f32(bits)
    return bf16_low_f32(bits)


@_compat.device(**_DEV)
def _mma_tile(acc, n, af, k, b0, b1):
    """acc[n] += A(af[k]) · B(b0, b1)."""
    acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3] = mma_bf16(
        af[k, 0], af[k, 1], af[k, 2], af[k, 3], b0, b1, acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3]
    )


@_compat.device(**_DEV)
def _split_pair(x0, x1):
    """(hi, lo) packed bf16 pairs of two fp32 values: hi = bf16(x), lo = bf16(x - hi)."""
    p = pack_bf16x2(x0, x1)
    return p, pack_bf16x2(x0 - bf16_low_f32(p), x1 - bf16_high_f32(p))


@_compat.device(**_DEV)
def _load_phi_row(xs, x, g, ok, C, fm, f16):
    """``xs`` = φ of this lane's C values of a row held by a lane pair: inputs
    ``x[g : g + C]`` (int16 bits, fp16 when ``f16`` else bf16; zeros when not ``ok``,
    a row past the sequence). Returns the softmax's (row max, 1 / Σ exp) — (0, 1) for
    the element-wise maps. All lanes of the warp must call it (softmax shuffles)."""
    for c in range(C):
        xs[c] = _in_f32(int32(x[u64(g + c)]), f16) if ok else ZERO
    return _feature_map(xs, fm, C, 1)  # the key-block states' φ, over 2 lanes


@_compat.device(**_DEV)
def _stage_rows(smem32, hi, lo, src, base, r0, D, HK, SW, tid, NT):
    """Rows r0 .. r0 + HK of the D x D fp32 matrix at ``src[base:]`` (row-major) into
    the bf16 hi / lo tiles [r'][e] at 16-bit offsets ``hi`` / ``lo`` (row stride SW),
    by the CTA's NT threads."""
    half = D // 2
    for x in range(tid, HK * half, NT):
        rr = x // half
        c = (x - rr * half) * 2
        g = base + (r0 + rr) * D + c
        p, q = _split_pair(src[u64(g)], src[u64(g + 1)])
        s = (rr * SW + c) >> 1
        smem32[s + (hi >> 1)] = p
        smem32[s + (lo >> 1)] = q


@_compat.device(**_DEV)
def _phi_tile(smem32, xs, q, ob, tid, nrows, D, C, SW, PLO, fm, f16):
    """Step 1 of the module doc: thread ``tid`` computes φ of row tid >> 1 of the block
    (columns li·C .., li = tid & 1; the two lanes of a row shuffle for softmax) from q at
    element ``ob`` (the block's first row), splits it into hi = bf16(φ) and
    lo = bf16(φ - hi) and stores the pairs in the φ hi tile (row stride SW) and the lo
    tile ``PLO`` values further; rows >= ``nrows`` store zeros."""
    r = tid >> 1
    li = tid & 1
    ok = r < nrows
    _load_phi_row(xs, q, ob + r * D + li * C, ok, C, fm, f16)
    si = (r * SW + li * C) >> 1  # int32 index of the pair (r, li*C)
    for c2 in range(C // 2):
        p, pl = _split_pair(xs[2 * c2], xs[2 * c2 + 1])
        smem32[si + c2] = p if ok else ZI
        smem32[si + (PLO >> 1) + c2] = pl if ok else ZI


@_compat.device(**_DEV)
def _chunk_products(acc, z, af, smem, lk, lb, lz, KS, NN, HK, SW, PLO):
    """One chunk's k-steps for one warp (step 3 of the module doc): ``acc`` += φ·H,
    ``z`` += φ·Z. Byte addresses in shared memory: the warp's φ hi rows at ``lk`` (lo
    ``PLO`` elements further), the chunk's H hi tile at ``lb`` (lo ``HK·SW`` further),
    its Z tile at ``lz``."""
    for ks in range(KS):  # d1 = chunk start + 16 ks ..
        a0, a1, a2, a3 = ldsm_x4(smem, lk + ks * 32, 0)
        af[0, 0], af[0, 1], af[0, 2], af[0, 3] = a0, a1, a2, a3
        a0, a1, a2, a3 = ldsm_x4(smem, lk + ks * 32 + PLO * 2, 0)
        af[1, 0], af[1, 1], af[1, 2], af[1, 3] = a0, a1, a2, a3
        for p2 in range(NN // 2):
            ko = (ks * 16 * SW + 16 * p2) * 2
            h0, h1, h2, h3 = ldsm_x4_trans(smem, lb + ko, 0)
            l0, l1, l2, l3 = ldsm_x4_trans(smem, lb + ko + HK * SW * 2, 0)
            # φhi·Hhi + φlo·Hhi + φhi·Hlo (φlo·Hlo, ~2^-16, dropped)
            _mma_tile(acc, 2 * p2, af, 0, h0, h1)
            _mma_tile(acc, 2 * p2, af, 1, h0, h1)
            _mma_tile(acc, 2 * p2, af, 0, l0, l1)
            _mma_tile(acc, 2 * p2 + 1, af, 0, h2, h3)
            _mma_tile(acc, 2 * p2 + 1, af, 1, h2, h3)
            _mma_tile(acc, 2 * p2 + 1, af, 0, l2, l3)
        z0, z1, z2, z3 = ldsm_x4_trans(smem, lz + ks * 16 * SW * 2, 0)
        _mma_tile(z, 0, af, 0, z0, z1)
        _mma_tile(z, 0, af, 1, z0, z1)


@_compat.device(**_DEV)
def _den_inverses(z, eps):
    """1 / (den + eps) of the lane's rows g and g + 8: den = Σ of the Z tile's columns
    of the row, summed over the quad (t = 0..3)."""
    d0 = z[0, 0] + z[0, 1]
    d1 = z[0, 2] + z[0, 3]
    d0 += shfl_xor(d0, 1)
    d1 += shfl_xor(d1, 1)
    d0 += shfl_xor(d0, 2)
    d1 += shfl_xor(d1, 2)
    return ONE / (d0 + eps), ONE / (d1 + eps)


@functools.cache
def make_write_rows(out_kind):
    """``write_rows(o_l, acc, inv0, inv1, ob, warp, lane, nrows, D, NN)``, step 4 of the
    module doc: the lane's rows g, g + 8 of the warp's 16, times their ``inv0`` /
    ``inv1`` (:func:`_den_inverses`), to ``o_l`` from value ``ob`` (the block's first
    row); rows >= ``nrows`` are not written. ``o_l`` fp32 ("f32") or the int32 pair view
    of a 16-bit output ("bf16" / "f16", ``tiles.make_pair_store``: rounded to nearest
    even). (No fastmath option here: a kernel's disk-cache key pickles the device
    functions it closes over, and a set of flags pickles in a per-process order.)"""
    store = make_pair_store(out_kind)  # (a signed index: i + 1 must stay an integer)

    @_compat.device(forceinline=True)
    def write_rows(o_l, acc, inv0, inv1, ob, warp, lane, nrows, D, NN):
        ra = warp * 16 + (lane >> 2)
        oa = ob + ra * D + (lane & 3) * 2
        if ra < nrows:
            for n in range(NN):
                store(o_l, oa + 8 * n, acc[n, 0] * inv0, acc[n, 1] * inv0)
        if ra + 8 < nrows:
            for n in range(NN):
                store(o_l, oa + 8 * D + 8 * n, acc[n, 2] * inv1, acc[n, 3] * inv1)

    return write_rows


@kernel_factory
def make_linear_kernel(kind, D, BQ, HK, out_kind="f32"):
    """Build ``linear_tc(q, lstate, n_marg, o_l, H, Nq, Mq, fm, eps)`` (module doc).

    Flat arrays: q int16 bits (B, H, Nq, D) of ``kind``, lstate fp32 (B, H, Mq, D*D + D),
    n_marg int32 (B, H, Mq), o_l fp32 (B, H, Nq, D), or with ``out_kind`` "bf16" / "f16"
    the int32 pair view of a 16-bit o_l (:func:`make_write_rows`). Grid (ceil(Nq/BQ), H,
    B), BQ/16 warps; HK rows of H_i staged at a time. Returns a :class:`LinearKernel`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not linear_tc_supported(D, BQ):
        raise ValueError(f"D = {D}, block_q = {BQ}: not supported")
    if HK % 16 or D % HK:
        raise ValueError(f"chunk of {HK} rows does not divide D = {D} in k16 steps")
    NW = BQ // 16
    NT = 32 * NW
    C = D // 2  # columns of a row per lane in the φ phase
    SW = D + PAD  # shared row stride (16-bit values)
    PLO = BQ * SW  # φ lo tile offset (16-bit values)
    HHI = 2 * BQ * SW  # H hi tile
    HLO = HHI + HK * SW  # H lo tile
    SMEM = (HLO + HK * SW) * 2
    NN = D // 8  # n8 output tiles
    write_rows = make_write_rows(out_kind)
    OPK = 1 if out_kind == "f32" else 2  # output values an element of o_l
    DO = D // OPK  # elements of o_l a row
    OZ = out_zero(out_kind)
    W = D * D + D  # lstate row: vec(H_i), Z_i
    KS = HK // 16  # k-steps per chunk
    IN_F16 = kind == "f16"
    ALIGNED = not SIMULATED  # the simulator rejects alignment=

    @_compat.kernel(fastmath=FASTMATH)
    def linear_tc(q, lstate, n_marg, o_l, H, Nq, Mq, fm, eps):
        if ALIGNED:
            smem = cuda.shared.array(0, int16, alignment=16)
            smem32 = cuda.shared.array(0, int32, alignment=16)
        else:
            smem = cuda.shared.array(0, int16)
            smem32 = cuda.shared.array(0, int32)
        xs = cuda.local.array(C, float32)  # this lane's φ values
        acc = cuda.local.array((NN, 4), float32)  # D fragments of the output tiles
        z = cuda.local.array((1, 4), float32)  # ... of the Z tile
        af = cuda.local.array((2, 4), int32)  # A fragments: φ hi, φ lo
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        r0 = i * BQ
        nrows = min(Nq - r0, BQ)
        ob = (bh * Nq + r0) * D  # first output value of the block (int64)
        if n_marg[u64(bh * Mq + i)] <= 0:  # no marginal key block: zeros
            for x in range(tid, nrows * DO, NT):
                o_l[u64(ob // OPK + x)] = OZ
            return
        # --- 1. φ rows: row tid >> 1, lane li = tid & 1 owns columns li*C ..
        _phi_tile(smem32, xs, q, ob, tid, nrows, D, C, SW, PLO, fm, IN_F16)
        # --- 3. fragment addresses (bytes). A = φ [r][d1], matrix m = lane >> 3 at rows
        # 8(m & 1).., columns 8(m >> 1)..; B = H [d1][e] (.trans), same pattern: matrices
        # 0, 1 = k rows 0-7, 8-15 of n8 tile 2p, matrices 2, 3 those of tile 2p + 1
        sa = smem_addr(smem)
        lrow = (lane & 7) + ((lane >> 3) & 1) * 8
        la = sa + ((warp * 16 + lrow) * SW + (lane >> 4) * 8) * 2
        lb = sa + (lrow * SW + (lane >> 4) * 8 + HHI) * 2
        lz = sa + (lrow * SW + D + HHI) * 2  # the Z tile (all lanes: columns D..)
        busy = warp * 16 < nrows
        for n in range(NN):
            for e in range(4):
                acc[n, e] = ZERO
        for e in range(4):
            z[0, e] = ZERO
        sb = (bh * Mq + i) * W  # lstate row (int64)
        for kc in range(D // HK):
            cuda.syncthreads()  # φ written / previous chunk consumed
            # --- 2. H rows kc*HK .. + HK - 1: bf16 hi / lo pairs; Z in columns D, D + 1
            _stage_rows(smem32, HHI, HLO, lstate, sb, kc * HK, D, HK, SW, tid, NT)
            if tid < HK:
                zv = lstate[u64(sb + D * D + kc * HK + tid)]
                zh = bf16_low_f32(pack_bf16x2(zv, zv))
                s = (tid * SW + D + HHI) >> 1
                smem32[s] = pack_bf16x2(zh, zv - zh)
                smem32[s + 1] = ZI
                smem32[s + 2] = ZI
                smem32[s + 3] = ZI
            cuda.syncthreads()
            if busy:
                _chunk_products(acc, z, af, smem, la + kc * (HK * 2), lb, lz, KS, NN, HK, SW, PLO)
        # --- 4. epilogue: den of rows g, g + 8 = Σ over the Z tile's columns (t = 0..3)
        inv0, inv1 = _den_inverses(z, eps)
        write_rows(o_l, acc, inv0, inv1, ob, warp, lane, nrows, D, NN)

    return LinearKernel(linear_tc, SMEM, NT)


_kernels = {}


def get_linear_kernel(kind, D, BQ, hk=None, out_kind="f32"):
    """The :class:`LinearKernel` for (kind, D, BQ, chunk_rows(D, hk), out_kind), built
    once."""
    HK = chunk_rows(D, hk)
    key = (kind, int(D), int(BQ), HK, out_kind)
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = make_linear_kernel(kind, int(D), int(BQ), HK, out_kind)
    return k


# ---------------------------------------------------------------------------
# The pipelined kernel (module doc, "The pipelined kernel")
# ---------------------------------------------------------------------------

#: The pipelined kernel's GPU defaults: rows of H_i a chunk, and the warps an SM its
#: launch bound asks for (min CTAs = PIPE_SM_WARPS / warps a CTA, at least 1; None: no
#: launch bound). Timed on the H200 at the Wan2.1 sizes (``tools/sweep_linear.py``,
#: BENCHMARKS.md): HK = 16 unbounded (128 registers, 4 CTAs an SM) 0.644 ms; HK = 32
#: bounded to 12 warps (168 registers) 0.735 ms, unbounded (215) 0.745 ms; the register
#: kernel 0.820 ms.
PIPE_HK = 16
PIPE_SM_WARPS = None


def pipe_min_blocks(BQ):
    """The pipelined kernel's default launch bound for block_q ``BQ`` (CTAs an SM), or
    None (no bound)."""
    if PIPE_SM_WARPS is None:
        return None
    return max(1, PIPE_SM_WARPS // (BQ // 16))


def pipelined_smem_bytes(D, BQ, HK):
    """Shared bytes of the pipelined kernel: φ hi / lo, two H hi / lo chunk buffers."""
    return (2 * BQ + 4 * HK) * (D + PAD) * 2


@_compat.device(**_DEV)
def _fetch_chunk(hv, src, g, tid, NT, NV, TOT, vec4):
    """``hv[j] = src[g + 4x : g + 4x + 4]`` for this thread's units x = tid + NT·j < TOT
    (4 fp32 each; one 16-byte load when ``vec4``, else four scalar loads)."""
    for j in range(NV):
        x = tid + NT * j
        if x < TOT:
            o = g + 4 * x
            if vec4:
                v0, v1, v2, v3 = ld_nc_v4_f32(src, o)
            else:
                v0 = src[u64(o)]
                v1 = src[u64(o + 1)]
                v2 = src[u64(o + 2)]
                v3 = src[u64(o + 3)]
            hv[j, 0], hv[j, 1], hv[j, 2], hv[j, 3] = v0, v1, v2, v3


@_compat.device(**_DEV)
def _store_chunk(smem32, hv, hi, lo, tid, NT, NV, TOT, D, SW):
    """The units ``hv`` of :func:`_fetch_chunk` (chunk row-major, D per row) split into
    bf16 hi / lo pairs (``_split_pair``, as ``_stage_rows``) at the tiles' 16-bit
    offsets ``hi`` / ``lo`` (row stride SW)."""
    Q = D // 4  # units a row
    for j in range(NV):
        x = tid + NT * j
        if x < TOT:
            rr = x // Q
            s = (rr * SW + (x - rr * Q) * 4) >> 1
            p0, l0 = _split_pair(hv[j, 0], hv[j, 1])
            p1, l1 = _split_pair(hv[j, 2], hv[j, 3])
            smem32[s + (hi >> 1)] = p0
            smem32[s + 1 + (hi >> 1)] = p1
            smem32[s + (lo >> 1)] = l0
            smem32[s + 1 + (lo >> 1)] = l1


@kernel_factory
def make_linear_kernel_pipelined(kind, D, BQ, HK, vec4=True, min_blocks=None, out_kind="f32"):
    """Build ``linear_tc_pipelined`` (module doc, "The pipelined kernel"): same arguments
    and same bits as :func:`make_linear_kernel`'s kernel. H_i goes global -> registers
    (``vec4``: 16-byte loads, lstate 16-byte aligned; else scalar loads) one chunk of
    HK rows ahead of the mma, into two alternating shared chunk buffers; one barrier a
    chunk. ``min_blocks``: ``launch_bounds`` asking for that many resident CTAs per SM
    (caps the registers), None: no bound. ``out_kind``: as :func:`make_linear_kernel`.
    Returns a :class:`LinearKernel`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not linear_tc_supported(D, BQ):
        raise ValueError(f"D = {D}, block_q = {BQ}: not supported")
    NW = BQ // 16
    NT = 32 * NW
    if HK % 16 or D % HK or HK <= 0 or HK > NT:
        raise ValueError(
            f"chunk of {HK} rows: a multiple of 16 dividing D = {D}, at most {NT} (threads)"
        )
    C = D // 2  # columns of a row per lane in the φ phase
    SW = D + PAD  # shared row stride (16-bit values)
    PLO = BQ * SW  # φ lo tile offset (16-bit values)
    HB = 2 * BQ * SW  # chunk buffer 0 (hi tile, then lo tile); buffer 1 follows
    BUF = 2 * HK * SW  # one chunk buffer (16-bit values)
    SMEM = pipelined_smem_bytes(D, BQ, HK)
    NN = D // 8  # n8 output tiles
    write_rows = make_write_rows(out_kind)
    OPK = 1 if out_kind == "f32" else 2  # output values an element of o_l
    DO = D // OPK  # elements of o_l a row
    OZ = out_zero(out_kind)
    W = D * D + D  # lstate row: vec(H_i), Z_i
    KS = HK // 16  # k-steps per chunk
    NC = D // HK  # chunks
    TOT = HK * D // 4  # 4-float units a chunk
    NV = -(-TOT // NT)  # units a thread
    IN_F16 = kind == "f16"
    VEC4 = bool(vec4)
    ALIGNED = not SIMULATED  # the simulator rejects alignment=
    bounds = {} if min_blocks is None else {"launch_bounds": (NT, int(min_blocks))}
    MINB = 0 if min_blocks is None else int(min_blocks)

    @_compat.kernel(fastmath=FASTMATH, **bounds)
    def linear_tc_pipelined(q, lstate, n_marg, o_l, H, Nq, Mq, fm, eps):
        # launch_bounds is not part of Numba's disk-cache key, the closure is: name it
        _ = MINB
        if ALIGNED:
            smem = cuda.shared.array(0, int16, alignment=16)
            smem32 = cuda.shared.array(0, int32, alignment=16)
        else:
            smem = cuda.shared.array(0, int16)
            smem32 = cuda.shared.array(0, int32)
        xs = cuda.local.array(C, float32)  # this lane's φ values
        acc = cuda.local.array((NN, 4), float32)  # D fragments of the output tiles
        z = cuda.local.array((1, 4), float32)  # ... of the Z tile
        af = cuda.local.array((2, 4), int32)  # A fragments: φ hi, φ lo
        hv = cuda.local.array((NV, 4), float32)  # the next chunk of H_i (registers)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        bh = b * H + h
        r0 = i * BQ
        nrows = min(Nq - r0, BQ)
        ob = (bh * Nq + r0) * D  # first output value of the block (int64)
        if n_marg[u64(bh * Mq + i)] <= 0:  # no marginal key block: zeros
            for x in range(tid, nrows * DO, NT):
                o_l[u64(ob // OPK + x)] = OZ
            return
        sb = (bh * Mq + i) * W  # lstate row (int64)
        # --- chunk 0 of H_i (and its Z values) in flight during the φ phase
        _fetch_chunk(hv, lstate, sb, tid, NT, NV, TOT, VEC4)
        zv = lstate[u64(sb + D * D + tid)] if tid < HK else ZERO
        # --- 1. φ rows (as make_linear_kernel)
        _phi_tile(smem32, xs, q, ob, tid, nrows, D, C, SW, PLO, fm, IN_F16)
        # --- 3. fragment addresses (bytes), as make_linear_kernel; lb / lz in buffer 0
        sa = smem_addr(smem)
        lrow = (lane & 7) + ((lane >> 3) & 1) * 8
        la = sa + ((warp * 16 + lrow) * SW + (lane >> 4) * 8) * 2
        lb = sa + (lrow * SW + (lane >> 4) * 8 + HB) * 2
        lz = sa + (lrow * SW + D + HB) * 2  # the Z tile (all lanes: columns D..)
        busy = warp * 16 < nrows
        for n in range(NN):
            for e in range(4):
                acc[n, e] = ZERO
        for e in range(4):
            z[0, e] = ZERO
        for kc in range(NC):
            # 2. chunk kc (registers) -> buffer kc & 1, last read by the mma of chunk
            #    kc - 2, which every warp finished before the barrier of chunk kc - 1
            hb = HB + (kc & 1) * BUF
            _store_chunk(smem32, hv, hb, hb + HK * SW, tid, NT, NV, TOT, D, SW)
            if tid < HK:
                zh = bf16_low_f32(pack_bf16x2(zv, zv))
                s = (tid * SW + D + hb) >> 1
                smem32[s] = pack_bf16x2(zh, zv - zh)
                smem32[s + 1] = ZI
                smem32[s + 2] = ZI
                smem32[s + 3] = ZI
            cuda.syncthreads()  # chunk kc (and φ) written; chunk kc - 1 consumed
            # chunk kc + 1 in flight during the mma of chunk kc
            if kc + 1 < NC:
                g = sb + (kc + 1) * (HK * D)
                _fetch_chunk(hv, lstate, g, tid, NT, NV, TOT, VEC4)
                if tid < HK:
                    zv = lstate[u64(sb + D * D + (kc + 1) * HK + tid)]
            if busy:
                lk = la + kc * (HK * 2)
                bo = (kc & 1) * (BUF * 2)
                _chunk_products(acc, z, af, smem, lk, lb + bo, lz + bo, KS, NN, HK, SW, PLO)
        # --- 4. epilogue (as make_linear_kernel)
        inv0, inv1 = _den_inverses(z, eps)
        write_rows(o_l, acc, inv0, inv1, ob, warp, lane, nrows, D, NN)

    return LinearKernel(linear_tc_pipelined, SMEM, NT)


def get_linear_kernel_pipelined(kind, D, BQ, hk=None, vec4=True, min_blocks=None, out_kind="f32"):
    """The pipelined :class:`LinearKernel` for (kind, D, BQ, chunk_rows(D, hk), vec4,
    min_blocks, out_kind), built once per process. ``hk`` None: ``PIPE_HK`` on a GPU (``SIM_HK``
    under the simulator); ``min_blocks`` None: ``pipe_min_blocks(BQ)`` on a GPU (none
    under the simulator), 0: no launch bound."""
    HK = chunk_rows(D, PIPE_HK if hk is None and not SIMULATED else hk)
    if min_blocks is None:
        min_blocks = None if SIMULATED else pipe_min_blocks(BQ)
    mb = int(min_blocks) if min_blocks else None
    key = ("pipelined", kind, int(D), int(BQ), HK, bool(vec4), mb, out_kind)
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = make_linear_kernel_pipelined(*key[1:])
    return k


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------


def check_linear_args(who, kind, q_bits, lstate, n_marg, o_l, B, H, Nq, D, block_q, fm):
    """The checks of a linear-forward launch (this module's and ``tc/linear_wgmma.py``'s):
    a TypeError / ValueError naming ``who`` and the argument, else ``(Mq, nblk,
    out_kind)`` (query blocks in lstate, blocks to compute, "f32" or the 16-bit kind of
    o_l), or None when there is nothing to compute (no query block, B·H = 0)."""
    if fm not in (0, 1, 2):
        raise ValueError(f"{who}: feature map code {fm}")
    if dtype_name(lstate) != "float32" or dtype_name(o_l) not in ("float32", "int32"):
        raise TypeError(f"{who}: lstate must be float32, o_l float32 or int32 (pairs)")
    out_kind = out_kind_of(o_l, kind)
    if dtype_name(n_marg) != "int32":
        raise TypeError(f"{who}: n_marg must be int32")
    nblk = -(-Nq // block_q)
    if nblk <= 0 or B * H == 0:
        return None
    W = D * D + D
    if size(lstate) % (B * H * W):
        raise ValueError(f"{who}: lstate size is not B*H*Mq*(D*D + D)")
    Mq = size(lstate) // (B * H * W)
    if Mq < nblk:
        raise ValueError(f"{who}: lstate has {Mq} blocks, {nblk} needed")
    if size(n_marg) < B * H * Mq:
        raise ValueError(f"{who}: n_marg smaller than B*H*Mq")
    if (
        size(q_bits) < B * H * Nq * D
        or size(o_l) * (1 if out_kind == "f32" else 2) < B * H * Nq * D
    ):
        raise ValueError(f"{who}: q / o_l smaller than B*H*Nq*D")
    if H > 65535 or B > 65535:
        raise ValueError(f"{who}: H or B too large for the grid")
    return Mq, nblk, out_kind


def launch_linear_forward_tc(
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
    pipeline=None,
    min_blocks=None,
):
    """``o_l`` = the linear branch's output for all rows < Nq, on ``stream``.

    kind 'bf16' / 'f16' (the type of q's bits); q_bits int16 (B, H, Nq, D); lstate fp32
    (B, H, Mq, D*D + D); n_marg int32 (B, H, Mq); o_l fp32 (B, H, Nq, D), or the int32
    pair view of a 16-bit o_l in q's type (rounded to nearest even); any of them
    may be given as flat views (Mq is taken from lstate's size, Mq >= ceil(Nq/block_q)).
    Numba device arrays or torch / CuPy CUDA tensors (numpy under the simulator).
    fm: 0 softmax, 1 elu + 1, 2 relu. ``hk``: rows of H_i staged at a time (tests).
    ``pipeline``: None follows ``SLA_NUMBA_LINEAR`` (default ``pipelined``; ``wgmma``:
    ``tc/linear_wgmma.py``'s kernel where it applies, else the pipelined one), False /
    True force the register-staged / pipelined kernel (same bits; module doc);
    ``min_blocks``: the pipelined kernel's launch bound (CTAs per SM; None: its default
    ``pipe_min_blocks(block_q)``, 0: none).
    """
    B, H, Nq, D, block_q, fm = (int(x) for x in (B, H, Nq, D, block_q, fm))
    if kind not in KINDS:
        raise ValueError(f"launch_linear_forward_tc: kind {kind!r}")
    if not linear_tc_supported(D, block_q):
        raise ValueError(f"launch_linear_forward_tc: D = {D}, block_q = {block_q} not supported")
    checked = check_linear_args("launch_linear_forward_tc", kind, q_bits, lstate, n_marg, o_l,
                                B, H, Nq, D, block_q, fm)  # fmt: skip
    if checked is None:  # nothing to compute
        return
    Mq, nblk, out_kind = checked
    if pipeline is None:
        mode = config.linear_kernel()
        if mode == "wgmma" or (mode == "auto" and not SIMULATED):
            # Hopper's kernel where it applies (auto: 1.4-1.5x faster on the H200, session
            # 9; not under the simulator, whose suite keeps covering the kernels below)
            from . import linear_wgmma

            if linear_wgmma.wgmma_linear_unsupported_reason(kind, D, block_q) is None:
                linear_wgmma.launch_linear_forward_wgmma(
                    kind, q_bits, lstate, n_marg, o_l, B, H, Nq, D, block_q, fm, eps, stream
                )
                return
        pipeline = mode != "registers"  # auto elsewhere: the pipelined kernel
    if pipeline:
        addr = address(lstate)  # 16-byte loads need a 16-byte aligned lstate (W % 4 == 0)
        vec4 = addr is not None and addr % 16 == 0
        kern = get_linear_kernel_pipelined(kind, D, block_q, hk, vec4, min_blocks, out_kind)
    else:
        kern = get_linear_kernel(kind, D, block_q, hk, out_kind)
    _tc_build.launch(
        kern.kernel,
        (nblk, H, B),
        kern.threads,
        kern.smem_bytes,
        stream,
        (
            flat(q_bits),
            flat(lstate),
            flat(n_marg),
            flat(o_l),
            H,
            Nq,
            Mq,
            fm,
            np.float32(eps),
        ),
    )
