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
(block_q 64 > 16 * warps of dK/dV: two lse / delta values a thread). ~40 s on one core.
GPU (cc >= 8.0): the Wan2.1 configuration (D = 128, blocks 64 x 64, bf16) and two
others (block_q 128: two query chunks a block in dK/dV; fp16), same bits.
"""

import numpy as np
import pytest
import torch
from _tc_reference import needs_gpu, needs_sim

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


def _run(dtype, D, bq, bk, Nq, Nk, seed, dev="cpu", H=1):
    g = torch.Generator(device=dev).manual_seed(seed)
    B = 1

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    q, do = (randn(B, H, Nq, D).to(dtype) for _ in range(2))
    k, v = (randn(B, H, Nk, D).to(dtype) for _ in range(2))
    # any finite lse / delta do for a bit-for-bit comparison (P = 2^(S c - lse) stays finite)
    lse = torch.rand(B, H, Nq, generator=g, device=dev) * 2 + 1
    delta = randn(B, H, Nq)
    o_s = torch.zeros(B, H, Nq, D, device=dev)
    mq, mk = -(-Nq // bq), -(-Nk // bk)
    lut, counts = (x.expand(B, H, *x.shape[2:]).contiguous().to(dev) for x in _lut(mq, mk))
    rev, rcnt = backward_tc.reverse_index(lut, counts, mk)
    assert (counts == 0).any() and (rcnt == 0).any() and (rcnt >= 2).any()
    out = {}
    for pipe in (False, True):
        with poisoned():
            out[pipe] = backward_tc.sparse_backward_tc(
                q, k, v, o_s, lse, do, lut, counts, rev, rcnt, bq, bk, D**-0.5, delta, pipe
            )
    return out, counts, rcnt


# (dtype, D, block_q, block_k, Nq, Nk): dQ 1 or 4 warps, dK/dV 1 warp
CASES = [
    # 5 query blocks (tail 11): 0 to 3 key blocks; 4 key blocks (tail 8), walks of 2 and 3
    (torch.float16, 16, 16, 16, 75, 56),
    # dK/dV: 64-query chunks (2 lse / delta a thread), a walk of 2; query tail 2, key tail 8
    (torch.bfloat16, 16, 64, 16, 130, 24),
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
    j0, j1 = (int(torch.nonzero(m)[0]) for m in (rcnt[0, 0] == 0, rcnt[0, 0] > 0))
    assert (dk[0, 0, j0 * bk : (j0 + 1) * bk] == 0).all()
    assert (dk[0, 0, j1 * bk : (j1 + 1) * bk] != 0).any()


@needs_gpu
@pytest.mark.parametrize(
    "dtype,D,bq,bk,Nq,Nk",
    [
        (torch.bfloat16, 128, 64, 64, 4000, 3990),  # the Wan2.1 configuration, smaller N
        (torch.bfloat16, 64, 128, 64, 3000, 3100),  # two query chunks a block in dK/dV
        (torch.float16, 128, 128, 64, 2000, 2050),
    ],
)
def test_gpu_pipelined_same_bits_as_sync(dtype, D, bq, bk, Nq, Nk):
    out, _, _ = _run(dtype, D, bq, bk, Nq, Nk, seed=D, dev="cuda", H=3)
    for name, a, b in zip(("dq", "dk", "dv"), out[False], out[True], strict=True):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


def test_make_sparse_backward_refuses_unknown_kernel():
    with pytest.raises(ValueError, match="which"):
        backward_tc.make_sparse_backward("dx", 16, 16, 16, "bf16", True)


def test_use_pipelined_follows_the_switch(monkeypatch):
    monkeypatch.setenv("SLA_NUMBA_SPARSE_BWD", "pipelined")
    assert backward_tc.use_pipelined() and not backward_tc.use_pipelined(False)
    monkeypatch.delenv("SLA_NUMBA_SPARSE_BWD")
    assert not backward_tc.use_pipelined() and backward_tc.use_pipelined(True)
