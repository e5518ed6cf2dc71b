"""Classification at memory speed: the kernels of ``SLA_NUMBA_CLASSIFY=fused`` (the default).

The same two steps and the same bits as ``classify.py``'s fast pair (pool, then
score and rank; the rule is docs/internals.md's "Classification rule, bit for
bit"), rearranged so that neither step wastes the machine:

* ``make_pool_words`` — pooling, **one lane group (a warp) per pooled block**.
  Lane ``l`` owns the words ``l, l + LANES, ...`` of every row, where a *word* is
  what one load brings: for bf16 input a ``uint64`` holding four bf16 values (a ``uint32``
  holding two at D = 64, where that keeps all 32 lanes busy), so at D = 128 a warp
  reads one whole 256-byte row with one 8-byte load per lane, instead of the
  default kernel's 2-byte loads (one thread per d). A bf16 value is the top half
  of a float32, so widening is a shift and a bit cast: exact. Each lane adds the
  rows of its columns in row order (float64, ``U`` rows loaded before they are
  added): the sum of every column is the CPU's, bit for bit. Other dtypes take a
  word of one element (widened by ``_compat.to_f64``).

* ``make_score_select_keys`` — scores and ranking of ``RQ`` query-block rows a CTA,
  as ``classify.make_score_select`` (the same register tile of scores, the same
  ``mul_rn`` / ``add_rn`` order, the same ``make_row_select`` ranking), except that
  the scores never leave the SM: each is turned into its order-preserving integer
  key and kept in **shared memory** (RH x Mk keys), where the lane groups rank
  them. The default kernel writes every score to a global scratch array
  (B·H·Mq·Mk float64: 25 MB at the Wan2.1 shape) and reads it back; here there is
  no scratch buffer to allocate, write or read. Shared memory bounds the rows of
  keys: RH·Mk·8 bytes. When one pass of the score tile covers a whole row (Mk <=
  NT·CPT: 512 = 128 x 4 at the Wan2.1 shape), every score of the CTA's RQ = 16 rows
  is in registers after the pass, so the rows are keyed and ranked RH at a time
  (RH = 4 there: 16 KiB of staged query rows + 16 KiB of keys) and the pooled keys
  are still read once per 16 rows, as in the default kernel. Longer rows: RH = RQ,
  RQ cut to what fits.

Fragment ownership, score step: thread ``t`` owns key blocks ``j0 + t + NT·c``
(c < CPT) of all RQ rows, a register tile of RQ x CPT float64 sums; the pooled
query rows are in shared memory (broadcast reads), the pooled keys stream from
global memory (d-major: ``pk[b, h, d, j]``, consecutive threads read consecutive
j), the next d's keys loading while this d computes. Ranking step: lane group g
ranks rows g, g + NG, ... of a chunk; lane l holds key blocks ``l + LANES·m``
(m < EPL). Barriers: one after staging, one before each chunk is ranked and one
before the next chunk overwrites its keys.

Ranks without a sort, and the tie rule: ``classify.make_row_select``.

>>> import numpy as np
>>> from sla_numba.gpu.classify import classify_fused
>>> q = np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)
>>> m = classify_fused(q, q, 1, 1, 4, 4, 8**-0.5)  # block map (1, 2, 4, 4)
>>> [int(v) for v in (m == 1).sum(-1).ravel()]  # one critical block per row
[1, 1, 1, 1, 1, 1, 1, 1]
"""

import functools

import numpy as np

from .._compat import SIMULATOR, cuda, kernel, mul_rn, to_f64
from .._precompile import kernel_factory
from .classify import FAST_LANES, FAST_THREADS, make_row_select, make_score_pass

#: Lane groups (pooled blocks) per CTA of the pooling kernel, and rows each lane
#: loads before adding them (loads in flight).
POOL_GROUPS = 2 if SIMULATOR else 4
POOL_ROWS = 4 if SIMULATOR else 16

#: Shared memory the score/select kernel may use for its staged query rows and its
#: keys (static shared memory stops at 48 KiB).
KEYS_SMEM = 46 * 1024

if SIMULATOR:

    def _bf16_to_f64(bits):
        """The bf16 whose bits are the low 16 of ``bits``, as a float64 (exact)."""
        f = np.array([(int(bits) & 0xFFFF) << 16], np.uint32).view(np.float32)[0]
        return np.float64(f)

    def _f64_bits(x):
        """The bits of a float64, as a uint64."""
        return np.array([x], np.float64).view(np.uint64)[0]

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _bf16_to_f64(bits):
        f = libdevice.int_as_float(np.int32(np.uint32(bits & np.uint64(0xFFFF)) << np.uint32(16)))
        return np.float64(f)

    @cuda.jit(device=True)
    def _f64_bits(x):
        return np.uint64(libdevice.double_as_longlong(x))


def word_layout(d, bf16, lanes=FAST_LANES):
    """(WORD, K): the numpy dtype a pooling lane loads and how many elements it holds.

    bf16 rows are read as uint64 (4 values) when that still gives every lane a word
    (D % 4 == 0 and D / 4 >= lanes: D = 128 on a GPU), as uint32 (2 values) when D
    is even (D = 64: a warp reads a 128-byte row either way, and all 32 lanes
    add); odd D as uint16 (one value). Other dtypes: one element at a time
    (``WORD`` None: the input's own dtype, K = 1)."""
    if not bf16:
        return None, 1
    if d % 4 == 0 and d // 4 >= lanes:
        return np.uint64, 4
    if d % 2 == 0:
        return np.uint32, 2
    return np.uint16, 1


@functools.cache
@kernel_factory
def make_pool_words(LANES, GROUPS, U, K, WPL, BF16):
    """The pooling kernel: lane group g of CTA x pools block ``x·GROUPS + g`` of the
    Mq query blocks followed by the Mk key blocks.

    Launch: grid (ceil((Mq + Mk) / GROUPS), H, B), LANES·GROUPS threads. Arguments:
    ``q``, ``k`` viewed as words (B, H, N, W) (``word_layout``), ``block_q``,
    ``block_k``, ``mq``, and the outputs ``pq`` (B, H, Mq, D), ``pk`` (B, H, D, Mk)
    float64. ``K`` elements a word (``BF16``: bf16 bits, K of them; else K = 1 and the
    word is the element, widened by ``_compat.to_f64``), ``WPL`` words a lane
    (W <= LANES·WPL)."""
    NA = K * WPL  # float64 sums a lane keeps
    NV = U * WPL  # words a lane has in flight
    if BF16:
        VAL = np.uint64 if K == 4 else np.uint32  # loaded words wait packed
    else:
        VAL = np.float64

    @kernel(device=True)
    def load(xbh, r, w):
        """Word w of row r: packed bits (bf16) or the element widened to float64."""
        if BF16:
            return xbh[np.uint64(r), np.uint64(w)]
        return to_f64(xbh[np.uint64(r), np.uint64(w)])

    @kernel(device=True)
    def widen(v, e):
        """Element e of a loaded word, as a float64 (exact)."""
        if BF16:
            return _bf16_to_f64(np.uint64(v) >> np.uint64(16 * e))
        return v

    @kernel(device=True)
    def pool_one(x, b, h, blk, block, out, d_major, lane):
        n = x.shape[2]
        W = x.shape[3]
        r0 = blk * block
        r1 = min(r0 + block, n)
        count = np.float64(r1 - r0)
        acc = cuda.local.array(NA, np.float64)
        vals = cuda.local.array(NV, VAL)
        for a in range(NA):
            acc[a] = 0.0
        for a in range(NV):
            vals[a] = 0
        xbh = x[b, h]  # (N, W)
        r = r0
        while r + U <= r1:
            for u in range(U):  # U rows of loads in flight ...
                for i in range(WPL):
                    w = lane + LANES * i
                    if w < W:
                        vals[u * WPL + i] = load(xbh, r + u, w)
            for u in range(U):  # ... then added, in row order
                for i in range(WPL):
                    for e in range(K):
                        acc[i * K + e] += widen(vals[u * WPL + i], e)
            r += U
        while r < r1:  # the tail of a block
            for i in range(WPL):
                w = lane + LANES * i
                if w < W:
                    v = load(xbh, r, w)
                    for e in range(K):
                        acc[i * K + e] += widen(v, e)
            r += 1
        for i in range(WPL):
            w = lane + LANES * i
            if w < W:
                for e in range(K):
                    d = w * K + e
                    if d_major:
                        out[b, h, d, blk] = acc[i * K + e] / count
                    else:
                        out[b, h, blk, d] = acc[i * K + e] / count

    @kernel()
    def pool_words(q, k, block_q, block_k, mq, pq, pk):
        lane = cuda.threadIdx.x % LANES
        x = cuda.blockIdx.x * GROUPS + cuda.threadIdx.x // LANES
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if x < mq:
            pool_one(q, b, h, x, block_q, pq, False, lane)
        elif x < mq + pk.shape[3]:
            pool_one(k, b, h, x - mq, block_k, pk, True, lane)

    return pool_words


@functools.cache
@kernel_factory
def make_score_select_keys(D, RQ, CPT, EPL, NT=FAST_THREADS, LANES=FAST_LANES, RH=None):
    """The score-and-select kernel with its keys in shared memory.

    Launch: grid (ceil(Mq / RQ), H, B), NT threads. Arguments: ``pq`` (B, H, Mq, D),
    ``pk`` (B, H, D, Mk) float64; ``scale``; ``n_crit``, ``n_skip`` in [0, Mk];
    ``block_map`` (B, H, Mq, Mk) int8. Needs Mk <= LANES·EPL and
    (RQ·D + RH·LANES·EPL)·8 bytes of static shared memory.

    ``RH`` (default RQ): rows of keys the shared buffer holds. RH < RQ needs one pass
    over the key blocks (Mk <= NT·CPT): every score of the CTA's RQ rows is then in
    registers after the pass, and the rows are keyed and ranked RH at a time, so a
    CTA keeps RQ rows (the pooled keys are read once per RQ rows, as the default
    kernel does) while shared memory holds only RH rows of keys."""
    RH = RQ if RH is None else RH
    CHUNKED = RH < RQ  # keys written after the pass, RH rows at a time
    NG = NT // LANES  # lane groups: each ranks rows g, g + NG, ... of a chunk
    NQ = RQ * D  # the staged query rows
    MKP = LANES * EPL  # key slots a row (Mk and the zero pads after it)
    NK = RH * MKP
    NACC = RQ * CPT
    ZERO = np.uint64(0)
    TOP = np.uint64(1 << 63)
    HALF = np.uint64(32)
    neg_inf = np.float64(-np.inf)
    mark_row = make_row_select(EPL, LANES)
    score_pass = make_score_pass(D, RQ, CPT, NT)

    @kernel(device=True)
    def to_key(acc_x, scale):
        """The order-preserving key of a score (see make_row_select)."""
        s = mul_rn(scale, acc_x)
        if s != s:
            s = neg_inf  # NaN ranks as -inf
        if s == 0.0:
            s = 0.0  # -0 == +0 (a tie): give both one key
        x = _f64_bits(s)
        return ~x if x >= TOP else x | TOP

    @kernel(device=True)
    def rank_rows(keys, h0, i0, mq, n_crit, n_skip, mk, block_map, b, h, key, top):
        """Rows i0 + h0 + r (r < RH) of the keys buffer: one lane group a row."""
        lane = cuda.threadIdx.x % LANES
        for r in range(cuda.threadIdx.x // LANES, RH, NG):
            i = i0 + h0 + r
            if i >= mq or h0 + r >= RQ:
                break
            for m in range(EPL):  # lane holds key blocks lane + LANES*m
                x = keys[np.uint64(r * MKP + lane + LANES * m)]
                key[m] = x
                top[m] = np.uint32(x >> HALF)
            mark_row(key, top, n_crit, n_skip, mk, block_map, b, h, i)

    @kernel()
    def score_select_keys(pq, pk, scale, n_crit, n_skip, block_map):
        pq_s = cuda.shared.array(NQ, np.float64)
        keys = cuda.shared.array(NK, np.uint64)
        t = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * RQ
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        mq = pq.shape[2]
        mk = pk.shape[3]  # pk is d-major: (B, H, D, Mk)

        # ---- 1. the CTA's RQ pooled query rows, to shared memory; the pad slots'
        # keys (j >= Mk) are 0, below every real key
        for e in range(t, NQ, NT):
            r = e // D
            pq_s[e] = pq[b, h, i0 + r, e - r * D] if i0 + r < mq else 0.0
        for e in range(t, NK, NT):
            if e % MKP >= mk:
                keys[e] = ZERO
        cuda.syncthreads()

        # ---- 2. scores (make_score_select's pass, classify.make_score_pass): thread t
        # owns key blocks j0 + t + NT*c (c < CPT) of every row
        acc = cuda.local.array(NACC, np.float64)
        pkbh = pk[b, h]  # (D, Mk)
        kv = cuda.local.array(CPT, np.float64)
        kn = cuda.local.array(CPT, np.float64)
        for j0 in range(0, mk, NT * CPT):
            score_pass(acc, kv, kn, pk, pkbh, pq_s, b, h, j0, t, mk)
            if not CHUNKED:  # every row's keys fit: store this pass's
                for r in range(RQ):
                    for c in range(CPT):
                        j = j0 + t + NT * c
                        if j < mk:
                            keys[np.uint64(r * MKP + j)] = to_key(acc[r * CPT + c], scale)

        # ---- 3. per row, one lane group: thresholds, then the row's map
        key = cuda.local.array(EPL, np.uint64)
        top = cuda.local.array(EPL, np.uint32)  # the keys' high halves
        if not CHUNKED:
            cuda.syncthreads()  # the CTA's keys are visible to all its threads
            rank_rows(keys, 0, i0, mq, n_crit, n_skip, mk, block_map, b, h, key, top)
        else:  # the one pass's scores are all in registers: key them RH rows at a time
            for h0 in range(0, RQ, RH):
                if h0 > 0:
                    cuda.syncthreads()  # the previous chunk's keys have been read
                for r in range(RH):
                    if h0 + r < RQ:
                        for c in range(CPT):
                            j = t + NT * c
                            if j < mk:
                                x = to_key(acc[(h0 + r) * CPT + c], scale)
                                keys[np.uint64(r * MKP + j)] = x
                cuda.syncthreads()
                rank_rows(keys, h0, i0, mq, n_crit, n_skip, mk, block_map, b, h, key, top)

    return score_select_keys
