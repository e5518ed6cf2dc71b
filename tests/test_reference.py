"""The oracle checked: definitions, SDPA, the blockwise spec formulas, finite differences."""

import math

import blockwise
import numpy as np
import pytest
import strategies as S
import torch
from helpers import assert_close_rms
from hypothesis import given
from hypothesis import strategies as st

from sla_numba import _arrays, _params, testing
from sla_numba.reference import (
    block_scores,
    classify_reference,
    expand_block_map,
    feature_map_fn,
    pool_blocks,
    sla_reference,
)


def _t(*arrays):
    return [torch.from_numpy(a) for a in arrays]


# --------------------------------------------------------------------------- building blocks
@given(shape=S.shapes(), seed=S.seeds)
def test_pool_blocks_is_mean_of_valid_rows(shape, seed):
    q, _, _ = S.qkv(shape, seed)
    pooled = pool_blocks(q, shape.block_q)
    assert pooled.shape == (shape.b, shape.h, shape.mq, shape.d)
    for i in range(shape.mq):
        rows = q[:, :, i * shape.block_q : (i + 1) * shape.block_q]
        np.testing.assert_allclose(pooled[:, :, i], rows.mean(axis=2), rtol=1e-12, atol=1e-14)


@given(shape=S.shapes(), seed=S.seeds)
def test_expand_block_map_definition(shape, seed):
    bm = S.random_block_map(shape, seed)
    tok = expand_block_map(bm, shape.nq, shape.nk, shape.block_q, shape.block_k)
    assert tok.shape == (shape.b, shape.h, shape.nq, shape.nk)
    r = np.arange(shape.nq)[:, None] // shape.block_q
    c = np.arange(shape.nk)[None, :] // shape.block_k
    np.testing.assert_array_equal(tok, bm[:, :, r, c])


@given(shape=S.shapes(), seed=S.seeds)
def test_block_scores_equal_pooled_dot(shape, seed):
    q, k, _ = S.qkv(shape, seed)
    s = block_scores(q, k, shape.block_q, shape.block_k, 0.3)
    pk = pool_blocks(k, shape.block_k)
    expect = 0.3 * pool_blocks(q, shape.block_q) @ np.swapaxes(pk, -1, -2)
    np.testing.assert_allclose(s, expect, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", sorted(_params.FEATURE_MAPS))
def test_feature_maps(name):
    x = torch.tensor([[-2.0, -0.5, 0.0, 1.5]], dtype=torch.float64)
    y = feature_map_fn(name)(x)
    expect = {
        "softmax": np.exp(x.numpy()) / np.exp(x.numpy()).sum(),
        "elu": np.where(x.numpy() > 0, x.numpy() + 1, np.exp(x.numpy())),
        "relu": np.maximum(x.numpy(), 0),
    }[name]
    np.testing.assert_allclose(y.numpy(), expect, rtol=1e-14)
    with pytest.raises(ValueError, match="feature_map"):
        feature_map_fn("gelu")


# --------------------------------------------------------------------------- classification
def _brute_force_map(scores, n_crit, n_skip):
    out = np.zeros(scores.shape, dtype=np.int8)
    for idx in np.ndindex(*scores.shape[:-1]):
        row = [(math.inf if math.isnan(s) else -s, j) for j, s in enumerate(scores[idx])]
        order = [j for _, j in sorted(row)]
        out[idx + (order[:n_crit],)] = 1
        if n_skip:
            out[idx + (order[len(order) - n_skip :],)] = -1
    return out


@given(shape=S.shapes(), seed=S.seeds, topk=S.topks, skip=S.skips, spread=S.spreads)
def test_classify_reference_ranks_by_score_then_index(shape, seed, topk, skip, spread):
    q, k, _ = S.qkv(shape, seed, np.float32, spread)
    m = classify_reference(q, k, topk=topk, skip=skip, block_q=shape.block_q, block_k=shape.block_k)
    assert m.dtype == np.int8 and m.shape == shape.map_shape
    n_crit, n_skip = _params.block_counts(shape.mk, topk, skip)
    assert ((m == 1).sum(-1) == n_crit).all() and ((m == -1).sum(-1) == n_skip).all()
    s = block_scores(q, k, shape.block_q, shape.block_k, 1 / math.sqrt(shape.d))
    np.testing.assert_array_equal(m, _brute_force_map(s, n_crit, n_skip))


def test_classify_reference_ties_go_to_lower_index():
    # all key blocks identical -> all scores equal -> first n_crit critical, last n_skip negligible
    k = np.tile(np.random.default_rng(0).standard_normal((1, 1, 4, 8)), (1, 1, 6, 1))
    q = np.random.default_rng(1).standard_normal((1, 1, 12, 8))
    m = classify_reference(q, k, topk=0.34, skip=0.34, block_q=4, block_k=4)
    np.testing.assert_array_equal(m[0, 0], np.tile([1, 1, 0, 0, -1, -1], (3, 1)))


def test_classify_reference_nan_ranks_last():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 8, 4)), rng.standard_normal((1, 1, 16, 4))
    q[0, 0, 5, 1] = np.nan  # query block 1: every score NaN -> all tie at -inf
    k[0, 0, 2, 0] = np.nan  # key block 0: NaN score in every row -> ranks last
    m = classify_reference(q, k, topk=0.25, skip=0.25, block_q=4, block_k=4)
    np.testing.assert_array_equal(m[0, 0, 1], [1, 0, 0, -1])
    assert m[0, 0, 0, 0] == -1


# --------------------------------------------------------------------------- attention
@given(shape=S.shapes(), seed=S.seeds, spread=S.spreads)
def test_topk1_equals_sdpa(shape, seed, spread):
    q, k, v = _t(*S.qkv(shape, seed, spread=spread))
    bm = torch.ones(shape.map_shape, dtype=torch.int8)
    o, o_s, o_l = sla_reference(q, k, v, bm, block_q=shape.block_q, block_k=shape.block_k)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert_close_rms(o_s, expect, 1e-12, "O_s vs SDPA")
    assert torch.equal(o_l, torch.zeros_like(o_l))
    assert torch.equal(o, o_s)


@given(case=S.cases(), proj=st.data())
def test_dense_reference_matches_blockwise_spec(case, proj):
    sh = case.shape
    q, k, v = case.inputs()
    w, b = proj.draw(S.projections(sh.d))
    scale = 1 / math.sqrt(sh.d)
    o, o_s, o_l = sla_reference(
        q,
        k,
        v,
        case.block_map,
        block_q=sh.block_q,
        block_k=sh.block_k,
        feature_map=case.feature_map,
        proj_weight=w,
        proj_bias=b,
    )
    assert isinstance(o, np.ndarray) and o.dtype == np.float64
    e_s, e_l, _ = blockwise.forward(
        q, k, v, case.block_map, sh.block_q, sh.block_k, case.feature_map, scale, _params.EPS
    )
    assert_close_rms(o_s, e_s, 1e-12, "O_s")
    assert_close_rms(o_l, e_l, 1e-12, "O_l")
    e = e_s + (e_l if w is None else e_l @ w.T) + (0 if b is None else b)
    assert_close_rms(o, e, 1e-12, "O")


@given(case=S.cases(), seed=S.seeds)
def test_spec_backward_formulas_match_autograd(case, seed):
    """SLA_SPEC §3's backward formulas (what the kernels implement) equal the oracle's autograd."""
    sh = case.shape
    qn, kn, vn = case.inputs()
    scale = 1 / math.sqrt(sh.d)
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in (qn, kn, vn))
    _, o_s, o_l = sla_reference(
        q,
        k,
        v,
        torch.from_numpy(case.block_map),
        block_q=sh.block_q,
        block_k=sh.block_k,
        feature_map=case.feature_map,
    )
    rng = np.random.default_rng(seed)
    do_s, do_l = rng.standard_normal(qn.shape), rng.standard_normal(qn.shape)
    grads = torch.autograd.grad([o_s, o_l], [q, k, v], _t(do_s, do_l), allow_unused=True)
    fs, fl, lse = blockwise.forward(
        qn, kn, vn, case.block_map, sh.block_q, sh.block_k, case.feature_map, scale, _params.EPS
    )
    expect = blockwise.backward(
        qn,
        kn,
        vn,
        fs,
        fl,
        lse,
        do_s,
        do_l,
        case.block_map,
        sh.block_q,
        sh.block_k,
        case.feature_map,
        scale,
        _params.EPS,
    )
    for name, g, e in zip("qkv", grads, expect):
        g = torch.zeros_like(q if name == "q" else k) if g is None else g
        assert_close_rms(g, e, 1e-10, f"d{name}")


@pytest.mark.parametrize("feature_map", sorted(_params.FEATURE_MAPS))
def test_reference_gradcheck(feature_map):
    rng = np.random.default_rng(3)
    q, k, v = (
        torch.from_numpy(rng.standard_normal(s)).requires_grad_()
        for s in [(1, 2, 5, 3), (1, 2, 7, 3), (1, 2, 7, 3)]
    )
    w = torch.from_numpy(rng.standard_normal((3, 3))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(3)).requires_grad_()
    bm = torch.tensor(
        [
            [[1, 0, -1, 0], [-1, -1, 0, 0], [1, 1, -1, 1]],
            [[0, 0, 0, 0], [-1, -1, -1, -1], [1, 0, 1, -1]],
        ],
        dtype=torch.int8,
    )[None]

    def fn(q, k, v, w, b):
        return sla_reference(
            q, k, v, bm, block_q=2, block_k=2, feature_map=feature_map, proj_weight=w, proj_bias=b
        )[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, w, b))


def test_empty_rows_give_zero_not_nan():
    q, k, v = (torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bm = torch.tensor([[[[-1, -1], [1, -1]]]], dtype=torch.int8)  # row 0 negligible only
    o, o_s, o_l = sla_reference(q, k, v, bm, block_q=2, block_k=2)
    assert torch.equal(o[0, 0, :2], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(o_l, torch.zeros_like(o_l))
    o.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 0, :2], torch.zeros(2, 2, dtype=torch.float64))


def test_numpy_and_torch_paths_agree():
    sh = S.Shape(1, 2, 9, 11, 4, 4, 4)
    q, k, v = S.qkv(sh, 5)
    bm = S.random_block_map(sh, 5)
    out_np = sla_reference(q, k, v, bm, block_q=4, block_k=4, feature_map="elu")
    out_t = sla_reference(*_t(q, k, v, bm), block_q=4, block_k=4, feature_map="elu")
    for a, b in zip(out_np, out_t):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b.numpy())
    m_np = classify_reference(
        q.astype(np.float32), k.astype(np.float32), topk=0.4, skip=0.2, block_q=4, block_k=4
    )
    m_t = classify_reference(
        *_t(q.astype(np.float32), k.astype(np.float32)), topk=0.4, skip=0.2, block_q=4, block_k=4
    )
    assert isinstance(m_np, np.ndarray) and isinstance(m_t, torch.Tensor)
    np.testing.assert_array_equal(m_np, m_t.numpy())


def test_nan_in_a_query_row_stays_in_that_row():
    sh = S.Shape(1, 1, 8, 8, 4, 4, 4)
    q, k, v = S.qkv(sh, 1)
    q[0, 0, 5, 2] = np.nan
    bm = np.array([[[[1, 0], [0, 1]]]], dtype=np.int8)
    o, _, _ = sla_reference(q, k, v, bm, block_q=4, block_k=4)
    bad = np.isnan(o).any(axis=-1)[0, 0]
    np.testing.assert_array_equal(bad, np.arange(8) == 5)


def test_poisoning_hook_fills_new_buffers():
    with testing.poisoned():
        assert np.isnan(_arrays.np_empty((3,), np.float32)).all()
        assert (_arrays.np_empty((3,), np.int8) == _arrays.POISON_INT).all()
    assert testing.poisoning()  # the session fixture keeps it on outside
