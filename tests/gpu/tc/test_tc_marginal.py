"""Tensor-core marginal sums (``sla_numba.gpu.tc.marginal``) against a float64 product.

``out[b, h, r] = Σ_c M[r, c] · S[b, h, c]`` with ``M = (block map == 0)`` (or its
transpose) and fp32 states S. The kernel splits S into bf16 hi + lo, so per element

    |out - M·S| <= (2^-16 + 2·ceil(n_in/16)·2^-23) · (M·|S|)          (``_bound``)

(``tc.marginal``'s docstring derives it); that is what is asserted against the float64
product, and ``1e-4 · (M·|S|)`` against the fp32 SIMT kernel ``_marginal``.

Simulator (NUMBA_ENABLE_CUDASIM=1, CI): the ``ptx`` twins run the kernel with the
1-warp 16 x 16 tiles (``SIM_TILES``; every warp-wide op costs 10-50 ms there), on
shapes with tails in every dimension; a few seconds. The GPU tiles under the
simulator take ~30 s per CTA: ``SLA_NUMBA_SIM_FULL=1`` opts in.
GPU (compute capability >= 8.0): the GPU tiles on tails, column sums, the Wan2.1
shape and determinism; timings against the SIMT kernel are printed (``pytest -s``).
"""

import os

import numpy as np
import pytest
from _tc_reference import SIM, needs_gpu, needs_sim, tc_gpu_available

from sla_numba.gpu.tc import marginal as marginal_tc


# --------------------------------------------------------------------------- problems
def _problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed):
    """(bmap, states, out) as numpy: a random map whose row 0 of M has no marginal block,
    states of magnitudes 1e-3..1e3 with NaN rows past n_in, out NaN-poisoned with two
    spare rows. Map entries outside the n_out x n_in window are marginal: a kernel that
    looked past n_in would pick NaN states up."""
    rng = np.random.default_rng(seed)
    bmap = rng.choice(np.array([1, 0, 0, -1], np.int8), size=(B, H, Mq, Mk))
    if transposed:
        bmap[:, :, :, 0] = 1  # M row 0 = map column 0: all critical
        bmap[:, :, n_in:, :] = 0
        bmap[:, :, :, n_out:] = 0
    else:
        bmap[:, :, 0, :] = 1  # M row 0 = map row 0: all critical
        bmap[:, :, n_out:, :] = 0
        bmap[:, :, :, n_in:] = 0
    s_rows = max(Mq, Mk) + 1
    scale = 10.0 ** rng.uniform(-3, 3, size=(B, H, s_rows, 1))
    states = (rng.standard_normal((B, H, s_rows, W)) * scale).astype(np.float32)
    states[:, :, n_in:] = np.nan
    out = np.full((B, H, n_out + 2, W), np.nan, np.float32)
    return bmap, states, out


def _reference(bmap, states, transposed, n_out, n_in):
    """(M·S, M·|S|) in float64 over the n_out x n_in window."""
    m = np.swapaxes(bmap, 2, 3) if transposed else bmap
    M = (m[:, :, :n_out, :n_in] == 0).astype(np.float64)
    S = states[:, :, :n_in].astype(np.float64)
    return M @ S, M @ np.abs(S)


def _bound(n_in):
    """Relative (to M·|S|) error bound of the bf16 hi + lo product (module docstring)."""
    return 2.0**-16 + 2 * -(-n_in // 16) * 2.0**-23


def _check(out, bmap, states, transposed, n_out, n_in):
    """Assert the written window, the untouched spare rows and the exact zeros; return the
    measured max |out - M·S| / (M·|S|)."""
    ref, mag = _reference(bmap, states, transposed, n_out, n_in)
    got = out[:, :, :n_out].astype(np.float64)
    assert np.isfinite(got).all(), "unwritten (NaN) or non-finite outputs"
    assert np.isnan(out[:, :, n_out:]).all(), "rows >= n_out were written"
    empty = mag == 0  # includes M row 0 (no marginal block)
    assert empty[:, :, 0].all()
    assert (got[empty] == 0).all(), "a row without marginal blocks is not exactly 0"
    err = np.abs(got - ref)
    rel = float((err / np.where(empty, 1.0, mag)).max())
    assert rel <= _bound(n_in), f"error {rel:.3g} x (M|S|) > bound {_bound(n_in):.3g}"
    return rel


def _simt_error(out, bmap, states, transposed, n_out, n_in):
    """max |out - out_simt| / (M·|S|) with the fp32 SIMT kernel (same launch arguments)."""
    _marginal = pytest.importorskip("sla_numba.gpu.simt.marginal")
    simt = np.full_like(out, np.nan)
    _marginal.launch_marginal_sum(0, bmap, transposed, n_out, n_in, states, simt)
    _, mag = _reference(bmap, states, transposed, n_out, n_in)
    d = np.abs(out[:, :, :n_out].astype(np.float64) - simt[:, :, :n_out])
    return float((d / np.where(mag == 0, 1.0, mag)).max())


# --------------------------------------------------------------------------- everywhere
def test_geometry_and_ops_per_kstep():
    """GPU tiles: 32 mma (2 m-tiles x 8 n8 tiles x hi/lo) and 10 ldmatrix (2 A + 4 x (hi,
    lo) B) per k-step (tools/check_tc_ptx.py finds these in the PTX); shared memory within
    48 KiB; tiles the staging cannot cover are refused."""
    assert marginal_tc.ops_per_kstep(marginal_tc.GPU_TILES) == (32, 10)
    G = marginal_tc.geometry(marginal_tc.GPU_TILES)
    assert (G["RT"], G["WT"], G["NT"]) == (64, 128, 128)
    assert G["SMEM_BYTES"] == 2 * (2 * 16 * 136 + 64 * 24) * 2 <= 48 * 1024
    k = marginal_tc.make_marginal_kernel(marginal_tc.GPU_TILES)
    assert (k.threads, k.smem_bytes) == (128, G["SMEM_BYTES"])
    with pytest.raises(ValueError):
        marginal_tc.geometry((1, 1, 1, 8))  # 32 threads cannot stage 64 pairs a row


def test_supported_rules():
    assert marginal_tc.tc_marginal_supported(np.float32) is (SIM or tc_gpu_available())
    assert not marginal_tc.tc_marginal_supported(np.float64)
    assert "float32 only" in marginal_tc.tc_marginal_unsupported_reason(np.float64)
    bmap, states, out = _problem(1, 1, 2, 2, 3, 2, 2, False, 0)
    with pytest.raises(TypeError):
        marginal_tc.launch_marginal_sum_tc(0, bmap, False, 2, 2, states.astype(np.float64), out)


# --------------------------------------------------------------------------- simulator
SIM_CASES = [
    # B, H, Mq, Mk, W, n_out, n_in, transposed
    (1, 1, 20, 21, 20, 18, 19, False),  # 2 x 2 CTAs, 2 k-steps; tails in r, c and w
    (2, 1, 9, 14, 21, 13, 7, True),  # column sums, B*H = 2, one partial k-step
]


@needs_sim
@pytest.mark.parametrize("B,H,Mq,Mk,W,n_out,n_in,transposed", SIM_CASES)
def test_sim_matches_float64_and_simt(B, H, Mq, Mk, W, n_out, n_in, transposed):
    bmap, states, out = _problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=n_out)
    marginal_tc.launch_marginal_sum_tc(0, bmap, transposed, n_out, n_in, states, out)
    _check(out, bmap, states, transposed, n_out, n_in)  # measured ~6e-6 x M|S|
    assert _simt_error(out, bmap, states, transposed, n_out, n_in) <= 1e-4


@needs_sim
def test_sim_empty_inner_dimension_gives_zeros():
    """n_in = 0: every written row is an empty sum (exactly 0); n_out = 0 writes nothing."""
    bmap, states, out = _problem(1, 1, 17, 5, 18, 17, 0, False, seed=3)
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 17, 0, states, out)
    assert (out[:, :, :17] == 0).all() and np.isnan(out[:, :, 17:]).all()
    out[:] = np.nan
    marginal_tc.launch_marginal_sum_tc(0, bmap, False, 0, 5, states, out)
    assert np.isnan(out).all()


@needs_sim
@pytest.mark.skipif(
    os.environ.get("SLA_NUMBA_SIM_FULL") != "1",
    reason="GPU tiles under the simulator: ~1 min; SLA_NUMBA_SIM_FULL=1",
)
@pytest.mark.parametrize(
    "tiles,case",
    [
        (marginal_tc.GPU_TILES, (1, 1, 25, 45, 130, 40, 20, True)),  # 2 column tiles
        ((2, 2, 2, 1), (1, 1, 70, 30, 40, 70, 17, False)),  # 2 x 2 CTAs
    ],
)
def test_sim_gpu_tiles(tiles, case):
    B, H, Mq, Mk, W, n_out, n_in, transposed = case
    bmap, states, out = _problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=W)
    marginal_tc.launch_marginal_sum_tc(0, bmap, transposed, n_out, n_in, states, out, tiles=tiles)
    _check(out, bmap, states, transposed, n_out, n_in)


# --------------------------------------------------------------------------- real GPU
GPU_CASES = [
    (2, 3, 300, 277, 1000, 300, 277, False),  # tails: 300 = 4*64 + 44, W = 7*128 + 104
    (2, 3, 300, 277, 1000, 277, 300, True),  # column sums
    (1, 2, 5, 3, 7, 5, 3, False),  # everything smaller than one tile
]


def _gpu_run(bmap, states, out, transposed, n_out, n_in, simt=False):
    from numba import cuda

    d_map, d_s, d_out = (cuda.to_device(x) for x in (bmap, states, out))
    if simt:
        from sla_numba.gpu.simt.marginal import launch_marginal_sum as launch
    else:
        launch = marginal_tc.launch_marginal_sum_tc
    launch(0, d_map, transposed, n_out, n_in, d_s, d_out)
    cuda.synchronize()
    return d_out.copy_to_host()


@needs_gpu
@pytest.mark.parametrize("B,H,Mq,Mk,W,n_out,n_in,transposed", GPU_CASES)
def test_gpu_matches_float64_and_simt(B, H, Mq, Mk, W, n_out, n_in, transposed):
    bmap, states, out = _problem(B, H, Mq, Mk, W, n_out, n_in, transposed, seed=W)
    got = _gpu_run(bmap, states, out, transposed, n_out, n_in)
    rel = _check(got, bmap, states, transposed, n_out, n_in)
    again = _gpu_run(bmap, states, out, transposed, n_out, n_in)
    assert np.array_equal(got.view(np.uint32), again.view(np.uint32)), "not deterministic"
    pytest.importorskip("sla_numba.gpu.simt.marginal")
    simt = _gpu_run(bmap, states, out, transposed, n_out, n_in, simt=True)
    _, mag = _reference(bmap, states, transposed, n_out, n_in)
    d = np.abs(got[:, :, :n_out].astype(np.float64) - simt[:, :, :n_out])
    rel_simt = float((d / np.where(mag == 0, 1.0, mag)).max())
    print(
        f"\n{(B, H, n_out, n_in, W, transposed)}: error vs float64 {rel:.2e}, "
        f"vs SIMT fp32 {rel_simt:.2e} (x M|S|)"
    )
    assert rel_simt <= 1e-4


@needs_gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_wan_shape(transposed):
    """R = C = 512 blocks, W = 16512 (D = 128), B*H = 12: float64 reference on the GPU
    (torch), and the time of both kernels (printed)."""
    import torch
    from numba import cuda

    B, H, R, W = 1, 12, 512, 128 * 128 + 128
    g = torch.Generator(device="cuda").manual_seed(0)
    cls = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, -1], dtype=torch.int8, device="cuda")
    bmap = cls[torch.randint(0, 10, (B, H, R, R), device="cuda", generator=g)]
    bmap[:, :, 3] = 1  # a row / column with no marginal block
    bmap[:, :, :, 3] = 1
    states = torch.randn(B, H, R, W, device="cuda", generator=g)
    out = torch.full((B, H, R, W), float("nan"), device="cuda")
    args = (
        cuda.as_cuda_array(bmap),
        transposed,
        R,
        R,
        cuda.as_cuda_array(states),
        cuda.as_cuda_array(out),
    )
    marginal_tc.launch_marginal_sum_tc(0, *args)
    torch.cuda.synchronize()
    m = bmap.transpose(2, 3) if transposed else bmap
    M = (m == 0).double()
    ref = M @ states.double()
    mag = M @ states.double().abs()
    assert torch.isfinite(out).all()
    assert (out[:, :, 3] == 0).all()
    rel = ((out.double() - ref).abs() / mag.clamp_min(1e-300)).max().item()
    assert rel <= _bound(R)

    def timed(launch, n=10):
        launch(0, *args)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            launch(0, *args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    t_tc = timed(marginal_tc.launch_marginal_sum_tc)
    msg = (
        f"\nWan shape transposed={transposed}: tc {t_tc:.3f} ms "
        f"({2 * B * H * R * R * W / t_tc / 1e9:.0f} TFLOP/s useful), error {rel:.2e} x M|S|"
    )
    try:
        from sla_numba.gpu.simt.marginal import launch_marginal_sum

        msg += f", SIMT {timed(launch_marginal_sum):.3f} ms"
    except ImportError:
        pass
    print(msg)
