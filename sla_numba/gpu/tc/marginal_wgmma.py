"""The marginal sums ``out = M · S`` on Hopper warpgroup MMA (``wgmma``; bf16 states).

Same operation and interface as ``tc/marginal.py``'s bf16-states kernels (read its
module doc first)::

    out[b, h, r, :] = Σ_c  M[r, c] · S[b, h, c, :]      r < n_out, c < n_in
    M[r, c] = (bmap[b, h, r, c] == 0)                    transposed = False (row sums)
    M[r, c] = (bmap[b, h, c, r] == 0)                    transposed = True  (column sums)

bmap int8 (B, H, Mq, Mk); S = bf16 states as int16 bits (B, H, >= n_in, W), W even;
out fp32 (B, H, >= n_out, W). Every ``out[b, h, r, w]`` with r < n_out, w < W is
written (a row without marginal blocks gets exactly 0); nothing else is touched.
Opt-in: ``SLA_NUMBA_MARGINAL=wgmma`` (``config.py``) on a GPU of compute capability 9.0
exactly; elsewhere (or for fp32 states) the switch falls back to the present kernels
(:func:`wgmma_marginal_unsupported_reason` says why).

Why
---
On an H200 at the Wan2.1 sizes (B*H = 12, Mq = Mk = 512, W = 16512) the pipelined
``mma.sync`` kernel takes 0.80 ms where cuBLAS does the same bf16 product in ~0.2 ms
(BENCHMARKS.md, the Wan stage tables: 0.797 ms against a floor of 0.199 ms).
``mma.sync`` is synchronous: a warp's tensor-core work, its ldmatrix and its share of
the staging all queue in one instruction stream, and each stage ends in a barrier.
``wgmma.mma_async`` is issued by a whole warpgroup, reads B straight from shared memory
(no ldmatrix, no B registers) and runs in the background while the warpgroup issues
the next stage's copies and loads the next map bytes.

What: one warpgroup, 64 rows x N columns
----------------------------------------
A CTA holds ``wgs`` consumer warpgroups (1 or 2; 128 threads each). Warpgroup ``wg``
owns output rows ``r0 + 64 wg .. + 63`` and the CTA's N columns ``w0 .. w0 + N - 1``
(N = 128 or 256): one ``wgmma.m64nNk16`` per k-step of 16 c-values, fp32 accumulators
in registers (N/2 a thread: 128 at N = 256). With two warpgroups both read the same S
tile (128 rows per S byte brought into shared memory: half the shared-memory traffic
from L2 per flop of one warpgroup).

* **B = S** (16 c x N w) from shared memory, *MN-major* (a row = one c, the w values
  contiguous: the layout S has in global memory), read with ``imm-trans-b = 1`` like V
  in ``tc/forward_wgmma.py``. A stage holds ``kb`` rows (c) of the CTA's N columns as
  N/64 column chunks of ``kb`` rows x 128 bytes, 128-byte swizzled (16-byte piece p of
  row k at piece ``p ^ (k % 8)``), the chunk 1024-aligned. Descriptor: LBO = the
  chunk's bytes (``kb·128``), SBO = 1024 (8 rows of c); k-step ks starts ``2048·ks``
  bytes into the stage.
* **A = M** (64 x 16, bf16 0 / 1: 1.0 = 0x3F80 where ``bmap == 0``; entries outside
  the n_out x n_in window count as not marginal), two ways (``Config.a_smem``):

  - ``a_smem = 0``, from registers: lane (g, t) of warp w holds ``a[0] = M[16w+g,
    2t:2t+2]``, ``a[1] = M[16w+g+8, 2t:2t+2]``, ``a[2] = M[16w+g, 2t+8:2t+10]``,
    ``a[3] = M[16w+g+8, 2t+8:2t+10]`` (``tc/wgmma.py``): 8 map bytes a k-step, loaded
    (plain global loads) while the previous stage's wgmma run.
  - ``a_smem = 1``, from shared memory too: each stage also has a K-major M tile per
    warpgroup (64 rows r x 128 bytes, 128-byte swizzled, the ``kb <= 64`` c-values of
    the stage at the start of each row; descriptor LBO unused, SBO = 1024, k-step ks at
    ``+32·ks``). Thread (r, h) of a warpgroup (``r = tid % 128 >> 1``, ``h = tid & 1``)
    loads the ``kb/2`` map bytes of half h of row r during the previous stage and
    stores them as bf16 pairs (16-byte pieces) before the stage's barrier, followed by
    ``fence.proxy.async``. Costs 8 KiB a warpgroup a stage; buys a wgmma whose only
    registers are the accumulators (see "depth" below).
* **D** (64 x N fp32): ``acc[0, j, e]`` = out row ``16w + g + 8(e >> 1)``, column
  ``8j + 2t + (e & 1)``; the epilogue writes it straight to ``out`` (masked r < n_out,
  w < W). No atomics: every output is one thread's fixed sequence of wgmma.

Pipeline
--------
S goes global -> shared with ``cp.async`` (16 bytes where ``2·W`` and the states'
address allow, else 8 or 4: ``marginal.chunk_bytes``; chunks past W or in rows
c >= n_in are zero-filled, so NaN there never reaches an accumulator), in a ring of
``stages`` slots, ``ahead = stages - 1 - depth`` stages issued ahead. Per stage ``it``::

    (a_smem) M bytes of stage it (loaded last stage) -> M slot it % stages
    cp.async.wait_group(ahead - 1); fence.proxy.async; barrier
        # stage it landed everywhere and is visible to the async proxy (wgmma);
        # every warpgroup is past its wgmma wait of stage it - 1
    (registers) A fragments of stage it from the map bytes loaded last stage
    wgmma.fence; kb/16 x wgmma m64nNk16 (B = S slot it % stages); commit
    cp.async stage it + ahead -> its slot; commit   # that slot's last reader is done
    load the map bytes of stage it + 1 (global loads)
    wgmma.wait_group depth

``depth`` (``Config.depth``) 0: wait for the stage's wgmma before the next barrier:
simple, but the tensor cores idle from that wait to the next stage's first wgmma (the
barrier, the A build), unless other CTAs on the SM fill the gap. 1: wait only for the
*previous* stage's wgmma, so the next stage's wgmma queue behind this one's and the
tensor cores need not idle at stage boundaries; a slot is refilled one stage later
(``ahead = stages - 2``) and, with A in registers, two A sets alternate (the loop runs
two stages a trip so that the set index is a constant). ptxas serializes that last form
("non wgmma instructions defining input registers of a wgmma between start and end of
the pipeline stage": the A registers of the next stage are written while the current
wgmma runs), so depth 1 wants ``a_smem = 1``, whose wgmma hold no A registers
(``tools/sweep_marginal_wgmma.py --ptx`` reports it). A branch around a wgmma (e.g. to
skip k-steps past n_in, zeros anyway) also makes ptxas serialize: there is none.

Registers / shared memory (sm_90a, ``--ptx``): (256, 32, 3, 1) 206 registers, 49 KiB;
the default (256, 32, 4, 2, 1, 1): 174 registers x 256 threads, 129 KiB (one CTA, two
warpgroups an SM); no spills anywhere.

Grid: ``(ceil(n_out / (64 wgs)), ceil(W / N), B*H)``, row tiles fastest, so the CTAs
that read the same column panel of S run at about the same time (L2 reuse).

Bits: the products are exact (M is 0 or 1, S is bf16) and the sums fp32, k-steps in
ascending c, as in the mma.sync kernels; but the order in which the tensor core adds
the 16 products of a k-step and the accumulator is its own, so results agree with
``tc/marginal.py``'s to fp32 rounding (the same bound ``2·ceil(n_in/16)·2^-23 · (M·|S|)``
against float64), not bit for bit (``tests/gpu/tc/test_tc_marginal_wgmma.py``).

Under the simulator the wgmma twins (``tc/wgmma.py``) run a group only at the wait
that covers it and the cp.async twin lands a copy only at its wait: a stage read
before its wait, or a slot refilled while a wgmma still reads it, gives wrong results
there too. Keep shapes tiny there (:data:`SIM_CONFIG`: N = 64, kb = 16).

Example (simulator, ``NUMBA_ENABLE_CUDASIM=1``; on an H200 pass device arrays)::

    import numpy as np
    from sla_numba.gpu.tc.marginal_wgmma import launch_marginal_sum_wgmma
    from sla_numba.gpu.tc.ptx import f32_to_bf16_bits
    bmap = np.array([[[[0, 1], [0, 0]]]], np.int8)               # (B, H, Mq, Mk) = (1, 1, 2, 2)
    s = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)       # (B, H, Mk, W)
    bits = f32_to_bf16_bits(s).view(np.int16)
    out = np.empty((1, 1, 2, 2), np.float32)
    launch_marginal_sum_wgmma(0, bmap, False, 2, 2, bits, out)
    # out[0, 0] = [[0, 1], [2, 4]]: row 0 sums state 0, row 1 states 0 and 1
"""

import functools
from collections import namedtuple

import numpy as np
from numba import float32, int16, int32, uint64

from .._compat import cuda, kernel
from .._precompile import kernel_factory
from . import build as _tc_build
from .build import dtype_name, flat
from .forward_wgmma import wgmma_device_ok
from .marginal import CHUNKS, MarginalKernel, chunk_bytes
from .ptx import SIMULATED, cp_async_commit, cp_async_wait_group, cp_async_zfill, smem_addr
from .tiles import SMEM_ALIGN
from .wgmma import (
    CHUNK_COLS,
    desc_hi,
    fence_proxy_async,
    make_wgmma_rs,
    make_wgmma_ss,
    wg_commit,
    wg_fence,
    wg_fence2,
    wg_wait,
)

#: A kernel variant: N columns a CTA, kb c-values a stage, ring depth, warpgroups a CTA.
Config = namedtuple("Config", "n kb stages wgs depth a_smem", defaults=(0, 0))

#: GPU default: CTA 128 x 256 (two warpgroups), 4 stages of 32, wait depth 1, M from
#: shared memory. H200, session 9 (tools/sweep_marginal_wgmma.py): no variant beats the
#: pipelined mma.sync kernel (Wan row sums 0.869-1.648 ms against 0.879, this one
#: 1.224; docs/internals.md), so the kernel stays opt-in.
GPU_CONFIG = Config(256, 32, 4, 2, 1, 1)
#: Simulator default: one 64-column chunk, one k-step a stage (tiny and slow there).
SIM_CONFIG = Config(64, 16, 3, 1)
CONFIG = SIM_CONFIG if SIMULATED else GPU_CONFIG

KSTEP = 16  # c-values per wgmma (its k)
SBO = 1024  # bytes between 8-row groups of c (MN-major descriptor)
ROW_BYTES = 128  # one row of a 64-column chunk (bf16)

ZERO = np.float32(0.0)
ZI = np.int32(0)
BF16_ONE_LO = np.int32(0x3F80)  # bf16 1.0 in the low half of a pair
BF16_ONE_HI = np.int32(0x3F800000)  # ... in the high half
NOT_MARGINAL = np.int32(1)
u64 = uint64


# ---------------------------------------------------------------------------
# Capability
# ---------------------------------------------------------------------------


def wgmma_marginal_unsupported_reason(states_dtype, W=None, device=None):
    """None when :func:`launch_marginal_sum_wgmma` takes these states, else why not (a
    sentence): bf16 states only (int16 bits; fp32 states keep the hi + lo split of
    ``tc/marginal.py``), an even row width ``W`` (None: not checked), a GPU of compute
    capability 9.0 (``device``: None for the current one, or its index)."""
    name = np.dtype(states_dtype).name
    if name != "int16":
        return f"states dtype {name} (the wgmma marginal sum takes bf16 states: int16 bits)"
    if W is not None and int(W) % 2:
        return f"row width W={W} (must be even)"
    if not wgmma_device_ok(device):
        return "no CUDA device of compute capability 9.0 (wgmma is Hopper's)"
    return None


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def geometry(config, chunk=16):
    """Derived sizes of a variant (a dict; bytes where the name says so).

    ``config`` = (n, kb, stages, wgs): n in {64, 128, 192, 256}, kb a positive multiple
    of 16, stages >= 2, wgs in {1, 2}; ``chunk`` the cp.async size (16, 8 or 4 bytes).
    """
    n, kb, stages, wgs, depth, a_smem = Config(*(int(x) for x in config))
    if n % CHUNK_COLS or not CHUNK_COLS <= n <= 256:
        raise ValueError(f"wgmma marginal: n={n} must be 64, 128, 192 or 256")
    if (
        kb <= 0
        or kb % KSTEP
        or depth not in (0, 1)
        or a_smem not in (0, 1)
        or (a_smem and kb > 64)
        or stages < 2 + depth
        or wgs not in (1, 2)
        or chunk not in CHUNKS
    ):
        raise ValueError(
            f"wgmma marginal: kb={kb} must be a positive multiple of 16, depth={depth} 0 or "
            f"1, stages={stages} >= 2 + depth, wgs={wgs} 1 or 2, chunk={chunk} one of {CHUNKS}, "
            f"a_smem={a_smem} 0 or 1 (1: kb <= 64)"
        )
    NT = 128 * wgs
    V = chunk // 2  # bf16 per copy
    CPR = n // V  # copies per stage row
    if NT % CPR or kb % (NT // CPR):
        raise ValueError(
            f"wgmma marginal: {NT} threads cannot copy {kb} rows of {CPR} {chunk}-byte chunks"
        )
    RPP = NT // CPR  # stage rows copied per pass
    CHUNK_B = kb * ROW_BYTES  # one 64-column chunk of a stage
    STAGE_B = (n // CHUNK_COLS) * CHUNK_B
    MSLOT_B = wgs * 64 * ROW_BYTES if a_smem else 0  # M of a stage (a_smem): 8 KiB a warpgroup
    return dict(
        MSLOT_B=MSLOT_B,
        PPT=kb // 16,  # a_smem: 16-byte pieces of M a thread writes a stage
        RT=64 * wgs,
        NT=NT,
        V=V,
        CPR=CPR,
        RPP=RPP,
        NPASS=kb // RPP,
        KS=kb // KSTEP,
        CHUNK_B=CHUNK_B,
        STAGE_B=STAGE_B,
        SMEM_BYTES=stages * (STAGE_B + MSLOT_B) + 1024,  # + 1024: 1024-aligned start
    )


def copy_offset(config, tid, i, chunk=16):
    """Byte offset, in a stage, of thread ``tid``'s ``i``-th copy (its row ``k`` and first
    column ``n``): ``(offset, k, n)``; the kernel computes the same."""
    G = geometry(config, chunk)
    q = tid % G["CPR"]
    k = tid // G["CPR"] + G["RPP"] * i
    n = q * G["V"]
    cc, within = divmod(n, CHUNK_COLS)
    p, sub = divmod(within, 8)
    return cc * G["CHUNK_B"] + k * ROW_BYTES + ((p ^ (k & 7)) << 4) + 2 * sub, k, n


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------


@functools.cache
@kernel_factory
def make_marginal_kernel_wgmma(config=GPU_CONFIG, chunk=16):
    """Build ``marginal_sum_wgmma`` for ``config`` = (n, kb, stages, wgs) and cp.async
    size ``chunk`` (module doc). Arguments as ``tc/marginal.py``'s pipelined kernel:
    ``(bmap, m_size, rs, cs, n_out, n_in, states, s_rows, out, o_rows, W)``, flat arrays:
    bmap int8, states int16 bf16 bits (B*H, s_rows, W), out fp32 (B*H, o_rows, W).
    Grid ``(ceil(n_out / (64 wgs)), ceil(W / n), B*H)``. Returns a ``MarginalKernel``.
    """
    config = Config(*(int(x) for x in config))
    G = geometry(config, chunk)
    N, KB, STAGES, WGS, DEPTH, A_SMEM = config
    RT, NT, V, CPR, RPP, NPASS, KS = (G[k] for k in ("RT", "NT", "V", "CPR", "RPP", "NPASS", "KS"))
    CHUNK_B, STAGE_B, MSLOT_B, PPT = G["CHUNK_B"], G["STAGE_B"], G["MSLOT_B"], G["PPT"]
    MOFF = STAGES * STAGE_B  # the M ring (a_smem) follows the S ring
    HALF = KB // 2  # a_smem: c-values of a row one thread converts
    CHUNK = int(chunk)
    AHEAD = STAGES - 1 - DEPTH  # stages issued ahead of the one the wgmma read
    WAIT = AHEAD - 1  # cp.async groups that may stay in flight at a stage's wait
    NJ = N // 8  # n8 column groups of the accumulator
    NACC = N // 2  # accumulator registers a thread
    AFR = (DEPTH + 1) * KS  # A fragments a thread holds (two sets at depth 1)
    NAF = AFR * 4  # ... their registers
    HI_S = np.int64(desc_hi(CHUNK_B, SBO))  # S: MN-major, LBO = one chunk
    HI_A = np.int64(desc_hi(16, SBO))  # M (a_smem): K-major, LBO unused
    wgmma = make_wgmma_rs("bf16", N)
    wgmma_ss = make_wgmma_ss("bf16", N, 1)

    @cuda.jit(device=True, inline="always")
    def issue_stage(smem, states, j, n_in, W, sbase, t_base, p16, k0, wok, g_lane):
        # cp.async this thread's pieces of stage j (c = j*KB ..) into slot j % STAGES:
        # rows k0 + RPP*i, at the 128-byte swizzle; zero-filled past n_in / W
        cn = j * KB
        if cn < n_in:
            dst = sbase + (j % STAGES) * STAGE_B + t_base
            for i in range(NPASS):
                k = k0 + RPP * i
                ok = wok and cn + k < n_in
                cp_async_zfill(
                    smem,
                    dst + k * ROW_BYTES + ((p16 ^ (k & 7)) << 4),
                    CHUNK,
                    states,
                    g_lane + (cn + RPP * i) * W if ok else 0,
                    CHUNK if ok else ZI,
                )
        cp_async_commit()  # one group per stage, empty or not

    @cuda.jit(device=True, inline="always")
    def load_map(ys, bmap, c1, n_in, n_out, mo, ra, t, rs, cs):
        # the 8 map bytes of each k-step of the stage at c1 behind this thread's A
        # fragment (x = 2 reg + half: row ra + 8 (reg & 1), column 2t + half + 8 (reg >> 1))
        for ks in range(KS):
            for x in range(8):
                reg = x >> 1
                c = c1 + 16 * ks + (x & 1) + 8 * (reg >> 1)
                ok = ra + 8 * (reg & 1) < n_out and c + 2 * t < n_in
                ys[ks, x] = (
                    int32(bmap[u64(mo + 8 * (reg & 1) * rs + c * cs)]) if ok else NOT_MARGINAL
                )

    @cuda.jit(device=True, inline="always")
    def load_rows(ym, bmap, ch, n_in, n_out, mo2, rg, cs):
        # a_smem: the map bytes M[rg, ch + 8 pp + e] (this thread's half of a stage row;
        # mo2 = the bmap offset of M[rg, 0])
        for pp in range(PPT):
            for e in range(8):
                c = ch + 8 * pp + e
                ok = rg < n_out and c < n_in
                ym[pp, e] = int32(bmap[u64(mo2 + c * cs)]) if ok else NOT_MARGINAL

    @cuda.jit(device=True, inline="always")
    def store_m(smem32, ym, wrow, rx, h):
        # a_smem: the bytes as bf16 0 / 1 into the K-major M tile, 128-byte swizzled: the
        # 16-byte piece h·PPT + pp of the row at int32 index wrow sits at piece ^ (r % 8)
        for pp in range(PPT):
            wp = wrow + (((h * PPT + pp) ^ rx) << 2)
            for w in range(4):
                smem32[wp + w] = (BF16_ONE_LO if ym[pp, 2 * w] == 0 else ZI) | (
                    BF16_ONE_HI if ym[pp, 2 * w + 1] == 0 else ZI
                )

    @cuda.jit(device=True, inline="always")
    def stage(smem, acc, af, ys, bmap, states, it, par, n_in, n_out, W, rs, cs, sbase,
              t_base, p16, k0, wok, g_lane, mo, ra, t):  # fmt: skip
        # 1. stage it landed (this thread's copies: the wait; everyone's: the barrier)
        #    and is visible to wgmma's async proxy; every warpgroup is past its wgmma
        #    wait of stage it - 1, so the slot of stage it - 1 - DEPTH is free
        cp_async_wait_group(WAIT)
        fence_proxy_async()
        cuda.syncthreads()
        # 2. A = M of stage it (A set par): bf16 1.0 where bmap == 0, else 0
        for ks in range(KS):
            for reg in range(4):
                af[par * KS + ks, reg] = (BF16_ONE_LO if ys[ks, 2 * reg] == 0 else ZI) | (
                    BF16_ONE_HI if ys[ks, 2 * reg + 1] == 0 else ZI
                )
        # 3. the tensor cores: D += A B over the stage's k-steps (rows past n_in are
        #    zeros; no branch here: ptxas would serialize the wgmma)
        if DEPTH == 0:
            wg_fence2(acc, NACC, af, NAF)
        else:  # the previous stage's wgmma may be in flight on acc: tie only A
            wg_fence(af, NAF)
        st = sbase + (it % STAGES) * STAGE_B
        for ks in range(KS):
            d = (((st + ks * 2048) & 0x3FFFF) >> 4) | HI_S
            wgmma(smem, acc, af, par * KS + ks, d, 1)
        wg_commit()
        # 4. while they run: the copies of stage it + AHEAD, the map bytes of it + 1
        issue_stage(smem, states, it + AHEAD, n_in, W, sbase, t_base, p16, k0, wok, g_lane)
        load_map(ys, bmap, it * KB + KB, n_in, n_out, mo, ra, t, rs, cs)
        # 5. depth 0: this stage's wgmma done; depth 1: the previous stage's (its A set
        #    is rewritten next stage, its slot refilled after the next barrier)
        if DEPTH == 0:
            wg_wait(acc, NACC, 0)
        else:  # (tying acc here would define the registers of the wgmma in flight)
            wg_wait(acc, 0, 1)

    @cuda.jit(device=True, inline="always")
    def stage_s(smem, smem32, acc, ym, bmap, states, it, n_in, n_out, W, cs, sbase, t_base,
                p16, k0, wok, g_lane, mo2, rg, ch, wrow, rx, h, a_wg):  # fmt: skip
        # a_smem: A = M from shared memory too. 1. M of stage it (its bytes loaded during
        # the last stage) -> M slot it % STAGES, whose last reader (the wgmma of stage
        # it - STAGES) is done everywhere since the last barrier
        slot = it % STAGES
        store_m(smem32, ym, wrow + slot * (MSLOT_B // 4), rx, h)
        # 2. S of stage it landed everywhere; M and S visible to the async proxy
        cp_async_wait_group(WAIT)
        fence_proxy_async()
        cuda.syncthreads()
        # 3. D += A B, both operands by descriptor: nothing but acc in registers
        if DEPTH == 0:
            wg_fence(acc, NACC)
        else:  # the previous stage's wgmma may still run on acc: tie nothing
            wg_fence(acc, 0)
        st = sbase + slot * STAGE_B
        sm = a_wg + slot * MSLOT_B
        for ks in range(KS):
            da = (((sm + ks * 32) & 0x3FFFF) >> 4) | HI_A
            db = (((st + ks * 2048) & 0x3FFFF) >> 4) | HI_S
            wgmma_ss(smem, acc, da, db, 1)
        wg_commit()
        # 4. while they run: the copies of stage it + AHEAD, the map bytes of it + 1
        issue_stage(smem, states, it + AHEAD, n_in, W, sbase, t_base, p16, k0, wok, g_lane)
        load_rows(ym, bmap, ch + it * KB + KB, n_in, n_out, mo2, rg, cs)
        # 5. depth 0: this stage's wgmma done; depth 1: the previous stage's
        if DEPTH == 0:
            wg_wait(acc, NACC, 0)
        else:
            wg_wait(acc, 0, 1)

    @kernel()
    def marginal_sum_wgmma(bmap, m_size, rs, cs, n_out, n_in, states, s_rows, out, o_rows, W):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        smem32 = cuda.shared.array(0, int32, alignment=SMEM_ALIGN)  # (the same bytes)
        acc = cuda.local.array((1, NJ, 4), float32)  # D: 64 x N of this warpgroup
        af = cuda.local.array((AFR, 4), int32)  # A = M, set par, k-step ks
        ys = cuda.local.array((KS, 8), int32)  # the map bytes of the next stage
        ym = cuda.local.array((PPT, 8), int32)  # ... a_smem: this thread's M bytes
        tid = cuda.threadIdx.x
        wg = tid >> 7
        lane = tid & 31
        g = lane >> 2
        t = lane & 3
        r0 = cuda.blockIdx.x * RT
        w0 = cuda.blockIdx.y * N
        bh = cuda.blockIdx.z
        sbase = int32((smem_addr(smem) + 1023) & ~1023)  # 1024-aligned (swizzle atoms)

        # --- copy role: column n_el .. n_el + V of rows k0 + RPP*i of each stage
        q = tid % CPR
        k0 = tid // CPR
        n_el = q * V
        p16 = (n_el % CHUNK_COLS) // 8  # its 16-byte piece in a 128-byte row
        t_base = (n_el // CHUNK_COLS) * CHUNK_B + 2 * (n_el % 8)
        wok = w0 + n_el < W  # V divides W: wholly inside or wholly outside
        g_lane = (bh * s_rows + k0) * W + w0 + n_el  # element offset at c = 0 (int64)

        # --- A role: rows ra, ra + 8 of M; columns 2t, 2t + 1 (+ 8) of each k-step
        ra = r0 + 64 * wg + 16 * ((tid >> 5) & 3) + g
        mo = bh * m_size + ra * rs + 2 * t * cs  # bmap offset of M[ra, 2t]

        # --- a_smem M role: half h of row rr of the warpgroup's 64 x KB M tile
        tw = tid & 127
        rr = tw >> 1
        h = tw & 1
        rg = r0 + 64 * wg + rr
        mo2 = bh * m_size + rg * rs  # bmap offset of M[rg, 0]
        a_wg = sbase + MOFF + wg * 64 * ROW_BYTES  # this warpgroup's M tile in slot 0
        wrow = (a_wg - smem_addr(smem) + rr * ROW_BYTES) >> 2  # its row, int32 index

        for j in range(NJ):
            for e in range(4):
                acc[0, j, e] = ZERO
        nst = (n_in + KB - 1) // KB

        # prologue: stages 0 .. AHEAD - 1 in flight (one group each), map of stage 0
        for s in range(AHEAD):
            issue_stage(smem, states, s, n_in, W, sbase, t_base, p16, k0, wok, g_lane)
        if A_SMEM:
            load_rows(ym, bmap, HALF * h, n_in, n_out, mo2, rg, cs)
            for it in range(nst):
                stage_s(smem, smem32, acc, ym, bmap, states, it, n_in, n_out, W, cs, sbase,
                        t_base, p16, k0, wok, g_lane, mo2, rg, HALF * h, wrow, rr & 7, h,
                        a_wg)  # fmt: skip
            if DEPTH == 1:
                wg_wait(acc, NACC, 0)
        elif DEPTH == 0:
            load_map(ys, bmap, 0, n_in, n_out, mo, ra, t, rs, cs)
            for it in range(nst):
                stage(smem, acc, af, ys, bmap, states, it, 0, n_in, n_out, W, rs, cs, sbase,
                      t_base, p16, k0, wok, g_lane, mo, ra, t)  # fmt: skip
        else:  # two stages a trip: the A set of each is a constant
            load_map(ys, bmap, 0, n_in, n_out, mo, ra, t, rs, cs)
            for it in range(0, nst, 2):
                stage(smem, acc, af, ys, bmap, states, it, 0, n_in, n_out, W, rs, cs, sbase,
                      t_base, p16, k0, wok, g_lane, mo, ra, t)  # fmt: skip
                if it + 1 < nst:
                    stage(smem, acc, af, ys, bmap, states, it + 1, 1, n_in, n_out, W, rs, cs,
                          sbase, t_base, p16, k0, wok, g_lane, mo, ra, t)  # fmt: skip
            wg_wait(acc, NACC, 0)

        # epilogue: D fragments to out (rows < n_out, columns < W)
        for h in range(2):
            r = ra + 8 * h
            if r < n_out:
                ob = (bh * o_rows + r) * W + w0 + 2 * t
                wl = W - (w0 + 2 * t)  # columns left from this thread's first
                for j in range(NJ):
                    for x in range(2):
                        if 8 * j + x < wl:
                            out[u64(ob + 8 * j + x)] = acc[0, j, 2 * h + x]

    return MarginalKernel(marginal_sum_wgmma, G["SMEM_BYTES"], NT)


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------


def launch_marginal_sum_wgmma(stream, bmap, transposed, n_out, n_in, states, out, config=None):
    """``out[b, h, :n_out] = M · states[b, h, :n_in]`` on wgmma, on ``stream``.

    bmap int8 (B, H, Mq, Mk); states bf16 bits int16 (B, H, >= n_in, W), W even; out
    fp32 (B, H, >= n_out, W); C-contiguous device arrays (numpy under the simulator).
    ``transposed`` as ``tc/marginal.py``'s ``launch_marginal_sum_tc``. ``config``: a
    :class:`Config` (None: :data:`CONFIG`). A configuration the kernel does not take
    is a ValueError (:func:`wgmma_marginal_unsupported_reason`).
    """
    if dtype_name(out) != "float32":
        raise TypeError("launch_marginal_sum_wgmma: out must be float32")
    W = int(states.shape[3])
    reason = wgmma_marginal_unsupported_reason(np.dtype(dtype_name(states)), W)
    if reason is not None:
        raise ValueError(f"launch_marginal_sum_wgmma: {reason}")
    B, H, Mq, Mk = (int(s) for s in bmap.shape)
    s_rows, o_rows = int(states.shape[2]), int(out.shape[2])
    n_out, n_in = int(n_out), int(n_in)
    if (
        n_in > s_rows
        or n_out > o_rows
        or n_in > (Mq if transposed else Mk)
        or n_out > (Mk if transposed else Mq)
    ):
        raise ValueError("launch_marginal_sum_wgmma: n_out / n_in exceed the arrays")
    if n_out <= 0 or W <= 0 or B * H <= 0:
        return
    config = Config(*(CONFIG if config is None else config))
    chunk = chunk_bytes(states, W)
    kern = make_marginal_kernel_wgmma(config, chunk)
    grid = (-(-n_out // (64 * config.wgs)), -(-W // config.n), B * H)
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError("launch_marginal_sum_wgmma: W or B*H too large for the grid")
    rs, cs = (1, Mk) if transposed else (Mk, 1)
    args = (flat(bmap), Mq * Mk, rs, cs, n_out, n_in, flat(states), s_rows, flat(out), o_rows, W)
    _tc_build.launch(kern.kernel, grid, kern.threads, kern.smem_bytes, stream, args)
