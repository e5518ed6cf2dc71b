"""Tensor-core sparse kernels under the CUDA simulator (their pure-Python twins).

Runs only with NUMBA_ENABLE_CUDASIM=1 (set before numba is imported, e.g. by
tests/conftest.py on machines without a GPU). Tiny configurations: one or two
warps, D = 16 / 32, block_k = 16, against a float64 dense masked softmax.
"""

import numpy as np
import pytest
import torch
from _tc_reference import dense_reference, random_lut
from numba import config

from sla_numba._params import LSE_EMPTY
from sla_numba.testing import poisoned

pytestmark = pytest.mark.skipif(
    not config.ENABLE_CUDASIM, reason="needs NUMBA_ENABLE_CUDASIM=1 (simulator twins)"
)

# (dtype, D, block_q, block_k, Nq, Nk, tolerance)
CASES = [
    (torch.float16, 16, 16, 16, 40, 40, 2e-3),  # 1 warp x 16 rows, tails
    (torch.bfloat16, 32, 32, 16, 45, 37, 2e-2),  # 1 warp x 32 rows (two m-tiles), Nq != Nk
]


def _inputs(dtype, D, bq, bk, Nq, Nk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, Nq, D, generator=g).to(dtype)
    k = torch.randn(1, 2, Nk, D, generator=g).to(dtype)
    v = torch.randn(1, 2, Nk, D, generator=g).to(dtype)
    do = torch.randn(1, 2, Nq, D, generator=g).to(dtype)
    mq, mk = -(-Nq // bq), -(-Nk // bk)
    lut, counts = random_lut(1, 2, mq, mk, 2, seed)
    return q, k, v, do, lut, counts


@pytest.mark.parametrize("dtype,D,bq,bk,Nq,Nk,tol", CASES)
def test_forward_and_backward_match_float64(dtype, D, bq, bk, Nq, Nk, tol):
    from sla_numba.gpu.tc import backward as backward_tc
    from sla_numba.gpu.tc import forward as forward_tc

    q, k, v, do, lut, counts = _inputs(dtype, D, bq, bk, Nq, Nk, seed=D + Nq)
    assert (counts == 0).any() and (counts > 0).any()
    scale = D**-0.5
    with poisoned():
        o, lse = forward_tc.sparse_forward_tc(q, k, v, lut, counts, bq, bk, scale)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ro, rlse = dense_reference(qd, kd, vd, lut, counts, bq, bk, scale)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.isfinite(o).all()
    assert (o.double() - ro.detach()).abs().max().item() < tol
    empty = torch.isinf(rlse.detach())
    assert empty.any()
    assert (lse[empty] == np.float32(LSE_EMPTY)).all()
    assert (o[empty] == 0).all()
    assert (lse.double() - rlse.detach())[~empty].abs().max().item() < 1e-4

    rev, rcnt = backward_tc.reverse_index(lut, counts, -(-Nk // bk))
    with poisoned():
        dq, dk, dv = backward_tc.sparse_backward_tc(
            q, k, v, o, lse, do, lut, counts, rev, rcnt, bq, bk, scale
        )
    ro.backward(do.double())
    for got, want in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max().item() < 2 * tol * max(
            1.0, want.abs().max().item()
        )


def test_reverse_index_numpy_and_torch_agree():
    from sla_numba.gpu.tc.backward import reverse_index

    lut, counts = random_lut(2, 3, 5, 7, 3, seed=1)
    rt, ct = reverse_index(lut, counts, 7)
    rn, cn = reverse_index(lut.numpy(), counts.numpy(), 7)
    assert np.array_equal(rt.numpy(), rn) and np.array_equal(ct.numpy(), cn)
    for b in range(2):
        for h in range(3):
            for j in range(7):
                want = [i for i in range(5) if j in lut[b, h, i, : counts[b, h, i]].tolist()]
                assert rn[b, h, j, : cn[b, h, j]].tolist() == want


def test_tc_supported_rules():
    from sla_numba.gpu.tc.forward import tc_supported

    assert tc_supported("bfloat16", 128, 128, 64)
    assert tc_supported(torch.float16, 64, 64, 64)
    assert not tc_supported(torch.float32, 64, 64, 64)
    assert not tc_supported("bfloat16", 40, 64, 64)  # D not a multiple of 16
    assert not tc_supported("bfloat16", 256, 64, 64)  # too many registers
    assert not tc_supported("bfloat16", 64, 96, 64)  # block_q
    assert not tc_supported("bfloat16", 64, 64, 128)  # block_k


def test_twins_pack_round_to_nearest_even():
    from sla_numba.gpu.tc import ptx as _mma

    # 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0)
    bits = _mma.f32_to_bf16_bits(np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -2.5], np.float32))
    assert _mma.bf16_bits_to_f32(bits).tolist() == [1.0, 1.015625, -2.5]
