"""Sparse-branch forward on Hopper warpgroup MMA (``wgmma``; compute capability 9.0).

The same computation, arguments and outputs as ``tc/forward.py`` (read that one
first): for every (b, h) and query block i, FlashAttention-2 over the critical key
blocks ``lut[b, h, i, :counts[b, h, i]]``::

    O_s[r] = sum_c softmax_c(scale * q_r . k_c) v_c      lse[r] = log sum_c exp(scale * q_r . k_c)

but the two products of each key block are ``wgmma.mma_async`` instructions of a
whole warpgroup (``tc/wgmma.py``) instead of ``mma.sync`` of single warps. Opt-in:
``SLA_NUMBA_SPARSE_FWD=wgmma`` (``config.py``). Takes fp16 / bf16, ``block_q =
block_k = 64``, D in {64, 128}; anything else is refused (:func:`wgmma_unsupported_reason`).

Work decomposition
------------------
One CTA = one query block of 64 rows = one warpgroup (4 warps, 128 threads) = the M
of one ``m64nNk16``. Grid = (Mq, B*H), as for the mma.sync kernel.

Shared memory (128-byte swizzle, ``tc/wgmma.py``; every tile 64 rows x D, stored as
D/64 column chunks of 64 rows x 128 bytes = 8 KiB, 1024-aligned)::

    Q | K stage 0 | K stage 1 | V stage 0 | V stage 1        5 tiles: 80 KiB at D = 128

Q and K are read *K-major* (a row = one query / key, its D values contiguous: the
layout wgmma reads without transposing); V is read *MN-major* (a row = one key, the D
output columns contiguous) with ``imm-trans-b = 1`` -- no transposed copy of V.

Pipeline (one iteration per critical key block ``kb = lut[it]``, stage ``st = it & 1``)::

    cp.async Q, K[lut[0]], V[lut[0]] -> stage 0
    for it:
        wait for stage st; fence.proxy.async; barrier      # also: block it-1 is done everywhere
        cp.async K, V of lut[it + 1] -> stage 1 - st        # lands during this block's work
        S = Q K^T      D/16 wgmma m64n64k16, both operands from shared memory
        mask keys >= Nk (the sequence's last block only); online softmax in registers
        P = 2^(S c2 - m) packed to 16 bits in registers
        O += P V       4 wgmma m64nDk16, A = P from registers, B = V from shared memory
        wait for the wgmma (stage st is refilled only after the next block's barrier)
    O /= l; lse = (m + log2 l) * ln 2

Each ``wgmma`` group is committed and waited for at once (``wait_group 0``): the
softmax needs S, and the next S overwrites the registers P came from. The overlap is
between the copies of the next block and the tensor-core work of this one, and between
the CTAs an SM holds (two at D = 128: 81 KiB of shared memory each): while one
warpgroup does its softmax, the other's wgmma run. (FA3's producer warp and the
two-warpgroup ping-pong are not used: a first version that is simple to check.)

A second variant, ``v_stages=1``, keeps one V buffer (Q | K0 | K1 | V: 65 KiB at D =
128, so three CTAs fit an SM; 168 registers x 128 threads x 3 still fit the register
file): V[kb] is copied after the block's first barrier, during S and the softmax, and
a second wait + barrier comes before P.V, as in ``tc/forward.py``. Which one is faster
is for the GPU to say (``tools/sweep_sparse_wgmma.py`` times them); ``V_STAGES`` and
``OVERLAP`` pick the default.

Overlapped variant (``overlap=True``, FA3's intra-warpgroup overlap)
-------------------------------------------------------------------
The softmax of block it + 1 runs while the tensor cores do P.V of block it. Block 0's
S and P are computed before the loop; then per block::

    wait; fence.proxy.async; barrier          # K[it+1], V[it] landed; P.V[it-1] done everywhere
    cp.async K[it+2] -> the K stage S[it] read;  V[it+1] -> the V stage P.V[it-1] read
    wgmma.fence
    S[it+1] = Q K[it+1]^T  (commit group 1)    O += P[it] V[it]  (commit group 2)
    wait_group 1                               # S[it+1] done, P.V[it] may still run ...
    mask + softmax of S[it+1] (m, l, alpha)    # ... during this
    wait_group 0                               # P.V[it] done: O and the P registers are free
    O *= alpha; pack P[it+1]

Same registers (S's accumulators are free once P[it] is packed), one barrier a block,
both copies a whole block ahead. The wgmma twins run a group only at the wait that
covers it, so rescaling O or repacking P before ``wait_group 0`` fails under the
simulator (tested by hand: moving that line makes the fp16 test fail).

Fragment ownership (``tc/wgmma.py``; ``w = tid >> 5``, ``g = lane >> 2``, ``t = lane & 3``):
warp ``w`` owns query rows ``16w .. 16w + 15`` of the block, the lane rows
``16w + g`` and ``16w + g + 8``. ``s[0, n, e]`` is S (then P) at row ``16w + g + 8*(e >> 1)``,
key column ``8n + 2t + (e & 1)``: exactly the layout of ``tc/forward.py`` with one m-tile
(the m64nN accumulator is the m16n8 C layout per warp, repeated along N), so the row
reductions (quad shuffles) and ``pack_a`` are the same code; ``pack_a`` of n-tiles
``2kk, 2kk + 1`` is wgmma's register-A fragment of k-step ``kk``. ``acc[0, d, e]``
likewise holds O at column ``8d + 2t + (e & 1)``.

``wgmma.fence`` comes before the first S wgmma of a block (the S registers were read
by the last block's softmax) and before the P.V wgmma (P was just written, O just
rescaled); the fence and wait intrinsics tie those registers so the compiler cannot
move their ordinary reads / writes across.

Order of accumulation: S sums its D/16 k-steps in one accumulator, O its 4 k-steps
of 16 keys per block, as the mma.sync kernel does, but inside a wgmma the hardware's
order is its own: results agree with ``tc/forward.py`` to fp32 rounding, not bitwise.
"""

import functools
import math

import numpy as np
from numba import float32, int16, int32

from ..._params import LSE_EMPTY
from .._compat import cuda, kernel
from .._precompile import kernel_factory
from . import build as _tc_build
from .forward import _dtype_name
from .ptx import (
    LOG2E,
    SIMULATED,
    cp_async_commit,
    cp_async_wait_group,
    cp_async_zfill,
    exp2,
    fmax,
    shfl_xor,
    smem_addr,
)
from .tiles import (
    NEG_INF,
    ONE,
    SMEM_ALIGN,
    TC_FASTMATH,
    ZERO,
    TCKernel,
    fill_rows,
    make_mma,
    make_pair_store,
    out_kind_of,
    out_zero,
    row_max_tree,
    row_sum_tree,
)
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

#: The one query / key block size of this kernel (= wgmma's M, and S's N).
BLOCK = 64
#: Head dims it takes (the O accumulator is m64n{D}: D/2 fp32 registers a thread).
HEAD_DIMS = (64, 128)
#: The default variant (:func:`make_sparse_forward_wgmma`): V buffers, and whether the
#: softmax overlaps P.V. The H200 (session 8, ``tools/sweep_sparse_wgmma.py``, Wan shape
#: bf16, 5 % of blocks) chose per head dim: D = 128 one V buffer (0.857 ms against 0.935
#: with two, 1.112 overlapped; mma.sync 1.270), D = 64 two (0.577 against 0.603 / 0.766;
#: mma.sync 0.821). ``V_STAGES`` is the fallback of :func:`default_v_stages`.
V_STAGES = 2
V_STAGES_BY_D = {128: 1, 64: 2}
OVERLAP = False
THREADS = 128
#: Bytes of one 64-row column chunk (64 x 128 bytes), the tile unit in shared memory.
CHUNK_BYTES = BLOCK * 128
#: Descriptor fields: K-major (Q, K): SBO 1024 (8 rows), LBO unused (16);
#: MN-major (V): LBO = the distance of two 64-column chunks, SBO 1024 (8 keys).
K_MAJOR_LBO, SBO = 16, 1024
V_LBO = CHUNK_BYTES


def default_v_stages(D):
    """The measured-fastest V buffering for head dim ``D`` (``V_STAGES_BY_D``)."""
    return V_STAGES_BY_D.get(D, V_STAGES)


def wgmma_device_ok(device=None):
    """A CUDA device of compute capability 9.0 (True under the simulator). wgmma is
    Hopper's alone: sm_90a; later architectures (sm_100a, ...) do not have it."""
    if SIMULATED:
        return True
    try:
        from numba import cuda as _cuda

        if not _cuda.is_available():
            return False
        if device is None:
            cc = _tc_build.uniform_cc()
            if cc is not None:  # every GPU alike (build.uniform_cc)
                return cc == (9, 0)
            idx = _cuda.get_current_device().id
        else:
            idx = device if isinstance(device, int) else (getattr(device, "index", None) or 0)
        return _compute_capability(int(idx)) == (9, 0)
    except Exception:  # noqa: BLE001 - no driver / no such device
        return False


@functools.cache
def _compute_capability(idx):
    from numba import cuda as _cuda

    return tuple(_cuda.gpus[idx].compute_capability)


def wgmma_unsupported_reason(dtype, head_dim, block_q, block_k, device=None):
    """None when the wgmma kernel takes this configuration, else why not (a sentence)."""
    name = {"bf16": "bfloat16", "f16": "float16"}.get(dtype, _dtype_name(dtype))
    if name not in ("float16", "bfloat16"):
        return f"dtype {name} (needs float16 or bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (supported: 64, 128)"
    if block_q != BLOCK or block_k != BLOCK:
        return f"block_q {block_q}, block_k {block_k} (supported: 64 and 64)"
    if not wgmma_device_ok(device):
        return "no CUDA device of compute capability 9.0 (wgmma is Hopper's)"
    return None


def smem_layout(D, v_stages=2):
    """Byte offsets (from the 1024-aligned base) of Q, K stage 0 / 1, V stage 0 (/ 1), and
    the dynamic shared-memory bytes to ask for (+1024 for the alignment)."""
    tile = (D // CHUNK_COLS) * CHUNK_BYTES
    v = (3 * tile, 4 * tile) if v_stages == 2 else (3 * tile,)
    return dict(q=0, k=(tile, 2 * tile), v=v, bytes=(3 + v_stages) * tile + 1024)


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------


@functools.cache
@kernel_factory
def make_sparse_forward_wgmma(D, kind, v_stages=V_STAGES, overlap=OVERLAP, out_kind="f32"):
    """The wgmma forward kernel for head dim ``D`` (64 / 128) and inputs ``kind`` 'bf16' /
    'f16', as a :class:`TCKernel`. Launch: grid ``(Mq, B*H)``, 128 threads; the
    arguments of ``tc/forward.py``'s kernel: ``(q, k, v, lut, counts, o, lse, nq, nk, mq,
    n_lut, c2)``, q / k / v flat int16 bits, ``c2 = scale * log2(e)``.

    ``v_stages``: 2 (K and V double-buffered, one barrier a key block; the module
    docstring's pipeline) or 1 (V single-buffered: V[kb] is copied during S and the
    softmax and waited for before P.V, two barriers a key block, as ``tc/forward.py``;
    a fifth less shared memory: 65 KiB at D = 128, so three CTAs fit an SM instead of two).
    ``overlap`` (with ``v_stages=2``): the softmax of block it + 1 runs while the P.V
    wgmma of block it are in flight (module docstring, "Overlapped variant").
    ``out_kind``: "f32" (o float32) or the 16-bit output as int32 pairs (``tc/forward.py``).
    """
    if D not in HEAD_DIMS or kind not in ("bf16", "f16") or v_stages not in (1, 2):
        raise ValueError(f"wgmma forward: D={D}, kind={kind!r}, v_stages={v_stages} unsupported")
    if overlap and v_stages != 2:
        raise ValueError("wgmma forward: overlap needs v_stages=2")
    VST = v_stages
    OVL = bool(overlap)
    BK = BLOCK
    DC = D // CHUNK_COLS  # 64-column chunks of a tile
    KS = D // 16  # k-steps of S = Q K^T
    NTILE = BK // 8  # n8 tiles of S
    PK = BK // 16  # k-steps of O += P V
    DTILE = D // 8  # n8 tiles of O
    NS, NO = BK // 2, D // 2  # accumulator registers a thread: S, O
    NAF = PK * 4  # P registers a thread
    lay = smem_layout(D, v_stages)
    QOFF, KOFF0, VOFF0 = lay["q"], lay["k"][0], lay["v"][0]
    STAGE = lay["k"][1] - lay["k"][0]  # bytes between the two stages
    VSTAGE = STAGE if VST == 2 else 0  # (V: one buffer when VST == 1)
    SMEM_BYTES = lay["bytes"]
    HI_K = np.int64(desc_hi(K_MAJOR_LBO, SBO))  # fixed descriptor fields of Q and K
    HI_V = np.int64(desc_hi(V_LBO, SBO))  # of V (MN-major)
    store = make_pair_store(out_kind)  # o: fp32, or 16-bit pairs (tc/forward.py)
    HALF = out_kind != "f32"
    OZ = out_zero(out_kind)
    wgmma_s = make_wgmma_ss(kind, BK)
    wgmma_o = make_wgmma_rs(kind, D)
    _, pack_a = make_mma(kind)
    row_max, row_sum = row_max_tree(NTILE), row_sum_tree(NTILE)
    lse_empty, ln2 = np.float32(LSE_EMPTY), np.float32(math.log(2.0))

    @cuda.jit(device=True, inline="always")
    def load_tile(smem, dst, src, gbase, row0, nvalid, t_off, rr, ch):
        # this thread's 16-byte pieces of a 64-row tile: piece ch of rows rr + 16p of
        # every column chunk, at the swizzled place t_off (the same for every p and
        # chunk: (rr + 16p) % 8 == rr % 8); rows past nvalid are zero-filled
        for p in range(BLOCK // 16):
            r = rr + 16 * p
            ok = r < nvalid
            g = gbase + (row0 + r) * D + ch * 8 if ok else gbase
            for dc in range(DC):
                cp_async_zfill(
                    smem,
                    dst + t_off + dc * CHUNK_BYTES + p * 2048,
                    16,
                    src,
                    g + dc * CHUNK_COLS,
                    16 if ok else 0,
                )

    @cuda.jit(device=True, inline="always")
    def issue_s(smem, s, q_addr, k_addr):
        # S = Q K^T: D/16 k-steps, both operands K-major from shared memory (no commit)
        for ks in range(KS):
            koff = (ks // 4) * CHUNK_BYTES + (ks % 4) * 32
            dq = (((q_addr + koff) & 0x3FFFF) >> 4) | HI_K
            dk = (((k_addr + koff) & 0x3FFFF) >> 4) | HI_K
            wgmma_s(smem, s, dq, dk, 0 if ks == 0 else 1)

    @cuda.jit(device=True, inline="always")
    def issue_pv(smem, acc, af, v_addr):
        # O += P V: A = P from registers, B = V MN-major from shared memory (no commit)
        for kk in range(PK):
            dv = (((v_addr + kk * 2048) & 0x3FFFF) >> 4) | HI_V
            wgmma_o(smem, acc, af, kk, dv, 1)

    @cuda.jit(device=True, inline="always")
    def softmax(s, m, l, al, nvalid, t, c2):
        # The sequence's last, partial key block: keys past Nk get -inf.
        if nvalid < BK:
            for n in range(NTILE):
                for odd in range(2):
                    if 8 * n + 2 * t + odd >= nvalid:
                        s[0, n, odd] = NEG_INF
                        s[0, n, odd + 2] = NEG_INF
        # Online softmax, base 2 (as tc/forward.py): m = max(m, c2 * rowmax S),
        # P = 2^(c2 S - m), l = l * alpha + rowsum P; O is to be scaled by al = alpha.
        for r in range(2):
            mx = row_max(s, 0, r, 0)
            mx = fmax(mx, shfl_xor(mx, 1))
            mx = fmax(mx, shfl_xor(mx, 2))
            m_new = fmax(m[0, r], mx * c2)
            alpha = exp2(m[0, r] - m_new)
            m[0, r] = m_new
            for n in range(NTILE):
                for x in range(2):
                    s[0, n, 2 * r + x] = exp2(s[0, n, 2 * r + x] * c2 - m_new)
            l[0, r] = l[0, r] * alpha + row_sum(s, 0, r, 0)
            al[0, r] = alpha

    @cuda.jit(device=True, inline="always")
    def rescale_and_pack(acc, al, af, s):
        for r in range(2):
            for d in range(DTILE):
                for x in range(2):
                    acc[0, d, 2 * r + x] *= al[0, r]
        for kk in range(PK):
            pack_a(af, kk, s, 0, kk)

    @kernel(fastmath=TC_FASTMATH)
    def sla_fwd_wgmma(q, k, v, lut, counts, o, lse, nq, nk, mq, n_lut, c2):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        s = cuda.local.array((1, NTILE, 4), float32)  # S = Q K^T, then P
        acc = cuda.local.array((1, DTILE, 4), float32)  # O (unnormalised)
        af = cuda.local.array((PK, 4), int32)  # P as register-A fragments
        m = cuda.local.array((1, 2), float32)  # running row max (base 2)
        l = cuda.local.array((1, 2), float32)  # lane's partial row sums
        al = cuda.local.array((1, 2), float32)  # this block's rescale factor of O
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        g = lane >> 2
        t = lane & 3
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        row0 = qb * BLOCK
        q_base = bh * nq * D
        kv_base = bh * nk * D
        cnt = counts[bh * mq + qb]

        # A query block without critical key blocks: O = 0, lse = LSE_EMPTY.
        if cnt == 0:
            if HALF:
                fill_rows(o, q_base >> 1, row0, BLOCK, nq, D >> 1, OZ, tid, THREADS)
            else:
                fill_rows(o, q_base, row0, BLOCK, nq, D, OZ, tid, THREADS)
            fill_rows(lse, bh * nq, row0, BLOCK, nq, 1, lse_empty, tid, THREADS)
            return

        sbase = int32((smem_addr(smem) + 1023) & ~1023)  # 1024-aligned (swizzle atoms)
        rr = tid >> 3  # this thread's first row of a tile copy
        ch = tid & 7  # and its 16-byte piece of a 128-byte row
        t_off = rr * 128 + ((ch ^ (rr & 7)) << 4)
        lut_base = (bh * mq + qb) * n_lut

        # Stage Q and the first K (and V, double-buffered).
        kb = lut[lut_base]
        load_tile(smem, sbase + QOFF, q, q_base, row0, nq - row0, t_off, rr, ch)
        load_tile(smem, sbase + KOFF0, k, kv_base, kb * BK, nk - kb * BK, t_off, rr, ch)
        if VST == 2:
            load_tile(smem, sbase + VOFF0, v, kv_base, kb * BK, nk - kb * BK, t_off, rr, ch)
        cp_async_commit()

        m[0, 0] = NEG_INF
        m[0, 1] = NEG_INF
        l[0, 0] = ZERO
        l[0, 1] = ZERO
        for d in range(DTILE):
            for e in range(4):
                acc[0, d, e] = ZERO
        for n in range(NTILE):
            for e in range(4):
                s[0, n, e] = ZERO

        if OVL:
            # Overlapped: K[lut[1]] joins the prologue; S and P of block 0 come first.
            if cnt > 1:
                kn = lut[lut_base + 1]
                load_tile(
                    smem, sbase + KOFF0 + STAGE, k, kv_base, kn * BK, nk - kn * BK, t_off, rr, ch
                )
            cp_async_commit()
            cp_async_wait_group(1)  # Q, K[lut[0]], V[lut[0]] landed
            fence_proxy_async()
            cuda.syncthreads()
            wg_fence(s, NS)
            issue_s(smem, s, sbase + QOFF, sbase + KOFF0)
            wg_commit()
            wg_wait(s, NS, 0)
            softmax(s, m, l, al, nk - kb * BK, t, c2)
            rescale_and_pack(acc, al, af, s)
            for it in range(cnt):
                # here: af = P of block it, O rescaled for it; K of it + 1 and V of it
                # were copied during the last iteration
                st = it & 1
                cp_async_wait_group(0)
                fence_proxy_async()
                cuda.syncthreads()  # landed everywhere; P.V of it - 1 done everywhere
                if it + 2 < cnt:  # K of it + 2 -> the K stage S of it read
                    kn = lut[lut_base + it + 2]
                    load_tile(
                        smem, sbase + KOFF0 + st * STAGE, k, kv_base, kn * BK, nk - kn * BK,
                        t_off, rr, ch,
                    )  # fmt: skip
                if it + 1 < cnt:  # V of it + 1 -> the V stage P.V of it - 1 read
                    kn = lut[lut_base + it + 1]
                    load_tile(
                        smem, sbase + VOFF0 + (1 - st) * STAGE, v, kv_base, kn * BK,
                        nk - kn * BK, t_off, rr, ch,
                    )  # fmt: skip
                cp_async_commit()
                wg_fence2(acc, NO, af, NAF)
                wg_fence(s, NS)
                if it + 1 < cnt:  # S of it + 1 first, then P.V of it: two groups
                    issue_s(smem, s, sbase + QOFF, sbase + KOFF0 + (1 - st) * STAGE)
                    wg_commit()
                issue_pv(smem, acc, af, sbase + VOFF0 + st * STAGE)
                wg_commit()
                if it + 1 < cnt:
                    wg_wait(s, NS, 1)  # S of it + 1 done; P.V of it may still run ...
                    kn = lut[lut_base + it + 1]
                    softmax(s, m, l, al, nk - kn * BK, t, c2)  # ... during this
                wg_wait(acc, NO, 0)  # P.V of it done: O and af may be touched again
                if it + 1 < cnt:
                    rescale_and_pack(acc, al, af, s)
        else:
            for it in range(cnt):
                st = it & 1
                kb = lut[lut_base + it]
                cp_async_wait_group(0)  # this thread's copies of stage st landed
                fence_proxy_async()  # ... visible to wgmma (async proxy)
                cuda.syncthreads()  # everyone's landed; everyone is done with block it - 1
                if VST == 1:  # V[kb] -> its one buffer, during S and the softmax
                    load_tile(smem, sbase + VOFF0, v, kv_base, kb * BK, nk - kb * BK, t_off, rr, ch)
                    cp_async_commit()
                if it + 1 < cnt:  # the next block's K (, V) -> the other stage
                    kn = lut[lut_base + it + 1]
                    nxt = (1 - st) * STAGE
                    load_tile(
                        smem, sbase + KOFF0 + nxt, k, kv_base, kn * BK, nk - kn * BK,
                        t_off, rr, ch,
                    )  # fmt: skip
                    if VST == 2:
                        load_tile(
                            smem, sbase + VOFF0 + nxt, v, kv_base, kn * BK, nk - kn * BK,
                            t_off, rr, ch,
                        )  # fmt: skip
                cp_async_commit()  # (may be empty: the wait_group(1) below is then uniform)

                wg_fence(s, NS)
                issue_s(smem, s, sbase + QOFF, sbase + KOFF0 + st * STAGE)
                wg_commit()
                wg_wait(s, NS, 0)
                softmax(s, m, l, al, nk - kb * BK, t, c2)
                rescale_and_pack(acc, al, af, s)

                if VST == 1:
                    cp_async_wait_group(1)  # V[kb] landed (the next K may still be in flight)
                    fence_proxy_async()
                    cuda.syncthreads()  # ... everyone's

                wg_fence2(acc, NO, af, NAF)
                issue_pv(smem, acc, af, sbase + VOFF0 + st * VSTAGE)
                wg_commit()
                wg_wait(acc, NO, 0)  # (the next block's barrier frees stage st for refilling)

        # Epilogue: finish the row sums over the quad, normalise, write O and lse.
        for r in range(2):
            lt = l[0, r] + shfl_xor(l[0, r], 1)
            lt = lt + shfl_xor(lt, 2)
            inv = ONE / lt
            row = row0 + warp * 16 + 8 * r + g
            if row < nq:
                ob = q_base + row * D + 2 * t
                for d in range(DTILE):
                    store(o, ob + 8 * d, acc[0, d, 2 * r] * inv, acc[0, d, 2 * r + 1] * inv)
                if t == 0:
                    lse[bh * nq + row] = (m[0, r] + math.log2(lt)) * ln2

    return TCKernel(sla_fwd_wgmma, THREADS, SMEM_BYTES)


def _check(kind, D, block_q, block_k):
    reason = wgmma_unsupported_reason(kind, D, block_q, block_k)
    if reason is not None:
        from ... import config

        raise ValueError(
            f"{config.SPARSE_FWD_VAR}=wgmma: the wgmma sparse forward does not take {reason}"
        )


def launch_sparse_forward_wgmma(
    kind, q, k, v, lut, counts, o, lse, B, H, Nq, Nk, D, block_q, block_k, scale, stream
):
    """``tc/forward.py``'s ``launch_sparse_forward`` on the wgmma kernel (same arguments);
    a ValueError naming ``SLA_NUMBA_SPARSE_FWD`` for a configuration it does not take."""
    _check(kind, D, block_q, block_k)
    mq = -(-Nq // block_q)
    n_lut = int(lut.size) // max(1, B * H * mq)
    kern = make_sparse_forward_wgmma(D, kind, default_v_stages(D), OVERLAP, out_kind_of(o, kind))
    if n_lut == 0:
        lut = counts
    args = (q, k, v, lut, counts, o, lse, Nq, Nk, mq, max(n_lut, 1), np.float32(scale * LOG2E))
    _tc_build.launch(kern.kernel, (mq, B * H), kern.threads, kern.smem_bytes, stream, args)


def sparse_forward_wgmma(
    q, k, v, lut, counts, block_q, block_k, scale, v_stages=None, overlap=OVERLAP
):
    """Sparse (critical-block) attention forward on wgmma: ``sparse_forward_tc``'s
    arguments and results (``tc/forward.py``), for fp16 / bf16, D in {64, 128},
    ``block_q = block_k = 64`` on a GPU of compute capability 9.0 (or the simulator).
    ``v_stages`` (None: :func:`default_v_stages`), ``overlap``: the kernel variant
    (:func:`make_sparse_forward_wgmma`).

    Example (an H100 / H200; or CPU tensors with ``NUMBA_ENABLE_CUDASIM=1``, slowly)::

        >>> import torch
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k, v = (torch.randn(1, 1, 64, 64, device=dev).bfloat16() for _ in range(3))
        >>> lut = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)
        >>> counts = torch.ones(1, 1, 1, dtype=torch.int32, device=dev)
        >>> o, lse = sparse_forward_wgmma(q, k, v, lut, counts, 64, 64, 64 ** -0.5)
        >>> tuple(o.shape), tuple(lse.shape)
        ((1, 1, 64, 64), (1, 1, 64))
    """
    kind = _tc_build.half_kind(q)
    B, H, Nq, D = (int(s) for s in q.shape)
    _check(kind or str(q.dtype), D, block_q, block_k)
    Nk = int(k.shape[2])
    mq = -(-Nq // block_q)
    n_lut = int(lut.shape[-1])
    ad = _tc_build.ArrayAdapter(q)
    kern = make_sparse_forward_wgmma(D, kind, v_stages or default_v_stages(D), overlap)
    o = ad.empty((B, H, Nq, D), np.float32)
    lse = ad.empty((B, H, Nq), np.float32)
    cnt = ad.flat(counts, np.int32)
    lut_f = ad.flat(lut, np.int32) if n_lut else cnt
    args = (
        ad.bits(q),
        ad.bits(k),
        ad.bits(v),
        lut_f,
        cnt,
        o,
        lse,
        Nq,
        Nk,
        mq,
        max(n_lut, 1),
        np.float32(scale * LOG2E),
    )
    _tc_build.launch(kern.kernel, (mq, B * H), kern.threads, kern.smem_bytes, ad.stream(), args)
    return ad.wrap(o, (B, H, Nq, D)), ad.wrap(lse, (B, H, Nq))
