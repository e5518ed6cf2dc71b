"""The GPU classification's two implementations against the CPU map, bit for bit.

``classify`` (batched pooling + the score/select kernel: a block of query-block rows,
a lane group per row searching the two thresholds over integer images of the
scores), ``classify_by_sorting`` (the reference: one block per row, bitonic sort
or rank counting) and ``classify_fused`` (``SLA_NUMBA_CLASSIFY=fused``: warp pooling,
the scores' keys in shared memory). Under the simulator the fast kernel runs with 8 threads in 2
lane groups of 4, 3 rows per block and 2-4 key blocks per thread, so small shapes
already cover: rows that do not fill a block, several passes over the key blocks,
lanes with padding slots, both groups ranking, ties cut by either threshold,
+0 / -0 scores, NaN scores, and n_crit / n_skip at 0 and Mk. Outputs and
workspaces are poisoned (tests/conftest.py): an unwritten map element is 99.
"""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import needs_cuda_compiler
from numba import cuda

from sla_numba import _params
from sla_numba.gpu.simt.lanes import lane_scan, lane_sum
from sla_numba.reference import block_scores
from sla_numba.testing import poisoned

gpu_classify = importlib.import_module("sla_numba.gpu.classify")
simt_classify = importlib.import_module("sla_numba.gpu.simt.classify")
cpu = importlib.import_module("sla_numba.cpu")

pytestmark = pytest.mark.gpu

# the fast pair, the reference pair, and the opt-in pair of SLA_NUMBA_CLASSIFY=fused
# (tests/gpu/simt/test_classify_fused.py has its own bf16 and tiling cases)
BOTH = [gpu_classify.classify, gpu_classify.classify_by_sorting, gpu_classify.classify_fused]
IDS = ["select", "sorting", "fused"]


def _inputs(seed, B, H, Nq, Nk, D, quantize=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(np.float32)
    k = rng.standard_normal((B, H, Nk, D)).astype(np.float32)
    if quantize:  # few distinct values: many exactly equal scores
        q, k = np.round(q), np.round(k)
    return q, k


def _check(fn, q, k, n_crit, n_skip, bq, bk, scale):
    with poisoned():
        got = fn(q, k, n_crit, n_skip, bq, bk, scale)
    want = cpu.classify(q, k, n_crit, n_skip, bq, bk, scale)
    assert got.dtype == np.int8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    return got


@pytest.mark.skipif(
    not simt_classify.SIMULATOR,
    reason="about the simulator's kernel configuration (4-lane groups, 8 threads)",
)
def test_fast_config_covers_the_shapes_used_here():
    """Under the simulator the fast kernel takes these shapes with two score passes and
    padded lanes (so the tests below test those, not the fallback)."""
    assert gpu_classify.fast_config(10, 5) is not None
    assert gpu_classify.fast_config(38, 3) is not None
    rq, cpt, epl, nt = gpu_classify.fast_config(38, 3)
    assert cpt * nt < 38, "38 key blocks need two passes of the score tile"
    assert epl * simt_classify.FAST_LANES > 38, "lanes have padding slots"


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
@pytest.mark.parametrize(
    "B,H,Nq,Nk,D,bq,bk",
    [
        (1, 2, 13, 11, 5, 4, 3),  # tails, odd D, Mq = 4 (a block of 3 rows + 1)
        (2, 1, 7, 150, 3, 2, 4),  # Mk = 38: two score passes, padded lanes
        (1, 1, 1, 9, 2, 4, 1),  # one query block; block_k = 1
    ],
)
def test_maps_equal_the_cpu_map(fn, B, H, Nq, Nk, D, bq, bk):
    mk = _params.n_blocks(Nk, bk)
    q, k = _inputs(B * 100 + Nk, B, H, Nq, Nk, D)
    for n_crit, n_skip in (
        _params.block_counts(mk, 0.3, 0.2),
        (0, 0),
        (mk, 0),
        (0, mk),
        (2, mk - 2),
    ):
        _check(fn, q, k, n_crit, n_skip, bq, bk, D**-0.5)


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_ties_are_broken_by_key_block_index(fn):
    """Quantized inputs: rows with groups of equal scores, cut by the critical and the
    negligible threshold at every count."""
    q, k = _inputs(5, 1, 2, 12, 52, 2, quantize=True)
    mk = _params.n_blocks(52, 4)  # 13
    s = block_scores(q, k, 4, 4, 1.0)
    assert any(len(np.unique(r)) < mk - 2 for r in s.reshape(-1, mk)), "rows with ties"
    for n_crit in range(0, mk + 1, 3):
        for n_skip in (0, 1, mk - n_crit):
            _check(fn, q, k, n_crit, n_skip, 4, 4, 1.0)


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_all_scores_tied(fn):
    q = np.ones((1, 1, 8, 3), np.float32)
    k = np.ones((1, 1, 22, 3), np.float32)  # 6 blocks of 4 (the last one of 2): all tie
    got = _check(fn, q, k, 2, 3, 4, 4, 0.5)
    np.testing.assert_array_equal(got[0, 0], np.tile([1, 1, 0, -1, -1, -1], (2, 1)))


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_signed_zeros_tie(fn):
    """A denormal scale rounds the small scores to +0 or -0 (and the rest to a few
    denormals): -0 == +0, so they rank by index, as on the CPU."""
    q, k = _inputs(9, 1, 1, 8, 40, 4)
    scale = 5e-324
    s = block_scores(q, k, 4, 4, scale)
    assert (np.signbit(s) & (s == 0)).any() and (~np.signbit(s) & (s == 0)).any()
    for n_crit, n_skip in ((3, 3), (1, 8), (5, 0)):
        _check(fn, q, k, n_crit, n_skip, 4, 4, scale)


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_nan_scores_rank_as_minus_inf(fn):
    q, k = _inputs(3, 1, 2, 12, 30, 4)
    k[0, 0, 5, 1] = np.nan  # key block 1: NaN in every row of head 0
    k[0, 0, 20, 0] = np.nan  # and key block 5: two NaN scores tie at -inf
    q[0, 1, 4:8] = np.nan  # head 1, query block 1: every score NaN
    k[0, 1, 28, 2] = -np.inf  # head 1: -inf scores among finite ones
    for n_crit, n_skip in ((2, 2), (1, 7), (8, 0), (0, 1)):
        _check(fn, q, k, n_crit, n_skip, 4, 4, 0.5)


def test_float64_input_is_not_rounded_to_float32():
    """Key block 1 is key block 0 times (1 + 2^-40): equal in fp32, larger in float64.
    Pooled from float64 values it is the one critical block; rounded, 0 would be."""
    rng = np.random.default_rng(8)
    q = np.abs(rng.standard_normal((1, 1, 4, 3))) + 1.0
    v = np.abs(rng.standard_normal((1, 1, 8, 3))) + 1.0  # blocks of 8: batched loads
    k = np.concatenate([v, v * (1 + 2.0**-40), v / 4], axis=2)
    with poisoned():
        got = gpu_classify.classify(q, k, 1, 1, 4, 8, 0.5)
    np.testing.assert_array_equal(got[0, 0], [[0, 1, -1]])
    np.testing.assert_array_equal(got, cpu.classify(q, k, 1, 1, 4, 8, 0.5))


def test_long_rows_take_the_reference_kernel(monkeypatch):
    """Rows longer than the fast kernel's registers hold go to the sorting kernels."""
    monkeypatch.setattr(gpu_classify, "SELECT_MAX_EPL", 4)
    L = simt_classify.FAST_LANES  # 4 under the simulator, 32 on a GPU
    assert gpu_classify.fast_config(4 * L + 1, 4) is None  # > L lanes x 4 slots
    assert gpu_classify.fast_config(4 * L, 4) is not None
    q, k = _inputs(4, 1, 1, 8, 2 * (4 * L + 1), 4)  # Mk = 4L + 1 with block_k 2
    _check(gpu_classify.classify, q, k, 3, 5, 4, 2, 0.5)


@pytest.mark.parametrize(
    "tiles", [(1, 1, None), (2, 3, None), (4, 2, simt_classify.FAST_LANES)], ids=str
)
def test_other_tilings_give_the_same_map(tiles):
    """RQ rows per block, CPT key blocks per thread and pass, NT threads (the last: one
    lane group)."""
    q, k = _inputs(6, 1, 1, 10, 45, 3, quantize=True)
    mk = _params.n_blocks(45, 4)
    with poisoned():
        got = gpu_classify._classify(q, k, 4, 3, 3, 4, 0.7, fast=True, tiles=tiles)
    np.testing.assert_array_equal(got, cpu.classify(q, k, 4, 3, 3, 4, 0.7))
    assert gpu_classify.fast_config(mk, 3, *tiles) is not None


def test_lane_sum_and_scan():
    L = simt_classify.FAST_LANES

    @cuda.jit
    def kern(x, s, lower, total):
        t = cuda.threadIdx.x
        s[t] = lane_sum(x[t], L)
        lo, tot = lane_scan(x[t], L)
        lower[t] = lo
        total[t] = tot

    x = (np.arange(2 * L) * 7 % 5).astype(np.int32)  # two groups
    outs = [np.full(x.size, -1, np.int64) for _ in range(3)]
    kern[1, x.size](x, *outs)
    g = x.reshape(-1, L)
    np.testing.assert_array_equal(outs[0], np.repeat(g.sum(1), L))
    np.testing.assert_array_equal(outs[1], (np.cumsum(g, 1) - g).ravel())
    np.testing.assert_array_equal(outs[2], np.repeat(g.sum(1), L))


@needs_cuda_compiler
def test_kernels_compile_to_ptx_without_fma_or_local_memory():
    """The real compiler (the simulator never type-checks): the classification kernels
    build for sm_90 with no fma.rn.f64 (bit-exact rule) and no local-memory arrays."""
    root = os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    )
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "check_ptx.py"), "--classify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ALL OK" in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("classify.")]
    assert len(lines) == 17, out[-3000:]
    for ln in lines:
        assert "local    0 B" in ln and "calls  0" in ln, ln
    for ln in lines:
        if " E64" not in ln:  # the longest-row variant spills a little (registers)
            assert ln.rstrip().endswith("ok"), ln
