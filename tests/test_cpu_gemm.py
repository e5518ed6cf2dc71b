"""The CPU kernels' small matrix products (``_common.gemm_acc``, ``gemm_tn_acc``) vs NumPy.

Shapes straddle the register tile (``_simd.TILE_M`` rows × ``tile_cols`` columns),
so the micro-kernel, the right edge, the bottom edge and the corner are all checked;
C starts non-zero (the product accumulates) and is a view into a larger buffer
whose untouched part must stay as it was.
"""

import numpy as np
import pytest

from sla_numba.cpu._common import gemm_acc, gemm_tn_acc


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "m, n, kk", [(64, 64, 64), (1, 1, 1), (13, 45, 7), (64, 60, 33), (3, 70, 64), (40, 5, 0)]
)
def test_gemm_acc_matches_numpy(dtype, m, n, kk):
    rng = np.random.default_rng(m * 10007 + n * 101 + kk)
    a = rng.standard_normal((m + 2, kk + 3)).astype(dtype)
    b = rng.standard_normal((kk + 1, n + 5)).astype(dtype)
    big = rng.standard_normal((m + 4, n + 6)).astype(dtype)
    before = big.copy()
    c = big[: m + 1]  # C-contiguous view with extra rows and columns
    gemm_acc(a, b, c, m, n, kk)
    want = before[:m, :n].astype(np.float64) + a[:m, :kk].astype(np.float64) @ b[:kk, :n]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(big[:m, :n], want, rtol=tol, atol=tol * (1 + np.sqrt(kk)))
    mask = np.ones(big.shape, bool)
    mask[:m, :n] = False
    np.testing.assert_array_equal(big[mask], before[mask])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m, n, kk", [(64, 64, 64), (13, 45, 7), (3, 70, 64), (40, 5, 0)])
def test_gemm_tn_acc_matches_numpy(dtype, m, n, kk):
    """``gemm_tn_acc``: A stored transposed, (kk, m) inside a larger buffer."""
    rng = np.random.default_rng(m * 7919 + n * 31 + kk)
    at = rng.standard_normal((kk + 1, m + 2)).astype(dtype)
    b = rng.standard_normal((kk + 2, n + 3)).astype(dtype)
    big = rng.standard_normal((m + 3, n + 4)).astype(dtype)
    before = big.copy()
    gemm_tn_acc(at, b, big, m, n, kk)
    want = before[:m, :n].astype(np.float64) + at[:kk, :m].T.astype(np.float64) @ b[:kk, :n]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(big[:m, :n], want, rtol=tol, atol=tol * (1 + np.sqrt(kk)))
    mask = np.ones(big.shape, bool)
    mask[:m, :n] = False
    np.testing.assert_array_equal(big[mask], before[mask])
