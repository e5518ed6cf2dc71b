"""The linear branch's per-key-block states on tensor cores (fp16 / bf16, cc >= 8.0).

Same result and layout as the SIMT prep kernel's states (``_prep.make_state_fn``)::

    h_j[d1, e] = Σ_r φ(k_r)[d1] · v_r[e]          (D x D)
    z_j[d1]    = Σ_r φ(k_r)[d1]                    (D)
    r in [j*BK, min((j+1)*BK, Nk))                 (rows past Nk contribute nothing)

    state[b, h, j, :D*D]        = h_j (row-major)
    state[b, h, j, D*D:D*D + D] = z_j             W = D*D + D (DP = D: D % 16 == 0)

Inputs: k, v (B, H, Nk, D) as raw int16 bits of bf16 or fp16 (contiguous, flat views
are taken); state fp32 (B, H, Mk, W), Mk >= ceil(Nk / BK), C-contiguous (or flat).
Every ``state[b, h, j, w]`` with j < ceil(Nk / BK), w < W is written; nothing else.
φ = feature map ``fm``: 0 softmax over the head dim of each row, 1 elu + 1, 2 relu
(the definitions of ``_tiles.make_common.phi_value`` / ``row_stats``).

Algorithm (one CTA per (j, h, b), grid (ceil(Nk/BK), H, B))
-----------------------------------------------------------
1. φ rows. The CTA's threads are (row slot, lane) pairs: L = NT/BK lanes per key row
   (a power of two <= 8, adjacent lanes of one warp), each lane owning C = D/L
   consecutive columns. A lane loads its C values of k_r (fp32), and for softmax
   the row max and Σ exp are reduced over the L lanes with ``shfl_xor`` (all lanes
   execute the shuffles; invalid rows are masked only when stored). φ (fp32) is split

       hi = half(φ)     lo = half(φ - hi)           (round to nearest; half = the
                                                    input's type, bf16 or fp16)

   and both are stored as packed pairs in shared memory, row-major [r][d1]. Rows
   r >= nrows (tail block) store zeros. ``split=False`` keeps hi only (one mma per
   tile, ~2^-9 relative error with bf16).
2. V rows are copied (bits, packed pairs, coalesced) into a third tile [r][e];
   tail rows are zeros. One ``syncthreads``.
3. Tensor cores, ``mma.sync.m16n8k16`` (fp32 accumulation) per 16 key rows:
   A = φᵀ (m = d1, k = r) with ``ldmatrix.x4.trans`` from the [r][d1] tile (matrix i
   of a 16 x 16 block: rows r 8(i >> 1).., columns d1 8(i & 1)..), B = V (k = r,
   n = e) with ``ldmatrix.x4.trans`` from the [r][e] tile (rows 8(i & 1).., columns
   8(i >> 1)..: two n8 tiles). Per tile: acc += A_hi·B + A_lo·B. V is exact in its
   own type, so the only rounding is φ's split (2^-16 bf16 / 2^-22 fp16 relative)
   and the fp32 accumulation.
   z_j = φᵀ·1: the warps of column 0 do one more n8 tile per m-tile with B = ones
   (constant registers, no shared memory), hi and lo, so z sums exactly the values
   that h sums.
   Warps form a WR x WC grid over the D x D output: warp (wr, wc) owns MT = D/16/WR
   m-tiles (d1) x NP = D/16/WC pairs of n8 tiles (e): 8·MT·NP fp32 accumulators per
   lane (``acc[mt, n, e]``, registers: see below). GPU default: at most 64
   accumulators with >= 4 warps if possible (D = 128: 8 warps as 4 x 2; D = 64: 4
   warps as 2 x 2). The BK/16 k-steps are an unrolled loop, each step skipped when
   it starts past the valid rows.
4. Epilogue: lane (g, t) stores rows g, g + 8 x columns 2t, 2t + 1 of each tile
   straight to global memory (pairs of consecutive floats); lanes t == 0 of the
   column-0 warps store z. With an int16 state (bf16 states, ``SLA_NUMBA_STATES``) each fp32
   result is rounded to bf16 (nearest even) and its 16 bits stored instead.

Shared memory: [φ hi: BK x (D+8)][φ lo: BK x (D+8)][V: BK x (D+8)] 16-bit, 8 values
of padding per row (the 8 rows of an ldmatrix land in 8 different bank groups):
52 KiB at D = 128, BK = 64 (``_tc_build.launch`` opts in above 48 KiB).

Fragment ownership (``ptx`` doc; g = lane >> 2, t = lane & 3): lane (g, t) of warp
(wr, wc) holds ``acc[mt, n] = h_j[d1, e]`` for d1 = wr·16·MT + 16 mt + g (elements 0,
1) and d1 + 8 (elements 2, 3), e = wc·16·NP + 8 n + 2t, +1; ``z[mt]`` the same rows of
φᵀ·ones (all its columns equal z_j[d1]).

Why the hi / lo split: the mma takes 16-bit operands. V is exact in its own type, φ
(fp32, computed) is not: one half value keeps 8 (bf16) or 11 (fp16) significant bits,
hi + lo keeps ~16 / ~22, for two mma instead of one.

Three kernels, one algorithm (``SLA_NUMBA_STATES_KERNEL``, ``launch_states_tc(variant=)``):

- ``registers`` (``make_states_kernel``, the default): the phases above, one key block
  a CTA; K and V read with 2-byte global loads, the result stored straight from the
  mma fragments.
- ``staged`` (``make_states_kernel_staged``): the same grid and tiles with the global
  traffic in wide pieces. 0. K and V reach shared memory by 16-byte ``cp.async`` (V
  still on its way while φ is computed from the staged K); 4. the result goes out
  through a shared tile over the input tiles as 128-byte warp stores.
- ``pipelined`` (``make_states_kernel_pipelined``): the staged work for several key
  blocks a CTA (``blocks_per_cta``), the next block's K and V copied (a K tile and two
  V stages) while the current block runs its mma and epilogue.

A fourth, ``wgmma`` (``tc/states_wgmma.py``, compute capability 9.0), computes the same
φ hi / lo but sums with Hopper's warpgroup MMA: same results to fp32 rounding, not the
same bits; ``launch_states_tc`` runs it for ``variant='wgmma'`` where it applies.

All three compute φ with the same operations on the same values and give every output
as one lane's fixed sequence of mma: same bits (tests/gpu/tc/
test_tc_states_pipelined.py).

How the kernels are written: each phase is one device function at module level (φ
rows ``_phi_rows``, the products ``_block_products``, the two epilogues
``_store_fragments`` / ``_store_staged``, the copies ``_copy_block``), written once
and inlined (``forceinline``) into the three ``@cuda.jit`` closure kernels, whose
factories only lay out shared memory and order the phases. Sizes are closure
constants passed to the phases as arguments (Numba types them as integer literals, so
a phase can size its own scratch: a lane's φ values in ``_phi_rows``, the A fragments
in ``_block_products``); the accumulators, which pass from the products to the
epilogue, are the kernel's. All are ``cuda.local.array`` indexed only by counters of
constant-trip loops, which LLVM unrolls completely once inlined, so they live in
registers (``tools/check_tc_ptx.py``: no ``.local``; mma / ldmatrix counts those of
the generated kernel it replaced). ldmatrix addresses are one per-lane base plus
compile-time constant byte offsets, folded by ptxas into the instruction.

Determinism: no atomics; every output is one lane's fixed sequence of mma.
Under the CUDA simulator the ``ptx`` twins run the same function (slowly: use
1-warp tiles and tiny shapes there, ``SIM_MAX_WARPS``).

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``)::

    import numpy as np
    from sla_numba.gpu.tc.states import launch_states_tc
    B, H, Nk, D, bk = 1, 1, 16, 16, 16
    ones = (np.ones((B, H, Nk, D), np.float32).view(np.int32) >> 16).astype(np.int16)
    state = np.empty((B, H, 1, D * D + D), np.float32)
    launch_states_tc("bf16", ones, ones, state, B, H, Nk, D, bk, 2, 0)
    # relu(1) = 1: h_j = 16 everywhere, z_j = 16
"""

import math
from collections import namedtuple

import numpy as np
from numba import cuda, float32, int16, int32, uint64

from ... import config
from .. import _compat
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, flat, int32_pairs
from .ptx import (
    SIMULATED,
    bf16_high_f32,
    bf16_low_f32,
    cp_async_commit,
    cp_async_wait_group,
    cp_async_zfill,
    f16_high_f32,
    f16_low_f32,
    fmax,
    ldsm_x4_trans,
    mma_bf16,
    mma_f16,
    opaque_i32,
    pack_bf16x2,
    pack_f16x2,
    shfl_xor,
    smem_addr,
)

Tiles = namedtuple("Tiles", "WR WC")

GPU_MAX_WARPS = 8
SIM_MAX_WARPS = 1
PAD = 8
KINDS = ("bf16", "f16")
BLOCKS = (16, 32, 64)

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
ZI = np.int32(0)
#: A pair of 1.0 in the input's type (the B operand of z = φᵀ · ones).
ONES = {"bf16": np.int32(0x3F803F80), "f16": np.int32(0x3C003C00)}
u64 = uint64  # unsigned indices: no wraparound checks
#: Fast-math of the kernels (no nnan / ninf). Device helpers are inlined.
FASTMATH = {"contract", "arcp", "afn", "nsz"}
_DEV = {} if SIMULATED else {"forceinline": True, "fastmath": FASTMATH}
#: Alignment of the dynamic shared memory (the simulator rejects ``alignment=``).
SMEM_ALIGN = None if SIMULATED else 16


# ---------------------------------------------------------------------------
# Supported shapes, tiles
# ---------------------------------------------------------------------------


def states_tc_supported(D, block_k):
    """D a multiple of 16 up to 128, block_k in {16, 32, 64}."""
    D, block_k = int(D), int(block_k)
    return 16 <= D <= 128 and D % 16 == 0 and block_k in BLOCKS


def choose_tiles(D, max_warps=None):
    """Warp grid (WR, WC) for head dim D: at most 64 accumulators a lane with at least
    4 warps when possible (fewest warps next, then fewest ldmatrix per k-step)."""
    if max_warps is None:
        max_warps = SIM_MAX_WARPS if SIMULATED else GPU_MAX_WARPS
    m = D // 16
    best = None
    for wr in range(1, m + 1):
        for wc in range(1, m + 1):
            if m % wr or m % wc or wr * wc > max_warps:
                continue
            MT, NP = m // wr, m // wc
            acc = 8 * MT * NP
            key = (max(acc, 64), -min(wr * wc, 4), wr * wc, 2 * MT + NP)
            if best is None or key < best[0]:
                best = (key, Tiles(wr, wc))
    return best[1]


def geometry(D, BK, tiles, split=True):
    """Sizes shared by the three kernels (module doc): NT threads; MT m-tiles x NP pairs
    of n8 tiles (NN n8 tiles) a warp; L lanes a φ row, each owning C columns; RP rows a
    φ pass, NPASS passes; SW the tiles' row stride and TILE a tile's size (16-bit
    values); PARTS φ parts (hi, lo); LOG2L shuffle steps over a row's lanes; KSTEPS
    k-steps a block."""
    WR, WC = tiles
    m = D // 16
    if m % WR or m % WC:
        raise ValueError(f"tiles {tuple(tiles)} do not divide D/16 = {m}")
    NT = 32 * WR * WC
    L = 1
    while L * 2 <= min(NT // BK, 8):
        L *= 2
    RP = NT // L  # rows per pass of the φ phase
    SW = D + PAD  # tile row stride (16-bit values)
    TILE = BK * SW
    return dict(
        NT=NT,
        MT=m // WR,
        NP=m // WC,
        NN=2 * (m // WC),
        L=L,
        C=D // L,
        RP=RP,
        NPASS=-(-BK // RP),
        SW=SW,
        TILE=TILE,
        PARTS=2 if split else 1,
        LOG2L=L.bit_length() - 1,
        KSTEPS=BK // 16,
    )


def ops_per_block(D, BK, tiles, split=True):
    """(mma, ldmatrix) a warp of the column-0 warps issues for a full key block: per
    k-step MT·2NP + MT mma (h and z) and NP + MT ldmatrix, the A parts doubled by the
    split. ``tools/check_tc_ptx.py`` counts them in the PTX."""
    G = geometry(D, BK, tiles, split)
    MT, NP, parts = G["MT"], G["NP"], G["PARTS"]
    ks = BK // 16
    return ks * (MT * 2 * NP + MT) * parts, ks * (NP + MT * parts)


def _checked(kind, D, BK, tiles):
    """``Tiles(*tiles)`` once kind, D and BK are known to be supported (else ValueError)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: 'bf16' or 'f16'")
    if not states_tc_supported(D, BK):
        raise ValueError(f"D = {D}, block_k = {BK}: not supported")
    return Tiles(*tiles)


#: The sizes every kernel takes from :func:`geometry`, and the staged and pipelined ones
#: from :func:`staged_geometry` (in the order the factories unpack them).
COMMON = "NT MT NP NN L C RP NPASS SW TILE PARTS LOG2L KSTEPS".split()
STAGED = "OPASS RPT OW OS ZOFF ZW OPT Q TOT CPT".split()


def _pick(G, names):
    """The values of a geometry dict for ``names``, in order."""
    return tuple(G[k] for k in names)


def _bounds(NT, min_blocks):
    """(kernel options, closure constant) of a launch bound of ``min_blocks`` CTAs an SM
    (None: no bound). ``launch_bounds`` is not part of Numba's disk-cache key, the
    closure is: the kernel names the constant."""
    if min_blocks is None:
        return {}, 0
    return {"launch_bounds": (NT, int(min_blocks))}, int(min_blocks)


#: The compiled kernel of one configuration and its launch sizes.
StatesKernel = namedtuple("StatesKernel", "kernel smem_bytes threads")


# ---------------------------------------------------------------------------
# The phases, written once
# ---------------------------------------------------------------------------
#
# Device helpers live at module level, not in the factories: the kernels reach them as
# globals, so they are not part of their closures, whose pickle keys Numba's disk cache
# (a pickled device function would carry the intrinsics' per-process random uuids, and
# the cache would never hit). Sizes arrive as arguments that are the kernel's closure
# constants: inlined (``forceinline``), every loop over them has a constant trip count
# and is unrolled, so the local arrays (the kernel's accumulators, a phase's own
# scratch) stay in registers. ``f16``
# (the input type), ``split``, ``staged`` and ``out_bf16`` are constants too: one branch
# of each remains.


@_compat.device(**_DEV)
def _low_f32(p, f16):
    """fp32 of the low 16-bit value of p."""
    if f16:
        return f16_low_f32(p)
    return bf16_low_f32(p)


@_compat.device(**_DEV)
def _high_f32(p, f16):
    """fp32 of the high 16-bit value of p."""
    if f16:
        return f16_high_f32(p)
    return bf16_high_f32(p)


@_compat.device(**_DEV)
def _pack(lo, hi, f16):
    """Round two fp32 to the input type, packed (lo in the low half)."""
    if f16:
        return pack_f16x2(lo, hi)
    return pack_bf16x2(lo, hi)


@_compat.device(**_DEV)
def _low16(p):
    """The low 16 bits of the int32 ``p`` as an int16 (bf16 bits to store)."""
    x = p & 0xFFFF
    return int16(x - 65536 if x > 32767 else x)


@_compat.device(**_DEV)
def _high16(p):
    """The high 16 bits of the int32 ``p`` as an int16."""
    x = (p >> 16) & 0xFFFF
    return int16(x - 65536 if x > 32767 else x)


@_compat.device(**_DEV)
def _bf16_halves(x0, x1):
    """x0 and x1 rounded to bf16 (nearest even), as two int16 bit patterns: the
    rounding of bf16 states (``SLA_NUMBA_STATES``)."""
    p = pack_bf16x2(x0, x1)
    return _low16(p), _high16(p)


@_compat.device(**_DEV)
def _mma_acc(acc, mt, n, a, pt, b0, b1, f16):
    """acc[mt, n] += A(a[pt, mt]) · B(b0, b1)."""
    if f16:
        acc[mt, n, 0], acc[mt, n, 1], acc[mt, n, 2], acc[mt, n, 3] = mma_f16(
            a[pt, mt, 0],
            a[pt, mt, 1],
            a[pt, mt, 2],
            a[pt, mt, 3],
            b0,
            b1,
            acc[mt, n, 0],
            acc[mt, n, 1],
            acc[mt, n, 2],
            acc[mt, n, 3],
        )
    else:
        acc[mt, n, 0], acc[mt, n, 1], acc[mt, n, 2], acc[mt, n, 3] = mma_bf16(
            a[pt, mt, 0],
            a[pt, mt, 1],
            a[pt, mt, 2],
            a[pt, mt, 3],
            b0,
            b1,
            acc[mt, n, 0],
            acc[mt, n, 1],
            acc[mt, n, 2],
            acc[mt, n, 3],
        )


# --- 0. K and V into shared memory (staged, pipelined) ---------------------------


@_compat.device(**_DEV)
def _copy_block(smem, sbyte, src, kb, nrows, tid, NT, CPT, TOT, Q, D, SW):
    """Issue the 16-byte cp.async of a key block's BK x D values of ``src`` (from flat
    index kb) into the tile at shared byte address ``sbyte``; rows >= nrows are
    zero-filled (their source address stays at the block's first value)."""
    for it in range(CPT):  # constant trips once inlined: unrolled
        qi = tid + it * NT
        if qi < TOT:  # TOT = BK·Q pieces a tile
            r = qi // Q
            c = (qi - r * Q) * 8
            ok = r < nrows
            go = kb + (r * D + c if ok else 0)
            cp_async_zfill(smem, sbyte + (r * SW + c) * 2, 16, src, go, 16 if ok else 0)


# --- 1. φ rows ---------------------------------------------------------------------


@_compat.device(**_DEV)
def _feature_map(xs, fm, C, LOG2L):
    """``xs = φ(xs)`` in place: this lane's C values of a row whose other values the
    2^LOG2L adjacent lanes hold. Softmax reduces the row max and Σ exp over those lanes
    with shuffles, which run in every lane (warp-uniform). Returns softmax's (row max,
    1 / Σ exp), (0, 1) for the element-wise maps (the linear gradients keep them;
    ``tc/linear.py`` applies φ to query rows through this function too)."""
    mx = ZERO
    inv = ONE
    if fm == 0:
        mx = xs[0]
        for c in range(1, C):
            mx = fmax(mx, xs[c])
        for st in range(LOG2L):
            mx = fmax(mx, shfl_xor(mx, 1 << st))
        for c in range(C):
            xs[c] = math.exp(xs[c] - mx)
        sm = xs[0]
        for c in range(1, C):
            sm += xs[c]
        for st in range(LOG2L):
            sm += shfl_xor(sm, 1 << st)
        inv = ONE / sm
        for c in range(C):
            xs[c] = xs[c] * inv
    elif fm == 1:
        for c in range(C):
            xs[c] = xs[c] + ONE if xs[c] > ZERO else math.exp(xs[c])
    else:
        for c in range(C):
            xs[c] = xs[c] if xs[c] > ZERO else ZERO
    return mx, inv


@_compat.device(**_DEV)
def _store_phi(smem32, xs, si, ok, C, LOFF, split, f16):
    """φ's C values as packed pairs at int32 index ``si`` of the φ hi tile and, with
    ``split``, their remainders lo = half(φ - hi) at the same place of the lo tile
    (LOFF 16-bit values further); zeros when not ``ok`` (a row past the keys)."""
    for c2 in range(C // 2):
        p = _pack(xs[2 * c2], xs[2 * c2 + 1], f16) if ok else ZI
        smem32[si + c2] = p
        if split:
            lo0 = xs[2 * c2] - _low_f32(p, f16)
            lo1 = xs[2 * c2 + 1] - _high_f32(p, f16)
            smem32[si + (LOFF >> 1) + c2] = _pack(lo0, lo1, f16) if ok else ZI


@_compat.device(**_DEV)
def _phi_rows(
    smem32, k, kb, kw, nrows, tid, fm, staged, split, f16, BK, D, L, C, LOG2L, RP, NPASS, SW
):
    """Phase 1 (module doc): φ of the key block's rows into the φ tiles, row-major
    [r][d1] from word 0 (hi; lo one tile further). Thread ``tid`` is lane li = tid % L of
    row slot tid // L and owns columns li·C .. li·C + C - 1 of rows slot, slot + RP, ...
    (NPASS passes). Its K values come from global memory (``k`` from flat index ``kb``,
    the block's first value) or, ``staged``, from the K tile at int32 index ``kw``.
    Rows >= nrows give zeros."""
    xs = cuda.local.array(C, float32)  # this lane's values of a row: K, then φ
    slot = tid // L
    li = tid - slot * L
    for ps in range(NPASS):
        r = ps * RP + slot
        ok = r < nrows
        if staged:  # the lane's slice of the row it then overwrites (no other lane reads it)
            if r < BK:
                kq = kw + ((r * SW + li * C) >> 1)  # int32 index of the pair (r, li*C)
                for c2 in range(C // 2):
                    p = smem32[kq + c2]
                    xs[2 * c2] = _low_f32(p, f16) if ok else ZERO
                    xs[2 * c2 + 1] = _high_f32(p, f16) if ok else ZERO
            else:
                for c in range(C):
                    xs[c] = ZERO
        else:
            gk = kb + r * D + li * C
            for c in range(C):
                xs[c] = _low_f32(int32(k[u64(gk + c)]), f16) if ok else ZERO
        _feature_map(xs, fm, C, LOG2L)
        if r < BK:
            _store_phi(smem32, xs, (r * SW + li * C) >> 1, ok, C, BK * SW, split, f16)


# --- 3. tensor cores ---------------------------------------------------------------


@_compat.device(**_DEV)
def _block_products(
    acc, z, smem, sa, vbyte, lane, wr, wc, nrows, MT, NP, PARTS, KSTEPS, SW, LOFF, ones, f16
):
    """Phase 3 (module doc): ``acc`` = the warp (wr, wc)'s tiles of φᵀ·V and, for the
    column-0 warps, ``z`` = φᵀ·ones, over the block's k-steps (none past ``nrows``). φ hi
    at shared byte address ``sa`` (lo LOFF 16-bit values further), V at ``vbyte``."""
    a = cuda.local.array((PARTS, MT, 4), int32)  # A fragments of a k-step
    # A = φᵀ: matrix i = lane >> 3 at rows r 8(i >> 1).., columns d1 8(i & 1)..
    la = sa + (((lane & 7) + (lane >> 4) * 8) * SW + ((lane >> 3) & 1) * 8 + wr * 16 * MT) * 2
    # B = V: matrix i at rows r 8(i & 1).., columns e 8(i >> 1)..
    lb = vbyte + (((lane & 7) + ((lane >> 3) & 1) * 8) * SW + (lane >> 4) * 8 + wc * 16 * NP) * 2
    for mt in range(MT):
        for n in range(2 * NP):
            for e in range(4):
                acc[mt, n, e] = ZERO
        for e in range(4):
            z[mt, 0, e] = ZERO
    for ks in range(KSTEPS):  # k-steps of 16 rows (each guarded: none past the valid rows)
        if nrows > 16 * ks:
            ko = ks * 16 * SW * 2  # bytes: 16 rows down
            for mt in range(MT):
                for pt in range(PARTS):
                    a0, a1, a2, a3 = ldsm_x4_trans(smem, la + (mt * 16 + pt * LOFF) * 2 + ko, 0)
                    a[pt, mt, 0], a[pt, mt, 1], a[pt, mt, 2], a[pt, mt, 3] = a0, a1, a2, a3
            for p2 in range(NP):
                b0, b1, b2, b3 = ldsm_x4_trans(smem, lb + p2 * 32 + ko, 0)
                for mt in range(MT):
                    for pt in range(PARTS):
                        _mma_acc(acc, mt, 2 * p2, a, pt, b0, b1, f16)
                        _mma_acc(acc, mt, 2 * p2 + 1, a, pt, b2, b3, f16)
            if wc == 0:  # z = φᵀ · ones
                for mt in range(MT):
                    for pt in range(PARTS):
                        _mma_acc(z, mt, 0, a, pt, ones, ones, f16)


# --- 4. the result -----------------------------------------------------------------


@_compat.device(**_DEV)
def _store_fragments(state, acc, z, sb, lane, wr, wc, MT, NP, D, out_bf16):
    """Phase 4 of the register kernel: lane (g, t) stores rows g, g + 8 x columns 2t,
    2t + 1 of each of its tiles straight to ``state`` from element ``sb`` (the block's
    state row); lanes t = 0 of the column-0 warps store z. fp32, or with ``out_bf16``
    bf16 bits."""
    g = lane >> 2
    t2 = (lane & 3) * 2
    ob = sb + (wr * 16 * MT + g) * D + wc * 16 * NP + t2
    for mt in range(MT):
        for hh in range(2):
            for n in range(2 * NP):
                so = ob + (16 * mt + 8 * hh) * D + 8 * n
                if out_bf16:
                    state[u64(so)], state[u64(so + 1)] = _bf16_halves(
                        acc[mt, n, 2 * hh], acc[mt, n, 2 * hh + 1]
                    )
                else:
                    for x in range(2):
                        state[u64(so + x)] = acc[mt, n, 2 * hh + x]
    if wc == 0 and t2 == 0:
        zb = sb + D * D + wr * 16 * MT + g
        for mt in range(MT):
            if out_bf16:
                state[u64(zb + 16 * mt)], state[u64(zb + 16 * mt + 8)] = _bf16_halves(
                    z[mt, 0, 0], z[mt, 0, 2]
                )
            else:
                state[u64(zb + 16 * mt)] = z[mt, 0, 0]
                state[u64(zb + 16 * mt + 8)] = z[mt, 0, 2]


@_compat.device(**_DEV)
def _store_staged(
    state, smem, smem32, smemf, acc, z, sb, tid, lane, wr, wc,
    MT, NP, D, NT, OPASS, RPT, OW, OS, ZOFF, ZW, OPT, out_bf16,
):  # fmt: skip
    """Phase 4 of the staged and pipelined kernels (``staged_geometry``): the fragments
    (fp32, or with ``out_bf16`` rounded to bf16 pairs) into a result tile in shared
    memory, then out to ``state`` from 32-bit word ``sb`` with consecutive threads on
    consecutive words. Staged row sr of pass hp is result row d1 = (sr // RPT)·16 +
    hp·8 + sr % RPT (bf16: one pass, sr = d1). Starts with a barrier: the input tiles
    the result tile covers must no longer be read."""
    g = lane >> 2
    t = lane & 3
    for hp in range(OPASS):
        cuda.syncthreads()  # the tiles (or the previous pass) are no longer read
        for mt in range(MT):
            m16 = wr * MT + mt  # the m-tile's index in d1
            for hh in range(2):
                if OPASS == 1 or hh == hp:
                    sr = m16 * RPT + (8 * hh if OPASS == 1 else 0) + g
                    for n in range(2 * NP):
                        e = wc * 16 * NP + 8 * n + 2 * t  # result column (even)
                        if out_bf16:
                            smem32[sr * OS + (e >> 1)] = pack_bf16x2(
                                acc[mt, n, 2 * hh], acc[mt, n, 2 * hh + 1]
                            )
                        else:
                            smemf[sr * OS + e] = acc[mt, n, 2 * hh]
                            smemf[sr * OS + e + 1] = acc[mt, n, 2 * hh + 1]
        if hp == 0 and wc == 0 and t == 0:
            for mt in range(MT):
                d1 = (wr * MT + mt) * 16 + g
                if out_bf16:  # 16-bit values at z's place
                    smem[2 * ZOFF + d1], smem[2 * ZOFF + d1 + 8] = _bf16_halves(
                        z[mt, 0, 0], z[mt, 0, 2]
                    )
                else:
                    smemf[ZOFF + d1] = z[mt, 0, 0]
                    smemf[ZOFF + d1 + 8] = z[mt, 0, 2]
        cuda.syncthreads()
        for it in range(OPT):  # unrolled
            qi = tid + it * NT
            if qi < (D // OPASS) * OW:
                sr = qi // OW
                c = qi - sr * OW
                m16 = sr // RPT
                d1 = m16 * 16 + hp * 8 + (sr - m16 * RPT)
                if out_bf16:
                    state[u64(sb + d1 * OW + c)] = smem32[sr * OS + c]
                else:
                    state[u64(sb + d1 * OW + c)] = smemf[sr * OS + c]
        if hp == 0:
            for qi in range(tid, ZW, NT):
                if out_bf16:
                    state[u64(sb + D * OW + qi)] = smem32[ZOFF + qi]
                else:
                    state[u64(sb + D * OW + qi)] = smemf[ZOFF + qi]


# ---------------------------------------------------------------------------
# The register kernel
# ---------------------------------------------------------------------------


@kernel_factory
def make_states_kernel(kind, D, BK, tiles, split=True, out_bf16=False):
    """Build ``states_tc(k, v, state, H, Nk, Mk, fm)`` (module doc).

    k, v flat int16 bits (B, H, Nk, D) of ``kind``; state flat fp32 (B, H, Mk, D*D + D),
    or with ``out_bf16`` flat int16: the bf16 bits of each fp32 result (rounded to
    nearest even, whatever ``kind``: bf16 keeps fp32's range).
    Grid (ceil(Nk/BK), H, B), 32·WR·WC threads. Returns a :class:`StatesKernel`.
    """
    WR, WC = tiles = _checked(kind, D, BK, tiles)
    G = geometry(D, BK, tiles, split)
    NT, MT, NP, NN, L, C, RP, NPASS, SW, TILE, PARTS, LOG2L, KSTEPS = _pick(G, COMMON)
    SPLIT, IS_F16, ONES_PAIR, OUT_BF16 = bool(split), kind == "f16", ONES[kind], bool(out_bf16)
    VOFF = PARTS * TILE  # V tile offset (16-bit values)

    @_compat.kernel(fastmath=FASTMATH)
    def states_tc(k, v, state, H, Nk, Mk, fm):
        # shared: [φ hi][φ lo][V], each BK x SW 16-bit values, row-major
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        tid = cuda.threadIdx.x
        lane, warp = tid & 31, tid >> 5
        j, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        nrows = min(Nk - j * BK, BK)
        kb = ((b * H + h) * Nk + j * BK) * D  # first value of the block (int64)
        # --- 1. φ rows from K in global memory
        _phi_rows(smem32, k, kb, 0, nrows, tid, fm, False, SPLIT, IS_F16,
                  BK, D, L, C, LOG2L, RP, NPASS, SW)  # fmt: skip
        # --- 2. V rows (bits), pairs of columns, zeros past nrows
        for qi in range(tid, BK * D // 2, NT):
            r = qi // (D // 2)
            c = (qi - r * (D // 2)) * 2
            p = ZI
            if r < nrows:
                gv = kb + r * D + c
                p = int32((int32(v[u64(gv)]) & 0xFFFF) | (int32(v[u64(gv + 1)]) << 16))
            smem32[(r * SW + c + VOFF) >> 1] = p
        cuda.syncthreads()
        # --- 3. tensor cores: warp (wr, wc) owns d1 in wr*16*MT + [0, 16*MT),
        # e in wc*16*NP + [0, 16*NP)
        acc = cuda.local.array((MT, NN, 4), float32)  # h fragments
        z = cuda.local.array((MT, 1, 4), float32)  # z fragments (φᵀ · ones)
        wr = warp // WC
        wc = warp - wr * WC
        sa = smem_addr(smem)
        _block_products(acc, z, smem, sa, sa + VOFF * 2, lane, wr, wc, nrows,
                        MT, NP, PARTS, KSTEPS, SW, TILE, ONES_PAIR, IS_F16)  # fmt: skip
        # --- 4. straight from the fragments to the block's state row
        sb = ((b * H + h) * Mk + j) * (D * D + D)
        _store_fragments(state, acc, z, sb, lane, wr, wc, MT, NP, D, OUT_BF16)

    return StatesKernel(states_tc, (PARTS + 1) * TILE * 2, NT)


# ---------------------------------------------------------------------------
# The staged kernel: K and V in by cp.async, the result out through shared memory
# ---------------------------------------------------------------------------


def staged_geometry(D, BK, tiles, out_bf16, split=True):
    """Sizes of :func:`make_states_kernel_staged` beyond :func:`geometry`.

    OPASS output passes (1 for bf16 results, 2 for fp32: a pass holds fragment rows
    g (hh = 0) or g + 8 (hh = 1) of every m-tile, D/2 rows, so fp32 fits in the 52 KiB
    of the input tiles), RPT rows an m-tile per pass, OW 32-bit words a result row, OS
    the staged row stride in words (OW + 4 for bf16, OW + 8 for fp32: the 8 rows g of a
    fragment store fall in different banks), ZOFF the word where z is staged, OPT result
    words a thread stores per pass; Q 16-byte pieces a row, CPT cp.async a thread issues
    per tile of TOT pieces.
    """
    G = geometry(D, BK, tiles, split)
    OPASS = 1 if out_bf16 else 2
    OW = D // 2 if out_bf16 else D
    OS = OW + (4 if out_bf16 else 8)
    ZOFF = (D // OPASS) * OS
    ZW = D // 2 if out_bf16 else D
    tile_bytes = (G["PARTS"] + 1) * G["TILE"] * 2
    out_bytes = (ZOFF + ZW) * 4
    Q = D // 8
    return dict(
        G,
        OPASS=OPASS,
        RPT=16 // OPASS,
        OW=OW,
        OS=OS,
        ZOFF=ZOFF,
        ZW=ZW,
        OPT=-(-(D // OPASS) * OW // G["NT"]),
        Q=Q,
        TOT=BK * Q,
        CPT=-(-BK * Q // G["NT"]),
        smem_bytes=max(tile_bytes, out_bytes),
    )


@kernel_factory
def make_states_kernel_staged(kind, D, BK, tiles, split=True, out_bf16=False, min_blocks=-1):
    """Build the staged ``states_tc(k, v, state, H, Nk, Mk, fm)``: the same bits as
    :func:`make_states_kernel` with the global traffic in wide, coalesced pieces.

    Where the register kernel (module doc) loads K and V with 2-byte loads, and stores
    the result straight from the mma fragments (2- or 8-byte pieces, 8 rows a warp
    store), this one

    0. copies the block's K rows into the φ lo tile (the hi tile when not ``split``)
       and its V rows into the V tile with 16-byte ``cp.async`` (rows past Nk
       zero-filled), K and V in two commit groups: V is still in flight while the
       warps compute φ;
    1. reads each lane's C values of K from shared memory (the same slice of the same
       row it then overwrites with φ lo: no other lane touches it) and computes φ
       exactly as the register kernel does;
    3. runs the register kernel's mma loop unchanged;
    4. writes the fragments (fp32, or packed to bf16 with the same rounding) into a
       result tile in shared memory, then copies it out with consecutive threads on
       consecutive 32-bit words: every warp store is 128 contiguous bytes. fp32 results
       go out in two passes (fragment rows g, then g + 8) so the tile fits in the
       input tiles' 52 KiB.

    Each output is the same lane's same sequence of mma as in the register kernel, and
    φ the same operations on the same values: same bits (tests/gpu/tc/
    test_tc_states_pipelined.py). k, v: flat int16 bits, 16-byte aligned (cp.async);
    state: flat fp32, or with ``out_bf16`` flat **int32** (pairs of bf16 bits: the
    launcher passes ``int32_pairs(state)``). Same grid and threads; shared memory
    ``staged_geometry(...)["smem_bytes"]``: the larger of the input tiles and the result
    tile, so the register kernel's 52 KiB at D = 128, block_k = 64 with the split;
    smaller blocks take the result tile's size (at most 34.5 KiB, D = 128).
    Registers (ptxas, sm_90, ``tools/check_tc_ptx.py``): 127 at D = 128 with bf16
    states against the register kernel's 114; both fit two 8-warp CTAs an SM.
    """
    WR, WC = tiles = _checked(kind, D, BK, tiles)
    G = staged_geometry(D, BK, tiles, out_bf16, split)
    NT, MT, NP, NN, L, C, RP, NPASS, SW, TILE, PARTS, LOG2L, KSTEPS = _pick(G, COMMON)
    OPASS, RPT, OW, OS, ZOFF, ZW, OPT, Q, TOT, CPT = _pick(G, STAGED)
    SPLIT, IS_F16, ONES_PAIR, OUT_BF16 = bool(split), kind == "f16", ONES[kind], bool(out_bf16)
    VOFF = PARTS * TILE
    KOFF = TILE if SPLIT else 0  # K staged where φ's last part goes (16-bit values)
    # launch bound (``min_blocks`` -1: 2 for 8 warps, none for fewer): ptxas keeps the
    # registers under 65536 / (NT · min_blocks), so at D = 128 two 8-warp CTAs stay
    # resident an SM (127-128 registers either way today, no spills). Not for 4 warps:
    # the bound lets ptxas take 108 registers at D = 64 instead of 72.
    bounds, MINB = _bounds(NT, (2 if NT >= 256 else None) if min_blocks == -1 else min_blocks)

    @_compat.kernel(fastmath=FASTMATH, **bounds)
    def states_tc_staged(k, v, state, H, Nk, Mk, fm):
        _ = MINB  # the launch bound, in the disk-cache key
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        smemf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)
        sa = smem_addr(smem)
        tid = cuda.threadIdx.x
        lane, warp = tid & 31, tid >> 5
        j, h, b = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        nrows = min(Nk - j * BK, BK)
        kb = ((b * H + h) * Nk + j * BK) * D
        # --- 0. K rows, then V rows: two commit groups
        _copy_block(smem, sa + KOFF * 2, k, kb, nrows, tid, NT, CPT, TOT, Q, D, SW)
        cp_async_commit()
        _copy_block(smem, sa + VOFF * 2, v, kb, nrows, tid, NT, CPT, TOT, Q, D, SW)
        cp_async_commit()
        cp_async_wait_group(1)  # this thread's K pieces have landed
        cuda.syncthreads()  # everyone's
        # --- 1. φ rows from the staged K
        _phi_rows(smem32, k, kb, KOFF >> 1, nrows, tid, fm, True, SPLIT, IS_F16,
                  BK, D, L, C, LOG2L, RP, NPASS, SW)  # fmt: skip
        cp_async_wait_group(0)  # V
        cuda.syncthreads()
        # --- 3. tensor cores
        acc = cuda.local.array((MT, NN, 4), float32)
        z = cuda.local.array((MT, 1, 4), float32)
        wr = warp // WC
        wc = warp - wr * WC
        _block_products(acc, z, smem, sa, sa + VOFF * 2, lane, wr, wc, nrows,
                        MT, NP, PARTS, KSTEPS, SW, TILE, ONES_PAIR, IS_F16)  # fmt: skip
        # --- 4. through the result tile, in 32-bit words
        sb = ((b * H + h) * Mk + j) * (OW * D + ZW)
        _store_staged(state, smem, smem32, smemf, acc, z, sb, tid, lane, wr, wc,
                      MT, NP, D, NT, OPASS, RPT, OW, OS, ZOFF, ZW, OPT, OUT_BF16)  # fmt: skip

    return StatesKernel(states_tc_staged, G["smem_bytes"], NT)


# ---------------------------------------------------------------------------
# The pipelined kernel: several key blocks a CTA, the next one's K and V in flight
# ---------------------------------------------------------------------------

#: Key blocks a CTA of the pipelined kernel handles by default (``blocks_per_cta``).
PIPE_BLOCKS = 8


def pipelined_geometry(D, BK, tiles, out_bf16, split=True):
    """Sizes of :func:`make_states_kernel_pipelined` beyond :func:`staged_geometry`.

    Shared memory (bytes): [region 0: φ hi (and lo), later the result tile][K tile]
    [V tile, stage 0][V tile, stage 1], each tile BK x SW 16-bit values; KB, VB the
    byte offsets of the K tile and of V stage 0.
    """
    G = staged_geometry(D, BK, tiles, out_bf16, split)
    tile_bytes = G["TILE"] * 2
    region0 = -(-max(G["PARTS"] * tile_bytes, (G["ZOFF"] + G["ZW"]) * 4) // 16) * 16
    return dict(G, KB=region0, VB=region0 + tile_bytes, smem_bytes=region0 + 3 * tile_bytes)


@kernel_factory
def make_states_kernel_pipelined(kind, D, BK, tiles, split=True, out_bf16=False, min_blocks=-1):
    """Build ``states_tc_pipelined(k, v, state, H, Nk, Mk, fm, nper)``: the staged
    kernel's work for key blocks j = x·nper .. x·nper + nper - 1 of CTA (x, h, b), grid
    (ceil(ceil(Nk / BK) / nper), H, B), with the next block's K and V in flight while
    the current block computes and stores. Same bits as :func:`make_states_kernel`.

    Per block j: wait for K_j (K tile) and V_j (V stage j & 1), one barrier; φ from the
    K tile into φ hi / lo, one barrier (the K tile is free); issue K_{j+1} into the K
    tile and V_{j+1} into the other V stage (16-byte cp.async, zero-filled past Nk);
    the mma loop (V from this stage); the staged epilogue (result tile over the φ
    tiles, 128-byte warp stores). The first block's copies are issued before the loop.
    The lane's thread index is re-read through an opaque ``mov`` each block: otherwise
    LLVM hoists every lane address out of the block loop (225 registers at D = 128;
    ``tools/check_tc_ptx.py``).
    k, v, state as for :func:`make_states_kernel_staged`.
    """
    WR, WC = tiles = _checked(kind, D, BK, tiles)
    G = pipelined_geometry(D, BK, tiles, out_bf16, split)
    NT, MT, NP, NN, L, C, RP, NPASS, SW, TILE, PARTS, LOG2L, KSTEPS = _pick(G, COMMON)
    OPASS, RPT, OW, OS, ZOFF, ZW, OPT, Q, TOT, CPT = _pick(G, STAGED)
    SPLIT, IS_F16, ONES_PAIR, OUT_BF16 = bool(split), kind == "f16", ONES[kind], bool(out_bf16)
    KBYTE, VBYTE = G["KB"], G["VB"]
    # launch bound (``min_blocks`` -1: the default below) for two 8-warp CTAs an SM. At
    # D = 128 (tools/check_tc_ptx.py): bf16 states 126 registers unbounded, 128 with 8
    # bytes of spills under the bound: none; fp32 states 140 unbounded (one CTA an SM),
    # 128 without spills under the bound: bound.
    if min_blocks == -1:
        min_blocks = 2 if NT >= 256 and not out_bf16 else None
    bounds, MINB = _bounds(NT, min_blocks)

    @_compat.kernel(fastmath=FASTMATH, **bounds)
    def states_tc_pipelined(k, v, state, H, Nk, Mk, fm, nper):
        _ = MINB  # the launch bound, in the disk-cache key
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)
        smemf = cuda.shared.array(0, float32, alignment=SMEM_ALIGN)
        acc = cuda.local.array((MT, NN, 4), float32)  # h and z fragments of a block
        z = cuda.local.array((MT, 1, 4), float32)
        tid0 = int32(cuda.threadIdx.x)
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        j0 = cuda.blockIdx.x * nper
        jend = min(j0 + nper, (Nk + BK - 1) // BK)
        hb = (b * H + h) * Nk  # the head's first key row
        # --- 0. the first block's K and V
        sa = smem_addr(smem)
        kb = (hb + j0 * BK) * D
        nr = min(Nk - j0 * BK, BK)
        _copy_block(smem, sa + KBYTE, k, kb, nr, tid0, NT, CPT, TOT, Q, D, SW)
        _copy_block(smem, sa + VBYTE, v, kb, nr, tid0, NT, CPT, TOT, Q, D, SW)
        cp_async_commit()
        for j in range(j0, jend):
            tid = opaque_i32(tid0)  # lane addresses computed anew each block
            lane, warp = tid & 31, tid >> 5
            stage = (j - j0) & 1
            r0 = j * BK
            nrows = min(Nk - r0, BK)
            cp_async_wait_group(0)  # this thread's pieces of K_j, V_j have landed
            cuda.syncthreads()  # everyone's; the previous result tile is copied out
            # --- 1. φ rows from the K tile
            _phi_rows(smem32, k, kb, KBYTE >> 2, nrows, tid, fm, True, SPLIT, IS_F16,
                      BK, D, L, C, LOG2L, RP, NPASS, SW)  # fmt: skip
            cuda.syncthreads()  # φ complete; the K tile is free
            # --- 2. the next block's K and V on their way
            if j + 1 < jend:
                kn = (hb + r0 + BK) * D
                nn = min(Nk - r0 - BK, BK)
                vn = sa + VBYTE + (1 - stage) * TILE * 2
                _copy_block(smem, sa + KBYTE, k, kn, nn, tid, NT, CPT, TOT, Q, D, SW)
                _copy_block(smem, vn, v, kn, nn, tid, NT, CPT, TOT, Q, D, SW)
                cp_async_commit()
            # --- 3. tensor cores (V from this stage)
            wr = warp // WC
            wc = warp - wr * WC
            vb = sa + VBYTE + stage * TILE * 2
            _block_products(acc, z, smem, sa, vb, lane, wr, wc, nrows,
                            MT, NP, PARTS, KSTEPS, SW, TILE, ONES_PAIR, IS_F16)  # fmt: skip
            # --- 4. the staged epilogue (result tile over the φ tiles)
            sb = ((b * H + h) * Mk + j) * (OW * D + ZW)
            _store_staged(state, smem, smem32, smemf, acc, z, sb, tid, lane, wr, wc,
                          MT, NP, D, NT, OPASS, RPT, OW, OS, ZOFF, ZW, OPT, OUT_BF16)  # fmt: skip

    return StatesKernel(states_tc_pipelined, G["smem_bytes"], NT)


_kernels = {}


#: The kernels of this module (``wgmma`` is ``tc/states_wgmma.py``'s, chosen by the launcher).
VARIANTS = tuple(v for v in config.STATES_KERNELS if v not in ("auto", "wgmma"))


def auto_variant(out_bf16):
    """``SLA_NUMBA_STATES_KERNEL=auto`` (the default) where the wgmma kernel does not apply
    (``launch_states_tc`` tries it first on compute capability 9.0): the staged kernel for
    bf16 states, the register kernel for fp32 states -- the faster of each on the H200 at
    the Wan2.1 shape (``tools/sweep_states.py``, BENCHMARKS.md session 8: bf16 0.404
    against 0.554 ms, fp32 0.606 against 0.561 ms). Under the simulator the register
    kernel (same bits; the staged and pipelined kernels have their own tests)."""
    return "staged" if out_bf16 and not SIMULATED else "registers"


def get_states_kernel(kind, D, BK, tiles=None, split=True, out_bf16=False, variant="registers"):
    """The :class:`StatesKernel` for (kind, D, BK, tiles or ``choose_tiles(D)``, split,
    out_bf16) of ``variant``: 'registers' (:func:`make_states_kernel`), 'staged'
    (:func:`make_states_kernel_staged`) or 'pipelined'
    (:func:`make_states_kernel_pipelined`)."""
    if variant not in VARIANTS:
        raise ValueError(f"states kernel variant {variant!r}: one of {VARIANTS}")
    tiles = choose_tiles(D) if tiles is None else Tiles(*tiles)
    key = (kind, int(D), int(BK), tiles, bool(split), bool(out_bf16), variant)
    kern = _kernels.get(key)
    if kern is None:
        make = {
            "registers": make_states_kernel,
            "staged": make_states_kernel_staged,
            "pipelined": make_states_kernel_pipelined,
        }[variant]
        kern = _kernels[key] = make(kind, int(D), int(BK), tiles, split, out_bf16)
    return kern


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------


def check_states_args(who, k_bits, v_bits, state, B, H, Nk, D, block_k, fm):
    """The checks of a key-block states launch (this module's and
    ``tc/states_wgmma.py``'s): a TypeError / ValueError naming ``who`` and the argument,
    else ``(k, v, Mk, n_blocks, out_bf16)`` (flat k and v, state blocks, blocks to
    compute, whether the state holds bf16 bits), or None when there is nothing to
    compute (no key block, B·H = 0)."""
    if fm not in (0, 1, 2):
        raise ValueError(f"{who}: feature map code {fm}")
    state_dtype = str(state.dtype).replace("torch.", "")
    if state_dtype not in ("float32", "int16"):
        raise TypeError(f"{who}: state must be float32 (or int16: bf16 bits)")
    W = D * D + D
    n_blocks = -(-Nk // block_k)
    if n_blocks <= 0 or B * H == 0:
        return None
    size = int(math.prod(state.shape))
    if state.ndim == 4:
        if tuple(int(s) for s in (state.shape[0], state.shape[1], state.shape[3])) != (B, H, W):
            raise ValueError(f"{who}: state shape is not (B, H, Mk, D*D + D)")
        Mk = int(state.shape[2])
    else:
        if size % (B * H * W):
            raise ValueError(f"{who}: state size is not B*H*Mk*(D*D + D)")
        Mk = size // (B * H * W)
    if Mk < n_blocks:
        raise ValueError(f"{who}: state has {Mk} blocks, {n_blocks} needed")
    k, v = flat(k_bits), flat(v_bits)
    if int(k.shape[0]) < B * H * Nk * D or int(v.shape[0]) < B * H * Nk * D:
        raise ValueError(f"{who}: k / v smaller than B*H*Nk*D")
    if H > 65535 or B > 65535:
        raise ValueError(f"{who}: H or B too large for the grid")
    return k, v, Mk, n_blocks, state_dtype == "int16"


def launch_states_tc(
    kind,
    k_bits,
    v_bits,
    state,
    B,
    H,
    Nk,
    D,
    block_k,
    fm,
    stream,
    tiles=None,
    split=True,
    variant=None,
    blocks_per_cta=None,
):
    """``state[b, h, j] = [vec(h_j), z_j]`` for j < ceil(Nk / block_k), on ``stream``.

    kind 'bf16' / 'f16'; k_bits, v_bits: int16 bits of (B, H, Nk, D) (any shape, flat
    views are taken); state: fp32 (B, H, Mk, D*D + D) or its flat view of B*H*Mk*W
    elements (Mk >= ceil(Nk / block_k)). Numba device arrays or torch / CuPy CUDA
    tensors (numpy arrays under the simulator).
    fm: 0 softmax, 1 elu + 1, 2 relu. ``tiles`` (WR, WC): None for ``choose_tiles``;
    ``split=False``: φ rounded to one half value (no lo part, half the mma).
    An int16 ``state`` receives bf16 bits (bf16 states: ``config.bf16_states``) instead of fp32.
    ``variant``: 'registers', 'staged' or 'pipelined' (same bits; module doc), 'auto'
    (:func:`auto_variant`) or 'wgmma' (``tc/states_wgmma.py``: compute capability 9.0,
    fp16 / bf16, D 64 / 128, block_k 64, aligned k, v and state; else 'auto'); None:
    ``config.states_kernel()`` (``SLA_NUMBA_STATES_KERNEL``). ``blocks_per_cta``: key
    blocks a CTA of the pipelined or wgmma kernel (default ``PIPE_BLOCKS``). The staged and
    pipelined kernels need k and v 16-byte aligned (cp.async) and an int16 state 4-byte
    aligned; otherwise the register kernel runs.
    """
    B, H, Nk, D, block_k, fm = (int(x) for x in (B, H, Nk, D, block_k, fm))
    if not states_tc_supported(D, block_k):
        raise ValueError(f"launch_states_tc: D = {D}, block_k = {block_k} not supported")
    checked = check_states_args("launch_states_tc", k_bits, v_bits, state, B, H, Nk, D,
                                block_k, fm)  # fmt: skip
    if checked is None:  # nothing to compute
        return
    k, v, Mk, n_blocks, out_bf16 = checked
    if variant is None:
        variant = config.states_kernel()
    if variant == "wgmma" or (variant == "auto" and not SIMULATED):
        # Hopper's kernel where it applies (auto too: 1.46x faster on the H200, session
        # 9; not under the simulator, whose suite keeps covering the kernels below), else
        # auto's choice among this module's kernels
        from . import states_wgmma as _wg

        if _wg.wgmma_states_unsupported_reason(kind, D, block_k) is None and _wg.aligned(
            k, v, state
        ):
            _wg.launch_states_wgmma(
                kind, k, v, state, B, H, Nk, D, block_k, fm, stream, split=split,
                blocks_per_cta=blocks_per_cta,
            )  # fmt: skip
            return
        variant = "auto"
    if variant == "auto":
        variant = auto_variant(out_bf16)
    if variant not in VARIANTS:
        raise ValueError(f"launch_states_tc: variant {variant!r}, one of {VARIANTS}")
    if variant != "registers":
        addrs = (address(k), address(v), address(state))
        if None in addrs or addrs[0] % 16 or addrs[1] % 16 or addrs[2] % 4:
            variant = "registers"
    kern = get_states_kernel(kind, D, block_k, tiles, split, out_bf16, variant)
    if variant == "registers":
        grid, args = (n_blocks, H, B), (k, v, flat(state), H, Nk, Mk, fm)
    else:  # 32-bit stores: a bf16 state as pairs of 16-bit values
        out = int32_pairs(state) if out_bf16 else flat(state)
        grid, args = (n_blocks, H, B), (k, v, out, H, Nk, Mk, fm)
        if variant == "pipelined":
            nper = PIPE_BLOCKS if blocks_per_cta is None else int(blocks_per_cta)
            if nper < 1:
                raise ValueError(f"launch_states_tc: blocks_per_cta = {nper}, must be >= 1")
            grid, args = (-(-n_blocks // nper), H, B), args + (nper,)
    _tc_build.launch(kern.kernel, grid, kern.threads, kern.smem_bytes, stream, args)
