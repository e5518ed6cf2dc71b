"""The lane-split row reductions of ``_tiles.make_common`` (row_stats, lanes_sum)
for block sizes the backend's own tiles do not reach under the simulator: lanes
that do not divide the block (threads without a row slot), one lane a row, and
more rows than threads (several passes)."""

import importlib

import numpy as np
import pytest

gpu_tiles = importlib.import_module("sla_numba.gpu.simt.tiles")
compat = importlib.import_module("sla_numba.gpu._compat")
cuda = compat.cuda

pytestmark = pytest.mark.gpu

# (threads NT, rows R, valid rows nrows, D): L = NT // R lanes a row
CASES = [
    (8, 3, 3, 5),  # L = 2, G = 4: one empty slot
    (10, 3, 2, 7),  # L = 3, G = 3: thread 9 has no slot; a row past nrows
    (4, 4, 4, 6),  # L = 1 (the simulator tiles)
    (4, 2, 1, 3),  # L = 2
    (6, 13, 11, 4),  # R > NT: three passes, L = 1
    (16, 4, 4, 2),  # L = 4 > D: lanes with no column
]


def _kernel(NT, R, fm):
    ops = gpu_tiles.make_common(NT, "float32")
    lanes_max, lanes_sum = ops.row_reducers()
    row_stats = ops.row_stats
    L = max(1, NT // R)
    f32 = np.float32

    SROW = 4 * R  # shared-memory sizes must be compile-time constants

    @cuda.jit
    def k(x, nrows, srow_out, sums):
        srow = cuda.shared.array(SROW, f32)
        scratch = cuda.shared.array(NT, f32)
        t = cuda.threadIdx.x
        row_stats(srow, x, 0, nrows, x.shape[1], R, t, fm, scratch)
        for e in range(t, 3 * R, NT):
            srow_out[e] = srow[4 * (e // 3) + e % 3]
        # lanes_sum: every lane of a complete slot gets the slot's sum of t
        s = lanes_sum(scratch, f32(t), t, L)
        m = lanes_max(scratch, f32(t), t, L)
        sums[t, 0] = s
        sums[t, 1] = m

    return k


@pytest.mark.parametrize("NT,R,nrows,D", CASES)
@pytest.mark.parametrize("fm", [0, 2])
def test_row_stats_lanes(NT, R, nrows, D, fm):
    rng = np.random.default_rng(NT * 100 + R)
    x = (3 * rng.standard_normal((R, D))).astype(np.float32)
    srow = np.full(3 * R, np.nan, np.float32)
    sums = np.full((NT, 2), np.nan, np.float32)
    _kernel(NT, R, fm)[1, NT](x, nrows, srow, sums)
    srow = srow.reshape(R, 3)
    for r in range(R):
        if fm == 0 and r < nrows:
            mx = x[r].astype(np.float64).max()
            inv = 1.0 / np.exp(x[r].astype(np.float64) - mx).sum()
        else:
            mx, inv = 0.0, 1.0
        np.testing.assert_allclose(srow[r], [mx, inv, 1.0 if r < nrows else 0.0], rtol=1e-5, atol=0)
    L = max(1, NT // R)
    for t in range(NT):
        base = t - t % L
        if base + L <= NT:
            want = (sum(range(base, base + L)), base + L - 1)
        else:
            want = (t, t)
        assert tuple(sums[t]) == want, (t, sums[t], want)
