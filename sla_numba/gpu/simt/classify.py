"""The classification kernels (the rule and the orchestration are in
``sla_numba/gpu/classify.py``).

Two launches, the fast path:

* ``make_pool(NT, U)`` — pooled means of query and key blocks, rows read U at a
  time so that many loads are in flight (the sum still adds rows in order);
* ``make_score_select(...)`` — a block of ``RQ`` query-block rows: their scores
  against every key block (a register tile of RQ x CPT float64 accumulators per
  thread), then one lane group (a warp) per row finds the ``n_crit``-th largest and
  the ``n_skip``-th smallest score by a bitwise search over the scores'
  order-preserving integer images, and writes the row's map.

The reference pair, simpler and slower, kept as the readable statement of the
same computation and for rows longer than the fast path takes:

* ``pool`` — the same means, one row at a time;
* ``make_score_rank(NT)`` — one block per row: scores, then a bitonic sort of the
  (score, j) pairs in shared memory (or, for long rows, counting each rank).
"""

import functools

import numpy as np

from .._compat import SIMULATOR, add_rn, cuda, kernel, mul_rn, to_f32, to_f64
from .._precompile import kernel_factory
from .lanes import lane_scan, lane_sum

POOL_THREADS = 4 if SIMULATOR else 128
RANK_THREADS = 4 if SIMULATOR else 128


@cuda.jit(device=True)
def _pool_one(x, b, h, blk, block, n, out, d_major):
    """Mean of the block's valid rows, per d; stored out[b, h, blk, d], or
    out[b, h, d, blk] when ``d_major`` (pooled keys: step 2 reads them along blk)."""
    r0 = blk * block
    r1 = min(r0 + block, n)
    count = np.float64(r1 - r0)
    for d in range(cuda.threadIdx.x, x.shape[3], cuda.blockDim.x):
        s = np.float64(0.0)
        for r in range(r0, r1):
            s += to_f64(x[b, h, r, d])
        if d_major:
            out[b, h, d, blk] = s / count
        else:
            out[b, h, blk, d] = s / count


@kernel()
def pool(q, k, block_q, block_k, mq, pq, pk):
    """Blocks x < mq pool query block x; the others key block x - mq."""
    x = cuda.blockIdx.x
    h = cuda.blockIdx.y
    b = cuda.blockIdx.z
    if x < mq:
        _pool_one(q, b, h, x, block_q, q.shape[2], pq, False)
    else:
        _pool_one(k, b, h, x - mq, block_k, k.shape[2], pk, True)


#: Rows of at most this many key blocks (a power of two) are ranked by sorting in
#: shared memory (2048 blocks of 64 keys are N = 131072); longer rows count ranks.
SORT_MAX = 2048


@functools.cache
@kernel_factory
def make_score_rank(NT, sort_max=SORT_MAX):
    """The ranking kernel for NT threads; rows whose block count rounded up to a power
    of two is at most ``sort_max`` are sorted, longer ones counted."""
    neg_inf = np.float64(-np.inf)
    SM = max(int(sort_max), 1)  # shared-memory size: a compile-time constant

    @kernel()
    def score_rank(pq, pk, scale, n_crit, n_skip, scores, block_map):
        stage = cuda.shared.array(NT, np.float64)
        key = cuda.shared.array(SM, np.float64)
        idx = cuda.shared.array(SM, np.int32)
        t = cuda.threadIdx.x
        i = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        mk = pk.shape[3]  # pk is d-major: (B, H, D, Mk)
        D = pq.shape[3]
        for j in range(t, mk, NT):
            s = np.float64(0.0)
            for d in range(D):
                s = add_rn(s, mul_rn(pq[b, h, i, d], pk[b, h, d, j]))  # coalesced over j
            s = mul_rn(scale, s)
            if s != s:
                s = neg_inf
            scores[b, h, i, j] = s
        cuda.syncthreads()

        P = 1  # the next power of two >= mk
        while P < mk:
            P *= 2
        if P <= sort_max:
            # ---- sort (score, j) pairs into the order "score descending, j ascending"
            # (bitonic sort of the P entries; pads are (-inf, j >= mk), which come after
            # every real entry); then position p in the order *is* the rank of the key
            # block at p.
            for e in range(t, P, NT):
                key[e] = scores[b, h, i, e] if e < mk else neg_inf
                idx[e] = e
            cuda.syncthreads()
            size = 2
            while size <= P:
                stride = size // 2
                while stride > 0:
                    for e in range(t, P // 2, NT):
                        lo = (e // stride) * 2 * stride + (e % stride)
                        hi = lo + stride
                        k_lo = key[lo]
                        k_hi = key[hi]
                        hi_first = k_hi > k_lo or (k_hi == k_lo and idx[hi] < idx[lo])
                        # in blocks with (lo & size) == 0 the pair must end in order
                        if hi_first == ((lo & size) == 0):
                            key[lo] = k_hi
                            key[hi] = k_lo
                            j_lo = idx[lo]
                            idx[lo] = idx[hi]
                            idx[hi] = j_lo
                    cuda.syncthreads()
                    stride //= 2
                size *= 2
            for p in range(t, mk, NT):
                v = 0
                if p < n_crit:
                    v = 1
                elif p >= mk - n_skip:
                    v = -1
                block_map[b, h, i, idx[p]] = v
            return

        # ---- long rows: each key block's rank counted against the row, NT at a time
        n_own = (mk + NT - 1) // NT
        for u in range(n_own):  # uniform trip count: all threads sync
            j = t + NT * u
            sj = neg_inf
            if j < mk:
                sj = scores[b, h, i, j]
            rank = 0
            for c0 in range(0, mk, NT):
                cuda.syncthreads()
                if c0 + t < mk:
                    stage[t] = scores[b, h, i, c0 + t]
                cuda.syncthreads()
                for jj in range(min(NT, mk - c0)):
                    s2 = stage[jj]
                    if s2 > sj or (s2 == sj and c0 + jj < j):
                        rank += 1
            if j < mk:
                v = 0
                if rank < n_crit:
                    v = 1
                elif rank >= mk - n_skip:
                    v = -1
                block_map[b, h, i, j] = v

    return score_rank


# =========================================================================== fast path
#: Threads of the fast kernels: on a GPU a warp is a lane group; the simulator runs
#: every thread as a Python thread, so it gets 2 groups of 4 lanes.
FAST_THREADS = 8 if SIMULATOR else 128
FAST_LANES = 4 if SIMULATOR else 32
#: Query-block rows per block of the score/select kernel (each thread keeps an
#: RQ x CPT tile of scores): more rows, fewer re-reads of the pooled keys.
FAST_ROWS = 3 if SIMULATOR else 16
#: Most key blocks a lane keeps in registers while ranking (EPL): rows of up to
#: FAST_LANES * SELECT_MAX_EPL key blocks take the fast path.
SELECT_MAX_EPL = 64


@functools.cache
@kernel_factory
def make_pool(NT, U, wide=False):
    """``pool``'s twin that reads U rows before adding them: U loads in flight per
    thread instead of one (pooling is a pure read of q and k, so it is bound by how
    many bytes are on their way). The sum still adds the rows in row order. The U
    values wait as float32 (exact for bf16 / fp16 / fp32 input, half the
    registers); ``wide`` keeps them float64, for float64 input."""
    STAGE = np.float64 if wide else np.float32
    load = to_f64 if wide else to_f32

    @kernel(device=True)
    def pool_one(x, b, h, blk, block, n, out, d_major):
        r0 = blk * block
        r1 = min(r0 + block, n)
        count = np.float64(r1 - r0)
        vals = cuda.local.array(U, STAGE)
        xbh = x[b, h]  # (N, D); unsigned indices below: no negative-index wraparound code
        for d in range(cuda.threadIdx.x, x.shape[3], NT):
            s = np.float64(0.0)
            r = r0
            while r + U <= r1:
                for u in range(U):  # U independent loads ...
                    vals[u] = load(xbh[np.uint64(r + u), np.uint64(d)])
                for u in range(U):  # ... then the sum, in row order
                    s += np.float64(vals[u])
                r += U
            while r < r1:  # the tail of a short block
                s += to_f64(x[b, h, r, d])
                r += 1
            if d_major:
                out[b, h, d, blk] = s / count
            else:
                out[b, h, blk, d] = s / count

    @kernel()
    def pool_rows(q, k, block_q, block_k, mq, pq, pk):
        """Blocks x < mq pool query block x; the others key block x - mq."""
        x = cuda.blockIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        if x < mq:
            pool_one(q, b, h, x, block_q, q.shape[2], pq, False)
        else:
            pool_one(k, b, h, x - mq, block_k, k.shape[2], pk, True)

    return pool_rows


@functools.cache
def make_score_pass(D, RQ, CPT, NT):
    """``score_pass(acc, kv, kn, pk, pkbh, pq_s, b, h, j0, t, mk)``: one pass of the
    score product of ``make_score_select`` and of the fused kernel of
    ``classify_fused.py``. Thread ``t`` computes, for the RQ staged query rows
    (``pq_s``, shared, row-major D) and its key blocks ``j = j0 + t + NT*c`` (c < CPT,
    j < mk), ``acc[r*CPT + c] = Σ_d pq_s[r, d] · pk[b, h, d, j]`` in ascending d, each
    product and each sum rounded on its own (``mul_rn`` / ``add_rn``: the CPU's exact
    order, no FMA). The next d's keys load (``kn``) while this d computes (``kv``).
    ``pkbh = pk[b, h]`` (D, Mk), key blocks contiguous."""

    @kernel(device=True, forceinline=True)  # (inlined: acc, kv, kn stay registers)
    def score_pass(acc, kv, kn, pk, pkbh, pq_s, b, h, j0, t, mk):
        for x in range(RQ * CPT):
            acc[x] = 0.0
        for c in range(CPT):
            j = j0 + t + NT * c
            kn[c] = pk[b, h, 0, j] if j < mk else 0.0
        for d in range(D):
            for c in range(CPT):
                kv[c] = kn[c]
            if d + 1 < D:  # the next d's keys are loading while this d computes
                for c in range(CPT):
                    j = j0 + t + NT * c
                    if j < mk:  # (unsigned indices: no negative-index code)
                        kn[c] = pkbh[np.uint64(d + 1), np.uint64(j)]
            for r in range(RQ):
                p = pq_s[np.uint64(r * D + d)]
                for c in range(CPT):  # d ascending, every op rounded on its own
                    acc[r * CPT + c] = add_rn(acc[r * CPT + c], mul_rn(p, kv[c]))

    return score_pass


@functools.cache
def make_row_select(EPL, LANES):
    """``mark_row(key, top, n_crit, n_skip, mk, block_map, b, h, i)``: a lane group
    (LANES lanes, each holding the keys of key blocks ``lane + LANES*m``, m < EPL)
    writes row ``block_map[b, h, i]``. Used by ``make_score_select`` and the fused
    kernel of ``classify_fused.py``.

    Ranking without sorting. Map each score to an unsigned integer with the same
    order (``key``: flip all bits of a negative double, set the sign bit of a
    non-negative one; a NaN score is -inf and -0 is +0 before, so equal scores have
    equal keys). The critical set is the n_crit first blocks in the order (key
    descending, j ascending). Its threshold t_c, the n_crit-th largest key, is
    found bit by bit from the top: t_c gets bit b when at least n_crit keys are
    >= t_c | 2^b (one count over the row per bit). The search stops early once
    exactly n_crit keys are >= t_c: those are the critical blocks. Otherwise t_c
    is a key shared by several blocks; the blocks above it are critical and the
    tied ones are taken in ascending j until n_crit. The negligible set is the
    same search over the complemented keys (the n_skip smallest scores; among
    ties the highest j go first, as they come last in the order). Both searches
    run in one loop and share one lane reduction per bit (two 16-bit counts in
    one int).
    """
    ZERO = np.uint64(0)
    ONE = np.uint64(1)
    PACK = 1 << 16
    HALF = np.uint64(32)

    @kernel(device=True)
    def count2(key, c_hi, c_lo):
        """#{keys >= c_hi} + 2^16 · #{slots <= c_lo} over the row, on every lane (the
        two searches share one reduction; counts <= 2048 fit 16 bits)."""
        n = np.int32(0)
        for m in range(EPL):
            x = key[m]
            if x >= c_hi:
                n = np.int32(n + 1)
            if x <= c_lo:
                n = np.int32(n + PACK)
        return lane_sum(n, LANES)

    @kernel(device=True)
    def thresholds(key, top, n_crit, n_skip, n_pad):
        """Both searches at once, bit by bit from the top.

        Returns (t_c, n_c, t_s, n_s): t_c the largest value with n_c = #{key >= t_c}
        >= n_crit and n_c == n_crit if any value gives exactly n_crit (then the
        search stopped there); likewise t_s over the complemented keys ~key of the
        real blocks (pads excluded: they are the n_pad slots holding 0).
        While the bit is >= 32 the candidates' low halves are 0 (and those of their
        complements all ones), so comparing the keys' high halves (``top``, 32-bit
        compares: half the work) gives the same counts."""
        t_c = ZERO
        t_s = ZERO
        n_c = EPL * LANES  # every slot is >= 0
        n_s = EPL * LANES - n_pad
        if n_crit == 0:  # nothing to find (the caller tests n_crit > 0)
            n_c = 0
        if n_skip == 0:
            n_s = 0
        bit = 63
        while bit >= 0 and (n_c != n_crit or n_s != n_skip):
            c_c = t_c | (ONE << np.uint64(bit))
            c_s = t_s | (ONE << np.uint64(bit))
            if bit >= 32:
                n = count2(top, np.uint32(c_c >> HALF), np.uint32(~c_s >> HALF))
            else:
                n = count2(key, c_c, ~c_s)  # ~key >= c_s  <=>  key <= ~c_s
            n_hi = n % PACK
            n_lo = n // PACK - n_pad
            if n_c != n_crit and n_hi >= n_crit:
                t_c = c_c
                n_c = n_hi
            if n_s != n_skip and n_lo >= n_skip:
                t_s = c_s
                n_s = n_lo
            bit -= 1
        return t_c, n_c, t_s, n_s

    @kernel(device=True)
    def mark_row(key, top, n_crit, n_skip, mk, block_map, b, h, i):
        """The row's thresholds, then its map (every lane of the group calls it)."""
        lane = cuda.threadIdx.x % LANES
        t_c, n_c, t_s, n_s = thresholds(key, top, n_crit, n_skip, EPL * LANES - mk)
        u_s = ~t_s  # the skip threshold as a key: ~key >= t_s  <=>  key <= u_s
        need_c = 0  # > 0: t_c is tied, take need_c of its blocks in ascending j
        need_s = 0  # > 0: u_s is tied, take need_s of its blocks in descending j
        tied_s = 0
        if n_c != n_crit or n_s != n_skip:
            n = count2(key, t_c + ONE, ~(t_s + ONE))
            if n_c != n_crit:
                need_c = n_crit - n % PACK
            if n_s != n_skip:
                above = n // PACK - (EPL * LANES - mk)
                need_s = n_skip - above
                tied_s = n_s - above
        base_c = 0  # tied blocks at lower j (over the previous m)
        base_s = 0
        for m in range(EPL):
            j = lane + LANES * m
            x = key[m]
            if need_c > 0:
                lower, tot = lane_scan(x == t_c, LANES)
                crit = x > t_c or (x == t_c and base_c + lower < need_c)
                base_c += tot
            else:
                crit = n_crit > 0 and x >= t_c
            if need_s > 0:
                lower, tot = lane_scan(x == u_s, LANES)
                higher = tied_s - 1 - (base_s + lower)  # tied blocks at higher j
                neg = x < u_s or (x == u_s and higher < need_s)
                base_s += tot
            else:
                neg = n_skip > 0 and x <= u_s
            if j < mk:
                v = 0
                if crit:
                    v = 1
                elif neg:
                    v = -1
                block_map[b, h, i, j] = v

    return mark_row


@functools.cache
@kernel_factory
def make_score_select(D, RQ, CPT, EPL, NT=FAST_THREADS, LANES=FAST_LANES):
    """The score-and-select kernel for head dim D, RQ query-block rows per block,
    CPT key blocks per thread per pass, EPL key blocks per lane when ranking.

    Launch: grid (ceil(Mq / RQ), H, B), NT threads. Arguments: ``pq`` (B, H, Mq, D),
    ``pk`` (B, H, D, Mk) float64; ``scale``; ``n_crit``, ``n_skip`` in [0, Mk];
    ``scores`` (B, H, Mq, Mk) float64 scratch and ``sbits``, the same memory viewed
    as uint64; ``block_map`` (B, H, Mq, Mk) int8. Needs Mk <= LANES * EPL.

    Ranking: ``make_row_select``.
    """
    NG = NT // LANES  # lane groups: each ranks rows g, g + NG, ...
    NQ = RQ * D  # the staged query rows (a compile-time size)
    NACC = RQ * CPT
    ZERO = np.uint64(0)
    TOP = np.uint64(1 << 63)
    HALF = np.uint64(32)
    neg_inf = np.float64(-np.inf)
    mark_row = make_row_select(EPL, LANES)
    score_pass = make_score_pass(D, RQ, CPT, NT)

    @kernel()
    def score_select(pq, pk, scale, n_crit, n_skip, scores, sbits, block_map):
        pq_s = cuda.shared.array(NQ, np.float64)
        t = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * RQ
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        mq = pq.shape[2]
        mk = pk.shape[3]  # pk is d-major: (B, H, D, Mk)

        # ---- 1. the block's RQ pooled query rows, to shared memory
        for e in range(t, NQ, NT):
            r = e // D
            pq_s[e] = pq[b, h, i0 + r, e - r * D] if i0 + r < mq else 0.0
        cuda.syncthreads()

        # ---- 2. scores: thread t owns key blocks j0 + t + NT*c (c < CPT) of every row
        acc = cuda.local.array(NACC, np.float64)
        pkbh = pk[b, h]  # (D, Mk)
        kv = cuda.local.array(CPT, np.float64)
        kn = cuda.local.array(CPT, np.float64)
        for j0 in range(0, mk, NT * CPT):
            score_pass(acc, kv, kn, pk, pkbh, pq_s, b, h, j0, t, mk)
            for r in range(RQ):
                if i0 + r < mq:
                    for c in range(CPT):
                        j = j0 + t + NT * c
                        if j < mk:
                            s = mul_rn(scale, acc[r * CPT + c])
                            if s != s:
                                s = neg_inf
                            if s == 0.0:
                                s = 0.0  # -0 == +0 (a tie): give both one key
                            scores[b, h, i0 + r, j] = s
        cuda.syncthreads()  # the block's scores are visible to all its threads

        # ---- 3. per row, one lane group: thresholds, then the row's map
        lane = t % LANES
        key = cuda.local.array(EPL, np.uint64)
        top = cuda.local.array(EPL, np.uint32)  # the keys' high halves
        for r in range(t // LANES, RQ, NG):
            i = i0 + r
            if i >= mq:
                break
            for m in range(EPL):  # lane holds key blocks lane + LANES*m
                j = lane + LANES * m
                x = ZERO
                if j < mk:
                    x = sbits[b, h, i, j]
                    x = ~x if x >= TOP else x | TOP
                key[m] = x
                top[m] = np.uint32(x >> HALF)
            mark_row(key, top, n_crit, n_skip, mk, block_map, b, h, i)

    return score_select
