"""The classification kernels: ``pool`` and ``score_rank`` (the rule and the
orchestration are in ``sla_numba/gpu/classify.py``).
"""

import functools

import numpy as np

from .._compat import SIMULATOR, add_rn, cuda, kernel, mul_rn, to_f64

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
