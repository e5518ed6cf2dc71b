"""Block classification on the CPU: which key blocks each query block attends to, and how.

Input ``q`` (B, H, Nq, D), ``k`` (B, H, Nk, D); output the int8 map
(B, H, Mq, Mk) with 1 = critical, 0 = marginal, -1 = negligible.

The rule (docs/internals.md, "Classification rule, bit for bit") is followed
literally, because the GPU twin must produce the *same bits*:

1. Pool. ``pq[b, h, i] = mean of the valid rows of query block i`` and likewise
   ``pk`` for key blocks: float64 sums, adding rows in row order, divided by the
   number of valid rows (a tail block has fewer).
2. Score. ``S[i, j] = scale * (Σ_d pq[i, d] · pk[j, d])`` in float64, d ascending.
   A NaN score counts as −inf.
3. Rank each row by (score descending, key-block index ascending) — a stable
   sort of −S — and mark the first ``n_crit`` key blocks 1, the last ``n_skip``
   −1, the rest 0.

No fast-math here: without re-association or contraction flags, LLVM keeps each
sum in the written order and never fuses a multiply-add, so the float64 results
do not depend on the vector width or on FMA hardware.
"""

import math

import numpy as np
from numba import njit, prange

from .._arrays import np_empty
from ._simd import prefer_full_width


@njit(parallel=True, cache=True)
def _pool_blocks(x, block, out):
    """``out[b, h, i] = mean of the valid rows of block i of x[b, h]`` in float64.

    x: (B, H, N, D); out: (B, H, M, D) float64. Rows are added in row order.
    """
    B, H, N, D = x.shape
    M = out.shape[2]
    for t in prange(B * H * M):
        b = t // (H * M)
        h = (t // M) % H
        i = t % M
        r0 = i * block
        nr = min(block, N - r0)
        acc = out[b, h, i]
        for d in range(D):
            acc[d] = 0.0
        for r in range(r0, r0 + nr):
            xr = x[b, h, r]
            for d in range(D):
                acc[d] += np.float64(xr[d])
        count = np.float64(nr)
        for d in range(D):
            acc[d] = acc[d] / count


@njit(parallel=True, cache=True)
def _rank_rows(pq, pkt, n_crit, n_skip, scale, block_map):
    """Scores and ranking, one (b, h, query block) per iteration.

    pkt: the pooled keys transposed, (B, H, D, Mk). The scores of a row are
    computed for all key blocks at once, d in the outer loop: each score is still
    its own sum over d ascending (no re-association, no FMA: the same bits as
    ``_rank_rows_reference``), but the key blocks run along the contiguous axis,
    so LLVM vectorises over them. One score at a time, the sum over d was a chain
    of dependent scalar float64 additions (0.8 of the 1.2 ms a classification
    took at B1 H4 N4096 D64, one thread).
    """
    B, H, Mq, D = pq.shape
    Mk = pkt.shape[3]
    for t in prange(B * H * Mq):
        prefer_full_width()  # the prange body is a function of its own
        b = t // (H * Mq)
        h = (t // Mq) % H
        i = t % Mq
        qi = pq[b, h, i]
        s = np.zeros(Mk, np.float64)
        for d in range(D):  # d ascending, no FMA
            qd = qi[d]
            kd = pkt[b, h, d]
            for j in range(Mk):
                s[j] += qd * kd[j]
        neg_score = np.empty(Mk, np.float64)  # sort key: −S ascending
        for j in range(Mk):
            sj = scale * s[j]
            if sj != sj:  # NaN ranks as −inf
                sj = -math.inf
            neg_score[j] = -sj
        _mark_row(neg_score, n_crit, n_skip, block_map[b, h, i])


@njit(cache=True)
def _mark_row(neg_score, n_crit, n_skip, row):
    """Rank by −S ascending, ties by ascending j (a stable sort); mark the classes."""
    Mk = neg_score.shape[0]
    order = np.argsort(neg_score, kind="mergesort")
    for n in range(Mk):
        j = order[n]
        if n < n_crit:
            row[j] = 1
        elif n >= Mk - n_skip:
            row[j] = -1
        else:
            row[j] = 0


@njit(parallel=True, cache=True)
def _rank_rows_reference(pq, pk, n_crit, n_skip, scale, block_map):
    """``_rank_rows`` one score at a time (the readable form; pk not transposed)."""
    B, H, Mq, D = pq.shape
    Mk = pk.shape[2]
    for t in prange(B * H * Mq):
        b = t // (H * Mq)
        h = (t // Mq) % H
        i = t % Mq
        qi = pq[b, h, i]
        neg_score = np.empty(Mk, np.float64)  # sort key: −S ascending
        for j in range(Mk):
            kj = pk[b, h, j]
            s = 0.0
            for d in range(D):  # d ascending, no FMA
                s += qi[d] * kj[d]
            s = scale * s
            if s != s:  # NaN ranks as −inf
                s = -math.inf
            neg_score[j] = -s
        _mark_row(neg_score, n_crit, n_skip, block_map[b, h, i])  # the same ranking


def classify(q, k, n_crit, n_skip, block_q, block_k, scale):
    """Block map (B, H, Mq, Mk) int8 for ``q`` (B, H, Nq, D), ``k`` (B, H, Nk, D).

    ``n_crit`` critical and ``n_skip`` negligible key blocks per query-block row,
    ranked by the pooled score (see the module docstring for the exact rule).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Mq = -(-Nq // block_q)
    Mk = -(-Nk // block_k)
    pq = np.empty((B, H, Mq, D), np.float64)  # workspaces, fully written
    pk = np.empty((B, H, Mk, D), np.float64)
    _pool_blocks(q, block_q, pq)
    _pool_blocks(k, block_k, pk)
    block_map = np_empty((B, H, Mq, Mk), np.int8)
    pkt = np.ascontiguousarray(np.swapaxes(pk, 2, 3))  # (B, H, D, Mk)
    _rank_rows(pq, pkt, int(n_crit), int(n_skip), float(scale), block_map)
    return block_map
