"""Block classification: counts, order, tie-break, LUT, equality with the reference, cpu == gpu."""

import dataclasses
import math

import numpy as np
import pytest
import strategies as S
import torch
from helpers import BACKENDS, for_backend, make, tiny, to_numpy
from hypothesis import given

import sla_numba
from sla_numba import _params
from sla_numba.reference import block_scores, classify_reference


def _check_result(res, shape, topk, skip):
    """Counts, dtypes, and a LUT that lists exactly the critical blocks of each row, ascending."""
    m, lut = to_numpy(res.map), to_numpy(res.lut)
    n_crit, n_skip = _params.block_counts(shape.mk, topk, skip)
    assert (res.n_crit, res.n_skip) == (n_crit, n_skip)
    assert m.dtype == np.int8 and m.shape == shape.map_shape
    assert lut.dtype == np.int32 and lut.shape == shape.map_shape[:3] + (n_crit,)
    assert ((m == 1).sum(-1) == n_crit).all(), "critical blocks per row"
    assert ((m == -1).sum(-1) == n_skip).all(), "negligible blocks per row"
    assert ((m == 0).sum(-1) == shape.mk - n_crit - n_skip).all(), "marginal blocks per row"
    assert (np.diff(lut, axis=-1) > 0).all(), "LUT not strictly ascending"
    assert ((lut >= 0) & (lut < shape.mk)).all(), "LUT index out of range"
    # n_crit distinct critical blocks per row: exactly the critical set
    picked = np.take_along_axis(m, lut.astype(np.int64), -1)
    assert (picked == 1).all(), "LUT lists a non-critical block"
    return m


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_classify_equals_reference(backend, kind, dtype):
    @for_backend(backend)
    @given(
        shape=S.shapes(tiny(backend)), seed=S.seeds, spread=S.spreads, topk=S.topks, skip=S.skips
    )
    def prop(shape, seed, spread, topk, skip):
        q, k, _ = S.qkv(shape, seed, dtype, spread)
        kw = dict(topk=topk, skip=skip, block_q=shape.block_q, block_k=shape.block_k)
        res = sla_numba.classify_blocks(
            make(q, kind, backend), make(k, kind, backend), backend=backend, **kw
        )
        assert type(res.map) is type(res.lut) is (np.ndarray if kind == "numpy" else torch.Tensor)
        m = _check_result(res, shape, topk, skip)
        # critical >= marginal >= negligible in score, row by row
        s = block_scores(q, k, shape.block_q, shape.block_k, 1 / math.sqrt(shape.d))
        lo = lambda c: np.where(m == c, s, np.inf).min(-1)  # noqa: E731
        hi = lambda c: np.where(m == c, s, -np.inf).max(-1)  # noqa: E731
        assert (lo(1) >= hi(0)).all() and (lo(0) >= hi(-1)).all() and (lo(1) >= hi(-1)).all()
        np.testing.assert_array_equal(m, classify_reference(q, k, **kw))

    prop()


def _tied_blocks(rng, order):
    """Key blocks of 4 rows [a, b, a, b] taken from a few prototypes: blocks built from the
    same prototype pool to exactly the same mean (float64 sums of fp32 are exact here),
    and so does a tail of 2 rows [a, b]."""
    protos = rng.integers(-8, 9, size=(4, 2, 8)).astype(np.float32) / 8
    blocks = [np.concatenate([protos[p]] * 2) for p in order]
    return np.concatenate(blocks + [protos[order[0]]])[None, None]  # + a 2-row tail


def test_all_tied_rows_pick_the_lowest_indices(backend):
    rng = np.random.default_rng(0)
    k = _tied_blocks(rng, [0] * 6)  # 7 key blocks, all equal
    q = np.concatenate([rng.standard_normal((1, 1, 8, 8)), np.zeros((1, 1, 3, 8))], axis=2).astype(
        np.float32
    )  # 3 query blocks, the last all zero
    res = sla_numba.classify_blocks(
        q, k, topk=2 / 7, skip=2 / 7, block_q=4, block_k=4, backend=backend
    )
    m = _check_result(res, S.Shape(1, 1, 11, 26, 8, 4, 4), 2 / 7, 2 / 7)
    np.testing.assert_array_equal(m[0, 0], np.tile([1, 1, 0, 0, 0, -1, -1], (3, 1)))


def test_equal_scores_rank_by_index(backend):
    """Blocks from 3 prototypes, so rows have several groups of exactly equal scores:
    between two equal scores the lower key-block index never gets the lower class."""
    rng = np.random.default_rng(1)
    for trial in range(5):
        k = _tied_blocks(rng, rng.integers(0, 3, size=9))  # 10 key blocks
        q = (rng.integers(-8, 9, size=(1, 1, 12, 8)) / 8).astype(np.float32)
        kw = dict(topk=0.3, skip=0.3, block_q=4, block_k=4)
        m = to_numpy(sla_numba.classify_blocks(q, k, backend=backend, **kw).map)[0, 0]
        s = block_scores(q, k, 4, 4, 1 / math.sqrt(8))[0, 0]
        for i in range(m.shape[0]):
            for j1 in range(m.shape[1]):
                for j2 in range(j1 + 1, m.shape[1]):
                    if s[i, j1] == s[i, j2]:
                        assert m[i, j1] >= m[i, j2], (trial, i, j1, j2, m[i], s[i])
        assert len(np.unique(s)) < s.size - 3, "the construction should give ties"
        np.testing.assert_array_equal(m, classify_reference(q, k, **kw)[0, 0])


def test_nan_scores_rank_last(backend):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 8, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16, 4)).astype(np.float32)
    q[0, 0, 5, 1] = np.nan  # query block 1: every score NaN -> all tie at -inf
    k[0, 0, 2, 0] = np.nan  # key block 0: NaN score in every row
    res = sla_numba.classify_blocks(
        q, k, topk=0.25, skip=0.25, block_q=4, block_k=4, backend=backend
    )
    m = to_numpy(res.map)
    np.testing.assert_array_equal(m[0, 0, 1], [1, 0, 0, -1])
    assert m[0, 0, 0, 0] == -1
    np.testing.assert_array_equal(
        m, classify_reference(q, k, topk=0.25, skip=0.25, block_q=4, block_k=4)
    )


def test_result_is_frozen():
    q = np.ones((1, 1, 4, 2), np.float32)
    res = sla_numba.classify_blocks(q, q, block_q=2, block_k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.n_crit = 3


@pytest.mark.skipif("gpu" not in BACKENDS, reason="no gpu backend")
@pytest.mark.gpu
def test_cpu_and_gpu_maps_are_identical():
    @for_backend("gpu")
    @given(shape=S.shapes(tiny("gpu")), seed=S.seeds, spread=S.spreads, topk=S.topks, skip=S.skips)
    def prop(shape, seed, spread, topk, skip):
        q, k, _ = S.qkv(shape, seed, np.float32, spread)
        kw = dict(topk=topk, skip=skip, block_q=shape.block_q, block_k=shape.block_k)
        cpu = sla_numba.classify_blocks(q, k, backend="cpu", **kw)
        gpu = sla_numba.classify_blocks(
            make(q, "torch", "gpu"), make(k, "torch", "gpu"), backend="gpu", **kw
        )
        np.testing.assert_array_equal(cpu.map, to_numpy(gpu.map))
        np.testing.assert_array_equal(cpu.lut, to_numpy(gpu.lut))

    prop()
