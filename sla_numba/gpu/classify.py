"""Block classification on the GPU: two launches, no host round trip.

Input q (B, H, Nq, D), k (B, H, Nk, D); output the int8 map (B, H, Mq, Mk):
1 critical, 0 marginal, -1 negligible. The rule is docs/internals.md's
"Classification rule, bit for bit", so the map is identical to the CPU's:

1. pool — one block per (query or key block, h, b); threads over d.
   ``pq[b,h,i,d] = (Σ_{valid rows r, in order} x[r, d]) / count`` in float64;
   pooled keys stored d-major, ``pk[b,h,d,j]``, so that step 2's threads (one per
   key block j) read consecutive addresses.
2. score and rank — ``S[j] = scale · Σ_d pq[i,d]·pk[j,d]`` in float64, d ascending
   (NaN -> -inf), then each key block's rank
   ``#{j' : S[j'] > S[j] or (S[j'] == S[j] and j' < j)}`` — its position in the
   order (S descending, j ascending): rank < n_crit -> 1, rank >= Mk - n_skip -> -1,
   else 0.

Two implementations of step 2 (``sla_numba/gpu/simt/classify.py``):

* the fast one, ``classify``: a block takes 16 query-block rows (registers hold a
  16 x 4 tile of scores per thread, so the pooled keys are read once per 16 rows),
  then a warp per row finds the two thresholds — the n_crit-th largest and the
  n_skip-th smallest score — by a bitwise search over integer images of the
  scores, with ties broken by j as the rule says. No sort: the map only needs to
  know on which side of the two thresholds each block lies. Rows of up to
  32 * SELECT_MAX_EPL key blocks (2048, i.e. N = 131072 at block 64).
* the reference, ``classify_by_sorting`` (and ``classify`` for longer rows):
  one block per row sorts the (S, j) pairs in shared memory (bitonic sort, rows
  of up to SORT_MAX blocks) or counts each rank against the row (O(Mk²)).

By default (``SLA_NUMBA_CLASSIFY=fused``) ``classify`` runs ``classify_fused``, the pair
of ``sla_numba/gpu/simt/classify_fused.py``: pooling by warps with packed bf16 loads,
scores kept as keys in shared memory (no scratch array). The same map; the pair above
runs with ``SLA_NUMBA_CLASSIFY=scratch`` (H200 figures: ``config``).

No fastmath, and more: NVVM fuses ``a*b + c`` into an FMA even without fastmath,
and the pooled means are not exact fp32 values, so the products and sums of step 2
go through ``mul_rn`` / ``add_rn`` (``_compat``), which are never contracted.

>>> import numpy as np
>>> from sla_numba.gpu.classify import classify
>>> q = np.random.default_rng(0).standard_normal((1, 2, 16, 8)).astype(np.float32)
>>> m = classify(q, q, 1, 1, 4, 4, 8**-0.5)  # block map (1, 2, 4, 4)
>>> [int(v) for v in (m == 1).sum(-1).ravel()]  # one critical block per row
[1, 1, 1, 1, 1, 1, 1, 1]
"""

import numpy as np

from .. import config
from .._params import n_blocks
from ._arrays import DeviceCall
from ._launcher import launch
from ._precompile import ahead
from ._stages import mark
from .simt.classify import (
    FAST_LANES,
    FAST_ROWS,
    FAST_THREADS,
    POOL_THREADS,
    RANK_THREADS,
    SELECT_MAX_EPL,
    SORT_MAX,
    make_pool,
    make_score_rank,
    make_score_select,
    pool,
)
from .simt.classify_fused import (
    KEYS_SMEM,
    POOL_GROUPS,
    POOL_ROWS,
    make_pool_words,
    make_score_select_keys,
    word_layout,
)

#: Rows pooled per batch of loads in the fast pooling kernel.
POOL_BATCH = 4 if POOL_THREADS < 32 else 16


def fast_config(mk, d, rows=None, cols=None, threads=None):
    """(RQ, CPT, EPL, NT) of the fast score/select kernel for Mk key blocks and head
    dim d, or None when the row is too long for it (the reference kernel then).

    RQ query-block rows per block, CPT key blocks per thread and pass, EPL key
    blocks per lane when ranking, NT threads. ``rows``, ``cols``, ``threads``
    override the defaults (tools/bench_classify.py --sweep tries some)."""
    nt = threads or FAST_THREADS
    # powers of two: a handful of compiled variants per D (Mk <= 128, 256, 512, ...)
    epl = max(4, _pow2(-(-mk // FAST_LANES)))
    if epl > SELECT_MAX_EPL or nt % FAST_LANES:
        return None
    rq = rows or (FAST_ROWS if d <= 256 else max(1, FAST_ROWS // 2))
    if rq * d * 8 > 40 * 1024:  # the staged query rows must fit static shared memory
        return None
    cpt = cols or min(4, _pow2(-(-mk // nt)))
    return rq, cpt, epl, nt


def _pow2(n):
    """The smallest power of two >= n (n >= 1)."""
    p = 1
    while p < n:
        p *= 2
    return p


def pool_threads(d):
    """Threads of the fast pooling kernel (over d): no idle warps at D = 64."""
    nt = POOL_THREADS
    while nt > 32 and nt // 2 >= d:
        nt //= 2
    return nt


def classify(q, k, n_crit, n_skip, block_q, block_k, scale):
    """Block map (B, H, Mq, Mk) int8, same array kind as ``q``.

    ``n_crit`` critical and ``n_skip`` negligible key blocks per query-block row,
    ranked by the pooled score (module docstring). Identical to the CPU's map.
    """
    if config.classify_kernel() == "fused":  # (the default; "scratch": the older pair)
        return classify_fused(q, k, n_crit, n_skip, block_q, block_k, scale)
    return _classify(q, k, n_crit, n_skip, block_q, block_k, scale, fast=True)


def classify_by_sorting(q, k, n_crit, n_skip, block_q, block_k, scale):
    """``classify`` with the reference kernels (row-at-a-time pooling, one block
    per row that sorts or counts ranks): the same map, slower."""
    return _classify(q, k, n_crit, n_skip, block_q, block_k, scale, fast=False)


@ahead
def _classify(q, k, n_crit, n_skip, block_q, block_k, scale, fast, tiles=None):
    call = DeviceCall(q)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Mq, Mk = n_blocks(Nq, block_q), n_blocks(Nk, block_k)
    n_crit = min(max(int(n_crit), 0), Mk)
    n_skip = min(max(int(n_skip), 0), Mk)
    config = fast_config(Mk, D, *(tiles or ())) if fast else None
    mark("glue")
    with call.device_context():
        dq, dk = call.dev(q), call.dev(k)
        _, pq = call.workspace((B, H, Mq, D), np.float64)
        _, pk = call.workspace((B, H, D, Mk), np.float64)
        _, scores = call.workspace((B, H, Mq, Mk), np.float64)
        handle, block_map = call.output((B, H, Mq, Mk), np.int8)
        if config is None:
            launch(
                pool,
                (Mq + Mk, H, B),
                POOL_THREADS,
                call.stream,
                (dq, dk, block_q, block_k, Mq, pq, pk),
            )
            launch(
                make_score_rank(RANK_THREADS, SORT_MAX),
                (Mq, H, B),
                RANK_THREADS,
                call.stream,
                (pq, pk, float(scale), n_crit, n_skip, scores, block_map),
            )
        else:
            rq, cpt, epl, nt = config
            wide = call.in_dtype(q) == np.float64 or call.in_dtype(k) == np.float64
            pt = pool_threads(D)
            launch(
                make_pool(pt, POOL_BATCH, wide),
                (Mq + Mk, H, B),
                pt,
                call.stream,
                (dq, dk, block_q, block_k, Mq, pq, pk),
            )
            kern = make_score_select(D, rq, cpt, epl, nt, FAST_LANES)
            launch(
                kern,
                (-(-Mq // rq), H, B),
                nt,
                call.stream,
                (pq, pk, float(scale), n_crit, n_skip, scores, scores.view(np.uint64), block_map),
            )
        mark("classify")
        return call.result(handle)


# ====================================================== SLA_NUMBA_CLASSIFY=fused
def keys_config(mk, d, rows=None, cols=None, threads=None, chunk=None):
    """(RQ, CPT, EPL, NT, RH) of the score/select kernel with shared-memory keys, or
    None when a row does not fit it (``fast_config``'s limits, and
    (RQ·D + RH·slots)·8 bytes of shared memory, slots = LANES·EPL >= Mk).

    When one pass of the score tile covers the row (Mk <= NT·CPT: the Wan2.1 and B2
    shapes), RQ is ``fast_config``'s (16) and RH, the rows of keys shared memory
    holds at a time, the largest divisor of RQ that fits; otherwise RH = RQ, cut
    to what fits. ``rows``, ``cols``, ``threads``, ``chunk`` override RQ, CPT, NT,
    RH (tools/bench_classify.py --fused tries some)."""
    base = fast_config(mk, d, rows, cols, threads)
    if base is None:
        return None
    rq, cpt, epl, nt = base
    slots = epl * FAST_LANES * 8  # bytes of one row of keys
    one_pass = mk <= nt * cpt
    if not one_pass:
        fit = (KEYS_SMEM // (d * 8 + slots)) if rows is None else rq
        rq = min(rq, fit)
        if rq >= 8:
            rq -= rq % 4  # 8 or 12 rows: the grid splits into whole waves more often
        rh = rq
    elif chunk is not None:
        rh = chunk
    else:
        rh = rq
        while rh > 1 and rq * d * 8 + rh * slots > KEYS_SMEM:
            rh -= 1
            while rq % rh:
                rh -= 1
    if rq < 1 or rh < 1 or rh > rq or (rh < rq and not one_pass):
        return None
    if rq * d * 8 + rh * slots > KEYS_SMEM:
        return None
    return rq, cpt, epl, nt, rh


def pool_config(d, bf16, lanes=None, groups=None, rows=None):
    """(LANES, GROUPS, U, K, WPL, BF16) of the warp pooling kernel for head dim d."""
    lanes = lanes or FAST_LANES
    _, kw = word_layout(d, bf16, lanes)
    words = d // kw
    return (lanes, groups or POOL_GROUPS, rows or POOL_ROWS, kw, -(-words // lanes), bool(bf16))


def classify_fused(q, k, n_crit, n_skip, block_q, block_k, scale):
    """``classify`` by the kernels of ``SLA_NUMBA_CLASSIFY=fused``
    (``sla_numba/gpu/simt/classify_fused.py``): the same map."""
    return _classify_fused(q, k, n_crit, n_skip, block_q, block_k, scale)


def _aligned(dev, word):
    """Whether a device array's first element sits on a ``word`` boundary (a torch
    view can start anywhere: 8-byte loads need 8-byte addresses)."""
    ptr = getattr(dev, "ptr", None)
    if ptr is None:
        cai = getattr(dev, "__cuda_array_interface__", None)
        ptr = cai["data"][0] if cai else 0
    return ptr % np.dtype(word).itemsize == 0


@ahead
def _classify_fused(
    q,
    k,
    n_crit,
    n_skip,
    block_q,
    block_k,
    scale,
    tiles=None,
    pool_tiles=None,
    bf16_bits=False,
    scratch=False,
):
    """The fused pair: ``make_pool_words`` then ``make_score_select_keys``; rows too
    long for shared memory fall back to ``make_score_select`` (global scratch), and
    rows too long for that to the reference (``classify_by_sorting``'s kernels).

    ``tiles``: (RQ, CPT, NT, RH) overrides, ``pool_tiles``: (LANES, GROUPS, U); for the
    benchmark's sweep. ``bf16_bits``: ``q`` and ``k`` are int16 arrays of bf16 bit
    patterns (tests: the simulator has no bf16 arrays; torch bf16 is detected).
    ``scratch``: the default score/select kernel after the warp pooling (benchmark:
    which of the two new kernels gains)."""
    call = DeviceCall(q)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Mq, Mk = n_blocks(Nq, block_q), n_blocks(Nk, block_k)
    n_crit = min(max(int(n_crit), 0), Mk)
    n_skip = min(max(int(n_skip), 0), Mk)
    if fast_config(Mk, D) is None:  # rows longer than the lane groups take
        return classify_by_sorting(q, k, n_crit, n_skip, block_q, block_k, scale)
    keys = None if scratch else keys_config(Mk, D, *(tiles or ()))
    bf16 = bf16_bits or (call.in_dtype(q) == "bfloat16" and call.in_dtype(k) == "bfloat16")
    lanes, groups, rows, kw, wpl, packed = pool_config(D, bf16, *(pool_tiles or ()))
    word, _ = word_layout(D, bf16, lanes)
    mark("glue")
    with call.device_context():
        dq, dk = call.dev(q), call.dev(k)
        if packed and not (_aligned(dq, word) and _aligned(dk, word)):
            word, kw, wpl = np.uint16, 1, -(-D // lanes)  # (a view at an odd offset)
        if packed:  # the rows as words of kw bf16 values
            dq, dk = dq.view(word), dk.view(word)
        _, pq = call.workspace((B, H, Mq, D), np.float64)
        _, pk = call.workspace((B, H, D, Mk), np.float64)
        handle, block_map = call.output((B, H, Mq, Mk), np.int8)
        launch(
            make_pool_words(lanes, groups, rows, kw, wpl, packed),
            (-(-(Mq + Mk) // groups), H, B),
            lanes * groups,
            call.stream,
            (dq, dk, block_q, block_k, Mq, pq, pk),
        )
        if keys is not None:
            rq, cpt, epl, nt, rh = keys
            launch(
                make_score_select_keys(D, rq, cpt, epl, nt, FAST_LANES, rh),
                (-(-Mq // rq), H, B),
                nt,
                call.stream,
                (pq, pk, float(scale), n_crit, n_skip, block_map),
            )
        else:
            rq, cpt, epl, nt = fast_config(Mk, D)
            _, scores = call.workspace((B, H, Mq, Mk), np.float64)
            launch(
                make_score_select(D, rq, cpt, epl, nt, FAST_LANES),
                (-(-Mq // rq), H, B),
                nt,
                call.stream,
                (pq, pk, float(scale), n_crit, n_skip, scores, scores.view(np.uint64), block_map),
            )
        mark("classify")
        return call.result(handle)
