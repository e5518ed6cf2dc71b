"""The pipelined sparse-backward kernels (``make_sparse_dq`` / ``make_sparse_dkv`` with
``pipelined=True``, ``SLA_NUMBA_SPARSE_BWD=pipelined``) against the sync kernels, bit
for bit.

Both variants run the same mma on the same tiles in the same order with the same
fp32 arithmetic per element (only when a tile's copy starts and which of two shared
buffers it lands in changes), so dQ, dK and dV must have the same bits, not just be
close. Outputs are NaN-poisoned (``testing.poisoned``): every element must be written.

Simulator (NUMBA_ENABLE_CUDASIM=1): the pipelined kernels' copies are *deferred* there
(``tiles.make_tile_loader(..., deferred=True)``): a copy lands only at the wait that
covers its group, so a wait on the wrong group count, or math on a stage before its
wait, reads stale shared memory and fails here. Tiny shapes with tails (Nq, Nk not
multiples of the blocks); LUTs with a query block of 0 critical blocks, one of 1
(no prefetch inside the loop), odd and even counts (the walk ends in either stage), a
key block in no query block's list (dK = dV = 0), and query blocks of several chunks
(block_q 64 > 16 * warps of dK/dV: two lse / delta values a thread).
"""

import numpy as np
import pytest
import torch
from _tc_reference import needs_sim

from sla_numba.gpu.tc import backward as backward_tc
from sla_numba.testing import poisoned


def _lut(mq, mk):
    """Ascending LUT (1, 1, mq, mk) and counts: query block i has min(i, mk - 1) key
    blocks (block 0 none, block 1 one: no prefetch inside the loop; odd and even
    counts: the walk ends in either stage), the last query block all mk - 1; key block
    ``mk - 2`` is in no list (its dK = dV = 0)."""
    pool = [j for j in range(mk) if j != mk - 2]
    lut = np.zeros((1, 1, mq, mk), np.int32)
    counts = np.zeros((1, 1, mq), np.int32)
    for i in range(mq):
        c = len(pool) if i == mq - 1 else min(i, len(pool))
        sel = pool[-c:] if i % 2 else pool[:c]  # varied blocks, ascending
        lut[0, 0, i, :c] = sel
        counts[0, 0, i] = c
    return torch.from_numpy(lut), torch.from_numpy(counts)


def _run(dtype, D, bq, bk, Nq, Nk, seed):
    g = torch.Generator().manual_seed(seed)
    B, H = 1, 1
    q, do = (torch.randn(B, H, Nq, D, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, H, Nk, D, generator=g).to(dtype) for _ in range(2))
    # any finite lse / delta do for a bit-for-bit comparison (P = 2^(S c - lse) stays finite)
    lse = (torch.rand(B, H, Nq, generator=g) * 2 + 1).float()
    delta = torch.randn(B, H, Nq, generator=g).float()
    o_s = torch.zeros(B, H, Nq, D)
    mq, mk = -(-Nq // bq), -(-Nk // bk)
    lut, counts = _lut(mq, mk)
    rev, rcnt = backward_tc.reverse_index(lut, counts, mk)
    assert (counts == 0).any() and (rcnt == 0).any() and (counts >= min(2, mq - 1)).any()
    out = {}
    for pipe in (False, True):
        with poisoned():
            out[pipe] = backward_tc.sparse_backward_tc(
                q, k, v, o_s, lse, do, lut, counts, rev, rcnt, bq, bk, D**-0.5, delta, pipe
            )
    return out, counts, rcnt


# (dtype, D, block_q, block_k, Nq, Nk): dQ 1 or 4 warps, dK/dV 1 warp
CASES = [
    (torch.float16, 16, 16, 16, 60, 56),  # 4 query blocks (tail 12), 4 key blocks (tail 8)
    (torch.bfloat16, 16, 64, 16, 70, 40),  # dK/dV: 64-query chunks, 2 stats a thread
]


@needs_sim
@pytest.mark.parametrize("dtype,D,bq,bk,Nq,Nk", CASES)
def test_pipelined_same_bits_as_sync(dtype, D, bq, bk, Nq, Nk):
    out, counts, rcnt = _run(dtype, D, bq, bk, Nq, Nk, seed=D + Nq + bq)
    for name, a, b in zip(("dq", "dk", "dv"), out[False], out[True], strict=True):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
    # the empty query block and the key block in no list got zeros, the rest did not
    dq, dk, _ = out[True]
    assert (dq[0, 0, :bq] == 0).all() and (dq[0, 0, bq : 2 * bq] != 0).any()
    j = int(torch.nonzero(rcnt[0, 0] == 0)[0])
    assert (dk[0, 0, j * bk : (j + 1) * bk] == 0).all() and (dk[0, 0, :bk] != 0).any()


def test_make_sparse_backward_refuses_unknown_kernel():
    with pytest.raises(ValueError, match="which"):
        backward_tc.make_sparse_backward("dx", 16, 16, 16, "bf16", True)


def test_use_pipelined_follows_the_switch(monkeypatch):
    monkeypatch.setenv("SLA_NUMBA_SPARSE_BWD", "pipelined")
    assert backward_tc.use_pipelined() and not backward_tc.use_pipelined(False)
    monkeypatch.delenv("SLA_NUMBA_SPARSE_BWD")
    assert not backward_tc.use_pipelined() and backward_tc.use_pipelined(True)
