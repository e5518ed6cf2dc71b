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

Fragment ownership (``g = lane >> 2``, ``t = lane & 3``; see ``tc/ptx.py`` and
``tc/tiles.py``). Warp ``w`` owns query rows ``16*MT*w .. 16*MT*(w+1)`` of the block,
m-tile ``mt`` of it 16 rows, of which the lane holds rows ``g`` and ``g + 8``:
``s[mt, n, e]`` is S (then P) at row ``g + 8*(e >> 1)``, key column ``8n + 2t + (e & 1)``;
``acc[mt, d, e]`` likewise O at head-dim column ``8d + 2t + (e & 1)``; ``m[mt, r]``,
``l[mt, r]`` the running max (scaled, base 2) and the lane's partial sum of row half
``r``. Row maxima are reduced across the four lanes of a quad with ``shfl_xor`` 1
and 2 every block; the sums only once, at the end. These arrays are
``cuda.local.array`` s indexed by fully unrolled loops: registers, no local memory.

Outputs
-------
``o_s`` float32 (B, H, Nq, D) and ``lse`` float32 (B, H, Nq), the backend
contract's compute dtype (the API casts O back to the input dtype). A query
block with ``counts == 0`` gets ``o_s = 0`` and ``lse = LSE_EMPTY``. Keys past
Nk are zero-filled in shared memory and masked to -inf; query rows past Nq are
computed on zeros and never written.
"""

import functools
import math

import numpy as np
from numba import float32, int16, int32

from ... import config
from ..._params import LSE_EMPTY
from .._compat import cuda, kernel
from .._precompile import kernel_factory
from . import build as _tc_build
from .ptx import (
    LOG2E,
    SIMULATED,
    cp_async_commit,
    cp_async_wait_all,
    exp2,
    fmax,
    ldsm_x4,
    ldsm_x4_trans,
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
    frag_rows_a,
    frag_rows_bt,
    load_a,
    make_mma,
    make_pair_store,
    make_tile_loader,
    out_kind_of,
    out_zero,
    row_max_tree,
    row_sum_tree,
    smem_stride,
)

#: Head dims the kernels support (registers bound it above; multiples of 16).
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)


def tile_config(block_q):
    """(warps, m-tiles per warp) for a query block of ``block_q`` rows, or None."""
    return {16: (1, 1), 32: (1, 2), 64: (4, 1), 128: (4, 2)}.get(block_q)


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
    if not _tc_build.device_ok(device):
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
# The kernel
# ---------------------------------------------------------------------------


@functools.cache
@kernel_factory
def make_sparse_forward(D, block_k, block_q, kind, out_kind="f32"):
    """The forward kernel for head dim ``D``, key blocks of ``block_k``, query blocks
    of ``block_q`` rows and inputs ``kind`` 'bf16' / 'f16', as a :class:`TCKernel`
    (kernel, threads, dynamic shared-memory bytes). Compiled at its first launch,
    then loaded from Numba's disk cache.

    Launch: grid ``(Mq, B*H)``; arguments ``(q, k, v, lut, counts, o, lse, nq, nk,
    mq, n_lut, c2)``: q (B, H, Nq, D), k, v (B, H, Nk, D) as flat int16 bits;
    lut (B, H, Mq, n_lut) and counts (B, H, Mq) flat int32; o (B, H, Nq, D) and
    lse (B, H, Nq) flat float32 outputs; ``c2 = scale * log2(e)``. ``out_kind``
    "bf16" / "f16" (``tiles.make_pair_store``): o holds the 16-bit output instead, as
    its flat int32 view (pairs), rounded to nearest even.
    """
    NW, MT = tile_config(block_q)
    BQ, BK, NT = block_q, block_k, NW * 32
    SD = smem_stride(D)  # padded row stride, in halves
    QOFF, KOFF, VOFF = 0, BQ * SD, (BQ + BK) * SD  # tiles in shared memory
    KS = D // 16  # k-steps of S = Q K^T
    NTILE = BK // 8  # n-tiles of S (8 key columns each)
    PK = BK // 16  # k-steps of O += P V
    DP = D // 16  # pairs of n-tiles of O
    DTILE = D // 8  # n-tiles of O (8 head-dim columns each)
    ROWS = 16 * MT  # query rows of one warp
    SMEM_BYTES = (BQ + 2 * BK) * SD * 2
    load_q = make_tile_loader(D, BQ, NT)
    load_kv = make_tile_loader(D, BK, NT)
    mma_acc, pack_a = make_mma(kind)
    row_max, row_sum = row_max_tree(NTILE), row_sum_tree(NTILE)
    lse_empty, ln2 = np.float32(LSE_EMPTY), np.float32(math.log(2.0))
    store = make_pair_store(out_kind)
    HALF = out_kind != "f32"  # o holds pairs of 16-bit values
    OZ = out_zero(out_kind)

    @kernel(fastmath=TC_FASTMATH)
    def sla_fwd_tc(q, k, v, lut, counts, o, lse, nq, nk, mq, n_lut, c2):
        smem = cuda.shared.array(0, int16, alignment=SMEM_ALIGN)
        s = cuda.local.array((MT, NTILE, 4), float32)  # S = Q K^T, then P
        acc = cuda.local.array((MT, DTILE, 4), float32)  # O (unnormalised)
        m = cuda.local.array((MT, 2), float32)  # running row max (base 2)
        l = cuda.local.array((MT, 2), float32)  # lane's partial row sums
        af = cuda.local.array((MT, 4), int32)  # A fragments: Q, then P
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        g = lane >> 2
        t = lane & 3
        qb = cuda.blockIdx.x
        bh = cuda.blockIdx.y
        row0 = qb * BQ
        q_base = bh * nq * D
        kv_base = bh * nk * D
        cnt = counts[bh * mq + qb]

        # A query block without critical key blocks: O = 0, lse = LSE_EMPTY.
        if cnt == 0:
            if HALF:
                fill_rows(o, q_base >> 1, row0, BQ, nq, D >> 1, OZ, tid, NT)
            else:
                fill_rows(o, q_base, row0, BQ, nq, D, OZ, tid, NT)
            fill_rows(lse, bh * nq, row0, BQ, nq, 1, lse_empty, tid, NT)
            return

        # Stage Q and the first K tile.
        sa = smem_addr(smem)
        lut_base = (bh * mq + qb) * n_lut
        kb = lut[lut_base]
        load_q(smem, sa, QOFF, q, q_base, row0, nq - row0, tid)
        load_kv(smem, sa, KOFF, k, kv_base, kb * BK, nk - kb * BK, tid)
        cp_async_commit()

        # This lane's ldmatrix row addresses: Q rows of its warp (A), K rows (B of
        # K^T, non-transposed), V rows (B of V, transposed). Every load below adds
        # a compile-time constant to one of these.
        q_addr = int32(sa + (QOFF + warp * ROWS * SD + frag_rows_a(lane, SD)) * 2)
        k_addr = int32(sa + (KOFF + frag_rows_bt(lane, SD)) * 2)
        v_addr = int32(sa + (VOFF + frag_rows_a(lane, SD)) * 2)

        for mt in range(MT):
            for r in range(2):
                m[mt, r] = NEG_INF
                l[mt, r] = ZERO
            for d in range(DTILE):
                for e in range(4):
                    acc[mt, d, e] = ZERO

        for it in range(cnt):
            cp_async_wait_all()
            cuda.syncthreads()  # K[kb] landed; everyone is done with V[prev]
            nvalid = nk - kb * BK  # keys of this block inside the sequence
            load_kv(smem, sa, VOFF, v, kv_base, kb * BK, nvalid, tid)
            cp_async_commit()  # V[kb] streams in during S and the softmax

            # S = Q K^T: per k-step, one A fragment per m-tile, one ldmatrix of K
            # per pair of n-tiles, shared by the m-tiles.
            for mt in range(MT):
                for n in range(NTILE):
                    for e in range(4):
                        s[mt, n, e] = ZERO
            for ks in range(KS):
                for mt in range(MT):
                    load_a(af, mt, smem, q_addr + (mt * 16 * SD + ks * 16) * 2)
                for np_ in range(NTILE // 2):
                    b0, b1, b2, b3 = ldsm_x4(smem, k_addr + (np_ * 16 * SD + ks * 16) * 2, 0)
                    for mt in range(MT):
                        mma_acc(s, mt, 2 * np_, af, mt, b0, b1)
                        mma_acc(s, mt, 2 * np_ + 1, af, mt, b2, b3)

            # The sequence's last, partial key block: keys past Nk get -inf.
            if nvalid < BK:
                for n in range(NTILE):
                    for odd in range(2):
                        if 8 * n + 2 * t + odd >= nvalid:
                            for mt in range(MT):
                                s[mt, n, odd] = NEG_INF
                                s[mt, n, odd + 2] = NEG_INF

            # Online softmax, base 2: m = max(m, c2 * rowmax S), P = 2^(c2 S - m),
            # l = l * 2^(m_old - m) + rowsum P, O *= 2^(m_old - m).
            for mt in range(MT):
                for r in range(2):
                    mx = row_max(s, mt, r, 0)
                    mx = fmax(mx, shfl_xor(mx, 1))
                    mx = fmax(mx, shfl_xor(mx, 2))
                    m_new = fmax(m[mt, r], mx * c2)
                    alpha = exp2(m[mt, r] - m_new)
                    m[mt, r] = m_new
                    for n in range(NTILE):
                        for x in range(2):
                            s[mt, n, 2 * r + x] = exp2(s[mt, n, 2 * r + x] * c2 - m_new)
                    l[mt, r] = l[mt, r] * alpha + row_sum(s, mt, r, 0)
                    for d in range(DTILE):
                        for x in range(2):
                            acc[mt, d, 2 * r + x] *= alpha

            cp_async_wait_all()
            cuda.syncthreads()  # V[kb] landed; everyone is done with K[kb]
            if it + 1 < cnt:
                kb = lut[lut_base + it + 1]
                load_kv(smem, sa, KOFF, k, kv_base, kb * BK, nk - kb * BK, tid)
                cp_async_commit()  # K[next] streams in during P V

            # O += P V: P packed from the S accumulators into A fragments (per
            # k-step of 16 keys), V by transposed ldmatrix, two n-tiles a load.
            for kk in range(PK):
                for mt in range(MT):
                    pack_a(af, mt, s, mt, kk)
                for dp in range(DP):
                    b0, b1, b2, b3 = ldsm_x4_trans(smem, v_addr + (kk * 16 * SD + dp * 16) * 2, 0)
                    for mt in range(MT):
                        mma_acc(acc, mt, 2 * dp, af, mt, b0, b1)
                        mma_acc(acc, mt, 2 * dp + 1, af, mt, b2, b3)

        # Epilogue: finish the row sums over the quad, normalise, write O and lse
        # (natural log, as the backward and the API expect).
        for mt in range(MT):
            for r in range(2):
                lt = l[mt, r] + shfl_xor(l[mt, r], 1)
                lt = lt + shfl_xor(lt, 2)
                inv = ONE / lt
                row = row0 + warp * ROWS + mt * 16 + 8 * r + g
                if row < nq:
                    ob = q_base + row * D + 2 * t
                    for d in range(DTILE):
                        store(o, ob + 8 * d, acc[mt, d, 2 * r] * inv, acc[mt, d, 2 * r + 1] * inv)
                    if t == 0:
                        lse[bh * nq + row] = (m[mt, r] + math.log2(lt)) * ln2

    return TCKernel(sla_fwd_tc, NT, SMEM_BYTES)


def use_wgmma(kind, D, block_q, block_k):
    """Whether the sparse forward runs on ``tc/forward_wgmma.py`` (``SLA_NUMBA_SPARSE_FWD``):
    ``wgmma`` always (that module refuses, naming the variable, what it cannot take);
    ``mma`` never; ``auto`` (the default) on a GPU of compute capability 9.0 for the
    configurations the wgmma kernel takes (fp16 / bf16, blocks 64 x 64, D 64 or 128),
    which it runs 1.4-1.5x faster than the mma.sync kernel (H200, BENCHMARKS.md), and
    never under the simulator (there both give the same results; the mma.sync kernel
    keeps the suite's coverage, the wgmma tests ask for theirs)."""
    mode = config.sparse_fwd_kernel()
    if mode != "auto":
        return mode == "wgmma"
    if SIMULATED:
        return False
    from .forward_wgmma import wgmma_unsupported_reason

    return wgmma_unsupported_reason(kind, D, block_q, block_k) is None


def launch_sparse_forward(
    kind, q, k, v, lut, counts, o, lse, B, H, Nq, Nk, D, block_q, block_k, scale, stream
):
    """Launch the forward kernel on flat device arrays (the GPU backend's entry).

    q, k, v: flat int16 bits (B*H*N*D) of fp16 / bf16 ('f16' / 'bf16' = ``kind``);
    lut: flat int32 of a (B, H, Mq, n) LUT (``n = lut.size // (B*H*Mq)``), counts:
    flat int32 (B*H*Mq); o, lse: flat float32 outputs, or o the flat int32 view of a
    16-bit output in the inputs' type (``tiles.make_pair_store``: the fp32 result
    rounded to nearest even). Numba device arrays (any ``__cuda_array_interface__``
    views), launched on ``stream``; no host sync.
    """
    if use_wgmma(kind, D, block_q, block_k):  # Hopper's warpgroup MMA
        from .forward_wgmma import launch_sparse_forward_wgmma

        return launch_sparse_forward_wgmma(
            kind, q, k, v, lut, counts, o, lse, B, H, Nq, Nk, D, block_q, block_k, scale, stream
        )
    mq = -(-Nq // block_q)
    n_lut = int(lut.size) // max(1, B * H * mq)
    kern = make_sparse_forward(D, block_k, block_q, kind, out_kind_of(o, kind))
    if n_lut == 0:
        lut = counts
    args = (q, k, v, lut, counts, o, lse, Nq, Nk, mq, max(n_lut, 1), np.float32(scale * LOG2E))
    _tc_build.launch(kern.kernel, (mq, B * H), kern.threads, kern.smem_bytes, stream, args)


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
    On a compute-capability-9.0 GPU (``SLA_NUMBA_SPARSE_FWD`` auto, :func:`use_wgmma`) or
    with ``SLA_NUMBA_SPARSE_FWD=wgmma``: computed by ``tc/forward_wgmma.py`` instead (with
    ``wgmma``, a ValueError naming the variable where that kernel does not apply).

    Example (a GPU; or CPU tensors with ``NUMBA_ENABLE_CUDASIM=1``, slowly)::

        >>> import torch
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
        >>> q, k, v = (torch.randn(1, 1, 64, 64, device=dev).bfloat16() for _ in range(3))
        >>> lut = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)  # block 0 -> key block 0
        >>> counts = torch.ones(1, 1, 1, dtype=torch.int32, device=dev)
        >>> o, lse = sparse_forward_tc(q, k, v, lut, counts, 64, 64, 64 ** -0.5)
        >>> tuple(o.shape), tuple(lse.shape)
        ((1, 1, 64, 64), (1, 1, 64))
    """
    if use_wgmma(_tc_build.half_kind(q) or str(q.dtype), int(q.shape[-1]), block_q, block_k):
        from .forward_wgmma import sparse_forward_wgmma

        return sparse_forward_wgmma(q, k, v, lut, counts, block_q, block_k, scale)
    kind = _tc_build.half_kind(q)
    B, H, Nq, D = (int(s) for s in q.shape)
    Nk = int(k.shape[2])
    mq = -(-Nq // block_q)
    n_lut = int(lut.shape[-1])
    ad = _tc_build.ArrayAdapter(q)
    kern = make_sparse_forward(D, block_k, block_q, kind)
    o = ad.empty((B, H, Nq, D), np.float32)
    lse = ad.empty((B, H, Nq), np.float32)
    args = (
        ad.bits(q),
        ad.bits(k),
        ad.bits(v),
        ad.flat(lut, np.int32),
        ad.flat(counts, np.int32),
        o,
        lse,
        Nq,
        Nk,
        mq,
        max(n_lut, 1),
        np.float32(scale * LOG2E),
    )
    if n_lut == 0:  # no LUT columns at all: every row is empty
        args = args[:3] + (ad.flat(counts, np.int32),) * 2 + args[5:]
    _tc_build.launch(kern.kernel, (mq, B * H), kern.threads, kern.smem_bytes, ad.stream(), args)
    return ad.wrap(o, (B, H, Nq, D)), ad.wrap(lse, (B, H, Nq))
