"""The v2 variants of the pipelined marginal-sum kernel (``SLA_NUMBA_MARGINAL=pipelined_v2``,
``make_marginal_kernel_pipelined(..., map_load, out_store)``) against the present
pipelined kernel, bit for bit.

The variants change only how the map arrives (int32 words instead of bytes) and how the
results leave (staged in shared memory, then 16- or 4-byte stores along w); the mma
sequence is the same, so the outputs must have the same bits. Outputs start
NaN-poisoned: an element the kernel does not write fails (``_check_bf16``), and so does a
row >= n_out it writes.

Simulator (NUMBA_ENABLE_CUDASIM=1): 1-warp 16 x 16 tiles, tiny shapes chosen for the
corners: a map row ending mid-word at n_in, column sums with n_out not a multiple of 4
(a word's bytes past n_out), n_out = Mq / Mk with a partial row tile (a word past the map's
end would raise IndexError in the simulator), W % 4 != 0 (4-byte stores), a partial
column tile, Mk % 4 != 0 (falls back to bytes), n_in = 0. Whole file: ~30 s.
GPU (cc >= 8.0): the GPU tiles on tails and at the Wan2.1 sizes, bits against the
present pipelined kernel, and the times of both (``pytest -s``).
"""

import numpy as np
import pytest
from _tc_reference import fresh_process_lines, gpu_ms, needs_gpu, needs_sim
from test_tc_bf16_states import _bf16_problem, _check_bf16

from sla_numba import config
from sla_numba.gpu.tc import marginal as marginal_tc


def _present_and_v2(bmap, bits, out, transposed, n_out, n_in, pipeline, v2, tiles=None):
    """(present pipelined kernel's out, the v2 variant's out), each from a NaN-poisoned
    copy."""
    ref, got = out.copy(), out.copy()
    for o, var in ((ref, False), (got, v2)):
        marginal_tc.launch_marginal_sum_tc(
            0, bmap, transposed, n_out, n_in, bits, o, tiles=tiles, pipeline=pipeline, v2=var
        )
    return ref, got


def _same_bits(ref, got):
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), (
        f"{int((ref.view(np.uint32) != got.view(np.uint32)).sum())} of {ref.size} outputs differ"
    )


def _kb(pipeline):
    return marginal_tc.PIPE_KB if pipeline is True else pipeline[0]


# --------------------------------------------------------------------------- everywhere
def test_geometry_of_the_variants():
    """GPU pipelined tiles, kb 32: 2 map words (rows) or 1 word pair (cols) per thread, the
    epilogue's 32 x 264 fp32 buffer fits in the ring (shared memory unchanged); bad
    variants and word counts that do not divide among the threads are refused."""
    tiles = marginal_tc.GPU_PIPE_TILES
    base = marginal_tc.pipelined_geometry(tiles)
    rows = marginal_tc.pipelined_geometry(tiles, map_load="rows", out_store=4)
    cols = marginal_tc.pipelined_geometry(tiles, map_load="cols", out_store=1)
    assert (rows["NWP"], cols["NWP"]) == (2, 1)
    assert (rows["ES"], rows["NE"], cols["NE"]) == (264, 8, 32)
    assert 2 * 16 * 264 * 4 < base["SMEM_BYTES"]
    assert rows["SMEM_BYTES"] == cols["SMEM_BYTES"] == base["SMEM_BYTES"]
    for bad in (dict(map_load="words"), dict(out_store=2)):
        with pytest.raises(ValueError):
            marginal_tc.pipelined_geometry(tiles, **bad)
    # (1, 2, 1, 1): RT 16, 64 threads, kb 16: 64 row words (one a thread) but only 32
    # column word pairs; the launcher then keeps the map bytes
    marginal_tc.pipelined_geometry((1, 2, 1, 1), 16, map_load="rows")
    with pytest.raises(ValueError, match="map_load"):
        marginal_tc.pipelined_geometry((1, 2, 1, 1), 16, map_load="cols")
    bmap = _aligned(16 * 16, np.int8, 16).reshape(1, 1, 16, 16)
    out = _aligned(16 * 16, np.float32, 16).reshape(1, 1, 16, 16)
    assert marginal_tc.v2_variant(True, (1, 2, 1, 1), 16, True, bmap, out, 16) == ("bytes", 4)


def _aligned(n, dtype, align, shift=0):
    """A 1-D array of n elements whose first element sits ``shift`` bytes past an
    ``align``-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    buf = np.zeros(n * itemsize + 2 * align + shift, np.uint8)
    start = (-buf.ctypes.data) % align + shift
    return buf[start : start + n * itemsize].view(dtype)


def test_variant_follows_width_and_alignment():
    """Map words only where Mk % 4 == 0 and the map is 4-byte aligned (rows for row sums,
    cols for column sums); 16-byte stores only where W % 4 == 0 and out is 16-byte
    aligned, else 4-byte stores; each flag on its own."""
    tiles, kb = marginal_tc.SIM_TILES, 32
    bmap = _aligned(2 * 8, np.int8, 16).reshape(1, 1, 2, 8)
    out = _aligned(4 * 12, np.float32, 16).reshape(1, 1, 4, 12)
    v = marginal_tc.v2_variant
    assert v(True, tiles, kb, False, bmap, out, 12) == ("rows", 4)
    assert v(True, tiles, kb, True, bmap, out, 12) == ("cols", 4)
    assert v((True, False), tiles, kb, False, bmap, out, 12) == ("rows", 0)
    assert v((False, True), tiles, kb, False, bmap, out, 12) == ("bytes", 4)
    odd = _aligned(2 * 6, np.int8, 16).reshape(1, 1, 2, 6)  # Mk % 4 != 0
    assert v(True, tiles, kb, False, odd, out, 12)[0] == "bytes"
    shifted = _aligned(2 * 8, np.int8, 16, shift=2).reshape(1, 1, 2, 8)
    assert v(True, tiles, kb, False, shifted, out, 12)[0] == "bytes"
    out10 = _aligned(4 * 10, np.float32, 16).reshape(1, 1, 4, 10)  # W % 4 != 0
    assert v(True, tiles, kb, False, bmap, out10, 10)[1] == 1
    out_shifted = _aligned(4 * 12, np.float32, 16, shift=8).reshape(1, 1, 4, 12)
    assert v(True, tiles, kb, False, bmap, out_shifted, 12)[1] == 1


_KEY_SCRIPT = """
import hashlib
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
from numba.cuda.serialize import dumps
from sla_numba.gpu.tc import marginal
for v in (("bytes", 0), ("rows", 4), ("cols", 1)):
    k = marginal.make_marginal_kernel_pipelined(marginal.GPU_PIPE_TILES, 32, 3, 16, None, *v)
    cells = tuple(c.cell_contents for c in k.kernel.py_func.__closure__)
    print(hashlib.sha256(dumps(cells)).hexdigest())
"""


def test_disk_cache_key_is_the_same_in_two_processes_and_names_the_variant():
    """The real-GPU kernels' closures (Numba's disk-cache key) pickle to the same bytes in
    two fresh processes (nothing is compiled, no GPU needed), and differ per variant."""
    hashes = [fresh_process_lines(_KEY_SCRIPT) for _ in range(2)]
    assert len(hashes[0]) == 3 and hashes[0] == hashes[1]
    assert len(set(hashes[0])) == 3


# --------------------------------------------------------------------------- simulator
SIM_CASES = [
    # B, H, Mq, Mk, W, n_out, n_in, transposed, (kb, stages) or True, v2, expected variant
    # row sums: n_in = 39 ends mid-word; n_out = Mq = 20 (rows 20.. of the tile are past
    # the map); W 20: 16-byte stores, the second column tile 4 wide
    (1, 1, 20, 40, 20, 20, 39, False, True, True, ("rows", 4)),
    # column sums: n_out = 13 (the word of rows 12..15 has 3 bytes past n_out), B*H = 2,
    # one partial stage; W 22: 4-byte stores
    (2, 1, 9, 16, 22, 13, 7, True, True, True, ("cols", 1)),
    # column sums, ring of 2 with one k-step a stage, 5 stages; n_out = Mk = 8 (the
    # words of rows 8..15 are past the map)
    (1, 1, 70, 8, 16, 8, 70, True, (16, 2), True, ("cols", 4)),
    # row sums, 4 k-steps a stage in 4 slots; each variant on its own
    (1, 1, 7, 92, 24, 7, 90, False, (64, 4), (True, False), ("rows", 0)),
    (1, 1, 7, 92, 24, 7, 90, False, (64, 4), (False, True), ("bytes", 4)),
    # Mk % 4 != 0: the map falls back to bytes, the epilogue is staged
    (1, 1, 9, 14, 20, 9, 14, False, True, True, ("bytes", 4)),
]


@needs_sim
@pytest.mark.parametrize("B,H,Mq,Mk,W,n_out,n_in,transposed,pipeline,v2,variant", SIM_CASES)
def test_sim_same_bits_as_present_kernel(
    B, H, Mq, Mk, W, n_out, n_in, transposed, pipeline, v2, variant
):
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=W)
    tiles = marginal_tc.PIPE_TILES
    assert marginal_tc.v2_variant(v2, tiles, _kb(pipeline), transposed, bmap, out, W) == variant
    ref, got = _present_and_v2(bmap, bits, out, transposed, n_out, n_in, pipeline, v2)
    _check_bf16(got, bmap, values, transposed, n_out, n_in)  # written, untouched, accurate
    _same_bits(ref, got)


@needs_sim
@pytest.mark.parametrize("transposed", [False, True])
def test_sim_four_warps_same_bits(transposed):
    """Tiles (2, 2, 1, 1): 4 warps as 2 x 2, CTA 32 x 32, so the warp offsets of the
    staged epilogue (rows wr·16, columns wc·16) and the word roles of 128 threads are
    exercised (the 1-warp simulator tiles have none); one stage, a partial row tile (22
    of 32 rows) and a second column tile 4 wide."""
    tiles = (2, 2, 1, 1)
    Mq, Mk, W = (22, 24, 36) if not transposed else (23, 24, 36)
    n_out, n_in = 22, 23
    bmap, bits, values, out = _bf16_problem(1, 1, Mq, Mk, W, n_out, n_in, transposed, seed=7)
    want = ("cols" if transposed else "rows", 4)
    assert marginal_tc.v2_variant(True, tiles, 32, transposed, bmap, out, W) == want
    ref, got = _present_and_v2(bmap, bits, out, transposed, n_out, n_in, True, True, tiles)
    _check_bf16(got, bmap, values, transposed, n_out, n_in)
    _same_bits(ref, got)


@needs_sim
def test_sim_empty_inner_dimension_gives_zeros():
    """n_in = 0: the staged epilogue writes exactly 0 to every row < n_out, nothing else."""
    bmap, bits, _, out = _bf16_problem(1, 1, 17, 8, 20, 17, 0, False, seed=3)
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 17, 0, bits, out, pipeline=True, v2=True)
    assert (out[:, :, :17] == 0).all() and np.isnan(out[:, :, 17:]).all()


@needs_sim
def test_sim_switch_selects_the_variants(monkeypatch):
    """``SLA_NUMBA_MARGINAL=pipelined_v2`` builds the pipelined kernel with map words and
    the staged epilogue; ``pipelined`` (and unset) the present one."""
    made = []
    real = marginal_tc.get_marginal_kernel_pipelined

    def spy(*args):
        made.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(marginal_tc, "get_marginal_kernel_pipelined", spy)
    bmap, bits, _, out = _bf16_problem(1, 1, 5, 8, 16, 5, 5, True, seed=0)
    for env in ("pipelined_v2", "pipelined", ""):
        monkeypatch.setenv(config.MARGINAL_VAR, env)
        marginal_tc.launch_marginal_sum_tc(0, bmap, True, 5, 5, bits, out.copy())
    assert made == [("cols", 4), ("bytes", 0), ("bytes", 0)]


@needs_sim
def test_sim_no_races():
    """Under the race detector: the epilogue reuses the ring's shared memory (a store to
    it before every warp is done with its last stage is a race), and its buffer is
    rewritten per m-tile (a store before every thread has read the last one is too)."""
    from sla_numba.testing_race import detect_races

    bmap, bits, _, out = _bf16_problem(1, 1, 5, 72, 16, 5, 72, False, seed=5)
    with detect_races():
        marginal_tc.launch_marginal_sum_tc(
            0, bmap, False, 5, 72, bits, out, pipeline=(16, 3), v2=True
        )
    assert np.isfinite(out[:, :, :5]).all()


# --------------------------------------------------------------------------- real GPU
def _gpu_present_and_v2(bmap, bits, out, transposed, n_out, n_in, pipeline, v2, reps=0):
    """(present out, v2 out, their times in ms or []) on the GPU."""
    from numba import cuda

    d_map, d_bits = cuda.to_device(bmap), cuda.to_device(bits)
    outs, times = [], []
    for var in (False, v2):
        d_out = cuda.to_device(out)

        def run(var=var, d_out=d_out):
            marginal_tc.launch_marginal_sum_tc(
                0, d_map, transposed, n_out, n_in, d_bits, d_out, pipeline=pipeline, v2=var
            )

        run()
        cuda.synchronize()
        outs.append(d_out.copy_to_host())
        if reps:
            times.append(gpu_ms(run, reps))
    return outs[0], outs[1], times


GPU_CASES = [
    # B, H, Mq, Mk, W, n_out, n_in, transposed, pipeline, v2
    (2, 3, 70, 92, 16512, 67, 85, False, True, True),  # tails in r and c
    (2, 3, 92, 72, 16512, 69, 90, True, True, True),  # column sums, n_out % 4 != 0
    (1, 2, 300, 276, 1000, 300, 276, False, True, True),  # W = 3*256 + 232: partial tile
    (1, 2, 132, 100, 1002, 100, 130, True, True, True),  # W % 4 == 2: 4-byte stores
    (1, 2, 100, 132, 1004, 100, 130, False, (64, 4), (True, False)),
    (1, 2, 100, 132, 1004, 100, 130, False, (64, 4), (False, True)),
    (1, 2, 100, 130, 1000, 100, 130, False, True, True),  # Mk % 4 != 0: map bytes
    (1, 1, 5, 4, 8, 5, 3, False, True, True),  # smaller than one tile
]


@needs_gpu
@pytest.mark.parametrize("B,H,Mq,Mk,W,n_out,n_in,transposed,pipeline,v2", GPU_CASES)
def test_gpu_same_bits_as_present_kernel(B, H, Mq, Mk, W, n_out, n_in, transposed, pipeline, v2):
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=W)
    ref, got, _ = _gpu_present_and_v2(bmap, bits, out, transposed, n_out, n_in, pipeline, v2)
    _check_bf16(got, bmap, values, transposed, n_out, n_in)
    _same_bits(ref, got)


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_wan_sizes_same_bits(transposed):
    """B*H = 12, Mq = Mk = 512, W = 16512, a random map: v2's bits equal the present
    pipelined kernel's; both times printed."""
    B, H, R, W = 1, 12, 512, 128 * 128 + 128
    rng = np.random.default_rng(0)
    u = rng.random((B, H, R, R))
    bmap = np.zeros((B, H, R, R), np.int8)
    bmap[u < 0.05] = 1
    bmap[u > 0.90] = -1
    values = rng.standard_normal((B, H, R, W), dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    del values
    out = np.full((B, H, R, W), np.nan, np.float32)
    ref, got, (t_old, t_v2) = _gpu_present_and_v2(
        bmap, bits, out, transposed, R, R, True, True, reps=10
    )
    assert np.isfinite(got).all()
    _same_bits(ref, got)
    print(f"\nWan sizes transposed={transposed}: pipelined {t_old:.3f} ms, v2 {t_v2:.3f} ms")
