"""Block classification on the GPU: two launches, no host round trip.

Input q (B, H, Nq, D), k (B, H, Nk, D); output the int8 map (B, H, Mq, Mk):
1 critical, 0 marginal, -1 negligible. The rule is docs/internals.md's
"Classification rule, bit for bit", so the map is identical to the CPU's:

1. ``pool`` — one block per (query or key block, h, b); threads over d.
   ``pq[b,h,i,d] = (Σ_{valid rows r, in order} x[r, d]) / count`` in float64;
   pooled keys stored d-major, ``pk[b,h,d,j]``, so that step 2's threads (one per
   key block j) read consecutive addresses.
2. ``score_rank`` — one block per query-block row (i, h, b):
   ``S[j] = scale · Σ_d pq[i,d]·pk[j,d]`` in float64, d ascending (NaN -> -inf),
   written to a float64 scratch row; then each key block's rank
   ``#{j' : S[j'] > S[j] or (S[j'] == S[j] and j' < j)}`` — the position in the
   order (S descending, j ascending): rows of up to ``SORT_MAX`` blocks sort the
   (S, j) pairs in shared memory (bitonic sort, O(Mk log² Mk)); longer rows count
   each rank against the row staged NT scores at a time (O(Mk²)). Rank < n_crit
   -> 1, rank >= Mk - n_skip -> -1, else 0.

No fastmath, and more: NVVM fuses ``a*b + c`` into an FMA even without fastmath,
and the pooled means are not exact fp32 values, so the products and sums of step 2
go through ``mul_rn`` / ``add_rn`` (``_compat``), which are never contracted.
"""

import numpy as np

from .._params import n_blocks
from ._arrays import DeviceCall
from ._stages import mark
from .simt.classify import POOL_THREADS, RANK_THREADS, SORT_MAX, make_score_rank, pool


def classify(q, k, n_crit, n_skip, block_q, block_k, scale):
    """Block map (B, H, Mq, Mk) int8, same array kind as ``q``.

    ``n_crit`` critical and ``n_skip`` negligible key blocks per query-block row,
    ranked by the pooled score (module docstring). Identical to the CPU's map.
    """
    call = DeviceCall(q)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Mq, Mk = n_blocks(Nq, block_q), n_blocks(Nk, block_k)
    mark("glue")
    with call.device_context():
        dq, dk = call.dev(q), call.dev(k)
        _, pq = call.workspace((B, H, Mq, D), np.float64)
        _, pk = call.workspace((B, H, D, Mk), np.float64)
        _, scores = call.workspace((B, H, Mq, Mk), np.float64)
        handle, block_map = call.output((B, H, Mq, Mk), np.int8)
        pool[(Mq + Mk, H, B), POOL_THREADS, call.stream](dq, dk, block_q, block_k, Mq, pq, pk)
        make_score_rank(RANK_THREADS, SORT_MAX)[(Mq, H, B), RANK_THREADS, call.stream](
            pq, pk, float(scale), int(n_crit), int(n_skip), scores, block_map
        )
        mark("classify")
        return call.result(handle)
