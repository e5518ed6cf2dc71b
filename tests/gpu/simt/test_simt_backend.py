"""The SIMT GPU backend (sla_numba.gpu) against the float64 reference and the CPU twin.

Runs on a real GPU or, without one, under the CUDA simulator (tests/conftest.py),
where the backend picks 2 x 2-thread tiles; shapes stay tiny (D <= 8, a few blocks).
Cases cover tails (N not a multiple of the block), N < block, N = 1, Nq != Nk,
odd D, rows with no critical / no marginal block, topk = 1, every feature map,
fp16 and fp64 inputs, and a numba device-array input. Output poisoning is on for
the whole session (tests/conftest.py): an unwritten element is NaN and fails.
"""

import importlib
import math

import numpy as np
import pytest
import torch
from helpers import backend_err as _err  # noqa: E402
from helpers import reference_grads as _reference_grads

from sla_numba import _params
from sla_numba.reference import classify_reference, expand_block_map, sla_reference
from sla_numba.testing import poisoned

gpu = pytest.importorskip("sla_numba.gpu")
gpu_classify = importlib.import_module("sla_numba.gpu.classify")
gpu_forward = importlib.import_module("sla_numba.gpu.forward")
gpu_tiles = importlib.import_module("sla_numba.gpu.simt.tiles")
gpu_compat = importlib.import_module("sla_numba.gpu._compat")

try:
    cpu = importlib.import_module("sla_numba.cpu")
except Exception:  # noqa: BLE001 - the CPU twin is optional for these tests
    cpu = None

pytestmark = pytest.mark.gpu
FMS = ("softmax", "elu", "relu")


# --------------------------------------------------------------------------- helpers
def _rng_inputs(seed, B, H, Nq, Nk, D, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, H, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, H, Nk, D)).astype(dtype)
    return q, k, v


def _random_map(seed, B, H, mq, mk, special=True):
    """Random 1/0/-1 map; with ``special``, row 0 of head 0 has no critical block,
    row 1 no marginal block (all critical), row 2 nothing but negligible blocks."""
    rng = np.random.default_rng(seed + 1000)
    m = rng.integers(-1, 2, size=(B, H, mq, mk)).astype(np.int8)
    if special:
        m[0, 0, 0, :] = 0
        if mq > 1:
            m[0, 0, 1, :] = 1
        if mq > 2:
            m[0, 0, 2, :] = -1
    return m


def _lse_reference(q, k, bm, bq, bk, scale):
    """log Σ_critical exp(scale q·k) per row (LSE_EMPTY for rows with none), float64."""
    q64, k64 = (torch.from_numpy(x.astype(np.float64)) for x in (q, k))
    s = scale * (q64 @ k64.transpose(-1, -2))
    crit = torch.from_numpy(expand_block_map(bm, q.shape[2], k.shape[2], bq, bk) == 1)
    lse = torch.logsumexp(s.masked_fill(~crit, -math.inf), dim=-1)
    return torch.where(crit.any(-1), lse, torch.full_like(lse, _params.LSE_EMPTY)).numpy()


# --------------------------------------------------------------------------- environment
def test_row_stack_alias_is_restored(monkeypatch):
    """numpy 2.5 dropped np.row_stack; numba-cuda 0.30.4 still needs it to compile."""
    monkeypatch.delattr(np, "row_stack", raising=False)
    assert not hasattr(np, "row_stack")
    gpu_compat.ensure_numpy_aliases()
    assert np.row_stack is np.vstack
    with open(gpu_compat.__file__) as f:  # the alias line itself, as ruff must leave it
        assert "np.row_stack = np.vstack" in f.read()
    a = np.ones((2, 3))
    assert np.vstack([a, a]).shape == (4, 3)


def test_row_stack_alias_present_after_import():
    assert hasattr(np, "row_stack")


def test_numba_cuda_target_is_nvidia():
    from numba import cuda

    assert cuda.implementation == "NVIDIA"


def test_tile_configs_fit_static_shared_memory():
    for d in (1, 5, 16, 64, 80, 96, 128, 256):
        for acc in (np.float32, np.float64):
            t = gpu_tiles.choose_tiles(d, acc, 64, 64, simulated=False)
            assert t.DP >= d and t.DP % t.TC == 0 and t.DP % t.DC == 0
            assert gpu_tiles.smem_bytes(t) <= gpu_tiles.SMEM_LIMIT - gpu_tiles.SMEM_MARGIN


# --------------------------------------------------------------------------- classification
CLASSIFY_CASES = [
    # B, H, Nq, Nk, D, bq, bk, topk, skip
    (1, 2, 13, 11, 5, 4, 3, 0.25, 0.25),  # tails, Nq != Nk, odd D
    (2, 1, 16, 16, 4, 4, 4, 0.5, 0.0),
    (1, 1, 1, 7, 3, 4, 2, 0.3, 0.3),  # Nq = 1
    (1, 1, 9, 40, 4, 3, 4, 1.0, 0.0),  # topk = 1: all critical
    (1, 2, 20, 33, 6, 5, 3, 0.1, 0.5),
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,bq,bk,topk,skip", CLASSIFY_CASES)
def test_classify_matches_reference_and_cpu(B, H, Nq, Nk, D, bq, bk, topk, skip):
    q, k, _ = _rng_inputs(7, B, H, Nq, Nk, D)
    mk = _params.n_blocks(Nk, bk)
    n_crit, n_skip = _params.block_counts(mk, topk, skip)
    scale = 1.0 / math.sqrt(D)
    got = gpu.classify(q, k, n_crit, n_skip, bq, bk, scale)
    assert got.dtype == np.int8
    ref = classify_reference(q, k, topk=topk, skip=skip, block_q=bq, block_k=bk, scale=scale)
    np.testing.assert_array_equal(got, ref)
    if cpu is not None:
        np.testing.assert_array_equal(got, cpu.classify(q, k, n_crit, n_skip, bq, bk, scale))


def test_classify_ties_and_nan_rank_by_index():
    """Equal scores rank by ascending key block; a NaN score ranks as -inf."""
    q = np.ones((1, 1, 8, 4), np.float32)
    k = np.ones((1, 1, 12, 4), np.float32)
    k[0, 0, 6:9] = np.nan  # key block 2 (rows 6..8) scores NaN
    got = gpu.classify(q, k, 1, 1, 4, 3, 0.5)
    # scores: blocks 0, 1, 3 tie; block 2 is NaN (-inf): ranks 0, 1, 3, 2
    np.testing.assert_array_equal(got[0, 0], [[1, 0, -1, 0], [1, 0, -1, 0]])
    if cpu is not None:
        np.testing.assert_array_equal(got, cpu.classify(q, k, 1, 1, 4, 3, 0.5))


@pytest.mark.parametrize(
    "sort_max", [0, 8, 16], ids=["count-ranks", "count-just-above", "sort-at-limit"]
)
def test_both_ranking_methods_give_the_cpu_map(monkeypatch, sort_max):
    """The reference kernels (``classify_by_sorting``): rows of up to SORT_MAX key
    blocks are ranked by a bitonic sort, longer ones by counting; both give the CPU's
    map, ties (repeated key blocks) and NaN included. The fast kernel too."""
    import importlib

    gpu_classify_module = importlib.import_module("sla_numba.gpu.classify")
    monkeypatch.setattr(gpu_classify_module, "SORT_MAX", sort_max)
    q, k, _ = _rng_inputs(11, 1, 2, 12, 37, 4)
    k[0, 0, 8:12] = k[0, 0, 0:4]  # key blocks 0 and 2 tie (4-row blocks)
    k[0, 0, 20:24] = k[0, 0, 0:4]  # ... and block 5
    k[0, 1, 12:16] = np.nan  # a NaN score in head 1
    mk = _params.n_blocks(37, 4)  # 10 blocks: sorted as 16 (6 pads) if allowed
    for n_crit, n_skip in ((3, 2), (1, 0), (1, mk - 1), (mk, 0)):
        got = gpu_classify_module.classify_by_sorting(q, k, n_crit, n_skip, 4, 4, 0.5)
        np.testing.assert_array_equal(got, gpu.classify(q, k, n_crit, n_skip, 4, 4, 0.5))
        if cpu is not None:
            np.testing.assert_array_equal(got, cpu.classify(q, k, n_crit, n_skip, 4, 4, 0.5))
        ref = classify_reference(
            q, k, topk=n_crit / mk, skip=n_skip / mk, block_q=4, block_k=4, scale=0.5
        )
        np.testing.assert_array_equal(got, ref)


def test_classify_fp16_input():
    q, k, _ = _rng_inputs(3, 1, 1, 12, 10, 4, np.float16)
    got = gpu.classify(q, k, 1, 1, 4, 4, 0.5)
    ref = classify_reference(
        q.astype(np.float32),
        k.astype(np.float32),
        topk=1 / 3 + 1e-9,
        skip=1 / 3 + 1e-9,
        block_q=4,
        block_k=4,
        scale=0.5,
    )
    np.testing.assert_array_equal(got, ref)


# --------------------------------------------------------------------------- forward
FWD_CASES = [
    # B, H, Nq, Nk, D, bq, bk
    (1, 2, 11, 9, 5, 4, 3),  # tails everywhere, Nq != Nk, odd D
    (1, 1, 1, 6, 3, 4, 4),  # Nq = 1 (< block)
    (2, 1, 8, 1, 4, 4, 4),  # Nk = 1
    (1, 1, 10, 14, 8, 8, 5),  # a query block spans two 4-row sub-tiles; key tails
]


@pytest.mark.parametrize("fm", FMS)
@pytest.mark.parametrize("B,H,Nq,Nk,D,bq,bk", FWD_CASES)
def test_forward_matches_reference(B, H, Nq, Nk, D, bq, bk, fm):
    q, k, v = _rng_inputs(11, B, H, Nq, Nk, D)
    mq, mk = _params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk)
    bm = _random_map(5, B, H, mq, mk)
    scale = 0.7 / math.sqrt(D)
    o_s, o_l, lse = gpu.forward(q, k, v, bm, bq, bk, scale, _params.FEATURE_MAPS[fm], 1e-6)
    assert o_s.dtype == o_l.dtype == lse.dtype == np.float32
    _, r_s, r_l = sla_reference(q, k, v, bm, block_q=bq, block_k=bk, feature_map=fm, scale=scale)
    assert _err(o_s, r_s) < 1e-5
    assert _err(o_l, r_l) < 1e-5
    r_lse = _lse_reference(q, k, bm, bq, bk, scale)
    np.testing.assert_allclose(lse, r_lse, rtol=1e-5, atol=1e-5)
    if cpu is not None and fm == "softmax":
        c_s, c_l, c_lse = cpu.forward(q, k, v, bm, bq, bk, scale, _params.FEATURE_MAPS[fm], 1e-6)
        assert _err(o_s, c_s) < 1e-5 and _err(o_l, c_l) < 1e-5
        np.testing.assert_allclose(lse, c_lse, rtol=1e-5, atol=1e-5)


def test_forward_topk1_is_dense_softmax_attention():
    q, k, v = _rng_inputs(2, 1, 2, 9, 7, 4)
    bm = np.ones((1, 2, 3, 2), np.int8)
    o_s, o_l, _ = gpu.forward(q, k, v, bm, 4, 4, 0.5, 0, 1e-6)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x.astype(np.float64)) for x in (q, k, v)), scale=0.5
    )
    assert _err(o_s, ref.numpy()) < 1e-5
    np.testing.assert_array_equal(o_l, 0.0)


def test_forward_float64_and_float16_inputs():
    q, k, v = _rng_inputs(4, 1, 1, 10, 9, 5, np.float64)
    bm = _random_map(4, 1, 1, 3, 3)
    o_s, o_l, lse = gpu.forward(q, k, v, bm, 4, 4, 0.5, 1, 1e-6)
    assert o_s.dtype == np.float64 and lse.dtype == np.float64
    _, r_s, r_l = sla_reference(q, k, v, bm, block_q=4, block_k=4, feature_map="elu", scale=0.5)
    assert _err(o_s, r_s) < 1e-12 and _err(o_l, r_l) < 1e-12
    h = [x.astype(np.float16) for x in (q, k, v)]
    o_s, o_l, _ = gpu.forward(*h, bm, 4, 4, 0.5, 1, 1e-6)
    assert o_s.dtype == np.float32
    _, r_s, r_l = sla_reference(*h, bm, block_q=4, block_k=4, feature_map="elu", scale=0.5)
    assert _err(o_s, r_s) < 1e-5 and _err(o_l, r_l) < 1e-5


def test_forward_other_tiles_and_device_arrays():
    """No head-dim chunking (DC = DP), one-row inner chunks, 8 threads; inputs as
    numba device arrays come back as device arrays."""
    from numba import cuda

    q, k, v = _rng_inputs(9, 1, 1, 7, 10, 6)
    bm = _random_map(9, 1, 1, 2, 3)
    t = gpu_tiles.Tiles(TR=2, TC=4, BQ=2, BK=4, DP=8, DC=8, KC=1)
    outs = gpu.forward(
        *(cuda.to_device(x) for x in (q, k, v)), cuda.to_device(bm), 4, 4, 0.4, 0, 1e-6, tiles=t
    )
    assert all(hasattr(o, "copy_to_host") for o in outs)
    o_s, o_l, _ = (o.copy_to_host() for o in outs)
    _, r_s, r_l = sla_reference(q, k, v, bm, block_q=4, block_k=4, scale=0.4)
    assert _err(o_s, r_s) < 1e-5 and _err(o_l, r_l) < 1e-5


# --------------------------------------------------------------------------- backward
BWD_CASES = [
    # B, H, Nq, Nk, D, bq, bk, fm
    (1, 2, 11, 9, 5, 4, 3, "softmax"),
    (1, 1, 9, 13, 3, 4, 4, "elu"),
    (1, 1, 6, 6, 4, 2, 3, "relu"),
    (1, 1, 1, 5, 4, 4, 2, "softmax"),  # Nq = 1
]


@pytest.mark.parametrize("B,H,Nq,Nk,D,bq,bk,fm", BWD_CASES)
def test_backward_matches_reference(B, H, Nq, Nk, D, bq, bk, fm):
    q, k, v = _rng_inputs(21, B, H, Nq, Nk, D)
    mq, mk = _params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk)
    bm = _random_map(21, B, H, mq, mk)
    rng = np.random.default_rng(3)
    do_s = rng.standard_normal(q.shape).astype(np.float32)
    do_l = rng.standard_normal(q.shape).astype(np.float32)
    scale = 0.8 / math.sqrt(D)
    code = _params.FEATURE_MAPS[fm]
    o_s, o_l, lse = gpu.forward(q, k, v, bm, bq, bk, scale, code, 1e-6)
    dq, dk, dv = gpu.backward(q, k, v, o_s, o_l, lse, do_s, do_l, bm, bq, bk, scale, code, 1e-6)
    assert dq.dtype == dk.dtype == dv.dtype == np.float32
    rq, rk, rv = _reference_grads(q, k, v, bm, bq, bk, scale, fm, do_s, do_l)
    assert _err(dq, rq) < 1e-5
    assert _err(dk, rk) < 1e-5
    assert _err(dv, rv) < 1e-5
    if cpu is not None and fm == "softmax":
        cq, ck, cv = cpu.backward(q, k, v, o_s, o_l, lse, do_s, do_l, bm, bq, bk, scale, code, 1e-6)
        assert _err(dq, cq) < 1e-5 and _err(dk, ck) < 1e-5 and _err(dv, cv) < 1e-5


@pytest.mark.parametrize("B,H,Nq,Nk,D,bq,bk,fm", BWD_CASES[:2])
def test_global_linear_scope_forward_backward(B, H, Nq, Nk, D, bq, bk, fm):
    """linear_scope=1 ("global"): O_l and its gradients over every key block, against
    the reference; the sparse branch is that of the map (rows with no critical or no
    marginal block included)."""
    q, k, v = _rng_inputs(31, B, H, Nq, Nk, D)
    bm = _random_map(31, B, H, _params.n_blocks(Nq, bq), _params.n_blocks(Nk, bk))
    rng = np.random.default_rng(4)
    do_s, do_l = (rng.standard_normal(q.shape).astype(np.float32) for _ in range(2))
    scale, code = 0.8 / math.sqrt(D), _params.FEATURE_MAPS[fm]
    o_s, o_l, lse = gpu.forward(q, k, v, bm, bq, bk, scale, code, 1e-6, 1)
    _, r_s, r_l = sla_reference(
        q, k, v, bm, block_q=bq, block_k=bk, feature_map=fm, scale=scale, linear_scope="global"
    )
    assert _err(o_s, r_s) < 1e-5 and _err(o_l, r_l) < 1e-5
    grads = gpu.backward(q, k, v, o_s, o_l, lse, do_s, do_l, bm, bq, bk, scale, code, 1e-6, 1)
    ref = _reference_grads(q, k, v, bm, bq, bk, scale, fm, do_s, do_l, "global")
    for g, r in zip(grads, ref):
        assert _err(g, r) < 1e-5


def test_backward_is_deterministic_and_float64():
    q, k, v = _rng_inputs(5, 1, 1, 8, 8, 4, np.float64)
    bm = np.array([[[[1, 0], [0, -1]]]], np.int8)
    do = np.random.default_rng(0).standard_normal(q.shape)
    fwd = gpu.forward(q, k, v, bm, 4, 4, 0.5, 0, 1e-6)
    g1 = gpu.backward(q, k, v, *fwd, do, do, bm, 4, 4, 0.5, 0, 1e-6)
    g2 = gpu.backward(q, k, v, *fwd, do, do, bm, 4, 4, 0.5, 0, 1e-6)
    for a, b in zip(g1, g2):
        assert a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
    ref = _reference_grads(q, k, v, bm, 4, 4, 0.5, "softmax", do, do)
    for a, r in zip(g1, ref):
        assert _err(a, r) < 1e-12


def test_outputs_poisoned_allocation():
    """With poisoning on, every output element is still written (no NaN)."""
    q, k, v = _rng_inputs(8, 1, 1, 5, 5, 3)
    bm = np.array([[[[1, -1], [0, 0]]]], np.int8)  # row 1: no critical block
    with poisoned():
        outs = gpu.forward(q, k, v, bm, 4, 4, 0.5, 2, 1e-6)
        grads = gpu.backward(q, k, v, *outs, q, q, bm, 4, 4, 0.5, 2, 1e-6)
        m = gpu.classify(q, k, 1, 0, 4, 4, 0.5)
    for x in (*outs, *grads):
        assert not np.isnan(x).any()
    assert set(np.unique(m)) <= {-1, 0, 1}


# --------------------------------------------------------------------------- real GPU only
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch CUDA tensors need a real GPU"
)


@needs_cuda
@pytest.mark.parametrize(
    "dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)]
)
def test_torch_cuda_tensors_forward_backward(dtype, tol):
    """torch CUDA in -> torch CUDA out on the same device, on torch's current stream
    (a side stream here); bf16 goes through the int16-bits path."""
    B, H, N, D, blk = 1, 2, 200, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    mq = _params.n_blocks(N, blk)
    bm = torch.from_numpy(_random_map(1, B, H, mq, mq))
    dev = [x.to("cuda", dtype) for x in (q, k, v, do)] + [bm.cuda()]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        o_s, o_l, lse = gpu.forward(*dev[:3], dev[4], blk, blk, 0.125, 0, 1e-6)
        dq, dk, dv = gpu.backward(
            *dev[:3], o_s, o_l, lse, dev[3], dev[3], dev[4], blk, blk, 0.125, 0, 1e-6
        )
        m = gpu.classify(*dev[:2], 1, 1, blk, blk, 0.125)
    side.synchronize()
    assert isinstance(o_s, torch.Tensor) and o_s.is_cuda and o_s.dtype == torch.float32
    assert m.dtype == torch.int8
    qd, kd, vd, dod = (x.to(dtype).double() for x in (q, k, v, do))
    _, r_s, r_l = sla_reference(qd, kd, vd, bm, block_q=blk, block_k=blk, scale=0.125)
    assert _err(o_s.cpu().numpy(), r_s.numpy()) < tol
    assert _err(o_l.cpu().numpy(), r_l.numpy()) < tol
    rq, rk, rv = _reference_grads(
        qd.numpy(),
        kd.numpy(),
        vd.numpy(),
        bm.numpy(),
        blk,
        blk,
        0.125,
        "softmax",
        dod.numpy(),
        dod.numpy(),
    )
    for a, r in ((dq, rq), (dk, rk), (dv, rv)):
        assert _err(a.cpu().numpy(), r) < tol
    ref_map = classify_reference(
        qd.float(),
        kd.float(),
        topk=1 / mq + 1e-9,
        skip=1 / mq + 1e-9,
        block_q=blk,
        block_k=blk,
        scale=0.125,
    )
    if dtype == torch.float32:
        assert torch.equal(m.cpu(), ref_map)


@needs_cuda
def test_cupy_arrays_if_installed():
    cp = pytest.importorskip("cupy")
    q, k, v = _rng_inputs(3, 1, 1, 70, 70, 32)
    bm = _random_map(3, 1, 1, 2, 2)
    o_s, o_l, lse = gpu.forward(
        *(cp.asarray(x) for x in (q, k, v)), cp.asarray(bm), 64, 64, 0.2, 0, 1e-6
    )
    assert isinstance(o_s, cp.ndarray)
    _, r_s, r_l = sla_reference(q, k, v, bm, block_q=64, block_k=64, scale=0.2)
    assert _err(cp.asnumpy(o_s), r_s) < 1e-4 and _err(cp.asnumpy(o_l), r_l) < 1e-4


@needs_cuda
def test_larger_shapes_against_cpu_twin():
    """Real tiles (256 threads, 32 x 64 tiles, D chunks of 32) on a few hundred tokens."""
    if cpu is None:
        pytest.skip("CPU backend not importable")
    q, k, v = _rng_inputs(13, 1, 2, 300, 260, 128)
    mk = _params.n_blocks(260, 64)
    n_crit, n_skip = _params.block_counts(mk, 0.4, 0.2)
    m = gpu.classify(q, k, n_crit, n_skip, 64, 64, 128**-0.5)
    np.testing.assert_array_equal(m, cpu.classify(q, k, n_crit, n_skip, 64, 64, 128**-0.5))
    m[0, 0, 0] = 0  # a row without critical blocks
    fwd = gpu.forward(q, k, v, m, 64, 64, 128**-0.5, 0, 1e-6)
    cfw = cpu.forward(q, k, v, m, 64, 64, 128**-0.5, 0, 1e-6)
    for a, c in zip(fwd, cfw):
        assert _err(a, c) < 1e-5
    do = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
    g = gpu.backward(q, k, v, *fwd, do, do, m, 64, 64, 128**-0.5, 0, 1e-6)
    c = cpu.backward(q, k, v, *cfw, do, do, m, 64, 64, 128**-0.5, 0, 1e-6)
    for a, b in zip(g, c):
        assert _err(a, b) < 1e-4
