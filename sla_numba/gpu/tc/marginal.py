"""The linear branch's marginal sums ``out = M · S`` on tensor cores (bf16 ``mma.sync``).

Same operation and interface as ``_marginal.launch_marginal_sum`` (read its module
doc first)::

    out[b, h, r, :] = Σ_c  M[r, c] · S[b, h, c, :]      r < n_out, c < n_in
    M[r, c] = (bmap[b, h, r, c] == 0)                    transposed = False (row sums)
    M[r, c] = (bmap[b, h, c, r] == 0)                    transposed = True  (column sums)

bmap int8 (B, H, Mq, Mk); S = states fp32 (B, H, >= n_in, W); out fp32
(B, H, >= n_out, W). Every ``out[b, h, r, w]`` with r < n_out, w < W is written
(a row without marginal blocks gets exactly 0); nothing else is touched.

Precision: two bf16 products per tile
--------------------------------------
``mma.sync.m16n8k16`` multiplies bf16 operands and accumulates in fp32. M is 0 or 1,
exact in bf16 (1.0 = 0x3F80). S is fp32 (24-bit significand): each value is split as

    hi = bf16(s)            lo = bf16(s - hi)            (round to nearest, both)

bf16 keeps 8 significant bits, so ``|s - hi| <= 2^-8 |s|`` (exact in fp32) and
``|s - hi - lo| <= 2^-8 |s - hi| <= 2^-16 |s|``: ``M·hi + M·lo`` (two mma per tile into
the same fp32 accumulator) carries ~16 significant bits per term. Bound per output:
``|out - M·S| <= (2^-16 + 2·ceil(n_in/16)·2^-23) · (M·|S|)``; measured ~6e-6 · (M·|S|)
(tests/gpu/tc/test_tc_marginal.py; the brief asked for <= 1e-4 against fp32).

bf16 states (int16 bits; the default for bf16 inputs, ``SLA_NUMBA_STATES``): S is
already exact in bf16, so there is nothing to split: each thread loads its column pair
as one int32, stores it as is, and each tile takes one product (``make_marginal_kernel(tiles, s_bf16=True)``: 16 mma and 6
ldmatrix a k-step instead of 32 and 10). The error left is the fp32 accumulation's,
``2·ceil(n_in/16)·2^-23 · (M·|S|)`` against the bf16 values; the rounding of the states
to bf16 (2^-9) happened in the states kernel (``tests/gpu/tc/test_tc_bf16_states.py``).

Where the split happens: while staging. Each k-step, the threads load a 16 x WT fp32
tile of S from global memory into registers, split every value pair into a hi pair
and a lo pair (``pack_bf16x2``, and ``bf16_low_f32`` / ``bf16_high_f32`` to subtract)
and store both as bf16 tiles in shared memory. A pre-pass kernel writing hi / lo
copies of S would add a launch and a workspace (the interface has none) and move
S through global memory once more (406 MB at the Wan2.1 shape), to save a few ALU
ops per value that run while the loads of the next k-step are in flight.

Work decomposition (``TILES`` = (WR, WC, MT, NP))
------------------------------------------------
One CTA computes RT x WT outputs, RT = WR·16·MT rows (r), WT = WC·16·NP columns (w),
with WR x WC warps; each warp owns a 16·MT x 16·NP block = MT m16 tiles x 2·NP n8
tiles, ``4·MT·2·NP`` fp32 accumulators per lane. The GPU default (2, 2, 2, 4):
4 warps as 2 x 2, CTA 64 x 128, warp 32 x 64, 64 accumulators per lane. (One warp per
16 rows x 128 columns would hold as many accumulators but use every S fragment for
one m-tile only: twice the ldmatrix traffic per mma.)

Fragment ownership (``ptx`` doc; g = lane >> 2, t = lane & 3): lane (g, t) of warp
(wr, wc) holds ``acc[mt, n] = out[r, w : w + 2]`` (elements 0, 1) and row r + 8
(elements 2, 3), r = r0 + wr·16·MT + 16·mt + g, w = w0 + wc·16·NP + 8·n + 2t.

Grid: (ceil(n_out / RT), ceil(W / WT), B*H). Row tiles vary fastest, so the CTAs
that read the same column panel of S run at about the same time and S comes from
DRAM about once (L2 serves the other row tiles).

Shared memory, two stages of ``[S hi: 16 x (WT+8)][S lo: 16 x (WT+8)][M: RT x 24]``
bf16, all row-major with 8 bf16 of padding per row (ldmatrix then reads 8 rows in
8 different bank groups): 23.5 KiB for the GPU tiles.

Per k-step (16 values of c):

1. store: the S values and map bytes prefetched into registers (step 2 of the
   previous iteration) go to stage ``it & 1``: S split into hi / lo as above, M as
   bf16 pairs (0x3F80 where ``bmap == 0``, else 0);
2. ``syncthreads``, then prefetch the next k-step's S values and map bytes into
   registers: global loads in flight during the mma below;
3. per warp: the A fragments of its m-tiles with ``ldmatrix.x4`` from the M tile
   (a0 = M[g, 2t:2t+2], a1 = M[g+8, ..], a2 = M[g, 2t+8:..], a3 = M[g+8, 2t+8:..],
   see ``ptx``); per pair of n8 tiles, ``ldmatrix.x4.trans`` of the hi tile and of
   the lo tile give the B fragments (k = c, n = w) of both; then 4 mma per m-tile.

Two stages and one barrier per step: a warp writing stage s in step i + 1 has passed
the barrier of step i, which every warp reaches only after its mma of step i - 1
(the last reader of stage s). Loads past n_in / n_out / W are masked: S rows c >= n_in
are zeros in shared memory (so even NaN there never reaches an accumulator), map
entries outside the n_out x n_in window count as not marginal.

Why M goes through shared memory: building the A fragments in registers straight from
the int8 map (each lane loading its own 8 bytes per m-tile) needs 16 map bytes per
lane per k-step, held across the mma block: 184 registers (2 CTAs per SM) against
168 (3 CTAs per SM) for this version, where a CTA loads its RT x 16 map bytes once
(8 per thread) and each warp gets its fragments with one ldmatrix per m-tile.

Determinism: no atomics; every output is one lane's fixed sequence of mma.

How the kernel is written
-------------------------
``make_marginal_kernel(tiles)`` is an ordinary ``@cuda.jit`` closure factory: the tile
sizes are closure constants, the accumulators ``acc[mt, n, e]`` (D fragment element e
of m-tile mt, n8 tile n), the A fragments and the prefetched values are
``cuda.local.array`` indexed only by loop counters of constant trip count. LLVM
unrolls those loops completely, every index becomes a constant and the arrays
become registers (``tools/check_tc_ptx.py`` checks: no ``.local`` in the PTX, and
the mma / ldmatrix counts of one k-step). The k-loop stays a loop. ldmatrix
addresses are one per-lane base (``la`` / ``lb``, plus the stage) and compile-time
constant byte offsets, which ptxas folds into the instruction's immediate. Under
the CUDA simulator the ``ptx`` twins run the same function (slowly: keep shapes
and tiles tiny there, ``SIM_TILES``).

The pipelined kernel (bf16 states, ``SLA_NUMBA_MARGINAL=pipelined``)
-------------------------------------------------------------------
Why. On an H200 at the Wan2.1 sizes (B*H = 12, Mq = Mk = 512, W = 16512) the bf16-states
kernel above takes 1.13 ms where cuBLAS does the same bf16 product in 0.195 ms, and no
tile shape changes that: the kernel is latency-bound. Each k-step of 16 c-values ends in
a barrier, and the only loads in flight while a warp runs its 16 mma are those of the
next k-step (global -> registers -> ``st.shared``): a few hundred cycles of tensor work
to hide a global load's latency (L2 ~300 cycles, DRAM more), with 3 CTAs (12 warps) per
SM at 167 registers. The warps spend most of the time waiting at the barrier for the
slowest load.

What. ``make_marginal_kernel_pipelined(tiles, kb, stages, chunk)`` keeps the work
decomposition, the fragments and the epilogue of the kernel above and changes how S
gets into shared memory and how often the CTA meets at a barrier:

- S goes global -> shared with ``cp.async`` (``ptx.cp_async_zfill``): no registers hold
  it, and a thread can have several stages in flight. Each thread copies chunks of
  ``chunk`` bytes (16: 8 bf16) at one column position, rows ``srow + RPP·p``. A chunk
  past W or in a row c >= n_in is issued with source size 0: the hardware reads nothing
  and writes zeros (so padded rows and columns multiply as 0, as above). cp.async
  needs ``chunk``-aligned addresses on both sides; a row of S starts at byte
  ``2·W·row``, so the launcher takes the largest of 16 / 8 / 4 that divides ``2·W``
  and the array's address (W even: 4 always does). As ``chunk / 2`` then divides W, no
  chunk straddles W: each is wholly inside or wholly zero-filled.
- A stage holds ``kb`` c-values (default 32: 2 k-steps) of S, ``kb x (WT + 8)`` bf16, in
  a ring of ``stages`` (default 3) such slots. Stage j goes to slot ``j % stages``;
  ``stages - 1`` stages are issued before the loop, and iteration ``it`` issues stage
  ``it + stages - 1``, so while the warps multiply stage it, up to ``stages - 1``
  later stages are on their way.
- One barrier per stage, i.e. per ``kb / 16`` k-steps. Each thread commits one
  cp.async group per stage (an empty one past n_in, so the count stays regular); at
  the top of iteration it, ``cp.async.wait_group(stages - 2)`` waits until at most the
  ``stages - 2`` newest groups are still in flight: this thread's copies of stage it
  have landed. The ``syncthreads`` after it makes everyone's copies visible, and it
  also proves that every warp has finished the mma of iteration it - 1, the last
  reader of slot ``(it - 1) % stages``, which is the slot stage ``it + stages - 1`` is
  then issued into.
- The map M keeps the register path of the kernel above (its bytes need no alignment
  and they are a fifth of S's bytes): the map bytes of stage it + 1 are loaded into
  registers after the barrier of iteration it and stored, as bf16 0 / 1 pairs, into
  one of two M buffers (``RT x (kb + 8)`` bf16) at the top of iteration it + 1, before
  its barrier: one stage of mma (``kb / 16`` k-steps) hides their latency. Buffer
  ``(it + 1) & 1`` was last read in iteration it - 1, before the barrier of it. (If
  the map's loads turn out to stall on a GPU, the next step is to stage its raw bytes
  with 4-byte cp.async where Mk % 4 == 0.)

Per iteration it::

    store the map bytes of stage it (registers) -> M buffer it & 1
    cp.async.wait_group(stages - 2); syncthreads
    issue stage it + stages - 1 -> slot (it - 1) % stages; commit
    load the map bytes of stage it + 1 -> registers
    for each of the kb / 16 k-steps (those with c < n_in): ldmatrix + mma as above

Same bits: every accumulator receives one mma per k-step, k-steps in ascending c, with
the same operands (zeros outside the window) as in the register kernel; k-steps of
the last stage that lie wholly past n_in are skipped, so the mma sequences are equal,
not just equal up to adding zeros (``tests/gpu/tc/test_tc_marginal_pipelined.py``
compares the bits). Shared memory for the GPU tiles: (3 x 32 x 136 + 2 x 64 x 40) bf16
= 35.5 KiB (above 48 KiB the launcher opts in). Under the simulator the cp.async twin
is deferred (``ptx``): a copy lands only at the wait that covers it, so reading a
stage before its wait, or waiting on the wrong group count, gives wrong bits there too.

v2: the map and the results off the L1/TEX pipe (``SLA_NUMBA_MARGINAL=pipelined_v2``)
--------------------------------------------------------------------------------
Why. At the Wan2.1 sizes the pipelined kernel takes 0.80 ms where cuBLAS takes 0.18-0.20
(H200, session 9), and a wgmma rewrite was no faster: the tensor-core instruction is not
the limit. Nsight Compute (``tools/ncu_marginal.py``) names the busiest unit: L1/TEX at
69.6 % of its peak (L2 51.8 %, SM compute 37.6 %, L1 hit rate 47.7 %, 10.2 cycles per
issued instruction, 2 CTAs per SM). Two streams of small accesses go through that pipe
besides the ``cp.async`` of S: the map, one byte per load (8 loads per thread and stage
for the GPU tiles), and the epilogue, 64 scalar fp32 stores per thread, each warp
instruction touching 8 rows.

What. Two opt-in variants of the same kernel (``make_marginal_kernel_pipelined(...,
map_load, out_store)``; the launcher's ``v2``), each where the data allow it:

- Map words (``map_load`` "rows" / "cols"; Mk % 4 == 0 and a 4-byte aligned map). The
  kernel reads the map through its int32 view. Row sums: word q = tid + NT·p of a stage
  is row q // (kb/4), c-values 4(q % (kb/4)) .. + 3: one load, two bf16 pairs (2 loads
  per thread and stage instead of 8; consecutive threads read consecutive words of a
  row). Column sums (M[r, c] = bmap[c, r]): a word holds 4 consecutive *rows* r at one c,
  so each thread loads two words, at c and c + 1, and byte j of the two gives the pair
  (M[r + j, c], M[r + j, c + 1]): the transposition happens in registers, 4 int32 stores
  into the M buffer (no bank conflicts: consecutive threads take consecutive c pairs).
  Bytes past n_in / n_out are set to 1 (not marginal) after the load; words wholly
  outside are not loaded. Why not a pre-pass kernel writing the map transposed (or as a
  bf16 0/1 matrix for ``cp.async``): it needs a workspace the interface does not have
  (3 MB at the Wan2.1 sizes, 6 MB as bf16) and a second launch per call, and the
  register transposition above already cuts the column sums' map loads by the same
  factor as the row sums'. (Its global loads each touch 16 bmap rows, 8 bytes each: if
  ncu shows them as the limit, the pre-pass is the next step.)
- Staged epilogue (``out_store`` 4 / 1). After the k-loop, ``cp.async.wait_group(0)`` and
  a barrier free the ring; then per m-tile each warp writes its fp32 fragments into a
  (WR·16) x (WT + 8) buffer over the ring (8-byte ``st.shared.v2``; the pad of 8 keeps a
  half-warp's stores in 32 distinct banks), a barrier, and the CTA stores the buffer along
  w: each thread 4 consecutive columns with one 16-byte ``st.global.v4`` (W % 4 == 0
  and a 16-byte aligned ``out``; else one column, consecutive threads on consecutive
  columns), rows < n_out and columns < W only; a barrier before the next m-tile. The
  buffer (33 KiB for the GPU tiles) fits in the ring (59.5 KiB): shared memory and
  occupancy unchanged; registers 126 / 120 (rows / cols) against 126, no spills
  (``tools/check_tc_ptx.py --only marginal_v2``).

Same bits: the M buffer holds the same bf16 values (the bytes only arrive differently)
and the accumulators are the same fragments of the same mma sequence (the epilogue only
moves them), so every output has the bits of the present kernel
(``tests/gpu/tc/test_tc_marginal_v2.py``). Not yet measured on a GPU:
``tools/sweep_marginal.py --v2`` times present vs each variant vs cuBLAS.

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``)::

    import numpy as np
    from sla_numba.gpu.tc.marginal import launch_marginal_sum_tc
    bmap = np.array([[[[0, 1], [0, 0]]]], np.int8)            # (B, H, Mq, Mk) = (1, 1, 2, 2)
    states = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)  # (B, H, Mk, W)
    out = np.empty((1, 1, 2, 3), np.float32)
    launch_marginal_sum_tc(0, bmap, False, 2, 2, states, out)
    # out[0, 0] = [[0, 1, 2], [3, 5, 7]]: row 0 sums state 0, row 1 states 0 and 1
"""

from collections import namedtuple

import numpy as np
from numba import cuda, float32, int16, int32, int64, uint64

from ... import config
from .. import _compat
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import address, dtype_name, flat, int32_pairs
from .ptx import (
    SIMULATED,
    bf16_high_f32,
    bf16_low_f32,
    cp_async_commit,
    cp_async_wait_group,
    cp_async_zfill,
    lds_v4_f32,
    ldsm_x4,
    ldsm_x4_trans,
    mma_bf16,
    pack_bf16x2,
    smem_addr,
    stg_v4_f32,
    sts_v2_f32,
)

Tiles = namedtuple("Tiles", "WR WC MT NP")

#: GPU default: 4 warps (2 x 2), CTA 64 rows x 128 columns, warp 32 x 64.
GPU_TILES = Tiles(2, 2, 2, 4)
#: Simulator default: 1 warp, CTA 16 x 16 (each warp-wide op costs ~10-50 ms there).
SIM_TILES = Tiles(1, 1, 1, 1)
TILES = SIM_TILES if SIMULATED else GPU_TILES
#: The pipelined kernel's GPU default: 8 warps (2 x 4), CTA 64 x 256 (the fastest of
#: nine shapes timed on the H200 at the Wan2.1 sizes, BENCHMARKS.md).
GPU_PIPE_TILES = Tiles(2, 4, 2, 4)
PIPE_TILES = SIM_TILES if SIMULATED else GPU_PIPE_TILES

KSTEP = 16  # c values per k-step (the mma's k)
PAD = 8  # bf16 pad per shared-memory row

ZERO = np.float32(0.0)
ZI = np.int32(0)
BF16_ONE_LO = np.int32(0x3F80)  # bf16 1.0 in the low half of a pair
BF16_ONE_HI = np.int32(0x3F800000)  # ... in the high half
NOT_MARGINAL = np.int32(1)  # a map value that is not 0
u64 = uint64  # unsigned indices: no wraparound checks
#: Device helpers are inlined into the kernel (the simulator takes no such option).
_INLINE = {} if SIMULATED else {"forceinline": True}


# ---------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------


def tc_marginal_unsupported_reason(states_dtype, device=None):
    """None when ``launch_marginal_sum_tc`` takes states of ``states_dtype``, else why not.

    Only fp32 states (the float64 path stays on the SIMT kernel: a bf16 split would not
    keep float64 precision), on compute capability >= 8.0 (``device``: None for the
    current device, or its index).
    """
    if np.dtype(states_dtype) != np.float32:
        return (
            f"states dtype {np.dtype(states_dtype).name} (tensor-core marginal sum: float32 only)"
        )
    if not _tc_build.device_ok(device):
        return "no CUDA device of compute capability >= 8.0"
    return None


def tc_marginal_supported(states_dtype, device=None):
    """True when the tensor-core marginal sum handles these states (see the reason above)."""
    return tc_marginal_unsupported_reason(states_dtype, device) is None


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------


def geometry(tiles):
    """Derived sizes of a tile configuration (a dict; all in elements unless *_BYTES)."""
    WR, WC, MT, NP = tiles
    RT, WT = WR * 16 * MT, WC * 16 * NP  # CTA tile: rows x columns
    NT = 32 * WR * WC  # threads
    SW = WT + PAD  # S tile row stride (bf16)
    MW = KSTEP + PAD  # M tile row stride (bf16)
    HP = WT // 2  # S column pairs per row
    NW, RG = NT // 32, RT // 8  # warps; 8-row groups of the M tile
    NMP = 2 * RG // NW  # M staging passes (8 x 8 units per warp)
    if NT % HP or KSTEP % (NT // HP) or (2 * RG) % NW or (RG % NMP and NMP % RG):
        raise ValueError(
            f"tiles {tuple(tiles)}: the staging needs threads % (WT/2) == 0, "
            f"16 % (threads / (WT/2)) == 0, (RT/4) % warps == 0 and one of "
            f"RT/8, (RT/4)/warps dividing the other"
        )
    RPP = NT // HP  # S rows staged per pass
    TILE = KSTEP * SW  # one S tile (hi or lo)
    STAGE = 2 * TILE + RT * MW  # hi, lo, M
    return dict(
        RT=RT,
        WT=WT,
        NT=NT,
        SW=SW,
        MW=MW,
        HP=HP,
        RPP=RPP,
        NPASS=KSTEP // RPP,
        NMP=NMP,
        RG=RG,
        TILE=TILE,
        STAGE=STAGE,
        SMEM_BYTES=2 * STAGE * 2,
    )


def ops_per_kstep(tiles):
    """(mma, ldmatrix) one CTA warp issues per k-step: MT·2NP·2 mma (hi and lo), MT A
    loads + 2·NP B loads (hi and lo). ``tools/check_tc_ptx.py`` counts them in the PTX."""
    WR, WC, MT, NP = tiles
    return MT * 2 * NP * 2, MT + 2 * NP


#: The compiled kernel of one tile configuration and its launch sizes.
MarginalKernel = namedtuple("MarginalKernel", "kernel smem_bytes threads")


# Device helpers live at module level, not in the factory: the kernel reaches them as
# globals, so they are not part of its closure, whose pickle keys Numba's disk cache
# (a pickled device function would carry the intrinsics' per-process random uuids, and
# the cache would never hit). Their loop bounds are arguments, constants once inlined.


@_compat.device(**_INLINE)
def _mma_tile(acc, af, mt, n, b0, b1):
    """acc[mt, n] += A(af[mt]) · B(b0, b1): one mma.sync into the D fragment."""
    acc[mt, n, 0], acc[mt, n, 1], acc[mt, n, 2], acc[mt, n, 3] = mma_bf16(
        af[mt, 0],
        af[mt, 1],
        af[mt, 2],
        af[mt, 3],
        b0,
        b1,
        acc[mt, n, 0],
        acc[mt, n, 1],
        acc[mt, n, 2],
        acc[mt, n, 3],
    )


@_compat.device(**_INLINE)
def _prefetch_states(xs, states, cn, W, s_lane, srow, sok0, sok1, n_in, npass, rpp):
    """Load k-step ``cn``'s fp32 S values into xs (zero past n_in / W)."""
    # S rows cn + srow + rpp*p, columns sw, sw + 1
    gs = s_lane + cn * W
    for p in range(npass):
        ok = cn + srow + p * rpp < n_in
        xs[p, 0] = states[u64(gs)] if ok and sok0 else ZERO
        xs[p, 1] = states[u64(gs + 1)] if ok and sok1 else ZERO
        gs += rpp * W


@_compat.device(**_INLINE)
def _prefetch_map(ys, bmap, cn, n_in, n_out, mo, mr, mc, r0, rs, cs, nmp, rg):
    """Load k-step ``cn``'s map bytes into ys (not marginal outside the n_out x n_in
    window)."""
    # M[mr + 8i, mc + 8j], M[.., mc + 8j + 1] with (i, j) = (p % rg, p // rg)
    gm = mo + cn * cs
    for p in range(nmp):
        i = p % rg
        j = p // rg
        mv = r0 + mr + 8 * i < n_out
        off = gm + i * 8 * rs + j * 8 * cs
        ok0 = mv and cn + mc + 8 * j < n_in
        ok1 = mv and cn + mc + 8 * j + 1 < n_in
        ys[p, 0] = int32(bmap[u64(off)]) if ok0 else NOT_MARGINAL
        ys[p, 1] = int32(bmap[u64(off + cs)]) if ok1 else NOT_MARGINAL


@_compat.device(**_INLINE)
def _prefetch_pairs(xp, states32, cn, W, s_lane, srow, sok0, n_in, npass, rpp):
    """bf16 states: load k-step ``cn``'s S value pairs (one int32 each, zero past n_in /
    W) into xp. W is even, so a lane's pair (sw, sw + 1) is one aligned int32."""
    gs = s_lane + cn * W
    for p in range(npass):
        ok = cn + srow + p * rpp < n_in
        xp[p] = states32[u64(gs >> 1)] if ok and sok0 else ZI
        gs += rpp * W


@_compat.device(**_INLINE)
def _store_map(smem32, ys, sm, mw, nmp, rg):
    """The prefetched map bytes ``ys`` as bf16 pairs into the M tile (row stride ``mw``
    bf16; this lane's int32 index ``sm`` for pass 0): 1.0 where marginal (``bmap ==
    0``), else 0. Pass p covers rows + 8·(p % rg), columns + 8·(p // rg)."""
    for p in range(nmp):
        off = (8 * (p % rg) * mw + 8 * (p // rg)) // 2
        smem32[sm + off] = int32(
            (BF16_ONE_LO if ys[p, 0] == 0 else ZI) | (BF16_ONE_HI if ys[p, 1] == 0 else ZI)
        )


@_compat.device(**_INLINE)
def _load_a(af, smem, la, a_step, mt_n):
    """The A fragments (M) of the warp's ``mt_n`` m-tiles for one k-step: one
    ``ldmatrix.x4`` each, from byte address ``la`` + mt·``a_step``."""
    for mt in range(mt_n):
        a0, a1, a2, a3 = ldsm_x4(smem, la + mt * a_step, 0)
        af[mt, 0] = a0
        af[mt, 1] = a1
        af[mt, 2] = a2
        af[mt, 3] = a3


@_compat.device(**_INLINE)
def _store_out(out, acc, lane, r0, rw, w0, wcol, bh, o_rows, W, n_out, mt_n, nn):
    """Epilogue: the warp's D fragments to ``out`` (rows r < n_out, columns < W). Lane
    (g, t) holds rows g, g + 8 of each m-tile x columns 8n + 2t, 8n + 2t + 1; the warp's
    first row is r0 + rw, its first column w0 + wcol (CTA origin + warp offset)."""
    g = lane >> 2
    t2 = (lane & 3) * 2
    wl = W - (w0 + wcol + t2)  # columns left from this lane's first
    for mt in range(mt_n):
        for h in range(2):
            r = r0 + rw + 16 * mt + 8 * h + g
            if r < n_out:
                ob = (bh * o_rows + r) * W + w0 + wcol + t2
                for n in range(nn):
                    for x in range(2):
                        if 8 * n + x < wl:
                            out[u64(ob + 8 * n + x)] = acc[mt, n, 2 * h + x]


@kernel_factory
def make_marginal_kernel(tiles=GPU_TILES, s_bf16=False):
    """Build the kernel ``marginal_sum_tc`` for ``tiles`` (see the module doc).

    ``marginal_sum_tc(bmap, m_size, rs, cs, n_out, n_in, states, s_rows, out, o_rows, W)``:
    flat arrays bmap int8 (B*H*m_size), states fp32 (B*H, s_rows, W) (``s_bf16``: bf16
    bits as int32 pairs, W even: one product per tile, no split), out fp32
    (B*H, o_rows, W); ``out[bh, r, w] = Σ_c M[r, c] states[bh, c, w]`` for r < n_out,
    c < n_in, w < W, with ``M[r, c] = (bmap[bh*m_size + r*rs + c*cs] == 0)``.
    Grid (ceil(n_out / RT), ceil(W / WT), B*H), ``threads`` threads, ``smem_bytes`` of
    dynamic shared memory. Returns a :class:`MarginalKernel`.
    """
    tiles = Tiles(*tiles)
    WR, WC, MT, NP = tiles
    G = geometry(tiles)
    RT, WT, NT, SW, MW, HP, RPP = (G[k] for k in ("RT", "WT", "NT", "SW", "MW", "HP", "RPP"))
    NPASS, NMP, RG, TILE, STAGE = (G[k] for k in ("NPASS", "NMP", "RG", "TILE", "STAGE"))
    NN = 2 * NP  # n8 tiles of a warp
    MOFF = 2 * TILE  # M tile offset in a stage (bf16)
    A_STEP = 16 * MW * 2  # bytes between a warp's m-tiles (M tile)
    LO_BYTES = TILE * 2  # bytes from the hi to the lo S tile
    STAGE32, STAGE_BYTES = STAGE // 2, STAGE * 2
    PASS32 = RPP * SW // 2  # int32 between two staging passes
    TILE32 = TILE // 2
    ALIGNED = not SIMULATED  # the simulator rejects alignment=
    S_BF16 = bool(s_bf16)

    @_compat.kernel()
    def marginal_sum_tc(bmap, m_size, rs, cs, n_out, n_in, states, s_rows, out, o_rows, W):
        # two views of the dynamic shared memory (they alias): bf16 bits for ldmatrix,
        # int32 to store packed pairs. 2 stages of [S hi: 16 x SW][S lo: 16 x SW]
        # [M: RT x MW] (bf16, row-major)
        if ALIGNED:
            smem = cuda.shared.array(0, int16, alignment=16)
            smem32 = cuda.shared.array(0, int32, alignment=16)
        else:
            smem = cuda.shared.array(0, int16)
            smem32 = cuda.shared.array(0, int32)
        acc = cuda.local.array((MT, NN, 4), float32)  # D fragments
        af = cuda.local.array((MT, 4), int32)  # A fragments of a k-step
        xs = cuda.local.array((NPASS, 2), float32)  # prefetched S pairs (fp32 states)
        xp = cuda.local.array(NPASS, int32)  # prefetched S pairs (bf16 states)
        ys = cuda.local.array((NMP, 2), int32)  # prefetched map bytes
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        wr = warp // WC
        wc = warp - wr * WC
        r0 = cuda.blockIdx.x * RT
        w0 = cuda.blockIdx.y * WT
        bh = cuda.blockIdx.z
        # --- S staging role: column pair (sw, sw + 1), rows srow + RPP*p of each k-step
        srow = tid // HP
        sc = (tid - srow * HP) * 2
        sw = w0 + sc
        sok0 = sw < W
        sok1 = sw + 1 < W
        s_lane = (bh * s_rows + srow) * W + sw  # global offset of (c = srow, sw); int64
        st_lane = (srow * SW + sc) >> 1  # int32 index in the hi tile
        # --- M staging role: the RT x 16 tile is (RT/8) x 2 units of 8 rows x 8 columns;
        # warp w stages units w*NMP .. (row group first). In a unit, lane (i, j) =
        # (lane & 7, lane >> 3) takes the pair M[i, 2j], M[i, 2j + 1]: 8 consecutive bytes
        # of a bmap row either way (row or column sums), 32 int32 stores in 32 banks.
        # Pass p covers rows mr + 8*(p % RG), columns mc + 8*(p // RG).
        u = warp * NMP
        mr = (u % RG) * 8 + (lane & 7)
        mc = (u // RG) * 8 + (lane >> 3) * 2
        mo = bh * m_size + (r0 + mr) * rs + mc * cs  # bmap offset of M[mr, mc] at c = 0
        ms = (mr * MW + mc + MOFF) >> 1  # int32 index in the M tile
        # --- fragment roles (see ptx): ldmatrix.x4 row addresses of this lane. Matrix
        # i = lane >> 3 covers rows 8*(i & 1).. and columns 8*(i >> 1).. of a 16 x 16 block:
        # A (M, [r][c], non-transposed load) and B (S, [c][w], transposed load).
        fr = (lane & 7) + ((lane >> 3) & 1) * 8
        fc = (lane >> 4) * 8
        sa = smem_addr(smem)
        la = sa + (MOFF + (wr * 16 * MT + fr) * MW + fc) * 2
        lb = sa + (fr * SW + wc * 16 * NP + fc) * 2
        for mt in range(MT):
            for n in range(NN):
                for e in range(4):
                    acc[mt, n, e] = ZERO
        nk = (n_in + 15) // 16
        if S_BF16:
            _prefetch_pairs(xp, states, 0, W, s_lane, srow, sok0, n_in, NPASS, RPP)
        else:
            _prefetch_states(xs, states, 0, W, s_lane, srow, sok0, sok1, n_in, NPASS, RPP)
        _prefetch_map(ys, bmap, 0, n_in, n_out, mo, mr, mc, r0, rs, cs, NMP, RG)
        for it in range(nk):
            # 1. store the prefetched k-step into stage it & 1: S split into bf16 hi / lo,
            #    M as bf16 1.0 where marginal, else 0
            st = (it & 1) * STAGE32 + st_lane
            for p in range(NPASS):
                if S_BF16:
                    smem32[st + p * PASS32] = xp[p]
                else:
                    hi = pack_bf16x2(xs[p, 0], xs[p, 1])
                    smem32[st + p * PASS32] = hi
                    smem32[st + p * PASS32 + TILE32] = pack_bf16x2(
                        xs[p, 0] - bf16_low_f32(hi), xs[p, 1] - bf16_high_f32(hi)
                    )
            sm = (it & 1) * STAGE32 + ms
            _store_map(smem32, ys, sm, MW, NMP, RG)
            cuda.syncthreads()
            # 2. prefetch the next k-step (masked: nothing is read past n_in)
            if S_BF16:
                _prefetch_pairs(xp, states, it * 16 + 16, W, s_lane, srow, sok0, n_in, NPASS, RPP)
            else:
                _prefetch_states(
                    xs, states, it * 16 + 16, W, s_lane, srow, sok0, sok1, n_in, NPASS, RPP
                )
            _prefetch_map(ys, bmap, it * 16 + 16, n_in, n_out, mo, mr, mc, r0, rs, cs, NMP, RG)
            # 3. tensor cores: A fragments of the warp's m-tiles; per n16 pair, B fragments
            #    of hi and lo (two n8 tiles each), then 4 mma per m-tile
            sb = (it & 1) * STAGE_BYTES
            lak = la + sb
            lbk = lb + sb
            _load_a(af, smem, lak, A_STEP, MT)
            for j in range(NP):
                h0, h1, h2, h3 = ldsm_x4_trans(smem, lbk + 32 * j, 0)
                if S_BF16:  # S exact in bf16: one product
                    for mt in range(MT):
                        _mma_tile(acc, af, mt, 2 * j, h0, h1)
                        _mma_tile(acc, af, mt, 2 * j + 1, h2, h3)
                else:
                    l0, l1, l2, l3 = ldsm_x4_trans(smem, lbk + LO_BYTES + 32 * j, 0)
                    for mt in range(MT):
                        _mma_tile(acc, af, mt, 2 * j, h0, h1)
                        _mma_tile(acc, af, mt, 2 * j + 1, h2, h3)
                        _mma_tile(acc, af, mt, 2 * j, l0, l1)
                        _mma_tile(acc, af, mt, 2 * j + 1, l2, l3)
        _store_out(  # epilogue
            out, acc, lane, r0, wr * 16 * MT, w0, wc * 16 * NP, bh, o_rows, W, n_out, MT, NN
        )

    return MarginalKernel(marginal_sum_tc, G["SMEM_BYTES"], NT)


# ---------------------------------------------------------------------------
# The pipelined kernel (bf16 states; module doc, "The pipelined kernel")
# ---------------------------------------------------------------------------

#: Defaults of the pipelined kernel: c-values per stage, stages in the ring.
PIPE_KB = 32
PIPE_STAGES = 3
CHUNKS = (16, 8, 4)  # cp.async sizes, bytes


#: How the pipelined kernel's map arrives (``map_load``): bytes (the present path),
#: int32 words of 4 c-values of one row (row sums), or pairs of int32 words of 4 rows
#: at two c-values (column sums).
MAP_LOADS = ("bytes", "rows", "cols")
#: How its results leave (``out_store``): 0 the fragments straight to global memory,
#: 1 / 4 staged in shared memory, then 4- / 16-byte stores along w.
OUT_STORES = (0, 1, 4)
EPAD = 8  # fp32 pad per row of the staged epilogue


def pipelined_geometry(
    tiles, kb=PIPE_KB, stages=PIPE_STAGES, chunk=16, map_load="bytes", out_store=0
):
    """Derived sizes of the pipelined kernel (a dict; elements unless *_BYTES).
    ``map_load`` / ``out_store``: the v2 variants (module doc, "v2")."""
    WR, WC, MT, NP = tiles
    RT, WT = WR * 16 * MT, WC * 16 * NP
    NT = 32 * WR * WC
    NW, RG = NT // 32, RT // 8
    if kb % KSTEP or kb <= 0 or stages < 2 or chunk not in CHUNKS:
        raise ValueError(
            f"pipelined marginal: kb={kb} must be a positive multiple of 16, stages={stages} "
            f">= 2, chunk={chunk} one of {CHUNKS}"
        )
    V = chunk // 2  # bf16 per chunk
    CPR = WT // V  # chunks per S row
    units = RG * (kb // 8)  # 8 x 8 units of the RT x kb M tile
    NMP = units // NW if units % NW == 0 else 0  # M staging passes (units per warp)
    if NT % CPR or kb % (NT // CPR) or NMP == 0 or (RG % NMP and NMP % RG):
        raise ValueError(
            f"tiles {tuple(tiles)}, kb={kb}, chunk={chunk}: the staging needs "
            f"threads % (WT/{V}) == 0, kb % (threads / (WT/{V})) == 0, "
            f"(RT/8)(kb/8) % warps == 0 and one of RT/8, (RT/8)(kb/8)/warps dividing the other"
        )
    if map_load not in MAP_LOADS or out_store not in OUT_STORES:
        raise ValueError(
            f"pipelined marginal: map_load={map_load!r} must be one of {MAP_LOADS}, "
            f"out_store={out_store!r} one of {OUT_STORES}"
        )
    # map words per thread and stage: RT x kb/4 words (rows), RT/4 x kb/2 word pairs (cols)
    units = RT * kb // (4 if map_load == "rows" else 8)
    NWP = units // NT if units % NT == 0 else 0
    if map_load != "bytes" and NWP == 0:
        raise ValueError(
            f"tiles {tuple(tiles)}, kb={kb}: map_load={map_load!r} needs the {units} map "
            f"words (pairs) of a stage to divide among {NT} threads"
        )
    RPP = NT // CPR  # S rows copied per pass
    SW = WT + PAD
    MWK = kb + PAD  # M buffer row stride (bf16)
    SLOT = kb * SW  # one S stage
    MBUF = RT * MWK  # one M buffer
    ES = WT + EPAD  # staged epilogue: fp32 row stride; WR*16 rows (one m-tile a warp)
    EPI_BYTES = WR * 16 * ES * 4 if out_store else 0
    RING_BYTES = (stages * SLOT + 2 * MBUF) * 2
    return dict(
        RT=RT,
        WT=WT,
        NT=NT,
        SW=SW,
        MWK=MWK,
        V=V,
        CPR=CPR,
        RPP=RPP,
        NPASS=kb // RPP,
        NMP=NMP,
        RG=RG,
        KS=kb // KSTEP,
        SLOT=SLOT,
        MBUF=MBUF,
        NWP=max(NWP, 1),
        ES=ES,
        NE=(WR * 16 * WT) // (max(out_store, 1) * NT),
        SMEM_BYTES=max(RING_BYTES, EPI_BYTES),
    )


def ops_per_stage_pipelined(tiles, kb=PIPE_KB):
    """(mma, ldmatrix) one CTA warp issues per stage of the pipelined kernel: ``kb / 16``
    k-steps of MT·2NP mma and MT + NP ldmatrix (one product a tile)."""
    WR, WC, MT, NP = tiles
    ks = kb // KSTEP
    return ks * MT * 2 * NP, ks * (MT + NP)


@_compat.device(**_INLINE)
def _issue_stage(smem, st, states, g, c, n_in, wok, W, npass, rpp, pass_bytes, chunk):
    """cp.async this thread's chunks of one S stage: rows ``c + rpp·p`` (global element
    offset ``g`` for p = 0, shared byte address ``st``), zero-filled past n_in / W."""
    for p in range(npass):
        ok = wok and c + p * rpp < n_in
        cp_async_zfill(
            smem,
            st + p * pass_bytes,
            chunk,
            states,
            g + p * rpp * W if ok else ZI,
            chunk if ok else ZI,
        )


# --- v2: the map as int32 words, the staged epilogue (module doc, "v2") ---------------

#: A word's byte k set to 1 (not marginal): the bytes past n_in / n_out of a word.
BYTE1_1, BYTE1_2, BYTE1_3 = np.int32(0x100), np.int32(0x10000), np.int32(0x1000000)
ALL_NOT_MARGINAL = np.int32(0x01010101)


@_compat.device(**_INLINE)
def _mask_word(w, left):
    """Word ``w`` with its bytes k >= ``left`` (1..4 valid bytes) set to 1 (not marginal)."""
    if left < 4:
        w = int32(w | BYTE1_3)
    if left < 3:
        w = int32(w | BYTE1_2)
    if left < 2:
        w = int32(w | BYTE1_1)
    return w


@_compat.device(**_INLINE)
def _pair(lo, hi):
    """bf16 pair (1.0 where the byte is 0 = marginal, else 0) of two map bytes."""
    return int32((BF16_ONE_LO if lo == 0 else ZI) | (BF16_ONE_HI if hi == 0 else ZI))


@_compat.device(**_INLINE)
def _prefetch_map_rows(ws, bmap32, cn, n_in, n_out, base, tid, r0, rs, nt, kw, nwp):
    """Row sums: this thread's map words of the stage at ``cn``: word q = tid + nt·p is
    row q // kw, c-values cn + 4(q % kw) .. + 3 (one int32 of a bmap row; ``base`` the
    element offset of M[r0, 0]). Bytes past n_in read as not marginal."""
    for p in range(nwp):
        q = tid + nt * p
        row = q // kw
        c = cn + (q - row * kw) * 4
        if r0 + row < n_out and c < n_in:
            ws[p, 0] = _mask_word(bmap32[u64((base + row * rs + c) >> 2)], n_in - c)
        else:
            ws[p, 0] = ALL_NOT_MARGINAL


@_compat.device(**_INLINE)
def _store_map_rows(smem32, ws, sm, tid, nt, kw, mwk, nwp):
    """The words of :func:`_prefetch_map_rows` as two bf16 pairs each into the M buffer
    (int32 index ``sm`` of its row 0, column 0; row stride ``mwk`` bf16)."""
    for p in range(nwp):
        q = tid + nt * p
        row = q // kw
        i = sm + (row * mwk + (q - row * kw) * 4) // 2
        w = ws[p, 0]
        smem32[i] = _pair(w & 0xFF, (w >> 8) & 0xFF)
        smem32[i + 1] = _pair((w >> 16) & 0xFF, (w >> 24) & 0xFF)


@_compat.device(**_INLINE)
def _prefetch_map_cols(ws, bmap32, cn, n_in, n_out, base, tid, r0, cs, nt, ku, nwp):
    """Column sums (M[r, c] = bmap[c, r]): unit q = tid + nt·p is rows 4(q // ku) .. + 3
    at c-values cn + 2(q % ku) and + 1: two int32 words, each 4 consecutive bytes of one
    bmap row (``base`` the element offset of M[r0, 0]). Bytes past n_out and words past
    n_in read as not marginal."""
    for p in range(nwp):
        q = tid + nt * p
        ru = (q // ku) * 4
        c = cn + (q - (q // ku) * ku) * 2
        rok = r0 + ru < n_out
        for k in range(2):
            if rok and c + k < n_in:
                ws[p, k] = _mask_word(bmap32[u64((base + ru + (c + k) * cs) >> 2)], n_out - r0 - ru)
            else:
                ws[p, k] = ALL_NOT_MARGINAL


@_compat.device(**_INLINE)
def _store_map_cols(smem32, ws, sm, tid, nt, ku, mwk, nwp):
    """The word pairs of :func:`_prefetch_map_cols` into the M buffer: byte j of the two
    words is the pair (M[ru + j, c], M[ru + j, c + 1]), 4 int32 stores (one per row)."""
    for p in range(nwp):
        q = tid + nt * p
        ru = (q // ku) * 4
        i = sm + (ru * mwk + (q - (q // ku) * ku) * 2) // 2
        w0 = ws[p, 0]
        w1 = ws[p, 1]
        for j in range(4):
            smem32[i + j * (mwk // 2)] = _pair((w0 >> (8 * j)) & 0xFF, (w1 >> (8 * j)) & 0xFF)


@_compat.device(**_INLINE)
def _store_out_staged(
    out,
    acc,
    smemf,
    tid,
    lane,
    r0,
    wr,
    wc,
    w0,
    bh,
    o_rows,
    W,
    n_out,
    mt_n,
    nn,
    np_,
    es,
    wt,
    nt,
    ne,
    vec,
):
    """Staged epilogue: per m-tile mt, every warp writes its D fragments of mt into the
    fp32 buffer E (WR·16 rows x ``es``; warp (wr, wc) at rows wr·16.., columns
    wc·16·NP..), then the CTA stores E along w: ``vec`` (4 or 1) consecutive columns per
    thread, consecutive threads on consecutive columns, rows < n_out and columns < W
    only. Call after a barrier that ends every read of the shared memory it reuses."""
    g = lane >> 2
    t2 = (lane & 3) * 2
    fb = (wr * 16 + g) * es + wc * 16 * np_ + t2  # this lane's first fragment element
    cpr = wt // vec  # threads per row of E
    for mt in range(mt_n):
        for h in range(2):
            for n in range(nn):
                sts_v2_f32(
                    smemf, int64(fb + 8 * h * es + 8 * n), acc[mt, n, 2 * h], acc[mt, n, 2 * h + 1]
                )
        cuda.syncthreads()
        for p in range(ne):
            q = tid + nt * p
            er = q // cpr
            ec = (q - er * cpr) * vec
            r = r0 + (er >> 4) * 16 * mt_n + 16 * mt + (er & 15)
            w = w0 + ec
            if r < n_out and w < W:  # vec 4: W % 4 == 0, so w < W covers w + 3
                ob = (bh * o_rows + r) * W + w
                if vec == 4:
                    a, b, c, d = lds_v4_f32(smemf, int64(er * es + ec))
                    stg_v4_f32(out, int64(ob), a, b, c, d)
                else:
                    out[u64(ob)] = smemf[er * es + ec]
        cuda.syncthreads()  # E is read before the next m-tile overwrites it


@kernel_factory
def make_marginal_kernel_pipelined(
    tiles=GPU_TILES,
    kb=PIPE_KB,
    stages=PIPE_STAGES,
    chunk=16,
    min_blocks=None,
    map_load="bytes",
    out_store=0,
):
    """Build ``marginal_sum_tc_pipelined`` (bf16 states only; module doc, "The pipelined
    kernel"): ``kb`` c-values per stage, a ring of ``stages`` stages, S copied in
    ``chunk``-byte cp.async (16, 8 or 4: it must divide ``2·W`` and the states' address).
    ``min_blocks``: ask ptxas for that many resident CTAs per SM (``launch_bounds``; it
    caps the registers, e.g. 4 CTAs of 128 threads: 128 registers), None: no bound.

    The v2 variants (module doc, "v2"; same bits): ``map_load`` "bytes" (one map byte
    per load), "rows" (row sums: ``bmap`` is the map's flat int32 view, Mk % 4 == 0) or
    "cols" (column sums, the same view); ``out_store`` 0 (fragments straight to
    global memory), 1 or 4 (staged in shared memory, then 4- or 16-byte stores along w;
    4 needs W % 4 == 0 and a 16-byte aligned ``out``).

    Same arguments as :func:`make_marginal_kernel`'s kernel except ``states``: the bf16
    bits as a flat int16 array (B*H, s_rows, W), W even. Same bits as
    ``make_marginal_kernel(tiles, s_bf16=True)``. Returns a :class:`MarginalKernel`.
    """
    tiles = Tiles(*tiles)
    WR, WC, MT, NP = tiles
    P = pipelined_geometry(tiles, kb, stages, chunk, map_load, out_store)
    RT, WT, NT, SW, MWK, V, CPR = (P[k] for k in ("RT", "WT", "NT", "SW", "MWK", "V", "CPR"))
    RPP, NPASS, NMP, RG, KS, SLOT, MBUF = (
        P[k] for k in ("RPP", "NPASS", "NMP", "RG", "KS", "SLOT", "MBUF")
    )
    KB, STAGES, CHUNK = int(kb), int(stages), int(chunk)
    WAIT = STAGES - 2  # cp.async groups that may still be in flight at a stage's wait
    NN = 2 * NP
    SLOT_BYTES = SLOT * 2
    MOFF = STAGES * SLOT  # the two M buffers follow the ring (bf16)
    MBUF32, MBUF_BYTES = MBUF // 2, MBUF * 2
    A_STEP = 16 * MWK * 2  # bytes between a warp's m-tiles (M buffer)
    K_STEP = 16 * SW * 2  # bytes between the k-steps of an S slot
    PASS_BYTES = RPP * SW * 2  # bytes between a thread's chunks in a slot
    ALIGNED = not SIMULATED
    bounds = {} if min_blocks is None else {"launch_bounds": (NT, int(min_blocks))}
    MINB = 0 if min_blocks is None else int(min_blocks)
    MAPL = MAP_LOADS.index(map_load)  # 0 bytes, 1 row words, 2 column word pairs
    OUTV = int(out_store)  # 0 direct, 1 / 4 staged
    NWP, ES, NE = P["NWP"], P["ES"], P["NE"]
    KW, KU = KB // 4, KB // 2  # words per M row (rows), word pairs per 4 M rows (cols)

    @_compat.kernel(**bounds)
    def marginal_sum_tc_pipelined(
        bmap, m_size, rs, cs, n_out, n_in, states, s_rows, out, o_rows, W
    ):
        # launch_bounds is not part of Numba's disk-cache key, the closure is: name it
        _ = MINB
        # [S ring: STAGES x KB x SW][M: 2 x RT x MWK] bf16 (row-major); int32 view for
        # the map's packed pairs
        # (fp32 view: the staged epilogue's buffer, over the ring once it is done)
        if ALIGNED:
            smem = cuda.shared.array(0, int16, alignment=16)
            smem32 = cuda.shared.array(0, int32, alignment=16)
            smemf = cuda.shared.array(0, float32, alignment=16)
        else:
            smem = cuda.shared.array(0, int16)
            smem32 = cuda.shared.array(0, int32)
            smemf = cuda.shared.array(0, float32)
        acc = cuda.local.array((MT, NN, 4), float32)  # D fragments
        af = cuda.local.array((MT, 4), int32)  # A fragments of a k-step
        ys = cuda.local.array((NMP, 2), int32)  # prefetched map bytes (one stage)
        ws = cuda.local.array((NWP, 2), int32)  # ... or map words (v2)
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        wr = warp // WC
        wc = warp - wr * WC
        r0 = cuda.blockIdx.x * RT
        w0 = cuda.blockIdx.y * WT
        bh = cuda.blockIdx.z
        sa = smem_addr(smem)
        # --- S copy role: chunk (srow, sc .. sc + V) of every RPP-row pass of a stage
        srow = tid // CPR
        sc = (tid - srow * CPR) * V
        wok = w0 + sc < W  # V divides W: the chunk is wholly inside or wholly outside
        g_lane = (bh * s_rows + srow) * W + w0 + sc  # element offset at c = 0 (int64)
        st_lane = sa + (srow * SW + sc) * 2  # shared byte address in slot 0
        # --- M staging role: as in make_marginal_kernel, over (RT/8) x (KB/8) units
        u = warp * NMP
        mr = (u % RG) * 8 + (lane & 7)
        mc = (u // RG) * 8 + (lane >> 3) * 2
        mo = bh * m_size + (r0 + mr) * rs + mc * cs
        ms = (MOFF + mr * MWK + mc) >> 1  # int32 index in M buffer 0
        # --- v2 map words: element offset of M[r0, 0]; int32 index of M buffer 0
        mbase = bh * m_size + r0 * rs
        ms0 = MOFF >> 1
        # --- fragment roles (see make_marginal_kernel)
        fr = (lane & 7) + ((lane >> 3) & 1) * 8
        fc = (lane >> 4) * 8
        la = sa + (MOFF + (wr * 16 * MT + fr) * MWK + fc) * 2
        lb = sa + (fr * SW + wc * 16 * NP + fc) * 2
        for mt in range(MT):
            for n in range(NN):
                for e in range(4):
                    acc[mt, n, e] = ZERO
        nst = (n_in + KB - 1) // KB
        # prologue: stages 0 .. STAGES-2 in flight (one group each), map of stage 0
        for s in range(STAGES - 1):
            if s * KB < n_in:
                _issue_stage(
                    smem,
                    st_lane + s * SLOT_BYTES,
                    states,
                    g_lane + s * KB * W,
                    s * KB + srow,
                    n_in,
                    wok,
                    W,
                    NPASS,
                    RPP,
                    PASS_BYTES,
                    CHUNK,
                )
            cp_async_commit()
        if MAPL == 0:
            _prefetch_map(ys, bmap, 0, n_in, n_out, mo, mr, mc, r0, rs, cs, NMP, RG)
        elif MAPL == 1:
            _prefetch_map_rows(ws, bmap, 0, n_in, n_out, mbase, tid, r0, rs, NT, KW, NWP)
        else:
            _prefetch_map_cols(ws, bmap, 0, n_in, n_out, mbase, tid, r0, cs, NT, KU, NWP)
        rslot = 0  # the slot of stage it
        wslot = STAGES - 1  # the slot of stage it + STAGES - 1
        for it in range(nst):
            # 1. map of stage it -> M buffer it & 1 (bf16 1.0 where marginal, else 0)
            if MAPL == 0:
                _store_map(smem32, ys, (it & 1) * MBUF32 + ms, MWK, NMP, RG)
            elif MAPL == 1:
                _store_map_rows(smem32, ws, (it & 1) * MBUF32 + ms0, tid, NT, KW, MWK, NWP)
            else:
                _store_map_cols(smem32, ws, (it & 1) * MBUF32 + ms0, tid, NT, KU, MWK, NWP)
            # 2. this thread's copies of stage it landed; the barrier: everyone's landed
            #    and are visible, and every warp is done with iteration it - 1
            cp_async_wait_group(WAIT)
            cuda.syncthreads()
            # 3. refill the slot iteration it - 1 read with stage it + STAGES - 1
            cn = (it + STAGES - 1) * KB
            if cn < n_in:
                _issue_stage(
                    smem,
                    st_lane + wslot * SLOT_BYTES,
                    states,
                    g_lane + cn * W,
                    cn + srow,
                    n_in,
                    wok,
                    W,
                    NPASS,
                    RPP,
                    PASS_BYTES,
                    CHUNK,
                )
            cp_async_commit()  # one group per iteration, empty or not
            wslot = wslot + 1 if wslot + 1 < STAGES else 0
            # 4. map bytes of stage it + 1 (in flight during the mma below)
            cn1 = it * KB + KB
            if MAPL == 0:
                _prefetch_map(ys, bmap, cn1, n_in, n_out, mo, mr, mc, r0, rs, cs, NMP, RG)
            elif MAPL == 1:
                _prefetch_map_rows(ws, bmap, cn1, n_in, n_out, mbase, tid, r0, rs, NT, KW, NWP)
            else:
                _prefetch_map_cols(ws, bmap, cn1, n_in, n_out, mbase, tid, r0, cs, NT, KU, NWP)
            # 5. tensor cores over the KS k-steps of stage it (those with c < n_in)
            lak = la + (it & 1) * MBUF_BYTES
            lbk = lb + rslot * SLOT_BYTES
            for ks in range(KS):
                if it * KB + ks * KSTEP < n_in:
                    _load_a(af, smem, lak + ks * 32, A_STEP, MT)
                    for j in range(NP):
                        h0, h1, h2, h3 = ldsm_x4_trans(smem, lbk + ks * K_STEP + 32 * j, 0)
                        for mt in range(MT):
                            _mma_tile(acc, af, mt, 2 * j, h0, h1)
                            _mma_tile(acc, af, mt, 2 * j + 1, h2, h3)
            rslot = rslot + 1 if rslot + 1 < STAGES else 0
        if OUTV == 0:  # epilogue: fragments straight to global memory
            _store_out(
                out, acc, lane, r0, wr * 16 * MT, w0, wc * 16 * NP, bh, o_rows, W, n_out, MT, NN
            )
        else:  # staged: the ring becomes the buffer once every copy landed and was read
            cp_async_wait_group(0)
            cuda.syncthreads()
            _store_out_staged(
                out,
                acc,
                smemf,
                tid,
                lane,
                r0,
                wr,
                wc,
                w0,
                bh,
                o_rows,
                W,
                n_out,
                MT,
                NN,
                NP,
                ES,
                WT,
                NT,
                NE,
                OUTV,
            )

    return MarginalKernel(marginal_sum_tc_pipelined, P["SMEM_BYTES"], NT)


_kernels = {}


def get_marginal_kernel(tiles=TILES, s_bf16=False):
    """The :class:`MarginalKernel` for ``tiles`` and the states' storage (built once per
    process)."""
    key = (Tiles(*tiles), bool(s_bf16))
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = make_marginal_kernel(*key)
    return k


def get_marginal_kernel_pipelined(
    tiles=PIPE_TILES,
    kb=PIPE_KB,
    stages=PIPE_STAGES,
    chunk=16,
    min_blocks=None,
    map_load="bytes",
    out_store=0,
):
    """The pipelined :class:`MarginalKernel` (bf16 states; built once per process)."""
    mb = None if min_blocks is None else int(min_blocks)
    key = (
        "pipelined",
        Tiles(*tiles),
        int(kb),
        int(stages),
        int(chunk),
        mb,
        str(map_load),
        int(out_store),
    )
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = make_marginal_kernel_pipelined(*key[1:])
    return k


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------


def chunk_bytes(states, W):
    """The pipelined kernel's cp.async size for these bf16 states: the largest of 16 / 8 /
    4 bytes dividing both a row's ``2·W`` bytes and the array's address (4 when the address
    is unknown: an int32 view of the states needs 4-byte alignment anyway)."""
    addr = address(states)
    for c in CHUNKS:
        if (2 * W) % c == 0 and addr is not None and addr % c == 0:
            return c
    return CHUNKS[-1]


def v2_variant(v2, tiles, kb, transposed, bmap, out, W):
    """``(map_load, out_store)`` of the pipelined kernel for the launcher's ``v2``: a
    pair ``(words, staged)`` of flags (True: both). Each applies where it can, else the
    present path: map words need Mk % 4 == 0, a 4-byte aligned map and tiles whose stage
    has a whole number of words per thread; 16-byte stores need W % 4 == 0 and a 16-byte
    aligned ``out`` (else 4-byte stores)."""
    words, staged = (True, True) if v2 is True else (bool(v2[0]), bool(v2[1]))
    map_load, out_store = "bytes", 0
    if words:
        addr = address(bmap)
        want = "cols" if transposed else "rows"
        if int(bmap.shape[3]) % 4 == 0 and addr is not None and addr % 4 == 0:
            try:
                pipelined_geometry(Tiles(*tiles), kb, map_load=want)
                map_load = want
            except ValueError:
                pass
    if staged:
        addr = address(out)
        out_store = 4 if W % 4 == 0 and addr is not None and addr % 16 == 0 else 1
    return map_load, out_store


def launch_marginal_sum_tc(
    stream, bmap, transposed, n_out, n_in, states, out, tiles=None, pipeline=None, v2=None
):
    """``out[b, h, :n_out] = M · states[b, h, :n_in]`` on tensor cores, on ``stream``.

    bmap int8 (B, H, Mq, Mk); states fp32 (B, H, >= n_in, W); out fp32
    (B, H, >= n_out, W); C-contiguous device arrays (numpy arrays under the
    simulator). ``transposed`` False: ``M[r, c] = bmap[b, h, r, c] == 0`` (n_out <= Mq,
    n_in <= Mk); True: ``M[r, c] = bmap[b, h, c, r] == 0`` (n_out <= Mk, n_in <= Mq).
    Same semantics as ``_marginal.launch_marginal_sum``; fp32 states only
    (:func:`tc_marginal_supported`), compute capability >= 8.0.

    bf16 states (int16 bits) take the pipelined kernel when ``pipeline`` asks for it:
    None follows ``SLA_NUMBA_MARGINAL`` (``pipelined``: default ``kb`` / ``stages``;
    ``wgmma``: ``tc/marginal_wgmma.py`` where it applies, with ``tiles`` None, on compute
    capability 9.0; else the pipelined kernel),
    False / True force the register / pipelined kernel, a pair ``(kb, stages)`` or a
    triple ``(kb, stages, min_blocks)`` picks the pipelined kernel's stage size, ring
    depth and launch bound (:func:`make_marginal_kernel_pipelined`). Same bits either way.
    ``tiles`` None: ``TILES`` for the register kernel, ``PIPE_TILES`` for the pipelined one.
    ``v2`` (pipelined kernel only; module doc, "v2"): None follows ``SLA_NUMBA_MARGINAL``
    (``pipelined_v2``: both variants), False none, True both, a pair ``(words, staged)``
    each variant on its own (:func:`v2_variant`). Same bits either way.
    """
    s_dtype = dtype_name(states)
    if s_dtype not in ("float32", "int16") or dtype_name(out) != "float32":
        raise TypeError(
            "launch_marginal_sum_tc: states must be float32 (or int16: bf16 bits), out float32"
        )
    B, H, Mq, Mk = (int(s) for s in bmap.shape)
    s_rows, W = int(states.shape[2]), int(states.shape[3])
    o_rows = int(out.shape[2])
    n_out, n_in = int(n_out), int(n_in)
    if (
        n_in > s_rows
        or n_out > o_rows
        or n_in > (Mq if transposed else Mk)
        or n_out > (Mk if transposed else Mq)
    ):
        raise ValueError("launch_marginal_sum_tc: n_out / n_in exceed the arrays")
    if n_out <= 0 or W <= 0 or B * H <= 0:
        return
    s_bf16 = s_dtype == "int16"
    if s_bf16 and W % 2:
        raise ValueError("launch_marginal_sum_tc: bf16 states need an even row width W")
    if pipeline is None:
        choice = config.marginal_kernel()
        if choice == "wgmma" and s_bf16 and tiles is None:
            from . import marginal_wgmma  # Hopper only; elsewhere the pipelined kernel

            if marginal_wgmma.wgmma_marginal_unsupported_reason(np.int16, W) is None:
                marginal_wgmma.launch_marginal_sum_wgmma(
                    stream, bmap, transposed, n_out, n_in, states, out
                )
                return
        pipeline = choice != "registers"
    if v2 is None:
        v2 = config.marginal_kernel() == "pipelined_v2"
    pipelined = s_bf16 and pipeline is not False
    if pipelined:
        tiles = PIPE_TILES if tiles is None else tiles
        kb, stages, *mb = (PIPE_KB, PIPE_STAGES) if pipeline is True else pipeline
        chunk = chunk_bytes(states, W)
        map_load, out_store = "bytes", 0
        if v2 is not False:
            map_load, out_store = v2_variant(v2, tiles, kb, transposed, bmap, out, W)
        kern = get_marginal_kernel_pipelined(
            tiles, kb, stages, chunk, (mb or [None])[0], map_load, out_store
        )
    else:
        tiles = TILES if tiles is None else tiles
        kern = get_marginal_kernel(tiles, s_bf16)
    G = geometry(Tiles(*tiles))
    grid = (-(-n_out // G["RT"]), -(-W // G["WT"]), B * H)
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError("launch_marginal_sum_tc: W or B*H too large for the grid")
    rs, cs = (1, Mk) if transposed else (Mk, 1)
    # bf16: value pairs (register kernel) or the int16 bits (pipelined: cp.async chunks)
    s_flat = (flat(states) if pipelined else int32_pairs(states)) if s_bf16 else flat(states)
    # the map as bytes, or (v2 map words) as its int32 view: 4 bytes an element
    m_flat = int32_pairs(bmap) if pipelined and map_load != "bytes" else flat(bmap)
    args = (m_flat, Mq * Mk, rs, cs, n_out, n_in, s_flat, s_rows, flat(out), o_rows, W)
    _tc_build.launch(kern.kernel, grid, kern.threads, kern.smem_bytes, stream, args)
