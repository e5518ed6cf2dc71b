"""The pipelined marginal-sum kernel for bf16 states (``make_marginal_kernel_pipelined``,
``SLA_NUMBA_MARGINAL=pipelined``) against the register kernel, bit for bit.

Both kernels give every output as one lane's fixed sequence of mma over the k-steps in
ascending c with the same operands, so the outputs must have the same bits (not just be
close). Outputs start NaN-poisoned: an element the kernel does not write fails.

Simulator (NUMBA_ENABLE_CUDASIM=1): 1-warp 16 x 16 tiles (``SIM_TILES``) and tiny shapes
(every warp-wide op costs milliseconds there), chosen for the awkward corners: n_in not a
multiple of the stage (a last stage with k-steps wholly past n_in), more stages than the
ring holds (the ring wraps), W not a multiple of 8 (8- and 4-byte cp.async), a partial
last column tile (chunks wholly past W), column sums, n_out below the CTA's rows. The
``ptx`` twin of cp.async is deferred (a copy lands at the wait that covers it), so a wrong
slot or a wrong wait count gives wrong bits here. Whole file: ~30 s.
GPU (cc >= 8.0): the GPU tiles at the Wan2.1 sizes and on tails, bits against the register
kernel, and the times of both (``pytest -s``).
"""

import numpy as np
import pytest
from _tc_reference import fresh_process_lines, gpu_ms, needs_gpu, needs_sim
from test_tc_bf16_states import _bf16_problem, _check_bf16

from sla_numba import config
from sla_numba.gpu.tc import marginal as marginal_tc


def _both(bmap, bits, out, transposed, n_out, n_in, pipeline=True, tiles=marginal_tc.TILES):
    """(register kernel's out, pipelined kernel's out), each from a NaN-poisoned copy."""
    ref, got = out.copy(), out.copy()
    marginal_tc.launch_marginal_sum_tc(
        0, bmap, transposed, n_out, n_in, bits, ref, tiles=tiles, pipeline=False
    )
    marginal_tc.launch_marginal_sum_tc(
        0, bmap, transposed, n_out, n_in, bits, got, tiles=tiles, pipeline=pipeline
    )
    return ref, got


def _same_bits(ref, got):
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), (
        f"{int((ref.view(np.uint32) != got.view(np.uint32)).sum())} of {ref.size} outputs differ"
    )


# --------------------------------------------------------------------------- everywhere
def test_geometry_and_ops_per_stage():
    """GPU tiles, kb = 32, 3 stages: 32 mma and 12 ldmatrix a stage (tools/check_tc_ptx.py
    counts them in the PTX), 35.5 KiB of shared memory; impossible configurations are
    refused."""
    tiles = marginal_tc.GPU_TILES
    assert marginal_tc.ops_per_stage_pipelined(tiles) == (32, 12)
    P = marginal_tc.pipelined_geometry(tiles)
    assert (P["RT"], P["WT"], P["NT"], P["KS"], P["NPASS"]) == (64, 128, 128, 2, 4)
    assert P["SMEM_BYTES"] == (3 * 32 * 136 + 2 * 64 * 40) * 2
    assert marginal_tc.pipelined_geometry(tiles, chunk=4)["NPASS"] == 16
    for bad in (dict(kb=24), dict(stages=1), dict(chunk=2)):
        with pytest.raises(ValueError):
            marginal_tc.pipelined_geometry(tiles, **bad)
    with pytest.raises(ValueError):  # 32 threads cannot copy a row of 64 4-byte chunks
        marginal_tc.pipelined_geometry((1, 1, 1, 8), chunk=4)


def test_chunk_follows_width_and_address():
    """16-byte cp.async only where every row start is 16-byte aligned."""
    base = np.zeros(64, np.int16)
    off = (-base.ctypes.data // 2) % 8  # first 16-byte aligned element
    for W, want in ((40, 16), (36, 8), (22, 4)):
        assert marginal_tc.chunk_bytes(base[off:], W) == want
    assert marginal_tc.chunk_bytes(base[off + 4 :], 40) == 8  # 8-byte aligned address
    assert marginal_tc.chunk_bytes(base[off + 2 :], 40) == 4


def test_default_kernel_and_tiles_per_states_dtype(monkeypatch):
    """Unset switch: bf16 states take the pipelined kernel with ``PIPE_TILES``, fp32
    states the register kernel with ``TILES``; ``registers`` sends bf16 there too."""
    taken = []

    class _Taken(Exception):
        pass

    def spy(name):
        def get(tiles, *args):
            taken.append((name, tuple(tiles)))
            raise _Taken

        return get

    monkeypatch.setattr(marginal_tc, "get_marginal_kernel", spy("registers"))
    monkeypatch.setattr(marginal_tc, "get_marginal_kernel_pipelined", spy("pipelined"))
    # the GPU defaults (under the simulator both names are SIM_TILES): distinct here
    monkeypatch.setattr(marginal_tc, "TILES", marginal_tc.GPU_TILES)
    monkeypatch.setattr(marginal_tc, "PIPE_TILES", marginal_tc.GPU_PIPE_TILES)
    monkeypatch.delenv(config.MARGINAL_VAR, raising=False)
    bmap, bits, values, out = _bf16_problem(1, 1, 4, 4, 8, 4, 4, False, seed=1)
    for states, env in ((bits, ""), (values, ""), (bits, "registers")):
        monkeypatch.setenv(config.MARGINAL_VAR, env)
        with pytest.raises(_Taken):
            marginal_tc.launch_marginal_sum_tc(0, bmap, False, 4, 4, states, out)
    assert taken == [
        ("pipelined", tuple(marginal_tc.GPU_PIPE_TILES)),
        ("registers", tuple(marginal_tc.GPU_TILES)),
        ("registers", tuple(marginal_tc.GPU_TILES)),
    ]


_KEY_SCRIPT = """
import hashlib
import numpy as np
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
from numba.cuda.serialize import dumps
from sla_numba.gpu.tc import marginal
for mb in (None, 4):
    k = marginal.make_marginal_kernel_pipelined(marginal.GPU_TILES, 32, 3, 16, mb).kernel
    cells = tuple(c.cell_contents for c in k.py_func.__closure__)
    print(hashlib.sha256(dumps(cells)).hexdigest())
"""


def test_disk_cache_key_is_the_same_in_two_processes():
    """The real-GPU kernel's closure (Numba's disk-cache key) pickles to the same bytes in
    two fresh processes (see test_tc_cache_key.py; nothing is compiled, no GPU needed), and
    the launch bound, which the key does not include by itself, changes it."""
    hashes = [fresh_process_lines(_KEY_SCRIPT) for _ in range(2)]
    assert len(hashes[0]) == 2 and hashes[0] == hashes[1]
    assert hashes[0][0] != hashes[0][1]


# --------------------------------------------------------------------------- simulator
SIM_CASES = [
    # B, H, Mq, Mk, W, n_out, n_in, transposed, (kb, stages), cp.async bytes
    # 2 x 2 CTAs; n_in = 39: stage 1's second k-step lies past n_in; W 20: 8-byte chunks
    (1, 1, 20, 41, 20, 18, 39, False, True, 8),
    # column sums, B*H = 2, one partial k-step; W 22: 4-byte chunks
    (2, 1, 9, 14, 22, 13, 7, True, True, 4),
    # 4 stages in a ring of 3 (wraps); W 40: 16-byte chunks, last column tile half past W
    (1, 1, 9, 100, 40, 9, 100, False, True, 16),
    # the ring of 2 (wait_group 0), one k-step a stage; column sums, 5 stages
    (1, 1, 70, 6, 16, 5, 70, True, (16, 2), 16),
    # 4 k-steps a stage, 4 slots (wait_group 2), 2 stages, the second partial
    (1, 1, 7, 90, 24, 7, 90, False, (64, 4), 16),
]


@needs_sim
@pytest.mark.parametrize("B,H,Mq,Mk,W,n_out,n_in,transposed,pipeline,chunk", SIM_CASES)
def test_sim_same_bits_as_register_kernel(
    B, H, Mq, Mk, W, n_out, n_in, transposed, pipeline, chunk
):
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=W)
    assert marginal_tc.chunk_bytes(bits, W) == chunk  # (the twin checks the alignment)
    ref, got = _both(bmap, bits, out, transposed, n_out, n_in, pipeline)
    _check_bf16(got, bmap, values, transposed, n_out, n_in)  # written, untouched, accurate
    _same_bits(ref, got)


@needs_sim
def test_sim_empty_inner_dimension_gives_zeros():
    """n_in = 0: every written row is exactly 0 (no stage, no cp.async); n_out = 0: nothing."""
    bmap, bits, _, out = _bf16_problem(1, 1, 17, 5, 18, 17, 0, False, seed=3)
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 17, 0, bits, out, pipeline=True)
    assert (out[:, :, :17] == 0).all() and np.isnan(out[:, :, 17:]).all()
    out[:] = np.nan
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 0, 5, bits, out, pipeline=True)
    assert np.isnan(out).all()


@needs_sim
def test_sim_switch_selects_the_kernel(monkeypatch):
    """``SLA_NUMBA_MARGINAL=pipelined`` sends bf16 states (only) to the pipelined kernel."""
    made = []
    real = marginal_tc.get_marginal_kernel_pipelined

    def spy(*args):
        made.append(args)
        return real(*args)

    monkeypatch.setattr(marginal_tc, "get_marginal_kernel_pipelined", spy)
    bmap, bits, values, out = _bf16_problem(1, 1, 5, 6, 16, 5, 6, False, seed=0)
    monkeypatch.setenv(config.MARGINAL_VAR, "registers")
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 6, bits, out.copy())
    assert not made
    monkeypatch.setenv(config.MARGINAL_VAR, "pipelined")
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 6, bits, out.copy())
    assert len(made) == 1
    fp32 = out.copy()  # fp32 states keep the register kernel (two products a tile)
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 6, values, fp32)
    assert len(made) == 1 and np.isfinite(fp32[:, :, :5]).all()


@needs_sim
def test_sim_no_races():
    """The ring under the race detector: a slot refilled before every warp is done with
    it, or an M buffer stored while read, is a race."""
    from sla_numba.testing_race import detect_races

    bmap, bits, _, out = _bf16_problem(1, 1, 5, 70, 16, 5, 70, False, seed=5)
    with detect_races():
        marginal_tc.launch_marginal_sum_tc(0, bmap, False, 5, 70, bits, out, pipeline=(16, 3))
    assert np.isfinite(out[:, :, :5]).all()


# --------------------------------------------------------------------------- real GPU
def _gpu_both(bmap, bits, out, transposed, n_out, n_in, pipeline=True, reps=0):
    """(register out, pipelined out, their times in ms or None) on the GPU."""
    from numba import cuda

    d_map, d_bits = cuda.to_device(bmap), cuda.to_device(bits)
    outs, times = [], []
    for pipe in (False, pipeline):
        d_out = cuda.to_device(out)

        def run(pipe=pipe, d_out=d_out):
            marginal_tc.launch_marginal_sum_tc(
                0, d_map, transposed, n_out, n_in, d_bits, d_out, pipeline=pipe
            )

        run()
        cuda.synchronize()
        outs.append(d_out.copy_to_host())
        if reps:
            times.append(gpu_ms(run, reps))
    return outs[0], outs[1], times


GPU_CASES = [
    # B, H, Mq, Mk, W, n_out, n_in, transposed, pipeline
    (2, 3, 70, 90, 16512, 67, 85, False, True),  # tails in r and c
    (2, 3, 70, 90, 16512, 85, 67, True, True),  # column sums
    (1, 2, 300, 277, 1000, 300, 277, False, True),  # W = 7*128 + 104 (16-byte chunks)
    # (column sums: n_out <= Mk, n_in <= Mq; row sums: n_out <= Mq, n_in <= Mk)
    (1, 2, 130, 100, 1002, 100, 130, True, True),  # W % 8 == 2: 4-byte chunks
    (1, 2, 100, 130, 1004, 100, 130, False, (64, 4)),  # 8-byte chunks, kb 64, 4 slots
    (1, 2, 100, 130, 1000, 100, 130, False, (16, 2)),  # ring of 2
    (1, 1, 5, 3, 8, 5, 3, False, True),  # smaller than one tile
]


@needs_gpu
@pytest.mark.parametrize("B,H,Mq,Mk,W,n_out,n_in,transposed,pipeline", GPU_CASES)
def test_gpu_same_bits_as_register_kernel(B, H, Mq, Mk, W, n_out, n_in, transposed, pipeline):
    bmap, bits, values, out = _bf16_problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=W)
    ref, got, _ = _gpu_both(bmap, bits, out, transposed, n_out, n_in, pipeline)
    _check_bf16(got, bmap, values, transposed, n_out, n_in)
    _same_bits(ref, got)


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_wan_sizes_same_bits(transposed):
    """B*H = 12, Mq = Mk = 512, W = 16512, a random map (5 % critical, 10 % negligible):
    the pipelined kernel's bits equal the register kernel's; both times printed."""
    B, H, R, W = 1, 12, 512, 128 * 128 + 128
    rng = np.random.default_rng(0)
    u = rng.random((B, H, R, R))
    bmap = np.zeros((B, H, R, R), np.int8)
    bmap[u < 0.05] = 1
    bmap[u > 0.90] = -1
    # bf16 states of normal magnitudes (random bit patterns would overflow the sums)
    values = rng.standard_normal((B, H, R, W), dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    del values
    out = np.full((B, H, R, W), np.nan, np.float32)
    ref, got, (t_reg, t_pipe) = _gpu_both(bmap, bits, out, transposed, R, R, reps=10)
    assert np.isfinite(got).all()
    _same_bits(ref, got)
    print(
        f"\nWan sizes transposed={transposed}: register kernel {t_reg:.3f} ms, "
        f"pipelined {t_pipe:.3f} ms"
    )
