"""The CPU kernels' vector-register helpers (``_simd.py``) against plain forms, bit for bit.

* ``gemm_set`` / ``gemm_tn_set`` (C = A·B, accumulators start at zero in registers)
  vs zero-filling C and calling ``gemm_acc`` / ``gemm_tn_acc``;
* ``transpose_block`` and ``add_transposed`` (square tiles transposed by shuffles,
  plain loops at the edges) vs NumPy;
* ``sum_marginal`` (float64 accumulators in registers, ``_simd.row_sum_f64``) vs
  ``sum_marginal_reference`` at row lengths D below, at and above the register part.

Shapes straddle the tiles, so the tiled parts, the edges and the corners are all
checked; outputs start as NaN or random buffers, so an unwritten element fails.
"""

import numpy as np
import pytest

from sla_numba.cpu import _common as C

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


@DTYPES
@pytest.mark.parametrize(
    "m, n, kk", [(64, 64, 64), (1, 1, 1), (13, 45, 7), (64, 60, 33), (3, 70, 64), (40, 5, 0)]
)
def test_gemm_set_same_bits_as_fill_then_acc(dtype, m, n, kk):
    rng = np.random.default_rng(m * 7 + n * 3 + kk)
    a = rng.standard_normal((m + 2, kk + 3)).astype(dtype)
    at = np.ascontiguousarray(a[:, :kk].T)  # (kk, m + 2): A stored transposed
    b = rng.standard_normal((kk + 1, n + 5)).astype(dtype)
    for set_fn, acc_fn, lhs in ((C.gemm_set, C.gemm_acc, a), (C.gemm_tn_set, C.gemm_tn_acc, at)):
        big = rng.standard_normal((m + 4, n + 6)).astype(dtype)
        want = big.copy()
        want[:m, :n] = 0
        acc_fn(lhs, b, want, m, n, kk)
        set_fn(lhs, b, big, m, n, kk)
        np.testing.assert_array_equal(big, want)


@DTYPES
@pytest.mark.parametrize("rows, cols", [(64, 64), (16, 16), (50, 64), (64, 17), (7, 3), (33, 40)])
def test_transpose_block(dtype, rows, cols):
    rng = np.random.default_rng(rows * 100 + cols)
    src = rng.standard_normal((rows + 5, cols + 2)).astype(dtype)
    factor = dtype(0.37)
    dst = np.full((cols + 3, rows + 4), np.nan, dtype)
    before = dst.copy()
    C.transpose_block(src, 2, rows, cols, factor, dst)
    np.testing.assert_array_equal(dst[:cols, :rows], src[2 : 2 + rows, :cols].T * factor)
    mask = np.ones(dst.shape, bool)
    mask[:cols, :rows] = False
    np.testing.assert_array_equal(dst[mask], before[mask])


@DTYPES
@pytest.mark.parametrize("nr, D", [(64, 64), (16, 32), (50, 64), (64, 17), (5, 3)])
def test_add_transposed(dtype, nr, D):
    rng = np.random.default_rng(nr * 100 + D)
    src_t = rng.standard_normal((D, nr + 3)).astype(dtype)
    dst = rng.standard_normal((nr + 2, D)).astype(dtype)
    want = dst.copy()
    want[:nr] += src_t[:, :nr].T
    C.add_transposed(src_t, dst, nr)
    np.testing.assert_array_equal(dst, want)


@pytest.mark.parametrize("Mq, Mk, D", [(5, 7, 3), (16, 64, 64), (3, 33, 17)])
def test_rank_rows_same_map_as_reference(Mq, Mk, D):
    """classify: the scores vectorised over key blocks give the same map as one at a time,
    ties and NaN scores included."""
    import importlib

    cl = importlib.import_module("sla_numba.cpu.classify")
    rng = np.random.default_rng(Mq * Mk + D)
    pq = rng.standard_normal((2, 1, Mq, D))
    pk = rng.standard_normal((2, 1, Mk, D))
    pk[0, 0, 1] = pk[0, 0, 0]  # a tie
    pk[1, 0, 2, 0] = np.nan  # a NaN score in every row of (1, 0)
    n_crit, n_skip = max(1, Mk // 8), Mk // 4
    maps = []
    for fn, keys in (
        (cl._rank_rows, np.ascontiguousarray(np.swapaxes(pk, 2, 3))),
        (cl._rank_rows_reference, pk),
    ):
        m = np.full((2, 1, Mq, Mk), 99, np.int8)
        fn(pq, keys, n_crit, n_skip, 0.3, m)
        maps.append(m)
    np.testing.assert_array_equal(maps[0], maps[1])
