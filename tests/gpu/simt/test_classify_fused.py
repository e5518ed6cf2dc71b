"""``SLA_NUMBA_CLASSIFY=fused`` (``sla_numba/gpu/simt/classify_fused.py``) against the
CPU map, bit for bit: what its kernels do that the default pair does not.

The shared cases (tails, ties, ±0, NaN, n_crit / n_skip at 0 and Mk) run for it in
test_classify_select.py. Here: bf16 input read as packed words (uint64 of 4 values,
uint32 of 2, uint16 for odd D) — the simulator has no bf16 arrays, so the inputs are
int16 bit patterns passed with ``bf16_bits=True`` (torch bf16 is detected) —; other
tilings of both kernels; rows too long for the shared-memory keys (the global-scratch
kernel then); and the switch itself. Maps and workspaces are poisoned (99 / NaN).
"""

import importlib

import numpy as np
import pytest

from sla_numba import _params
from sla_numba.testing import poisoned

gpu_classify = importlib.import_module("sla_numba.gpu.classify")
fused = importlib.import_module("sla_numba.gpu.simt.classify_fused")
cpu = importlib.import_module("sla_numba.cpu")

pytestmark = pytest.mark.gpu


def _bf16(rng, shape):
    """(float32 values exactly representable in bf16, their int16 bit patterns)."""
    x = rng.standard_normal(shape).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32), bits.view(np.int16)


def _check_bits(q, k, qb, kb, n_crit, n_skip, bq, bk, scale, **kw):
    with poisoned():
        got = gpu_classify._classify_fused(
            qb, kb, n_crit, n_skip, bq, bk, scale, bf16_bits=True, **kw
        )
    want = cpu.classify(q, k, n_crit, n_skip, bq, bk, scale)
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not fused.SIMULATOR, reason="the simulator's 4-lane groups")
def test_word_layouts_under_the_simulator():
    """The D values below take each word width (4 lanes a group here)."""
    assert fused.word_layout(16, True, 4) == (np.uint64, 4)
    assert fused.word_layout(8, True, 4) == (np.uint32, 2)  # 2 uint64 words < 4 lanes
    assert fused.word_layout(6, True, 4) == (np.uint32, 2)
    assert fused.word_layout(5, True, 4) == (np.uint16, 1)
    assert fused.word_layout(16, False, 4) == (None, 1)


@pytest.mark.parametrize(
    "D,Nq,Nk,bq,bk",
    [
        (16, 13, 30, 4, 3),  # uint64 words, tails in both q and k
        (6, 9, 22, 4, 5),  # uint32 words, W = 3 < 4 lanes: an idle lane
        (5, 8, 17, 3, 4),  # odd D: one uint16 a load
        (20, 7, 24, 2, 4),  # uint64, W = 5 > 4 lanes: two words a lane
    ],
)
def test_bf16_words_give_the_cpu_map(D, Nq, Nk, bq, bk):
    rng = np.random.default_rng(D)
    q, qb = _bf16(rng, (1, 2, Nq, D))
    k, kb = _bf16(rng, (1, 2, Nk, D))
    mk = _params.n_blocks(Nk, bk)
    for n_crit, n_skip in (_params.block_counts(mk, 0.3, 0.2), (1, mk - 1)):
        _check_bits(q, k, qb, kb, n_crit, n_skip, bq, bk, D**-0.5)


def test_bf16_nan_and_ties_in_packed_words():
    """A NaN value in a packed word poisons only its own column's mean (NaN scores
    rank as -inf), and rounded values tie."""
    rng = np.random.default_rng(3)
    q, qb = _bf16(rng, (1, 1, 8, 16))
    k, kb = _bf16(rng, (1, 1, 24, 16))
    q, k = np.round(q), np.round(k)  # small integers: exact in bf16, many ties
    qb = (q.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    kb = (k.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    k[0, 0, 9, 5] = np.nan
    kb[0, 0, 9, 5] = np.int16(0x7FC0)  # bf16 NaN
    _check_bits(q, k, qb, kb, 2, 2, 4, 4, 0.25)


def _rounded_bits(x):
    """Small integers (exact in bf16: many tied scores) and their bf16 bits."""
    x = np.round(x)
    return x, (x.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)


@pytest.mark.parametrize(
    "tiles,pool_tiles",
    [
        ((1, 1, None, None), (4, 1, 2)),  # one row a CTA; 4 lanes, 1 group, 2 rows in flight
        ((2, 2, None, None), (2, 3, 1)),  # CPT 2; 2 lanes, 3 groups, 1 row in flight
        ((3, 4, None, 1), None),  # keys one row at a time (3 chunks), tail CTA of 1 row
        ((4, 4, None, 2), None),  # 2 chunks of 2 rows
    ],
    ids=str,
)
def test_other_tilings_give_the_same_map(tiles, pool_tiles):
    """RQ / CPT / RH of the keys kernel (RH < RQ: one pass over the key blocks, the
    rows keyed and ranked RH at a time); lanes a group, groups a CTA, rows in flight
    of the pooling kernel. bf16 words and float32 elements; random and tied scores."""
    rng = np.random.default_rng(11)
    mk = _params.n_blocks(45, 4)
    cfg = gpu_classify.keys_config(mk, 8, *tiles)
    assert cfg is not None and cfg[4] == (tiles[3] or cfg[0]), cfg
    for tied in (False, True):
        q, qb = _bf16(rng, (1, 1, 10, 8))
        k, kb = _bf16(rng, (1, 1, 45, 8))
        if tied:
            (q, qb), (k, kb) = _rounded_bits(q), _rounded_bits(k)
        for n_crit, n_skip in ((4, 3), (1, 10)):
            _check_bits(q, k, qb, kb, n_crit, n_skip, 3, 4, 0.7, tiles=tiles, pool_tiles=pool_tiles)
    with poisoned():
        got = gpu_classify._classify_fused(
            q, k, 4, 3, 3, 4, 0.7, tiles=tiles, pool_tiles=pool_tiles
        )
    np.testing.assert_array_equal(got, cpu.classify(q, k, 4, 3, 3, 4, 0.7))


def test_rows_too_long_for_shared_keys_use_the_scratch_kernel(monkeypatch):
    """With no shared memory for keys the pair is warp pooling + the default
    score/select kernel: the same map."""
    monkeypatch.setattr(gpu_classify, "KEYS_SMEM", 8)
    assert gpu_classify.keys_config(12, 4) is None
    assert gpu_classify.fast_config(12, 4) is not None
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 1, 9, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, 36, 4)).astype(np.float32)
    with poisoned():
        got = gpu_classify.classify_fused(q, k, 3, 4, 4, 3, 0.5)
    np.testing.assert_array_equal(got, cpu.classify(q, k, 3, 4, 4, 3, 0.5))


def test_switch_routes_classify(monkeypatch):
    """``SLA_NUMBA_CLASSIFY`` unset or ``fused`` sends ``classify`` to ``classify_fused``;
    ``scratch``, the older pair runs; a bad value is a ValueError naming the variable."""
    seen = []
    monkeypatch.setattr(gpu_classify, "classify_fused", lambda *a: seen.append(a) or "fused")
    monkeypatch.setattr(gpu_classify, "_classify", lambda *a, **kw: "scratch")
    args = (None, None, 1, 1, 4, 4, 1.0)
    monkeypatch.setenv("SLA_NUMBA_CLASSIFY", "fused")
    assert gpu_classify.classify(*args) == "fused" and seen == [args]
    monkeypatch.delenv("SLA_NUMBA_CLASSIFY")
    assert gpu_classify.classify(*args) == "fused" and seen == [args, args]
    monkeypatch.setenv("SLA_NUMBA_CLASSIFY", "scratch")
    assert gpu_classify.classify(*args) == "scratch"
    monkeypatch.setenv("SLA_NUMBA_CLASSIFY", "fastest")
    with pytest.raises(ValueError, match="SLA_NUMBA_CLASSIFY"):
        gpu_classify.classify(*args)


@pytest.mark.parametrize("D,col", [(16, 7), (6, 3), (5, 4)])  # the last value of a word
def test_one_bf16_ulp_decides(D, col):
    """Key block 1 is key block 0 with one value one bf16 ulp larger (the last value
    of its word): with positive queries block 1 is the one critical block; read a
    bit wrong and it ties with block 0, which would then win."""
    rng = np.random.default_rng(D)
    q, qb = _bf16(rng, (1, 1, 4, D))
    q, qb = np.abs(q), qb & np.int16(0x7FFF)  # positive queries
    k0 = np.abs(rng.standard_normal((1, 1, 4, D)).astype(np.float32)) + 1
    kb0 = (k0.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)
    kb0[0, 0, 2, col] &= 0xFFFE
    kb1 = kb0.copy()
    kb1[0, 0, 2, col] += 1  # one ulp up: the lowest mantissa bit
    kb = np.concatenate([kb0, kb1, kb0 // 2], axis=2).view(np.int16)  # block 2: tiny
    k = (kb.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    want = cpu.classify(q, k, 1, 1, 4, 4, 1.0)
    np.testing.assert_array_equal(want[0, 0], [[0, 1, -1]])
    _check_bits(q, k, qb, kb, 1, 1, 4, 4, 1.0)
