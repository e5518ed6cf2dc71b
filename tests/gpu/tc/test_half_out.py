"""16-bit outputs of the sparse forward kernels (``gpu.forward(half_out=True)``).

The torch bridge wants O_s in q's dtype. The tensor-core sparse kernels can write it so
(``tc/tiles.make_pair_store``: ``cvt.rn`` of the fp32 result, two values an int32),
which must give exactly the bits of writing fp32 and converting afterwards (round to
nearest even). Checked here for both kernels (mma.sync and wgmma), both 16-bit types,
against the same kernel's fp32 output rounded in numpy; and through ``gpu.forward``,
where O_l (still fp32 in its kernels) is converted by the backend.
"""

import numpy as np
import pytest
import torch
from _tc_reference import random_lut
from numba import config as nb_config

from sla_numba import config
from sla_numba.gpu.tc.ptx import f32_to_bf16_bits
from sla_numba.testing import poisoned

SIM = nb_config.ENABLE_CUDASIM
needs_sim = pytest.mark.skipif(not SIM, reason="needs NUMBA_ENABLE_CUDASIM=1 (simulator twins)")


def _round(o32, kind):
    """fp32 -> the 16-bit kind's bits (uint16), round to nearest even."""
    o32 = np.asarray(o32, np.float32)
    if kind == "bf16":
        return f32_to_bf16_bits(o32)
    return o32.astype(np.float16).view(np.uint16)


def _launch_both(kind, D, Nq, Nk, bq, bk, seed):
    """The sparse forward launched twice through the backend's entry
    (``launch_sparse_forward``) on numpy arrays: fp32 output and 16-bit output (the
    int32 view of an int16 array poisoned with NaN bits). Returns (o32, o16 bits, lse)
    and the counts (some query blocks empty)."""
    from sla_numba.gpu.tc.forward import launch_sparse_forward

    rng = np.random.default_rng(seed)
    B, H = 1, 2
    x = [rng.standard_normal((B, H, n, D)).astype(np.float32) for n in (Nq, Nk, Nk)]
    bits = [_round(a, kind).view(np.int16).reshape(-1) for a in x]
    mq, mk = -(-Nq // bq), -(-Nk // bk)
    lut, counts = random_lut(B, H, mq, mk, 2, seed)
    lut, counts = lut.numpy().reshape(-1), counts.numpy().reshape(-1)
    o32 = np.full(B * H * Nq * D, np.nan, np.float32)
    lse32 = np.full(B * H * Nq, np.nan, np.float32)
    o16 = np.full(B * H * Nq * D, 0x7FC0 if kind == "bf16" else 0x7E00, np.uint16).view(np.int16)
    lse16 = np.full(B * H * Nq, np.nan, np.float32)
    args = (B, H, Nq, Nk, D, bq, bk, D**-0.5, 0)
    launch_sparse_forward(kind, *bits, lut, counts, o32, lse32, *args)
    launch_sparse_forward(kind, *bits, lut, counts, o16.view(np.int32), lse16, *args)
    assert (lse32.view(np.int32) == lse16.view(np.int32)).all()
    return o32, o16.view(np.uint16), counts


@needs_sim
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_mma_kernel_half_output_is_the_rounded_fp32_output(kind):
    o32, o16, counts = _launch_both(kind, 16, 40, 37, 16, 16, seed=3)
    assert (counts == 0).any() and np.isfinite(o32).all()
    assert (o16 == _round(o32, kind)).all()  # every value written (no NaN bits left)


@needs_sim
def test_wgmma_kernel_half_output_is_the_rounded_fp32_output(monkeypatch):
    monkeypatch.setenv(config.SPARSE_FWD_VAR, "wgmma")
    o32, o16, counts = _launch_both("bf16", 64, 70, 130, 64, 64, seed=4)
    assert (counts == 0).any() and np.isfinite(o32).all()
    assert (o16 == _round(o32, "bf16")).all()


@needs_sim
def test_gpu_forward_half_out_fp16_numpy():
    """``gpu.forward(half_out=True)`` on fp16 numpy inputs (the tensor-core path): O_s
    from the kernel, O_l converted by the backend; both equal to the fp32 call's
    outputs converted by numpy; lse unchanged."""
    from sla_numba import gpu

    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, n, 16)).astype(np.float16) for n in (20, 29, 29))
    bm = np.array([[[[1, 0], [0, 2]]]], np.int8)  # query block 1: no critical key block
    with poisoned():
        ref = gpu.forward(q, k, v, bm, 16, 16, 0.25, 0, 1e-6, path="tc")
        out = gpu.forward(q, k, v, bm, 16, 16, 0.25, 0, 1e-6, path="tc", half_out=True)
    assert out[0].dtype == np.float16 and out[1].dtype == np.float16
    assert out[2].dtype == np.float32
    for got, want in zip(out[:2], ref[:2]):
        assert np.isfinite(want).all()
        assert (got.view(np.uint16) == want.astype(np.float16).view(np.uint16)).all()
    assert (out[2].view(np.int32) == ref[2].view(np.int32)).all()


def test_half_out_refuses_numba_device_arrays():
    from numba import cuda

    from sla_numba import gpu

    if not SIM and not cuda.is_available():
        pytest.skip("needs a CUDA device or the simulator")
    x = cuda.to_device(np.zeros((1, 1, 16, 16), np.float16))
    bm = cuda.to_device(np.ones((1, 1, 1, 1), np.int8))
    with pytest.raises(ValueError, match="half_out"):
        gpu.forward(x, x, x, bm, 16, 16, 0.25, 0, 1e-6, half_out=True)


@pytest.mark.gpu
@pytest.mark.skipif(SIM or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sparse_fwd", ["auto", "mma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_out_bits_equal_conversion(monkeypatch, dtype, sparse_fwd):
    """On the GPU, torch tensors: half_out=True gives the bits of the fp32 outputs
    converted by torch (the bridge's old ``.to(dtype)``), for the default sparse kernel
    (wgmma on cc 9.0) and the mma.sync kernel."""
    from sla_numba import gpu

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    monkeypatch.setenv(config.SPARSE_FWD_VAR, sparse_fwd)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(2, 3, n, 128, device="cuda", generator=g).to(dtype) for n in (777, 900, 900)
    )
    bm = torch.randint(0, 3, (2, 3, 13, 15), device="cuda", generator=g, dtype=torch.int8)
    bm[0, 1, 4] = 0
    with poisoned():
        ref = gpu.forward(q, k, v, bm, 64, 64, 128**-0.5, 0, 1e-6)
        out = gpu.forward(q, k, v, bm, 64, 64, 128**-0.5, 0, 1e-6, half_out=True)
    torch.cuda.synchronize()
    for got, want in zip(out[:2], ref[:2]):
        assert got.dtype == dtype and torch.isfinite(want).all()
        assert torch.equal(got.view(torch.int16), want.to(dtype).view(torch.int16))
    assert torch.equal(out[2], ref[2])


@needs_sim
@pytest.mark.parametrize("kind,pipeline", [("bf16", True), ("f16", False)])
def test_linear_kernel_half_output_is_the_rounded_fp32_output(kind, pipeline):
    """The linear branch's kernels (pipelined and register-staged): the 16-bit o_l
    (int32 pair view, poisoned) equals their fp32 o_l rounded to nearest even; the
    query block without marginal blocks is zeros in both."""
    from test_tc_linear import make_inputs

    from sla_numba.gpu.tc.linear import launch_linear_forward_tc

    B, H, Nq, D, bq, fm = 1, 1, 40, 16, 16, 0
    qb, _, lstate, n_marg = make_inputs(kind, B, H, Nq, D, bq, fm, 7, (1,))
    n = B * H * Nq * D
    o32 = np.full(n, np.nan, np.float32)
    o16 = np.full(n, 0x7FC0 if kind == "bf16" else 0x7E00, np.uint16).view(np.int16)
    for out in (o32, o16.view(np.int32)):
        launch_linear_forward_tc(
            kind, qb, lstate, n_marg, out, B, H, Nq, D, bq, fm, 1e-6, 0, pipeline=pipeline
        )
    assert np.isfinite(o32).all() and (o32.reshape(Nq, D)[16:32] == 0).all()
    assert (o16.view(np.uint16) == _round(o32, kind)).all()
