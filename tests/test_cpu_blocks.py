"""The CPU kernels' fast block helpers against their readable references.

* ``sum_marginal`` (row-blocked) vs ``sum_marginal_reference``: the same bits, in
  both ways of summing (total − others, direct sum) and with non-finite totals;
* ``feature_map_grad_block_t`` (tokens along the contiguous axis) vs the per-token
  ``feature_map_grad_acc``, for every φ, with the inputs where the rules switch
  (x = 0, tiny x > 0 where elu's y rounds to 1, NaN);
* the backward's linear parts ``_linear_dq_block`` / ``_linear_dkdv_block`` vs their
  per-token references, on a tail block (nr not a multiple of the vector width).
Outputs start as NaN-poisoned or random buffers, so an unwritten element fails.
"""

import importlib

import numpy as np
import pytest

from sla_numba.cpu import _common as C

bw = importlib.import_module("sla_numba.cpu.backward")  # the module, not the function

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
PHIS = pytest.mark.parametrize(
    "phi", [C.PHI_SOFTMAX, C.PHI_ELU, C.PHI_RELU], ids=["sm", "elu", "relu"]
)


def _states(rng, dtype, M, D):
    mats = rng.standard_normal((M, D, D)).astype(dtype)
    vecs = rng.standard_normal((M, D)).astype(dtype)
    return mats, vecs, mats.astype(np.float64).sum(0), vecs.astype(np.float64).sum(0)


@DTYPES
@pytest.mark.parametrize("D", [24, 64, 72, 128])  # the register part: whole vectors + tails
@pytest.mark.parametrize("n_marg", [0, 3, 20, 29], ids=lambda n: f"marg{n}")
@pytest.mark.parametrize("use_totals", [True, False])
def test_sum_marginal_same_bits_as_reference(dtype, D, n_marg, use_totals):
    rng = np.random.default_rng(n_marg + D)
    M = 29
    mats, vecs, tot_m, tot_v = _states(rng, dtype, M, D)
    classes = rng.choice(np.array([1, -1], np.int8), M)
    classes[rng.permutation(M)[:n_marg]] = 0
    outs = []
    for fn in (C.sum_marginal, C.sum_marginal_reference):
        om = np.full((D, D), np.nan, dtype)
        ov = np.full(D, np.nan, dtype)
        n = fn(mats, vecs, tot_m, tot_v, use_totals, classes, om, ov)
        outs.append((n, om, ov))
    (n1, m1, v1), (n2, m2, v2) = outs
    assert n1 == n2 == n_marg
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(v1, v2)
    want = mats[classes == 0].astype(np.float64).sum(0)
    np.testing.assert_allclose(m1, want, rtol=1e-5, atol=1e-5)


@DTYPES
@PHIS
def test_feature_map_grad_block_t_matches_per_token(dtype, phi):
    rng = np.random.default_rng(phi)
    nr, D = 37, 20
    x = rng.standard_normal((nr, D)).astype(dtype)
    x[0, :4] = [0.0, 1e-9, -1e-9, np.nan]  # where elu / relu switch rules, and NaN
    x[1, :] = 1e-9  # elu: y = 1 exactly for every element
    dy = rng.standard_normal((nr, D)).astype(dtype)
    want = rng.standard_normal((nr, D)).astype(dtype)  # accumulated into
    got = want.copy()
    y = np.empty(D, dtype)
    for r in range(nr):
        C.feature_map_row(x[r], y, phi)
        C.feature_map_grad_acc(x[r], y, dy[r], want[r], phi)
    yt = np.full((D, nr + 3), np.nan, dtype)  # wider than nr: only :nr is used
    C.feature_map_block_t(x, 0, nr, yt, phi)
    gt = np.full((D, nr + 3), np.nan, dtype)
    gt[:, :nr] = dy.T
    C.feature_map_grad_block_t(yt, gt, nr, phi)
    C.add_transposed(gt, got, nr)
    if phi == C.PHI_SOFTMAX:  # the inner product ⟨dy, y⟩ is summed in another order
        tol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    else:
        np.testing.assert_array_equal(got, want)


def _linear_inputs(rng, dtype, N, D, M):
    q = rng.standard_normal((N, D)).astype(dtype)
    do = rng.standard_normal((N, D)).astype(dtype)
    delta = rng.standard_normal(N).astype(dtype)
    mats, vecs, tot_m, tot_v = _states(rng, dtype, M, D)
    vecs = np.abs(vecs)  # Z > 0, as sums of φ are
    tot_v = vecs.astype(np.float64).sum(0)
    classes = np.zeros(M, np.int8)
    classes[[1, 4]] = 1
    classes[2] = -1
    return q, do, delta, (mats, vecs, tot_m, tot_v, True), classes


@DTYPES
@PHIS
def test_linear_dq_block_matches_reference(dtype, phi):
    rng = np.random.default_rng(10 + phi)
    N, D, M, r0, nr = 100, 24, 7, 50, 37
    q, do, delta, kv, classes = _linear_inputs(rng, dtype, N, D, M)
    res = []
    for fn in (bw._linear_dq_block, bw._linear_dq_block_reference):
        dqb = np.ones((nr, D), dtype)
        qo = np.full((D, D), np.nan, dtype)
        qd = np.full(D, np.nan, dtype)
        fn(q, kv, classes, do, delta, r0, nr, phi, dtype(1e-6), dqb, qo, qd)
        res.append((dqb, qo, qd))
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for got, want in zip(*res):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@DTYPES
@PHIS
def test_linear_dkdv_block_matches_reference(dtype, phi):
    rng = np.random.default_rng(20 + phi)
    N, D, M, c0, nk = 100, 24, 7, 50, 37
    k, v, _, qstates, classes = _linear_inputs(rng, dtype, N, D, M)
    res = []
    for fn in (bw._linear_dkdv_block, bw._linear_dkdv_block_reference):
        dkb = np.ones((nk, D), dtype)
        dvb = np.full((nk, D), 2.0, dtype)
        fn(k, v, qstates, classes, c0, nk, phi, dkb, dvb)
        res.append((dkb, dvb))
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for got, want in zip(*res):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
