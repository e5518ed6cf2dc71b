"""Forward: O, O_s, O_l of the public API against the dense float64 reference."""

import math

import blockwise
import numpy as np
import pytest
import strategies as S
import torch
from helpers import HAS_CUDA, assert_close_rms, for_backend, make, tiny, to_f64
from hypothesis import given
from hypothesis import strategies as st

import sla_numba
from sla_numba import _params
from sla_numba.reference import classify_reference, sla_reference

KINDS = ["numpy", "torch"]


def _reference(inputs, block_map, sh, feature_map, w=None, b=None, linear_scope="marginal"):
    """The float64 reference (numpy) of whatever arrays the API was given."""
    q, k, v = (to_f64(x) for x in inputs)
    return sla_reference(
        q,
        k,
        v,
        to_f64(block_map).astype(np.int8),
        block_q=sh.block_q,
        block_k=sh.block_k,
        feature_map=feature_map,
        proj_weight=None if w is None else to_f64(w),
        proj_bias=None if b is None else to_f64(b),
        linear_scope=linear_scope,
    )


def _check_empty_rows_exact(o_s, o_l, block_map, sh, linear_scope="marginal"):
    """Rows with no critical block: O_s exactly 0; no marginal block: O_l exactly 0
    (with linear_scope="global" every row has linear blocks)."""
    o_s, o_l = to_f64(o_s), to_f64(o_l)
    row_block = np.arange(sh.nq) // sh.block_q
    no_crit = ~(block_map == 1).any(-1)[:, :, row_block]  # (B, H, Nq)
    no_marg = ~(block_map == 0).any(-1)[:, :, row_block] & (linear_scope == "marginal")
    assert (o_s[no_crit] == 0).all(), "O_s of a row with no critical block is not exactly 0"
    assert (o_l[no_marg] == 0).all(), "O_l of a row with no marginal block is not exactly 0"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_forward_matches_reference_on_random_maps(backend, kind, dtype):
    """User-given maps (rows with no critical / no marginal block), every φ, with and
    without projection, both linear scopes and layouts, awkward shapes; float64
    tight, float32 within 1e-4."""
    tol = 1e-9 if dtype == np.float64 else 1e-4

    @for_backend(backend)
    @given(case=S.cases(tiny=tiny(backend)), data=st.data())
    def prop(case, data):
        sh = case.shape
        w, b = data.draw(S.projections(sh.d, dtype))
        scope, layout = data.draw(S.linear_scopes), data.draw(S.layouts)
        inputs = [make(x, kind, backend, dtype) for x in case.inputs()]
        bm = make(case.block_map, kind, backend)
        pw = None if w is None else make(w, kind, backend)
        pb = None if b is None else make(b, kind, backend)
        kw = dict(
            block_q=sh.block_q,
            block_k=sh.block_k,
            feature_map=case.feature_map,
            block_map=bm,
            backend=backend,
            linear_scope=scope,
            layout=layout,
        )
        given_ = [S.to_layout(x, layout) for x in inputs]  # (B, N, H, D) views
        o = S.to_layout(
            sla_numba.sla_attention(*given_, proj_weight=pw, proj_bias=pb, **kw), layout
        )
        o_s, o_l = (
            S.to_layout(x, layout)
            for x in sla_numba.sla_attention(*given_, return_parts=True, **kw)
        )
        for out in (o, o_s, o_l):
            assert type(out) is type(inputs[0])
            assert out.dtype == inputs[0].dtype and tuple(out.shape) == sh.q_shape
        if kind == "torch":
            assert o.device == inputs[0].device
        e, e_s, e_l = _reference(inputs, case.block_map, sh, case.feature_map, pw, pb, scope)
        assert_close_rms(o_s, e_s, tol, "O_s")
        assert_close_rms(o_l, e_l, tol, "O_l")
        assert_close_rms(o, e, tol, "O")
        _check_empty_rows_exact(o_s, o_l, case.block_map, sh, scope)

    prop()


@pytest.mark.parametrize("kind", KINDS)
def test_classified_forward_matches_reference(backend, kind):
    """block_map=None: the API classifies (as classify_reference does) and attends."""

    @for_backend(backend)
    @given(
        shape=S.shapes(tiny(backend)),
        seed=S.seeds,
        spread=S.spreads,
        topk=S.topks,
        skip=S.skips,
        fm=S.feature_maps,
    )
    def prop(shape, seed, spread, topk, skip, fm):
        q, k, v = S.qkv(shape, seed, np.float32, spread)
        inputs = [make(x, kind, backend) for x in (q, k, v)]
        kw = dict(topk=topk, skip=skip, block_q=shape.block_q, block_k=shape.block_k)
        o_s, o_l = sla_numba.sla_attention(
            *inputs, feature_map=fm, return_parts=True, backend=backend, **kw
        )
        bm = classify_reference(q, k, **kw)
        _, e_s, e_l = _reference((q, k, v), bm, shape, fm)
        assert_close_rms(o_s, e_s, 1e-4, "O_s")
        assert_close_rms(o_l, e_l, 1e-4, "O_l")

    prop()


@pytest.mark.parametrize("kind", KINDS)
def test_topk_one_is_dense_softmax_attention(backend, kind):
    """topk = 1: every block critical, O equals SDPA and O_l is exactly 0."""

    @for_backend(backend)
    @given(shape=S.shapes(tiny(backend)), seed=S.seeds, spread=S.spreads, fm=S.feature_maps)
    def prop(shape, seed, spread, fm):
        q, k, v = S.qkv(shape, seed, np.float32, spread)
        inputs = [make(x, kind, backend) for x in (q, k, v)]
        kw = dict(
            topk=1.0,
            skip=0.0,
            block_q=shape.block_q,
            block_k=shape.block_k,
            feature_map=fm,
            backend=backend,
        )
        o = sla_numba.sla_attention(*inputs, **kw)
        _, o_l = sla_numba.sla_attention(*inputs, return_parts=True, **kw)
        expect = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(x).double() for x in (q, k, v))
        )
        assert_close_rms(o, expect, 1e-4, "O vs SDPA")
        assert (to_f64(o_l) == 0).all()

    prop()


def test_lse_of_the_forward_op(backend):
    """The forward op's LSE: log Σ exp over critical tokens, LSE_EMPTY on rows with none."""

    @for_backend(backend)
    @given(case=S.cases(tiny=tiny(backend)))
    def prop(case):
        sh = case.shape
        q, k, v = case.inputs()
        args = [make(x, "torch", backend) for x in (q, k, v, case.block_map)]
        scale = 1 / math.sqrt(sh.d)
        fm = _params.FEATURE_MAPS[case.feature_map]
        _, _, lse, _ = torch.ops.sla_numba.forward(
            *args, sh.block_q, sh.block_k, scale, fm, _params.EPS, 0, backend
        )
        _, _, e_lse = blockwise.forward(
            q, k, v, case.block_map, sh.block_q, sh.block_k, case.feature_map, scale, _params.EPS
        )
        empty = e_lse == _params.LSE_EMPTY
        assert (to_f64(lse)[empty] == _params.LSE_EMPTY).all()
        assert_close_rms(to_f64(lse)[~empty], e_lse[~empty], 1e-12, "lse")

    prop()


def test_defaults_on_a_realistic_shape():
    """Default topk/skip/block sizes/φ, D = 64, N not a multiple of 64."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 300, 64), dtype=np.float32) for _ in range(3))
    o = sla_numba.sla_attention(q, k, v)
    assert o.dtype == np.float32
    bm = classify_reference(q, k, topk=0.05, skip=0.10, block_q=64, block_k=64)
    e, _, _ = sla_reference(q, k, v, bm)
    assert_close_rms(o, e, 1e-4, "O")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_auto_backend_is_the_backend_of_the_inputs(device):
    sh = S.Shape(1, 2, 20, 13, 4, 4, 4)
    q, k, v = (torch.from_numpy(x).to(device) for x in S.qkv(sh, 0, np.float32))
    kw = dict(topk=0.3, skip=0.3, block_q=4, block_k=4)
    auto = sla_numba.sla_attention(q, k, v, **kw)
    explicit = sla_numba.sla_attention(q, k, v, backend="cpu" if device == "cpu" else "gpu", **kw)
    assert torch.equal(auto, explicit)


def test_numpy_and_torch_paths_give_the_same_bits(backend):
    sh = S.Shape(2, 2, 23, 17, 8, 8, 4)
    arrays = S.qkv(sh, 1, np.float32)
    kw = dict(topk=0.3, skip=0.2, block_q=8, block_k=4, feature_map="elu", backend=backend)
    o_np = sla_numba.sla_attention(*arrays, **kw)
    o_t = sla_numba.sla_attention(*(make(x, "torch", backend) for x in arrays), **kw)
    np.testing.assert_array_equal(o_np, o_t.cpu().numpy())


def test_float32_projection_with_float64_inputs():
    """A float32 nn.Linear weight with float64 inputs: output dtype is the input dtype."""
    sh = S.Shape(1, 1, 9, 9, 4, 4, 4)
    q, k, v = (torch.from_numpy(x) for x in S.qkv(sh, 2))
    w = torch.randn(4, 4, dtype=torch.float32)
    o = sla_numba.sla_attention(q, k, v, topk=0.5, block_q=4, block_k=4, proj_weight=w)
    assert o.dtype == torch.float64
    bm = classify_reference(q, k, topk=0.5, skip=0.1, block_q=4, block_k=4)
    e, _, _ = sla_reference(q, k, v, bm, block_q=4, block_k=4, proj_weight=w.double())
    assert_close_rms(o, e, 1e-6, "O")  # W is float32: the projection runs in float32
