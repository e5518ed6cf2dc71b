"""Tile pieces shared by the tensor-core sparse forward and backward kernels.

Everything here is a small ``@cuda.jit`` device function (inlined into the
kernel) or a factory of one for a fixed tile size. The kernels that use them
(``tc/forward.py``, ``tc/backward.py``) keep their accumulators in
``cuda.local.array`` s indexed only by loop counters of compile-time trip
counts (``for n in range(NTILE)`` with ``NTILE`` a closure constant): LLVM
unrolls those loops completely, every element becomes a register, and the PTX
has no ``.local`` memory (``tools/check_tc_ptx.py`` checks it).

Shared memory
-------------
Tiles are stored row-major as raw 16-bit values (``int16`` bits of fp16 / bf16),
rows padded to ``SD = D + 8`` halves: the 8 rows one ``ldmatrix`` phase reads
then start 16 bytes apart modulo 128 (a row is ``2*SD`` bytes = 16 mod 128):
they cover all 32 banks once, so fragment loads are conflict free.

Addresses
---------
``ldmatrix`` and the fast ``cp.async`` take a 32-bit *byte* address in the
shared window (``smem_addr(smem)`` is the address of ``smem[0]``; 0 under the
simulator, where the twins index ``smem`` by ``address // 2``). Each lane
computes its own base address once (``frag_rows_a`` / ``frag_rows_bt`` below)
and every load adds a constant (tile, k-step, n-pair: all unrolled loop
counters times closure constants) to it, so ptxas folds the constant into the
instruction's immediate offset (``LDSM ... [R12+0x1180]``).

Fragment layouts (``g = lane >> 2``, ``t = lane & 3``; see ``tc/ptx.py``)
-------------------------------------------------------------------------
An accumulator array ``acc[i, n, e]`` (fp32) holds, for m-tile ``i`` of 16
rows and n-tile ``n`` of 8 columns, element ``e`` of the lane's share of the
16 x 8 C tile: row ``g + 8*(e >> 1)``, column ``8n + 2t + (e & 1)``. An A
fragment array ``af[i, j]`` (int32, two halves each) holds the lane's four
registers of a 16 x 16 A tile.
"""

import collections
import functools

import numpy as np
from numba import int32

from .._compat import FASTMATH, SIMULATOR, device
from .ptx import (
    cp_async16,
    cp_async16i,
    cp_async_zfill,
    fmax,
    ldsm_x4,
    ldsm_x4_trans,
    mma_bf16,
    mma_f16,
    pack_bf16x2,
    pack_f16x2,
)

#: Fast-math flags of the tensor-core kernels: the backend's set plus ``nsz``
#: (no nnan / ninf: masking relies on -inf).
TC_FASTMATH = FASTMATH | {"nsz"}

#: ``alignment`` of the kernels' dynamic shared array: 16 bytes for cp.async and
#: ldmatrix (the simulator accepts only None).
SMEM_ALIGN = None if SIMULATOR else 16

#: A compiled-on-demand kernel with its launch shape: ``threads`` per CTA and
#: ``smem_bytes`` of dynamic shared memory (launch with ``build.launch``).
TCKernel = collections.namedtuple("TCKernel", "kernel threads smem_bytes")

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)


def smem_stride(D):
    """Padded shared-memory row stride, in halves, of a tile with ``D`` columns."""
    return D + 8


# ---------------------------------------------------------------------------
# ldmatrix: which row each lane points at
# ---------------------------------------------------------------------------


@device(forceinline=True)
def frag_rows_a(lane, sd):
    """Element offset, inside a 16 x 16 row-major tile, of the row start lane ``lane``
    hands to ``ldmatrix.x4``, for A fragments (and B fragments by ``.trans`` of a
    row-major [k x n] tile): lanes 0-7 rows 0-7 col 0, 8-15 rows 8-15 col 0,
    16-23 rows 0-7 col 8, 24-31 rows 8-15 col 8 (matrices a0, a1, a2, a3)."""
    return (((lane >> 3) & 1) * 8 + (lane & 7)) * sd + (lane >> 4) * 8


@device(forceinline=True)
def frag_rows_bt(lane, sd):
    """Same for B fragments of ``X^T`` by a non-transposed ``ldmatrix.x4`` of a
    row-major [n x k] tile X: lanes 0-7 rows 0-7 col 0, 8-15 rows 0-7 col 8
    (b0, b1 of n-tile 0), 16-23 rows 8-15 col 0, 24-31 rows 8-15 col 8 (n-tile 1)."""
    return ((lane >> 4) * 8 + (lane & 7)) * sd + ((lane >> 3) & 1) * 8


@device(forceinline=True)
def load_a(af, i, smem, addr):
    """``af[i, 0:4]`` = the A fragment of the 16 x 16 tile whose lane row starts at
    byte address ``addr``."""
    a0, a1, a2, a3 = ldsm_x4(smem, addr, 0)
    af[i, 0] = a0
    af[i, 1] = a1
    af[i, 2] = a2
    af[i, 3] = a3


# ---------------------------------------------------------------------------
# mma and pack, for one element kind
# ---------------------------------------------------------------------------


@functools.cache
def make_mma(kind):
    """Device functions for ``kind`` 'bf16' or 'f16': ``(mma_acc, pack_a)``.

    ``mma_acc(acc, i, n, af, j, b0, b1)``: ``acc[i, n, :] += A(af[j]) . B(b0, b1)``
    (one m16n8k16 tensor-core product into n-tile ``n`` of m-tile ``i``).
    ``pack_a(af, j, acc, i, kk)``: the C tiles ``2kk``, ``2kk + 1`` of m-tile ``i``
    rounded to 16 bits and packed as the A fragment ``af[j]`` of k-step ``kk``
    (the C layout of two adjacent n8 tiles *is* the A layout of one k16 step).
    """
    mma = mma_bf16 if kind == "bf16" else mma_f16
    pack = pack_bf16x2 if kind == "bf16" else pack_f16x2

    @device(forceinline=True)
    def mma_acc(acc, i, n, af, j, b0, b1):
        d0, d1, d2, d3 = mma(
            af[j, 0],
            af[j, 1],
            af[j, 2],
            af[j, 3],
            b0,
            b1,
            acc[i, n, 0],
            acc[i, n, 1],
            acc[i, n, 2],
            acc[i, n, 3],
        )
        acc[i, n, 0] = d0
        acc[i, n, 1] = d1
        acc[i, n, 2] = d2
        acc[i, n, 3] = d3

    @device(forceinline=True)
    def pack_a(af, j, acc, i, kk):
        af[j, 0] = pack(acc[i, 2 * kk, 0], acc[i, 2 * kk, 1])
        af[j, 1] = pack(acc[i, 2 * kk, 2], acc[i, 2 * kk, 3])
        af[j, 2] = pack(acc[i, 2 * kk + 1, 0], acc[i, 2 * kk + 1, 1])
        af[j, 3] = pack(acc[i, 2 * kk + 1, 2], acc[i, 2 * kk + 1, 3])

    return mma_acc, pack_a


@functools.cache
def make_warp_gemm(kind, SD, NTILES, KSTEPS, B_TRANS):
    """One warp's ``acc[0, 0:NTILES, :] += A . B``, A 16 x 16*KSTEPS, B 16*KSTEPS x 8*NTILES,
    B read from shared memory; returns ``(gemm_smem, gemm_regs)``.

    ``gemm_smem(acc, smem, a_addr, b_addr, af)``: A from a row-major tile in shared
    memory, lane row addresses ``a_addr`` (``frag_rows_a``), ``af`` (1, 4) scratch.
    ``gemm_regs(acc, af, smem, b_addr)``: A already packed, ``af[ks, 0:4]`` per k-step
    (e.g. ``pack_a`` of accumulators).

    B: ``B_TRANS`` False: ``B = X^T`` with X [8*NTILES x 16*KSTEPS] row-major, lane
    addresses ``b_addr`` by ``frag_rows_bt`` (non-transposed ldmatrix);
    ``B_TRANS`` True: ``B = X`` with X [16*KSTEPS x 8*NTILES] row-major, lane
    addresses by ``frag_rows_a`` (``ldmatrix.trans``). One ldmatrix.x4 = the B
    fragments of two n-tiles.
    """
    mma_acc, _ = make_mma(kind)
    load_b = ldsm_x4_trans if B_TRANS else ldsm_x4
    # byte offset of the 16 x 16 B block (k-step ks, n-tiles 2*np_ and 2*np_ + 1)
    K_STRIDE, N_STRIDE = (16 * SD * 2, 32) if B_TRANS else (32, 16 * SD * 2)

    @device(forceinline=True)
    def gemm_smem(acc, smem, a_addr, b_addr, af):
        for ks in range(KSTEPS):
            load_a(af, 0, smem, a_addr + ks * 32)
            for np_ in range(NTILES // 2):
                b0, b1, b2, b3 = load_b(smem, b_addr + ks * K_STRIDE + np_ * N_STRIDE, 0)
                mma_acc(acc, 0, 2 * np_, af, 0, b0, b1)
                mma_acc(acc, 0, 2 * np_ + 1, af, 0, b2, b3)

    @device(forceinline=True)
    def gemm_regs(acc, af, smem, b_addr):
        for ks in range(KSTEPS):
            for np_ in range(NTILES // 2):
                b0, b1, b2, b3 = load_b(smem, b_addr + ks * K_STRIDE + np_ * N_STRIDE, 0)
                mma_acc(acc, 0, 2 * np_, af, ks, b0, b1)
                mma_acc(acc, 0, 2 * np_ + 1, af, ks, b2, b3)

    return gemm_smem, gemm_regs


# ---------------------------------------------------------------------------
# Global -> shared tile copies (cp.async)
# ---------------------------------------------------------------------------


def _cp16_deferred(smem, soff, gmem, goff, nbytes):
    """Simulator only: ``cp_async16`` whose copy lands at the wait covering its group."""
    cp_async_zfill(smem, 2 * soff, 16, gmem, goff, nbytes)


def _cp16i_deferred(smem, saddr, simm, gmem, goff):
    """Simulator only: ``cp_async16i``, deferred likewise."""
    cp_async_zfill(smem, saddr + simm, 16, gmem, goff, 16)


@functools.cache
def make_tile_loader(D, nrows, NT, deferred=False):
    """``load(smem, sa, dst, src, base, row0, nvalid, tid)``: start the copy of rows
    ``row0 .. row0 + nrows`` of the (N, D) matrix at ``src[base:]`` into the padded
    tile at element offset ``dst`` of ``smem`` (``sa`` = ``smem_addr(smem)``), by
    all ``NT`` threads of the CTA with 16-byte ``cp.async`` (8 halves each).

    Rows ``>= nvalid`` (past the sequence's end) are zero-filled. The caller
    commits the group and waits for it (``cp_async_commit`` / ``cp_async_wait_all``
    and a barrier) before reading the tile.

    ``deferred`` (for kernels that keep copies in flight across their math): under the
    simulator, each copy lands only when a wait covers its group, as late as a GPU may
    land it (``ptx.cp_async_zfill``'s twin), so a wait on the wrong group count reads
    stale shared memory in the tests too. On a GPU the same instructions either way.
    """
    CPR = D // 8  # 16-byte chunks per row
    SD = smem_stride(D)
    RPP = NT // CPR if NT % CPR == 0 else 0  # rows the CTA copies in one pass
    cp16, cp16i = cp_async16, cp_async16i
    if deferred and SIMULATOR:
        cp16, cp16i = _cp16_deferred, _cp16i_deferred

    @device(forceinline=True)
    def load_slow(smem, dst, src, base, row0, nvalid, tid):
        # any tile: chunk idx -> (row rr, column cc); rows past nvalid read nothing
        for idx in range(tid, nrows * CPR, NT):
            rr = idx // CPR
            cc = (idx - rr * CPR) * 8
            ok = rr < nvalid
            gr = row0 + (rr if ok else 0)
            cp16(smem, dst + rr * SD + cc, src, base + gr * D + cc, 16 if ok else 0)

    if RPP == 0 or nrows % RPP:

        @device(forceinline=True)
        def load(smem, sa, dst, src, base, row0, nvalid, tid):
            load_slow(smem, dst, src, base, row0, nvalid, tid)

        return load

    PASSES = nrows // RPP

    @device(forceinline=True)
    def load(smem, sa, dst, src, base, row0, nvalid, tid):
        if nvalid >= nrows:
            # a full tile (all but a sequence's last): thread tid copies chunk
            # tid % CPR of rows tid // CPR + RPP*p, one straight-line cp.async a pass
            # (the thread's part of both addresses is written the same way at every
            # call site, so the compiler computes it once; tile offsets are constants)
            lr = tid // CPR
            lc = (tid - lr * CPR) * 8
            s_thread = int32(sa + (lr * SD + lc) * 2)
            g = base + row0 * D + (lr * D + lc)
            for p in range(PASSES):
                cp16i(smem, s_thread + (dst + p * RPP * SD) * 2, 0, src, g + p * RPP * D)
        else:
            load_slow(smem, dst, src, base, row0, nvalid, tid)

    return load


# ---------------------------------------------------------------------------
# Row reductions over the C-fragment columns a lane holds
# ---------------------------------------------------------------------------


@device(forceinline=True)
def fadd(a, b):
    return a + b


@device(forceinline=True)
def fill_rows(out, base, row0, rows, n, width, value, tid, nthreads):
    """``out[base + r*width + c] = value`` for the block's rows ``r`` in ``[row0, row0 +
    rows)`` that exist (``r < n``), every column ``c < width``, the CTA's ``nthreads``
    threads striding from ``tid``: the output of a query block with no critical key
    block (O or dQ = 0 with ``width = D``; lse = LSE_EMPTY with ``width = 1``)."""
    for idx in range(tid, rows * width, nthreads):
        r = row0 + idx // width
        if r < n:
            out[base + r * width + idx % width] = value


#: Output kinds of the kernels that write O (or O_l): fp32 values, or the input's
#: 16-bit type, rounded to nearest even and stored two to an int32.
OUT_KINDS = ("f32", "bf16", "f16")


@functools.cache
def make_pair_store(out_kind):
    """``store(o, i, x0, x1)``: an accumulator pair (columns ``i``, ``i + 1`` of an
    output row; ``i`` even) to memory.

    ``out_kind`` "f32": ``o`` is the float32 output, ``o[i] = x0``, ``o[i + 1] = x1``.
    "bf16" / "f16": ``o`` is the int32 view of a 16-bit output (two values an
    element), and the pair is rounded to nearest even and packed into ``o[i >> 1]``
    (``cvt.rn``), the low half holding column ``i``: the bits torch's
    ``.to(torch.bfloat16)`` (``float16``) of the fp32 value gives, written without
    the fp32 round trip through memory. Also ``zero``: the fill value of an empty row
    in ``o``'s element type (pass ``fill_rows`` the base and width halved for the
    16-bit kinds, :func:`out_elems`)."""
    if out_kind not in OUT_KINDS:
        raise ValueError(f"out_kind {out_kind!r}: one of {OUT_KINDS}")
    if out_kind == "f32":

        @device(forceinline=True)
        def store(o, i, x0, x1):
            o[i] = x0
            o[i + 1] = x1

        return store
    pack = pack_bf16x2 if out_kind == "bf16" else pack_f16x2

    @device(forceinline=True)
    def store_half(o, i, x0, x1):
        o[i >> 1] = pack(x0, x1)

    return store_half


def out_elems(out_kind, n):
    """Elements of ``o`` (float32 or int32 pairs) that hold ``n`` output values."""
    return n if out_kind == "f32" else n // 2


def out_kind_of(o, kind):
    """The ``out_kind`` of a launch from its output array: "f32" for a float32 ``o``,
    else (the int32 view of a 16-bit output) the inputs' ``kind``."""
    return "f32" if np.dtype(o.dtype) == np.float32 else kind


def out_zero(out_kind):
    """Zero in the element type of ``o`` (float32, or int32 for a pair of halves)."""
    return np.float32(0.0) if out_kind == "f32" else np.int32(0)


@functools.cache
def make_row_tree(op, ntiles):
    """``tree(s, i, r, n0)``: ``op`` over the lane's values of row half ``r`` (0: row
    g, 1: row g + 8) in n-tiles ``n0 .. n0 + ntiles`` of m-tile ``i`` of the
    accumulator ``s``, i.e. ``s[i, n, 2r]`` and ``s[i, n, 2r + 1]``, as a balanced
    tree (depth log2(2 * ntiles) instead of a chain of 2 * ntiles). ``op``:
    ``fmax`` or ``fadd``; ``ntiles`` a power of two."""
    if ntiles == 1:

        @device(forceinline=True)
        def leaf(s, i, r, n0):
            return op(s[i, n0, 2 * r], s[i, n0, 2 * r + 1])

        return leaf
    half = make_row_tree(op, ntiles // 2)
    H = ntiles // 2

    @device(forceinline=True)
    def node(s, i, r, n0):
        return op(half(s, i, r, n0), half(s, i, r, n0 + H))

    return node


def row_max_tree(ntiles):
    """Balanced ``fmax`` tree over a lane's ``2 * ntiles`` values of one row."""
    return make_row_tree(fmax, ntiles)


def row_sum_tree(ntiles):
    """Balanced sum over a lane's ``2 * ntiles`` values of one row."""
    return make_row_tree(fadd, ntiles)
