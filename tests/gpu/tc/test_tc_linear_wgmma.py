"""The wgmma linear-branch forward (``sla_numba/gpu/tc/linear_wgmma.py``,
``SLA_NUMBA_LINEAR=wgmma``).

1. numpy: the kernel's shared-memory address arithmetic (``a_offset`` for the φ tiles,
   K-major; ``b_offset`` for the H chunks, MN-major) is what a wgmma descriptor with the
   kernel's LBO / SBO reads (``wgmma.decode_operand``, the twins' and -- per
   tests/gpu/tc/test_tc_sparse_wgmma.py -- the hardware's reading); LBO and SBO
   exchanged read something else. The ``trans_b`` extension of ``make_wgmma_ss``.
2. Simulator: the kernel against float64 (``test_tc_linear.check``: relative RMS and
   per-element error <= 1e-4, zeros where n_marg = 0, nothing unwritten); tails (Nq
   not a multiple of 64), D = 64 and 128, both chunk sizes, both stage counts, H_i
   through registers and through the cp.async ring (3 and 4 slots), all feature maps, bf16 and fp16 q, NaN in q past the last row (must not
   leak), o_l NaN-poisoned with spare values that must stay NaN. The switch: ``wgmma``
   runs this kernel where it applies and the pipelined one elsewhere.
3. Real PTX (a CUDA compiler, no GPU): sm_90a, 3·HK/16 wgmma a chunk, no ``.local``,
   no spills (``tools/check_tc_ptx.py --only linear_wgmma`` prints the registers).
   The simulator's wgmma and cp.async twins run a group only at the wait covering it,
   so waiting for one group too few fails here (checked by hand for both waits); a
   race between warps of the warpgroup (a buffer refilled before another warp's wait)
   it cannot see: the twins run a wgmma group for all 128 threads at once.
4. A GPU of compute capability 9.0: against float64 and the pipelined mma.sync kernel
   (within 5e-5 of the output scale: fp32 rounding of a different summation order and
   an fp32 denominator, not the same bits), register and ring variants.
"""

import numpy as np
import pytest
from _tc_reference import SIM, needs_sim
from test_tc_linear import EPS, check, make_inputs

from sla_numba import config
from sla_numba.gpu.tc import linear as linear_tc
from sla_numba.gpu.tc import linear_wgmma as LW
from sla_numba.gpu.tc import wgmma as W


# ---------------------------------------------------------------------------
# 1. Layouts (numpy)
# ---------------------------------------------------------------------------
def _smem_with(offsets_of, tile, base, nbytes):
    smem = np.zeros(nbytes // 2, np.uint16)
    rows, cols = tile.shape
    for r in range(rows):
        for c in range(cols):
            smem[(base + offsets_of(r, c)) // 2] = tile[r, c]
    return smem


@pytest.mark.parametrize("D", [64, 128])
def test_phi_tile_offsets_are_what_the_k_major_descriptor_reads(D):
    """φ (64 x D) stored at ``a_offset``: k-step ks of the descriptor the kernel builds
    (start + (ks // 4)·8 KiB + (ks % 4)·32, SBO 1024) reads φ[:, 16ks : 16ks + 16]."""
    rng = np.random.default_rng(D)
    phi = rng.integers(0, 1 << 16, size=(64, D), dtype=np.uint16)
    base = 2048
    smem = _smem_with(LW.a_offset, phi, base, base + 64 * D * 2)
    for ks in range(D // 16):
        start = base + (ks // 4) * LW.CHUNK_BYTES + (ks % 4) * 32
        got = W.decode_operand(smem, W.make_desc(start, LW.K_MAJOR_LBO, LW.SBO), 64, 0)
        assert np.array_equal(got, phi[:, 16 * ks : 16 * ks + 16])


@pytest.mark.parametrize("D,HK", [(64, 16), (128, 16), (128, 32)])
def test_h_chunk_offsets_are_what_the_mn_major_descriptor_reads(D, HK):
    """An H chunk (HK x D: k = d1 rows, n = e) stored at ``b_offset``: k-step ksc of the
    descriptor (start + ksc·2048, LBO = HK·128, SBO = 1024, MN-major) reads
    H[16ksc : 16ksc + 16, :] (as (n, k)); with LBO and SBO exchanged it does not (D = 128:
    two column chunks)."""
    rng = np.random.default_rng(D + HK)
    h = rng.integers(0, 1 << 16, size=(HK, D), dtype=np.uint16)
    base = 1024
    smem = _smem_with(lambda k, n: LW.b_offset(k, n, HK), h, base, base + HK * D * 2 + 4096)
    for ksc in range(HK // 16):
        desc = W.make_desc(base + ksc * 2048, HK * 128, LW.SBO)
        got = W.decode_operand(smem, desc, D, 1)  # (n, k)
        assert np.array_equal(got, h[16 * ksc : 16 * ksc + 16, :].T)
    if D == 128 and HK == 32:
        bad = W.decode_operand(smem, W.make_desc(base, LW.SBO, HK * 128), D, 1)
        assert not np.array_equal(bad, h[:16, :].T)


def test_smem_layout_and_refusals():
    """D = 128, HK = 16, 3 stages: 32 KiB of φ + 3 x 8 KiB + 1 KiB (3 CTAs an SM);
    buffers 1024-aligned. Unsupported configurations are refused with the reason."""
    lay = LW.smem_layout(128, 16, 3)
    assert lay["bytes"] == 32768 + 3 * 8192 + 1024 and lay["buf0"] % 1024 == 0
    assert lay["buf"] % 1024 == 0 and LW.smem_layout(64, 32, 2)["bytes"] == 16384 + 16384 + 1024
    assert LW.wgmma_linear_unsupported_reason("bf16", 96, 64).startswith("head_dim 96")
    assert LW.wgmma_linear_unsupported_reason("f16", 64, 32).startswith("block_q 32")
    assert "dtype" in LW.wgmma_linear_unsupported_reason("fp32", 64, 64)
    assert LW.smem_layout(128, 16, 2, 4)["bytes"] == 32768 + 2 * 8192 + 4 * 8192 + 1024
    for bad in (("bf16", 128, 64, 3), ("bf16", 128, 16, 4), ("f16", 96, 16, 2),
                ("bf16", 128, 16, 2, True, 2), ("bf16", 128, 16, 2, False, 3)):  # fmt: skip
        with pytest.raises(ValueError):
            LW.make_linear_forward_wgmma(*bad)
    with pytest.raises(ValueError, match="trans_b"):
        W.make_wgmma_ss("bf16", 64, 2)


# ---------------------------------------------------------------------------
# 2. Simulator
# ---------------------------------------------------------------------------
def _launch_wgmma(kind, qb, lstate, n_marg, B, H, Nq, D, fm, hk, stages, ring=0, spare=64):
    n = B * H * Nq * D
    out = np.full(n + spare, np.nan, np.float32)
    LW.launch_linear_forward_wgmma(
        kind, qb, lstate, n_marg, out, B, H, Nq, D, 64, fm, EPS, 0, hk=hk, stages=stages,
        ring=ring,
    )  # fmt: skip
    assert np.isnan(out[n:]).all(), "values past the last row were written"
    return out[:n].reshape(B, H, Nq, D)


def _nan_tail(qb, extra=256):
    """q's bits as a flat buffer followed by NaN bits (0x7FC0 is NaN in bf16 and fp16)."""
    return np.concatenate([qb.reshape(-1), np.full(extra, 0x7FC0, np.int16)])


SIM_CASES = [  # kind, B, H, Nq, D, fm, hk, stages, ring
    ("bf16", 1, 1, 150, 64, 0, 16, 3, 0),  # 3 blocks: block 1 zeros, tail of 22; 4 chunks
    ("f16", 1, 1, 70, 128, 1, 32, 2, 0),  # D 128 (two column chunks), tail of 6 rows
    ("bf16", 1, 1, 100, 64, 2, 16, 2, 3),  # cp.async ring of 3 slots over 4 chunks
    ("f16", 1, 1, 64, 128, 0, 16, 3, 4),  # ring of 4 over 8 chunks, 3 stages
]


@needs_sim
@pytest.mark.parametrize("kind,B,H,Nq,D,fm,hk,stages,ring", SIM_CASES)
def test_sim_against_float64(kind, B, H, Nq, D, fm, hk, stages, ring):
    """(The comparison with the pipelined mma.sync kernel is on the GPU, section 4: its
    simulator twins take over a minute for one of these launches.)"""
    zero = (1,) if Nq > 128 else ()
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, 64, fm, D + fm, zero)
    got = _launch_wgmma(kind, _nan_tail(qb), lstate, n_marg, B, H, Nq, D, fm, hk, stages, ring)
    check(got, q64, lstate, n_marg, 64, fm)


@needs_sim
def test_sim_switch_runs_wgmma_where_it_applies(monkeypatch):
    """``SLA_NUMBA_LINEAR=wgmma`` through ``launch_linear_forward_tc``: two heads, block_q
    64, D 64, relu, 2 k-steps a chunk: the wgmma kernel's result; block_q 32 (or D 96)
    falls back to the pipelined kernel; a bad value is a ValueError naming the variable."""
    calls = []
    real = LW.launch_linear_forward_wgmma

    def spy(*args, **kw):
        calls.append(args[7:10])  # Nq, D, block_q
        return real(*args, hk=32, **kw)

    class _Pipelined(Exception):
        pass

    def no_pipelined(*args):
        raise _Pipelined(args[:3])

    monkeypatch.setattr(LW, "launch_linear_forward_wgmma", spy)
    monkeypatch.setattr(linear_tc, "get_linear_kernel_pipelined", no_pipelined)
    monkeypatch.setenv(config.LINEAR_VAR, "wgmma")
    kind, B, H, Nq, D, fm = "bf16", 1, 2, 64, 64, 2
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, 64, fm, 3, zero_blocks=())
    out = np.full(B * H * Nq * D, np.nan, np.float32)
    linear_tc.launch_linear_forward_tc(kind, qb, lstate, n_marg, out, B, H, Nq, D, 64, fm, EPS, 0)
    check(out.reshape(B, H, Nq, D), q64, lstate, n_marg, 64, fm)
    assert calls == [(Nq, D, 64)]
    for D2, bq in ((64, 32), (96, 64)):
        qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D2, bq, fm, 3, zero_blocks=())
        out = np.zeros(B * H * Nq * D2, np.float32)
        with pytest.raises(_Pipelined):
            linear_tc.launch_linear_forward_tc(
                kind, qb, lstate, n_marg, out, B, H, Nq, D2, bq, fm, EPS, 0
            )
    assert len(calls) == 1
    monkeypatch.setenv(config.LINEAR_VAR, "wgmmma")
    with pytest.raises(ValueError, match=config.LINEAR_VAR):
        config.linear_kernel()


def test_launcher_refuses_what_it_does_not_take():
    q = np.zeros(64 * 96, np.int16)
    ls = np.zeros(96 * 96 + 96, np.float32)
    out = np.zeros(64 * 96, np.float32)
    with pytest.raises(ValueError, match="head_dim 96"):
        LW.launch_linear_forward_wgmma(
            "bf16", q, ls, np.ones(1, np.int32), out, 1, 1, 64, 96, 64, 0, EPS, 0
        )
    with pytest.raises(ValueError, match="feature map"):
        LW.launch_linear_forward_wgmma(
            "bf16", q[: 64 * 64], ls[: 64 * 65], np.ones(1, np.int32), out, 1, 1, 64, 64, 64,
            5, EPS, 0,
        )  # fmt: skip


# ---------------------------------------------------------------------------
# 3. Real PTX for sm_90a (no GPU): tools/check_tc_ptx.py's check, in a subprocess
# ---------------------------------------------------------------------------
def _needs_compiler():
    from helpers import cuda_compiler_available

    return pytest.mark.skipif(
        not cuda_compiler_available(), reason="compiles real PTX: needs NVVM/NVRTC"
    )


@_needs_compiler()
def test_ptx_is_sm90a_with_three_wgmma_a_k_step():
    import os
    import subprocess
    import sys

    pytest.importorskip("cuda.bindings.nvjitlink", reason="needs nvJitLink (CUDA wheels)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "check_tc_ptx.py"), "--quick",
         "--only", "linear_wgmma"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "linear_wgmma" in proc.stdout and "MISMATCH" not in proc.stdout


# ---------------------------------------------------------------------------
# 4. A Hopper GPU
# ---------------------------------------------------------------------------
def _hopper():
    if SIM:
        return False
    from sla_numba.gpu.tc.forward_wgmma import wgmma_device_ok

    return wgmma_device_ok()


@pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9.0")
@pytest.mark.parametrize("hk,stages,ring", [(16, 3, 0), (16, 2, 0), (32, 2, 0), (16, 2, 4)])
@pytest.mark.parametrize("kind,D,fm", [("bf16", 128, 0), ("f16", 64, 1)])
def test_gpu_against_pipelined_kernel_and_float64(kind, D, fm, hk, stages, ring):
    from numba import cuda

    B, H, Nq = 2, 3, 64 * 5 + 37
    qb, q64, lstate, n_marg = make_inputs(kind, B, H, Nq, D, 64, fm, D + fm, (1, 4))
    n = B * H * Nq * D
    dq = cuda.to_device(_nan_tail(qb))
    dl, dn = cuda.to_device(lstate), cuda.to_device(n_marg)
    d1 = cuda.to_device(np.full(n + 64, np.nan, np.float32))
    d2 = cuda.to_device(np.full(n + 64, np.nan, np.float32))
    LW.launch_linear_forward_wgmma(
        kind, dq, dl, dn, d1, B, H, Nq, D, 64, fm, EPS, 0, hk=hk, stages=stages, ring=ring
    )
    linear_tc.launch_linear_forward_tc(
        kind, dq, dl, dn, d2, B, H, Nq, D, 64, fm, EPS, 0, pipeline=True
    )
    cuda.synchronize()
    got, ref = d1.copy_to_host(), d2.copy_to_host()
    assert np.isnan(got[n:]).all()
    check(got[:n].reshape(B, H, Nq, D), q64, lstate, n_marg, 64, fm)
    # different summation order; the denominator fp32 here, bf16 hi + lo splits there
    # (~2^-16 relative): well inside the float64 bound (1e-4) both kernels meet
    assert np.abs(got[:n] - ref[:n]).max() <= 5e-5 * max(1.0, np.abs(ref[:n]).max())
